#!/usr/bin/env bash
# Set isolation under load (issue 5): core p50/p99 and success rate alone, then while the
# noncore set is flooded at 10x its in-flight budget with slow requests. Target: core p99
# within 1.2x of its unloaded value and zero core errors.
#
# Runs `shardgate demo` on the demo topology (simulated IDCs on 127.0.0.1:7001-7009) with the
# noncore budget set to NONCORE_BUDGET and its rate limit and fallback removed, so the flood
# meets the set budget (503 set_full), not the rate limit or the automatic fallback. Needs wrk.
#
# The flood is paced by default: each of its connections waits DELAY_MS between requests, as
# a client would that backs off, so it offers about flood/DELAY_MS requests per second.
# FLOOD_PACING=0 makes it a closed loop that re-sends the instant a refusal comes back: then
# the refusals themselves (tens of thousands per second) compete with core for the CPU.
#
# Knobs: NONCORE_BUDGET (32), DURATION (10s), CORE_CONNS (8), DELAY_MS (200: the slow noncore
# backend), FLOOD_PACING (1), PORT (18080), ADMIN_PORT (19901),
# SHARDGATE_BIN (target/release/shardgate).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
budget=${NONCORE_BUDGET:-32}
flood=$((budget * 10))
duration=${DURATION:-10s}
core_conns=${CORE_CONNS:-8}
delay=${DELAY_MS:-200}
pacing=${FLOOD_PACING:-1}
listen=127.0.0.1:${PORT:-18080}
admin=127.0.0.1:${ADMIN_PORT:-19901}
bin=${SHARDGATE_BIN:-$repo/target/release/shardgate}
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 2; }
[ -x "$bin" ] || (cd "$repo" && cargo build --release -q)
ulimit -n 65536 2>/dev/null || true

work=$(mktemp -d /tmp/shardgate-isolation.XXXXXX)
sed -e "s/^max_inflight = 256.*/max_inflight = $budget/" -e '/^rate_limit/d' -e '/^fallback/d' \
  "$repo/config/topology.toml" > "$work/topology.toml"
RUST_LOG=warn "$bin" demo --listen "$listen" --admin "$admin" --topology "$work/topology.toml" \
  > "$work/demo.log" 2>&1 &
demo=$!
trap 'kill $demo 2>/dev/null; wait $demo 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fs "http://$admin/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "http://$admin/readyz" >/dev/null || { cat "$work/demo.log" >&2; exit 1; }

core() { # $1: label
  wrk -t1 -c"$core_conns" -d"$duration" --latency -H 'x-user-id: 42' \
    "http://$listen/orders/42" > "$work/$1.txt"
}
summary() { # $1: label
  local f="$work/$1.txt"
  local total non2xx errors p50 p99
  total=$(awk '/requests in/ {print $1}' "$f")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$f"); non2xx=${non2xx:-0}
  errors=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$f"); errors=${errors:-0}
  p50=$(awk '$1 == "50%" {print $2}' "$f")
  p99=$(awk '$1 == "99%" {print $2}' "$f")
  printf '%-26s requests %-8s p50 %-9s p99 %-9s non-2xx %-6s socket errors %s\n' \
    "$1" "$total" "$p50" "$p99" "$non2xx" "$errors"
}

if [ "$pacing" = 1 ]; then
  echo "function delay() return $delay end" > "$work/flood.lua"
else
  echo "" > "$work/flood.lua"
fi

core core-alone
wrk -t1 -c"$flood" -d"$((${duration%s} + 4))s" -s "$work/flood.lua" -H "x-sim-delay-ms: $delay" \
  "http://$listen/recommendations" > "$work/flood.txt" &
flooder=$!
sleep 2
core core-with-noncore-flood
wait $flooder

echo "noncore budget $budget, flood $flood connections at ${delay} ms per request (paced: $pacing), core $core_conns connections, $duration each"
summary core-alone
summary core-with-noncore-flood
printf '%-26s requests %-8s non-2xx (refused) %s\n' noncore-flood \
  "$(awk '/requests in/ {print $1}' "$work/flood.txt")" \
  "$(awk '/Non-2xx/ {print $NF}' "$work/flood.txt")"
curl -fs "http://$admin/metrics" | grep -E '^shardgate_refused_total' || true
echo "raw wrk output in $work"
