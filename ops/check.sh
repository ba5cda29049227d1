#!/usr/bin/env bash
# Checks the deployment files in ops/ with the real tools, where installed:
#   - Prometheus rules and config: promtool check + the alert unit tests
#   - nginx config: nginx -t, inside a throw-away main config
#   - systemd unit: systemd-analyze verify
#   - Grafana dashboard: valid JSON
#   - every pns_* metric named in the rules and dashboard is one a running
#     pns really exports (needs a built pns: PNS_BIN or target/*/pns)
#   - Dockerfile: its build stage carried out without a Docker engine
#     (ops/dockerfile-check.py), then the binary it made is run
# A missing tool is reported and skipped, not failed. The base images are not
# pulled: that needs a Docker engine and a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
ops=ops
tmp=$(mktemp -d)
pid=""
cleanup() {
    if [[ -n "$pid" ]]; then kill "$pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
failed=0
ok() { echo "ok    $*"; }
skip() { echo "skip  $*"; }
fail() { echo "FAIL  $*"; failed=1; }

if command -v promtool >/dev/null; then
    (cd $ops/prometheus && promtool check rules pns.rules.yml >/dev/null) \
        && ok "promtool check rules" || fail "promtool check rules"
    (cd $ops/prometheus && promtool check config prometheus.yml >/dev/null) \
        && ok "promtool check config" || fail "promtool check config"
    (cd $ops/prometheus && promtool test rules pns.rules.test.yml >/dev/null) \
        && ok "promtool test rules (alert unit tests)" || fail "promtool test rules"
else
    skip "promtool not installed (Debian: apt-get install prometheus)"
fi

if command -v nginx >/dev/null && command -v openssl >/dev/null; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=push.example.com \
        -keyout "$tmp/privkey.pem" -out "$tmp/fullchain.pem" 2>/dev/null
    for conf in $ops/nginx/pns.conf $ops/cluster/nginx.conf; do
        sed -e "s#/etc/ssl/pns/#$tmp/#g" -e "s#/var/log/nginx/#$tmp/#g" \
            "$conf" > "$tmp/pns.conf"
        cat > "$tmp/nginx.conf" <<CONF
pid $tmp/nginx.pid;
error_log $tmp/error.log;
events {}
http {
    access_log $tmp/access.log;
    client_body_temp_path $tmp;
    proxy_temp_path $tmp;
    fastcgi_temp_path $tmp;
    uwsgi_temp_path $tmp;
    scgi_temp_path $tmp;
    include $tmp/pns.conf;
}
CONF
        if nginx -t -q -c "$tmp/nginx.conf" -p "$tmp" 2>"$tmp/nginx.out"; then
            ok "nginx -t $conf"
        else
            cat "$tmp/nginx.out"
            fail "nginx -t $conf"
        fi
    done
else
    skip "nginx or openssl not installed"
fi

if command -v systemd-analyze >/dev/null; then
    bin=$(command -v true)
    sed -e "s#^ExecStart=/usr/local/bin/pns#ExecStart=$bin#" \
        $ops/systemd/pns.service > "$tmp/pns.service"
    if out=$(systemd-analyze verify "$tmp/pns.service" 2>&1) && [[ -z "$out" ]]; then
        ok "systemd-analyze verify"
    else
        echo "$out"
        fail "systemd-analyze verify"
    fi
else
    skip "systemd-analyze not installed"
fi

python3 -m json.tool $ops/grafana/pns.json >/dev/null \
    && ok "grafana dashboard is JSON" || fail "grafana dashboard is not JSON"

bin=${PNS_BIN:-}
if [[ -z "$bin" ]]; then
    for b in target/debug/pns target/release/pns; do
        if [[ -x "$b" ]]; then bin=$b; fi
    done
fi
if [[ -n "$bin" ]]; then
    port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    internal=127.0.0.1:$(port)
    PNS_LISTEN=127.0.0.1:$(port) PNS_INTERNAL_LISTEN=$internal \
        PNS_DATABASE_URL="sqlite://$tmp/pns.db" PNS_LOG=warn "$bin" serve &
    pid=$!
    for _ in $(seq 50); do
        if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://$internal/metrics')" 2>/dev/null; then break; fi
        sleep 0.2
    done
    python3 -c "import urllib.request; print(urllib.request.urlopen('http://$internal/metrics').read().decode())" \
        > "$tmp/metrics.txt"
    # Every series name each declared metric yields, samples or not yet.
    exported=$(awk '$1 == "#" && $2 == "TYPE" {
            if ($4 == "counter") print $3 "_total";
            else if ($4 == "histogram") { print $3 "_bucket"; print $3 "_count"; print $3 "_sum" }
            else print $3
        }' "$tmp/metrics.txt")
    missing=""
    for name in $(grep -oh 'pns_[a-z_]*' $ops/prometheus/pns.rules.yml $ops/grafana/pns.json | sort -u); do
        if ! grep -qx -e "$name" <<<"$exported"; then
            missing="$missing $name"
        fi
    done
    if [[ -z "$missing" ]]; then
        ok "rules and dashboard use only metrics pns exports"
    else
        fail "rules or dashboard use metrics pns does not export:$missing"
    fi
else
    skip "no pns binary (cargo build, or set PNS_BIN) to check metric names against"
fi

if command -v python3 >/dev/null && command -v cargo >/dev/null; then
    if ops/dockerfile-check.py >"$tmp/docker.log" 2>&1; then
        ok "Dockerfile build stage ($(tail -n1 "$tmp/docker.log" | sed 's/^dockerfile-check: ok, //'))"
    else
        tail -n 30 "$tmp/docker.log"
        fail "Dockerfile build stage"
    fi
else
    skip "python3 or cargo missing: Dockerfile build stage not checked"
fi

exit $failed
