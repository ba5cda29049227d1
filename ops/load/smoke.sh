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

# Under this load PNS has nothing to warn an operator about, but a disk
# that held a sync of its log (the machine's doing, not the server's).
log = pns["server_log"]
others = log["lines"] - log["slow_syncs"]
assert others == 0, f"PNS logged {others} warning or error line(s) besides slow syncs, the first: {log['first']}"
print(f"PNS's log: no warning or error besides slow-sync warnings, the disk's doing ({log['slow_syncs']})")

# Each phase's acknowledgements waited for syncs of PNS's log, which the
# tool counts from PNS's metrics; Nchan syncs nothing.
for phase in ("single", "rate", "batch"):
    syncs = pns[phase]["log_syncs"]
    assert syncs and syncs["count"] > 0, f"{phase}: no sync of PNS's log counted: {syncs}"
for nchan in (t for t in report["targets"] if t["target"] == "nchan"):
    assert nchan["single"]["log_syncs"] is None, nchan["single"]["log_syncs"]
print("PNS's syncs of its log by phase: " + ", ".join(
    f"{p} {pns[p]['log_syncs']['count']}" for p in ("single", "rate", "batch")))
CHECK

# A round that fails (here an nginx that never starts, as nginx did when
# its workers died by the hundred in run 128 of docs/BENCHMARKS.md) is
# reported with its error, and the run goes on with the other rounds.
fake_nginx="target/load/nginx-that-never-starts"
printf '#!/bin/sh\necho "nginx: [emerg] a stand-in that never starts" >&2\nexit 1\n' > "$fake_nginx"
chmod +x "$fake_nginx"
timeout 120 "target/$profile/pns-load" bench \
    --pns-bin "target/$profile/pns" \
    --nginx-bin "$PWD/$fake_nginx" --nchan-module "$PWD/$fake_nginx" \
    --must-pass pns --warm-up false \
    --rounds 2 --users 100 --workers 1 --senders 8 \
    --rate 100 --rate-secs 1 \
    --batch 50 --batch-total 200 \
    --idle-secs 1 --settle-secs 1 --phase-limit-secs 30 \
    --out target/load/smoke-failed-rounds.json

python3 - <<'CHECK'
import json
report = json.load(open("target/load/smoke-failed-rounds.json"))
measured = [(t["target"], t["round"]) for t in report["targets"]]
assert measured == [("pns", 1), ("pns", 2)], measured
failed = [(f["target"], f["round"]) for f in report["failed"]]
assert failed == [("nchan", 1), ("nchan", 2)], failed
assert all("nginx exited at start" in f["error"] for f in report["failed"]), report["failed"]
print("failed rounds: each reported with its error, and PNS's rounds measured around them")
CHECK
