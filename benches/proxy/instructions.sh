#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: a figure that does not move
# with the host's noise (CPU time does, on a shared 2-core VM). The release gateway runs on one
# thread under callgrind, in front of the shared harness's three backends, with every feature on
# (admission, health, the request-head gate, the fence check); h2load sends N keep-alive
# HTTP/1.1 requests over 8 connections. Two runs, SMALL and LARGE requests: their difference
# divided by LARGE - SMALL leaves start-up and shutdown out. Prints instructions per request.
#
# Environment: SMALL [2000] LARGE [6000] BASE_PORT [19500] SHARDGATE_BIN [target/release/shardgate]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
shared=${SHARED_BENCH:-$repo/../shared/bench}
SMALL=${SMALL:-2000}
LARGE=${LARGE:-6000}
BASE_PORT=${BASE_PORT:-19500}
for tool in valgrind h2load; do
  command -v "$tool" >/dev/null 2>&1 || missing="${missing:-} $tool"
done
if [[ -n ${missing:-} ]]; then
  pkgs=${missing/h2load/nghttp2-client}
  echo "installing:$pkgs"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs
fi
out=$(mktemp -d /tmp/shardgate-instructions.XXXXXX)
OUT=$out
# shellcheck source=common.sh
source "$here/common.sh"
trap cleanup EXIT
harness_backend
release_gateway
for i in 1 2 3; do
  "$idc_sim" --listen "127.0.0.1:$((BASE_PORT + i))" --name "idc-$i" \
    >"$out/idc-$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do wait_port $((BASE_PORT + i)); done
bench_topology "127.0.0.1:$((BASE_PORT + 1))" "127.0.0.1:$((BASE_PORT + 2))" "127.0.0.1:$((BASE_PORT + 3))" >"$out/topology.toml"
port=$((BASE_PORT + 10))
count() { # requests -> total instructions of the gateway process
  local n=$1
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.$n" "$shardgate" serve \
    --listen "127.0.0.1:$port" --admin 127.0.0.1:0 --topology "$out/topology.toml" --threads 1 \
    >"$out/gateway-$n.log" 2>&1 &
  local gw=$!
  pids+=($gw)
  wait_port "$port"
  sleep 1
  h2load --h1 -n "$n" -c 8 -H "x-shard-key: user-7" "http://127.0.0.1:$port/orders/1" >"$out/h2load-$n.txt" 2>&1
  grep -q "$n succeeded" "$out/h2load-$n.txt" || { echo "instructions.sh: not every request succeeded (see $out/h2load-$n.txt)" >&2; exit 1; }
  kill -TERM "$gw"
  wait "$gw" 2>/dev/null || true
  sed -n 's/^summary: //p' "$out/callgrind.$n"
}
small=$(count "$SMALL")
large=$(count "$LARGE")
echo "gateway instructions: $SMALL requests $small, $LARGE requests $large"
awk -v a="$small" -v b="$large" -v n=$((LARGE - SMALL)) \
  'BEGIN { printf "instructions per proxied request: %.1fk (callgrind, one thread, every feature on)\n", (b - a) / n / 1000 }'
echo "profiles: $out/callgrind.$SMALL $out/callgrind.$LARGE (callgrind_annotate)"
