# Shared by the scale benches (idle_rss.sh, reload_under_load.sh): free ports, nginx as three
# plain backends, and a release gateway on a file topology over them. Sourced, not run.
# Each start_* function registers its process for cleanup_all (the caller's EXIT trap).

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${SHARDGATE_BIN:-$repo/target/release/shardgate}
# The bench topology (bench_topology) is the proxy benches' one.
# shellcheck source=../proxy/common.sh
source "$here/../proxy/common.sh"
pids=()

cleanup_all() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}

# A port nobody listens on now (the kernel's choice of a free one).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# nginx answering 200 "ok" on three ports: the backends of IDCs a, b and c. Sets BACKEND_A/B/C.
# nginx costs the gateway nothing in RSS and answers fast, so what is measured is the gateway.
start_backends() { # $1: work dir
  local dir=$1
  BACKEND_A=127.0.0.1:$(free_port) BACKEND_B=127.0.0.1:$(free_port) BACKEND_C=127.0.0.1:$(free_port)
  mkdir -p "$dir/nginx"
  cat > "$dir/nginx/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $dir/nginx;
  proxy_temp_path $dir/nginx;
  fastcgi_temp_path $dir/nginx;
  uwsgi_temp_path $dir/nginx;
  scgi_temp_path $dir/nginx;
  server {
    listen $BACKEND_A; listen $BACKEND_B; listen $BACKEND_C;
    location / { return 200 "ok\n"; }
  }
}
NGINX
  nginx -c "$dir/nginx/nginx.conf" -e "$dir/nginx/error.log" &
  pids+=($!)
}

# The topology over the three backends: one route keyed by x-shard-key. $2 names the IDC that
# the pinned shards 0-511 go to, so two documents differing only in it move half the shards.
write_topology() { # $1: path, $2: a | b
  {
    bench_topology "$BACKEND_A" "$BACKEND_B" "$BACKEND_C"
    printf '[[shards.pins]]\nrange = "0-511"\nidc = "%s"\n' "$2"
  } > "$1.tmp"
  # Renamed into place, so the gateway never reads half a document.
  mv "$1.tmp" "$1"
}

# The release gateway on $dir/topology.toml, or on the source that $2 gives in the bootstrap
# config's words (`etcd = [...]` and `cluster = ...`). Sets GATEWAY (proxy addr), ADMIN (admin
# addr) and GATEWAY_PID. Timeouts are long and the connection limit above idle_rss.sh's 10,000,
# so that what is measured is the gateway, not its watchdog closing silent connections.
start_gateway() { # $1: work dir, $2: source (default: the file)
  local dir=$1 source=${2:-"topology = \"$1/topology.toml\""}
  GATEWAY=127.0.0.1:$(free_port) ADMIN=127.0.0.1:$(free_port)
  cat > "$dir/shardgate.toml" <<TOML
listen = "$GATEWAY"
admin = "$ADMIN"
$source
[timeouts]
header_read_ms = 300000
idle_ms = 300000
[limits]
max_connections = 20000
TOML
  RUST_LOG=${RUST_LOG:-warn} "$bin" serve --config "$dir/shardgate.toml" \
    > "$dir/gateway.log" 2>&1 &
  GATEWAY_PID=$!
  pids+=("$GATEWAY_PID")
  local _
  for _ in $(seq 100); do
    curl -fs "http://$ADMIN/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fs "http://$ADMIN/readyz" >/dev/null || { cat "$dir/gateway.log" >&2; return 1; }
}

# The topology revision the gateway serves (its metric).
served_revision() {
  curl -fs "http://$ADMIN/metrics" | awk '$1 == "shardgate_topology_revision" {print $2}'
}

# Resident memory of a process in KiB (VmRSS).
rss_kib() { # $1: pid
  awk '/^VmRSS:/ {print $2}' "/proc/$1/status"
}

# The median of numbers on stdin.
median() {
  sort -n | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

build_release() {
  (cd "$repo" && cargo build --release --locked -q --bin shardgate)
}
