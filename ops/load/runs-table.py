#!/usr/bin/env python3
"""The table of "The latest runs" in docs/BENCHMARKS.md, from run reports.

    ops/load/runs-table.py 134=target/load/run134.json 135=run135.json ...

Each argument is a run's number and the report `pns-load bench --out` wrote.
Prints, in the docs' format, a column per run: each figure's medians, PNS
vs Nchan, and in brackets the rounds in which PNS did at least as well;
then, per run, how many of the 15 figures PNS had at its medians, and the
range of each server's medians over the runs (for "At a glance").
"""

import json
import sys

# (figure in the report's comparison, its row in the docs, decimals)
FIGURES = [
    ("ramp_s", "ramp to 19,000 held polls (s)", 3),
    ("rss_per_poll_kib", "server RSS per held poll (KiB)", 2),
    ("rss_end_per_poll_kib", "RSS per held poll after the phases (KiB)", 1),
    ("idle_cpu_pct", "server CPU while the polls wait (%)", 1),
    ("single_per_s", "single notifies a second", 0),
    ("single_cpu_us_per_msg", "server CPU per single notify (µs)", 1),
    ("single_p50_ms", "single phase delivery, p50 (ms)", 2),
    ("single_p99_ms", "single phase delivery, p99 (ms)", 2),
    ("batch_per_s", "messages a second in batches of 500", 0),
    ("batch_cpu_us_per_msg", "server CPU per batched message (µs)", 1),
    ("rate_p50_ms", "delivery at 1,000 notifies/s, p50 (ms)", 3),
    ("rate_p99_ms", "delivery at 1,000 notifies/s, p99 (ms)", 2),
    ("rate_max_ms", "delivery at 1,000 notifies/s, max (ms)", 1),
    ("rate_cpu_us_per_msg", "server CPU per notify at 1,000/s (µs)", 0),
    ("lost", "lost of 79,000", 0),
]


def number(value, decimals):
    return f"{value:,.{decimals}f}"


def main():
    runs = []
    for arg in sys.argv[1:]:
        name, _, path = arg.partition("=")
        with open(path) as f:
            report = json.load(f)
        runs.append((name, {c["figure"]: c for c in report["comparison"]}))
    if not runs:
        sys.exit(__doc__)
    print("| figure | " + " | ".join(f"run {name}" for name, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for key, label, decimals in FIGURES:
        cells = []
        for _, comparison in runs:
            c = comparison[key]
            cells.append(
                f"{number(c['pns'], decimals)} vs {number(c['nchan'], decimals)}"
                f" ({c['rounds_pns_as_good']}/{c['rounds']})"
            )
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    for name, comparison in runs:
        had = sum(comparison[key]["pns_as_good"] for key, _, _ in FIGURES)
        short = [label for key, label, _ in FIGURES if not comparison[key]["pns_as_good"]]
        print(f"run {name}: PNS had {had} of {len(FIGURES)}; Nchan had: {'; '.join(short) or 'nothing'}")
    print()
    for key, label, decimals in FIGURES:
        ranges = []
        for target in ("pns", "nchan"):
            values = [comparison[key][target] for _, comparison in runs]
            low, high = number(min(values), decimals), number(max(values), decimals)
            ranges.append(low if low == high else f"{low}–{high}")
        print(f"{label}: PNS {ranges[0]}, Nchan {ranges[1]}")


if __name__ == "__main__":
    main()
