#!/usr/bin/env bash
# `make demo`: a local control plane, the operator (controller, webhook,
# quota API, /metrics), the Sales Layer stand-in (`simulate`) and the example
# integration with its pods; then the quota status as kubectl shows it.
# `make demo-down` stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
demo=target/demo
mkdir -p "$demo"
export KUBECONFIG="$PWD/$demo/kubeconfig"

running() { [[ -f "$demo/$1.pid" ]] && kill -0 "$(cat "$demo/$1.pid")" 2>/dev/null; }

if running testenv; then
  echo "demo: already running (make demo-down stops it)"
  exit 0
fi
rm -f "$demo/kubeconfig"
nohup target/debug/saleslayer-testenv "$demo/kubeconfig" > "$demo/testenv.log" 2>&1 &
echo $! > "$demo/testenv.pid"
for _ in $(seq 1 600); do
  [[ -f "$demo/kubeconfig" ]] && break
  running testenv || { cat "$demo/testenv.log"; exit 1; }
  sleep 0.1
done
cat "$demo/testenv.log"

kubectl create namespace saleslayer-system > /dev/null
kubectl apply -f crds/ > /dev/null
kubectl wait --for=condition=Established --timeout=60s crd/saleslayerintegrations.saleslayer.io > /dev/null

# The Sales Layer stand-in: 50 requests per 10 s per X-API-KEY, 429 beyond.
nohup target/debug/saleslayer-operator simulate --bind 127.0.0.1:18090 \
  --requests 50 --period-seconds 10 > "$demo/simulator.log" 2>&1 &
echo $! > "$demo/simulator.pid"

nohup target/debug/saleslayer-operator run --kubeconfig "$KUBECONFIG" \
  --namespace saleslayer-system \
  --proxy-upstream http://127.0.0.1:18090 \
  --webhook-bind 127.0.0.1:19443 --webhook-url https://127.0.0.1:19443/mutate \
  --quota-bind 127.0.0.1:18443 --metrics-bind 127.0.0.1:18080 \
  > "$demo/operator.log" 2>&1 &
echo $! > "$demo/operator.pid"
for _ in $(seq 1 300); do
  kubectl get mutatingwebhookconfiguration saleslayer-operator > /dev/null 2>&1 && break
  running operator || { cat "$demo/operator.log"; exit 1; }
  sleep 0.1
done

kubectl apply -f examples/catalog.yaml
kubectl -n shop wait --for=condition=Ready --timeout=60s sli/catalog > /dev/null
kubectl apply -f examples/pods.yaml
kubectl -n shop wait --for=jsonpath='{.status.summary.pods}'=4 --timeout=60s sli/catalog > /dev/null

echo
echo '$ kubectl -n shop get sli'
kubectl -n shop get sli
echo
echo '$ kubectl -n shop describe sli catalog'
kubectl -n shop describe sli catalog
echo
echo '$ kubectl -n shop get pod product-import-0 -o jsonpath=...   (the env the webhook injected)'
kubectl -n shop get pod product-import-0 \
  -o jsonpath='{range .spec.containers[0].env[*]}{.name}={.value}{"\n"}{end}'
for _ in $(seq 1 100); do
  curl -sf localhost:18090/stats > /dev/null && break
  running simulator || { cat "$demo/simulator.log"; exit 1; }
  sleep 0.1
done
echo
echo '$ curl -s -H "X-API-KEY: acme-prod" "localhost:18090/products?page=1&pageSize=2"   (the Sales Layer stand-in)'
curl -s -H "X-API-KEY: acme-prod" "localhost:18090/products?page=1&pageSize=2"
echo
echo
echo "Logs: $demo/operator.log, $demo/simulator.log; metrics: curl -s localhost:18080/metrics | grep saleslayer_"
echo "Running. Reach it with: export KUBECONFIG=$KUBECONFIG; kubectl get sli -A   Stop it with: make demo-down"
