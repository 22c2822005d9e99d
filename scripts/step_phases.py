#!/usr/bin/env python3
"""Mean time per engine step phase (ms) from a /metrics scrape: where the time of a step goes.
Usage: step_phases.py URL"""
import re
import sys
import urllib.request

text = urllib.request.urlopen(sys.argv[1] + "/metrics").read().decode()
sums = dict(re.findall(r'mlxd_step_phase_seconds_sum\{phase="(\w+)"\} ([0-9.e+-]+)', text))
counts = dict(re.findall(r'mlxd_step_phase_seconds_count\{phase="(\w+)"\} ([0-9]+)', text))
total = 0.0
for phase in ["schedule", "prepare", "forward", "sample", "update"]:
    if phase in sums and int(counts.get(phase, 0)):
        mean = 1000 * float(sums[phase]) / int(counts[phase])
        total += mean
        print(f"{phase:9s} {mean:8.3f} ms/step over {counts[phase]} steps")
print(f"{'total':9s} {total:8.3f} ms/step")
