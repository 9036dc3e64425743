#!/usr/bin/env bash
# The Debian packages a node needs (`make testenv-node`, `make e2e`,
# `make demo`), installed with apt when missing: runc and the CNI plugins run
# the pods, iptables and conntrack serve kube-proxy, iproute2 and util-linux
# make the node's namespaces, busybox-static is the examples' workload,
# python3 builds the images (scripts/image.py). Needs root to install.
set -euo pipefail

declare -A provides=(
  [runc]=/usr/sbin/runc
  [containernetworking-plugins]=/usr/lib/cni/bridge
  [iptables]=/usr/sbin/iptables
  [conntrack]=/usr/sbin/conntrack
  [iproute2]=/usr/sbin/ip
  [util-linux]=/usr/bin/nsenter
  [busybox-static]=/bin/busybox
  [ca-certificates]=/etc/ssl/certs/ca-certificates.crt
  [python3]=python3
)
missing=()
for package in "${!provides[@]}"; do
  path=${provides[$package]}
  if [[ $path == /* ]]; then [[ -e $path ]] && continue; else command -v "$path" >/dev/null && continue; fi
  missing+=("$package")
done
# Debian's busybox (dynamic) and busybox-static both give /bin/busybox; the
# image needs the static one.
if [[ -e /bin/busybox ]] && ldd /bin/busybox >/dev/null 2>&1; then
  missing+=(busybox-static)
fi
((${#missing[@]})) || exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "node-packages: missing ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "node-packages: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
