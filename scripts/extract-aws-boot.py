#!/usr/bin/env python3
"""Extracts what the NATS nodes run at boot from the synthesized AWS
template, for the checks of scripts/check-deploy.sh (shellcheck on the
script, `nats-server -t` on its configuration).

Usage: extract-aws-boot.py TEMPLATE OUT_DIR

Writes OUT_DIR/boot.sh and OUT_DIR/nats.conf, with deploy-time values
(references, mapping lookups) replaced by plausible literals.
"""

import json
import re
import sys

# Stand-ins for the values CloudFormation fills in at deploy time.
LOOKUPS = {"natsMaxFileStore": "45Gi"}


def literal(value) -> str:
    """The template value as text, deploy-time parts replaced."""
    if isinstance(value, str):
        return value
    if "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(literal(part) for part in parts)
    if "Fn::Base64" in value:
        return literal(value["Fn::Base64"])
    if "Fn::FindInMap" in value:
        return LOOKUPS[value["Fn::FindInMap"][2]]
    if "Ref" in value:
        return f"ref-{value['Ref']}"
    sys.exit(f"unexpected template value: {value}")


def main() -> int:
    template_path, out_dir = sys.argv[1:3]
    with open(template_path, encoding="utf-8") as f:
        template = json.load(f)
    nodes = [r for r in template["Resources"].values() if r["Type"] == "AWS::EC2::Instance"]
    if len(nodes) != 3:
        sys.exit(f"expected three NATS nodes, found {len(nodes)}")
    user_data = literal(nodes[0]["Properties"]["UserData"])
    script = next((part[part.index("#!/bin/bash"):] for part in re.split(r"\n--\S*\n", user_data)
                   if "#!/bin/bash" in part), None)
    if script is None or "scripts-user, always" not in user_data:
        sys.exit("the boot script, run at every boot, is missing from the user data")
    config = re.search(r"<<'CONF'\n(.*?)\nCONF\n", script, re.S)
    if not config:
        sys.exit("the boot script writes no nats.conf")
    with open(f"{out_dir}/boot.sh", "w", encoding="utf-8") as f:
        f.write(script)
    with open(f"{out_dir}/nats.conf", "w", encoding="utf-8") as f:
        f.write(config.group(1).replace("store_dir: /data", f"store_dir: {out_dir}/data") + "\n")
    print(f"boot script ({len(script.splitlines())} lines) and nats.conf extracted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
