# Halyard: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
APT_PACKAGES := protobuf-compiler etcd-server etcd-client iptables openssl iproute2 stunnel4

.PHONY: all build demo test lint bench deps fmt

all: build

build:
	$(CARGO) build --release --bin halyard

## deps: install what the build and the tests need from Debian packages (root), or say how.
deps:
	@missing=(); \
	command -v protoc >/dev/null || missing+=(protobuf-compiler); \
	command -v etcd >/dev/null || missing+=(etcd-server); \
	command -v etcdctl >/dev/null || missing+=(etcd-client); \
	command -v iptables >/dev/null || missing+=(iptables); \
	command -v openssl >/dev/null || missing+=(openssl); \
	command -v ip >/dev/null || missing+=(iproute2); \
	command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || missing+=(stunnel4); \
	if [ $${#missing[@]} -eq 0 ]; then echo "deps: all present"; exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ]; then \
	  echo "deps: installing $${missing[*]}"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$${missing[@]}"; \
	else \
	  echo "deps: missing $${missing[*]}; run: sudo apt-get install -y $${missing[*]}"; exit 1; \
	fi

## demo: the main job, on the embedded directory registry (no etcd needed).
demo: deps
	$(CARGO) run --release --bin halyard -- demo

fmt:
	$(CARGO) fmt --all

lint: deps
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
