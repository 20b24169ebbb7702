#!/usr/bin/env bash
# Starts shardgate as the `gateway` column of the side-by-side harness: one route keyed by
# header:x-shard-key over the harness's three backends, one IDC per backend. The harness
# exports GATEWAY_ADDR, BACKEND_A/B/C and PROXY_THREADS.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${SHARDGATE_BIN:-$here/../../target/release/shardgate}
dir=$(mktemp -d /tmp/shardgate-bench.XXXXXX)
# shellcheck source=common.sh
source "$here/common.sh"
bench_topology "$BACKEND_A" "$BACKEND_B" "$BACKEND_C" > "$dir/topology.toml"
# The peers run with their access logs off (nginx: access_log off); so does the gateway here.
export RUST_LOG=${RUST_LOG:-warn}
exec "$bin" serve --listen "$GATEWAY_ADDR" --admin 127.0.0.1:0 \
  --topology "$dir/topology.toml" --threads "${PROXY_THREADS:-1}"
