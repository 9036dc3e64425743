//! `/metrics` (Prometheus text format, `saleslayer_` prefix), `/healthz` and
//! `/readyz` over plain HTTP (DESIGN.md §7).
//!
//! Each part owns a metrics struct and registers it here: the controller
//! (allocations, reconciles), the webhook (admissions, latency) and the
//! quota API (usage reports, leases, throttling). The structs are cheap to
//! clone (shared atomics) and are handed to their parts at start.
//!
//! Label names never collide with Prometheus' own target labels
//! (`namespace`, `job`, `instance`, `pod`): a job is `integration_namespace`,
//! `integration`, `saleslayer_job`. Every value that comes from outside is
//! bounded (status codes fold into `other`, see the quota API), and the
//! series of a deleted integration or account, and all the per-job and
//! per-account series of a replica that stopped leading, are removed
//! ([`Metrics::forget_integration`], [`Metrics::forget_leadership`]), so a
//! `max by` in an alert never keeps a stale value alive.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use saleslayer_core::allocation::JobKey;
use saleslayer_runtime::serve::ServeLimits;

/// Labels of a job.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub integration_namespace: String,
    pub integration: String,
    pub saleslayer_job: String,
}

impl JobLabels {
    /// The labels of one job.
    pub fn of(key: &JobKey) -> Self {
        Self {
            integration_namespace: key.namespace.clone(),
            integration: key.integration.clone(),
            saleslayer_job: key.job.clone(),
        }
    }
}

/// Labels of an account.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabels {
    pub account: String,
}

/// Requests by status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub integration_namespace: String,
    pub integration: String,
    pub saleslayer_job: String,
    /// A status code 100–599, or `other`.
    pub code: String,
}

impl CodeLabels {
    /// The labels of `code` for one job.
    pub fn of(key: &JobKey, code: &str) -> Self {
        Self {
            integration_namespace: key.namespace.clone(),
            integration: key.integration.clone(),
            saleslayer_job: key.job.clone(),
            code: code.to_owned(),
        }
    }
}

pub use saleslayer_runtime::metrics::OutcomeLabels;

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// The controller's series.
#[derive(Clone)]
pub struct ControllerMetrics {
    pub usable: Family<AccountLabels, Gauge>,
    pub effective: Family<AccountLabels, Gauge>,
    pub allocated: Family<JobLabels, Gauge>,
    pub pods: Family<JobLabels, Gauge>,
    pub persistent_throttling: Family<JobLabels, Gauge>,
    pub overcommitted: Family<AccountLabels, Gauge>,
    pub reconciles: Counter,
    pub reconcile_errors: Family<OutcomeLabels, Counter>,
    pub reconcile_duration: Histogram,
}

/// Why something was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// The webhook's series.
#[derive(Clone)]
pub struct WebhookMetrics {
    pub admissions: Family<OutcomeLabels, Counter>,
    pub denials: Family<ReasonLabels, Counter>,
    pub latency: Histogram,
}

/// The quota API's series.
#[derive(Clone)]
pub struct QuotaMetrics {
    pub requests: Family<CodeLabels, Counter>,
    /// The code labels each job was counted under, for folding and forgetting.
    codes: Arc<
        std::sync::Mutex<std::collections::HashMap<JobKey, std::collections::BTreeSet<String>>>,
    >,
    pub throttled: Family<JobLabels, Counter>,
    pub retries: Family<JobLabels, Counter>,
    pub peak_concurrency: Family<JobLabels, Gauge>,
    pub queued: Family<JobLabels, Gauge>,
    pub lease_grants: Family<JobLabels, Counter>,
    pub lease_refusals: Family<OutcomeLabels, Counter>,
}

/// Distinct status codes kept as labels per job; any more fold into `other`.
pub const MAX_CODES_PER_JOB: usize = 16;

impl QuotaMetrics {
    /// The label `code` is counted under for `job`: the code itself when it
    /// is an HTTP status (100–599) the job already reported, or one of its
    /// first [`MAX_CODES_PER_JOB`]; `other` otherwise. A pod cannot grow the
    /// series without bound.
    pub fn code_label(&self, job: &JobKey, code: &str) -> String {
        const OTHER: &str = "other";
        let status = code.len() == 3
            && code.bytes().all(|b| b.is_ascii_digit())
            && code.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
        if !status {
            return OTHER.into();
        }
        let Ok(mut codes) = self.codes.lock() else {
            return OTHER.into();
        };
        let seen = codes.entry(job.clone()).or_default();
        if seen.contains(code) || seen.len() < MAX_CODES_PER_JOB {
            seen.insert(code.to_owned());
            code.to_owned()
        } else {
            seen.insert(OTHER.to_owned());
            OTHER.into()
        }
    }

    /// Forget the codes of `job`; the labels it was counted under.
    fn forget_codes(&self, job: &JobKey) -> Vec<String> {
        self.codes
            .lock()
            .ok()
            .and_then(|mut codes| codes.remove(job))
            .map(|seen| seen.into_iter().collect())
            .unwrap_or_default()
    }
}

/// Add `by` to a counter fed by pods' reports, stopping at `u64::MAX`
/// instead of wrapping.
pub fn count(counter: &Counter, by: u64) {
    let room = u64::MAX - counter.get();
    counter.inc_by(by.min(room));
}

/// Every part's metrics and the registry that encodes them.
pub struct Metrics {
    pub registry: Registry,
    pub controller: ControllerMetrics,
    pub webhook: WebhookMetrics,
    pub quota: QuotaMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("saleslayer");
        let controller = ControllerMetrics {
            usable: Family::default(),
            effective: Family::default(),
            allocated: Family::default(),
            pods: Family::default(),
            persistent_throttling: Family::default(),
            overcommitted: Family::default(),
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: latency(),
        };
        registry.register(
            "account_usable_requests",
            "Usable requests per period of an account: its limit after headroom",
            controller.usable.clone(),
        );
        registry.register(
            "account_effective_requests",
            "Requests per period the allocation splits now: usable, lowered while Sales Layer throttles",
            controller.effective.clone(),
        );
        registry.register(
            "allocated_requests",
            "Requests per period allocated to a job",
            controller.allocated.clone(),
        );
        registry.register("pods", "Live pods of a job", controller.pods.clone());
        registry.register(
            "persistent_throttling",
            "1 while a job is throttled persistently",
            controller.persistent_throttling.clone(),
        );
        registry.register(
            "overcommitted",
            "1 while the floors of an account's jobs exceed its usable budget",
            controller.overcommitted.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles run",
            controller.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by reason",
            controller.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile",
            controller.reconcile_duration.clone(),
        );

        let webhook = WebhookMetrics {
            admissions: Family::default(),
            denials: Family::default(),
            latency: latency(),
        };
        registry.register(
            "webhook_admissions",
            "Pods admitted or denied by the webhook",
            webhook.admissions.clone(),
        );
        registry.register(
            "webhook_denials",
            "Pods denied by the webhook, by reason",
            webhook.denials.clone(),
        );
        registry.register(
            "webhook_duration_seconds",
            "Time to answer one AdmissionReview",
            webhook.latency.clone(),
        );

        let quota = QuotaMetrics {
            requests: Family::default(),
            codes: Arc::default(),
            throttled: Family::default(),
            retries: Family::default(),
            peak_concurrency: Family::default(),
            queued: Family::default(),
            lease_grants: Family::default(),
            lease_refusals: Family::default(),
        };
        registry.register(
            "requests",
            "Requests pods sent to Sales Layer, by status code",
            quota.requests.clone(),
        );
        registry.register(
            "throttled",
            "Throttled responses pods reported",
            quota.throttled.clone(),
        );
        registry.register("retries", "Retries pods reported", quota.retries.clone());
        registry.register(
            "peak_concurrency",
            "Peak concurrency a job's pod last reported",
            quota.peak_concurrency.clone(),
        );
        registry.register(
            "queued",
            "Requests a job's pod last reported waiting",
            quota.queued.clone(),
        );
        registry.register("lease_grants", "Leases granted", quota.lease_grants.clone());
        registry.register(
            "lease_refusals",
            "Lease calls refused, by reason",
            quota.lease_refusals.clone(),
        );
        Self {
            registry,
            controller,
            webhook,
            quota,
        }
    }
}

impl Metrics {
    /// Remove the series of the jobs of a deleted integration.
    pub fn forget_jobs<'a>(&self, jobs: impl IntoIterator<Item = &'a JobKey>) {
        for key in jobs {
            let labels = JobLabels::of(key);
            let c = &self.controller;
            c.allocated.remove(&labels);
            c.pods.remove(&labels);
            c.persistent_throttling.remove(&labels);
            let q = &self.quota;
            for family in [&q.throttled, &q.retries, &q.lease_grants] {
                family.remove(&labels);
            }
            for family in [&q.peak_concurrency, &q.queued] {
                family.remove(&labels);
            }
            for code in q.forget_codes(key) {
                q.requests.remove(&CodeLabels::of(key, &code));
            }
        }
    }

    /// Remove the series of a deleted account.
    pub fn forget_account(&self, account: &str) {
        let labels = AccountLabels {
            account: account.to_owned(),
        };
        let c = &self.controller;
        for family in [&c.usable, &c.effective, &c.overcommitted] {
            family.remove(&labels);
        }
    }

    /// Remove every per-job and per-account series: a replica that stopped
    /// leading computes nothing it could report for them.
    pub fn forget_leadership(&self) {
        let c = &self.controller;
        for family in [&c.usable, &c.effective, &c.overcommitted] {
            family.clear();
        }
        for family in [&c.allocated, &c.pods, &c.persistent_throttling] {
            family.clear();
        }
        let q = &self.quota;
        q.requests.clear();
        if let Ok(mut codes) = q.codes.lock() {
            codes.clear();
        }
        for family in [&q.throttled, &q.retries, &q.lease_grants] {
            family.clear();
        }
        for family in [&q.peak_concurrency, &q.queued] {
            family.clear();
        }
    }

    /// The text exposition of every series.
    pub fn encode(&self) -> String {
        saleslayer_runtime::metrics::encode(&self.registry)
    }
}

/// Whether this replica may take traffic: its stores have listed the
/// cluster (its certificates are loaded before any server starts).
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
struct Served {
    metrics: Arc<Metrics>,
    ready: Readiness,
}

/// `/metrics`, `/healthz`, and `/readyz` (503 until `ready`).
pub fn router(metrics: Arc<Metrics>, ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Served { metrics, ready })
}

async fn metrics_handler(State(served): State<Served>) -> impl IntoResponse {
    saleslayer_runtime::metrics::exposition(served.metrics.encode())
}

async fn readyz(State(served): State<Served>) -> (StatusCode, &'static str) {
    if (served.ready)() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the stores have not listed the cluster yet",
        )
    }
}

/// Serve the router over HTTP within `limits` until `shutdown` resolves.
pub async fn serve(
    bind: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Readiness,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    saleslayer_runtime::serve::serve(listener, router(metrics, ready), limits, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_carry_the_prefix_and_labels() {
        let metrics = Metrics::default();
        metrics
            .quota
            .requests
            .get_or_create(&CodeLabels::of(
                &JobKey::new("shop", "catalog", "import"),
                "429",
            ))
            .inc_by(3);
        metrics.controller.reconciles.inc();
        let text = metrics.encode();
        assert!(text.contains(r#"saleslayer_requests_total{integration_namespace="shop",integration="catalog",saleslayer_job="import",code="429"} 3"#), "{text}");
        assert!(text.contains("saleslayer_reconciles_total 1"), "{text}");
        assert!(
            text.contains("# TYPE saleslayer_webhook_duration_seconds histogram"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn readyz_says_no_until_the_stores_have_listed() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listed = Arc::new(AtomicBool::new(false));
        let flag = listed.clone();
        let served = Served {
            metrics: Arc::new(Metrics::default()),
            ready: Arc::new(move || flag.load(Ordering::Acquire)),
        };
        assert_eq!(
            readyz(State(served.clone())).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        listed.store(true, Ordering::Release);
        assert_eq!(readyz(State(served)).await.0, StatusCode::OK);
    }

    fn series(text: &str, name: &str) -> usize {
        text.lines().filter(|l| l.starts_with(name)).count()
    }

    #[test]
    fn a_report_of_900_codes_makes_a_bounded_number_of_series() {
        let metrics = Metrics::default();
        let job = JobKey::new("shop", "catalog", "import");
        for code in 0..1000u32 {
            let label = metrics.quota.code_label(&job, &code.to_string());
            count(
                &metrics
                    .quota
                    .requests
                    .get_or_create(&CodeLabels::of(&job, &label)),
                1,
            );
        }
        for odd in ["abc", "2000", "-1", "0x1"] {
            assert_eq!(metrics.quota.code_label(&job, odd), "other");
        }
        let text = metrics.encode();
        let requests = series(&text, "saleslayer_requests_total{");
        assert_eq!(requests, MAX_CODES_PER_JOB + 1, "{text}");
        assert!(text.contains(r#"code="other"} "#), "{text}");
        // A code the job already has keeps its own series.
        assert_eq!(metrics.quota.code_label(&job, "100"), "100");
    }

    #[test]
    fn counters_fed_by_pods_saturate() {
        let counter = Counter::default();
        count(&counter, u64::MAX);
        count(&counter, u64::MAX);
        count(&counter, 7);
        assert_eq!(counter.get(), u64::MAX);
    }

    #[test]
    fn series_of_deleted_integrations_and_of_a_former_leader_go() {
        let metrics = Metrics::default();
        let (import, prices) = (
            JobKey::new("shop", "catalog", "import"),
            JobKey::new("shop", "catalog", "prices"),
        );
        for job in [&import, &prices] {
            metrics
                .controller
                .allocated
                .get_or_create(&JobLabels::of(job))
                .set(10);
            let label = metrics.quota.code_label(job, "429");
            count(
                &metrics
                    .quota
                    .requests
                    .get_or_create(&CodeLabels::of(job, &label)),
                2,
            );
        }
        let acme = AccountLabels {
            account: "acme".into(),
        };
        metrics.controller.effective.get_or_create(&acme).set(28);
        metrics.forget_jobs([&import]);
        let text = metrics.encode();
        assert!(!text.contains(r#"saleslayer_job="import""#), "{text}");
        assert!(text.contains(r#"saleslayer_job="prices""#), "{text}");
        metrics.forget_account("acme");
        assert!(!metrics.encode().contains(r#"account="acme""#));
        metrics.controller.effective.get_or_create(&acme).set(28);
        metrics.forget_leadership();
        let text = metrics.encode();
        assert_eq!(series(&text, "saleslayer_allocated_requests{"), 0, "{text}");
        assert_eq!(series(&text, "saleslayer_requests_total{"), 0, "{text}");
        assert_eq!(
            series(&text, "saleslayer_account_effective_requests{"),
            0,
            "{text}"
        );
    }
}
