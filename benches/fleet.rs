//! The fleet benchmark (issue 7): 4 jobs × 3 pods of load generators sending
//! flat out at one Sales Layer account, with and without the operator.
//!
//! ```text
//!  48 workers ──▶ 12 sidecars (in process) ──▶ simulator (50 per period, one API key)
//!                        │ leases (scenario c)
//!                        ▼
//!       quota API of the operator (in process) ◀── testenv etcd + kube-apiserver
//! ```
//!
//! The simulator enforces the documented ratio scaled to a short period: 50
//! requests per 1 s sliding window (`FLEET_PERIOD_SECONDS=10` runs the
//! documented 50 per 10 s). The integration declares that limit, headroom
//! 20 % (usable 40 per period), `lendIdleCapacity: true` and 4 jobs of
//! weight 1, and the 12 pods are real API objects admitted by the webhook and
//! counted by the controller. Every worker pages through the catalog with
//! `GET /catalog/rest/Catalog/Products?$top=10&$skipToken=…` and the account's one API key as soon as its previous answer is in. Each
//! scenario runs on a fresh simulator for `FLEET_PERIODS` periods (default 60)
//! and its `/stats` count what was served and throttled:
//!
//! - (a) no coordination: the workers call the simulator directly, each with
//!   its own retry policy (4 attempts, exponential backoff with full jitter,
//!   `Retry-After` honoured as a floor: the proxy's own policy);
//! - (b) an even static split without leases: sidecars pacing by the pod's
//!   `saleslayer.io/limit` annotation (what the webhook injects as env), and
//!   the same with the exact split `usable ÷ 12` as a stretched period;
//! - (c) the operator: sidecars leasing from the quota API.
//!
//! Then, still in (c), one job's workers stop (its sidecars keep renewing,
//! reporting nothing sent and nothing queued) and come back; each job's grant
//! and its upstream 200s (the sidecars' own counters) are sampled four times a
//! period, and a figure counts once it has held for a whole period.
//! The retry policy is the documented one scaled to the period (base period
//! ÷ 10, max 8 × that: 100 / 800 ms at 1 s). The lease refresh is the
//! operator's own rule (half a period, between 2 and 5 s: 2 s at 1 s) and
//! the TTL (15 s) its constant, not scaled.
//!
//! - (d) an outside consumer (`outside`): someone else takes 30 % of the limit
//!   with the same key mid-run, then stops; no coordination, the static split,
//!   leases without and with adaptation side by side.
//!
//! Every scenario also counts the operator's writes to the API server (the
//! API server's own `apiserver_request_total` for the verbs that change
//! something; the benchmark itself writes nothing while a scenario runs).
//! `FLEET_SCENARIOS` picks scenarios (default `a,b,c,d`).
//!
//! Run: `make bench-fleet` (or `cargo bench --bench fleet`).

#[path = "../tests/support/operator.rs"]
mod support;

#[path = "fleet/outside.rs"]
mod outside;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use saleslayer_contract::{ANNOTATION_LIMIT, LABEL_INTEGRATION};
use saleslayer_core::allocation::pod_share;
use saleslayer_core::api::SalesLayerIntegration;
use saleslayer_runtime::clock::{Clock, SystemClock};
use saleslayer_runtime::serve::ServeLimits;
use saleslayer_sidecar::lease::{Identity, QuotaEndpoint, Renewer};
use saleslayer_sidecar::metrics::CodeLabel;
use saleslayer_sidecar::pacer::Limit;
use saleslayer_sidecar::retry::{self, Outcome, RetryPolicy, ThrottleStatuses};
use saleslayer_sidecar::{self as proxy, Proxy, ProxyConfig};
use saleslayer_simulator::{
    self as simulator, API_KEY_HEADER, PRODUCTS_PATH, SimulatorConfig, SimulatorStats,
};
use saleslayer_testenv as testenv;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const NAMESPACE: &str = "shop";
const INTEGRATION: &str = "catalog";
const JOBS: [&str; 4] = ["import", "prices", "stock", "assets"];
const PODS_PER_JOB: usize = 3;
const WORKERS_PER_POD: usize = 4;
const LIMIT: u32 = 50;
const HEADROOM_PERCENT: u32 = 20;
const USABLE: u32 = LIMIT * (100 - HEADROOM_PERCENT) / 100;
/// The account's one API key: every pod sends it.
const API_KEY: &str = "acme-prod-key";

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(bench())
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .with_context(|| format!("{name}={value:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// One pod of the fleet, as the API server has it.
struct FleetPod {
    job: usize,
    name: String,
    token_file: PathBuf,
    /// The pod's `saleslayer.io/limit` annotation: its static share.
    annotated: Limit,
}

/// What a scenario measured: over the whole run, and after its first
/// [`WARM_UP`] (the first lease round: sidecars start on their env share and
/// a job's pods settle on their leases over one or two renewals).
struct Measured {
    name: String,
    seconds: f64,
    stats: SimulatorStats,
    warm_seconds: f64,
    warm_accepted: u64,
    warm_throttled: u64,
    /// The operator's writes to the API server during the scenario, by resource.
    writes: BTreeMap<String, u64>,
}

impl Measured {
    /// Writes per minute, TokenReviews and the like (which store nothing) left out.
    fn writes_per_minute(&self) -> f64 {
        60.0 * stored_writes(&self.writes) as f64 / self.seconds
    }
}

/// The first lease round, left out of the steady figures (two refreshes at
/// the documented 10 s period).
const WARM_UP: Duration = Duration::from_secs(10);

async fn bench() -> anyhow::Result<()> {
    let period = Duration::from_secs(env_u64("FLEET_PERIOD_SECONDS", 1)?.max(1));
    let periods = env_u64("FLEET_PERIODS", 60)?.max(1);
    let length = period * u32::try_from(periods).context("FLEET_PERIODS is too large")?;
    let period_ms = u64::try_from(period.as_millis()).context("period")?;
    let policy = RetryPolicy {
        max_attempts: 4,
        base_delay: period / 10,
        max_delay: period * 8 / 10,
        throttle_statuses: ThrottleStatuses::default(),
    };
    println!(
        "fleet: simulator {LIMIT} requests per {period:?} (the documented 50/10 s ratio{}), one API key; \
         usable {USABLE} per period (headroom {HEADROOM_PERCENT} %); {} jobs × {PODS_PER_JOB} pods × \
         {WORKERS_PER_POD} workers; {periods} periods per scenario; retry {policy:?}",
        if period_ms == 10_000 {
            ", unscaled"
        } else {
            " scaled"
        },
        JOBS.len()
    );

    let scratch = tempfile::tempdir().context("scratch directory")?;
    let (_plane, client, ports) = support::with_operator(&[NAMESPACE]).await;
    support::account(
        &client,
        "acme-prod",
        json!({
            "limit": {"requests": LIMIT, "periodSeconds": period.as_secs()},
            "headroomPercent": HEADROOM_PERCENT,
            // The fleet measures pacing against a fixed budget; adaptation
            // has its own scenario.
            "adaptive": {"enabled": false},
        }),
    )
    .await;
    let spec = serde_json::from_value(json!({
        "account": "acme-prod",
        "lendIdleCapacity": true,
        "jobs": JOBS.iter().map(|job| json!({"name": job, "weight": 1})).collect::<Vec<_>>(),
    }))
    .context("integration spec")?;
    Api::<SalesLayerIntegration>::namespaced(client.clone(), NAMESPACE)
        .create(
            &PostParams::default(),
            &SalesLayerIntegration::new(INTEGRATION, spec),
        )
        .await
        .context("creating the integration")?;
    let ca_file = scratch.path().join("ca.crt");
    let ca = wait_for(
        "the operator's CA ConfigMap",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move {
                let map = Api::<ConfigMap>::namespaced(client, NAMESPACE)
                    .get("saleslayer-operator-ca")
                    .await
                    .ok()?;
                map.data.and_then(|d| d.get("ca.crt").cloned())
            }
        },
    )
    .await?;
    std::fs::write(&ca_file, ca).context("writing the CA file")?;
    let pods = create_pods(&client, scratch.path()).await?;
    let fleet = wait_for_shares(&client, pods, period_ms).await?;
    let quota_url = format!("https://127.0.0.1:{}", ports.quota);

    let setup = Setup {
        fleet: &fleet,
        period,
        length,
        policy,
        client: &client,
    };
    let chosen = std::env::var("FLEET_SCENARIOS").unwrap_or_else(|_| "a,b,c,d".into());
    let chosen: Vec<&str> = chosen.split(',').map(str::trim).collect();
    let mut results = Vec::new();
    if chosen.contains(&"a") {
        results.push(
            scenario(
                "(a) no coordination: own retry + backoff per worker",
                setup,
                Sidecars::None,
            )
            .await?,
        );
    }
    if chosen.contains(&"b") {
        results.push(
            scenario(
                "(b) static split, the pod's annotation (env share)",
                setup,
                Sidecars::Static(None),
            )
            .await?,
        );
        let pods_total = (JOBS.len() * PODS_PER_JOB) as u64;
        let exact = Limit {
            requests: 1,
            period_millis: (period_ms * pods_total).div_ceil(u64::from(USABLE)),
            max_concurrency: 1,
        };
        results.push(
            scenario(
                &format!(
                    "(b′) static split, exact: 1 per {} ms per pod",
                    exact.period_millis
                ),
                setup,
                Sidecars::Static(Some(exact)),
            )
            .await?,
        );
    }
    let leases = || Sidecars::Leased {
        url: quota_url.clone(),
        ca_file: ca_file.clone(),
    };
    let mut idle_and_return_figures = serde_json::Value::Null;
    if chosen.contains(&"c") {
        let (measured, running) = start_scenario(
            "(c) the operator: leases from the quota API",
            setup,
            leases(),
        )
        .await?;
        // The first lease round, printed: where the start loses budget.
        let mut start = Vec::new();
        let warm_up = WARM_UP.min(measured.length / 2);
        let left = warm_up.saturating_sub(measured.started.elapsed() + period / 4);
        sample_for(
            &running,
            measured.started,
            left,
            period,
            "start",
            &mut start,
        )
        .await;
        let measured = measured.finish(&running).await?;
        results.push(measured);
        println!("load average after the scenarios: {}", load_average());
        print_table(&results, period);
        idle_and_return_figures = idle_and_return(&running, period).await?;
        running.stop();
    } else {
        print_table(&results, period);
    }
    let usable_per_second = f64::from(USABLE) / period.as_secs_f64();
    let scenarios: Vec<serde_json::Value> = results
        .iter()
        .map(|m| {
            let percent =
                |served: u64, seconds: f64| 100.0 * served as f64 / seconds / usable_per_second;
            json!({
                "scenario": m.name,
                "served": m.stats.accepted,
                "throttled": m.stats.throttled,
                "utilisation": percent(m.stats.accepted, m.seconds) / 100.0,
                "served_pct_of_usable": percent(m.stats.accepted, m.seconds),
                "throttled_after_warm_up": m.warm_throttled,
                "served_pct_of_usable_after_warm_up": percent(m.warm_accepted, m.warm_seconds),
                "api_writes_per_minute": m.writes_per_minute(),
                "api_writes_by_resource": m.writes,
            })
        })
        .collect();
    for scenario in &scenarios {
        println!("BENCH {scenario}");
    }
    let outside = if chosen.contains(&"d") {
        outside::run(setup, &leases).await?
    } else {
        Vec::new()
    };
    println!("load average at the end: {}", load_average());
    let headline = json!({
        "bench": "fleet",
        "period_seconds": period.as_secs(),
        "periods": periods,
        "scenarios": scenarios,
        "idle_and_return": idle_and_return_figures,
        "outside_consumer": outside,
    });
    println!("BENCH {headline}");
    Ok(())
}

/// Write requests the API server has served so far, by resource (and
/// subresource): its `apiserver_request_total` for the verbs that change
/// something. Everyone's, so read it only while the operator alone writes.
async fn api_writes(client: &kube::Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .context("a /metrics request")?;
    let text = client
        .request_text(request)
        .await
        .context("the API server's /metrics")?;
    let mut writes = BTreeMap::new();
    for line in text
        .lines()
        .filter(|line| line.starts_with("apiserver_request_total{"))
    {
        let label = |name: &str| {
            let key = format!("{name}=\"");
            let at = line.find(&key)? + key.len();
            let rest = &line[at..];
            Some(rest[..rest.find('"')?].to_owned())
        };
        let writes_something = matches!(
            label("verb").as_deref(),
            Some("POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION")
        );
        let count = line
            .rsplit(' ')
            .next()
            .and_then(|value| value.parse::<f64>().ok());
        let (true, Some(count)) = (writes_something, count) else {
            continue;
        };
        let resource = label("resource").unwrap_or_default();
        let resource = match label("subresource") {
            Some(sub) if !sub.is_empty() => format!("{resource}/{sub}"),
            _ => resource,
        };
        *writes.entry(resource).or_default() += count as u64;
    }
    Ok(writes)
}

/// What the operator wrote between two readings of [`api_writes`].
fn writes_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(resource, n)| {
            let was = before.get(resource).copied().unwrap_or(0);
            (resource.clone(), n.saturating_sub(was))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Writes that store something: TokenReviews and access reviews are POSTs
/// the API server answers without writing.
fn stored_writes(writes: &BTreeMap<String, u64>) -> u64 {
    writes
        .iter()
        .filter(|(resource, _)| !resource.ends_with("reviews"))
        .map(|(_, n)| n)
        .sum()
}

/// `/proc/loadavg`'s first three figures: other work on the same cores.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Poll `probe` until it answers, for at most `deadline`.
async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() > until {
            bail!("{what}: not there after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The 12 pods, created through the API (the webhook admits them), each
/// with a bound token in a file.
async fn create_pods(
    client: &kube::Client,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<(usize, String, PathBuf)>> {
    let api = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let mut pods = Vec::new();
    for (job_index, job) in JOBS.iter().enumerate() {
        for n in 0..PODS_PER_JOB {
            let name = format!("{job}-{n}");
            let template = testenv::labelled_pod(Some(&name), None, INTEGRATION, job);
            // The webhook may not be registered yet: retry until it admits.
            let pod = wait_for(
                &format!("admission of pod {name}"),
                Duration::from_secs(60),
                || {
                    let (api, template) = (api.clone(), template.clone());
                    async move { api.create(&PostParams::default(), &template).await.ok() }
                },
            )
            .await?;
            let token = testenv::pod_token(client, &pod, 3600)
                .await
                .context("token request")?
                .context("no token in the answer")?;
            let token_file = dir.join(format!("{name}.token"));
            std::fs::write(&token_file, token).context("writing a token")?;
            pods.push((job_index, name, token_file));
        }
    }
    Ok(pods)
}

/// Wait until the controller has annotated every pod with the share of a
/// job of 3 pods (usable ÷ 4 jobs, split over 3 pods).
async fn wait_for_shares(
    client: &kube::Client,
    pods: Vec<(usize, String, PathBuf)>,
    period_ms: u64,
) -> anyhow::Result<Vec<FleetPod>> {
    let expected: Limit = pod_share(
        USABLE / JOBS.len() as u32,
        period_ms,
        PODS_PER_JOB as u32,
        None,
    )
    .into();
    let api = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let list = ListParams::default().labels(&format!("{LABEL_INTEGRATION}={INTEGRATION}"));
    wait_for(
        &format!("every pod annotated {expected:?}"),
        Duration::from_secs(60),
        || {
            let (api, list) = (api.clone(), list.clone());
            async move {
                let listed = api.list(&list).await.ok()?;
                let all = listed.items.len() == JOBS.len() * PODS_PER_JOB
                    && listed.items.iter().all(|pod| {
                        pod.metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(ANNOTATION_LIMIT))
                            .and_then(|v| serde_json::from_str::<Limit>(v).ok())
                            == Some(expected)
                    });
                all.then_some(())
            }
        },
    )
    .await?;
    println!("every pod annotated {expected:?} (the static share)");
    Ok(pods
        .into_iter()
        .map(|(job, name, token_file)| FleetPod {
            job,
            name,
            token_file,
            annotated: expected,
        })
        .collect())
}

/// How the workers reach the simulator.
enum Sidecars {
    /// Directly, each worker retrying on its own.
    None,
    /// Through a sidecar per pod pacing by a fixed share: the pod's
    /// annotation, or the given one.
    Static(Option<Limit>),
    /// Through a sidecar per pod leasing from the quota API.
    Leased { url: String, ca_file: PathBuf },
}

/// A scenario while it runs.
struct Running {
    simulator: String,
    proxies: Vec<(usize, Arc<Proxy>)>,
    active: Vec<watch::Sender<bool>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    fn stop(&self) {
        let _ = self.stop.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Upstream 200s per job so far, as the sidecars counted them.
    fn served(&self) -> Vec<u64> {
        let ok = CodeLabel { code: "200".into() };
        let mut per_job = vec![0; JOBS.len()];
        for (job, proxy) in &self.proxies {
            per_job[*job] += proxy.metrics.requests.get_or_create(&ok).get();
        }
        per_job
    }

    /// Requests per second granted to each job's sidecars right now.
    fn granted(&self) -> Vec<f64> {
        let mut per_job = vec![0.0; JOBS.len()];
        for (job, proxy) in &self.proxies {
            let limit = proxy.gate.snapshot().limit;
            per_job[*job] += f64::from(limit.requests) * 1000.0 / limit.period_millis as f64;
        }
        per_job
    }
}

/// A scenario's measurement window.
struct Window {
    name: String,
    started: Instant,
    length: Duration,
    client: kube::Client,
    /// [`api_writes`] when the scenario started.
    writes: BTreeMap<String, u64>,
}

impl Window {
    async fn finish(self, running: &Running) -> anyhow::Result<Measured> {
        let warm_up = WARM_UP.min(self.length / 2);
        tokio::time::sleep_until((self.started + warm_up).into()).await;
        let early = stats(&running.simulator).await?;
        let warm_from = Instant::now();
        tokio::time::sleep_until((self.started + self.length).into()).await;
        self.measure(running, &early, warm_from).await
    }

    /// What the scenario measured from its start to now.
    async fn measure(
        self,
        running: &Running,
        early: &SimulatorStats,
        warm_from: Instant,
    ) -> anyhow::Result<Measured> {
        let stats = stats(&running.simulator).await?;
        let writes = writes_between(&self.writes, &api_writes(&self.client).await?);
        let seconds = self.started.elapsed().as_secs_f64();
        Ok(Measured {
            name: self.name,
            seconds,
            warm_seconds: warm_from.elapsed().as_secs_f64(),
            warm_accepted: stats.accepted.saturating_sub(early.accepted),
            warm_throttled: stats.throttled.saturating_sub(early.throttled),
            stats,
            writes,
        })
    }
}

async fn stats(simulator: &str) -> anyhow::Result<SimulatorStats> {
    reqwest::get(format!("{simulator}/stats"))
        .await
        .context("simulator /stats")?
        .json()
        .await
        .context("simulator /stats JSON")
}

/// What every scenario shares.
#[derive(Clone, Copy)]
struct Setup<'a> {
    fleet: &'a [FleetPod],
    period: Duration,
    length: Duration,
    policy: RetryPolicy,
    client: &'a kube::Client,
}

/// Run one scenario to its end and stop it.
async fn scenario(name: &str, setup: Setup<'_>, sidecars: Sidecars) -> anyhow::Result<Measured> {
    let (window, running) = start_scenario(name, setup, sidecars).await?;
    let measured = window.finish(&running).await;
    running.stop();
    measured
}

/// A fresh simulator, the sidecars (if any) and the workers, started.
async fn start_scenario(
    name: &str,
    setup: Setup<'_>,
    sidecars: Sidecars,
) -> anyhow::Result<(Window, Running)> {
    let Setup {
        fleet,
        period,
        length,
        policy,
        client,
    } = setup;
    let writes = api_writes(client).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("simulator port")?;
    let simulator_url = format!("http://{}", listener.local_addr().context("address")?);
    let app = simulator::router(SimulatorConfig {
        requests: LIMIT,
        period,
    });
    let mut tasks = vec![tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })];
    let (stop, _) = watch::channel(false);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
    let mut proxies = Vec::new();
    let mut targets = Vec::new();
    for pod in fleet {
        let quota = match &sidecars {
            Sidecars::None => {
                targets.push((pod.job, simulator_url.clone(), true));
                continue;
            }
            Sidecars::Static(_) => None,
            Sidecars::Leased { url, ca_file } => Some(QuotaEndpoint {
                url: url.clone(),
                token_file: pod.token_file.clone(),
                ca_file: Some(ca_file.clone()),
                identity: Identity {
                    namespace: NAMESPACE.into(),
                    integration: INTEGRATION.into(),
                    job: JOBS[pod.job].into(),
                    pod: pod.name.clone(),
                },
            }),
        };
        let env_share = match &sidecars {
            Sidecars::Static(Some(limit)) => *limit,
            _ => pod.annotated,
        };
        let config = ProxyConfig {
            upstream: simulator_url.clone(),
            env_share,
            policy,
            queue: 1024,
            upstream_timeout: Duration::from_secs(10),
            limit_file: None,
            quota,
            max_body: proxy::MAX_BODY,
            serve: ServeLimits::default(),
        };
        let sidecar = Proxy::new(&config, clock.clone(), fastrand::Rng::new())
            .context("starting a sidecar")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("sidecar port")?;
        let url = format!("http://{}", listener.local_addr().context("address")?);
        let app = proxy::router(sidecar.clone());
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
        let renewer = Renewer::new(
            sidecar.gate.clone(),
            config.quota.clone(),
            None,
            sidecar.metrics.clone(),
        );
        let mut stopped = stop.subscribe();
        tasks.push(tokio::spawn(renewer.run(clock.clone(), async move {
            let _ = stopped.wait_for(|s| *s).await;
        })));
        proxies.push((pod.job, sidecar));
        targets.push((pod.job, url, false));
    }
    let active: Vec<watch::Sender<bool>> =
        (0..JOBS.len()).map(|_| watch::channel(true).0).collect();
    for (job, url, direct) in targets {
        // One connection pool per pod, shared by its workers.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(WORKERS_PER_POD)
            .timeout(Duration::from_secs(30))
            .build()
            .context("load generator client")?;
        for _ in 0..WORKERS_PER_POD {
            let worker = Worker {
                http: http.clone(),
                url: url.clone(),
                retry: direct.then(|| (policy, fastrand::Rng::new())),
            };
            tasks.push(tokio::spawn(
                worker.run(active[job].subscribe(), stop.subscribe()),
            ));
        }
    }
    let window = Window {
        name: name.to_owned(),
        started: Instant::now(),
        length,
        client: client.clone(),
        writes,
    };
    println!("{name}: running for {length:?}");
    Ok((
        window,
        Running {
            simulator: simulator_url,
            proxies,
            active,
            stop,
            tasks,
        },
    ))
}

/// One load generator: the next page as soon as the previous answer is in.
struct Worker {
    http: reqwest::Client,
    url: String,
    /// Without a sidecar the worker retries on its own.
    retry: Option<(RetryPolicy, fastrand::Rng)>,
}

impl Worker {
    async fn run(mut self, mut active: watch::Receiver<bool>, mut stop: watch::Receiver<bool>) {
        let mut page = 0u64;
        loop {
            if *stop.borrow() {
                return;
            }
            if !*active.borrow() {
                tokio::select! {
                    _ = active.wait_for(|a| *a) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            page += 1;
            let url = format!(
                "{}{PRODUCTS_PATH}?$top=10&$skipToken={}",
                self.url,
                (page % 100) * 10
            );
            let mut attempt = 1;
            loop {
                let sent = self.http.get(&url).header(API_KEY_HEADER, API_KEY).send();
                let answer = tokio::select! {
                    answer = sent => answer,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let outcome = match answer {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let retry_after = response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| {
                                retry::parse_retry_after(v, std::time::SystemTime::now())
                            });
                        let _ = response.bytes().await;
                        Outcome::Answer {
                            status,
                            retry_after,
                        }
                    }
                    Err(_) => Outcome::Unreachable,
                };
                let Some((policy, rng)) = &mut self.retry else {
                    break;
                };
                // A GET: every failure may be retried.
                let Some(delay) = policy.next_delay(attempt, outcome, true, rng.f64()) else {
                    break;
                };
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                attempt += 1;
            }
        }
    }
}

fn print_table(results: &[Measured], period: Duration) {
    let per_second = |n: f64| n / period.as_secs_f64();
    println!();
    println!(
        "| scenario | served | 429s | served/s | ÷ usable ({}/s) | ÷ limit ({}/s) | after the first {} s: 429s, ÷ usable | operator's API writes/min |",
        per_second(f64::from(USABLE)),
        per_second(f64::from(LIMIT)),
        WARM_UP.as_secs()
    );
    println!("|---|---|---|---|---|---|---|---|");
    for m in results {
        let rate = m.stats.accepted as f64 / m.seconds;
        let warm_rate = m.warm_accepted as f64 / m.warm_seconds;
        println!(
            "| {} | {} | {} | {:.2} | {:.1} % | {:.1} % | {}, {:.1} % | {:.1} |",
            m.name,
            m.stats.accepted,
            m.stats.throttled,
            rate,
            100.0 * rate / per_second(f64::from(USABLE)),
            100.0 * rate / per_second(f64::from(LIMIT)),
            m.warm_throttled,
            100.0 * warm_rate / per_second(f64::from(USABLE)),
            m.writes_per_minute(),
        );
    }
    println!();
}

/// One sample of the idle-and-return phase.
struct Sample {
    at: Duration,
    /// Upstream 200s per job so far, as the sidecars counted them.
    served: Vec<u64>,
    /// Requests per second granted per job at that instant.
    granted: Vec<f64>,
}

/// The served rate per job over about two periods ending at sample `i`: one
/// period's count swings by a request or two with the sampling phase.
fn rate(samples: &[Sample], i: usize, period: Duration) -> Vec<f64> {
    let now = &samples[i];
    let target = now.at.saturating_sub(period * 2);
    let base = samples[..=i]
        .iter()
        .min_by_key(|s| s.at.abs_diff(target))
        .unwrap_or(now);
    let seconds = (now.at - base.at).as_secs_f64().max(1e-3);
    now.served
        .iter()
        .zip(&base.served)
        .map(|(n, b)| (n - b) as f64 / seconds)
        .collect()
}

/// Sample four times a period for `length`, printing a line per period.
async fn sample_for(
    running: &Running,
    origin: Instant,
    length: Duration,
    period: Duration,
    label: &str,
    samples: &mut Vec<Sample>,
) {
    let tick = period / 4;
    let started = Instant::now();
    let mut next = started;
    let mut n = 0u64;
    while started.elapsed() < length {
        next += tick;
        tokio::time::sleep_until(next.into()).await;
        samples.push(Sample {
            at: origin.elapsed(),
            served: running.served(),
            granted: running.granted(),
        });
        n += 1;
        if n.is_multiple_of(4) {
            let round = |v: &[f64]| {
                v.iter()
                    .map(|r| format!("{r:4.1}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let last = samples.len() - 1;
            println!(
                "  {label} +{:5.2} s  served/s [{}]  granted/s [{}]",
                started.elapsed().as_secs_f64(),
                round(&rate(samples, last, period)),
                round(&samples[last].granted),
            );
        }
    }
}

/// The first time from `from` after which `holds` is true at every sample
/// for a whole period.
fn first_sustained(
    samples: &[Sample],
    from: Duration,
    period: Duration,
    holds: impl Fn(usize) -> bool,
) -> Option<Duration> {
    let mut run_start: Option<Duration> = None;
    for (i, sample) in samples.iter().enumerate().filter(|(_, s)| s.at > from) {
        if holds(i) {
            let start = *run_start.get_or_insert(sample.at);
            if sample.at >= start + period {
                return Some(start - from);
            }
        } else {
            run_start = None;
        }
    }
    None
}

/// With leases on: job 0 goes idle, then comes back.
async fn idle_and_return(running: &Running, period: Duration) -> anyhow::Result<serde_json::Value> {
    let usable = f64::from(USABLE) / period.as_secs_f64();
    let fair = usable / JOBS.len() as f64;
    let phase = Duration::from_secs(env_u64("FLEET_IDLE_SECONDS", 30)?).max(period * 12);
    let origin = Instant::now();
    let mut samples = Vec::new();
    sample_for(running, origin, period * 3, period, "steady", &mut samples).await;
    let steady = rate(&samples, samples.len() - 1, period);
    let steady_others: f64 = steady[1..].iter().sum();
    let granted_before = samples[samples.len() - 1].granted.clone();
    let stats_before = stats(&running.simulator).await?;
    println!(
        "idle and return: {} goes idle for {phase:?} (its sidecars keep renewing)",
        JOBS[0]
    );
    let idle_at = origin.elapsed();
    let _ = running.active[0].send(false);
    sample_for(running, origin, phase, period, "idle", &mut samples).await;
    let idle_samples = samples.len();
    let back_at = origin.elapsed();
    println!("{} comes back for {phase:?}", JOBS[0]);
    let _ = running.active[0].send(true);
    sample_for(running, origin, phase, period, "back", &mut samples).await;
    let stats_after = stats(&running.simulator).await?;

    let idle = &samples[..idle_samples];
    let others_granted = |i: usize| samples[i].granted[1..].iter().sum::<f64>();
    let others_served = |i: usize| rate(&samples, i, period)[1..].iter().sum::<f64>();
    let peak_granted = (0..idle.len())
        .filter(|&i| samples[i].at > idle_at)
        .map(others_granted)
        .fold(0.0, f64::max);
    let lowest_returning = (0..idle.len())
        .filter(|&i| samples[i].at > idle_at)
        .map(|i| samples[i].granted[0])
        .fold(f64::MAX, f64::min);
    let show = |d: Option<Duration>| {
        d.map_or_else(
            || "not reached".to_owned(),
            |d| format!("{:.2} s", d.as_secs_f64()),
        )
    };
    // The idle job's pods still send what was queued when its workers
    // stopped (at its grant: 10 requests per period at most): it has drained
    // once its served count stops moving for the rest of the idle phase.
    let drained_at = idle
        .last()
        .and_then(|last| {
            idle.iter()
                .find(|s| s.at > idle_at && s.served[0] == last.served[0])
        })
        .map(|s| s.at.saturating_sub(idle_at));
    let others_peak = first_sustained(idle, idle_at, period, |i| {
        others_granted(i) >= peak_granted - 1e-9
    });
    let others_95_peak = first_sustained(idle, idle_at, period, |i| {
        others_served(i) >= 0.95 * peak_granted
    });
    let others_95_usable =
        first_sustained(idle, idle_at, period, |i| others_served(i) >= 0.95 * usable);
    // The job is idle only once its pods have sent what was queued: counted
    // from then, the handover is the sidecars' and the operator's alone.
    let after_drain = |d: Option<Duration>| {
        d.zip(drained_at)
            .map(|(d, drained)| d.saturating_sub(drained))
    };
    let back_grant_90_fair = first_sustained(&samples, back_at, period, |i| {
        samples[i].granted[0] >= 0.9 * fair
    });
    let back_served_90_own = first_sustained(&samples, back_at, period, |i| {
        rate(&samples, i, period)[0] >= 0.9 * steady[0]
    });
    let back_served_90_fair = first_sustained(&samples, back_at, period, |i| {
        rate(&samples, i, period)[0] >= 0.9 * fair
    });
    let throttled_during = stats_after.throttled - stats_before.throttled;
    let served_during = stats_after.accepted - stats_before.accepted;
    let rows = [
        (
            format!(
                "{}'s grant at its lowest (from {:.1}/s)",
                JOBS[0], granted_before[0]
            ),
            format!("{lowest_returning:.1}/s"),
        ),
        (
            format!(
                "{}'s pods have sent what was queued when its workers stopped",
                JOBS[0]
            ),
            show(drained_at),
        ),
        (
            format!(
                "the others' grants reach their peak while it is idle ({:.1}/s → {peak_granted:.1}/s)",
                granted_before[1..].iter().sum::<f64>()
            ),
            show(others_peak),
        ),
        (
            format!(
                "the others serve ≥ 95 % of that peak ({:.1}/s; they served {steady_others:.1}/s before)",
                0.95 * peak_granted
            ),
            show(others_95_peak),
        ),
        (
            format!("the others serve ≥ 95 % of usable ({:.1}/s)", 0.95 * usable),
            show(others_95_usable),
        ),
        (
            "… counted from when its pods drained: the others' grants at their peak / they serve ≥ 95 % of usable".to_owned(),
            format!(
                "{} / {}",
                show(after_drain(others_peak)),
                show(after_drain(others_95_usable))
            ),
        ),
        (
            format!(
                "after it comes back: its grant ≥ 90 % of usable ÷ 4 ({:.1}/s)",
                0.9 * fair
            ),
            show(back_grant_90_fair),
        ),
        (
            format!(
                "… it serves ≥ 90 % of its own rate before ({:.1}/s)",
                0.9 * steady[0]
            ),
            show(back_served_90_own),
        ),
        (
            format!("… it serves ≥ 90 % of usable ÷ 4 ({:.1}/s)", 0.9 * fair),
            show(back_served_90_fair),
        ),
        (
            "429s at the simulator during idle and return".to_owned(),
            format!("{throttled_during} (of {served_during} served)"),
        ),
    ];
    println!();
    println!(
        "| {} idle, then back (served: rate over two periods; each time: held for a period) | figure |",
        JOBS[0]
    );
    println!("|---|---|");
    for (what, figure) in rows {
        println!("| {what} | {figure} |");
    }
    let seconds = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    // The refresh a grant asks for in the ordinary case, the goal's unit.
    let refresh = Duration::from_millis(saleslayer_core::lease_book::refresh_for(
        u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
        saleslayer_core::lease_book::DEFAULT_REFRESH_MILLIS,
    ));
    let refreshes = |d: Option<Duration>| d.map(|d| d.as_secs_f64() / refresh.as_secs_f64());
    let show_refreshes = |d: Option<Duration>| {
        refreshes(d).map_or_else(|| "never".to_owned(), |r| format!("{r:.2}"))
    };
    println!(
        "(refresh {:.1} s: the others serve 95 % of usable after {} refreshes, {} from the drain, and their grants peak {} refreshes after the drain; the returning job's grant is 90 % of fair after {})",
        refresh.as_secs_f64(),
        show_refreshes(others_95_usable),
        show_refreshes(after_drain(others_95_usable)),
        show_refreshes(after_drain(others_peak)),
        show_refreshes(back_grant_90_fair),
    );
    Ok(json!({
        "refresh_s": refresh.as_secs_f64(),
        "idle_job_drained_s": seconds(drained_at),
        "others_serve_95pct_of_usable_refreshes": refreshes(others_95_usable),
        "others_reach_peak_grant_after_drain_refreshes": refreshes(after_drain(others_peak)),
        "others_serve_95pct_of_usable_after_drain_refreshes": refreshes(after_drain(others_95_usable)),
        "back_grant_90pct_of_fair_refreshes": refreshes(back_grant_90_fair),
        "idle_job_lowest_grant_per_s": lowest_returning,
        "others_reach_peak_grant_s": seconds(others_peak),
        "others_serve_95pct_of_peak_s": seconds(others_95_peak),
        "others_serve_95pct_of_usable_s": seconds(others_95_usable),
        "back_grant_90pct_of_fair_s": seconds(back_grant_90_fair),
        "back_serves_90pct_of_own_s": seconds(back_served_90_own),
        "back_serves_90pct_of_fair_s": seconds(back_served_90_fair),
        "throttled_during_idle_and_return": throttled_during,
        "served_during_idle_and_return": served_during,
    }))
}
