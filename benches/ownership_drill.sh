#!/usr/bin/env bash
# Ownership drill (issue 10): the history scenarios of tests/history.rs, run longer, one after
# the other, on a release build. Each scenario starts a real etcd, two `shardgate serve`
# processes behind their own relays to etcd, three simulated IDCs keeping one ledger and a mixed
# GET/POST load through both gateways; injects its fault (partition from etcd, SIGSTOP of a
# gateway or of the leader past the lease TTL, kill -9 and restart from --cache-dir while cut,
# failover of a live IDC, drain/move/failover/restore with warm-up); then checks the history
# (src/dev/sim/history.rs) and prints the per-scenario report: writes, reads, writes refused as
# fenced, seconds of write unavailability per moved shard, violations (must be 0).
# docs/failover.md ("Checking the promise: the history checker") says how to read it.
#
# Knobs (environment): SCALE (5: multiplies every load phase of a scenario), SCENARIOS (a
# filter on the test names of tests/history.rs, e.g. `cut_from_etcd` or `stopped`; default
# all), PROFILE (release | debug).
# Needs etcd on the PATH or in /usr/bin. Exit status: 0 when every scenario had no violation.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
profile=${PROFILE:-release}
scale=${SCALE:-5}
filter=${SCENARIOS:-}
cd "$repo"
flags=(--locked --test history)
if [ "$profile" = release ]; then
  flags+=(--release)
fi
cargo test "${flags[@]}" --no-run -q
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
HISTORY_LOAD_SCALE="$scale" RUST_BACKTRACE=0 \
  cargo test "${flags[@]}" -q -- --nocapture --test-threads=1 $filter >"$out" 2>&1 || status=$?
# The reports (and their first violations), the scenarios' verdicts, and why any failed.
grep -E '^(\[|=== scenario|writes |write unavailability|violations|ledger full|  (Overlap|InFence|OldOwner|StaleOwnerEpoch|event) |    [A-Z]+ [0-9]+ at |test |test result|thread .* panicked|timed out)' "$out" || true
if [ "$status" -ne 0 ]; then
  echo "ownership drill: at least one scenario failed (violations, or a step that timed out; see above)"
fi
exit "$status"
