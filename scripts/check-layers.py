#!/usr/bin/env python3
"""Lists which top-level modules of src/ use which (`crate::x` and
`crate::{x, y}` groups in code;
comments and doc links do not count, nor test modules), and fails on an
import cycle among them. Run by scripts/check-stack.sh."""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
REFERENCE = re.compile(r"\bcrate::([a-z_]+)")
GROUP = re.compile(r"\bcrate::\{")


def references(text):
    """The top-level modules a text names: `crate::x` and every first
    name in a `crate::{a, b::c, {d}}` group, across lines."""
    used = set(REFERENCE.findall(text))
    for match in GROUP.finditer(text):
        depth, start = 1, match.end()
        at = start
        while depth and at < len(text):
            depth += {"{": 1, "}": -1}.get(text[at], 0)
            at += 1
        inner, depth, item = text[start:at - 1], 0, ""
        items = []
        for ch in inner:
            if ch == "," and depth == 0:
                items.append(item)
                item = ""
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            item += ch
        items.append(item)
        for entry in items:
            name = re.match(r"\s*([a-z_]+)", entry)
            if name and name.group(1) not in ("self", "super", "crate"):
                used.add(name.group(1))
    return used


def top_module(path):
    relative = os.path.relpath(path, ROOT)
    first = relative.split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def code_of(text):
    # Test modules may use anything; only the shipped code is layered. An
    # inline test module runs to the file's end; `#[cfg(test)] mod tests;`
    # (a declaration) cuts nothing.
    inline = re.search(r"#\[cfg\(test\)\]\s*mod \w+ \{", text)
    text = text if inline is None else text[:inline.start()]
    return "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("//")
    )


graph = {}
for directory, _, files in os.walk(ROOT):
    for name in files:
        if not name.endswith(".rs"):
            continue
        path = os.path.join(directory, name)
        if name == "tests.rs" or os.sep + "tests" + os.sep in path:
            continue
        module = top_module(path)
        if module in ("lib", "main"):
            continue
        text = code_of(open(path, encoding="utf-8").read())
        for used in references(text):
            if used != module:
                graph.setdefault(module, set()).add(used)
        graph.setdefault(module, set())

cycles = []


def visit(node, stack, seen):
    if node in stack:
        cycles.append(stack[stack.index(node):] + [node])
        return
    if node in seen:
        return
    seen.add(node)
    for nxt in sorted(graph.get(node, ())):
        visit(nxt, stack + [node], seen)


for start in sorted(graph):
    visit(start, [], set())

for module in sorted(graph):
    print(f"{module:10} -> {', '.join(sorted(graph[module])) or '(nothing of ours)'}")
if cycles:
    unique = {" -> ".join(c) for c in cycles}
    print("import cycles:\n  " + "\n  ".join(sorted(unique)))
    sys.exit(1)
print("no import cycle between the top-level modules")
