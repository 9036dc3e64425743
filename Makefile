# The two commands a newcomer needs: `make demo` and `make test`.
# Everything else here is what those two are made of.

CARGO   ?= cargo
BIN     := target/testenv/bin
DEMO    := target/demo

.PHONY: all testenv build test unit integration lint crds demo demo-down bench clean

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

## Regenerate the committed CRD YAML from the Rust types.
crds: build
	target/debug/saleslayer-operator crd > crds/saleslayer.io_saleslayerintegrations.yaml

## A local control plane you can reach with kubectl; `make demo-down` stops it.
demo: testenv build
	@mkdir -p $(DEMO)
	@if [ -f $(DEMO)/testenv.pid ] && kill -0 $$(cat $(DEMO)/testenv.pid) 2>/dev/null; then \
	  echo "demo: already running (make demo-down stops it)"; exit 0; fi; \
	rm -f $(DEMO)/kubeconfig; \
	nohup target/debug/saleslayer-testenv $(DEMO)/kubeconfig > $(DEMO)/testenv.log 2>&1 & echo $$! > $(DEMO)/testenv.pid; \
	for i in $$(seq 1 600); do [ -f $(DEMO)/kubeconfig ] && break; \
	  kill -0 $$(cat $(DEMO)/testenv.pid) 2>/dev/null || { cat $(DEMO)/testenv.log; exit 1; }; sleep 0.1; done; \
	cat $(DEMO)/testenv.log; \
	KUBECONFIG=$(DEMO)/kubeconfig kubectl get namespaces; \
	echo; echo "Reach it with:  export KUBECONFIG=$(CURDIR)/$(DEMO)/kubeconfig; kubectl get all -A"; \
	echo "Stop it with:   make demo-down"

demo-down:
	@if [ -f $(DEMO)/testenv.pid ]; then kill $$(cat $(DEMO)/testenv.pid) 2>/dev/null || true; rm -f $(DEMO)/testenv.pid; echo "demo: stopped"; \
	else echo "demo: not running"; fi

clean: demo-down
	$(CARGO) clean
