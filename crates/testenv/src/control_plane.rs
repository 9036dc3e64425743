//! The control-plane mode: etcd + kube-apiserver on free loopback ports, in
//! about 3 s, for `make test`. Pods are API objects that nothing runs.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tempfile::TempDir;

use crate::pki::Authority;
use crate::process::Guarded;
use crate::{Error, READY_DEADLINE, bin_dir, client_for, helm_command, kubectl_command};

/// How many times a start is tried again when a free port was taken meanwhile.
const START_ATTEMPTS: usize = 3;

/// A running etcd + kube-apiserver pair on loopback, removed on drop.
pub struct ControlPlane {
    // Field order matters: processes stop before the directory goes away.
    apiserver: Guarded,
    etcd: Guarded,
    dir: TempDir,
    server: String,
    started_in: Duration,
}

impl ControlPlane {
    /// Start a fresh control plane and wait until it serves requests.
    pub async fn start() -> Result<Self, Error> {
        let bin = bin_dir();
        for name in ["etcd", "kube-apiserver"] {
            if !bin.join(name).is_file() {
                return Err(Error::MissingBinary(name, bin));
            }
        }
        let mut attempt = 1;
        loop {
            match Self::start_once(&bin).await {
                // Another process may have taken one of the free ports we picked.
                Err(Error::Exited { .. }) if attempt < START_ATTEMPTS => attempt += 1,
                result => return result,
            }
        }
    }

    async fn start_once(bin: &Path) -> Result<Self, Error> {
        let begun = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("saleslayer-testenv-")
            .tempdir()?;
        let ca = Authority::generate(dir.path())?;
        let serving = ca.serving(
            "apiserver",
            &["localhost", "kubernetes.default.svc"],
            &[
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            ],
        )?;
        let admin = ca.client("admin", "testenv-admin", &["system:masters"])?;
        let sa = ca.service_account_key()?;
        let [etcd_client, etcd_peer, secure] = free_ports()?;

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let etcd = Guarded::spawn(
            "etcd",
            bin.join("etcd"),
            &[
                "--name=testenv".into(),
                format!("--data-dir={}", dir.path().join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=testenv={peer_url}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
            dir.path(),
        )?;

        let server = format!("https://127.0.0.1:{secure}");
        let apiserver = Guarded::spawn(
            "kube-apiserver",
            bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                // Loopback cannot be advertised through the kubernetes Service.
                "--endpoint-reconciler-type=none".into(),
                format!("--secure-port={secure}"),
                format!("--cert-dir={}", dir.path().join("apiserver").display()),
                format!("--tls-cert-file={}", serving.cert.display()),
                format!("--tls-private-key-file={}", serving.key.display()),
                format!("--client-ca-file={}", ca.cert.display()),
                format!("--service-account-issuer={server}"),
                format!("--service-account-key-file={}", sa.cert.display()),
                format!("--service-account-signing-key-file={}", sa.key.display()),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--authorization-mode=RBAC".into(),
                "--allow-privileged=true".into(),
                "--enable-priority-and-fairness=false".into(),
                "--profiling=false".into(),
                "--v=0".into(),
            ],
            dir.path(),
        )?;

        ca.kubeconfig(&dir.path().join("kubeconfig"), &server, &admin)?;
        let mut plane = Self {
            apiserver,
            etcd,
            dir,
            server,
            started_in: Duration::ZERO,
        };
        plane.wait_ready().await?;
        plane.started_in = begun.elapsed();
        Ok(plane)
    }

    async fn wait_ready(&mut self) -> Result<(), Error> {
        let client = self.client().await?;
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            for guarded in [&mut self.etcd, &mut self.apiserver] {
                if let Some(status) = guarded.exited() {
                    return Err(Error::Exited {
                        process: guarded.name,
                        status,
                        log: guarded.log_tail(),
                    });
                }
            }
            if crate::readyz(&client).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady(READY_DEADLINE, self.apiserver.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client with the admin identity (`system:masters`).
    pub async fn client(&self) -> Result<Client, Error> {
        client_for(&self.kubeconfig()).await
    }

    /// Path of a kubeconfig with the admin identity, for `kubectl` and `helm`.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The API server's URL (`https://127.0.0.1:<port>`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The directory that holds this control plane's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Time from the call to `start` until `/readyz` answered `ok`.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// A `kubectl` command aimed at this control plane (`KUBECTL` overrides the binary).
    pub fn kubectl(&self) -> Command {
        kubectl_command(&self.kubeconfig())
    }

    /// A `helm` command (the testenv's build) aimed at this control plane.
    pub fn helm(&self) -> Command {
        helm_command(&self.kubeconfig(), &self.dir.path().join("helm"))
    }

    /// Create a namespace with its `default` ServiceAccount (no controller
    /// manager runs to make that account, and pods need it).
    pub async fn namespace(&self, client: &Client, name: &str) -> Result<(), kube::Error> {
        let meta = ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        };
        let namespace = Namespace {
            metadata: meta.clone(),
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some("default".into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        Api::<ServiceAccount>::namespaced(client.clone(), name)
            .create(&PostParams::default(), &account)
            .await?;
        Ok(())
    }
}

/// Three distinct free loopback ports (free when asked; see `START_ATTEMPTS`).
fn free_ports() -> std::io::Result<[u16; 3]> {
    let listeners = [
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?,
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?,
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?,
    ];
    Ok([
        listeners[0].local_addr()?.port(),
        listeners[1].local_addr()?.port(),
        listeners[2].local_addr()?.port(),
    ])
}
