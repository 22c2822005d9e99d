#!/usr/bin/env python3
"""Mean time per engine step phase (ms) from /metrics: where the time of a step goes.

  step_phases.py URL snapshot FILE   # remember the counters now (e.g. after a warm-up)
  step_phases.py URL [FILE]          # means since FILE's snapshot (or since start)
"""
import json
import re
import sys
import urllib.request

PHASES = ["schedule", "prepare", "forward", "sample", "update"]


def scrape(url):
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    sums = dict(re.findall(r'mlxd_step_phase_seconds_sum\{(?:model="[^"]*",)?phase="(\w+)"\} ([0-9.e+-]+)', text))
    counts = dict(re.findall(r'mlxd_step_phase_seconds_count\{(?:model="[^"]*",)?phase="(\w+)"\} ([0-9]+)', text))
    return {p: (float(sums.get(p, 0)), int(counts.get(p, 0))) for p in PHASES}


now = scrape(sys.argv[1])
if len(sys.argv) > 3 and sys.argv[2] == "snapshot":
    json.dump(now, open(sys.argv[3], "w"))
    sys.exit(0)
before = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else {p: (0.0, 0) for p in PHASES}
total = 0.0
for p in PHASES:
    s, c = now[p][0] - before[p][0], now[p][1] - before[p][1]
    if c:
        mean = 1000 * s / c
        total += mean
        print(f"{p:9s} {mean:8.3f} ms/step over {c} steps")
print(f"{'total':9s} {total:8.3f} ms/step")
