#!/usr/bin/env bash
# A quick load run for CI: 200 held polls and a few hundred messages against
# PNS and, when nginx with the Nchan module is installed, Nchan too. Exits
# non-zero if PNS fails: a poll not held, a notify refused, a message lost
# or received twice. Nchan's figures are printed beside PNS's but do not
# decide the exit status (Nchan itself loses a message now and then, see
# docs/BENCHMARKS.md). Speed figures are printed, never asserted.
set -euo pipefail
cd "$(dirname "$0")/../.."
profile="${PNS_LOAD_PROFILE:-debug}"
if [ "$profile" = release ]; then
    cargo build --release -p pns -p pns-load --bins
else
    cargo build -p pns -p pns-load --bins
fi
exec timeout 120 "target/$profile/pns-load" bench \
    --pns-bin "target/$profile/pns" \
    --skip-missing-nchan --must-pass pns \
    --rounds 1 --users 200 --workers 2 --senders 16 \
    --rate 200 --rate-secs 2 \
    --batch 100 --batch-total 1000 \
    --idle-secs 1 --settle-secs 1 --phase-limit-secs 30 \
    --out target/load/smoke.json "$@"
