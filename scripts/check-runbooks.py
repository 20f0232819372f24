#!/usr/bin/env python3
"""Runbook links: every alert's runbook_url is absolute, built from the
external label runbook_base_url (prometheus.yml) with the same default as a
fallback, and ends in the anchor of that alert's section of the runbook
document; every dashboard runbook link is ${runbook_base_url} plus an
existing anchor (scripts/check-stack.sh).

    python3 scripts/check-runbooks.py prometheus.yml ALERTS.yml RUNBOOK.md DASHBOARD.json...
"""
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
