//! The operator as the tests and benchmarks run it: out of cluster, in this
//! process, every server on a free loopback port, with its own webhook
//! configuration pointing at it. Shared by `tests/integration` and the
//! benches (`#[path]`-included), so both start it the same way.

use clap::Parser;
use kube::Client;
use saleslayer_operator::cli::{Cli, Command, RunArgs};
use saleslayer_testenv::{ControlPlane, free_port, install_crd};

/// Loopback ports of an operator run out of cluster.
#[derive(Debug, Clone, Copy)]
pub struct OperatorPorts {
    pub webhook: u16,
    pub quota: u16,
    pub metrics: u16,
}

/// `saleslayer-operator run` out of cluster: its Secret in `namespace`,
/// every server on a free loopback port, and its own webhook configuration.
pub fn run_args(namespace: &str) -> (RunArgs, OperatorPorts) {
    let ports = OperatorPorts {
        webhook: free_port(),
        quota: free_port(),
        metrics: free_port(),
    };
    let cli = Cli::parse_from([
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
        Command::Run(args) => (*args, ports),
        other => panic!("run arguments parsed as {other:?}"),
    }
}

/// A control plane with the CRD, `namespaces` and `saleslayer-system`, and
/// the whole operator running in this process out of cluster (until the
/// process ends), as the benchmarks drive it.
#[allow(dead_code, reason = "each bench uses part of this file")]
pub async fn with_operator(namespaces: &[&str]) -> (ControlPlane, Client, OperatorPorts) {
    let plane = ControlPlane::start().await.expect("control plane starts");
    let client = plane.client().await.expect("client");
    install_crd(&client).await.expect("CRD installs");
    for namespace in namespaces.iter().copied().chain(["saleslayer-system"]) {
        plane
            .namespace(&client, namespace)
            .await
            .expect("namespace");
    }
    let (args, ports) = run_args("saleslayer-system");
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::spawn(saleslayer_operator::operator::run(
        client.clone(),
        args,
        futures::future::pending(),
    ));
    (plane, client, ports)
}

/// Create the cluster-scoped account `name` with `spec` (JSON).
#[allow(dead_code, reason = "each bench uses part of this file")]
pub async fn account(client: &Client, name: &str, spec: serde_json::Value) {
    use saleslayer_core::api::SalesLayerAccount;
    let spec = serde_json::from_value(spec).expect("a valid account spec");
    kube::Api::<SalesLayerAccount>::all(client.clone())
        .create(
            &kube::api::PostParams::default(),
            &SalesLayerAccount::new(name, spec),
        )
        .await
        .expect("account created");
}
