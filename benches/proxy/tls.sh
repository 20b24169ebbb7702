#!/usr/bin/env bash
# TLS side by side: shardgate and nginx terminating TLS on the same machine, same certificate
# (ECDSA P-256, made here with openssl), same three backends (the shared harness's idc-sim),
# both routing by X-Shard-Key, one worker each. Two workloads, interleaved over ROUNDS:
#   handshake  every request on a new connection (Connection: close): full TLS handshakes/s
#   keepalive  64 keep-alive TLS connections: request throughput over TLS
# For each: median req/s over the rounds, p50/p99, and the proxy's CPU time (user+sys from
# /proc) per request, the steadiest figure on a shared box. Every process started here is
# stopped by PID on exit.
#
# Environment: ROUNDS [5] DURATION [5] s CONNS [64] HS_CONNS [32] PIN [split|none]
#   (split: wrk + backends on CPU 0, the proxy on CPU 1) BASE_PORT [19200] OUT [dir]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
shared=${SHARED_BENCH:-$repo/../shared/bench}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
HS_CONNS=${HS_CONNS:-32}
PIN=${PIN:-split}
BASE_PORT=${BASE_PORT:-19200}
OUT=${OUT:-/tmp/shardgate-tls-bench/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
for tool in nginx wrk openssl; do
  command -v "$tool" >/dev/null || { echo "tls.sh: $tool is needed" >&2; exit 2; }
done
if [[ $PIN == split ]]; then client_cpus=0; proxy_cpus=1; else client_cpus=; proxy_cpus=; fi

# shellcheck source=common.sh
source "$here/common.sh"
trap cleanup EXIT
harness_backend
release_gateway

# One ECDSA P-256 certificate for 127.0.0.1, signed by a throwaway CA.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=bench CA" -keyout "$OUT/ca.key" -out "$OUT/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$OUT/key.pem" -out "$OUT/req.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' >"$OUT/ext.cnf"
openssl x509 -req -in "$OUT/req.csr" -CA "$OUT/ca.pem" -CAkey "$OUT/ca.key" -CAcreateserial \
  -days 2 -extfile "$OUT/ext.cnf" -out "$OUT/cert.pem" 2>/dev/null

start_backends "$client_cpus"

nginx_port=$((BASE_PORT + 81)) sg_port=$((BASE_PORT + 90))
mkdir -p "$OUT/nginx-tmp"
nginx_conf "$nginx_port" ssl "ssl_certificate $OUT/cert.pem; ssl_certificate_key $OUT/key.pem; ssl_protocols TLSv1.2 TLSv1.3;" >"$OUT/nginx.conf"
start "$proxy_cpus" "$OUT/nginx.log" nginx -c "$OUT/nginx.conf" -p "$OUT"
bench_topology "$a" "$b" "$c" >"$OUT/topology.toml"
# Access log off, as nginx's (access_log off).
start "$proxy_cpus" "$OUT/shardgate.log" env RUST_LOG=warn "$shardgate" serve \
  --listen "127.0.0.1:$sg_port" --admin 127.0.0.1:0 --topology "$OUT/topology.toml" \
  --tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem" --threads 1
wait_port "$nginx_port"
wait_port "$sg_port"
nginx_pids() { local m; m=$(cat "$OUT/nginx.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')"; }
sg_pid=${pids[-1]}

# Smoke: both answer 200 over TLS with a verified certificate.
for port in $nginx_port $sg_port; do
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$OUT/ca.pem" -H 'X-Shard-Key: u1' "https://127.0.0.1:$port/")
  [[ $code == 200 ]] || { echo "tls.sh: port $port answered $code" >&2; exit 1; }
  # What each negotiates with an OpenSSL client like wrk (protocol, cipher, key exchange).
  neg=$(timeout 5 openssl s_client -brief -connect "127.0.0.1:$port" -CAfile "$OUT/ca.pem" </dev/null 2>&1 |
    grep -E 'Protocol version|Ciphersuite|Temp Key' | tr -s ' ' | paste -sd ';' || true)
  echo "port $port: $neg" >>"$OUT/negotiated.txt"
done

ticks() { local t=0 v; for p in "$@"; do v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || v=0; t=$((t + ${v:-0})); done; echo $t; }
hz=$(getconf CLK_TCK)
printf 'target\tmode\tround\treqs\tsecs\tp50_us\tp99_us\terrors\tproxy_ticks\n' >"$OUT/raw.tsv"
run() { # target port mode round
  local target=$1 port=$2 mode=$3 round=$4 procs close=0 conns=$CONNS
  if [[ $target == nginx ]]; then procs=$(nginx_pids); else procs=$sg_pid; fi
  if [[ $mode == handshake ]]; then close=1; conns=$HS_CONNS; fi
  CLOSE=$close on "$client_cpus" wrk -t1 -c"$conns" -d1s -s "$here/tls-keys.lua" "https://127.0.0.1:$port/" >/dev/null 2>&1 || true
  local before after line
  # shellcheck disable=SC2086
  before=$(ticks $procs)
  line=$(CLOSE=$close on "$client_cpus" wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 5s -s "$here/tls-keys.lua" \
    "https://127.0.0.1:$port/" 2>&1 | tee "$OUT/wrk-$target-$mode-$round.txt" | grep WRKRESULT || true)
  # shellcheck disable=SC2086
  after=$(ticks $procs)
  local reqs dur p50 p99 errs
  reqs=$(sed -n 's/.*requests=\([0-9]*\).*/\1/p' <<<"$line")
  dur=$(sed -n 's/.*duration_us=\([0-9]*\).*/\1/p' <<<"$line")
  p50=$(sed -n 's/.*p50_us=\([0-9]*\).*/\1/p' <<<"$line")
  p99=$(sed -n 's/.*p99_us=\([0-9]*\).*/\1/p' <<<"$line")
  errs=$(awk '{s=0; for (i=1;i<=NF;i++) if ($i ~ /^err_(read|write|status|timeout|connect)=/) {split($i,kv,"="); s+=kv[2]} print s}' <<<"$line")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$mode" "$round" "${reqs:-0}" \
    "$(awk -v d="${dur:-1}" 'BEGIN{printf "%.3f", d/1e6}')" "${p50:-0}" "${p99:-0}" "${errs:-0}" $((after - before)) >>"$OUT/raw.tsv"
}
for round in $(seq "$ROUNDS"); do
  for mode in handshake keepalive; do
    run nginx "$nginx_port" "$mode" "$round"
    run shardgate "$sg_port" "$mode" "$round"
  done
done

echo "TLS side by side ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, PIN=$PIN, $ROUNDS rounds x ${DURATION}s; medians)"
echo "handshake: one request per connection, $HS_CONNS connections; keepalive: $CONNS connections"
awk -F'\t' -v hz="$hz" "$AWK_MEDIAN"'
NR>1 {
    k=$1"\t"$2; n[k]++; i=n[k]
    rps[k,i]=$4/$5; p50[k,i]=$6/1000; p99[k,i]=$7/1000; us[k,i]=($4>0)? $9*1e6/hz/$4 : 0; err[k]+=$8; keys[k]=1
  }
  END {
    printf "%-10s %-10s %10s %8s %8s %12s %6s\n", "target", "mode", "req/s", "p50 ms", "p99 ms", "proxy us/req", "errs"
    split("handshake keepalive", modes, " ")
    for (mi=1; mi<=2; mi++) for (ti=1; ti<=2; ti++) {
      t=(ti==1)?"nginx":"shardgate"; k=t"\t"modes[mi]; if (!(k in keys)) continue
      r[t,modes[mi]]=med(rps,k,n[k]); u[t,modes[mi]]=med(us,k,n[k])
      printf "%-10s %-10s %10.0f %8.2f %8.2f %12.1f %6d\n", t, modes[mi], r[t,modes[mi]], med(p50,k,n[k]), med(p99,k,n[k]), u[t,modes[mi]], err[k]
    }
    for (mi=1; mi<=2; mi++) if (r["nginx",modes[mi]] > 0 && u["nginx",modes[mi]] > 0)
      printf "%s: shardgate/nginx req/s %.2f, proxy CPU per request %.2f\n", modes[mi], r["shardgate",modes[mi]]/r["nginx",modes[mi]], u["shardgate",modes[mi]]/u["nginx",modes[mi]]
  }' "$OUT/raw.tsv" | tee "$OUT/summary.txt"
cat "$OUT/negotiated.txt" | sed "s/port $nginx_port/nginx/; s/port $sg_port/shardgate/"
echo "raw rounds: $OUT/raw.tsv"
