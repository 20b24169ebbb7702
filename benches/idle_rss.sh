#!/usr/bin/env bash
# Memory with 10,000 idle HTTP/1.1 keep-alive connections (DESIGN.md §11: under 50 MiB RSS).
# The release gateway runs on a file topology over nginx backends; benches/scale/idle_conns.py
# opens CONNS connections and holds them, once with one GET made on each first ("after a
# request") and once with none ("accepted only"). Prints the gateway's VmRSS before and with
# the connections open, and the difference per connection; ROUNDS rounds each on a fresh
# gateway, then the medians. The reading is taken once every connection rests (the gateway's
# `shardgate_client_connections{state="resting"}`) and the memory release that follows had its
# period (6 s): the steady state of idle connections, not the burst of their requests. Exit 1
# when a connection was closed, a request failed, or the connections did not all rest.
#
# Knobs (environment): CONNS (10000), ROUNDS (3), HOLD_S (20), SHARDGATE_BIN
# (target/release/shardgate). Needs python3, nginx and curl.
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/scale/common.sh"
conns=${CONNS:-10000}
rounds=${ROUNDS:-3}
hold=${HOLD_S:-20}
for tool in nginx python3 curl; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done
# One descriptor per connection on both sides (the driver and the gateway inherit this).
ulimit -n $((conns * 2 + 1024)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt $((conns + 100)) ] || { echo "ulimit -n $(ulimit -n) is too low for $conns connections" >&2; exit 2; }
[ -x "$bin" ] || build_release

work=$(mktemp -d /tmp/shardgate-idle-rss.XXXXXX)
trap 'cleanup_all; rm -rf "$work"' EXIT
start_backends "$work"
write_topology "$work/topology.toml" a
status=0

# One round: appends "before_kib after_kib" to $work/<variant>.txt and prints the round.
round() { # $1: variant (accepted | requested), $2: round number
  local out=$work/driver-$1-$2.txt before after flag=""
  [ "$1" = requested ] && flag=--request
  start_gateway "$work"
  # One proxied request first, so the baseline includes what the first request sets up
  # (upstream pool, lazily built state) and the difference is the connections alone.
  curl -fs -H 'x-shard-key: 1' "http://$GATEWAY/warmup" >/dev/null
  sleep 1
  before=$(rss_kib "$GATEWAY_PID")
  python3 "$here/idle_conns.py" "$GATEWAY" --count "$conns" --hold "$hold" $flag > "$out" &
  local driver=$!
  until grep -q '^ready' "$out" 2>/dev/null; do
    kill -0 "$driver" 2>/dev/null || break
    sleep 0.2
  done
  local resting=0 _
  for _ in $(seq 100); do
    resting=$(resting_connections)
    [ "$resting" = "$conns" ] && break
    sleep 0.2
  done
  [ "$resting" = "$conns" ] || { echo "round $2 ($1): $resting of $conns connections rest" >&2; status=1; }
  sleep 6
  after=$(rss_kib "$GATEWAY_PID")
  wait "$driver" || status=1
  if ! grep -q '^ready' "$out" || ! grep -q '^closed 0$' "$out" || ! grep -q 'failed_requests 0' "$out"; then
    echo "round $2 ($1): $(tr '\n' ' ' < "$out")" >&2
    status=1
  fi
  kill "$GATEWAY_PID"
  wait "$GATEWAY_PID" 2>/dev/null || true
  echo "$before $after" >> "$work/$1.txt"
  printf '  %-9s round %d: RSS before %s, with %d idle connections %s, %.1f KiB per connection\n' \
    "$1" "$2" "$(mib "$before")" "$conns" "$(mib "$after")" \
    "$(awk -v a="$after" -v b="$before" -v n="$conns" 'BEGIN {print (a - b) / n}')"
}

# Connections resting on the proxy listener (the gateway's gauge).
resting_connections() {
  curl -fs "http://$ADMIN/metrics" | awk '$1 == "shardgate_client_connections{state=\"resting\"}" {print $2}'
}

mib() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k / 1024}'; }

for variant in accepted requested; do
  : > "$work/$variant.txt"
  for r in $(seq "$rounds"); do
    round "$variant" "$r"
  done
  before=$(awk '{print $1}' "$work/$variant.txt" | median)
  after=$(awk '{print $2}' "$work/$variant.txt" | median)
  per=$(awk '{print ($2 - $1) / n}' n="$conns" "$work/$variant.txt" | median)
  label="accepted only"
  [ "$variant" = requested ] && label="after a request each"
  printf 'idle RSS, %d keep-alive connections, %s (median of %d): before %s, with them %s, %.1f KiB per connection (target: under 50 MiB)\n' \
    "$conns" "$label" "$rounds" "$(mib "$before")" "$(mib "$after")" "$per"
done
exit "$status"
