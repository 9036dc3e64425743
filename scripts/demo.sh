#!/usr/bin/env bash
# `make demo`: a real node (saleslayer-testenv node: kubelet, containerd,
# kube-proxy, CoreDNS in a network namespace of their own, nothing leaves the
# machine), the operator installed by its Helm chart from its own image, the
# Sales Layer stand-in as a pod behind a Service, the example integration and
# its workloads, whose sidecars pace their requests. Then what it looks like.
# `kubectl port-forward` (on the host, through the API server and the
# kubelet) puts the stand-in on localhost:18090 and the operator's /metrics
# on localhost:18080.
#   scripts/demo.sh up     (make demo)
#   scripts/demo.sh adapt  (make demo-adapt): Sales Layer lowers the
#                          account's limit; the budget adapts, then recovers
#   scripts/demo.sh down   (make demo-down): stops the forwards and the node;
#                          its janitor removes every process, mount,
#                          namespace and cgroup it made
set -euo pipefail
cd "$(dirname "$0")/.."
demo=target/demo
target=${CARGO_TARGET_DIR:-target}
bin=${TESTENV_BIN:-target/testenv/bin}
images=${SALESLAYER_IMAGES:-$target/images}
mkdir -p "$demo"
export KUBECONFIG="$PWD/$demo/kubeconfig"
export HELM_CACHE_HOME="$PWD/$demo/helm/cache" HELM_CONFIG_HOME="$PWD/$demo/helm/config" HELM_DATA_HOME="$PWD/$demo/helm/data"

running() { [[ -f "$demo/$1.pid" ]] && kill -0 "$(cat "$demo/$1.pid")" 2>/dev/null; }
show() { echo; echo "\$ $*"; "$@"; }
reference() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["reference"])' "$images/images.json" "$1"; }

down() {
  for forward in simulator metrics; do
    if running "$forward"; then kill "$(cat "$demo/$forward.pid")"; fi
    rm -f "$demo/$forward.pid"
  done
  if running node; then
    pid=$(cat "$demo/node.pid")
    kill -TERM "$pid"
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "demo: the node (pid $pid) did not stop within 60 s; $demo/node.log says:" >&2
      tail -5 "$demo/node.log" >&2
      exit 1
    fi
  fi
  rm -f "$demo/node.pid" "$demo/kubeconfig"
  echo "demo: stopped and removed"
}

up() {
  if running node; then
    echo "demo: already running (make demo-down stops it); KUBECONFIG=$KUBECONFIG"
    exit 0
  fi
  rm -f "$demo/kubeconfig"
  local operator workload
  operator=$(reference operator)
  workload=$(reference workload)
  nohup "$target/debug/saleslayer-testenv" node "$demo/kubeconfig" --image operator --image workload \
    > "$demo/node.log" 2>&1 &
  echo $! > "$demo/node.pid"
  for _ in $(seq 1 1200); do
    [[ -f "$demo/kubeconfig" ]] && break
    running node || { cat "$demo/node.log"; exit 1; }
    sleep 0.1
  done
  cat "$demo/node.log"

  # The operator as users install it; the image is the local one, never
  # pulled, and the sidecars' Sales Layer API is the stand-in's Service.
  "$bin/helm" install saleslayer-operator charts/saleslayer-operator \
    -n saleslayer-system --create-namespace \
    --set image.repository="${operator%:*}" --set image.tag="${operator##*:}" \
    --set image.pullPolicy=Never \
    --set proxy.upstream=http://simulator.saleslayer-simulator.svc.cluster.local:8090 \
    --wait --timeout 5m > /dev/null
  sed "s|localhost/saleslayer-operator:[^ ]*|$operator|" examples/simulator.yaml | kubectl apply -f - > /dev/null
  kubectl -n saleslayer-simulator rollout status deployment/simulator --timeout=120s > /dev/null
  kubectl apply -f examples/account.yaml > /dev/null
  kubectl apply -f examples/catalog.yaml > /dev/null
  kubectl -n shop wait --for=condition=Ready --timeout=60s sli/catalog > /dev/null
  sed "s|localhost/saleslayer-workload:[^ ]*|$workload|" examples/workload.yaml | kubectl apply -f - > /dev/null
  for job in product-import price-sync stock-sync; do
    kubectl -n shop rollout status "deployment/$job" --timeout=120s > /dev/null
  done
  # The batch client as a Job (examples/catalog-sync-job.yaml). Its claim is
  # bound to a hostPath volume in target/demo owned by the pod's user: this
  # node has no provisioner.
  rm -rf "$demo/catalog-sync-state"
  install -d -o 65532 -g 65532 "$demo/catalog-sync-state"
  kubectl apply -f - > /dev/null <<EOF
apiVersion: v1
kind: PersistentVolume
metadata: {name: demo-catalog-sync-state}
spec:
  capacity: {storage: 16Mi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  claimRef: {namespace: shop, name: catalog-sync-state}
  hostPath: {path: $PWD/$demo/catalog-sync-state, type: Directory}
EOF
  sed -e "s|localhost/saleslayer-workload:[^ ]*|$workload|" \
      -e 's|^  accessModes: \[ReadWriteOnce\]$|  accessModes: [ReadWriteOnce]\n  storageClassName: ""\n  volumeName: demo-catalog-sync-state|' \
      examples/catalog-sync-job.yaml | kubectl apply -f - > /dev/null
  nohup kubectl -n saleslayer-simulator port-forward svc/simulator 18090:8090 \
    > "$demo/simulator-forward.log" 2>&1 &
  echo $! > "$demo/simulator.pid"
  nohup kubectl -n saleslayer-system port-forward svc/saleslayer-operator-metrics 18080:8080 \
    > "$demo/metrics-forward.log" 2>&1 &
  echo $! > "$demo/metrics.pid"
  # Let the sidecars serve two windows of the account's period.
  sleep 20

  show kubectl get pods -A -o wide
  show kubectl get sla
  show kubectl -n shop get sli
  pod=$(kubectl -n shop get pods -l app=product-import -o jsonpath='{.items[0].metadata.name}')
  show kubectl -n shop logs "$pod" -c sync --tail=6
  echo
  echo "\$ kubectl -n shop get pod $pod -o jsonpath='{range .spec.containers[0].env[*]}{.name}={.value}{\"\\n\"}{end}'"
  kubectl -n shop get pod "$pod" -o jsonpath='{range .spec.containers[0].env[*]}{.name}={.value}{"\n"}{end}'
  echo "\$ kubectl -n shop get pod $pod -o jsonpath='{.metadata.annotations.saleslayer\.io/limit}'"
  kubectl -n shop get pod "$pod" -o jsonpath='{.metadata.annotations.saleslayer\.io/limit}'
  echo
  echo
  echo "\$ kubectl get --raw /api/v1/namespaces/shop/pods/$pod:8788/proxy/metrics | grep -E '^saleslayer_proxy_(requests|grant|lease)'"
  kubectl get --raw "/api/v1/namespaces/shop/pods/$pod:8788/proxy/metrics" \
    | grep -E '^saleslayer_proxy_(requests_total|grant_requests|grant_period|grant_source|lease_renewals)'
  show curl -s localhost:18090/stats
  echo
  show kubectl -n shop get job catalog-sync
  show kubectl -n shop logs job/catalog-sync -c sync --tail=3
  echo
  echo
  echo "Running. Reach it with: export KUBECONFIG=$KUBECONFIG; kubectl get pods -A"
  echo "The stand-in is on localhost:18090, the operator's /metrics on localhost:18080."
  echo "Stop it with: make demo-down"
}

# `make demo-adapt`: Sales Layer lowers the account's limit from 50 to 35
# requests per 10 s (a vendor limit lower than the account says, one of the
# causes §3b lists), so the paced pods get throttled; the account's effective
# budget drops until the throttling stops. Then the limit is back at 50; the
# budget holds below what got through, then climbs back. (An evenly spread
# outside consumer of the stand-in, `/admin/consumers`, shows no adaptation
# here: at the 10 s period the paced pods keep their places in the window and
# the consumer gets the 429s, so nothing throttles the pods.)
adapt() {
  running node || { echo "demo: not running (make demo starts it)" >&2; exit 1; }
  limit() {
    echo "\$ curl -X PUT localhost:18090/admin/limit -d '{\"requests\": $1}'"
    curl -sf -X PUT -H 'Content-Type: application/json' \
      -d "{\"requests\": $1}" localhost:18090/admin/limit
    echo
  }
  show kubectl get sla acme-prod
  echo
  limit 35
  sleep 60
  show kubectl get sla acme-prod
  show kubectl get events -n shop --field-selector involvedObject.kind=SalesLayerIntegration \
    --sort-by=.lastTimestamp -o custom-columns=REASON:.reason,MESSAGE:.message
  show curl -s localhost:18090/stats
  echo
  echo
  limit 50
  sleep 60
  show kubectl get sla acme-prod
  echo
  echo "The budget holds below what got through for holdWindows (30 windows: 5 minutes"
  echo "here), then climbs 1 request per clean window: watch it with kubectl get sla -w."
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  adapt) adapt ;;
  *) echo "usage: $0 up|down|adapt" >&2; exit 2 ;;
esac
