//! A real, local Kubernetes cluster for the integration tests, the
//! benchmarks, `make e2e` and `make demo` (DESIGN.md §9), in two modes:
//!
//! - [`ControlPlane`]: etcd + kube-apiserver on loopback, in about 3 s (the
//!   integration tests of `make test`); pods are API objects that nothing runs.
//! - [`Node`]: the control plane plus kube-controller-manager,
//!   kube-scheduler, containerd, the kubelet, kube-proxy and CoreDNS, all in
//!   a network namespace of their own that no packet leaves (`make e2e`,
//!   `make demo`); pods run, from images imported from `make image`.
//!
//! ```text
//!   host (tests, kubectl, helm)            node's network namespace (no default route)
//!   ───────────────────────────            ────────────────────────────────────────────
//!   slv-<id> 10.213.x.1/30  ── veth ──  eth0 10.213.x.2/30: kube-apiserver :6443,
//!                                          kubelet :10250, CoreDNS :53, kube-proxy
//!                                       cni0 10.244.0.1/24 ── pods (10.244.0.0/24)
//!                                       Services 10.96.0.0/24 (kube-proxy iptables)
//! ```
//!
//! A dev-dependency only: the operator's release build never links it
//! (`cargo tree -e normal -p saleslayer-operator` shows no testenv or
//! tempfile). May import: the Kubernetes client, the core's CRD, the pod
//! contract. Never: the operator's own code, which the tests start themselves.
//!
//! The binaries come from `tests/testenv/` (built by `make testenv` or
//! `make testenv-node` into `target/testenv/bin`, or wherever `TESTENV_BIN`
//! points). Modules by concern: `pki` (certificates and
//! kubeconfigs), `process` (guarded children, node components), `janitor`
//! (the detached clean-up), `netns` (namespaces, the link, network safety),
//! `node` (the node's parts and their configuration), [`images`].
//!
//! Teardown: dropping either mode stops its processes and removes its
//! files, also while a test unwinds from a panic; a control plane's processes
//! each run under an `sh` guard, a node under its janitor, so nothing
//! outlives a test binary that was killed.
#![forbid(unsafe_code)]

mod control_plane;
pub mod images;
mod janitor;
mod netns;
mod node;
mod pki;
mod process;

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub use control_plane::ControlPlane;
pub use images::{ImageArchive, image, images_dir};
pub use node::{NODE_NAME, Node};

/// How long the control plane may take to answer `/readyz` with `ok`.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// Everything that can stop a test cluster from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{0} not found in {1}: run `make testenv` (or set TESTENV_BIN) to build the control plane"
    )]
    MissingBinary(&'static str, PathBuf),
    #[error("{0} not found in {1}: run `make testenv-node` (or set TESTENV_BIN) to build the node")]
    MissingNodeBinary(&'static str, PathBuf),
    #[error("{0} is missing on this machine: apt-get install {1}")]
    MissingTool(&'static str, &'static str),
    #[error("{0} is missing: run `make image` first")]
    MissingImages(PathBuf),
    #[error("running {0}: {1}")]
    Tool(&'static str, std::io::Error),
    #[error("setting up the node: {0}")]
    Setup(String),
    #[error("preparing the cluster's files: {0}")]
    Files(#[from] std::io::Error),
    #[error("generating certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    #[error("{process} exited before the cluster was ready ({status}); last log lines:\n{log}")]
    Exited {
        process: &'static str,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("the control plane was not ready within {0:?}; last kube-apiserver log lines:\n{1}")]
    NotReady(Duration, String),
    #[error("waited {1:?} for {0}; last log lines of the node's parts:\n{2}")]
    NodeNotReady(String, Duration, String),
    #[error("reading the generated kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("talking to the API server: {0}")]
    Client(#[from] kube::Error),
}

/// A client from a kubeconfig file.
async fn client_for(path: &Path) -> Result<Client, Error> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Whether the API server answers `/readyz` with `ok`.
async fn readyz(client: &Client) -> bool {
    if let Ok(request) = http::Request::get("/readyz").body(Vec::new())
        && let Ok(body) = client.request_text(request).await
    {
        return body.trim() == "ok";
    }
    false
}

/// `kubectl` (`KUBECTL` overrides the binary) with this kubeconfig.
fn kubectl_command(kubeconfig: &Path) -> Command {
    let program = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    let mut command = Command::new(program);
    command.env("KUBECONFIG", kubeconfig);
    command
}

/// The testenv's `helm` with this kubeconfig and its state under `home`.
fn helm_command(kubeconfig: &Path, home: &Path) -> Command {
    let mut command = Command::new(bin_dir().join("helm"));
    command
        .env("KUBECONFIG", kubeconfig)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    command
}

/// Where the testenv binaries live: `TESTENV_BIN`, else `target/testenv/bin`.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("TESTENV_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/testenv/bin"))
}

/// The workspace's top directory (this crate lives in `crates/testenv`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
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
                        saleslayer_contract::LABEL_INTEGRATION.to_owned(),
                        integration.to_owned(),
                    ),
                    (saleslayer_contract::LABEL_JOB.to_owned(), job.to_owned()),
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

/// Apply the operator's CRDs and wait until the API server serves them.
pub async fn install_crd(client: &Client) -> Result<(), kube::Error> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in saleslayer_core::api::crds() {
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
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// A token for `pod`'s service account, bound to the pod, with the quota
/// API's audience: what the webhook's projected volume gives a pod.
pub async fn pod_token(
    client: &Client,
    pod: &k8s_openapi::api::core::v1::Pod,
    seconds: i64,
) -> Result<Option<String>, kube::Error> {
    bound_token(client, pod, saleslayer_contract::TOKEN_AUDIENCE, seconds).await
}

/// A token for `pod`'s service account (its `serviceAccountName`, else
/// `default`), bound to the pod, for `audience`, from the TokenRequest API.
pub async fn bound_token(
    client: &Client,
    pod: &k8s_openapi::api::core::v1::Pod,
    audience: &str,
    seconds: i64,
) -> Result<Option<String>, kube::Error> {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.into()]),
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
    let account = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let issued = Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .create_token_request(&account, &PostParams::default(), &request)
        .await?;
    Ok(issued.status.and_then(|s| s.token))
}
