//! The sidecar's `/metrics` (`saleslayer_proxy_*`): upstream answers by
//! status, retries, queue depth, concurrency, and the grant in force.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::gate::Gate;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// Lease renewals by outcome: the runtime's label set, shared with the operator.
pub use saleslayer_runtime::metrics::OutcomeLabels as OutcomeLabel;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

/// Every series of one sidecar.
#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    /// Upstream attempts by status code (`error` when unreachable).
    pub requests: Family<CodeLabel, Counter>,
    pub retries: Counter,
    /// Answers with one of the account's throttle statuses.
    pub throttled: Counter,
    /// Callers refused because the queue was full.
    pub rejected: Counter,
    /// Lease renewals by outcome (`ok`, `error`).
    pub renewals: Family<OutcomeLabel, Counter>,
    queue_depth: Gauge,
    in_flight: Gauge,
    grant_requests: Gauge,
    grant_period: Gauge<f64, std::sync::atomic::AtomicU64>,
    grant_concurrency: Gauge,
    grant_source: Family<SourceLabel, Gauge>,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("saleslayer_proxy");
        let metrics = Self {
            registry: Registry::default(),
            requests: Family::default(),
            retries: Counter::default(),
            throttled: Counter::default(),
            rejected: Counter::default(),
            renewals: Family::default(),
            queue_depth: Gauge::default(),
            in_flight: Gauge::default(),
            grant_requests: Gauge::default(),
            grant_period: Gauge::default(),
            grant_concurrency: Gauge::default(),
            grant_source: Family::default(),
        };
        registry.register(
            "requests",
            "Upstream attempts by status code",
            metrics.requests.clone(),
        );
        registry.register("retries", "Retried attempts", metrics.retries.clone());
        registry.register(
            "throttled",
            "Upstream answers with one of the account's throttle statuses",
            metrics.throttled.clone(),
        );
        registry.register(
            "rejected",
            "Requests refused because the queue was full",
            metrics.rejected.clone(),
        );
        registry.register(
            "lease_renewals",
            "Lease renewals by outcome",
            metrics.renewals.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for their turn",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "in_flight",
            "Upstream requests in flight",
            metrics.in_flight.clone(),
        );
        registry.register(
            "grant_requests",
            "Requests per period of the grant in force",
            metrics.grant_requests.clone(),
        );
        registry.register(
            "grant_period_seconds",
            "Period of the grant in force",
            metrics.grant_period.clone(),
        );
        registry.register(
            "grant_max_concurrency",
            "Concurrency of the grant in force",
            metrics.grant_concurrency.clone(),
        );
        registry.register(
            "grant_source",
            "Where the grant in force comes from (1 for the source in use)",
            metrics.grant_source.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }
}

impl ProxyMetrics {
    /// The text exposition, with the gauges read from `gate` now.
    pub fn encode(&self, gate: &Gate) -> String {
        let now = gate.snapshot();
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.queue_depth.set(gauge(now.waiting as u64));
        self.in_flight.set(gauge(now.in_flight.into()));
        self.grant_requests.set(gauge(now.limit.requests.into()));
        self.grant_period
            .set(now.limit.period_millis as f64 / 1000.0);
        self.grant_concurrency
            .set(gauge(now.limit.max_concurrency.into()));
        for source in ["lease", "file", "env"] {
            let on = i64::from(source == now.source.as_str());
            self.grant_source
                .get_or_create(&SourceLabel {
                    source: source.into(),
                })
                .set(on);
        }
        saleslayer_runtime::metrics::encode(&self.registry)
    }
}

/// `/metrics` and `/healthz` of the sidecar.
pub fn router(metrics: Arc<ProxyMetrics>, gate: Arc<Gate>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok" }))
        .with_state((metrics, gate))
}

async fn scrape(
    State((metrics, gate)): State<(Arc<ProxyMetrics>, Arc<Gate>)>,
) -> impl IntoResponse {
    saleslayer_runtime::metrics::exposition(metrics.encode(&gate))
}
