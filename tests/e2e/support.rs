//! Shared by the e2e tests: one node for the whole run, the operator
//! installed on it by the chart, the simulator as a pod behind a Service, a
//! namespace per test, and waiting on observed state with deadlines.
//!
//! The node is a static: statics never drop, so its janitor removes it when
//! this test binary exits (or is killed). Each test makes its own
//! `kube::Client`, because a client belongs to the runtime of the test that
//! made it. Tests that install, restart or delete the operator hold
//! [`exclusive`]: the webhook configuration is cluster-wide, so one release
//! at a time.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use saleslayer_testenv::Node;
use tokio::sync::{Mutex, MutexGuard, OnceCell};

/// How long any awaited state may take to appear.
pub const DEADLINE: Duration = Duration::from_secs(120);
/// The chart's release, as the chart's README installs it.
pub const RELEASE: &str = "saleslayer-operator";
/// The operator's namespace.
pub const OPERATOR_NS: &str = "saleslayer-system";
/// The sidecar's metrics port (`saleslayer_contract::PROXY_METRICS_PORT`).
pub const PROXY_METRICS_PORT: u16 = saleslayer_contract::PROXY_METRICS_PORT;

static NODE: OnceCell<Setup> = OnceCell::const_new();
static EXCLUSIVE: Mutex<()> = Mutex::const_new(());
static NAMESPACES: AtomicUsize = AtomicUsize::new(0);

/// The node and the references of the images imported into it.
pub struct Setup {
    pub node: Node,
    pub operator_image: String,
    pub workload_image: String,
}

/// The run's node (started by the first test that asks), with the
/// operator's and the workload's images imported.
pub async fn setup() -> &'static Setup {
    NODE.get_or_init(|| async {
        let node = Node::start().await.expect("the node starts");
        println!(
            "e2e: node Ready in {:.1} s at {} (network namespace {})",
            node.started_in().as_secs_f64(),
            node.server(),
            node.netns()
        );
        let begun = Instant::now();
        let operator_image = node.import("operator").expect("the operator image imports");
        let workload_image = node.import("workload").expect("the workload image imports");
        println!(
            "e2e: imported {operator_image} and {workload_image} in {:.1} s",
            begun.elapsed().as_secs_f64()
        );
        Setup {
            node,
            operator_image,
            workload_image,
        }
    })
    .await
}

/// The node, for tests that need nothing else.
pub async fn node() -> &'static Node {
    &setup().await.node
}

/// A fresh admin client for this test's runtime.
pub async fn client() -> Client {
    node().await.client().await.expect("a client")
}

/// Held by tests that install, restart or remove the operator.
pub async fn exclusive() -> MutexGuard<'static, ()> {
    EXCLUSIVE.lock().await
}

/// The repository's top directory.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Run `command`; (success, stdout, stderr).
pub fn output(command: &mut Command) -> (bool, String, String) {
    let out = command.output().expect("the command runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `command`, which must succeed; its stdout.
pub fn success(command: &mut Command) -> String {
    let (ok, stdout, stderr) = output(command);
    assert!(ok, "{command:?} failed:\n{stdout}{stderr}");
    stdout
}

/// `kubectl` against the node.
pub async fn kubectl(args: &[&str]) -> String {
    success(node().await.kubectl().args(args))
}

/// `kubectl apply -f -` of `manifest`, which must succeed.
pub async fn apply(manifest: &str) {
    let (ok, said) = try_apply(manifest).await;
    assert!(ok, "kubectl apply failed: {said}\n{manifest}");
}

/// `kubectl apply -f -` of `manifest`: (success, what kubectl said).
pub async fn try_apply(manifest: &str) -> (bool, String) {
    let mut child = node()
        .await
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(manifest.as_bytes())
            .expect("manifest written");
    }
    let out = child.wait_with_output().expect("kubectl ends");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A namespace of its own for a test (`<prefix>-<n>`), with its default
/// ServiceAccount.
pub async fn namespace(prefix: &str) -> String {
    let name = format!("{prefix}-{}", NAMESPACES.fetch_add(1, Ordering::Relaxed));
    node()
        .await
        .namespace(&client().await, &name)
        .await
        .expect("the namespace is ready");
    name
}

/// Poll `check` until it yields a value or `deadline` passes.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let begun = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if begun.elapsed() > deadline {
            if let Err(error) = node().await.check() {
                panic!("waited {deadline:?} for {what}, and a part of the node died: {error}");
            }
            panic!("waited {deadline:?} for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// GET `path` through the API server (its proxy reaches pods and Services).
pub async fn get_text(client: &Client, path: &str) -> Option<String> {
    let request = http::Request::get(path).body(Vec::new()).ok()?;
    client.request_text(request).await.ok()
}

/// A pod's `/metrics` on `port`, through the API server's pod proxy.
pub async fn pod_metrics(client: &Client, namespace: &str, pod: &str, port: u16) -> Option<String> {
    get_text(
        client,
        &format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/metrics"),
    )
    .await
}

/// The sum of a metric's samples whose labels include every `key="value"`
/// of `labels` (0 when there is none).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// Names of the running pods that match `selector` in `namespace`.
pub async fn running_pods(client: &Client, namespace: &str, selector: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(selector))
        .await
        .map(|list| {
            list.items
                .into_iter()
                .filter(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every container of the pod (native sidecars included) is ready.
pub fn all_ready(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    let ready = |list: &Option<Vec<k8s_openapi::api::core::v1::ContainerStatus>>| {
        list.iter().flatten().all(|c| c.ready)
    };
    status.phase.as_deref() == Some("Running")
        && status
            .container_statuses
            .as_ref()
            .is_some_and(|c| !c.is_empty())
        && ready(&status.container_statuses)
        && ready(&status.init_container_statuses)
}

/// The value of the env var `name` in the pod's first container.
pub fn pod_env(pod: &Pod, name: &str) -> Option<String> {
    pod.spec
        .as_ref()?
        .containers
        .first()?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}
