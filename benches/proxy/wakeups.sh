#!/usr/bin/env bash
# How often each proxy makes its peers wake, per request: what the kernel part of its CPU time
# leans on beyond its own system calls. A send to a peer asleep in `epoll_wait` wakes it, and the
# sender pays for the wake-up (`sock_def_readable` under `perf`); a proxy whose sends reach
# its client and backends in bursts wakes them less often than one whose sends come one by one.
# These counts move far less with the host's noise than CPU time does, so they judge a change
# to how sends are batched.
#
# Each target in turn, pinned as clients.sh's PIN=split (h2load and the backends on CPU 0, the
# proxy on CPU 1): h2load --h1 with CLIENTS keep-alive connections for DURATION seconds, and
# `perf record` of the whole machine's `epoll_wait` entries and wake-ups for WINDOW seconds in
# the middle of it. Printed per request (requests in the window from h2load's rate): the
# `epoll_wait` calls of the client, the backends and the proxy, and the wake-ups the proxy's
# own threads made. Every process started here is stopped by PID on exit.
#
# Environment: TARGETS ["nginx haproxy shardgate"] CLIENTS [64] DURATION [10] WINDOW [5]
#   BASE_PORT [19700] SHARDGATE_BIN [target/release/shardgate] OUT [dir]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
shared=${SHARED_BENCH:-$repo/../shared/bench}
TARGETS=${TARGETS:-nginx haproxy shardgate}
CLIENTS=${CLIENTS:-64}
DURATION=${DURATION:-10}
WINDOW=${WINDOW:-5}
BASE_PORT=${BASE_PORT:-19700}
OUT=${OUT:-/tmp/shardgate-wakeups/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
((WINDOW + 3 <= DURATION)) || { echo "wakeups.sh: WINDOW must be at least 3 s under DURATION" >&2; exit 2; }

# shellcheck source=common.sh
source "$here/common.sh"
need_tools h2load haproxy nginx perf
trap cleanup EXIT
harness_backend
release_gateway
start_backends 0
backend_pids=("${pids[@]}")

port=$((BASE_PORT + 10))
bench_topology "$a" "$b" "$c" >"$OUT/topology.toml"
haproxy_conf "$port" "" >"$OUT/haproxy.cfg"
mkdir -p "$OUT/nginx-tmp"
nginx_conf "$port" "" "" >"$OUT/nginx.conf"

# The table row of one target: its recorded events counted by whose PID they came from (the
# backends', the client's, the proxy's), per request.
count() { # target rps client-pid proxy-pids
  local t=$1 rps=$2 client=$3 proxy=$4
  perf script -i "$OUT/perf.$t.data" -F pid,event 2>/dev/null | awk -v t="$t" -v rps="$rps" -v win="$WINDOW" \
    -v backends="${backend_pids[*]}" -v client="$client" -v proxy="$proxy" '
    BEGIN {
      n = split(backends, b, " "); for (i = 1; i <= n; i++) role[b[i]] = "backend"
      role[client] = "client"
      n = split(proxy, p, " "); for (i = 1; i <= n; i++) role[p[i]] = "proxy"
    }
    { pid = $1; ev = $2; sub(/:$/, "", ev); r = role[pid]; if (r == "") next
      if (ev ~ /epoll_wait/) waits[r]++; else if (ev ~ /sched_wakeup/) wakes[r]++ }
    END {
      reqs = rps * win
      printf "%-10s %8.0f %12.3f %12.3f %12.3f %14.3f\n", t, rps, waits["client"] / reqs,
        waits["backend"] / reqs, waits["proxy"] / reqs, wakes["proxy"] / reqs
    }'
}

printf '%-10s %8s %12s %12s %12s %14s\n' target req/s client_waits backend_waits proxy_waits proxy_wakeups \
  >"$OUT/table"
for t in $TARGETS; do
  case $t in
    nginx)
      start 1 "$OUT/nginx.log" nginx -c "$OUT/nginx.conf" -p "$OUT" ;;
    haproxy)
      start 1 "$OUT/haproxy.log" haproxy -db -f "$OUT/haproxy.cfg" ;;
    shardgate)
      start 1 "$OUT/shardgate.log" env RUST_LOG=warn "$shardgate" serve --listen "127.0.0.1:$port" \
        --admin 127.0.0.1:0 --topology "$OUT/topology.toml" --threads 1 ;;
    *) echo "wakeups.sh: unknown target $t" >&2; exit 2 ;;
  esac
  started=${pids[-1]}
  wait_port "$port"
  # The proxy's processes: nginx's master and worker (from its pid file), else the one started.
  if [[ $t == nginx ]]; then
    proxy_pids="$(cat "$OUT/nginx.pid") $(pgrep -P "$(cat "$OUT/nginx.pid")" | tr '\n' ' ')"
  else
    proxy_pids="$started"
  fi
  taskset -c 0 h2load --h1 -c "$CLIENTS" -t 1 -D "$DURATION" -H 'X-Shard-Key: u1' \
    "http://127.0.0.1:$port/" >"$OUT/h2load-$t.txt" 2>&1 &
  client_pid=$!
  sleep 2
  perf record -q -a -e syscalls:sys_enter_epoll_wait -e sched:sched_wakeup \
    -o "$OUT/perf.$t.data" -- sleep "$WINDOW" >/dev/null 2>&1
  wait "$client_pid"
  grep -q ' 0 failed, 0 errored, 0 timeout' "$OUT/h2load-$t.txt" \
    || { echo "wakeups.sh: requests to $t failed (see $OUT/h2load-$t.txt)" >&2; exit 1; }
  rps=$(sed -n 's/^finished in [0-9.]*s, \([0-9.]*\) req\/s.*/\1/p' "$OUT/h2load-$t.txt")
  count "$t" "$rps" "$client_pid" "$proxy_pids" >>"$OUT/table"
  if [[ $t == nginx ]]; then
    kill -QUIT "$(cat "$OUT/nginx.pid")" 2>/dev/null || true
    rm -f "$OUT/nginx.pid"
  else
    kill -TERM "$started" 2>/dev/null || true
  fi
  wait "$started" 2>/dev/null || true
  sleep 1
done

echo "h2load --h1: $CLIENTS keep-alive connections; per request, in a ${WINDOW}s window ($(date -u '+%Y-%m-%d'))"
cat "$OUT/table"
echo "client_waits, backend_waits, proxy_waits: epoll_wait calls of h2load, the three backends, the proxy"
echo "proxy_wakeups: wake-ups made by the proxy's threads (mostly its sends waking a sleeping peer)"
echo "raw: $OUT"
