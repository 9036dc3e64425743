# The node's janitor (see janitor.rs). Started detached (setsid) before the
# node exists; its stdin is a pipe that only the test process holds. When that
# pipe closes (the node is dropped, the test panicked, exited or was killed),
# it removes everything the node made, in this order:
#   1. the kubelet and the controllers, so nothing starts pods again;
#   2. the pods (every process under the kubelet's cgroup root);
#   3. every other process of the node: containerd, its shims, kube-proxy,
#      CoreDNS, kube-apiserver, etcd;
#   4. the mounts: the node's private mount namespace (with every pod volume,
#      rootfs and pod network namespace mounted inside it) goes away with its
#      last process and its binding;
#   5. the network: the node's network namespace, with the CNI bridge and the
#      host end of the veth pair;
#   6. the cgroups the node made, in every hierarchy;
#   7. the node's directory.
# It touches nothing it did not create: every path below is derived from the
# node's own name and directory.
#
# Arguments: DIR NETNS HOST_VETH CGROUP
set -u
dir=$1 netns=$2 veth=$3 cgroup=$4
case "$dir" in
  /*/saleslayer-node-*) ;;
  *) echo "testenv janitor: refusing to clean $dir, which is not a node's directory" >&2; exit 2 ;;
esac
# Wait for the pipe to close; whatever is read is ignored.
cat > /dev/null
started=$(date +%s)

pids_root=/sys/fs/cgroup/pids/$cgroup

# Kill every process listed in the cgroup.procs files under $1 until none is
# left (processes that fork meanwhile are caught on the next round).
kill_cgroup() {
  for _ in $(seq 1 100); do
    [ -d "$1" ] || return 0
    procs=$(find "$1" -name cgroup.procs -exec cat {} + 2>/dev/null)
    [ -z "$procs" ] && return 0
    # shellcheck disable=SC2086
    kill -9 $procs 2>/dev/null
    sleep 0.05
  done
  echo "testenv janitor: processes still in $1: $procs" >&2
}

for name in kubelet kube-controller-manager kube-scheduler; do
  if [ -f "$dir/pids/$name" ]; then
    kill -9 "$(cat "$dir/pids/$name")" 2>/dev/null
  fi
done
kill_cgroup "$pids_root/kubepods"
kill_cgroup "$pids_root"

# The mount namespace and its private bind; anything else mounted under the
# node's directory in this namespace (there should be nothing) goes too.
for _ in 1 2 3; do
  mounts=$(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
  [ -z "$mounts" ] && break
  for m in $mounts; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
done

if [ -e "/run/netns/$netns" ]; then
  ip netns delete "$netns" 2>/dev/null || umount -l "/run/netns/$netns" 2>/dev/null
  rm -f "/run/netns/$netns"
fi
ip link delete "$veth" 2>/dev/null
# `ip netns add` made /run/netns a mount point; leave it as found when empty.
if [ -d /run/netns ] && [ -z "$(ls -A /run/netns 2>/dev/null)" ]; then
  umount /run/netns 2>/dev/null && rmdir /run/netns 2>/dev/null
fi

for _ in $(seq 1 50); do
  left=""
  for hierarchy in $(awk '$9 == "cgroup" || $9 == "cgroup2" { print $5 }' /proc/self/mountinfo); do
    if [ -d "$hierarchy/$cgroup" ]; then
      find "$hierarchy/$cgroup" -depth -type d -exec rmdir {} \; 2>/dev/null
      [ -d "$hierarchy/$cgroup" ] && left="$left $hierarchy/$cgroup"
    fi
  done
  [ -z "$left" ] && break
  sleep 0.1
done
[ -n "$left" ] && echo "testenv janitor: cgroups left:$left" >&2

if [ -n "${SALESLAYER_NODE_LOGS:-}" ] && [ -d "$dir/logs" ]; then
  mkdir -p "$SALESLAYER_NODE_LOGS/$netns" && cp -r "$dir/logs/." "$SALESLAYER_NODE_LOGS/$netns/"
fi
rm -rf "$dir"
if [ -n "${TESTENV_JANITOR_VERBOSE:-}" ]; then
  echo "testenv janitor: node $netns cleaned up in $(($(date +%s) - started)) s" >&2
fi
