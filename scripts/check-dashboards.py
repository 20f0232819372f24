#!/usr/bin/env python3
"""Dashboards: every panel queries the ${datasource} variable, every target
has a refId and a non-empty expr, and every metric selector filters on
$instance. The exprs (variables substituted) are written out as recording
rules so that promtool parses them as PromQL (scripts/check-stack.sh).

    python3 scripts/check-dashboards.py OUT.rules.yml DASHBOARD.json...
"""
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
