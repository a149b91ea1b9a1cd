#!/usr/bin/env bash
# Measures loadgen's own ceiling: closed-loop throughput against nginx
# `return 200` on 127.0.0.1 at 1, 16, 256 and 1000 connections.
# Needs nginx (Debian: apt-get install -y nginx-light). Usage:
#   loadgen/bench/sweep.sh [DURATION] [LOADGEN_BINARY]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
duration="${1:-5s}"
loadgen="${2:-${CARGO_TARGET_DIR:-$here/../../target}/release/loadgen}"
command -v nginx >/dev/null || { echo "nginx not installed (apt-get install -y nginx-light)" >&2; exit 1; }
[ -x "$loadgen" ] || { echo "no loadgen binary at $loadgen (cargo build --release -p loadgen)" >&2; exit 1; }
mkdir -p /tmp/loadgen-nginx
nginx -c "$here/nginx-return-200.conf" &
nginx_pid=$!
trap 'kill "$nginx_pid" 2>/dev/null; wait "$nginx_pid" 2>/dev/null || true' EXIT
url=http://127.0.0.1:39380
# Make sure the answer comes from our nginx, not whatever else holds the port.
for _ in $(seq 50); do
    kill -0 "$nginx_pid" 2>/dev/null || { echo "nginx failed to start" >&2; exit 1; }
    curl -fsSI "$url/" 2>/dev/null | grep -qi '^server: nginx' && break
    sleep 0.1
done
printf '%-12s %12s %10s %10s %10s %10s %8s\n' connections req/s p50_ms p99_ms p99.9_ms max_ms errors
for connections in 1 16 256 1000; do
    "$loadgen" --json --mix health -c "$connections" -d "$duration" --warmup 1s "$url" |
        python3 -c '
import json, sys
r = json.load(sys.stdin)
l = r["latency"]
print("%-12d %12.0f %10.3f %10.3f %10.3f %10.3f %8d" % (r["config"]["connections"], r["throughput_rps"],
      l["p50_ms"], l["p99_ms"], l["p99_9_ms"], l["max_ms"], r["errors"]["total"]))'
done
