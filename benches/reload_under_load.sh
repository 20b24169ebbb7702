#!/usr/bin/env bash
# 100 topology reloads under full load (DESIGN.md §11: zero failed requests, zero dropped
# connections). wrk keeps CONNS keep-alive connections busy through the release gateway (nginx
# backends, a random x-shard-key per request) while RELOADS documents are applied one after the
# other, alternating the home of shards 0-511 between IDCs a and b:
# - file mode: the topology file is replaced (renamed into place) and the gateway told with
#   SIGHUP; each reload is waited for until the gateway serves the next revision (its
#   shardgate_topology_revision metric);
# - etcd mode: a real etcd on free ports; each document is put with etcdctl and waited for until
#   the gateway serves the put's revision.
# Prints, per mode, the reloads applied and their time, and wrk's summary: requests, non-2xx
# responses and socket errors. A dropped connection shows as a read or write error (wrk counts
# a connection closed under it as a read error and reconnects); a failed request as a non-2xx
# response, a timeout or a connect error. Exit 1 when any of them is not zero.
#
# The load starts a second before the first reload and is stopped (SIGINT: wrk then prints its
# summary) a second after the last one is served.
#
# Knobs (environment): RELOADS (100), CONNS (32), THREADS (2, wrk's), GAP_MS (20: pause
# between reloads), SHARDGATE_BIN (target/release/shardgate). Needs wrk,
# nginx, curl, etcd and etcdctl (etcd mode is skipped, saying so, without them).
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/scale/common.sh"
reloads=${RELOADS:-100}
conns=${CONNS:-32}
threads=${THREADS:-2}
gap=${GAP_MS:-20}
for tool in wrk nginx curl python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ -x "$bin" ] || build_release

work=$(mktemp -d /tmp/shardgate-reload.XXXXXX)
trap 'cleanup_all; rm -rf "$work"' EXIT
start_backends "$work"
status=0

# A random key per request, so the load crosses the shards that each reload moves.
cat > "$work/keys.lua" <<'LUA'
request = function()
  wrk.headers["x-shard-key"] = tostring(math.random(1, 1000000))
  return wrk.format("GET", "/reload")
end
LUA

now_ms() { date +%s%3N; }

# Waits until the gateway serves revision $1 or later; 10 s at most.
await_revision() { # $1: revision
  local deadline=$(($(now_ms) + 10000)) served
  while :; do
    served=$(served_revision || echo 0)
    [ "${served:-0}" -ge "$1" ] && return 0
    [ "$(now_ms)" -lt "$deadline" ] || return 1
    sleep 0.005
  done
}

reload_file() { # $1: reload number; waits until it is served
  local before
  before=$(served_revision)
  write_topology "$work/topology.toml" "$([ $(($1 % 2)) = 1 ] && echo b || echo a)"
  kill -HUP "$GATEWAY_PID"
  await_revision $((before + 1))
}

reload_etcd() { # $1: reload number; waits until it is served
  local doc revision
  doc=$work/doc-$(($1 % 2)).toml
  revision=$(etcdctl --endpoints "$ETCD" -w json put /shardgate/bench/topology < "$doc" |
    grep -o '"revision":[0-9]*' | head -n 1 | cut -d: -f2)
  await_revision "$revision"
}

# Runs the reloads inside wrk's load; prints the mode's summary.
under_load() { # $1: mode (file | etcd)
  local out=$work/wrk-$1.txt applied=0 started ended i
  # An hour at most: stopped once the reloads are done.
  wrk -t"$threads" -c"$conns" -d3600s -s "$work/keys.lua" "http://$GATEWAY/" > "$out" &
  local load=$!
  sleep 1
  started=$(now_ms)
  for i in $(seq "$reloads"); do
    "reload_$1" "$i" || { echo "$1: reload $i was not served within 10 s" >&2; break; }
    applied=$i
    sleep "$(awk -v g="$gap" 'BEGIN {print g / 1000}')"
  done
  ended=$(now_ms)
  sleep 1
  kill -INT "$load"
  wait "$load"
  local requests non2xx errors dropped failed
  requests=$(awk '/requests in/ {print $1}' "$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$out")
  # "Socket errors: connect C, read R, write W, timeout T"
  read -r connect read write timeout < <(awk '/Socket errors/ {gsub(",", ""); print $4, $6, $8, $10}' "$out") || true
  connect=${connect:-0} read=${read:-0} write=${write:-0} timeout=${timeout:-0}
  failed=$((${non2xx:-0} + connect + timeout))
  dropped=$((read + write))
  printf '%s mode: %d/%d reloads applied in %.1f s under load (%s connections, %s requests, %s req/s): failed requests %d (non-2xx %s, timeouts %s, connect errors %s), dropped connections %d (read errors %s, write errors %s) (target: 0 and 0)\n' \
    "$1" "$applied" "$reloads" "$(awk -v a="$started" -v b="$ended" 'BEGIN {print (b - a) / 1000}')" \
    "$conns" "$requests" "$(awk '/Requests\/sec/ {print $2}' "$out")" \
    "$failed" "${non2xx:-0}" "$timeout" "$connect" "$dropped" "$read" "$write"
  if [ "$applied" != "$reloads" ] || [ "$failed" != 0 ] || [ "$dropped" != 0 ]; then
    status=1
  fi
}

# File mode.
write_topology "$work/topology.toml" a
start_gateway "$work"
under_load file
kill "$GATEWAY_PID"
wait "$GATEWAY_PID" 2>/dev/null || true

# etcd mode.
etcd_bin=$(command -v etcd || echo /usr/bin/etcd)
if [ ! -x "$etcd_bin" ] || ! command -v etcdctl >/dev/null; then
  echo "etcd mode: skipped (no etcd or etcdctl; make deps installs them)"
  exit "$status"
fi
client=127.0.0.1:$(free_port) peer=127.0.0.1:$(free_port)
ETCD=http://$client
"$etcd_bin" --data-dir "$work/etcd" --name bench \
  --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
  --listen-peer-urls "http://$peer" --initial-advertise-peer-urls "http://$peer" \
  --initial-cluster "bench=http://$peer" > "$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  etcdctl --endpoints "$ETCD" endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done
write_topology "$work/doc-0.toml" a
write_topology "$work/doc-1.toml" b
etcdctl --endpoints "$ETCD" put /shardgate/bench/topology < "$work/doc-0.toml" >/dev/null
start_gateway "$work" "etcd = [\"$ETCD\"]
cluster = \"bench\""
under_load etcd
exit "$status"
