//! Admission latency (issue 4): the handler in process, and pod creation end
//! to end through a real kube-apiserver that calls the webhook over HTTPS.
//!
//! In process: `webhook::respond` on a real AdmissionReview body, with a view
//! of one account of 3 integrations × 5 jobs, many times; p50/p99 per call.
//! End to end: the operator (controller + webhook) runs in this process
//! against the testenv control plane; pods are created at 100 per second,
//! labelled (sent to the webhook) and, as a baseline, unlabelled (never
//! sent); p50/p99 of the create call for each.
//!
//! Run: `make bench` (or `cargo bench --bench webhook`).

#[path = "../tests/support/operator.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use saleslayer_core::account::{AccountProblem, ValidatedAccount, validate_account};
use saleslayer_core::api::{SalesLayerAccount, SalesLayerIntegration};
use saleslayer_core::injection::{Injection, IntegrationView};
use saleslayer_core::plan::{self, AccountPlan, PodCounts, ValidatedIntegration};
use saleslayer_operator::webhook;
use saleslayer_testenv::labelled_pod;
use serde_json::json;

struct Account(ValidatedAccount, Vec<ValidatedIntegration>);

impl IntegrationView for Account {
    fn integration(&self, namespace: &str, name: &str) -> Option<ValidatedIntegration> {
        self.1
            .iter()
            .find(|i| i.namespace == namespace && i.name == name)
            .cloned()
    }
    fn integrations_in(&self, namespace: &str) -> Vec<String> {
        self.1
            .iter()
            .filter(|i| i.namespace == namespace)
            .map(|i| i.name.clone())
            .collect()
    }
    fn plan_with_new_pod(
        &self,
        integration: &ValidatedIntegration,
        job: &str,
    ) -> Result<AccountPlan, AccountProblem> {
        let mut pods = PodCounts::new();
        for member in &self.1 {
            for spec in &member.jobs {
                pods.insert(member.key(&spec.name), 10);
            }
        }
        *pods.entry(integration.key(job)).or_default() += 1;
        Ok(plan::plan_account(&self.0, &self.1, &pods))
    }
}

fn integration_spec(index: usize) -> serde_json::Value {
    json!({"account": "acme-prod", "jobs": (0..5).map(|j| json!({
        "name": format!("job-{j}"), "weight": j + 1, "maxConcurrency": 8})).collect::<Vec<_>>(),
        "retry": {"maxAttempts": 4 + index % 3}})
}

fn review(job: &str) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "7d0c0c3e-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:job-controller"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "import-", "namespace": "shop",
                    "labels": {"saleslayer.io/integration": "catalog-0", "saleslayer.io/job": job}},
                "spec": {"containers": [
                    {"name": "main", "image": "example.com/importer:1", "env": [{"name": "A", "value": "1"}]},
                    {"name": "metrics", "image": "example.com/exporter:1"}]}},
        }
    })
    .to_string()
    .into_bytes()
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99), at(1.0))
}

fn in_process() -> (Duration, Duration) {
    let members: Vec<ValidatedIntegration> = (0..3)
        .map(|i| {
            let spec = serde_json::from_value(integration_spec(i)).expect("spec");
            let mut sli = SalesLayerIntegration::new(&format!("catalog-{i}"), spec);
            sli.metadata.namespace = Some("shop".into());
            plan::validate(&sli).expect("valid")
        })
        .collect();
    let account = SalesLayerAccount::new(
        "acme-prod",
        serde_json::from_value(json!({})).expect("account spec"),
    );
    let view = Account(validate_account(&account).expect("valid account"), members);
    let injection = Injection {
        quota_url: "https://saleslayer-operator-quota.saleslayer-system.svc:8443".into(),
        proxy_image: "saleslayer-operator:test".into(),
        proxy_upstream: "https://api.saleslayer.com".into(),
    };
    let bodies: Vec<Vec<u8>> = (0..5).map(|j| review(&format!("job-{j}"))).collect();
    for body in &bodies {
        let answer = webhook::respond(body, &view, &injection);
        assert_eq!(answer.status, webhook::StatusCode::OK);
    }
    let mut samples = Vec::with_capacity(50_000);
    for i in 0..50_000 {
        let body = &bodies[i % bodies.len()];
        let start = Instant::now();
        let answer = webhook::respond(body, &view, &injection);
        samples.push(start.elapsed());
        std::hint::black_box(answer);
    }
    let (p50, p99, max) = percentiles(samples);
    println!("in process, 50 000 reviews: p50 {p50:?}  p99 {p99:?}  max {max:?}");
    (p50, p99)
}

/// A labelled pod (sent to the webhook) or an unlabelled one (never sent).
fn pod(generate: &str, labels: Option<(&str, &str)>) -> Pod {
    let (integration, job) = labels.unwrap_or_default();
    let mut pod = labelled_pod(None, Some(generate), integration, job);
    if labels.is_none() {
        pod.metadata.labels = None;
    }
    pod
}

/// Create `count` pods at `rate` per second; the latency of each create call.
async fn paced(pods: &Api<Pod>, template: &Pod, count: usize, rate: u32) -> Vec<Duration> {
    let interval = Duration::from_secs(1) / rate;
    let mut tick = tokio::time::interval(interval);
    let mut calls = Vec::with_capacity(count);
    for _ in 0..count {
        tick.tick().await;
        let pods = pods.clone();
        let template = template.clone();
        calls.push(tokio::spawn(async move {
            let start = Instant::now();
            pods.create(&PostParams::default(), &template)
                .await
                .expect("pod created");
            start.elapsed()
        }));
    }
    let mut samples = Vec::with_capacity(count);
    for call in calls {
        samples.push(call.await.expect("create task"));
    }
    samples
}

/// Through the API server: p50 and p99 of pod creates without and with the webhook.
async fn end_to_end() -> [(Duration, Duration); 2] {
    let (_plane, client, _) = support::with_operator(&["shop"]).await;
    support::account(&client, "acme-prod", json!({})).await;
    let slis = Api::<SalesLayerIntegration>::namespaced(client.clone(), "shop");
    let spec = serde_json::from_value(integration_spec(0)).expect("spec");
    slis.create(
        &PostParams::default(),
        &SalesLayerIntegration::new("catalog-0", spec),
    )
    .await
    .expect("integration");
    let pods = Api::<Pod>::namespaced(client.clone(), "shop");
    let labelled = pod("import-", Some(("catalog-0", "job-0")));
    // Wait until the webhook admits (stores synced, configuration registered).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match pods.create(&PostParams::default(), &labelled).await {
            Ok(p)
                if p.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key("saleslayer.io/injected")) =>
            {
                break;
            }
            _ if Instant::now() > deadline => panic!("webhook never admitted a pod"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    let warmup = paced(&pods, &pod("plain-", None), 100, 100).await;
    drop(warmup);
    let (plain50, plain99, max) = percentiles(paced(&pods, &pod("plain-", None), 1000, 100).await);
    println!(
        "end to end, 1000 unlabelled pods at 100/s (no webhook): p50 {plain50:?}  p99 {plain99:?}  max {max:?}"
    );
    let (p50, p99, max) = percentiles(paced(&pods, &labelled, 1000, 100).await);
    println!(
        "end to end, 1000 labelled pods at 100/s (through the webhook): p50 {p50:?}  p99 {p99:?}  max {max:?}"
    );
    [(plain50, plain99), (p50, p99)]
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (in_p50, in_p99) = in_process();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let [(plain50, plain99), (hook50, hook99)] = runtime.block_on(end_to_end());
    let us = |d: Duration| (d.as_secs_f64() * 1e7).round() / 10.0;
    let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    println!(
        "BENCH {}",
        json!({
            "bench": "webhook",
            "in_process_p50_us": us(in_p50), "in_process_p99_us": us(in_p99),
            "create_unlabelled_p50_ms": ms(plain50), "create_unlabelled_p99_ms": ms(plain99),
            "create_labelled_p50_ms": ms(hook50), "create_labelled_p99_ms": ms(hook99),
        })
    );
}
