//! Quota API throughput (issue 5): leases per second of the handler in
//! process with the token already reviewed (decode the report, check the
//! pod, record usage, plan the account, grant, encode the answer), and the
//! memory that 10 000 live leases take.
//!
//! The stores hold 100 integrations on 20 accounts, 5 jobs each, 20 pods a
//! job: 10 000 labelled pods, each of which leases once before timing starts.
//!
//! Run: `make bench` (or `cargo bench --bench quota`).

#[path = "../tests/support/operator.rs"]
mod support;

use std::sync::{Arc, RwLock};
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ObjectMeta, PartialObjectMeta};
use kube::runtime::{reflector, watcher};
use saleslayer_contract::{LeaseGrant, LeaseReport};
use saleslayer_core::api::{SalesLayerAccount, SalesLayerIntegration};
use saleslayer_core::lease_book::{LeaseBook, LeaseRequest};
use saleslayer_operator::metrics::Metrics;
use saleslayer_operator::quota::Quota;
use saleslayer_operator::quota::auth::{Authenticator, Identity};
use saleslayer_operator::state::PodIndex;
use saleslayer_operator::state::Stores;
use serde_json::json;

const INTEGRATIONS: usize = 100;
const JOBS: usize = 5;
const PODS: usize = 20;

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn stores() -> (Stores, Vec<(Identity, Vec<u8>)>) {
    let (integrations, mut sli_writer) = reflector::store::<SalesLayerIntegration>();
    let mut calls = Vec::new();
    let mut index = PodIndex::default();
    for i in 0..INTEGRATIONS {
        let namespace = format!("ns-{}", i % 10);
        let name = format!("integration-{i}");
        let spec = serde_json::from_value(json!({
            "account": format!("account-{}", i % 20),
            "jobs": (0..JOBS).map(|j| json!({"name": format!("job-{j}"), "weight": j + 1})).collect::<Vec<_>>(),
        }))
        .expect("spec");
        let mut sli = SalesLayerIntegration::new(&name, spec);
        sli.metadata.namespace = Some(namespace.clone());
        sli_writer.apply_watcher_event(&watcher::Event::Apply(sli));
        for j in 0..JOBS {
            for p in 0..PODS {
                let pod = format!("{name}-job-{j}-{p}");
                let meta = PartialObjectMeta::<Pod> {
                    metadata: ObjectMeta {
                        name: Some(pod.clone()),
                        namespace: Some(namespace.clone()),
                        labels: Some(
                            [
                                ("saleslayer.io/integration".to_owned(), name.clone()),
                                ("saleslayer.io/job".to_owned(), format!("job-{j}")),
                            ]
                            .into(),
                        ),
                        ..ObjectMeta::default()
                    },
                    ..PartialObjectMeta::default()
                };
                let event = watcher::Event::Apply(meta);
                index.apply(&event);
                let body = json!({"namespace": namespace, "integration": name, "job": format!("job-{j}"),
                    "pod": pod, "usage": {"requests": 10, "byStatus": {"200": 9, "429": 1},
                    "throttled": 1, "retries": 1, "peakConcurrency": 2, "queued": 3}});
                calls.push((
                    Identity {
                        namespace: namespace.clone(),
                        service_account: "default".into(),
                        pod,
                        uid: None,
                    },
                    body.to_string().into_bytes(),
                ));
            }
        }
    }
    let (accounts, mut account_writer) = reflector::store::<SalesLayerAccount>();
    for n in 0..20 {
        let account = SalesLayerAccount::new(
            &format!("account-{n}"),
            serde_json::from_value(json!({})).expect("account spec"),
        );
        account_writer.apply_watcher_event(&watcher::Event::Apply(account));
    }
    let (namespaces, _) = reflector::store();
    let stores = Stores {
        accounts,
        integrations,
        namespaces,
        index: Arc::new(RwLock::new(index)),
        reports: Default::default(),
        synced: Arc::new(saleslayer_operator::state::Synced {
            accounts: true.into(),
            integrations: true.into(),
            namespaces: true.into(),
        }),
    };
    (stores, calls)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let figures = in_process();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (https_leases, https_answers) = runtime.block_on(end_to_end());
    println!(
        "BENCH {}",
        json!({
            "bench": "quota",
            "in_process_leases_per_s": figures.leases_per_s.round(),
            "in_process_us_per_lease": (figures.us_each * 10.0).round() / 10.0,
            "book_bytes_per_lease": figures.book_bytes_per_lease,
            "https_leases_per_s": https_leases.round(),
            "https_answers_per_s": https_answers.round(),
        })
    );
}

/// What the in-process part measured.
struct InProcess {
    leases_per_s: f64,
    us_each: f64,
    book_bytes_per_lease: u64,
}

/// Answers per second over HTTPS: the operator in this process against the
/// testenv control plane, 50 pods with real bound tokens (reviewed once,
/// then cached), 32 clients renewing as fast as answers come for 10 s.
/// The quota API takes a pod's call at most every 250 ms, so at most 200
/// of them a second are leases (50 pods × 4); the rest are its 429 "renews
/// too soon", which still cost TLS, the token check and the authorization.
/// Both are counted: `(leases per s, answers per s)`.
async fn end_to_end() -> (f64, f64) {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::Api;
    use kube::api::PostParams;

    let (_plane, client, ports) = support::with_operator(&["shop"]).await;
    support::account(&client, "acme", json!({})).await;
    let quota_port = ports.quota;

    let spec = serde_json::from_value(
        json!({"account": "acme", "jobs": [{"name": "import", "weight": 1}]}),
    )
    .expect("spec");
    Api::<SalesLayerIntegration>::namespaced(client.clone(), "shop")
        .create(
            &PostParams::default(),
            &SalesLayerIntegration::new("catalog", spec),
        )
        .await
        .expect("integration");
    let ca = loop {
        if let Ok(map) = Api::<ConfigMap>::namespaced(client.clone(), "shop")
            .get("saleslayer-operator-ca")
            .await
            && let Some(ca) = map.data.and_then(|d| d.get("ca.crt").cloned())
        {
            break ca;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let pods = Api::<Pod>::namespaced(client.clone(), "shop");
    let mut fleet = Vec::new();
    for n in 0..50 {
        let name = format!("import-{n}");
        let pod = saleslayer_testenv::labelled_pod(Some(&name), None, "catalog", "import");
        let pod = pods
            .create(&PostParams::default(), &pod)
            .await
            .expect("pod");
        let token = saleslayer_testenv::pod_token(&client, &pod, 3600)
            .await
            .expect("token request")
            .expect("token");
        let body =
            json!({"namespace": "shop", "integration": "catalog", "job": "import", "pod": name,
            "usage": {"requests": 1, "byStatus": {"200": 1}}})
            .to_string();
        fleet.push((token, body));
    }
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA"))
        .build()
        .expect("http client");
    let url = format!("https://127.0.0.1:{quota_port}/v1/leases");
    // Warm up: every token reviewed once (and the store has every pod).
    for (token, body) in &fleet {
        loop {
            let answer = http
                .post(&url)
                .bearer_auth(token)
                .body(body.clone())
                .send()
                .await;
            if answer.is_ok_and(|a| a.status().is_success()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let fleet = Arc::new(fleet);
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let mut clients = Vec::new();
    for c in 0..32 {
        let (http, url, fleet) = (http.clone(), url.clone(), fleet.clone());
        clients.push(tokio::spawn(async move {
            let (mut ok, mut answered, mut n) = (0u64, 0u64, c);
            while Instant::now() < deadline {
                let (token, body) = &fleet[n % fleet.len()];
                n += 32;
                if let Ok(answer) = http
                    .post(&url)
                    .bearer_auth(token)
                    .body(body.clone())
                    .send()
                    .await
                {
                    let granted = answer.status().is_success();
                    if answer.bytes().await.is_ok() {
                        answered += 1;
                        ok += u64::from(granted);
                    }
                }
            }
            (ok, answered)
        }));
    }
    let (mut total, mut answers) = (0, 0);
    for c in clients {
        let (ok, answered) = c.await.expect("client");
        total += ok;
        answers += answered;
    }
    println!(
        "end to end over HTTPS, 32 clients, 50 pods, 10 s: {answers} answers ({:.0}/s), of which {total} leases ({:.0}/s; at most 50 pods × 4/s) and {} paced 429s",
        answers as f64 / 10.0,
        total as f64 / 10.0,
        answers - total
    );
    (total as f64 / 10.0, answers as f64 / 10.0)
}

fn in_process() -> InProcess {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();
    let (stores, calls) = stores();
    // Never contacted: every identity below is taken as already reviewed.
    let client = kube::Client::try_from(kube::Config::new(
        "https://127.0.0.1:1".parse().expect("url"),
    ))
    .expect("client");
    let (queues, _requested) = saleslayer_operator::controller::queues();
    let quota = Quota::new(
        stores,
        Authenticator::new(client),
        queues,
        Metrics::default().quota,
    );

    // Each round renews every pod once, a second after the last (a round
    // can take less than the 250 ms the API leaves between a pod's calls,
    // and such a call would be refused, not leased).
    let start = saleslayer_runtime::clock::wall_millis();
    let call = |(identity, body): &(Identity, Vec<u8>), now: u64| -> Vec<u8> {
        let report: LeaseReport = serde_json::from_slice(body).expect("report");
        let grant: LeaseGrant = quota.grant(identity, &report, now).expect("granted");
        serde_json::to_vec(&grant).expect("answer")
    };
    for c in &calls {
        call(c, start);
    }
    println!("live leases: {}", quota.live_leases());

    let rounds = 3;
    let started = Instant::now();
    for round in 1..=rounds {
        let now = start + round * 1_000;
        for c in &calls {
            std::hint::black_box(call(c, now));
        }
    }
    let elapsed = started.elapsed();
    let total = usize::try_from(rounds).unwrap_or(usize::MAX) * calls.len();
    let leases_per_s = total as f64 / elapsed.as_secs_f64();
    let us_each = elapsed.as_secs_f64() * 1e6 / total as f64;
    println!(
        "in process, {total} renewals over {} pods: {leases_per_s:.0} leases/s ({us_each:.1} µs each)",
        calls.len(),
    );

    // Memory of the lease book alone: 10 000 live leases.
    let before = resident_kib();
    let mut book = LeaseBook::new(0, 15_000, 5_000);
    let usable = saleslayer_core::allocation::UsableBudget {
        requests: 1_000_000,
        period_millis: 10_000,
    };
    let keys: Vec<_> = (0..1000)
        .map(|j| saleslayer_core::allocation::JobKey {
            namespace: format!("ns-{}", j % 10),
            integration: format!("integration-{}", j / 10),
            job: format!("job-{}", j % 10),
        })
        .collect();
    for (n, key) in keys.iter().enumerate() {
        for p in 0..10 {
            let pod = format!("{}-{}-{p}", key.integration, key.job);
            let request = LeaseRequest {
                account: "account",
                usable,
                job: key,
                pod: &pod,
                job_requests: 1000,
                max_concurrency: None,
                live_pods: 10,
                static_share: saleslayer_core::allocation::pod_share(1000, 10_000, 10, None),
            };
            book.lease(1 + n as u64, &request);
        }
    }
    let after = resident_kib();
    println!(
        "lease book with {} live leases: {} KiB resident more ({} bytes per lease)",
        book.live_leases(2000),
        after.saturating_sub(before),
        after.saturating_sub(before) * 1024 / 10_000
    );
    InProcess {
        leases_per_s,
        us_each,
        book_bytes_per_lease: after.saturating_sub(before) * 1024 / 10_000,
    }
}
