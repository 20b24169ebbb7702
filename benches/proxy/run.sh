#!/usr/bin/env bash
# The whole proxy side by side with nginx and HAProxy on the shared harness
# (../shared/bench): copies the harness out (it may be read-only), builds its backend and
# runs it with shardgate as the `gateway` column. Arguments and environment go to the
# harness (ROUNDS, DURATION, PIN, ...); default targets: direct nginx-shard haproxy-shard gateway.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
shared=${SHARED_BENCH:-$repo/../shared/bench}
[ -d "$shared" ] || { echo "no harness at $shared (set SHARED_BENCH)" >&2; exit 2; }
for tool in nginx haproxy wrk; do
  command -v "$tool" >/dev/null 2>&1 || missing="${missing:-} $tool"
done
if [ -n "${missing:-}" ]; then
  echo "installing:${missing/nginx/nginx-light}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${missing/nginx/nginx-light}
fi
work=${BENCH_DIR:-/tmp/shardgate-bench-harness}
mkdir -p "$work"
cp -r "$shared/." "$work/"
chmod -R u+w "$work"
(cd "$work/idc-sim" && cargo build --release -q)
[ -x "$repo/target/release/shardgate" ] || (cd "$repo" && cargo build --release -q)
cd "$work"
export GATEWAY_NAME=${GATEWAY_NAME:-shardgate}
export GATEWAY_CMD="$here/gateway.sh"
if [ $# -eq 0 ]; then
  set -- direct nginx-shard haproxy-shard gateway
fi
exec ./run.sh "$@"
