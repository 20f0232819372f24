#!/usr/bin/env python3
"""Every relative link in README.md and docs/*.md points at a file that
exists and, with a #fragment, at a heading of it (GitHub's anchors).
External links are listed, not fetched (CI has no network).

    python3 scripts/check-links.py
"""
import glob
import os
import re
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor of a heading: lowercase, markup and punctuation
    dropped (hyphens kept), spaces as hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def prose_lines(path):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if FENCE.match(line):
                fenced = not fenced
                continue
            if not fenced:
                yield number, line


def anchors(path):
    found, seen = set(), {}
    for _, line in prose_lines(path):
        heading = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if heading:
            anchor = slug(heading.group(2))
            count = seen.get(anchor, 0)
            found.add(anchor if count == 0 else f"{anchor}-{count}")
            seen[anchor] = count + 1
    return found


def main():
    files = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    cache, errors, checked, external = {}, [], 0, []
    for path in files:
        where = os.path.relpath(path, ROOT)
        for number, line in prose_lines(path):
            for link in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
                target = link.group(2)
                checked += 1
                if re.match(r"^[a-z]+:", target):
                    external.append(f"{where}:{number}: {target}")
                    continue
                file_part, _, anchor = target.partition("#")
                full = path if not file_part else os.path.normpath(
                    os.path.join(os.path.dirname(path), file_part))
                if not os.path.exists(full):
                    errors.append(f"{where}:{number}: missing file {target}")
                elif anchor and not full.endswith(".md"):
                    errors.append(f"{where}:{number}: an anchor on a file that is not markdown: {target}")
                elif anchor:
                    if full not in cache:
                        cache[full] = anchors(full)
                    if anchor not in cache[full]:
                        errors.append(f"{where}:{number}: missing anchor {target}")
    for error in errors:
        print(error)
    print(f"{checked} links checked in {len(files)} files, {len(errors)} broken, "
          f"{len(external)} external (not fetched)")
    for link in external:
        print("  external:", link)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
