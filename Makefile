# shardgate: the two commands a newcomer needs, and the checks CI runs.
#   make demo   build and run the demo (3 simulated IDCs + a gateway on config/topology.toml)
#   make test   install what the tests need, then fmt, clippy and the whole test suite

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test deps fmt-check clippy unit bench bench-proxy bench-tls bench-ownership release fuzz

demo:
	$(CARGO) run --release --bin shardgate -- demo

# System packages the etcd work needs (protoc for the etcd client, etcd for its tests).
deps:
	@missing=""; \
	command -v protoc >/dev/null 2>&1 || missing="$$missing protobuf-compiler"; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v etcdctl >/dev/null 2>&1 || missing="$$missing etcd-client"; \
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

test: deps fmt-check clippy unit

release:
	$(CARGO) build --release --locked

# Criterion: the routing decision and the snapshot build.
bench:
	$(CARGO) bench --bench routing

# The whole proxy side by side with nginx and HAProxy (see benches/proxy/README.md).
bench-proxy: release
	benches/proxy/run.sh

# TLS handshakes/s and TLS request throughput beside nginx terminating TLS (benches/proxy/tls.sh).
bench-tls: release
	benches/proxy/tls.sh

# The history scenarios (tests/history.rs) run longer on a release build, one after the other,
# each printing its report; exit 1 when a scenario saw two writers (benches/ownership_drill.sh).
bench-ownership:
	benches/ownership_drill.sh

# Coverage-guided fuzzing (libFuzzer) of the topology parser/validator and request routing,
# 60 s each. Needs cargo-fuzz; RUSTC_BOOTSTRAP lets the stable toolchain take its flags.
fuzz:
	command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run topology_document -- -max_total_time=60
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run request_routing -- -max_total_time=60
