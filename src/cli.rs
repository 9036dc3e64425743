//! The command line: one binary with the subcommands of DESIGN.md §2. Every
//! flag can also be set through a `SALESLAYER_*` environment variable. This
//! module only parses; `main.rs` dispatches.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Keeps Sales Layer integrations under the account's rate limit.
#[derive(Debug, Parser)]
#[command(name = "saleslayer-operator", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller, the admission webhook, the quota API and /metrics.
    Run(Box<RunArgs>),
    /// Print the CRDs (SalesLayerAccount, SalesLayerIntegration) as YAML.
    Crd(CrdArgs),
    /// Run the per-pod sidecar that paces, retries and reports.
    Proxy(Box<saleslayer_sidecar::ProxyArgs>),
    /// Run a stand-in for the Sales Layer API that enforces a rate limit per API key.
    Simulate(SimulateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Kubeconfig to use; else KUBECONFIG, else the in-cluster config.
    #[arg(long, env = "SALESLAYER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the operator's own Secret and Lease.
    #[arg(long, env = "SALESLAYER_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of the admission webhook (HTTPS).
    #[arg(long, env = "SALESLAYER_WEBHOOK_BIND", default_value = "0.0.0.0:9443")]
    pub webhook_bind: SocketAddr,
    /// Out of cluster: register a MutatingWebhookConfiguration pointing at this URL.
    #[arg(long, env = "SALESLAYER_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// Name of the MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(
        long,
        env = "SALESLAYER_WEBHOOK_CONFIGURATION",
        default_value = "saleslayer-operator"
    )]
    pub webhook_configuration: String,
    /// Quota API URL injected into pods (default: the in-cluster Service, or
    /// the --webhook-url host on the quota port out of cluster).
    #[arg(long, env = "SALESLAYER_QUOTA_URL")]
    pub quota_url: Option<String>,
    /// Serving certificate file (e.g. from cert-manager) instead of the operator's own.
    #[arg(long, env = "SALESLAYER_TLS_CERT_FILE", requires_all = ["tls_key_file", "ca_file"])]
    pub tls_cert_file: Option<String>,
    /// Key of --tls-cert-file.
    #[arg(long, env = "SALESLAYER_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<String>,
    /// CA that signed --tls-cert-file (published to pods and put in the caBundle).
    #[arg(long, env = "SALESLAYER_CA_FILE", requires = "tls_cert_file")]
    pub ca_file: Option<String>,
    /// Address of the quota API (HTTPS).
    #[arg(long, env = "SALESLAYER_QUOTA_BIND", default_value = "0.0.0.0:8443")]
    pub quota_bind: SocketAddr,
    /// Address of /metrics, /healthz and /readyz (HTTP).
    #[arg(long, env = "SALESLAYER_METRICS_BIND", default_value = "0.0.0.0:8080")]
    pub metrics_bind: SocketAddr,
    /// Elect a leader among replicas (default: on in a cluster, off outside).
    #[arg(long, env = "SALESLAYER_LEADER_ELECT")]
    pub leader_elect: Option<bool>,
    /// Name of the coordination.k8s.io Lease the replicas elect a leader on (in --namespace).
    #[arg(
        long,
        env = "SALESLAYER_LEASE_NAME",
        default_value = "saleslayer-operator"
    )]
    pub lease_name: String,
    /// Image of the sidecar injected into pods annotated `saleslayer.io/proxy: "true"`
    /// (the operator's own image: it runs `saleslayer-operator proxy`).
    #[arg(
        long,
        env = "SALESLAYER_PROXY_IMAGE",
        default_value = "ghcr.io/saleslayer-operator/saleslayer-operator:0.1.0"
    )]
    pub proxy_image: String,
    /// The Sales Layer API the injected sidecars forward to.
    #[arg(
        long,
        env = "SALESLAYER_PROXY_UPSTREAM",
        default_value = "https://api.saleslayer.com"
    )]
    pub proxy_upstream: String,
}

#[derive(Debug, Clone, Args)]
pub struct CrdArgs {
    /// Write each CRD to its file in this directory (as `crds/` holds them)
    /// instead of printing them all.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub use saleslayer_simulator::SimulateArgs;
