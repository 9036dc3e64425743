//! The quota API (DESIGN.md §6): `POST /v1/leases` over HTTPS, served by the
//! leader. Pods renew their lease on capacity and report their usage since
//! the last call; the answer is their grant.
//!
//! ```text
//!  bearer token ──▶ TokenReview (cached) ──▶ identity check ──▶ throttle book ──▶ lease book ──▶ grant
//! ```
//!
//! Nothing in a report is trusted beyond its own pod: the token names the
//! pod, the pod must be the one in the body and carry that integration's and
//! job's labels (read from the controller's store, not from the body). The
//! books are pure (`book`, `throttle`); this module does the I/O around them.
//! Only the leader answers (a follower says 503 `NotLeader`), and each new
//! leadership term starts with fresh books, as after a restart.

pub mod auth;
pub mod book;
pub mod demand;
pub mod throttle;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use kube::runtime::reflector::ObjectRef;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use crate::allocation::JobKey;
use crate::api::{LABEL_INTEGRATION, LABEL_JOB, SalesLayerIntegration};
use crate::controller::{Stores, plan};
use crate::leader::{Leadership, Role};
use crate::metrics::{CodeLabels, JobLabels, OutcomeLabels, QuotaMetrics};
use auth::{Authenticator, Identity};
use book::{LeaseBook, LeaseRequest};
use throttle::ThrottleBook;

/// The largest report accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a grant holds without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often pods should renew.
pub const LEASE_REFRESH: Duration = Duration::from_secs(5);

/// A pod's report: who it is and what it did since its previous call.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseBody {
    pub namespace: String,
    pub integration: String,
    pub job: String,
    pub pod: String,
    #[serde(default)]
    pub usage: Usage,
}

/// Usage since the previous call.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub by_status: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub throttled: u64,
    #[serde(default)]
    pub retries: u64,
    #[serde(default)]
    pub peak_concurrency: u64,
    /// Unmet demand: requests waiting for capacity.
    #[serde(default)]
    pub queued: u64,
}

/// The answer: the pod's grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantBody {
    pub requests: u32,
    pub period_millis: u64,
    pub max_concurrency: u32,
    pub ttl_millis: u64,
    pub refresh_millis: u64,
}

/// An answer that is not a grant: a status code and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"error": self.message, "reason": self.reason})),
        )
            .into_response()
    }
}

/// The quota API's state, shared with the controller.
pub struct Quota {
    stores: Stores,
    auth: Authenticator,
    leases: Mutex<TermBook>,
    /// Only the leader answers; a new term starts the books afresh.
    leadership: Leadership,
    /// Throttled responses per job and window; read by the controller.
    pub throttling: Arc<Mutex<ThrottleBook>>,
    /// Integrations whose throttling changed, for the controller to reconcile.
    changed: mpsc::UnboundedSender<ObjectRef<SalesLayerIntegration>>,
    metrics: QuotaMetrics,
}

impl Quota {
    pub fn new(
        stores: Stores,
        auth: Authenticator,
        throttling: Arc<Mutex<ThrottleBook>>,
        changed: mpsc::UnboundedSender<ObjectRef<SalesLayerIntegration>>,
        metrics: QuotaMetrics,
    ) -> Self {
        Self {
            stores,
            auth,
            leases: Mutex::new(TermBook {
                term: None,
                book: LeaseBook::new(now_millis(), millis(LEASE_TTL), millis(LEASE_REFRESH)),
            }),
            leadership: Leadership::always(),
            throttling,
            changed,
            metrics,
        }
    }

    /// Answer only while `leadership` says this replica leads.
    pub fn with_leadership(self, leadership: Leadership) -> Self {
        Self { leadership, ..self }
    }

    /// The current term, or 503 `NotLeader` on a follower.
    fn leading(&self) -> Result<(u64, u64), Refusal> {
        match self.leadership.role() {
            Role::Leader { term, since_millis } => Ok((term, since_millis)),
            Role::Follower => Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "NotLeader",
                "this replica is not the leader; the quota Service routes to the leader, try again shortly",
            )),
        }
    }

    /// The lease book of the current term: a replica that becomes leader
    /// starts empty books, as after a restart (grants capped at the static
    /// shares for one TTL from the moment it took over).
    fn books(&self, term: u64, since_millis: u64) -> Result<MutexGuard<'_, TermBook>, Refusal> {
        let mut books = self.leases.lock().map_err(|_| internal())?;
        if books.term != Some(term) {
            books.term = Some(term);
            books.book = LeaseBook::new(since_millis, millis(LEASE_TTL), millis(LEASE_REFRESH));
            if let Ok(mut throttling) = self.throttling.lock() {
                *throttling = ThrottleBook::default();
            }
            if let Ok(mut demand) = self.stores.demand.write() {
                *demand = demand::DemandBook::default();
            }
        }
        Ok(books)
    }

    /// Handle one call: authenticate, check identity, record, grant.
    pub async fn lease(
        &self,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<GrantBody, Refusal> {
        // Before anything costly (a TokenReview): followers do not answer.
        self.leading()?;
        let token = auth::bearer(headers).ok_or_else(|| {
            Refusal::new(StatusCode::UNAUTHORIZED, "NoToken", "an Authorization: Bearer token is required (the pod's projected service-account token)")
        })?;
        let bytes = body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "BodyTooLarge",
                    format!("the report is larger than {MAX_BODY} bytes"),
                )
            } else {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "UnreadableBody",
                    rejection.body_text(),
                )
            }
        })?;
        if bytes.len() > MAX_BODY {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BodyTooLarge",
                format!("the report is larger than {MAX_BODY} bytes"),
            ));
        }
        let report: LeaseBody = serde_json::from_slice(&bytes).map_err(|error| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "MalformedReport",
                format!("the body is not a lease request: {error}"),
            )
        })?;
        let identity = self.auth.authenticate(token).await?;
        self.grant(&identity, &report, now_millis())
    }

    /// Everything after authentication, from memory only.
    pub fn grant(
        &self,
        identity: &Identity,
        report: &LeaseBody,
        now: u64,
    ) -> Result<GrantBody, Refusal> {
        let (term, since_millis) = self.leading()?;
        // Start the term's books before the report touches them.
        drop(self.books(term, since_millis)?);
        if identity.namespace != report.namespace || identity.pod != report.pod {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "NotYourPod",
                format!(
                    "the token belongs to pod {}/{}, not {}/{}",
                    identity.namespace, identity.pod, report.namespace, report.pod
                ),
            ));
        }
        let integration_ref = ObjectRef::new(&report.integration).within(&report.namespace);
        let Some(integration) = self
            .stores
            .integrations
            .get(&integration_ref)
            .and_then(|sli| plan::validate(&sli).ok())
        else {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "UnknownIntegration",
                format!(
                    "no SalesLayerIntegration {}/{}",
                    report.namespace, report.integration
                ),
            ));
        };
        if !integration.jobs.iter().any(|j| j.name == report.job) {
            let jobs: Vec<&str> = integration.jobs.iter().map(|j| j.name.as_str()).collect();
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "UnknownJob",
                format!(
                    "job {:?} is not registered in {}/{}; registered jobs: {}",
                    report.job,
                    report.namespace,
                    report.integration,
                    jobs.join(", ")
                ),
            ));
        }
        self.check_pod_labels(report)?;

        let key = integration.key(&report.job);
        let account_plan = self.stores.account_plan(&integration.account, None, now);
        let Some(job) = account_plan.job(&key) else {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "UnknownJob",
                format!("job {:?} has no allocation", report.job),
            ));
        };

        let throttled_before;
        let throttled_after;
        {
            let mut throttling = self.throttling.lock().map_err(|_| internal())?;
            let window = throttle::window_of(now, account_plan.budget.period_millis);
            throttled_before = throttling.job(&key).map(|t| t.throttled_windows(window));
            throttling.report(
                &key,
                report.usage.throttled,
                now,
                account_plan.budget.period_millis,
            );
            throttled_after = throttling.job(&key).map(|t| t.throttled_windows(window));
        }
        if throttled_before != throttled_after {
            let _ = self.changed.send(integration_ref.clone());
        }
        // Demand moves capacity between jobs only where lending is on; then
        // every integration on the account is re-planned.
        if integration.lend_idle_capacity {
            let seen = demand::Report {
                job: &key,
                pod: &report.pod,
                sent: report.usage.requests,
                queued: report.usage.queued,
            };
            let moved = self
                .stores
                .demand
                .write()
                .map(|mut book| book.report(seen, now, account_plan.budget.period_millis))
                .unwrap_or(false);
            if moved {
                for sibling in self.stores.on_account(&integration.account) {
                    let _ = self.changed.send(sibling);
                }
            }
        }

        let job_max_concurrency = integration
            .jobs
            .iter()
            .find(|j| j.name == report.job)
            .and_then(|j| j.max_concurrency);
        let request = LeaseRequest {
            account: &integration.account,
            usable: account_plan.budget,
            job: &key,
            pod: &report.pod,
            job_requests: job.requests,
            max_concurrency: job_max_concurrency,
            static_share: job.per_pod,
        };
        let grant = self.books(term, since_millis)?.book.lease(now, &request);
        self.record(report);
        Ok(GrantBody {
            requests: grant.share.requests,
            period_millis: grant.share.period_millis,
            max_concurrency: grant.share.max_concurrency,
            ttl_millis: grant.ttl_millis,
            refresh_millis: grant.refresh_millis,
        })
    }

    /// Count an accepted report in the metrics.
    fn record(&self, report: &LeaseBody) {
        let labels = JobLabels {
            namespace: report.namespace.clone(),
            integration: report.integration.clone(),
            job: report.job.clone(),
        };
        let usage = &report.usage;
        for (code, count) in &usage.by_status {
            // Only three-digit codes: a label per arbitrary string would let
            // a pod grow the series without bound.
            if code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) {
                self.metrics
                    .requests
                    .get_or_create(&CodeLabels {
                        namespace: labels.namespace.clone(),
                        integration: labels.integration.clone(),
                        job: labels.job.clone(),
                        code: code.clone(),
                    })
                    .inc_by(*count);
            }
        }
        self.metrics
            .throttled
            .get_or_create(&labels)
            .inc_by(usage.throttled);
        self.metrics
            .retries
            .get_or_create(&labels)
            .inc_by(usage.retries);
        self.metrics
            .peak_concurrency
            .get_or_create(&labels)
            .set(i64::try_from(usage.peak_concurrency).unwrap_or(i64::MAX));
        self.metrics
            .queued
            .get_or_create(&labels)
            .set(i64::try_from(usage.queued).unwrap_or(i64::MAX));
        self.metrics.lease_grants.get_or_create(&labels).inc();
    }

    /// Count a refused call by its reason.
    pub fn refused(&self, refusal: &Refusal) {
        self.metrics
            .lease_refusals
            .get_or_create(&OutcomeLabels {
                outcome: refusal.reason.to_owned(),
            })
            .inc();
    }

    fn check_pod_labels(&self, report: &LeaseBody) -> Result<(), Refusal> {
        let pod_ref = ObjectRef::new(&report.pod).within(&report.namespace);
        let labels = self
            .stores
            .pods
            .get(&pod_ref)
            .and_then(|pod| pod.metadata.labels.clone())
            .unwrap_or_default();
        let carries = |key: &str, value: &str| labels.get(key).is_some_and(|v| v == value);
        if carries(LABEL_INTEGRATION, &report.integration) && carries(LABEL_JOB, &report.job) {
            Ok(())
        } else {
            Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "PodNotInJob",
                format!(
                    "pod {}/{} does not carry labels {LABEL_INTEGRATION}={} and {LABEL_JOB}={}",
                    report.namespace, report.pod, report.integration, report.job
                ),
            ))
        }
    }

    /// Drop the lease of a pod that went away.
    pub fn release(&self, job: &JobKey, pod: &str) {
        if let Ok(mut leases) = self.leases.lock() {
            leases.book.release(job, pod);
        }
    }

    /// Live leases now, for metrics.
    pub fn live_leases(&self) -> usize {
        self.leases
            .lock()
            .map(|l| l.book.live_leases(now_millis()))
            .unwrap_or(0)
    }
}

/// The lease book and the leadership term it belongs to.
struct TermBook {
    term: Option<u64>,
    book: LeaseBook,
}

fn internal() -> Refusal {
    Refusal::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal",
        "the quota API's state is unavailable",
    )
}

/// The quota API's routes.
pub fn router(quota: Arc<Quota>) -> Router {
    Router::new()
        .route("/v1/leases", post(lease_handler))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(quota)
}

async fn lease_handler(
    State(quota): State<Arc<Quota>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match quota.lease(&headers, body).await {
        Ok(grant) => axum::Json(grant).into_response(),
        Err(refusal) => {
            quota.refused(&refusal);
            refusal.into_response()
        }
    }
}

/// Milliseconds since the epoch.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
