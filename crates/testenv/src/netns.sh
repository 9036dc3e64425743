# Makes the node's namespaces (see netns.rs). The janitor is already running
# when this starts, so whatever it made is removed even if it fails halfway.
#
#   - a private mount namespace, bound to DIR/ns/mnt: every mount the node
#     makes (pod volumes, container root filesystems, pod network namespaces)
#     lives and dies there, never in the host's mount table. Inside it /run
#     and /var are the node's own folders (the kubelet writes
#     /var/log/containers, the CNI plugins /var/lib/cni, iptables
#     /run/xtables.lock), /sys is the sysfs of the node's network namespace
#     (with the host's cgroup mounts kept), and the kernel tunables the
#     kubelet insists on read as it wants them, so it never writes the host's
#     (vm.overcommit_memory, kernel.panic, ...: not namespaced);
#   - a network namespace NETNS with lo and one veth pair to the host
#     (HOST_ADDR on the host's end, NODE_ADDR inside, one /30, no default
#     route): nothing inside can reach any address beyond that link;
#     ip_forward is set inside only. What pods send (in on the CNI bridge
#     cni0) to anything but a pod (a Service's DNAT comes first) or the node
#     itself (the local table comes first) is routed to `void`, one end of a
#     veth pair whose other end is inside the namespace too, and refused on
#     its way there (TCP reset, else ICMP prohibited): a pod's connect to an
#     unrouted address fails at once (an ICMP unreachable would reach it
#     while connect() still holds the socket, and TCP would retry it for
#     seconds), and no pod reaches the host's end of the link, whose answers
#     would take the host's default route. Were the refusal missing, such a
#     packet would only ever reach `void-end`, inside the namespace;
#   - cgroup CGROUP in every hierarchy (the kubelet's cgroupRoot), and
#     CGROUP/node in the pids hierarchy for the node's own processes.
#
# Arguments: DIR NETNS HOST_VETH HOST_ADDR NODE_ADDR CGROUP POD_CIDR
set -eu
dir=$1 netns=$2 veth=$3 host_addr=$4 node_addr=$5 cgroup=$6 pods=$7
fail() { echo "testenv: $*" >&2; exit 1; }

mkdir -p "$dir/ns" "$dir/run" "$dir/var/lib" "$dir/var/log" "$dir/pids" "$dir/sysctl"
ln -sfn ../run "$dir/var/run"

# A persistent mount namespace needs its binding on a private mount.
mount --bind "$dir/ns" "$dir/ns" || fail "cannot bind-mount $dir/ns (are you root?)"
mount --make-private "$dir/ns"
touch "$dir/ns/mnt"
unshare --mount="$dir/ns/mnt" --propagation private true \
  || fail "unshare cannot make a mount namespace"

ip netns add "$netns" || fail "ip netns add $netns failed"
ip link add "$veth" type veth peer name eth0 netns "$netns" \
  || fail "cannot make the veth pair $veth (is the veth module available?)"
ip addr add "$host_addr" dev "$veth"
ip link set "$veth" up
ip -n "$netns" link set lo up
ip -n "$netns" addr add "$node_addr" dev eth0
ip -n "$netns" link set eth0 up
ip -n "$netns" link add void type veth peer name void-end
ip -n "$netns" link set void up
ip -n "$netns" link set void-end up
ip -n "$netns" route add default dev void table 100
ip -n "$netns" rule add pref 100 iif cni0 to "$pods" lookup main
ip -n "$netns" rule add pref 101 iif cni0 lookup 100

for hierarchy in $(awk '$9 == "cgroup" || $9 == "cgroup2" { print $5 }' /proc/self/mountinfo); do
  mkdir -p "$hierarchy/$cgroup"
  if [ -f "$hierarchy/cpuset.cpus" ] && [ -f "$hierarchy/$cgroup/cpuset.cpus" ]; then
    cat "$hierarchy/cpuset.cpus" > "$hierarchy/$cgroup/cpuset.cpus"
    cat "$hierarchy/cpuset.mems" > "$hierarchy/$cgroup/cpuset.mems"
  fi
done
[ -d "/sys/fs/cgroup/pids/$cgroup" ] || fail "no cgroup v1 pids hierarchy at /sys/fs/cgroup/pids"
mkdir -p "/sys/fs/cgroup/pids/$cgroup/node"

# What the kubelet checks (pkg/kubelet/cm setupKernelTunables) and sets when
# it differs: the node sees these values; the host keeps its own.
tunables="vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1
kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000"

nsenter --net="/run/netns/$netns" --mount="$dir/ns/mnt" sh -eu -c '
  dir=$1 tunables=$2
  echo 1 > /proc/sys/net/ipv4/ip_forward
  if [ -f /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
    echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables
  fi
  mkdir -p "$dir/ns/cgroup"
  mount --rbind /sys/fs/cgroup "$dir/ns/cgroup"
  mount -t sysfs sysfs /sys
  mount --move "$dir/ns/cgroup" /sys/fs/cgroup
  mount --bind "$dir/run" /run
  mount --bind "$dir/var" /var
  for tunable in $tunables; do
    key=${tunable%%=*} value=${tunable#*=}
    if [ "$(cat "/proc/sys/$key")" != "$value" ]; then
      file="$dir/sysctl/$(echo "$key" | tr / .)"
      echo "$value" > "$file"
      mount --bind "$file" "/proc/sys/$key"
    fi
  done
  iptables -w -I FORWARD 1 -i cni0 -o void -p tcp -j REJECT --reject-with tcp-reset
  iptables -w -I FORWARD 2 -i cni0 -o void -j REJECT --reject-with icmp-admin-prohibited
 ' sh "$dir" "$tunables" || fail "preparing the node's namespaces failed"
