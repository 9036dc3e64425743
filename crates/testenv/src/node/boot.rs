//! The node's start: certificates, then each part in order — etcd and
//! kube-apiserver, the controllers, containerd (with the pause image), the
//! kubelet, kube-proxy and CoreDNS — each waited for before what needs it,
//! and a check that the host has what a node needs before anything starts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Node, config};
use crate::images::ImageArchive;
use crate::netns::{KUBERNETES_SERVICE_IP, SERVICE_CIDR};
use crate::pki::Authority;
use crate::{Error, bin_dir};

use config::NODE_NAME;

/// The testenv binaries a node needs (`make testenv-node`).
const BINARIES: [&str; 10] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "coredns",
];
/// Host tools, and the Debian package that brings each.
const TOOLS: [(&str, &str); 9] = [
    ("runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/usr/lib/cni/host-local", "containernetworking-plugins"),
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("setsid", "util-linux"),
];

impl Node {
    pub(super) async fn boot(&self, pause: &ImageArchive) -> Result<(), Error> {
        let dir = &self.layout.dir;
        let bin = bin_dir();
        let ca = Authority::generate(dir)?;
        let node_ip = IpAddr::V4(self.link.node);
        let serving = ca.serving(
            "apiserver",
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            &[
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                node_ip,
                IpAddr::V4(KUBERNETES_SERVICE_IP),
            ],
        )?;
        let admin = ca.client("admin", "testenv-admin", &["system:masters"])?;
        let kubelet_client = ca.client(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            &["system:masters"],
        )?;
        let sa = ca.service_account_key()?;
        let server = self.server();
        ca.kubeconfig(&self.kubeconfig, &server, &admin)?;
        let kubeconfig = |file: &str, user: &str, groups: &[&str]| -> Result<PathBuf, Error> {
            let pair = ca.client(&format!("{file}-client"), user, groups)?;
            let path = dir.join(format!("{file}.kubeconfig"));
            ca.kubeconfig(&path, &server, &pair)?;
            Ok(path)
        };

        self.spawn(
            "etcd",
            &bin,
            &[
                "--name=node".into(),
                format!("--data-dir={}", dir.join("etcd").display()),
                "--listen-client-urls=http://127.0.0.1:2379".into(),
                "--advertise-client-urls=http://127.0.0.1:2379".into(),
                "--listen-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-cluster=node=http://127.0.0.1:2380".into(),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        self.spawn(
            "kube-apiserver",
            &bin,
            &[
                "--etcd-servers=http://127.0.0.1:2379".into(),
                "--bind-address=0.0.0.0".into(),
                format!("--secure-port={}", config::APISERVER_PORT),
                format!("--advertise-address={}", self.link.node),
                format!("--cert-dir={}", dir.join("apiserver").display()),
                format!("--tls-cert-file={}", serving.cert.display()),
                format!("--tls-private-key-file={}", serving.key.display()),
                format!("--client-ca-file={}", ca.cert.display()),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", sa.cert.display()),
                format!("--service-account-signing-key-file={}", sa.key.display()),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                format!(
                    "--kubelet-client-certificate={}",
                    kubelet_client.cert.display()
                ),
                format!("--kubelet-client-key={}", kubelet_client.key.display()),
                format!("--kubelet-certificate-authority={}", ca.cert.display()),
                "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
                // Webhooks and aggregated APIs are called at their pods'
                // addresses, never through a ClusterIP.
                "--enable-aggregator-routing=true".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                "--v=0".into(),
            ],
        )?;
        let client = self.client().await?;
        self.wait("the API server's /readyz", || async {
            crate::readyz(&client).await
        })
        .await?;
        coredns_rbac(&client).await?;

        let controller_manager =
            kubeconfig("controller-manager", "system:kube-controller-manager", &[])?;
        self.spawn(
            "kube-controller-manager",
            &bin,
            &[
                format!("--kubeconfig={}", controller_manager.display()),
                format!(
                    "--authentication-kubeconfig={}",
                    controller_manager.display()
                ),
                format!(
                    "--authorization-kubeconfig={}",
                    controller_manager.display()
                ),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--use-service-account-credentials=true".into(),
                format!("--service-account-private-key-file={}", sa.key.display()),
                format!("--root-ca-file={}", ca.cert.display()),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--v=0".into(),
            ],
        )?;
        let scheduler = kubeconfig("scheduler", "system:kube-scheduler", &[])?;
        self.spawn(
            "kube-scheduler",
            &bin,
            &[
                format!("--kubeconfig={}", scheduler.display()),
                format!("--authentication-kubeconfig={}", scheduler.display()),
                format!("--authorization-kubeconfig={}", scheduler.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--v=0".into(),
            ],
        )?;

        let containerd_config = dir.join("containerd/config.toml");
        write(
            &containerd_config,
            &config::containerd(&self.layout, &pause.reference),
        )?;
        self.spawn(
            "containerd",
            &bin,
            &[format!("--config={}", containerd_config.display())],
        )?;
        self.wait("containerd's socket", || async {
            self.ctr()
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .await?;
        self.import_image(&pause.path())?;

        write(
            &dir.join("cni/net.d/10-saleslayer.conflist"),
            &config::cni(&self.layout),
        )?;
        let kubelet_serving = ca.serving(
            "kubelet",
            &[NODE_NAME, "localhost"],
            &[node_ip, IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )?;
        let resolv_conf = dir.join("kubelet/resolv.conf");
        write(
            &resolv_conf,
            "# The node has no upstream DNS: nothing leaves it.\n",
        )?;
        let kubelet_config = dir.join("kubelet/config.yaml");
        write(
            &kubelet_config,
            &config::kubelet(
                &self.layout,
                &self.link,
                &config::KubeletFiles {
                    ca: &ca.cert,
                    serving_cert: &kubelet_serving.cert,
                    serving_key: &kubelet_serving.key,
                    resolv_conf: &resolv_conf,
                },
            ),
        )?;
        let kubelet = kubeconfig(
            "kubelet",
            &format!("system:node:{NODE_NAME}"),
            &["system:nodes"],
        )?;
        self.spawn(
            "kubelet",
            &bin,
            &[
                format!("--config={}", kubelet_config.display()),
                format!("--kubeconfig={}", kubelet.display()),
                format!("--root-dir={}", dir.join("kubelet").display()),
                format!("--cert-dir={}", dir.join("kubelet/pki").display()),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={}", self.link.node),
                "--v=0".into(),
            ],
        )?;

        let proxy = kubeconfig("kube-proxy", "system:kube-proxy", &[])?;
        let proxy_config = dir.join("kube-proxy.yaml");
        write(&proxy_config, &config::kube_proxy(&proxy))?;
        self.spawn(
            "kube-proxy",
            &bin,
            &[format!("--config={}", proxy_config.display())],
        )?;

        let dns = kubeconfig("coredns", COREDNS_USER, &[])?;
        let corefile = dir.join("Corefile");
        write(&corefile, &config::corefile(&self.link, &dns))?;
        self.spawn("coredns", &bin, &[format!("-conf={}", corefile.display())])?;

        self.wait("the node to be Ready", || async {
            node_ready(&client).await
        })
        .await?;
        self.wait("the default ServiceAccount", || async {
            Api::<ServiceAccount>::namespaced(client.clone(), "default")
                .get_opt("default")
                .await
                .is_ok_and(|sa| sa.is_some())
        })
        .await?;
        let dns_ready = SocketAddr::from((self.link.node, config::DNS_READY_PORT));
        self.wait("CoreDNS to be ready", || http_ok(dns_ready, "/ready"))
            .await?;
        let proxy_health = SocketAddr::from((self.link.node, config::PROXY_HEALTH_PORT));
        self.wait("kube-proxy to sync", || http_ok(proxy_health, "/healthz"))
            .await?;
        Ok(())
    }
}

/// The user CoreDNS' client certificate names.
const COREDNS_USER: &str = "system:coredns";

/// What CoreDNS' kubernetes plugin reads, for its own user.
async fn coredns_rbac(client: &Client) -> Result<(), Error> {
    let name = "saleslayer-testenv:coredns";
    let rule = |groups: &[&str], resources: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: vec!["list".into(), "watch".into()],
        ..PolicyRule::default()
    };
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![
            rule(&[""], &["endpoints", "services", "pods", "namespaces"]),
            rule(&["discovery.k8s.io"], &["endpointslices"]),
        ]),
        ..ClusterRole::default()
    };
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: name.into(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: COREDNS_USER.into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Subject::default()
        }]),
    };
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

async fn node_ready(client: &Client) -> bool {
    let Ok(Some(node)) = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .get_opt(NODE_NAME)
        .await
    else {
        return false;
    };
    node.status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Whether a plain HTTP GET of `path` at `address` answers 200.
async fn http_ok(address: SocketAddr, path: &str) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        let status = String::from_utf8_lossy(&answer);
        Some(status.starts_with("HTTP/1.0 200") || status.starts_with("HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, text)?;
    Ok(())
}

/// Root, the node's binaries, and the host tools, each with how to get it.
pub(super) fn preflight() -> Result<(), Error> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0");
    if !root {
        return Err(Error::Setup(
            "a node needs root (namespaces, cgroups, mounts): run the e2e tests as root".into(),
        ));
    }
    let bin = bin_dir();
    for name in BINARIES {
        if !bin.join(name).is_file() {
            return Err(Error::MissingNodeBinary(name, bin));
        }
    }
    for (tool, package) in TOOLS {
        let found = if tool.starts_with('/') {
            Path::new(tool).is_file()
        } else {
            std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path)
                    .chain(["/usr/sbin".into(), "/sbin".into()])
                    .any(|dir| dir.join(tool).is_file())
            })
        };
        if !found {
            return Err(Error::MissingTool(tool, package));
        }
    }
    Ok(())
}
