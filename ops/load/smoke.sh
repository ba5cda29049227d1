#!/usr/bin/env bash
# A quick load run for CI: 200 held polls and a few hundred messages against
# PNS and, when nginx with the Nchan module is installed, Nchan too. Exits
# non-zero if PNS fails: a poll not held, a notify refused, a message lost
# or received twice. Nchan's figures are printed beside PNS's but do not
# decide the exit status (Nchan itself loses a message now and then, see
# docs/BENCHMARKS.md). Speed figures are printed, never asserted. It also
# checks the file of `--deliveries` has a line for each message PNS delivered,
# and that PNS logged no warning or error.
set -euo pipefail
cd "$(dirname "$0")/../.."
profile="${PNS_LOAD_PROFILE:-debug}"
if [ "$profile" = release ]; then
    cargo build --release -p pns -p pns-load --bins
else
    cargo build -p pns -p pns-load --bins
fi
timeout 120 "target/$profile/pns-load" bench \
    --pns-bin "target/$profile/pns" \
    --skip-missing-nchan --must-pass pns \
    --rounds 1 --users 200 --workers 2 --senders 16 \
    --rate 200 --rate-secs 2 \
    --batch 100 --batch-total 1000 \
    --idle-secs 1 --settle-secs 1 --phase-limit-secs 30 \
    --out target/load/smoke.json \
    --deliveries target/load/smoke-deliveries.tsv "$@"

# The deliveries file has a line for each message PNS delivered, in its phase.
python3 - <<'CHECK'
import collections, csv, json
report = json.load(open("target/load/smoke.json"))
pns = next(t for t in report["targets"] if t["target"] == "pns")
with open("target/load/smoke-deliveries.tsv") as f:
    lines = collections.Counter(
        row["phase"] for row in csv.DictReader(f, delimiter="\t") if row["target"] == "pns"
    )
for phase in ("single", "rate", "batch"):
    want = pns[phase]["delivery"]["delivered"]
    assert want > 0 and lines[phase] == want, f"{phase}: {lines[phase]} lines, {want} delivered"
print(f"deliveries file: a line for each of the {sum(lines.values())} messages PNS delivered")

# Under this load PNS has nothing to warn an operator about.
log = pns["server_log"]
assert log["lines"] == 0, f"PNS logged {log['lines']} warning or error line(s), the first: {log['first']}"
print("PNS's log: no warning or error")
CHECK
