//! Shared by the integration tests: a control plane with the CRDs installed
//! and the documented account `acme-prod`, the operator running in-process,
//! and waiting on observed state.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::PostParams;
use kube::{Api, Client};
pub use saleslayer_testenv::{ControlPlane, free_port, labelled_pod};
use tokio::sync::oneshot;

#[path = "../support/operator.rs"]
mod operator;
pub use operator::run_args;

/// The account most tests use: the documented 50 requests per 10 s with
/// 20 % headroom (40 usable), open to every namespace.
pub const ACME_PROD: &str = "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerAccount
metadata: {name: acme-prod}
spec:
  limit: {requests: 50, periodSeconds: 10}
  headroomPercent: 20
";

/// How long any awaited state may take to appear.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A control plane with the CRD applied by real `kubectl`, and optionally
/// the controller running in this process until drop.
pub struct Env {
    pub plane: ControlPlane,
    pub client: Client,
    /// The quota API's port when the operator runs.
    pub quota_port: u16,
    /// The /metrics port when the operator runs.
    pub metrics_port: u16,
    stop: Option<oneshot::Sender<()>>,
}

impl Env {
    /// Control plane + CRDs, no account, no controller.
    pub async fn bare() -> Self {
        let plane = ControlPlane::start().await.expect("control plane starts");
        let client = plane.client().await.expect("client");
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
        succeed(plane.kubectl().arg("apply").arg("-f").arg(&crds));
        succeed(
            plane
                .kubectl()
                .args(["wait", "--for=condition=Established", "--timeout=30s"])
                .args([
                    "crd/saleslayeraccounts.saleslayer.io",
                    "crd/saleslayerintegrations.saleslayer.io",
                ]),
        );
        Self {
            plane,
            client,
            quota_port: 0,
            metrics_port: 0,
            stop: None,
        }
    }

    /// Control plane + CRDs + the account `acme-prod`, no controller.
    pub async fn with_crd() -> Self {
        let env = Self::bare().await;
        let (ok, output) = env.kubectl_apply(ACME_PROD);
        assert!(ok, "the account applies: {output}");
        env
    }

    /// Control plane + CRD + the operator without a registered webhook
    /// (as `run` without `--webhook-url` out of cluster): the controller
    /// and the quota API, pods created without injection.
    pub async fn with_controller() -> Self {
        Self::start_operator(|args| args.webhook_url = None, false).await
    }

    /// Control plane + CRD + the whole operator (controller and webhook),
    /// as `saleslayer-operator run --webhook-url https://127.0.0.1:<port>/mutate`.
    pub async fn with_operator() -> Self {
        Self::with_operator_args(|_| {}).await
    }

    /// As [`Env::with_operator`], with the `run` arguments adjusted first.
    pub async fn with_operator_args(
        adjust: impl FnOnce(&mut saleslayer_operator::cli::RunArgs),
    ) -> Self {
        Self::start_operator(adjust, true).await
    }

    async fn start_operator(
        adjust: impl FnOnce(&mut saleslayer_operator::cli::RunArgs),
        registered: bool,
    ) -> Self {
        let mut env = Self::with_crd().await;
        env.namespace("saleslayer-system").await;
        let (mut args, ports) = run_args("saleslayer-system");
        adjust(&mut args);
        env.quota_port = ports.quota;
        env.metrics_port = ports.metrics;
        let (stop, stopped) = oneshot::channel::<()>();
        let _ = rustls::crypto::ring::default_provider().install_default();
        tokio::spawn(saleslayer_operator::operator::run(
            env.client.clone(),
            args,
            async move {
                let _ = stopped.await;
            },
        ));
        env.stop = Some(stop);
        if !registered {
            return env;
        }
        // Ready once the webhook configuration is registered (after the server listens).
        let client = env.client.clone();
        eventually("the webhook configuration", || {
            let api = Api::<
                k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
            >::all(client.clone());
            async move {
                api.get("saleslayer-operator")
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .await;
        env
    }

    /// Stop the operator (its webhook stops answering).
    pub fn stop_operator(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// The operator's CA as published in `namespace` (waits until it is).
    pub async fn ca_pem(&self, namespace: &str) -> String {
        let configmaps = Api::<ConfigMap>::namespaced(self.client.clone(), namespace);
        eventually("the CA ConfigMap", || async {
            configmaps
                .get("saleslayer-operator-ca")
                .await
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    m.data
                        .and_then(|d| d.get("ca.crt").cloned())
                        .ok_or_else(|| "no ca.crt".into())
                })
        })
        .await
    }

    pub async fn namespace(&self, name: &str) {
        self.plane
            .namespace(&self.client, name)
            .await
            .expect("namespace");
    }

    /// `kubectl apply -f -` with `yaml`; returns (success, stdout + stderr).
    pub fn kubectl_apply(&self, yaml: &str) -> (bool, String) {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml)
    }

    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> (bool, String) {
        use std::io::Write;
        let mut child = self
            .plane
            .kubectl()
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write to kubectl");
        let out = child.wait_with_output().expect("kubectl finishes");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        succeed(self.plane.kubectl().args(args))
    }

    /// Create a pod labelled for `integration`/`job`.
    pub async fn pod(&self, namespace: &str, name: &str, integration: &str, job: &str) -> Pod {
        Api::<Pod>::namespaced(self.client.clone(), namespace)
            .create(
                &PostParams::default(),
                &labelled_pod(Some(name), None, integration, job),
            )
            .await
            .expect("create pod")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Run `command`, which must succeed; its stdout.
pub fn succeed(command: &mut std::process::Command) -> String {
    let out = command.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Poll `check` until it yields `Some`, or panic with the last observation
/// after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not observed within {DEADLINE:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
