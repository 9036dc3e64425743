//! The configuration files of the node's parts, as text. Every path is
//! under the node's directory; every address is the node's own (inside its
//! network namespace) or loopback. The settings that mattered on this kind of
//! machine are in `../shared/REAL-NODE.md`; each is commented where set.

use std::fmt::Write as _;
use std::path::Path;

use crate::netns::{Layout, Link, POD_CIDR};

/// The node's name (each node has its own API server, so one name does).
pub const NODE_NAME: &str = "saleslayer-node";
/// The API server's port on the node's address.
pub(crate) const APISERVER_PORT: u16 = 6443;
/// CoreDNS' `ready` endpoint on the node's address.
pub(crate) const DNS_READY_PORT: u16 = 8181;
/// kube-proxy's health endpoint on the node's address (200 once synced).
pub(crate) const PROXY_HEALTH_PORT: u16 = 10256;

/// containerd 2.x: state, root, sockets and temporary files under the
/// node's directory; the CRI plugin with runc on cgroupfs and the node's CNI
/// folders; plugins that would read or write elsewhere switched off.
pub(crate) fn containerd(layout: &Layout, sandbox_image: &str) -> String {
    let dir = layout.dir.display();
    format!(
        r#"version = 3
root = '{dir}/containerd/root'
state = '{dir}/containerd/state'
temp = '{dir}/tmp'
imports = []
disabled_plugins = [
  'io.containerd.internal.v1.opt',
  'io.containerd.nri.v1.nri',
  'io.containerd.snapshotter.v1.blockfile',
  'io.containerd.snapshotter.v1.erofs',
  'io.containerd.differ.v1.erofs',
  'io.containerd.mount-handler.v1.erofs',
  'io.containerd.snapshotter.v1.native',
  'io.containerd.image-verifier.v1.bindir',
]

[grpc]
  address = '{dir}/containerd/containerd.sock'
[ttrpc]
  address = '{dir}/containerd/containerd.sock.ttrpc'

[plugins.'io.containerd.shim.v1.manager']
  # Short, and under the node's directory (the default is /run/containerd/s).
  socket_dir = '{dir}/s'

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{sandbox_image}'

[plugins.'io.containerd.cri.v1.runtime']
  # Without it runc fails with "can't get final child's PID from pipe: EOF":
  # this machine refuses to lower oom_score_adj (no CAP_SYS_RESOURCE).
  restrict_oom_score_adj = true
  # Pod network namespaces are bind-mounted here, not under /run/netns.
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = []
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    SystemdCgroup = false
    Root = '{dir}/containerd/runc'
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['/usr/lib/cni']
    conf_dir = '{dir}/cni/net.d'

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
"#
    )
}

/// One bridge for every pod, addresses from POD_CIDR, the bridge as the
/// pods' gateway, no masquerading (nothing leaves the namespace anyway);
/// hairpin so a pod reaches itself through its Service.
pub(crate) fn cni(layout: &Layout) -> String {
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "{network}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{"subnet": "{POD_CIDR}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}],
        "dataDir": "{dir}/cni/ipam"
      }}
    }}
  ]
}}
"#,
        network = layout.netns,
        dir = layout.dir.display(),
    )
}

/// Paths the kubelet's configuration names.
pub(crate) struct KubeletFiles<'a> {
    pub(crate) ca: &'a Path,
    pub(crate) serving_cert: &'a Path,
    pub(crate) serving_key: &'a Path,
    pub(crate) resolv_conf: &'a Path,
}

/// The kubelet: cgroupfs under the node's own cgroup root, cgroup v1
/// allowed, swap tolerated, every folder under the node's directory, x509
/// and webhook authentication, eviction and image GC loose enough that a
/// busy disk never evicts the test's pods or deletes their images.
pub(crate) fn kubelet(layout: &Layout, link: &Link, files: &KubeletFiles<'_>) -> String {
    let dir = layout.dir.display();
    let mut text = String::new();
    let _ = write!(
        text,
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {node}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
tlsCertFile: {cert}
tlsPrivateKeyFile: {key}
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{dir}/containerd/containerd.sock
clusterDNS: [{node}]
clusterDomain: cluster.local
resolvConf: {resolv}
podLogsDir: {dir}/var/log/pods
volumePluginDir: {dir}/kubelet/volume-plugins
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 1Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
serializeImagePulls: false
rotateCertificates: false
"#,
        node = link.node,
        ca = files.ca.display(),
        cert = files.serving_cert.display(),
        key = files.serving_key.display(),
        cgroup = layout.cgroup,
        resolv = files.resolv_conf.display(),
    );
    text
}

/// kube-proxy in iptables mode inside the namespace. It leaves the host's
/// conntrack table size and timeouts alone (all zero: "do not set").
pub(crate) fn kube_proxy(kubeconfig: &Path) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
mode: iptables
clusterCIDR: {POD_CIDR}
healthzBindAddress: 0.0.0.0:{PROXY_HEALTH_PORT}
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kubeconfig = kubeconfig.display(),
    )
}

/// CoreDNS: `cluster.local` from the API server; every other name answers
/// NXDOMAIN here (the build has no forward plugin: no query leaves).
pub(crate) fn corefile(link: &Link, kubeconfig: &Path) -> String {
    format!(
        r#"cluster.local:53 {{
    errors
    ready {node}:{DNS_READY_PORT}
    kubernetes cluster.local {{
        kubeconfig {kubeconfig} testenv
        pods insecure
        ttl 5
    }}
    cache 5
    loadbalance
}}
.:53 {{
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"#,
        node = link.node,
        kubeconfig = kubeconfig.display(),
    )
}
