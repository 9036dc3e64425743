//! The operator on the node, installed as users install it: `helm install`
//! of the chart, with only the image reference and `pullPolicy: Never`
//! overridden (no registry is reachable), plus `proxy.upstream` aimed at the
//! simulator's Service (the sidecars' Sales Layer API). The simulator runs as
//! `examples/simulator.yaml` says, from the operator's image.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::sync::MutexGuard;

use crate::support::{
    DEADLINE, OPERATOR_NS, RELEASE, all_ready, apply, client, eventually, exclusive, node, output,
    root, running_pods, setup,
};

/// The selector of the operator's pods.
pub const SELECTOR: &str = "app.kubernetes.io/name=saleslayer-operator";
/// Where the sidecars send: the simulator's Service.
pub const UPSTREAM: &str = "http://simulator.saleslayer-simulator.svc.cluster.local:8090";
/// The simulator's namespace.
pub const SIMULATOR_NS: &str = "saleslayer-simulator";

/// The chart's `--set`s: the image built by `make image`, never pulled, and
/// the sidecars' upstream.
pub async fn chart_values() -> Vec<String> {
    let image = &setup().await.operator_image;
    let (repository, tag) = image.rsplit_once(':').expect("a tagged image reference");
    vec![
        format!("image.repository={repository}"),
        format!("image.tag={tag}"),
        "image.pullPolicy=Never".into(),
        format!("proxy.upstream={UPSTREAM}"),
    ]
}

/// Whether the release is installed.
pub async fn installed() -> bool {
    output(
        node()
            .await
            .helm()
            .args(["status", RELEASE, "-n", OPERATOR_NS]),
    )
    .0
}

/// `helm install` of the chart; how long until `--wait` returned.
pub async fn install() -> Duration {
    let begun = Instant::now();
    let mut command = node().await.helm();
    command
        .args(["install", RELEASE])
        .arg(root().join("charts/saleslayer-operator"))
        .args(["--namespace", OPERATOR_NS, "--create-namespace"])
        .args(["--wait", "--timeout", "3m"]);
    for value in chart_values().await {
        command.args(["--set", &value]);
    }
    let (ok, stdout, stderr) = output(&mut command);
    if !ok {
        let pods = output(
            node()
                .await
                .kubectl()
                .args(["-n", OPERATOR_NS, "describe", "pods"]),
        );
        panic!("helm install failed:\n{stdout}{stderr}\n{}", pods.1);
    }
    begun.elapsed()
}

/// The simulator, once per run.
pub async fn simulator() {
    let (exists, _, _) =
        output(
            node()
                .await
                .kubectl()
                .args(["-n", SIMULATOR_NS, "get", "deployment", "simulator"]),
        );
    if exists {
        return;
    }
    let manifest = std::fs::read_to_string(root().join("examples/simulator.yaml"))
        .expect("examples/simulator.yaml")
        .replace(
            "localhost/saleslayer-operator:0.1.0",
            &setup().await.operator_image,
        );
    apply(&manifest).await;
    crate::support::kubectl(&[
        "-n",
        SIMULATOR_NS,
        "rollout",
        "status",
        "deployment/simulator",
        "--timeout=120s",
    ])
    .await;
}

/// The operator installed and healthy (two Ready replicas, one leader) and
/// the simulator running; held exclusively until the guard drops.
pub async fn ready() -> MutexGuard<'static, ()> {
    let guard = exclusive().await;
    simulator().await;
    if !installed().await {
        let took = install().await;
        println!("e2e: helm install --wait took {:.1} s", took.as_secs_f64());
    }
    let client = client().await;
    healthy(&client).await;
    guard
}

/// Two Ready replicas and exactly one leader; the leader's pod name.
pub async fn healthy(client: &Client) -> String {
    eventually(
        "two Ready operator replicas and one leader",
        DEADLINE,
        || async {
            let pods = running_pods(client, OPERATOR_NS, SELECTOR).await;
            let ready = pods.iter().filter(|p| all_ready(p)).count();
            let leaders = leaders(client).await;
            (ready == 2 && leaders.len() == 1).then(|| leaders[0].clone())
        },
    )
    .await
}

/// The pods labelled `saleslayer.io/leader: "true"` that are not terminating.
pub async fn leaders(client: &Client) -> Vec<String> {
    running_pods(
        client,
        OPERATOR_NS,
        &format!("{SELECTOR},saleslayer.io/leader=true"),
    )
    .await
    .into_iter()
    .filter_map(|p| p.metadata.name)
    .collect()
}

/// The holder of the leader election Lease.
pub async fn lease_holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), OPERATOR_NS)
        .get_opt(RELEASE)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
}
