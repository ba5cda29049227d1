#!/usr/bin/env python3
"""What the cores ran while deliveries waited.

Reads the file `pns-load bench --deliveries FILE` writes and the text of a
scheduler trace taken meanwhile on the same machine:

    perf record -k CLOCK_MONOTONIC -a -e sched:sched_switch -o sched.data -- sleep 5
    perf script -i sched.data -F cpu,time,event,trace > sched.txt
    ops/load/what-ran.py deliveries.tsv sched.txt [--phase rate] [--target pns]

For the slowest 1 % of the deliveries that started inside the trace, and
for the faster half, it samples every 20 µs of each delivery which thread
ran on each core, and prints the share of each thread name (digits at the
end of a name dropped, so `kworker/1:1` and `kworker/0:2` count together).
"""

import argparse
import bisect
import collections
import csv
import re

SWITCH = re.compile(r"\[(\d+)\]\s+([\d.]+): sched:sched_switch: .*next_comm=(.*) next_pid=\d+")


def read_trace(path):
    """Per core, the times a thread started running and its name."""
    runs = collections.defaultdict(list)
    for line in open(path):
        m = SWITCH.search(line)
        if m:
            runs[int(m.group(1))].append((float(m.group(2)), re.sub(r"\d+$", "", m.group(3))))
    return runs


def shares(deliveries, runs, step=20e-6):
    """The share of each thread name on the cores over `deliveries`."""
    seen = collections.Counter()
    starts = {cpu: [t for t, _ in r] for cpu, r in runs.items()}
    for start, latency in deliveries:
        for i in range(max(1, int(latency / step))):
            t = start + i * step
            for cpu, r in runs.items():
                j = bisect.bisect_right(starts[cpu], t) - 1
                seen[r[j][1] if j >= 0 else "?"] += 1
    total = sum(seen.values()) or 1
    return [(name, 100 * n / total) for name, n in seen.most_common(12)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("deliveries")
    parser.add_argument("trace")
    parser.add_argument("--phase", default="rate")
    parser.add_argument("--target", default="pns")
    args = parser.parse_args()
    runs = read_trace(args.trace)
    if not runs:
        raise SystemExit(f"{args.trace}: no sched_switch events")
    first = min(r[0][0] for r in runs.values())
    last = max(r[-1][0] for r in runs.values())
    with open(args.deliveries) as f:
        rows = [
            (int(row["start_ns"]) / 1e9, int(row["latency_us"]) / 1e6)
            for row in csv.DictReader(f, delimiter="\t")
            if row["phase"] == args.phase and row["target"] == args.target
        ]
    inside = sorted(
        ((s, l) for s, l in rows if first <= s and s + l <= last),
        key=lambda d: d[1],
        reverse=True,
    )
    if len(inside) < 100:
        raise SystemExit(f"only {len(inside)} deliveries inside the trace; take a longer one")
    groups = [
        ("slowest 1 %", inside[: len(inside) // 100]),
        ("faster half", inside[len(inside) // 2 :]),
    ]
    print(f"{len(inside)} {args.target} deliveries of the {args.phase} phase inside the trace")
    for label, group in groups:
        print(f"{label}: {len(group)}, from {group[-1][1] * 1e3:.3f} to {group[0][1] * 1e3:.3f} ms")
        for name, share in shares(group, runs):
            print(f"  {share:5.1f} %  {name}")


if __name__ == "__main__":
    main()
