#!/usr/bin/env bash
# The full benchmark: PNS and nginx+Nchan, 19,000 held polls each, on this
# machine. Release build; the report goes to target/load/report.json and one
# summary line to stdout. Extra arguments go to `pns-load bench`
# (see `target/release/pns-load bench --help`).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p pns -p pns-load --bins
exec target/release/pns-load bench --out target/load/report.json "$@"
