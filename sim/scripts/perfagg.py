#!/usr/bin/env python3
"""Aggregate `perf script` output by function: inclusive and self sample shares.
Profile e.g.: perf record -F 499 --call-graph dwarf,16384 -- target/release/tapledger-sim bench e2e --quiet --step-seconds 1 --core-payments 20000
Usage: perf script --no-inline -i perf.data | perfagg.py [--comm REGEX] [--top N]"""
import sys, re, collections, argparse
p = argparse.ArgumentParser()
p.add_argument('--comm', default=None)
p.add_argument('--top', type=int, default=40)
p.add_argument('--filter', default=None, help='only samples whose stack contains this regex')
a = p.parse_args()
comm_re = re.compile(a.comm) if a.comm else None
filt = re.compile(a.filter) if a.filter else None
incl = collections.Counter(); self_ = collections.Counter(); comms = collections.Counter()
total = 0
def short(sym):
    sym = re.sub(r'::h[0-9a-f]{16}$', '', sym)
    sym = re.sub(r'\+0x[0-9a-f]+$', '', sym)
    return sym[:150]
def flush(comm, frames):
    global total
    if comm is None: return
    if comm_re and not comm_re.search(comm): return
    if filt and not any(filt.search(f) for f in frames): return
    total += 1; comms[comm] += 1
    if frames: self_[frames[0]] += 1
    for f in set(frames): incl[f] += 1
comm = None; frames = []
for line in sys.stdin:
    if not line.strip():
        flush(comm, frames); comm = None; frames = []; continue
    if not line.startswith((' ', '\t')):
        flush(comm, frames); frames = []
        comm = line.split()[0] if line.split() else '?'
        # comm may contain spaces; take text before pid
        m = re.match(r'^(.*?)\s+\d+(/\d+)?\s', line)
        if m: comm = m.group(1).strip()
        continue
    parts = line.strip().split(None, 1)
    if len(parts) < 2: continue
    sym = parts[1].rsplit(' (', 1)[0]
    frames.append(short(sym))
flush(comm, frames)
print(f'samples {total}'); print('threads:', ', '.join(f'{c} {n*100/total:.1f}%' for c, n in comms.most_common(8)))
print('\n== inclusive =='); [print(f'{n*100/total:6.1f}%  {f}') for f, n in incl.most_common(a.top)]
print('\n== self =='); [print(f'{n*100/total:6.1f}%  {f}') for f, n in self_.most_common(a.top)]
