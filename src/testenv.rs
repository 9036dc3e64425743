//! A real, local Kubernetes control plane (etcd + kube-apiserver) for the
//! integration tests, the benchmarks and `make demo` (DESIGN.md §9).
//!
//! The binaries come from `tests/testenv/` (built by `make testenv` into
//! `target/testenv/bin`, or wherever `TESTENV_BIN` points). [`ControlPlane::start`]
//! makes a fresh directory with generated certificates (a CA, the API server's
//! serving certificate, an admin client certificate in `system:masters`, a
//! service-account signing key), starts etcd and kube-apiserver on free
//! loopback ports, waits for `/readyz` and writes a kubeconfig that `kubectl`,
//! `helm` and [`kube::Client`] all read.
//!
//! Teardown: dropping the [`ControlPlane`] stops both processes and removes the
//! directory, also while a test unwinds from a panic. Each process runs under a
//! small `sh` guard that holds a pipe from this process and stops its child as
//! soon as that pipe closes, so nothing outlives a test binary that was killed.
//!
//! No kube-controller-manager or kubelet runs: pods are API objects only, no
//! garbage collection happens and namespace deletion never finishes.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// How long the control plane may take to answer `/readyz` with `ok`.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How many times a start is tried again when a free port was taken meanwhile.
const START_ATTEMPTS: usize = 3;

/// Everything that can stop the control plane from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{0} not found in {1}: run `make testenv` (or set TESTENV_BIN) to build the control plane"
    )]
    MissingBinary(&'static str, PathBuf),
    #[error("preparing the control plane's files: {0}")]
    Files(#[from] std::io::Error),
    #[error("generating certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    #[error(
        "{process} exited before the control plane was ready ({status}); last log lines:\n{log}"
    )]
    Exited {
        process: &'static str,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("the control plane was not ready within {0:?}; last kube-apiserver log lines:\n{1}")]
    NotReady(Duration, String),
    #[error("reading the generated kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("building a client: {0}")]
    Client(#[from] kube::Error),
}

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
        let files = Files::generate(dir.path())?;
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
                format!("--tls-cert-file={}", files.serving_cert.display()),
                format!("--tls-private-key-file={}", files.serving_key.display()),
                format!("--client-ca-file={}", files.ca_cert.display()),
                format!("--service-account-issuer={server}"),
                format!("--service-account-key-file={}", files.sa_public.display()),
                format!(
                    "--service-account-signing-key-file={}",
                    files.sa_key.display()
                ),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--authorization-mode=RBAC".into(),
                "--allow-privileged=true".into(),
                "--enable-priority-and-fairness=false".into(),
                "--profiling=false".into(),
                "--v=0".into(),
            ],
            dir.path(),
        )?;

        let kubeconfig = dir.path().join("kubeconfig");
        fs::write(&kubeconfig, files.kubeconfig(&server))?;
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
            if let Ok(request) = http::Request::get("/readyz").body(Vec::new())
                && let Ok(body) = client.request_text(request).await
                && body.trim() == "ok"
            {
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
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig())?;
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
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
        let program = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
        let mut command = Command::new(program);
        command.env("KUBECONFIG", self.kubeconfig());
        command
    }

    /// A `helm` command (the testenv's build) aimed at this control plane.
    pub fn helm(&self) -> Command {
        let mut command = Command::new(bin_dir().join("helm"));
        let home = self.dir.path().join("helm");
        command
            .env("KUBECONFIG", self.kubeconfig())
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        command
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

/// Where the testenv binaries live: `TESTENV_BIN`, else `target/testenv/bin`.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("TESTENV_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/testenv/bin"))
}

/// A child process under an `sh` guard: closing the guard's stdin (on drop, or
/// when this process dies) makes the guard stop the child and wait for it.
struct Guarded {
    name: &'static str,
    guard: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl Guarded {
    fn spawn(
        name: &'static str,
        program: PathBuf,
        args: &[String],
        dir: &Path,
    ) -> Result<Self, Error> {
        let log = dir.join(format!("{name}.log"));
        let output = fs::File::create(&log)?;
        // The guard keeps its stdin (which only this process holds open) as
        // fd 3 for a watcher that stops the child once the pipe closes; the
        // guard itself exits with the child, so an early exit is seen. The
        // data is thrown away, so there is no graceful shutdown to wait for.
        let script = r#"exec 3<&0; "$@" 3<&- & child=$!; (read _ignored <&3; kill -9 $child 2>/dev/null) & wait $child"#;
        let mut guard = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()?;
        let stdin = guard.stdin.take();
        Ok(Self {
            name,
            guard,
            stdin,
            log,
        })
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.guard.try_wait().ok().flatten()
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(12)..].join("\n")
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.exited().is_none() {
            if Instant::now() > deadline {
                let _ = self.guard.kill();
                let _ = self.guard.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The generated certificates and keys, written into the control plane's directory.
struct Files {
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    sa_key: PathBuf,
    sa_public: PathBuf,
}

impl Files {
    fn generate(dir: &Path) -> Result<Self, Error> {
        let pki = dir.join("pki");
        fs::create_dir_all(&pki)?;

        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "saleslayer-testenv-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut serving = CertificateParams::new(vec![
            "localhost".to_owned(),
            Ipv4Addr::LOCALHOST.to_string(),
            "10.0.0.1".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving.signed_by(&serving_key, &issuer)?;

        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin
            .distinguished_name
            .push(DnType::CommonName, "testenv-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_key = KeyPair::generate()?;
        let admin_cert = admin.signed_by(&admin_key, &issuer)?;

        let sa_key = KeyPair::generate()?;

        let files = Self {
            ca_cert: pki.join("ca.crt"),
            serving_cert: pki.join("apiserver.crt"),
            serving_key: pki.join("apiserver.key"),
            admin_cert: pki.join("admin.crt"),
            admin_key: pki.join("admin.key"),
            sa_key: pki.join("sa.key"),
            sa_public: pki.join("sa.pub"),
        };
        fs::write(&files.ca_cert, ca_cert.pem())?;
        fs::write(&files.serving_cert, serving_cert.pem())?;
        fs::write(&files.serving_key, serving_key.serialize_pem())?;
        fs::write(&files.admin_cert, admin_cert.pem())?;
        fs::write(&files.admin_key, admin_key.serialize_pem())?;
        fs::write(&files.sa_key, sa_key.serialize_pem())?;
        fs::write(&files.sa_public, sa_key.public_key_pem())?;
        Ok(files)
    }

    fn kubeconfig(&self, server: &str) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: admin
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: testenv
  context: {{cluster: testenv, user: admin, namespace: default}}
current-context: testenv
",
            ca = self.ca_cert.display(),
            cert = self.admin_cert.display(),
            key = self.admin_key.display(),
        )
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

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A one-container pod labelled for `integration`/`job`, named or with a
/// `generateName` (as a Job or ReplicaSet makes them).
pub fn labelled_pod(
    name: Option<&str>,
    generate: Option<&str>,
    integration: &str,
    job: &str,
) -> k8s_openapi::api::core::v1::Pod {
    use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
    Pod {
        metadata: ObjectMeta {
            name: name.map(str::to_owned),
            generate_name: generate.map(str::to_owned),
            labels: Some(
                [
                    (
                        crate::api::LABEL_INTEGRATION.to_owned(),
                        integration.to_owned(),
                    ),
                    (crate::api::LABEL_JOB.to_owned(), job.to_owned()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "main".into(),
                image: Some("example.com/importer:1".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// Loopback ports of an operator run out of cluster.
#[derive(Debug, Clone, Copy)]
pub struct OperatorPorts {
    pub webhook: u16,
    pub quota: u16,
    pub metrics: u16,
}

/// `saleslayer-operator run` as the tests, benchmarks and demo run it out of
/// cluster: its Secret in `namespace`, every server on a free loopback port,
/// and its own webhook configuration pointing at it.
pub fn run_args(namespace: &str) -> (crate::cli::RunArgs, OperatorPorts) {
    use clap::Parser;
    let ports = OperatorPorts {
        webhook: free_port(),
        quota: free_port(),
        metrics: free_port(),
    };
    let cli = crate::cli::Cli::parse_from([
        "saleslayer-operator".to_owned(),
        "run".into(),
        "--namespace".into(),
        namespace.into(),
        "--webhook-bind".into(),
        format!("127.0.0.1:{}", ports.webhook),
        "--webhook-url".into(),
        format!("https://127.0.0.1:{}/mutate", ports.webhook),
        "--quota-bind".into(),
        format!("127.0.0.1:{}", ports.quota),
        "--metrics-bind".into(),
        format!("127.0.0.1:{}", ports.metrics),
    ]);
    match cli.command {
        crate::cli::Command::Run(args) => (*args, ports),
        // The arguments above always parse as `run`.
        _ => unreachable!("run arguments parse as run"),
    }
}

/// A control plane with the CRD, `namespaces` and `saleslayer-system`, and
/// the whole operator running in this process out of cluster (until the
/// process ends), as the benchmarks drive it.
pub async fn with_operator(
    namespaces: &[&str],
) -> Result<(ControlPlane, Client, OperatorPorts), Error> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    install_crd(&client).await?;
    for namespace in namespaces.iter().copied().chain(["saleslayer-system"]) {
        plane.namespace(&client, namespace).await?;
    }
    let (args, ports) = run_args("saleslayer-system");
    tokio::spawn(crate::operator::run(
        client.clone(),
        args,
        futures::future::pending(),
    ));
    Ok((plane, client, ports))
}

/// Apply the CRD and wait until the API server serves it.
pub async fn install_crd(client: &Client) -> Result<(), kube::Error> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let crd = crate::api::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.create(&PostParams::default(), &crd).await?;
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        let established = crds.get(&name).await?.status.is_some_and(|s| {
            s.conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established || Instant::now() > deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A token for `pod`'s `default` service account, bound to the pod, with the
/// quota API's audience: what the webhook's projected volume gives a pod.
pub async fn pod_token(
    client: &Client,
    pod: &k8s_openapi::api::core::v1::Pod,
    seconds: i64,
) -> Result<Option<String>, kube::Error> {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![crate::webhook::mutate::TOKEN_AUDIENCE.into()]),
            expiration_seconds: Some(seconds),
            bound_object_ref: Some(BoundObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let issued = Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .create_token_request("default", &PostParams::default(), &request)
        .await?;
    Ok(issued.status.and_then(|s| s.token))
}
