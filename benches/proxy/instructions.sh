#!/usr/bin/env bash
# Work per proxied request counted by valgrind's callgrind, for the gateway and for HAProxy in
# front of the same backends: figures that do not move with the host's noise (CPU time does, on
# a shared 2-core VM). Each proxy runs on one thread under callgrind, in front of the shared
# harness's three backends, the gateway with every feature on (admission, health, the
# request-head gate, the fence check), HAProxy routing by X-Shard-Key as in clients.sh; h2load
# sends N keep-alive HTTP/1.1 requests over 8 connections. Two runs per proxy, SMALL and LARGE
# requests: their difference divided by LARGE - SMALL leaves start-up and shutdown out.
#
# Printed per request: instructions; data reads and writes; L1 misses in callgrind's model of
# the host's caches (--cache-sim: 32 KB, 8-way, 64-byte lines here; a model, not the CPU's own
# counters), data (read + write) and instructions; mispredicted branches in its model of the
# predictors (--branch-sim), conditional and indirect. Then the gateway's figures over
# HAProxy's. Time per request follows instructions, L1 misses (each a trip to L2) and
# mispredictions (each a pipeline flush), so the second and third say where the gateway's
# CPU time goes beyond its instruction count.
#
# Environment: SMALL [2000] LARGE [6000] BASE_PORT [19500] SHARDGATE_BIN [target/release/shardgate]
#   TARGETS ["shardgate haproxy"]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
shared=${SHARED_BENCH:-$repo/../shared/bench}
SMALL=${SMALL:-2000}
LARGE=${LARGE:-6000}
BASE_PORT=${BASE_PORT:-19500}
TARGETS=${TARGETS:-shardgate haproxy}
out=$(mktemp -d /tmp/shardgate-instructions.XXXXXX)
OUT=$out
# shellcheck source=common.sh
source "$here/common.sh"
need_tools valgrind h2load haproxy
trap cleanup EXIT
harness_backend
release_gateway
start_backends ""
port=$((BASE_PORT + 10))
bench_topology "$a" "$b" "$c" >"$out/topology.toml"
haproxy_conf "$port" "" >"$out/haproxy.cfg"
count() { # target requests -> callgrind's totals for the proxy process (its `summary` line)
  local t=$1 n=$2 cmd
  case $t in
    shardgate) cmd=("$shardgate" serve --listen "127.0.0.1:$port" --admin 127.0.0.1:0
                 --topology "$out/topology.toml" --threads 1) ;;
    haproxy) cmd=(haproxy -db -f "$out/haproxy.cfg") ;;
    *) echo "instructions.sh: unknown target $t" >&2; exit 2 ;;
  esac
  RUST_LOG=warn valgrind --tool=callgrind --cache-sim=yes --branch-sim=yes \
    --callgrind-out-file="$out/callgrind.$t.$n" "${cmd[@]}" >"$out/$t-$n.log" 2>&1 &
  local pid=$!
  pids+=($pid)
  wait_port "$port"
  sleep 1
  h2load --h1 -n "$n" -c 8 -H "x-shard-key: user-7" "http://127.0.0.1:$port/orders/1" >"$out/h2load-$t-$n.txt" 2>&1
  grep -q "$n succeeded" "$out/h2load-$t-$n.txt" || { echo "instructions.sh: not every request to $t succeeded (see $out/h2load-$t-$n.txt)" >&2; exit 1; }
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  # The events line names the columns (Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw Bc Bcm Bi Bim).
  sed -n 's/^summary: //p' "$out/callgrind.$t.$n"
}
for t in $TARGETS; do
  echo "$t $(count "$t" "$SMALL") $(count "$t" "$LARGE")" >>"$out/totals"
done
echo "per proxied request ($((LARGE - SMALL)) requests: $LARGE minus $SMALL; callgrind, one thread; $(date -u '+%Y-%m-%d'))"
awk -v n=$((LARGE - SMALL)) '
# Fields: target, then 13 events for SMALL, then 13 for LARGE.
function per(e) { return ($(15 + e) - $(2 + e)) / n }
{
  t[NR] = $1
  ir[NR] = per(0); data[NR] = per(1) + per(2); l1d[NR] = per(4) + per(5); l1i[NR] = per(3)
  mis[NR] = per(10) + per(12); ind[NR] = per(12)
  printf "%-10s %7.1fk instructions %7.1fk data accesses %6.0f L1d misses %6.0f L1i misses %5.0f mispredicted branches (%3.0f indirect)\n",
    t[NR], ir[NR] / 1000, data[NR] / 1000, l1d[NR], l1i[NR], mis[NR], ind[NR]
  if (t[NR] == "shardgate") printf "instructions per proxied request: %.1fk (callgrind, one thread, every feature on)\n", ir[NR] / 1000
}
END {
  for (i = 1; i <= NR; i++) if (t[i] == "shardgate") s = i; else if (t[i] == "haproxy") h = i
  if (s && h) printf "shardgate / haproxy: instructions %.2fx, data accesses %.2fx, L1d misses %.2fx, L1i misses %.2fx, mispredicted branches %.2fx\n",
    ir[s] / ir[h], data[s] / data[h], l1d[s] / l1d[h], l1i[s] / l1i[h], mis[s] / mis[h]
}' "$out/totals"
echo "profiles: $out/callgrind.* (callgrind_annotate; --show=Ir,D1mw,Bim --sort=... for the other events)"
