//! The sidecar against the simulator, on a manual clock: the simulator and
//! the proxy read the same clock, which moves only when the proxy waits, so
//! every wait is recorded and asserted exactly and nothing sleeps for real.
//! The last test takes leases from the real quota API on the testenv.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use saleslayer_runtime::clock::{Clock, ManualClock};
use saleslayer_runtime::serve::ServeLimits;
use saleslayer_sidecar::lease::{Identity, QuotaEndpoint, Renewer};
use saleslayer_sidecar::limits::Source;
use saleslayer_sidecar::pacer::Limit;
use saleslayer_sidecar::retry::{RetryPolicy, ThrottleStatuses};
use saleslayer_sidecar::{Proxy, ProxyConfig};
use saleslayer_simulator::{
    PRODUCTS_PATH, SimulatorConfig, SimulatorOptions, ThrottleSignal, router_with,
};
use serde_json::Value;

use crate::support::Env;

const KEY: &str = "acme-key";
/// More than the pacer's spacing at 100 per second: sequential calls this far
/// apart never wait, so the clock records only the retries' waits.
const APART: Duration = Duration::from_millis(10);

/// Page `page` (from 0) of ten products, keyset-paged as the `@nextLink`s are.
fn page_path(page: u64) -> String {
    format!("{PRODUCTS_PATH}?$top=10&$skipToken={}", page * 10)
}

/// The simulator on a loopback port, its window measured on `clock`.
async fn simulator(clock: &ManualClock, requests: u32, period: Duration) -> String {
    simulator_signalling(clock, requests, period, ThrottleSignal::default()).await
}

/// The same, throttling with `signal`.
async fn simulator_signalling(
    clock: &ManualClock,
    requests: u32,
    period: Duration,
    signal: ThrottleSignal,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let options = SimulatorOptions {
        signal,
        ..SimulatorOptions::default()
    };
    let app = router_with(
        SimulatorConfig { requests, period },
        &options,
        Arc::new(clock.clone()),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn config(upstream: &str, share: Limit, max_attempts: u32) -> ProxyConfig {
    ProxyConfig {
        upstream: upstream.to_owned(),
        env_share: share,
        policy: RetryPolicy {
            max_attempts,
            base_delay: Duration::from_millis(1_000),
            max_delay: Duration::from_millis(8_000),
            throttle_statuses: ThrottleStatuses::default(),
        },
        queue: 64,
        upstream_timeout: Duration::from_secs(5),
        limit_file: None,
        quota: None,
        max_body: saleslayer_sidecar::MAX_BODY,
        serve: ServeLimits::default(),
    }
}

fn share(requests: u32, period_millis: u64) -> Limit {
    Limit {
        requests,
        period_millis,
        max_concurrency: 4,
    }
}

fn proxy(config: &ProxyConfig, clock: &ManualClock) -> Arc<Proxy> {
    Proxy::new(config, Arc::new(clock.clone()), fastrand::Rng::with_seed(7)).expect("proxy")
}

/// One GET through the proxy: status, `Retry-After`, JSON body.
async fn call(proxy: &Proxy, path: &str, key: Option<&str>) -> (u16, Option<String>, Value) {
    let mut request = Request::builder().uri(path);
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    send(proxy, request.body(Body::empty()).expect("request")).await
}

/// A new product through the proxy, with an `Idempotency-Key` when given.
async fn post_product(
    proxy: &Proxy,
    idempotency_key: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut request = Request::post(PRODUCTS_PATH)
        .header("x-api-key", KEY)
        .header("content-type", "application/json");
    if let Some(key) = idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let body = Body::from(r#"{"prod_ref":"NEW-1"}"#);
    send(proxy, request.body(body).expect("request")).await
}

async fn send(proxy: &Proxy, request: Request<Body>) -> (u16, Option<String>, Value) {
    let response = proxy.forward(request).await;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, retry_after, body)
}

async fn stats(upstream: &str) -> Value {
    reqwest::get(format!("{upstream}/stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_request_waits_for_retry_after_then_succeeds() {
    let clock = ManualClock::default();
    let upstream = simulator(&clock, 2, Duration::from_secs(10)).await;
    let proxy = proxy(&config(&upstream, share(100, 1_000), 4), &clock);
    for page in 1..=3 {
        clock.advance(APART);
        let (status, _, body) = call(&proxy, &page_path(page), Some(KEY)).await;
        assert_eq!(status, 200, "page {page}: {body}");
        assert_eq!(body["value"][0]["prod_id"], page * 10 + 1);
    }
    // The third was throttled 20 ms after the first with Retry-After 10 (9.98 s
    // rounded up): one wait of exactly that (the jitter draw for attempt 1 is
    // below 1 s, so the floor wins).
    assert_eq!(clock.sleeps(), vec![Duration::from_secs(10)]);
    let seen = stats(&upstream).await;
    assert_eq!(
        (seen["accepted"].as_u64(), seen["throttled"].as_u64()),
        (Some(3), Some(1))
    );
    let usage = proxy.gate.take_usage();
    assert_eq!((usage.requests, usage.throttled, usage.retries), (4, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_answered_once_and_never_retried() {
    let clock = ManualClock::default();
    let upstream = simulator(&clock, 50, Duration::from_secs(10)).await;
    let proxy = proxy(&config(&upstream, share(100, 1_000), 4), &clock);
    let (status, _, body) = call(&proxy, &page_path(1), None).await;
    assert_eq!(status, 401, "{body}");
    clock.advance(APART);
    let (status, _, body) = call(&proxy, &format!("{PRODUCTS_PATH}?$top=abc"), Some(KEY)).await;
    assert_eq!(status, 400, "{body}");
    clock.advance(APART);
    let (status, _, body) = call(&proxy, "/nowhere", Some(KEY)).await;
    assert_eq!(status, 404, "{body}");
    assert!(clock.sleeps().is_empty(), "waited: {:?}", clock.sleeps());
    let seen = stats(&upstream).await;
    assert_eq!(seen["unauthorized"], 1);
    assert_eq!(seen["badRequest"], 1);
    let usage = proxy.gate.take_usage();
    assert_eq!((usage.requests, usage.retries), (3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_answer_reaches_the_caller_when_attempts_run_out() {
    let clock = ManualClock::default();
    let upstream = simulator(&clock, 1, Duration::from_secs(30)).await;
    let proxy = proxy(&config(&upstream, share(100, 1_000), 1), &clock);
    assert_eq!(call(&proxy, PRODUCTS_PATH, Some(KEY)).await.0, 200);
    clock.advance(APART);
    let (status, retry_after, body) = call(&proxy, PRODUCTS_PATH, Some(KEY)).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        retry_after.as_deref(),
        Some("30"),
        "the upstream's header passes through"
    );
    assert!(clock.sleeps().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_backs_off_one_to_two_floors_for_a_get() {
    let clock = ManualClock::default();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("address").port();
    drop(closed);
    let config = config(&format!("http://127.0.0.1:{port}"), share(100, 1_000), 4);
    let proxy = proxy(&config, &clock);
    let (status, _, body) = call(&proxy, PRODUCTS_PATH, Some(KEY)).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["reason"], "UpstreamUnreachable");
    // Three waits, each the floor 1, 2, 4 s times one plus a draw of the same seeded generator.
    assert_eq!(clock.sleeps(), seeded_backoff(&config.policy, 3));
    for (wait, floor) in clock.sleeps().iter().zip([1, 2, 4]) {
        let floor = Duration::from_secs(floor);
        assert!(*wait >= floor && *wait <= 2 * floor, "{wait:?}");
    }
}

/// The first `n` waits the proxy's seeded jitter gives under `policy`.
fn seeded_backoff(policy: &RetryPolicy, n: u32) -> Vec<Duration> {
    let mut draws = fastrand::Rng::with_seed(7);
    (1..=n)
        .map(|attempt| policy.backoff(attempt, draws.f64()))
        .collect()
}

/// Issue 14: Sales Layer documents no throttle status, so an account may
/// name 503, sent without `Retry-After`. The proxy then paces its retries by
/// its own backoff alone and reports them as throttling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_without_retry_after_is_throttling_when_the_account_says_so() {
    let clock = ManualClock::default();
    let signal = ThrottleSignal {
        status: 503,
        retry_after: false,
    };
    let upstream = simulator_signalling(&clock, 2, Duration::from_secs(10), signal).await;
    let mut config = config(&upstream, share(100, 1_000), 6);
    config.policy.throttle_statuses = ThrottleStatuses::parse("429,503").expect("statuses");
    let proxy = proxy(&config, &clock);
    for page in 0..3 {
        clock.advance(APART);
        let (status, retry_after, body) = call(&proxy, &page_path(page), Some(KEY)).await;
        assert_eq!((status, retry_after), (200, None), "page {page}: {body}");
    }
    // The third waited 1–2, 2–4, 4–8 and 8 s (the cap) until the window had
    // room again at 10.01 s: every wait the backoff's, none shorter.
    let sleeps = clock.sleeps();
    let expected = seeded_backoff(&config.policy, 5);
    assert_eq!(sleeps, expected[..sleeps.len()]);
    let waited: Duration = sleeps.iter().sum();
    assert!(waited >= Duration::from_secs(10), "{sleeps:?}");
    let retries = sleeps.len() as u64;
    let seen = stats(&upstream).await;
    assert_eq!(
        (seen["accepted"].as_u64(), seen["throttled"].as_u64()),
        (Some(3), Some(retries))
    );
    let usage = proxy.gate.take_usage();
    assert_eq!(
        (usage.requests, usage.throttled, usage.retries),
        (3 + retries, retries, retries)
    );
    assert_eq!(usage.by_status.get("503"), Some(&retries));
    let metrics = proxy.metrics.encode(&proxy.gate);
    assert!(
        metrics.contains(&format!("saleslayer_proxy_throttled_total {retries}")),
        "{metrics}"
    );
}

/// Issue 12, item 4: a throttled write was refused and goes again; a write
/// that met a 5xx may have been applied, and goes again only with an
/// `Idempotency-Key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_retried_when_throttled_but_not_after_a_5xx() {
    let clock = ManualClock::default();
    let signal = ThrottleSignal {
        status: 503,
        retry_after: true,
    };
    let upstream = simulator_signalling(&clock, 1, Duration::from_secs(5), signal).await;
    // An account that counts only 429 as throttling: the 503 is an outage.
    let as_outage = proxy(&config(&upstream, share(100, 1_000), 4), &clock);
    let (status, _, body) = post_product(&as_outage, None).await;
    assert_eq!(status, 201, "{body}");
    clock.advance(APART);
    let (status, _, _) = post_product(&as_outage, None).await;
    assert_eq!(status, 503, "answered once, not replayed");
    assert!(clock.sleeps().is_empty(), "{:?}", clock.sleeps());
    clock.advance(APART);
    let (status, _, body) = post_product(&as_outage, Some("order-42")).await;
    assert_eq!(
        status, 201,
        "with an Idempotency-Key it is replayed: {body}"
    );
    assert_eq!(clock.sleeps().len(), 1);

    // An account that names 503 as throttling: refused, so replayed.
    clock.advance(Duration::from_secs(5));
    let mut throttling = config(&upstream, share(100, 1_000), 4);
    throttling.policy.throttle_statuses = ThrottleStatuses::parse("503").expect("statuses");
    let as_throttle = proxy(&throttling, &clock);
    assert_eq!(post_product(&as_throttle, None).await.0, 201);
    clock.advance(APART);
    let (status, _, body) = post_product(&as_throttle, None).await;
    assert_eq!(status, 201, "{body}");
    let seen = stats(&upstream).await;
    assert_eq!(seen["created"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_keeps_a_strict_upstream_from_ever_throttling() {
    let clock = ManualClock::default();
    // The upstream allows exactly the grant: any window over it would be a 429.
    let upstream = simulator(&clock, 5, Duration::from_secs(1)).await;
    let proxy = proxy(&config(&upstream, share(5, 1_000), 1), &clock);
    for page in 0..40 {
        let (status, _, body) = call(&proxy, &page_path(page), Some(KEY)).await;
        assert_eq!(status, 200, "request {page}: {body}");
        assert!(proxy.gate.sent_in_window() <= 5);
    }
    let seen = stats(&upstream).await;
    assert_eq!(
        (seen["accepted"].as_u64(), seen["throttled"].as_u64()),
        (Some(40), Some(0))
    );
    // One every 200 ms: the 40th goes at 7.8 s, not before.
    assert_eq!(clock.now(), Duration::from_millis(7_800));
}

/// Leases from the real quota API; when it goes away the sidecar keeps the
/// grant until the lease expires, then paces by the limit file, then by the
/// env share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_pace_and_fall_back_to_the_file_then_the_env_when_the_quota_api_goes() {
    let mut env = Env::with_operator().await;
    env.namespace("shop").await;
    let (ok, out) = env.kubectl_apply(
        "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerIntegration
metadata: {name: catalog, namespace: shop}
spec:
  account: acme-prod
  jobs:
  - {name: import}
",
    );
    assert!(ok, "{out}");
    // The webhook admits from its stores: wait until they hold the integration.
    crate::support::eventually("the integration planned", || async {
        kube::Api::<saleslayer_core::api::SalesLayerIntegration>::namespaced(
            env.client.clone(),
            "shop",
        )
        .get("catalog")
        .await
        .map_err(|e| e.to_string())?
        .status
        .map(|_| ())
        .ok_or_else(|| "no status yet".to_owned())
    })
    .await;
    let pod = env.pod("shop", "import-0", "catalog", "import").await;
    let ca = env.ca_pem("shop").await;
    let token = saleslayer_testenv::pod_token(&env.client, &pod, 600)
        .await
        .expect("token request")
        .expect("a token");
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let endpoint = QuotaEndpoint {
        url: format!("https://127.0.0.1:{}", env.quota_port),
        token_file: write("token", &token),
        ca_file: Some(write("ca.crt", &ca)),
        identity: Identity {
            namespace: "shop".into(),
            integration: "catalog".into(),
            job: "import".into(),
            pod: "import-0".into(),
        },
    };
    let limit_file = write(
        "limit",
        r#"{"requests":7,"periodMillis":10000,"maxConcurrency":1}"#,
    );
    let clock = ManualClock::default();
    let mut config = config("http://127.0.0.1:9", share(2, 10_000), 1);
    config.quota = Some(endpoint.clone());
    config.limit_file = Some(limit_file.clone());
    let proxy = proxy(&config, &clock);
    let mut renewer = Renewer::new(
        proxy.gate.clone(),
        config.quota.clone(),
        config.limit_file.clone(),
        proxy.metrics.clone(),
    );

    // The whole usable budget (40 of 50/10 s) for the only pod of the only job.
    let leased = step_until(
        &mut renewer,
        "a lease of 40",
        |proxy_now, _| proxy_now.source == Source::Lease && proxy_now.limit.requests == 40,
        &proxy,
    )
    .await;
    assert_eq!(leased.limit.period_millis, 10_000);

    // The quota API goes away: the lease holds until its TTL (15 s) ends.
    env.stop_operator();
    step_until(
        &mut renewer,
        "a failed renewal",
        |_, metrics| metrics.contains(r#"saleslayer_proxy_lease_renewals_total{outcome="error"}"#),
        &proxy,
    )
    .await;
    assert_eq!(proxy.gate.snapshot().source, Source::Lease);
    clock.advance(Duration::from_secs(15));
    let now = proxy.gate.snapshot();
    assert_eq!((now.source, now.limit.requests), (Source::File, 7));

    // Without the file, the env share.
    std::fs::remove_file(&limit_file).expect("remove");
    renewer.step().await;
    let now = proxy.gate.snapshot();
    assert_eq!((now.source, now.limit.requests), (Source::Env, 2));
}

/// Renew until `done` holds for the gate and the metrics text, or panic after 30 s.
async fn step_until(
    renewer: &mut Renewer,
    what: &str,
    done: impl Fn(&saleslayer_sidecar::gate::Snapshot, &str) -> bool,
    proxy: &Proxy,
) -> saleslayer_sidecar::gate::Snapshot {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        renewer.step().await;
        let now = proxy.gate.snapshot();
        let metrics = proxy.metrics.encode(&proxy.gate);
        if done(&now, &metrics) {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not seen within 30 s; last: {now:?}\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
