//! Workloads on the node: the examples' manifests (`examples/catalog.yaml`,
//! `examples/workload.yaml`) moved into a test's namespace and account, a
//! probe pod to run commands from, and reading what the sidecars and the
//! simulator report.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use serde_json::{Value, json};

use crate::operator::SIMULATOR_NS;
use crate::support::{
    DEADLINE, PROXY_METRICS_PORT, all_ready, apply, eventually, get_text, kubectl, metric,
    namespace, node, output, pod_metrics, root, running_pods, setup,
};

/// The documents of an example manifest, as JSON values.
pub fn example(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("examples").join(file)).expect("the example");
    serde_saphyr::from_multiple::<Value>(&text).expect("the example is YAML")
}

/// Objects as one manifest for `kubectl apply` (a JSON `List`).
pub fn manifest(values: &[Value]) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": values}).to_string()
}

/// The example integration (`examples/catalog.yaml`) in `namespace`, on
/// `account`, with the jobs' weights replaced where `weights` names them,
/// and the example account (`examples/account.yaml`) named `account`, open
/// to every namespace (each test has its own).
pub fn catalog(namespace: &str, account: &str, weights: &[(&str, u32)]) -> String {
    let mut budget = example("account.yaml")
        .into_iter()
        .find(|d| d["kind"] == "SalesLayerAccount")
        .expect("examples/account.yaml has an account");
    budget["metadata"]["name"] = json!(account);
    budget["spec"]["allowedNamespaces"] = json!({"from": "All"});
    let mut integration = example("catalog.yaml")
        .into_iter()
        .find(|d| d["kind"] == "SalesLayerIntegration")
        .expect("examples/catalog.yaml has an integration");
    integration["metadata"]["namespace"] = json!(namespace);
    integration["spec"]["account"] = json!(account);
    if let Some(jobs) = integration["spec"]["jobs"].as_array_mut() {
        for job in jobs {
            if let Some((_, weight)) = weights.iter().find(|(name, _)| job["name"] == *name) {
                job["weight"] = json!(weight);
            }
        }
    }
    manifest(&[budget, integration])
}

/// A namespace of its own with the example integration on `account`, Ready.
pub async fn with_integration(prefix: &str, account: &str) -> String {
    let namespace = namespace(prefix).await;
    apply(&catalog(&namespace, account, &[])).await;
    kubectl(&[
        "-n",
        &namespace,
        "wait",
        "--for=condition=Ready",
        "sli/catalog",
        "--timeout=60s",
    ])
    .await;
    namespace
}

/// The example workload of `job` (`examples/workload.yaml`) in `namespace`,
/// sending with `account`'s key, `replicas` pods.
pub async fn deployment(namespace: &str, job: &str, account: &str, replicas: u32) -> String {
    let image = &setup().await.workload_image;
    let mut deployment = example("workload.yaml")
        .into_iter()
        .find(|d| d["metadata"]["name"] == job)
        .unwrap_or_else(|| panic!("examples/workload.yaml has no {job}"));
    deployment["metadata"]["namespace"] = json!(namespace);
    deployment["spec"]["replicas"] = json!(replicas);
    let container = &mut deployment["spec"]["template"]["spec"]["containers"][0];
    container["image"] = json!(image);
    container["env"] = json!([{"name": "API_KEY", "value": account}]);
    manifest(&[deployment])
}

/// Apply the example workload and wait until `replicas` pods run with every
/// container (the sidecar included) ready; the pods.
pub async fn run(
    client: &Client,
    namespace: &str,
    job: &str,
    account: &str,
    replicas: u32,
) -> Vec<Pod> {
    apply(&deployment(namespace, job, account, replicas).await).await;
    let selector = format!("app={job}");
    eventually(
        &format!("{replicas} ready {job} pods"),
        DEADLINE,
        || async {
            let pods = running_pods(client, namespace, &selector).await;
            (pods.len() == replicas as usize && pods.iter().all(all_ready)).then_some(pods)
        },
    )
    .await
}

/// A pod of the workload image that sleeps, to run commands in.
pub async fn probe(client: &Client, namespace: &str, name: &str) -> Pod {
    let image = &setup().await.workload_image;
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "main",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", "while true; do sleep 1; done"],
                "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                    "capabilities": {"drop": ["ALL"]}}
            }]
        }
    });
    apply(&manifest(&[pod])).await;
    eventually(&format!("pod {name} ready"), DEADLINE, || async {
        running_pods(client, namespace, "")
            .await
            .into_iter()
            .find(|p| p.metadata.name.as_deref() == Some(name) && all_ready(p))
    })
    .await
}

/// `sh -c script` in a pod's container: (success, stdout + stderr, time).
pub async fn exec(
    namespace: &str,
    pod: &str,
    container: &str,
    script: &str,
) -> (bool, String, Duration) {
    let begun = Instant::now();
    let (ok, stdout, stderr) = output(node().await.kubectl().args([
        "-n", namespace, "exec", pod, "-c", container, "--", "sh", "-c", script,
    ]));
    (ok, format!("{stdout}{stderr}"), begun.elapsed())
}

/// The simulator's `/stats`, through the API server's service proxy.
pub async fn simulator_stats(client: &Client) -> Value {
    let text = get_text(
        client,
        &format!("/api/v1/namespaces/{SIMULATOR_NS}/services/simulator:8090/proxy/stats"),
    )
    .await
    .expect("the simulator answers /stats");
    serde_json::from_str(&text).expect("/stats is JSON")
}

/// What the simulator counted for one API key: (accepted, throttled).
pub async fn key_stats(client: &Client, key: &str) -> (u64, u64) {
    let stats = simulator_stats(client).await;
    let of = &stats["byKey"][key];
    (
        of["accepted"].as_u64().unwrap_or(0),
        of["throttled"].as_u64().unwrap_or(0),
    )
}

/// One sidecar's figures, from its `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sidecar {
    pub ok: f64,
    pub throttled: f64,
    pub renewals_ok: f64,
    pub grant_requests: f64,
    pub grant_period_seconds: f64,
    pub on_lease: bool,
}

/// The sidecar's figures of `pod`, if its `/metrics` answers.
pub async fn sidecar(client: &Client, namespace: &str, pod: &str) -> Option<Sidecar> {
    let text = pod_metrics(client, namespace, pod, PROXY_METRICS_PORT).await?;
    Some(Sidecar {
        ok: metric(&text, "saleslayer_proxy_requests_total", &[("code", "200")]),
        throttled: metric(&text, "saleslayer_proxy_throttled_total", &[]),
        renewals_ok: metric(
            &text,
            "saleslayer_proxy_lease_renewals_total",
            &[("outcome", "ok")],
        ),
        grant_requests: metric(&text, "saleslayer_proxy_grant_requests", &[]),
        grant_period_seconds: metric(&text, "saleslayer_proxy_grant_period_seconds", &[]),
        on_lease: metric(
            &text,
            "saleslayer_proxy_grant_source",
            &[("source", "lease")],
        ) == 1.0,
    })
}

/// A pod's name.
pub fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}
