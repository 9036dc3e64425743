# The two commands a newcomer needs: `make demo` and `make test`.
# Everything else here is what those two are made of.

CARGO   ?= cargo
BIN     := target/testenv/bin
DEMO    := target/demo

.PHONY: all testenv build test unit integration lint crds demo demo-down bench bench-fleet clean

all: build

## Build kube-apiserver, etcd and helm from tests/testenv's pinned Go modules
## (only what is missing or whose go.sum changed).
testenv:
	tests/testenv/build.sh

build:
	$(CARGO) build --bins

## Unit, property, doc and integration tests; the integration tests start a
## real etcd + kube-apiserver per test.
test: testenv
	$(CARGO) test --no-fail-fast

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## Regenerate the committed CRD YAML from the Rust types (and the chart's copy).
crds: build
	target/debug/saleslayer-operator crd > crds/saleslayer.io_saleslayerintegrations.yaml
	cp crds/saleslayer.io_saleslayerintegrations.yaml charts/saleslayer-operator/crds/

## A local control plane with the operator and the example integration;
## `make demo-down` stops it.
demo: testenv build
	scripts/demo.sh

demo-down:
	@for part in operator simulator testenv; do \
	  if [ -f $(DEMO)/$$part.pid ]; then kill $$(cat $(DEMO)/$$part.pid) 2>/dev/null || true; rm -f $(DEMO)/$$part.pid; fi; \
	done; echo "demo: stopped"

## Benchmarks (not in CI; figures in BENCHMARKS.md): allocation in process, and
## the controller's convergence on the testenv with the release operator
## running as its own process, so its RSS is measured alone. The fleet
## benchmark (about 6 minutes of load) runs on its own: `make bench-fleet`.
bench: testenv
	$(CARGO) build --release --bin saleslayer-operator
	$(CARGO) bench --bench allocation
	$(CARGO) bench --bench webhook
	$(CARGO) bench --bench quota
	$(CARGO) bench --bench convergence

## 4 jobs × 3 pods sending flat out through their sidecars at the simulator:
## no coordination, a static split, and leases from the operator's quota API.
bench-fleet: testenv
	$(CARGO) bench --bench fleet

clean: demo-down
	$(CARGO) clean
