#!/usr/bin/env bash
# Failover drill (issue 4): a real etcd, 3 simulated IDCs, 2 gateways in etcd mode, steady GET
# and POST load through both; then one IDC's backends crash. Reports crash -> moved (the IDC
# serves no shard on any gateway), failed requests by method in each phase, and the failback
# curve once the backends are back. Targets: moved within 2 s of the crash with the default
# health settings, zero failed GETs.
#
# Knobs (environment): CLIENTS (8), PACE_MS (10), BEFORE_S (3), AFTER_S (5), DETECT_MS (1500),
# RECOVER_MS (10000), WARMUP_S (20), PROFILE (release | debug). Needs etcd on the PATH or in
# /usr/bin.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
profile=${PROFILE:-release}
cd "$repo"
if [ "$profile" = release ]; then
  cargo build -q --release --bin shardgate --example failover_drill
else
  cargo build -q --bin shardgate --example failover_drill
fi
"$repo/target/$profile/examples/failover_drill" "$repo/target/$profile/shardgate"
