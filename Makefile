# Halyard: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
# Every Debian package the build, the demo, the tests and the benches need, on a clean Debian 12
# (bookworm) that has only a Rust toolchain (rustup) and make. `.ci/deps` checks each one by what
# is really used from it (protoc finding the well-known .proto includes, cc linking a program...).
#   gcc libc6-dev            the linker and C compiler for rustc and for ring's build script
#   ca-certificates          cargo's downloads from crates.io over TLS
#   protobuf-compiler        protoc, for etcd-client's generated code
#   libprotobuf-dev          google/protobuf/*.proto, which etcd's .proto files import
#   etcd-server etcd-client  the real etcd the tests start, and etcdctl
#   iptables iproute2        transparent capture, network namespaces (tests, lab, benches)
#   openssl                  certificate checks in the CLI tests, an RSA CSR the CA must refuse
#   stunnel4                 the mTLS-over-TCP baseline of the benches
#   curl                     deploy/lab/lab.sh, and the real-traffic tests' HTTP client
#   python3-grpcio           a real gRPC client and server (bidirectional streaming tests)
#   python3-websockets       a real WebSocket client and server (upgrade tests)
#   python3-venv             the virtual environment below
#   clang libbpf-dev         the east-west gateway's XDP program (sidecar/bpf/), built by
#                            sidecar/build.rs for the BPF target
#   ethtool                  GRO on a veth peer, so it takes frames the XDP program redirects (tests)
APT_PACKAGES := gcc libc6-dev ca-certificates protobuf-compiler libprotobuf-dev etcd-server \
	etcd-client iptables iproute2 openssl stunnel4 curl python3-grpcio python3-websockets \
	python3-venv clang libbpf-dev ethtool
# Python client libraries Debian 12 lacks in a usable version (PyPI's `spiffe`, the SPIFFE
# Workload API client): pinned wheels in a virtual environment of /usr/bin/python3.
PY_VENV := .venv
PY_REQUIREMENTS := sidecar/tests/clients/requirements.txt
# Extra arguments for `halyard demo`, e.g. `make demo DEMO_ARGS=--quick`.
DEMO_ARGS ?=

.PHONY: all build demo test lint bench deps fmt fresh-check fuzz chaos soak impairment

all: build

build:
	$(CARGO) build --release --bin halyard

## deps: install the Debian packages above that are missing (root), or print the command.
deps:
	@bash .ci/deps --venv $(PY_VENV)=$(PY_REQUIREMENTS) $(APT_PACKAGES)

## demo: the main job, on the embedded directory registry (no etcd needed).
demo: deps
	$(CARGO) run --release --bin halyard -- demo $(DEMO_ARGS)

fmt:
	$(CARGO) fmt --all

lint: deps
	bash .ci/pure-core
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

## test: deps, fmt check, clippy with warnings denied, the whole test suite, benches compiled.
test: lint
	$(CARGO) test --workspace --all-features
	$(CARGO) bench --workspace --no-run

## bench: every scenario of benches/ (root: network namespaces), reports in benches/results/.
bench: deps
	$(CARGO) build --release --bin halyard
	$(CARGO) run --release -p halyard-benches -- all

## impairment: the QUIC impairment matrix at full size (64 MiB transfers; `test` runs 8 MiB).
impairment:
	HALYARD_IMPAIRMENT_FULL=1 $(CARGO) test -p halyard-transport --test impairment

## fuzz: every fuzz target (fuzz/) for FUZZ_SECONDS each; nightly toolchain, cargo-fuzz installed when missing.
FUZZ_SECONDS ?= 60
fuzz: deps
	@bash .ci/deps g++
	bash .ci/fuzz $(FUZZ_SECONDS)

## chaos: long etcd-chaos and flood runs (20 sidecars, 30/60 s outages, 100 storm runs; not
## part of `test`, which runs their short versions). Figures: benches/results/reliability.jsonl.
chaos: deps
	bash .ci/chaos

## soak: 30 min of mixed L4/L7 traffic at 1,000 rps under cert, endpoint and route churn
## (SOAK_SECS=180 for a short one). Figures and curve: benches/results/soak.json.
soak: deps
	bash .ci/soak

## fresh-check: `make demo` (quick) and `make test` in a clean Debian 12 root (root; CI runs it).
fresh-check:
	bash .ci/fresh-check
