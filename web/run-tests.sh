#!/usr/bin/env bash
# Runs the browser client's tests: the unit tests (node:test, no install), then
# the end-to-end tests in headless Chromium against the real `pns` binary.
#
# It installs what is missing when it can: the npm packages (npm ci), Chromium
# (apt-get, as root), the server binary (cargo build). CHROMIUM and PNS_BIN
# point at another browser or binary.
set -euo pipefail
cd "$(dirname "$0")"
root="$(cd .. && pwd)"

say() { printf '\n== %s\n' "$*"; }
die() { printf 'web/run-tests.sh: %s\n' "$*" >&2; exit 1; }

command -v node >/dev/null 2>&1 || die "node is not installed (Node 20 or later is needed)"
major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$major" -ge 20 ] || die "Node $(node --version) is too old: Node 20 or later is needed"

if [ ! -d node_modules/playwright-core ]; then
  say "npm ci"
  command -v npm >/dev/null 2>&1 || die "npm is not installed"
  npm ci --no-audit --no-fund
fi

chromium="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
  if [ -z "${CHROMIUM:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
  [ -x "$chromium" ] || die "no Chromium at $chromium: install it (Debian: apt-get install chromium) or set CHROMIUM to its path"
fi
export CHROMIUM="$chromium"

if [ -z "${PNS_BIN:-}" ]; then
  # cargo build is a no-op when the binary is up to date; the page and the
  # client are compiled into it, so it must be rebuilt when they change.
  say "cargo build"
  (cd "$root" && cargo build --quiet --bin pns)
  export PNS_BIN="$root/target/debug/pns"
fi
[ -x "$PNS_BIN" ] || die "no server binary at $PNS_BIN"

say "browser client unit tests (node --test test/)"
node --test test/

say "browser end-to-end tests in headless Chromium (node --test e2e/)"
node --test e2e/
