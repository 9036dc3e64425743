//! `/metrics` (Prometheus text format, `saleslayer_` prefix), `/healthz` and
//! `/readyz` over plain HTTP (DESIGN.md §7).
//!
//! Each part owns a metrics struct and registers it here: the controller
//! (allocations, reconciles), the webhook (admissions, latency) and the
//! quota API (usage reports, leases, throttling). The structs are cheap to
//! clone (shared atomics) and are handed to their parts at start.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a job.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub namespace: String,
    pub integration: String,
    pub job: String,
}

/// Labels of an account.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabels {
    pub account: String,
}

/// Requests by status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub namespace: String,
    pub integration: String,
    pub job: String,
    pub code: String,
}

/// An outcome and, for failures, its reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// The controller's series.
#[derive(Clone)]
pub struct ControllerMetrics {
    pub usable: Family<AccountLabels, Gauge>,
    pub allocated: Family<JobLabels, Gauge>,
    pub pods: Family<JobLabels, Gauge>,
    pub persistent_throttling: Family<JobLabels, Gauge>,
    pub overcommitted: Family<AccountLabels, Gauge>,
    pub reconciles: Counter,
    pub reconcile_errors: Family<OutcomeLabels, Counter>,
    pub reconcile_duration: Histogram,
}

/// The webhook's series.
#[derive(Clone)]
pub struct WebhookMetrics {
    pub admissions: Family<OutcomeLabels, Counter>,
    pub latency: Histogram,
}

/// The quota API's series.
#[derive(Clone)]
pub struct QuotaMetrics {
    pub requests: Family<CodeLabels, Counter>,
    pub throttled: Family<JobLabels, Counter>,
    pub retries: Family<JobLabels, Counter>,
    pub peak_concurrency: Family<JobLabels, Gauge>,
    pub queued: Family<JobLabels, Gauge>,
    pub lease_grants: Family<JobLabels, Counter>,
    pub lease_refusals: Family<OutcomeLabels, Counter>,
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
            allocated: Family::default(),
            pods: Family::default(),
            persistent_throttling: Family::default(),
            overcommitted: Family::default(),
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: latency(),
        };
        registry.register(
            "usable_requests",
            "Usable requests per period of an account",
            controller.usable.clone(),
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
            latency: latency(),
        };
        registry.register(
            "webhook_admissions",
            "Pods admitted or denied by the webhook",
            webhook.admissions.clone(),
        );
        registry.register(
            "webhook_duration_seconds",
            "Time to answer one AdmissionReview",
            webhook.latency.clone(),
        );

        let quota = QuotaMetrics {
            requests: Family::default(),
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
    /// The text exposition of every series.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// The text exposition of `registry` (empty if encoding fails).
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        text.clear();
    }
    text
}

/// A `/metrics` answer: `text` as OpenMetrics.
pub fn exposition(text: String) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .with_state(metrics)
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    exposition(metrics.encode())
}

/// Serve the router over HTTP until `shutdown` resolves.
pub async fn serve(
    bind: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
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
            .get_or_create(&CodeLabels {
                namespace: "shop".into(),
                integration: "catalog".into(),
                job: "import".into(),
                code: "429".into(),
            })
            .inc_by(3);
        metrics.controller.reconciles.inc();
        let text = metrics.encode();
        assert!(text.contains(r#"saleslayer_requests_total{namespace="shop",integration="catalog",job="import",code="429"} 3"#), "{text}");
        assert!(text.contains("saleslayer_reconciles_total 1"), "{text}");
        assert!(
            text.contains("# TYPE saleslayer_webhook_duration_seconds histogram"),
            "{text}"
        );
    }
}
