#!/usr/bin/env bash
# Clients side by side with the proxy's CPU split into user and kernel time: h2load speaking
# HTTP/1.1 (PROTO=h1: keep-alive, one request at a time per connection) or cleartext HTTP/2
# with prior knowledge (PROTO=h2) to shardgate, nginx and HAProxy, each routing by X-Shard-Key
# to the shared harness's three backends over pooled HTTP/1.1, one worker each. Rounds are
# interleaved (nginx, haproxy, shardgate, nginx, ...). For each target: median req/s over the
# rounds, mean request time, and the proxy's CPU time (user + sys from /proc) per request,
# split into user and kernel; then shardgate's ratios to each peer. (The shared harness
# reports user + sys together; this is where the user-time half is measured.) Every process
# started here is stopped by PID on exit.
#
# Environment: PROTO [h2|h1] ROUNDS [5] DURATION [5] s CLIENTS [16 for h2, 64 for h1]
#   STREAMS [10] (concurrent streams per HTTP/2 connection) PIN [split|none] (split: h2load
#   + backends on CPU 0, the proxy on CPU 1) BASE_PORT [19300] OUT [dir]
#   TARGETS ["nginx haproxy shardgate"]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
shared=${SHARED_BENCH:-$repo/../shared/bench}
PROTO=${PROTO:-h2}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
case $PROTO in
  h2) CLIENTS=${CLIENTS:-16} STREAMS=${STREAMS:-10} h2load_proto=() curl_proto=--http2-prior-knowledge
      want=2 nginx_listen=http2 haproxy_bind="proto h2" ;;
  h1) CLIENTS=${CLIENTS:-64} STREAMS=1 h2load_proto=(--h1) curl_proto=--http1.1
      want=1.1 nginx_listen= haproxy_bind= ;;
  *) echo "clients.sh: PROTO must be h2 or h1" >&2; exit 2 ;;
esac
PIN=${PIN:-split}
BASE_PORT=${BASE_PORT:-19300}
TARGETS=${TARGETS:-nginx haproxy shardgate}
OUT=${OUT:-/tmp/shardgate-clients-bench/$PROTO-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
if [[ $PIN == split ]]; then client_cpus=0; proxy_cpus=1; else client_cpus=; proxy_cpus=; fi

# shellcheck source=common.sh
source "$here/common.sh"
need_tools nginx haproxy h2load curl
trap cleanup EXIT
harness_backend
release_gateway

start_backends "$client_cpus"

nginx_port=$((BASE_PORT + 81)) haproxy_port=$((BASE_PORT + 82)) sg_port=$((BASE_PORT + 90))
mkdir -p "$OUT/nginx-tmp"
nginx_conf "$nginx_port" "$nginx_listen" "http2_max_requests 1000000; http2_max_concurrent_streams 128;" >"$OUT/nginx.conf"
haproxy_conf "$haproxy_port" "$haproxy_bind" >"$OUT/haproxy.cfg"
bench_topology "$a" "$b" "$c" >"$OUT/topology.toml"
declare -A port procs
for t in $TARGETS; do
  case $t in
    nginx)
      start "$proxy_cpus" "$OUT/nginx.log" nginx -c "$OUT/nginx.conf" -p "$OUT"
      port[nginx]=$nginx_port ;;
    haproxy)
      start "$proxy_cpus" "$OUT/haproxy.log" haproxy -db -f "$OUT/haproxy.cfg"
      port[haproxy]=$haproxy_port procs[haproxy]=${pids[-1]} ;;
    shardgate)
      # Access log off, as the peers' (access_log off; no log in HAProxy's config).
      start "$proxy_cpus" "$OUT/shardgate.log" env RUST_LOG=warn "$shardgate" serve \
        --listen "127.0.0.1:$sg_port" --admin 127.0.0.1:0 --topology "$OUT/topology.toml" --threads 1
      port[shardgate]=$sg_port procs[shardgate]=${pids[-1]} ;;
    *) echo "clients.sh: unknown target $t" >&2; exit 2 ;;
  esac
done
for t in $TARGETS; do wait_port "${port[$t]}"; done
[[ " $TARGETS " == *" nginx "* ]] && procs[nginx]="$(cat "$OUT/nginx.pid") $(pgrep -P "$(cat "$OUT/nginx.pid")" | tr '\n' ' ')"

# Smoke: every target answers 200 in the protocol asked.
for t in $TARGETS; do
  code=$(curl -s -o /dev/null -w '%{http_code} %{http_version}' "$curl_proto" -H 'X-Shard-Key: u1' "http://127.0.0.1:${port[$t]}/")
  [[ $code == "200 $want" ]] || { echo "clients.sh: $t answered '$code' (want '200 $want')" >&2; exit 1; }
done

# user and system ticks of the given PIDs
ticks() { local u=0 s=0 f; for p in "$@"; do f=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null) || continue; u=$((u + $(awk '{print $12}' <<<"$f"))); s=$((s + $(awk '{print $13}' <<<"$f"))); done; echo "$u $s"; }
hz=$(getconf CLK_TCK)
printf 'target\tround\treqs\tsecs\tmean_us\tfailed\tuser_ticks\tsys_ticks\n' >"$OUT/raw.tsv"
run() { # target round
  local t=$1 round=$2 url="http://127.0.0.1:${port[$1]}/" before after out
  # shellcheck disable=SC2086
  before=$(ticks ${procs[$t]})
  out=$(on "$client_cpus" h2load "${h2load_proto[@]}" -c "$CLIENTS" -m "$STREAMS" -t 1 -D "$DURATION" --warm-up-time=1 \
    -H 'X-Shard-Key: u1' "$url" 2>&1 | tee "$OUT/h2load-$t-$round.txt")
  # shellcheck disable=SC2086
  after=$(ticks ${procs[$t]})
  local secs reqs failed mean
  secs=$(sed -n 's/^finished in \([0-9.]*\)s.*/\1/p' <<<"$out")
  reqs=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' <<<"$out")
  failed=$(sed -n 's/^requests: .* \([0-9]*\) failed, \([0-9]*\) errored, \([0-9]*\) timeout.*/\1 \2 \3/p' <<<"$out" | awk '{print $1+$2+$3}')
  mean=$(awk '/^time for request:/ {v=$5; if (v ~ /ms$/) {sub(/ms/,"",v); v*=1000} else if (v ~ /us$/) sub(/us/,"",v); else if (v ~ /s$/) {sub(/s/,"",v); v*=1e6}; print v}' <<<"$out")
  read -r bu bs <<<"$before"
  read -r au as <<<"$after"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$round" "${reqs:-0}" "${secs:-1}" "${mean:-0}" "${failed:-0}" \
    $((au - bu)) $((as - bs)) >>"$OUT/raw.tsv"
}
for round in $(seq "$ROUNDS"); do
  for t in $TARGETS; do run "$t" "$round"; done
done

echo "$PROTO clients side by side ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, PIN=$PIN, $ROUNDS rounds x ${DURATION}s; medians)"
if [[ $PROTO == h2 ]]; then
  echo "h2load: $CLIENTS connections x $STREAMS concurrent streams, cleartext HTTP/2; upstream HTTP/1.1 pooled"
else
  echo "h2load --h1: $CLIENTS keep-alive connections, one request at a time each; upstream HTTP/1.1 pooled"
fi
awk -F'\t' -v hz="$hz" -v targets="$TARGETS" "$AWK_MEDIAN"'
NR>1 && $3>0 {
    k=$1; n[k]++; i=n[k]
    rps[k,i]=$3/$4; mean[k,i]=$5/1000; us[k,i]=($7+$8)*1e6/hz/$3
    usr[k,i]=$7*1e6/hz/$3; sys[k,i]=$8*1e6/hz/$3; fail[k]+=$6
  }
  END {
    printf "%-10s %10s %10s %12s %9s %9s %7s\n", "target", "req/s", "mean ms", "proxy us/req", "user us", "sys us", "failed"
    nt=split(targets, ts, " ")
    for (ti=1; ti<=nt; ti++) {
      t=ts[ti]; if (!(t in n)) continue
      r[t]=med(rps,t,n[t]); u[t]=med(us,t,n[t]); uu[t]=med(usr,t,n[t])
      printf "%-10s %10.0f %10.2f %12.1f %9.1f %9.1f %7d\n", t, r[t], med(mean,t,n[t]), u[t], uu[t], med(sys,t,n[t]), fail[t]
    }
    for (ti=1; ti<=nt; ti++) { p=ts[ti]; if (p == "shardgate" || !(p in u) || !("shardgate" in u) || u[p] == 0) continue
      printf "shardgate/%s: req/s %.2f, proxy CPU per request %.2f, user time per request %.2f\n", p, r["shardgate"]/r[p], u["shardgate"]/u[p], (uu[p] > 0) ? uu["shardgate"]/uu[p] : 0 }
  }' "$OUT/raw.tsv" | tee "$OUT/summary.txt"
echo "raw rounds: $OUT/raw.tsv"
