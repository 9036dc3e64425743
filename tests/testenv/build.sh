#!/usr/bin/env bash
# Builds the test cluster's parts from the pinned Go modules in this directory
# into target/testenv/bin:
#   build.sh control-plane   etcd, kube-apiserver, helm, promtool (make test)
#   build.sh node            the above, plus kubelet, kube-controller-manager,
#                            kube-scheduler, kube-proxy, containerd, its runc
#                            shim, ctr and CoreDNS (make e2e, make demo)
# A binary is rebuilt only when the go.mod/go.sum it comes from changed;
# finished builds are also kept in a per-user cache keyed by that hash, so a
# fresh clone on the same machine does not build them again.
set -euo pipefail

level="${1:-control-plane}"
case "$level" in control-plane|node) ;; *) echo "usage: $0 [control-plane|node]" >&2; exit 2 ;; esac
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${TESTENV_BIN:-$root/target/testenv/bin}"
cache="${TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/saleslayer-operator/testenv}"
mkdir -p "$bin" "$cache"

export CGO_ENABLED=0
export GOFLAGS=-mod=mod

# Version of a module as pinned in a go.mod.
pinned() { awk -v m="$2" '$1 == m { print $2; exit }' "$1/go.mod"; }

kube_version="$(pinned "$here/apiserver" k8s.io/kubernetes)"
helm_version="$(pinned "$here/helm" helm.sh/helm/v3)"
kube_minor="$(echo "$kube_version" | cut -d. -f2)"

# build NAME MODULE_DIR PACKAGE LDFLAGS
build() {
  local name="$1" dir="$2" pkg="$3" ldflags="$4"
  local key
  key="$( (cat "$dir"/go.mod "$dir"/go.sum "$dir"/*.go 2>/dev/null; echo "$pkg $ldflags $GOFLAGS") | sha256sum | cut -c1-16)"
  if [[ -x "$bin/$name" && "$(cat "$bin/.$name.key" 2>/dev/null)" == "$key" ]]; then
    echo "testenv: $name is up to date"
    return
  fi
  if [[ -x "$cache/$key/$name" ]]; then
    echo "testenv: $name from the cache ($cache/$key)"
  else
    echo "testenv: building $name ($pkg); the first build takes minutes"
    local start=$SECONDS
    mkdir -p "$cache/$key"
    (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$cache/$key/$name.tmp" "$pkg")
    mv "$cache/$key/$name.tmp" "$cache/$key/$name"
    echo "testenv: built $name in $((SECONDS - start)) s"
  fi
  cp "$cache/$key/$name" "$bin/$name.tmp" && mv "$bin/$name.tmp" "$bin/$name"
  echo "$key" > "$bin/.$name.key"
}

v=k8s.io/component-base/version
cv=k8s.io/client-go/pkg/version
kube_ldflags="-s -w"
for p in $v $cv; do
  kube_ldflags+=" -X $p.gitVersion=$kube_version -X $p.gitMajor=1 -X $p.gitMinor=$kube_minor"
  kube_ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

build etcd "$here/etcd" . "-s -w"
build kube-apiserver "$here/apiserver" k8s.io/kubernetes/cmd/kube-apiserver "$kube_ldflags"
build helm "$here/helm" helm.sh/helm/v3/cmd/helm \
  "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
prom_version="$(pinned "$here/promtool" github.com/prometheus/prometheus)"
build promtool "$here/promtool" github.com/prometheus/prometheus/cmd/promtool \
  "-s -w -X github.com/prometheus/common/version.Version=$prom_version"

[[ "$level" == node ]] || exit 0

for cmd in kubelet kube-controller-manager kube-scheduler kube-proxy; do
  build "$cmd" "$here/node" "k8s.io/kubernetes/cmd/$cmd" "$kube_ldflags"
done
containerd_version="$(pinned "$here/containerd" github.com/containerd/containerd/v2)"
ctrd_ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=$containerd_version"
for cmd in containerd containerd-shim-runc-v2 ctr; do
  GOFLAGS="$GOFLAGS -tags=no_btrfs,no_devmapper,no_zfs" \
    build "$cmd" "$here/containerd" "github.com/containerd/containerd/v2/cmd/$cmd" "$ctrd_ldflags"
done
build coredns "$here/coredns" . "-s -w"
build pause "$here/pause" . "-s -w"
