//! The node mode: a whole one-node cluster — etcd, kube-apiserver (Node and
//! RBAC authorisation, aggregator routing), kube-controller-manager,
//! kube-scheduler, containerd with runc and the CNI bridge, the kubelet,
//! kube-proxy (iptables) and CoreDNS — for `make e2e` and `make demo`.
//!
//! Every part runs inside the node's own network and mount namespaces
//! (`netns.rs`) and cgroup; the host reaches the API server on the node's
//! address over a veth /30, and nothing inside can reach beyond it. A
//! janitor (`janitor.rs`) started before anything else removes it all when
//! the [`Node`] is dropped or this process dies, however it dies.
//!
//! Starting takes about 10 s once the binaries (`make testenv-node`) and the
//! images (`make image`: the pause image is the node's sandbox) are built.

mod boot;
mod config;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::images;
use crate::janitor::Janitor;
use crate::netns::{Layout, Link};
use crate::process::{Component, log_tail};
use crate::{Error, bin_dir, client_for, helm_command, kubectl_command};

pub use config::NODE_NAME;

/// How long the node may take to become Ready once its parts run.
const NODE_DEADLINE: Duration = Duration::from_secs(120);
/// A running one-node cluster; dropping it removes everything it made.
pub struct Node {
    components: Mutex<Vec<Component>>,
    // Dropped after `components` are reaped in `Drop`; see there.
    janitor: Janitor,
    layout: Layout,
    link: Link,
    kubeconfig: PathBuf,
    started_in: Duration,
}

impl Node {
    /// Start a node and wait until it is Ready, its DNS answers and
    /// kube-proxy has synced.
    pub async fn start() -> Result<Self, Error> {
        let begun = Instant::now();
        boot::preflight()?;
        let pause = images::image("pause")?;
        let base = std::env::temp_dir();
        if base.starts_with("/var") || base.starts_with("/run") {
            return Err(Error::Setup(format!(
                "the node's directory cannot live under {} (the node mounts its own /var and /run): set TMPDIR",
                base.display()
            )));
        }
        let dir = tempfile::Builder::new()
            .prefix("saleslayer-node-")
            .rand_bytes(6)
            .tempdir_in(&base)?
            .keep();
        let layout = Layout::new(&dir)?;
        // From here on, whatever happens, the janitor removes what was made.
        let janitor = Janitor::spawn(&layout)?;
        let seed = layout
            .netns
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let link = Link::choose(seed)?;
        link.set_up(&layout)?;
        let mut node = Self {
            components: Mutex::new(Vec::new()),
            janitor,
            kubeconfig: layout.dir.join("admin.kubeconfig"),
            layout,
            link,
            started_in: Duration::ZERO,
        };
        node.boot(&pause).await?;
        node.started_in = begun.elapsed();
        Ok(node)
    }

    /// Start one of the node's binaries (from `bin`) inside the node.
    fn spawn(&self, name: &'static str, bin: &Path, args: &[String]) -> Result<(), Error> {
        let path = format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            bin.display()
        );
        let component = Component::spawn(&self.layout, name, &bin.join(name), args, &path)?;
        self.lock().push(component);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Component>> {
        self.components
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fail when one of the node's processes has exited (with its log).
    pub fn check(&self) -> Result<(), Error> {
        self.lock().iter_mut().try_for_each(Component::check)
    }

    /// Poll `ready` until it holds, failing early when a part exits.
    async fn wait<F, Fut>(&self, what: &str, mut ready: F) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + NODE_DEADLINE;
        loop {
            self.check()?;
            if ready().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs = self
                    .lock()
                    .iter()
                    .map(|c| format!("--- {}:\n{}", c.name, log_tail(&c.log, 8)))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(Error::NodeNotReady(what.to_owned(), NODE_DEADLINE, logs));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client with the admin identity (`system:masters`).
    pub async fn client(&self) -> Result<Client, Error> {
        client_for(&self.kubeconfig).await
    }

    /// Path of a kubeconfig with the admin identity, for `kubectl` and `helm`
    /// on the host.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL, on the node's address.
    pub fn server(&self) -> String {
        format!("https://{}:{}", self.link.node, config::APISERVER_PORT)
    }

    /// The node's address (its InternalIP, inside its network namespace).
    pub fn node_ip(&self) -> Ipv4Addr {
        self.link.node
    }

    /// The host's end of the link to the node.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.link.host
    }

    /// The node's network namespace (`ip -n <name> ...`).
    pub fn netns(&self) -> &str {
        &self.layout.netns
    }

    /// The directory with all of the node's files (removed with it).
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// The cgroup the node's processes and pods live in, in every hierarchy.
    pub fn cgroup(&self) -> &str {
        &self.layout.cgroup
    }

    /// The log of one of the node's parts (`kubelet`, `containerd`, ...).
    pub fn log(&self, part: &str) -> PathBuf {
        self.layout.dir.join("logs").join(format!("{part}.log"))
    }

    /// The janitor's process id (it outlives this process when killed).
    pub fn janitor_pid(&self) -> u32 {
        self.janitor.pid()
    }

    /// Time from the call to `start` until the node was Ready.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// `program` run inside the node's network and mount namespaces.
    pub fn enter(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.layout.enter(program)
    }

    /// A `kubectl` command aimed at this node (`KUBECTL` overrides the binary).
    pub fn kubectl(&self) -> Command {
        kubectl_command(&self.kubeconfig)
    }

    /// A `helm` command (the testenv's build) aimed at this node.
    pub fn helm(&self) -> Command {
        helm_command(&self.kubeconfig, &self.layout.dir.join("helm"))
    }

    /// `ctr` against the node's containerd, in the namespace Kubernetes uses.
    pub fn ctr(&self) -> Command {
        let mut command = self.layout.enter(bin_dir().join("ctr"));
        command
            .arg(format!(
                "--address={}",
                self.layout.dir.join("containerd/containerd.sock").display()
            ))
            .args(["--namespace", "k8s.io"]);
        command
    }

    /// Import a docker-archive (or OCI) tarball into the node's containerd;
    /// the time it took.
    pub fn import_image(&self, archive: &Path) -> Result<Duration, Error> {
        let begun = Instant::now();
        let output = self
            .ctr()
            .args(["images", "import"])
            .arg(archive)
            .output()
            .map_err(|e| Error::Tool("ctr", e))?;
        if !output.status.success() {
            return Err(Error::Setup(format!(
                "ctr images import {} failed: {}",
                archive.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(begun.elapsed())
    }

    /// Import the image `make image` built as `name` (`operator`,
    /// `workload`); its reference, for pods with `imagePullPolicy: Never`.
    pub fn import(&self, name: &str) -> Result<String, Error> {
        let image = images::image(name)?;
        self.import_image(&image.path())?;
        Ok(image.reference)
    }

    /// Create a namespace and wait for what the controller manager puts in
    /// it (the `default` ServiceAccount, the `kube-root-ca.crt` ConfigMap).
    pub async fn namespace(&self, client: &Client, name: &str) -> Result<(), Error> {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        self.wait("the namespace's default ServiceAccount", || async {
            let account = Api::<ServiceAccount>::namespaced(client.clone(), name)
                .get_opt("default")
                .await;
            let ca = Api::<ConfigMap>::namespaced(client.clone(), name)
                .get_opt("kube-root-ca.crt")
                .await;
            matches!((account, ca), (Ok(Some(_)), Ok(Some(_))))
        })
        .await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The janitor stops every process in order, then removes the rest;
        // the children it killed are reaped here so none stays a zombie.
        self.janitor.finish();
        for component in self.lock().iter_mut() {
            component.reap();
        }
    }
}
