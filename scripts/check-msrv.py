#!/usr/bin/env python3
"""The minimum Rust version, stated in one place and checked everywhere.

Cargo.toml's workspace `rust-version` must equal the highest
`rust-version` any crate in the locked dependency graph declares (lower,
and a build on that toolchain fails; higher, and the claim is stale), and
the Dockerfile's builder image and the README's "N or newer" must name it.

    python3 scripts/check-msrv.py
"""

import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def version(text):
    return tuple(int(part) for part in text.split(".")[:2])


def main():
    metadata = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--locked"], cwd=ROOT))
    members = set(metadata["workspace_members"])
    declared = {p["rust_version"] for p in metadata["packages"] if p["id"] in members}
    if len(declared) != 1 or None in declared:
        sys.exit(f"check-msrv: workspace members declare {declared}, want one rust-version")
    declared = version(declared.pop())
    needed, by = max((version(p["rust_version"]), p["name"]) for p in metadata["packages"]
                     if p["id"] not in members and p.get("rust_version"))
    failures = []
    if declared != needed:
        failures.append(f"Cargo.toml rust-version is {declared}, the dependencies need {needed} ({by})")
    want = "{}.{}".format(*needed)
    image = re.search(r"^FROM rust:(\d+\.\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    if not image or image.group(1) != want:
        failures.append(f"Dockerfile builds with rust:{image and image.group(1)}, want rust:{want}")
    readme = re.findall(r"(\d+\.\d+) or newer", (ROOT / "README.md").read_text())
    if readme != [want]:
        failures.append(f"README.md says {readme} or newer, want [{want!r}]")
    if failures:
        sys.exit("check-msrv:\n  " + "\n  ".join(failures))
    print(f"check-msrv: Rust {want} (needed by {by}) in Cargo.toml, Dockerfile and README.md")


if __name__ == "__main__":
    main()
