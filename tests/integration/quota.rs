//! The quota API over HTTPS with real pod-bound tokens: who may lease, what
//! bad calls get, and persistent throttling turning on and off with Events
//! and notifications.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::routing::post;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use saleslayer_core::api::{SalesLayerAccount, SalesLayerIntegration};
use serde_json::{Value, json};

use crate::support::{Env, eventually, free_port};

/// Windows of 1 s, so the tests are quick: 50 per second, 40 usable.
const ACCOUNT: &str = "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerAccount
metadata: {name: acme-prod}
spec:
  limit: {requests: 50, periodSeconds: 1}
";

/// Persistent after 2 throttled windows.
const INTEGRATION: &str = "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerIntegration
metadata: {name: catalog, namespace: shop}
spec:
  account: acme-prod
  jobs:
  - {name: product-import, weight: 3}
  - {name: price-sync, weight: 1}
  alerting:
    persistentWindows: 2
    notify: {secretRef: {name: slack-hook, key: url}}
";

struct Quota {
    http: reqwest::Client,
    url: String,
}

impl Quota {
    /// One call, as a sidecar makes it: a pod told it renews too often
    /// (429 `TooFrequent`) waits its `Retry-After` and calls again.
    async fn post(&self, token: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        loop {
            let (status, retry_after, answer) = self.post_once(token, body.clone()).await;
            match retry_after {
                Some(seconds) if status == 429 && answer["reason"] == "TooFrequent" => {
                    tokio::time::sleep(Duration::from_secs(seconds)).await;
                }
                _ => return (status, answer),
            }
        }
    }

    /// [`Quota::post`], granted: the grant, or the status and body as an error.
    async fn granted(&self, token: &str, body: Vec<u8>) -> Result<Value, String> {
        match self.post(Some(token), body).await {
            (200, grant) => Ok(grant),
            (status, body) => Err(format!("{status} {body}")),
        }
    }

    /// One call exactly: its status, `Retry-After` (seconds) and body.
    async fn post_once(&self, token: Option<&str>, body: Vec<u8>) -> (u16, Option<u64>, Value) {
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("quota API answers");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, retry_after, body)
    }
}

fn report(pod: &str, job: &str, throttled: u64) -> Vec<u8> {
    json!({"namespace": "shop", "integration": "catalog", "job": job, "pod": pod,
        "usage": {"requests": 10, "byStatus": {"200": 10 - throttled.min(10), "429": throttled},
            "throttled": throttled, "retries": 0, "peakConcurrency": 1, "queued": 0}})
    .to_string()
    .into_bytes()
}

async fn token_for(env: &Env, pod: &Pod) -> String {
    saleslayer_testenv::pod_token(&env.client, pod, 600)
        .await
        .expect("token request")
        .expect("a token")
}

async fn setup() -> (Env, Quota, Arc<Mutex<Vec<Value>>>) {
    let env = Env::with_operator().await;
    env.namespace("shop").await;

    // A receiver for notifications, its URL in the Secret the spec names.
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = received.clone();
    let hook_port = free_port();
    let app = axum::Router::new().route(
        "/hook",
        post(move |Json(body): Json<Value>| {
            let sink = sink.clone();
            async move {
                if let Ok(mut all) = sink.lock() {
                    all.push(body);
                }
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", hook_port))
        .await
        .expect("bind");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (ok, out) = env.kubectl_stdin(
        &[
            "-n",
            "shop",
            "create",
            "secret",
            "generic",
            "slack-hook",
            "--from-file=url=/dev/stdin",
        ],
        &format!("http://127.0.0.1:{hook_port}/hook"),
    );
    assert!(ok, "{out}");

    let (ok, out) = env.kubectl_apply(ACCOUNT);
    assert!(ok, "{out}");
    let (ok, out) = env.kubectl_apply(INTEGRATION);
    assert!(ok, "{out}");
    let ca = env.ca_pem("shop").await;
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA PEM"))
        .build()
        .expect("client");
    let url = format!("https://127.0.0.1:{}/v1/leases", env.quota_port);
    (env, Quota { http, url }, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_lease_with_their_own_token_only() {
    let (env, quota, _) = setup().await;
    let import = env
        .pod("shop", "import-0", "catalog", "product-import")
        .await;
    let price = env.pod("shop", "price-0", "catalog", "price-sync").await;
    let import_token = token_for(&env, &import).await;
    let price_token = token_for(&env, &price).await;

    // Wait until the operator's pod store has seen the pod.
    let grant = eventually("a grant for import-0", || {
        quota.granted(&import_token, report("import-0", "product-import", 0))
    })
    .await;
    assert_eq!(grant["periodMillis"], 1000);
    assert_eq!(grant["ttlMillis"], 15000);
    assert_eq!(
        grant["refreshMillis"], 2000,
        "half the 1 s period, at least 2 s"
    );
    let requests = grant["requests"].as_u64().expect("requests");
    assert!((1..=30).contains(&requests), "{grant}");

    // Someone else's token: 403. No token: 401. Garbage: 400. Too big: 413.
    let (status, body) = quota
        .post(Some(&price_token), report("import-0", "product-import", 0))
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reason"], "NotYourPod");
    let (status, body) = quota
        .post(None, report("import-0", "product-import", 0))
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["reason"], "NoToken");
    let (status, body) = quota
        .post(Some("not-a-token"), report("import-0", "product-import", 0))
        .await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = quota
        .post(Some(&import_token), b"{\"namespace\": 3".to_vec())
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    let (status, body) = quota.post(Some(&import_token), vec![b' '; 70 * 1024]).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["reason"], "BodyTooLarge");
    // A pod claiming a job it does not run: 403; an unknown job: 404.
    let (status, body) = quota
        .post(Some(&import_token), report("import-0", "price-sync", 0))
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = quota
        .post(Some(&import_token), report("import-0", "image-sync", 0))
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("product-import")),
        "{body}"
    );

    // /metrics counts what happened; /healthz answers.
    let base = format!("http://127.0.0.1:{}", env.metrics_port);
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let job =
        r#"integration_namespace="shop",integration="catalog",saleslayer_job="product-import""#;
    for line in [
        format!("saleslayer_lease_grants_total{{{job}}} 1"),
        format!("saleslayer_requests_total{{{job},code=\"200\"}} 10"),
        r#"saleslayer_lease_refusals_total{outcome="NotYourPod"} 1"#.to_owned(),
        r#"saleslayer_lease_refusals_total{outcome="NoToken"} 1"#.to_owned(),
        r#"saleslayer_lease_refusals_total{outcome="BodyTooLarge"} 1"#.to_owned(),
        r#"saleslayer_account_usable_requests{account="acme-prod"} 40"#.to_owned(),
        r#"saleslayer_account_effective_requests{account="acme-prod"} 40"#.to_owned(),
    ] {
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
    assert!(text.contains("saleslayer_allocated_requests{"), "{text}");
    assert!(
        text.contains(r#"saleslayer_webhook_admissions_total{outcome="allowed"}"#),
        "{text}"
    );
    assert!(
        text.contains("saleslayer_reconcile_duration_seconds_count"),
        "{text}"
    );
    let health = reqwest::get(format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_throttling_fires_and_resolves() {
    let (env, quota, received) = setup().await;
    let price = env.pod("shop", "price-0", "catalog", "price-sync").await;
    let token = token_for(&env, &price).await;
    let slis = Api::<SalesLayerIntegration>::namespaced(env.client.clone(), "shop");
    let condition = |status: Option<saleslayer_core::api::SalesLayerIntegrationStatus>| {
        status
            .and_then(|s| {
                s.conditions
                    .into_iter()
                    .find(|c| c.type_ == "PersistentThrottling")
            })
            .map(|c| (c.status, c.message))
    };

    // One report of price-0 with `throttled` 429s; refused is an error.
    let send = |throttled| {
        let (quota, token) = (&quota, &token);
        async move {
            quota
                .granted(token, report("price-0", "price-sync", throttled))
                .await
                .map(|_| ())
                .map_err(|refused| format!("report refused: {refused}"))
        }
    };

    // Throttled reports in consecutive 1 s windows.
    eventually("PersistentThrottling=True", || async {
        send(3).await?;
        let sli = slis.get("catalog").await.map_err(|e| e.to_string())?;
        match condition(sli.status.clone()) {
            Some((s, m)) if s == "True" => {
                assert!(m.contains("price-sync"), "{m}");
                let job = sli
                    .status
                    .as_ref()
                    .and_then(|s| s.jobs.iter().find(|j| j.name == "price-sync").cloned())
                    .expect("job status");
                assert!(
                    job.throttled_windows >= 2 && job.last_throttled.is_some(),
                    "{job:?}"
                );
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // kubectl shows it too. Reports go on meanwhile: a window without
    // throttled reports would end the run before a slow kubectl reads it.
    eventually("kubectl shows the throttled job", || async {
        send(3).await?;
        let table = env.kubectl(&[
            "-n",
            "shop",
            "get",
            "sli",
            "catalog",
            "-o",
            "jsonpath={.status.summary.throttling}",
        ]);
        if table == "price-sync" {
            Ok(())
        } else {
            Err(format!("summary.throttling is {table:?}"))
        }
    })
    .await;

    // Clean reports: one clean window resolves it.
    eventually("PersistentThrottling=False", || async {
        send(0).await?;
        let sli = slis.get("catalog").await.map_err(|e| e.to_string())?;
        match condition(sli.status) {
            Some((s, _)) if s == "False" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    for (reason, type_) in [
        ("PersistentThrottling", "Warning"),
        ("ThrottlingResolved", "Normal"),
    ] {
        eventually(&format!("{type_} event {reason}"), || async {
            let events = env.kubectl(&[
                "-n",
                "shop",
                "get",
                "events",
                "-o",
                "jsonpath={range .items[*]}{.type}/{.reason}{'\\n'}{end}",
            ]);
            if events.lines().any(|l| l == format!("{type_}/{reason}")) {
                Ok(())
            } else {
                Err(events)
            }
        })
        .await;
    }
    let notes = eventually("both notifications", || async {
        let all = received.lock().map(|r| r.clone()).unwrap_or_default();
        if all.len() >= 2 {
            Ok(all)
        } else {
            Err(format!("{all:?}"))
        }
    })
    .await;
    assert_eq!(notes[0]["state"], "firing");
    assert_eq!(notes[0]["integration"], "catalog");
    assert_eq!(notes[0]["namespace"], "shop");
    assert_eq!(notes[0]["jobs"], json!(["price-sync"]));
    assert!(
        notes[0]["throttledRequests"]
            .as_u64()
            .is_some_and(|n| n >= 6),
        "{}",
        notes[0]
    );
    assert!(notes[0]["windows"].as_u64().is_some_and(|n| n >= 2));
    assert!(notes[0]["since"].as_str().is_some());
    assert_eq!(notes[1]["state"], "resolved");
    assert_eq!(notes[1]["jobs"], json!(["price-sync"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_renewing_too_often_gets_429_too_frequent() {
    let (env, quota, _) = setup().await;
    let import = env
        .pod("shop", "import-0", "catalog", "product-import")
        .await;
    let token = token_for(&env, &import).await;
    eventually("a grant for import-0", || {
        quota.granted(&token, report("import-0", "product-import", 0))
    })
    .await;
    // Right after a grant: refused, told when to come back (whole seconds,
    // rounded up from 250 ms), in JSON. (A call that came late is granted and
    // the next one is early.)
    let (retry_after, body) = eventually("a call within 250 ms of a grant", || async {
        match quota
            .post_once(Some(&token), report("import-0", "product-import", 0))
            .await
        {
            (429, retry_after, body) => Ok((retry_after, body)),
            (status, _, body) => Err(format!("{status} {body}")),
        }
    })
    .await;
    assert_eq!(body["reason"], "TooFrequent");
    assert_eq!(retry_after, Some(1));
    // Waiting as told is enough.
    let (status, body) = quota
        .post(Some(&token), report("import-0", "product-import", 0))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_pods_never_hold_more_than_the_usable_budget() {
    let (env, quota, _) = setup().await;
    let mut fleet = Vec::new();
    for n in 0..20 {
        let (name, job) = if n % 5 < 3 {
            (format!("import-{n}"), "product-import")
        } else {
            (format!("price-{n}"), "price-sync")
        };
        let pod = env.pod("shop", &name, "catalog", job).await;
        let token = token_for(&env, &pod).await;
        fleet.push((name, job, token));
    }
    // Wait until the operator's store has the last pod.
    let (last, last_job, last_token) = fleet.last().cloned().expect("pods");
    eventually("the store has every pod", || {
        quota.granted(&last_token, report(&last, last_job, 0))
    })
    .await;

    // Half the fleet leases first, then everyone renews in rounds; every
    // grant is live for 15 s, longer than this test, so the latest grant of
    // each pod counts. Their rates may never add up to more than 40 per 1 s.
    let mut held: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    let mut order: Vec<usize> = (0..10).collect();
    for round in 0..4 {
        if round == 1 {
            order = (0..20).collect();
        }
        for &i in &order {
            let (name, job, token) = &fleet[i];
            let (status, grant) = quota.post(Some(token), report(name, job, 0)).await;
            assert_eq!(status, 200, "{grant}");
            let requests = grant["requests"].as_u64().expect("requests");
            let period = grant["periodMillis"].as_u64().expect("period");
            held.insert(name.clone(), (requests, period));
            let rate: f64 = held.values().map(|(r, p)| *r as f64 / *p as f64).sum();
            assert!(
                rate <= 40.0 / 1000.0 + 1e-12,
                "round {round}: {held:?} add up to {} per second",
                rate * 1000.0
            );
        }
    }
    // After renewals every pod holds a share and the budget is used.
    let rate: f64 = held.values().map(|(r, p)| *r as f64 / *p as f64).sum();
    assert!(held.values().all(|(r, _)| *r > 0), "{held:?}");
    assert!(
        rate * 1000.0 >= 30.0,
        "only {} of 40 per second granted: {held:?}",
        rate * 1000.0
    );
}

fn usage(pod: &str, job: &str, requests: u64, queued: u64) -> Vec<u8> {
    json!({"namespace": "shop", "integration": "catalog", "job": job, "pod": pod,
        "usage": {"requests": requests, "byStatus": {"200": requests}, "throttled": 0,
            "retries": 0, "peakConcurrency": 1, "queued": queued}})
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_demand_is_lent_and_returns_when_pods_queue() {
    let (env, quota, _) = setup().await;
    env.kubectl(&[
        "-n",
        "shop",
        "patch",
        "sli",
        "catalog",
        "--type=merge",
        "-p",
        r#"{"spec": {"lendIdleCapacity": true}}"#,
    ]);
    let import = env
        .pod("shop", "import-0", "catalog", "product-import")
        .await;
    let price = env.pod("shop", "price-0", "catalog", "price-sync").await;
    let import_token = token_for(&env, &import).await;
    let price_token = token_for(&env, &price).await;
    let slis = Api::<SalesLayerIntegration>::namespaced(env.client.clone(), "shop");
    let allocations = || async {
        let sli = slis.get("catalog").await.map_err(|e| e.to_string())?;
        let mut jobs: Vec<(String, u32)> = sli
            .status
            .map(|s| {
                s.jobs
                    .into_iter()
                    .map(|j| (j.name, j.allocated_requests))
                    .collect()
            })
            .unwrap_or_default();
        jobs.sort();
        Ok::<_, String>(jobs)
    };
    let want = |price: u32, import: u32| {
        vec![
            ("price-sync".to_owned(), price),
            ("product-import".to_owned(), import),
        ]
    };

    // One round: product-import stays busy, price-sync reports `sent`/`queued`;
    // then the allocations as status shows them.
    let round = |sent: u64, queued: u64| {
        let (quota, import_token, price_token) = (&quota, &import_token, &price_token);
        let allocations = &allocations;
        async move {
            for (token, body) in [
                (import_token, usage("import-0", "product-import", 30, 50)),
                (price_token, usage("price-0", "price-sync", sent, queued)),
            ] {
                let (status, answer) = quota.post(Some(token), body).await;
                if status != 200 {
                    return Err(format!("{status} {answer}"));
                }
            }
            allocations().await
        }
    };

    // Both busy: 40 split 1:3.
    eventually("10/30 while both queue", || async {
        let seen = round(10, 5).await?;
        if seen == want(10, 30) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;

    // price-sync idles (it keeps renewing, sends nothing, queues nothing): what
    // it leaves goes to product-import. How often it reports must not matter.
    eventually("price-sync lends its idle share", || async {
        let seen = round(0, 0).await?;
        match seen.as_slice() {
            [(_, price), (_, import)] if *price < 10 && price + import == 40 => Ok(()),
            _ => Err(format!("{seen:?}")),
        }
    })
    .await;

    // It queues again: its share comes back.
    eventually("price-sync gets its share back", || async {
        let seen = round(5, 40).await?;
        if seen == want(10, 30) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_despite_pacing_lowers_the_budget_and_clean_windows_raise_it() {
    let (env, quota, _) = setup().await;
    // Windows of 2 s: the lowered budget stays visible for a few seconds
    // even on a busy machine (2 windows of hold, then 12 clean windows bring
    // 28 back to 40).
    let account =
        ACCOUNT.replace("periodSeconds: 1", "periodSeconds: 2") + "  adaptive: {holdWindows: 2}\n";
    let (ok, out) = env.kubectl_apply(&account);
    assert!(ok, "{out}");
    let import = env
        .pod("shop", "import-0", "catalog", "product-import")
        .await;
    let token = token_for(&env, &import).await;
    let accounts = Api::<SalesLayerAccount>::all(env.client.clone());
    let effective = || async {
        accounts
            .get("acme-prod")
            .await
            .map_err(|e| e.to_string())?
            .status
            .and_then(|s| s.effective)
            .map(|e| e.requests)
            .ok_or_else(|| "no effective budget yet".to_owned())
    };
    let lease = |throttled: u64| {
        let (quota, token) = (&quota, &token);
        async move {
            quota
                .granted(token, report("import-0", "product-import", throttled))
                .await
                .map(|grant| grant["requests"].as_u64().unwrap_or(0))
        }
    };
    eventually("the whole budget at first", || async {
        lease(0).await?;
        match effective().await? {
            40 => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;

    // Sales Layer throttles the paced pod: the account sends less at once,
    // says why, and the grants follow. All 10 of the report throttled (and at
    // most one other report of 10 in its window: one renewal a second) is
    // at least half throttled, so the cut is the most the policy allows:
    // 40 × 0.7 = 28.
    lease(10)
        .await
        .expect("a throttled report is still a lease");
    let lowered = eventually("the effective budget lowered", || async {
        match effective().await? {
            e if e < 40 => Ok(e),
            other => Err(other.to_string()),
        }
    })
    .await;
    assert_eq!(lowered, 28);
    let granted = eventually("a grant within the lowered budget", || async {
        let granted = lease(0).await?;
        // import-0 is the only pod of product-import (weight 3 of 4).
        if granted <= u64::from(lowered) * 3 / 4 + 1 {
            Ok(granted)
        } else {
            Err(format!("granted {granted} of a lowered {lowered}"))
        }
    })
    .await;
    assert!(granted > 0);
    let adapting = env.kubectl(&[
        "get",
        "sla",
        "acme-prod",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Adapting\")].status}/{.status.conditions[?(@.type==\"Adapting\")].reason}",
    ]);
    assert!(adapting.starts_with("True/"), "{adapting}");
    for (namespace_flag, object) in [(vec!["-A"], "acme-prod"), (vec!["-n", "shop"], "catalog")] {
        eventually(&format!("Warning BudgetLowered about {object}"), || async {
            let mut args = vec!["get", "events"];
            args.extend(namespace_flag.iter().copied());
            args.extend([
                "-o",
                "jsonpath={range .items[*]}{.type}/{.reason}/{.involvedObject.name}{'\\n'}{end}",
            ]);
            let events = env.kubectl(&args);
            if events
                .lines()
                .any(|l| l == format!("Warning/BudgetLowered/{object}"))
            {
                Ok(())
            } else {
                Err(events)
            }
        })
        .await;
    }

    // Clean windows: after the hold, one more request per window, back to
    // the whole budget.
    eventually("the effective budget back to 40", || async {
        lease(0).await?;
        match effective().await? {
            40 => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    let table = env.kubectl(&["get", "sla"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "LIMIT",
            "USABLE",
            "EFFECTIVE",
            "INTEGRATIONS",
            "PODS",
            "THROTTLING",
            "READY",
            "AGE"
        ]
    );
    let row: Vec<&str> = lines.next().expect("a row").split_whitespace().collect();
    assert_eq!(
        &row[..4],
        ["acme-prod", "50/2s", "40/2s", "40/2s"],
        "{table}"
    );
    assert_eq!(row[4], "1", "{table}");
}
