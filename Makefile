# shardgate: the two commands a newcomer needs, and the checks CI runs.
#   make demo   build and run the demo (3 simulated IDCs + a gateway on config/topology.toml)
#   make test   install what the tests need, then fmt, clippy and the whole test suite
#               (tests/deploy.rs checks the Kubernetes manifests, alerts and dashboard in deploy/)
#   make image  build the container image (deploy/Dockerfile); make image-push publishes it
#   make console-screenshot   docs/console.png: the admin console of a demo-like cluster
#
# Building needs nothing but Rust: the etcd client's build runs protoc, and where none is
# installed tools/run-protoc (wired through .cargo/config.toml) runs one vendored from
# crates.io. `make demo` therefore installs nothing and needs no root; `make test` still
# installs etcd (and protoc) for the etcd tests, and Chromium for the console's browser tests.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Extra arguments of `shardgate demo` (e.g. --listen 127.0.0.1:0 --admin 127.0.0.1:0).
DEMO_ARGS ?=
# The container image: `make image IMAGE_REPO=registry.example.com/shardgate` tags it
# registry.example.com/shardgate:<version of Cargo.toml>, the tag deploy/k8s names.
DOCKER ?= docker
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
IMAGE_REPO ?= shardgate
IMAGE ?= $(IMAGE_REPO):$(VERSION)

.PHONY: demo demo-build test deps fmt-check clippy unit bench bench-alloc bench-proxy bench-tls bench-h2 bench-h1-split bench-instructions bench-wakeups bench-ownership bench-idle-rss bench-reload bench-etcd release fuzz image image-push console-screenshot

# A debug build: the demo needs no speed, a first build skips the release profile's LTO, and
# it shares its build with `make test`.
demo: demo-build
	$(CARGO) run --locked --bin shardgate -- demo $(DEMO_ARGS)

demo-build:
	$(CARGO) build --locked --bin shardgate

# System packages the tests need (protoc for the etcd client, etcd for its tests, Chromium for
# the console's tests in a headless browser).
deps:
	@missing=""; \
	command -v protoc >/dev/null 2>&1 || missing="$$missing protobuf-compiler"; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v etcdctl >/dev/null 2>&1 || missing="$$missing etcd-client"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --all-targets --locked
	$(CARGO) test --locked --manifest-path tools/heap-trim/Cargo.toml --target-dir target/tools

test: deps fmt-check clippy unit

release:
	$(CARGO) build --release --locked

# The image builds the release binary itself (multi-stage); it needs a Docker engine (or any
# builder that reads a Dockerfile) and network access for the base images and the crates.
image:
	$(DOCKER) build -f deploy/Dockerfile -t $(IMAGE) .

image-push: image
	$(DOCKER) push $(IMAGE)
# The console under traffic (an IDC failed over, a range moving, a set degraded), photographed
# by headless Chromium into docs/console.png (tests/console.rs, `console_screenshot`).
console-screenshot: deps
	SHARDGATE_CONSOLE_SCREENSHOT=$(CURDIR)/docs/console.png \
		$(CARGO) test --locked --test console -- --ignored --exact console_screenshot

# Criterion: the routing decision and the snapshot build.
bench:
	$(CARGO) bench --bench routing

# Heap allocations and bytes per proxied request, the gateway's share beside the bench's own
# client and backend (benches/allocations.rs).
bench-alloc:
	$(CARGO) bench --locked --bench allocations

# The whole proxy side by side with nginx and HAProxy (see benches/proxy/README.md).

# The whole proxy side by side with nginx and HAProxy (benches/proxy/run.sh on ../shared/bench).
bench-proxy: release
	benches/proxy/run.sh

# TLS handshakes/s and TLS request throughput beside nginx terminating TLS (benches/proxy/tls.sh).
bench-tls: release
	benches/proxy/tls.sh

# RSS of the release gateway with 10,000 idle keep-alive connections, with and without a request
# made on each first (benches/idle_rss.sh; DESIGN.md §11: under 50 MiB).
bench-idle-rss: release
	benches/idle_rss.sh

# 100 topology reloads under wrk's load, file mode and etcd mode: failed requests and dropped
# connections (benches/reload_under_load.sh; DESIGN.md §11: zero and zero).
bench-reload: release
	benches/reload_under_load.sh

# A change in etcd served by every gateway: p50/p99 for a document change and an override-only
# change of the 1,000-route / 16,384-shard topology (benches/etcd_propagation.rs; DESIGN.md §11:
# p99 under 100 ms).
bench-etcd:
	$(CARGO) bench --locked --bench etcd_propagation

# HTTP/2 clients (h2load, cleartext) beside nginx and HAProxy speaking h2, the proxies' CPU
# split into user and kernel time (benches/proxy/clients.sh).
bench-h2: release
	PROTO=h2 benches/proxy/clients.sh

# The same for HTTP/1.1 keep-alive clients: where the user-time half of the CPU per request is
# measured beside HAProxy's (the shared harness reports user + sys together).
bench-h1-split: release
	PROTO=h1 benches/proxy/clients.sh

# Instructions per proxied request under callgrind: a figure the host's noise does not move
# (benches/proxy/instructions.sh).
bench-instructions: release
	benches/proxy/instructions.sh

# How often each proxy makes its client and backends wake, per request (`epoll_wait` calls and
# the proxy's wake-ups under perf; benches/proxy/wakeups.sh): how well its sends are batched.
bench-wakeups: release
	benches/proxy/wakeups.sh

# The history scenarios (tests/history.rs) run longer on a release build, one after the other,
# each printing its report; exit 1 when a scenario saw two writers (benches/ownership_drill.sh).
bench-ownership:
	benches/ownership_drill.sh

# Coverage-guided fuzzing (libFuzzer) of the topology parser/validator, request routing and
# header hygiene, and the request-head gate: FUZZ_SECONDS each, then the corpus is minimized
# in place (commit what it adds; `make test` replays fuzz/corpus). Needs cargo-fuzz;
# RUSTC_BOOTSTRAP lets the stable toolchain take its flags.
FUZZ_TARGETS := topology_document request_routing request_head_gate
FUZZ_SECONDS ?= 60
fuzz:
	command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -dict=dict/$$t.dict && \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz cmin $$t || exit 1; \
	done
