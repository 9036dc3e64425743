# The two commands a newcomer needs: `make demo` and `make test`.
# Everything else here is what those two are made of.

CARGO   ?= cargo
BIN     := target/testenv/bin
DEMO    := target/demo
# Where cargo builds (CARGO_TARGET_DIR when set) and where `make image` writes.
TARGET  := $(or $(CARGO_TARGET_DIR),target)
IMAGES  := $(or $(SALESLAYER_IMAGES),$(TARGET)/images)
# The examples' batch client goes into the workload image when its crate exists.
EXAMPLE_CRATES := $(if $(wildcard examples/catalog-sync/Cargo.toml),-p catalog-sync)

.PHONY: all testenv testenv-node build test unit integration lint crds image e2e demo demo-down demo-adapt bench bench-fleet bench-scale clean

all: build

## Build kube-apiserver, etcd, helm and promtool from tests/testenv's pinned
## Go modules (only what is missing or whose go.sum changed).
testenv:
	tests/testenv/build.sh control-plane

## The node's parts too: kubelet, kube-controller-manager, kube-scheduler,
## kube-proxy, containerd (+ shim, ctr), CoreDNS and the pause program; and
## the Debian packages a node needs (runc, CNI plugins, iptables, ...).
testenv-node:
	scripts/node-packages.sh
	tests/testenv/build.sh node

build:
	$(CARGO) build --workspace --bins

## Unit, property, doc and integration tests; the integration tests start a
## real etcd + kube-apiserver per test.
test: testenv
	$(CARGO) test --workspace --no-fail-fast

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@# The crate boundaries (issue 10): the sidecar without the Kubernetes
	@# client, the operator without the test cluster.
	@if $(CARGO) tree -e normal -p saleslayer-sidecar --prefix none | grep -Eq '^kube(-client|-runtime|-core)? '; then \
	  echo "lint: the sidecar depends on the Kubernetes client" >&2; exit 1; fi
	@if $(CARGO) tree -e normal -p saleslayer-operator --prefix none | grep -Eq '^(saleslayer-testenv|tempfile) '; then \
	  echo "lint: the operator depends on a test-only crate" >&2; exit 1; fi

## Regenerate the committed CRD YAML from the Rust types (and the chart's copy).
crds: build
	target/debug/saleslayer-operator crd --dir crds
	cp crds/*.yaml charts/saleslayer-operator/crds/

## The images, without a container daemon, as docker-archive tarballs in
## $(IMAGES): the operator's (what the Dockerfile's final stage gives, from
## the release build), the node's pause image and the examples' workload.
image: testenv-node
	$(CARGO) build --release -p saleslayer-operator -p saleslayer-sidecar $(EXAMPLE_CRATES)
	scripts/image.py

## End-to-end tests on one real node (kubelet, containerd, kube-proxy,
## CoreDNS in a network namespace of their own): the node's own teardown
## tests, then the operator installed by its chart from its image.
e2e: testenv-node image
	scripts/e2e.sh

## A node with the operator installed by its chart, the simulator as a pod
## and the example workloads paced by their sidecars; `make demo-down`
## stops and removes it all.
demo: testenv-node image
	$(CARGO) build -p saleslayer-testenv --bins
	scripts/demo.sh up

demo-down:
	scripts/demo.sh down

## On a running demo: Sales Layer lowers the account's limit from 50 to 35
## requests per 10 s for a minute; the account's effective budget adapts.
demo-adapt:
	scripts/demo.sh adapt

## Benchmarks (not in CI; figures in BENCHMARKS.md): allocation in process, and
## the controller's convergence on the testenv with the release operator
## running as its own process, so its RSS is measured alone. The fleet
## benchmark (about 6 minutes of load) runs on its own: `make bench-fleet`.
bench: testenv
	$(CARGO) build --release -p saleslayer-operator -p saleslayer-sidecar
	$(CARGO) bench --bench allocation
	$(CARGO) bench --bench webhook
	$(CARGO) bench --bench quota
	$(CARGO) bench --bench sidecar
	$(CARGO) bench --bench convergence

## How the controller's cost grows: convergence at 10 000, 25 000 and 50 000
## pods (200, 500 and 1 000 integrations of 5 jobs × 10 pods).
bench-scale: testenv
	$(CARGO) build --release -p saleslayer-operator
	for n in 200 500 1000; do CONVERGENCE_INTEGRATIONS=$$n CONVERGENCE_CHANGES=40 $(CARGO) bench --bench convergence || exit 1; done

## 4 jobs × 3 pods sending flat out through their sidecars at the simulator:
## no coordination, a static split, and leases from the operator's quota API.
bench-fleet: testenv
	$(CARGO) bench --bench fleet

clean: demo-down
	$(CARGO) clean
