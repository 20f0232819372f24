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

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
files = [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))
def slug(h):
    h = h.strip().lower()
    h = re.sub(r'<[^>]+>', '', h)
    # drop markdown emphasis/code markers and link syntax
    h = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', h)
    h = h.replace('`','')
    h = re.sub(r'[^\w\- ]', '', h, flags=re.UNICODE)
    h = h.replace(' ', '-')
    return h

def anchors(path):
    out=set(); counts={}
    infence=False
    for line in open(path,encoding='utf-8'):
        if re.match(r'^\s*(```|~~~)', line):
            infence = not infence; continue
        if infence: continue
        m=re.match(r'^(#{1,6})\s+(.*?)\s*#*\s*$', line)
        if m:
            s=slug(m.group(2))
            n=counts.get(s,0)
            out.add(s if n==0 else f'{s}-{n}')
            counts[s]=n+1
    return out

errors=0; checked=0; external=[]
cache={}
for f in files:
    infence=False
    for no,line in enumerate(open(f,encoding='utf-8'),1):
        if re.match(r'^\s*(```|~~~)', line):
            infence = not infence; continue
        if infence: continue
        # strip inline code spans
        text=re.sub(r'`[^`]*`','',line)
        for m in re.finditer(r'\[([^\]]*)\]\(([^)\s]+)\)', text):
            target=m.group(2)
            checked+=1
            if re.match(r'^[a-z]+:', target):
                external.append((f,no,target)); continue
            path,_,anchor=target.partition('#')
            full = f if path=='' else os.path.normpath(os.path.join(os.path.dirname(f), path))
            if not os.path.exists(full):
                print(f'{os.path.relpath(f,root)}:{no}: missing file {target}'); errors+=1; continue
            if anchor:
                if not full.endswith('.md'):
                    print(f'{os.path.relpath(f,root)}:{no}: anchor on non-md {target}'); errors+=1; continue
                if full not in cache: cache[full]=anchors(full)
                if anchor not in cache[full]:
                    print(f'{os.path.relpath(f,root)}:{no}: missing anchor {target}'); errors+=1
print(f'{checked} links checked in {len(files)} files, {errors} broken, {len(external)} external (not fetched)')
for e in external: print('  external:', os.path.relpath(e[0],root), e[1], e[2])
sys.exit(1 if errors else 0)
