#!/usr/bin/env bash
# Two `kvmfork serve` nodes behind a real HAProxy running the committed
# deploy/haproxy.cfg (addresses passed through its environment variables).
# Shows that requests through the proxy are spread over both nodes (each
# node's own /v1/metrics counters), that stopping a node gets it taken out by
# the /v1/health check with every request still answered by the other node,
# and that a restarted node is put back. Live sessions (node ids n1, n2) go
# to the node their id names: execs, forks, checkpoints, from_checkpoint and
# from_sandbox requests through the proxy all reach the right node
# (tests/loadbalancer_sessions.py); a stopped node's sessions fail fast with
# 503 and are gone after its restart. Then runs Prometheus with the
# committed deploy/prometheus.yml against the nodes and checks that every
# query of deploy/grafana-dashboard.json returns data. Needs /dev/kvm,
# haproxy, prometheus, curl, python3, the release binary and a built Python
# template; fails loudly when any is missing.
#
#   bash tests/loadbalancer.sh
#   KVMFORK_TEST_TEMPLATE=/path/to/template bash tests/loadbalancer.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

passed=0
failed=0
say() { printf 'loadbalancer: %s\n' "$*" >&2; }
die() {
  say "FATAL: $*"
  dump_logs
  echo "$passed passed, $((failed + 1)) failed"
  exit 1
}
pass() { passed=$((passed + 1)); say "ok   - $*"; }
fail() { failed=$((failed + 1)); say "FAIL - $*"; }

work=$(mktemp -d /tmp/kvmfork-lb.XXXXXX)
pids=()
dump_logs() {
  local f
  for f in "$work"/*.log; do
    [[ -s $f ]] || continue
    say "---- last lines of $(basename "$f") ----"
    tail -n 20 "$f" >&2
  done
}
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# ---- prerequisites: each one missing is a failure, never a skip ----
[[ -r /dev/kvm && -w /dev/kvm ]] || die "/dev/kvm is missing or not accessible"
haproxy=$(command -v haproxy || true)
[[ -z $haproxy && -x /usr/sbin/haproxy ]] && haproxy=/usr/sbin/haproxy
[[ -n $haproxy ]] || die "haproxy is not installed (apt-get install haproxy)"
command -v curl >/dev/null || die "curl is not installed"
command -v python3 >/dev/null || die "python3 is not installed"
kvmfork=${KVMFORK_BIN:-$root/target/release/kvmfork}
[[ -x $kvmfork ]] || die "$kvmfork is missing (cargo build --release)"
config=$root/deploy/haproxy.cfg
[[ -r $config ]] || die "$config is missing"

template=${KVMFORK_TEST_TEMPLATE:-${KVMFORK_TEMPLATE:-}}
if [[ -z $template ]]; then
  # The newest cached Python template, as `kvmfork serve` would pick it; this
  # test never builds one (that takes minutes on PVM hosts).
  cache=${KVMFORK_CACHE_DIR:-${HOME:-/root}/.cache/kvmfork}
  template=$(ls -1td "$cache"/templates/python-*/ 2>/dev/null | grep -v '\.tmp-' | while read -r d; do
    [[ -f $d/state.snap ]] && { echo "${d%/}"; break; }
  done || true)
  [[ -n $template ]] || die "no Python template in $cache/templates (run: $kvmfork template build), or set KVMFORK_TEST_TEMPLATE"
fi
[[ -f $template/state.snap && -f $template/memory.bin ]] || die "$template is not a template (no state.snap/memory.bin)"
say "haproxy: $("$haproxy" -v | head -n1)"
say "template: $template"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port1=$(free_port)
port2=$(free_port)
lb_port=$(free_port)
stats_port=$(free_port)
key="kvmfork-lb-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '["%s"]\n' "$key" >"$work/keys.json"

# ---- nodes ----
declare -A node_pid
# --node-id must match deploy/haproxy.cfg: kvmfork1 is n1, kvmfork2 is n2.
start_node() { # name port node-id
  "$kvmfork" serve --listen "127.0.0.1:$2" --node-id "$3" --template "$template" \
    --shards 1 --workers-per-shard 1 --pool-size 1 --allow-root \
    --api-keys-file "$work/keys.json" --rate-limit 0 --drain-timeout-seconds 10 \
    >>"$work/$1.log" 2>&1 &
  node_pid[$1]=$!
  pids+=("$!")
}
wait_healthy() { # name port
  local _
  for _ in $(seq 1 240); do
    curl -fsS -o /dev/null "http://127.0.0.1:$2/v1/health" 2>/dev/null && return 0
    kill -0 "${node_pid[$1]}" 2>/dev/null || die "$1 exited during start-up"
    sleep 0.5
  done
  die "$1 did not become healthy on port $2 within 120 s"
}
start_node node1 "$port1" n1
start_node node2 "$port2" n2
wait_healthy node1 "$port1"
wait_healthy node2 "$port2"
say "nodes up: node1 127.0.0.1:$port1, node2 127.0.0.1:$port2"

# ---- HAProxy with the committed config ----
export KVMFORK_NODE1="127.0.0.1:$port1" KVMFORK_NODE2="127.0.0.1:$port2"
export KVMFORK_LB_BIND="127.0.0.1:$lb_port" KVMFORK_LB_STATS_BIND="127.0.0.1:$stats_port"
export KVMFORK_LB_ADMIN_SOCKET="$work/haproxy.sock"
if "$haproxy" -c -q -f "$config" >"$work/haproxy-check.log" 2>&1; then
  pass "haproxy -c accepts deploy/haproxy.cfg"
else
  die "haproxy -c rejects deploy/haproxy.cfg: $(cat "$work/haproxy-check.log")"
fi
"$haproxy" -db -f "$config" >"$work/haproxy.log" 2>&1 &
haproxy_pid=$!
pids+=("$haproxy_pid")
lb="http://127.0.0.1:$lb_port"

# "status/check_status" of a server in a backend (kvmfork_nodes unless
# given), from the stats CSV (columns found by name), e.g. "UP/L7OK",
# "DOWN/L4CON". Before its first check a server shows "UP 1/2/INI", which is
# not yet a passed check.
server_state() { # server [backend]
  curl -fsS "http://127.0.0.1:$stats_port/stats;csv" 2>/dev/null | awk -F, -v sv="$1" -v be="${2:-kvmfork_nodes}" '
    NR == 1 { for (i = 1; i <= NF; i++) { if ($i == "status") st = i; if ($i == "check_status") ck = i }; next }
    $1 == be && $2 == sv { print $st "/" $ck }'
}
wait_state() { # server wanted-state-pattern seconds [backend]
  local _ s=""
  for _ in $(seq 1 $(($3 * 5))); do
    s=$(server_state "$1" "${4:-}")
    # shellcheck disable=SC2053 # $2 is a glob on purpose
    [[ $s == $2 ]] && return 0
    kill -0 "$haproxy_pid" 2>/dev/null || die "haproxy exited"
    sleep 0.2
  done
  say "$1 is '$s' in HAProxy (${4:-kvmfork_nodes}), wanted $2"
  return 1
}
if wait_state kvmfork1 UP/L7OK 20 && wait_state kvmfork2 UP/L7OK 20 &&
  wait_state kvmfork1 UP/L7OK 20 kvmfork_n1 && wait_state kvmfork2 UP/L7OK 20 kvmfork_n2; then
  pass "HAProxy health checks (GET /v1/health) see both nodes UP, in the balanced and the per-node backends"
else
  die "the nodes are not UP in HAProxy"
fi

# Exec counter of one node, read from the node itself (not through HAProxy).
exec_count() { # port
  local v
  v=$(curl -fsS "http://127.0.0.1:$1/v1/metrics" |
    awk '$1 == "kvmfork_http_requests_total{endpoint=\"/v1/exec\",status=\"200\"}" { print $2 }')
  echo "${v:-0}"
}

# Sends n execs through HAProxy, each computing a different sum, and checks
# every answer. Prints how many were right.
send_execs() { # n tag
  local i ok=0 body want
  for ((i = 1; i <= $1; i++)); do
    want=$((i * (i + 1) / 2 + $2))
    body=$(curl -sS --max-time 60 -H "Authorization: Bearer $key" \
      -d "{\"code\":\"print(sum(range($((i + 1)))) + $2)\"}" "$lb/v1/exec" 2>>"$work/curl.log") || continue
    if python3 -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit(0 if r["exit_code"]==0 and r["stdout"]==sys.argv[2]+"\n" else 1)' "$body" "$want"; then
      ok=$((ok + 1))
    else
      echo "unexpected answer: $body" >>"$work/curl.log"
    fi
  done
  echo "$ok"
}

# ---- 1. spread over both nodes ----
n=24
before1=$(exec_count "$port1")
before2=$(exec_count "$port2")
ok=$(send_execs "$n" 1000)
got1=$(($(exec_count "$port1") - before1))
got2=$(($(exec_count "$port2") - before2))
say "through HAProxy: $ok/$n answered correctly; node1 ran $got1, node2 ran $got2"
if ((ok == n)); then pass "$n execs through HAProxy all answered correctly"; else fail "only $ok of $n execs through HAProxy answered correctly"; fi
if ((got1 + got2 == n)); then pass "the nodes' own counters account for all $n execs"; else fail "node counters add up to $((got1 + got2)), not $n"; fi
if ((got1 >= n / 4 && got2 >= n / 4)); then
  pass "requests spread over both nodes ($got1 / $got2)"
else
  fail "requests not spread: node1 $got1, node2 $got2 (each should get at least $((n / 4)))"
fi

code=$(curl -s -o /dev/null -w '%{http_code}' -d '{"code":"print(1)"}' "$lb/v1/exec")
if [[ $code == 401 ]]; then pass "an exec without a key is refused (401) through HAProxy"; else fail "an exec without a key got $code, not 401"; fi
code=$(curl -s -o /dev/null -w '%{http_code}' "$lb/v1/metrics")
if [[ $code == 404 ]]; then pass "/v1/metrics is not exposed through the public entry point (404)"; else fail "/v1/metrics through HAProxy got $code, not 404"; fi

# ---- 2. live sessions through HAProxy, routed by their node id ----
survivors=$work/survivors
if python3 "$root/tests/loadbalancer_sessions.py" "$lb" "$key" "$port1" "$port2" \
  "$KVMFORK_LB_ADMIN_SOCKET" "$survivors" >"$work/sessions.out" 2>"$work/sessions.log"; then
  rc=0
else
  rc=$?
fi
while IFS=$'\t' read -r verdict what; do
  case $verdict in
  ok) pass "$what" ;;
  FAIL) fail "$what" ;;
  *) say "  $what" ;;
  esac
done <"$work/sessions.out"
((rc == 0)) || fail "tests/loadbalancer_sessions.py crashed (status $rc, see sessions.log)"
sid1=$(awk '$1 == "n1" { print $2 }' "$survivors" 2>/dev/null || true)
sid2=$(awk '$1 == "n2" { print $2 }' "$survivors" 2>/dev/null || true)
[[ -n $sid1 && -n $sid2 ]] || die "the session phase left no session on each node for the next checks"

# A session exec through HAProxy: prints "STATUS ERROR-CODE" for an error,
# else "STATUS STDOUT" (its trailing newline dropped).
session_exec() { # sandbox-id code
  local status
  status=$(curl -sS --max-time 30 -o "$work/exec.out" -w '%{http_code}' -H "Authorization: Bearer $key" \
    -d "{\"code\":\"$2\"}" "$lb/v1/sandboxes/$1/exec" 2>>"$work/curl.log") || status=000
  python3 -c 'import json,sys
try: r = json.load(open(sys.argv[2]))
except ValueError: r = {}
print(sys.argv[1], r["error"]["code"] if r.get("error") else str(r.get("stdout")).rstrip("\n"))' "$status" "$work/exec.out"
}

# ---- 3. a stopped node is taken out by the health check ----
kill -TERM "${node_pid[node2]}"
if wait "${node_pid[node2]}"; then pass "node2 drained and exited on SIGTERM"; else fail "node2 exited with status $? on SIGTERM"; fi
if wait_state kvmfork2 'DOWN/*' 15; then
  pass "HAProxy marked node2 DOWN after its health checks failed"
else
  fail "HAProxy did not mark node2 DOWN within 15 s"
fi
m=12
before1=$(exec_count "$port1")
ok=$(send_execs "$m" 2000)
got1=$(($(exec_count "$port1") - before1))
if ((ok == m && got1 == m)); then
  pass "with node2 down, all $m execs succeeded on node1"
else
  fail "with node2 down: $ok of $m execs answered, node1 ran $got1"
fi
# Its sessions are not sent to node1: HAProxy answers 503 node_unavailable
# itself, within the one retry's turn-around.
t0=$(date +%s%N)
got=$(session_exec "$sid2" "print(2)")
ms=$((($(date +%s%N) - t0) / 1000000))
if [[ $got == "503 node_unavailable" ]] && ((ms < 5000)); then
  pass "a session on the stopped node2 gets 503 node_unavailable from HAProxy in $ms ms"
else
  fail "a session on the stopped node2 got '$got' in $ms ms, not 503 node_unavailable within 5 s"
fi
got=$(session_exec "$sid1" "print(1 + 1)")
if [[ $got == "200 2" ]]; then pass "a session on node1 still answers while node2 is down"; else fail "a session on node1 got '$got' while node2 is down"; fi

# ---- 4. a restarted node is put back ----
start_node node2 "$port2" n2
wait_healthy node2 "$port2"
if wait_state kvmfork2 UP/L7OK 20 && wait_state kvmfork2 UP/L7OK 20 kvmfork_n2; then
  pass "HAProxy put the restarted node2 back UP (balanced and per-node backends)"
else
  fail "HAProxy did not put node2 back UP within 20 s"
fi
# slowstart ramps a returning node's weight up over 10 s; leastconn still
# sends it work once it is UP, which is what this checks.
before2=$(exec_count "$port2")
ok=$(send_execs "$n" 3000)
got2=$(($(exec_count "$port2") - before2))
if ((ok == n && got2 > 0)); then
  pass "after the restart node2 serves again ($got2 of $n)"
else
  fail "after the restart: $ok of $n execs answered, node2 ran $got2"
fi

# Sessions live in a node's memory: the restarted node2 has lost its own and
# says so itself (its own 404, not another node's refusal).
got=$(session_exec "$sid2" "print(2)")
if [[ $got == "404 sandbox_not_found" ]] && ! grep -q "not on this node" "$work/exec.out"; then
  pass "after its restart node2 answers 404 sandbox_not_found for its old session"
else
  fail "the old session on the restarted node2 got '$got': $(cat "$work/exec.out")"
fi
code=$(curl -s -o /dev/null -w '%{http_code}' -X DELETE -H "Authorization: Bearer $key" "$lb/v1/sandboxes/$sid1")
if [[ $code == 204 ]]; then pass "the last session (on node1) deleted through HAProxy"; else fail "deleting the session on node1 got $code, not 204"; fi

# ---- 5. monitoring: the committed Prometheus config and Grafana dashboard ----
# Prometheus runs deploy/prometheus.yml with the targets pointed at these
# nodes and a 1 s scrape interval; every dashboard query must return data.
prometheus=$(command -v prometheus || true)
[[ -n $prometheus ]] || die "prometheus is not installed (apt-get install prometheus)"
prom_port=$(free_port)
mkdir -p "$work/prom"
sed -e 's/scrape_interval: 15s/scrape_interval: 1s/' -e 's/evaluation_interval: 15s/evaluation_interval: 1s/' \
  -e "s/- 127.0.0.1:8080$/- 127.0.0.1:$port1/" -e "s/- 127.0.0.1:8081$/- 127.0.0.1:$port2/" \
  -e "s/- 127.0.0.1:8404$/- 127.0.0.1:$stats_port/" \
  "$root/deploy/prometheus.yml" >"$work/prom/prometheus.yml"
cp "$root/deploy/kvmfork-alerts.yml" "$work/prom/"
for p in "$port1" "$port2" "$stats_port"; do
  grep -q "127.0.0.1:$p\$" "$work/prom/prometheus.yml" || die "deploy/prometheus.yml no longer has the default targets this test rewrites"
done
"$prometheus" --config.file="$work/prom/prometheus.yml" --storage.tsdb.path="$work/prom/data" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
pids+=("$!")
prom="http://127.0.0.1:$prom_port"
targets_up() {
  curl -fsS "$prom/api/v1/query" --data-urlencode 'query=count(up == 1)' 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)' 2>/dev/null || echo 0
}
for _ in $(seq 1 60); do [[ $(targets_up) == 3 ]] && break; sleep 0.5; done
if [[ $(targets_up) == 3 ]]; then
  pass "Prometheus with deploy/prometheus.yml scrapes both nodes and HAProxy"
else
  fail "Prometheus sees $(targets_up) of 3 targets up"
fi
send_execs 8 4000 >/dev/null
sleep 3
if python3 - "$root/deploy/grafana-dashboard.json" "$prom" <<'PY'
import json, sys, urllib.parse, urllib.request
dashboard, prom = sys.argv[1], sys.argv[2]
panels = json.load(open(dashboard))["panels"]
bad = 0
queries = 0
for panel in panels:
    for target in panel.get("targets", []):
        expr = target["expr"].replace("$instance", ".*").replace("$__rate_interval", "30s")
        url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        result = json.load(urllib.request.urlopen(url))["data"]["result"]
        queries += 1
        if not result:
            bad += 1
            print(f"no data: {panel['title']}: {expr}", file=sys.stderr)
import time
# A rule's health is "unknown" until its first evaluation: wait for it (bounded).
for _ in range(60):
    rules = json.load(urllib.request.urlopen(prom + "/api/v1/rules"))["data"]["groups"]
    unhealthy = [r["name"] for g in rules for r in g["rules"] if r["health"] != "ok"]
    if rules and not unhealthy:
        break
    time.sleep(0.5)
if not rules or unhealthy:
    bad += 1
    print(f"alert rules missing or unhealthy: {unhealthy}", file=sys.stderr)
print(f"{queries} dashboard queries, {bad} without data", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
then
  pass "every Grafana dashboard query returns data from the live nodes; alert rules load"
else
  fail "some Grafana dashboard queries returned no data (see above)"
fi

if ((failed)); then dump_logs; fi
echo "$passed passed, $failed failed"
((failed == 0))
