# What the proxy benches share (sourced by clients.sh, tls.sh, instructions.sh, wakeups.sh and
# gateway.sh): the tools they need installed, the harness's backend, the release gateway, the
# bench topology, nginx's and HAProxy's configs, processes stopped by PID, bounded waits for a
# port. Sourcing it only defines functions; a script that starts processes sets `trap cleanup
# EXIT` itself. The sourcing script sets `repo`, `shared` and `OUT` first.

# The commands named, installed from Debian's packages when missing (each command's package:
# nginx-light, nghttp2-client for h2load, linux-perf for perf, else the command's own name).
need_tools() {
  local tool pkgs=()
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 && continue
    case $tool in
      nginx) pkgs+=(nginx-light) ;;
      h2load) pkgs+=(nghttp2-client) ;;
      perf) pkgs+=(linux-perf) ;;
      *) pkgs+=("$tool") ;;
    esac
  done
  ((${#pkgs[@]} == 0)) && return 0
  echo "installing: ${pkgs[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
}

# The harness's idc-sim, built once into a writable copy of ../shared/bench: sets `idc_sim`.
harness_backend() {
  local work=${BENCH_DIR:-/tmp/shardgate-bench-harness}
  if [[ ! -x $work/idc-sim/target/release/idc-sim ]]; then
    [[ -d $shared ]] || { echo "no harness at $shared (set SHARED_BENCH)" >&2; exit 2; }
    mkdir -p "$work" && cp -r "$shared/." "$work/" && chmod -R u+w "$work"
    (cd "$work/idc-sim" && cargo build --release -q)
  fi
  idc_sim=$work/idc-sim/target/release/idc-sim
}

# The release gateway, built when missing: sets `shardgate`.
release_gateway() {
  shardgate=${SHARDGATE_BIN:-$repo/target/release/shardgate}
  [[ -x $shardgate ]] || (cd "$repo" && cargo build --release --locked -q)
}

# The bench topology on stdout: IDCs a, b, c with one backend each in set `core`, and one
# route keyed by X-Shard-Key. Arguments: the three backend addresses.
bench_topology() {
  cat <<TOML
cluster = "bench"
shard_count = 1024
[sets.core]
max_inflight = 100000
[[idcs]]
name = "a"
pools.core = ["$1"]
[[idcs]]
name = "b"
pools.core = ["$2"]
[[idcs]]
name = "c"
pools.core = ["$3"]
[[routes]]
name = "shard"
path_prefix = "/"
set = "core"
key = ["header:x-shard-key"]
TOML
}

# nginx's config on stdout: one worker routing by X-Shard-Key (consistent hash) to the backends
# $a, $b, $c over pooled HTTP/1.1, listening on 127.0.0.1:$1 with the `listen` options $2 and
# the server-block directives $3 (TLS certificates, HTTP/2 limits). Files go under $OUT.
nginx_conf() {
  cat <<NGINX
worker_processes 1;
daemon off;
master_process on;
pid $OUT/nginx.pid;
error_log $OUT/nginx-error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; multi_accept on; }
http {
    access_log off;
    client_body_temp_path $OUT/nginx-tmp;
    proxy_temp_path $OUT/nginx-tmp;
    fastcgi_temp_path $OUT/nginx-tmp;
    uwsgi_temp_path $OUT/nginx-tmp;
    scgi_temp_path $OUT/nginx-tmp;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    tcp_nodelay on;
    upstream idc_hash {
        hash \$http_x_shard_key consistent;
        server $a;
        server $b;
        server $c;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }
    server {
        listen 127.0.0.1:$1 $2 backlog=4096;
        $3
        location / {
            proxy_pass http://idc_hash;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGINX
}

# HAProxy's config on stdout: one thread routing by X-Shard-Key (consistent hash) to the
# backends $a, $b, $c over pooled HTTP/1.1 (`http-reuse always`), listening on 127.0.0.1:$1
# with the `bind` options $2 (`proto h2` for cleartext HTTP/2).
haproxy_conf() {
  cat <<HAPROXY
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend fe
    bind 127.0.0.1:$1 $2
    default_backend idc
backend idc
    balance hdr(X-Shard-Key)
    hash-type consistent
    http-reuse always
    server a $a
    server b $b
    server c $c
HAPROXY
}

# awk: med(a, k, n), the median of a[k,1..n] (put before a program that calls it).
AWK_MEDIAN='
function med(a, k, cnt,   v, j, m, t) {
  for (j=1; j<=cnt; j++) v[j]=a[k,j]
  for (j=1; j<=cnt; j++) for (m=j+1; m<=cnt; m++) if (v[m]<v[j]) { t=v[j]; v[j]=v[m]; v[m]=t }
  return (cnt%2) ? v[(cnt+1)/2] : (v[cnt/2]+v[cnt/2+1])/2
}'

# Commands on the given CPUs (taskset), or anywhere when the list is empty.
on() { local cpus=$1; shift; if [[ -n $cpus ]]; then taskset -c "$cpus" "$@"; else "$@"; fi; }

# Every process started with `start` (or added to `pids`) is stopped by PID by `cleanup`, nginx
# by its pid file.
pids=()
cleanup() {
  [[ -f $OUT/nginx.pid ]] && kill -QUIT "$(cat "$OUT/nginx.pid")" 2>/dev/null || true
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
start() { # cpus log cmd...: in the background, its PID recorded for cleanup
  local cpus=$1 log=$2; shift 2
  local cmd=("$@")
  [[ -n $cpus ]] && cmd=(taskset -c "$cpus" "$@")
  "${cmd[@]}" >"$log" 2>&1 &
  pids+=($!)
}
# The harness's three backends on BASE_PORT + 1..3, on the CPUs given (none: anywhere), each
# answering before this returns: sets `a`, `b` and `c` to their addresses.
start_backends() {
  a=127.0.0.1:$((BASE_PORT + 1)) b=127.0.0.1:$((BASE_PORT + 2)) c=127.0.0.1:$((BASE_PORT + 3))
  local i=0 addr
  for addr in $a $b $c; do
    i=$((i + 1))
    start "$1" "$OUT/idc-$i.log" "$idc_sim" --listen "$addr" --name "idc-$i"
  done
  for addr in $a $b $c; do wait_port "${addr##*:}"; done
}
wait_port() { # port: within 30 s
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "$(basename "$0"): nothing listens on $1 (see $OUT)" >&2; exit 1
}
