#!/usr/bin/env bash
# Runs every test of the project: Rust unit and end-to-end tests, the browser
# client's unit tests and its tests in headless Chromium.
#
# It installs what the tests need when it is missing and it can (as root, with
# apt-get and npm), and starts the local PostgreSQL when it is not running.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
# Real peers the checks use: nginx (-t on the shipped configs), promtool.
have nginx || need_apt+=(nginx)
# Nchan, the peer the load tool compares PNS with.
[ -e /usr/share/nginx/modules-available/mod-http-nchan.conf ] || [ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || need_apt+=(libnginx-mod-nchan)
have promtool || need_apt+=(prometheus)
# A real Dovecot delivering over LMTP with its push_notification driver.
have dovecot || need_apt+=(dovecot-core)
[ -x /usr/lib/dovecot/lmtp ] || need_apt+=(dovecot-lmtpd)

# PostgreSQL: the cluster tests use postgres://postgres@127.0.0.1:5432/test.
if have pg_isready && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  say "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if have psql && pg_isready -q -h 127.0.0.1 -p 5432; then
  psql -h 127.0.0.1 -U postgres -lqt | cut -d'|' -f1 | grep -qw test || createdb -h 127.0.0.1 -U postgres test
fi

if [ ${#need_apt[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  say "installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

say "cargo test"
# The real-Dovecot tests may skip only where Dovecot cannot be installed.
if have dovecot; then export PNS_REQUIRE_DOVECOT=1; fi
cargo test --workspace --all-targets

say "browser client: unit tests and end-to-end tests in headless Chromium"
web/run-tests.sh

say "load tool smoke run (PNS, and Nchan when installed)"
ops/load/smoke.sh

say "benchmarks of examples/, small and quick (figures printed, never asserted)"
cargo build --bin pns --examples
target/debug/examples/bench_maildir --pns target/debug/pns --files 200 --mailboxes 4
target/debug/examples/bench_purge --pns target/debug/pns --rows 20000 --mailboxes 200 \
    --secs 3 --purge-every 1

say "deployment files (ops/check.sh; tools that are missing are skipped)"
ops/check.sh
