//! The quota API (DESIGN.md §6): `POST /v1/leases` over HTTPS, served by the
//! leader. Pods renew their lease on capacity and report their usage since
//! the last call; the answer is their grant.
//!
//! ```text
//!  decode ──▶ authenticate (TokenReview, cached) ──▶ authorize ──▶ record the report ──▶ lease ──▶ grant
//!                                                   (stores)      (Reports: demand,     (lease book)
//!                                                                  throttling)
//! ```
//!
//! Nothing in a report is trusted beyond its own pod: the token names the
//! pod, the pod must be the one in the body and carry that integration's and
//! job's labels (read from the operator's store, not from the body). Each
//! step after authentication is a function of the stores and the report, so
//! the tests below drive it with objects fed into the stores and no API
//! server. The books are pure (`saleslayer_core::{lease_book, demand,
//! throttle}`); this module does the I/O around them. Only the leader
//! answers (a follower says 503 `NotLeader`), and each new leadership term
//! starts with fresh books, as after a restart.
//!
//! Two brakes keep steady reporting from turning into writes (`pacing`): a
//! pod may renew at most once per [`pacing::MIN_RENEWAL_INTERVAL`] (429
//! `TooFrequent` otherwise), and demand queues its account's integrations for
//! a re-plan at most once per window of the account's limit.

pub mod auth;
mod error;
pub mod pacing;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use kube::runtime::reflector::ObjectRef;
use saleslayer_contract::{LEASES_PATH, LeaseGrant, LeaseReport};
use saleslayer_core::account::ValidatedAccount;
use saleslayer_core::adaptation::WindowCounts;
use saleslayer_core::allocation::{JobAllocation, JobKey};
use saleslayer_core::demand;
use saleslayer_core::lease_book::{self, DEFAULT_REFRESH_MILLIS, LeaseBook, LeaseRequest};
use saleslayer_core::plan::{self, AccountPlan, ValidatedIntegration};
use saleslayer_core::throttle;
use saleslayer_runtime::clock::{millis, wall_millis};

use crate::controller::Queues;
use crate::leader::{Leadership, Role};
use crate::metrics::{CodeLabels, JobLabels, OutcomeLabels, QuotaMetrics};
use crate::state::{Reports, Stores};
use auth::{Authenticator, Identity};
pub use error::QuotaError;
use pacing::{RenewalPace, ReplanGate};

/// The largest report accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a grant holds without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often pods should renew, at most (a grant asks for half a period
/// when that is sooner: `lease_book::refresh_for`).
pub const LEASE_REFRESH: Duration = Duration::from_millis(DEFAULT_REFRESH_MILLIS);

/// The quota API's state, shared with the controller.
pub struct Quota {
    stores: Stores,
    auth: Authenticator,
    leases: Mutex<TermBook>,
    /// Only the leader answers; a new term starts the books afresh.
    leadership: Leadership,
    /// Where reports that change what the controller would write are queued.
    queues: Queues,
    /// When each pod last renewed: one that calls too often is refused.
    renewals: Mutex<RenewalPace>,
    /// Demand re-plans each account at most once per window.
    replans: Mutex<ReplanGate>,
    metrics: QuotaMetrics,
}

/// A report whose pod may speak for the job it names, on an account that
/// takes its integration.
#[derive(Debug, Clone, PartialEq)]
pub struct Authorized {
    pub integration: ValidatedIntegration,
    pub account: ValidatedAccount,
    pub key: JobKey,
}

/// What recording a report changed, beyond the books themselves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// The job's count of throttled windows moved: its status changes.
    pub throttling_changed: bool,
    /// The job's demand moved enough to re-plan its account (lending only).
    pub demand_moved: bool,
    /// The account's window became throttled: its budget may have to drop.
    pub account_throttled: bool,
}

impl Quota {
    pub fn new(stores: Stores, auth: Authenticator, queues: Queues, metrics: QuotaMetrics) -> Self {
        Self {
            stores,
            auth,
            leases: Mutex::new(TermBook {
                term: None,
                book: LeaseBook::new(wall_millis(), millis(LEASE_TTL), millis(LEASE_REFRESH)),
            }),
            leadership: Leadership::always(),
            queues,
            renewals: Mutex::default(),
            replans: Mutex::default(),
            metrics,
        }
    }

    /// Answer only while `leadership` says this replica leads.
    pub fn with_leadership(self, leadership: Leadership) -> Self {
        Self { leadership, ..self }
    }

    /// The current term, or 503 `NotLeader` on a follower.
    fn leading(&self) -> Result<(u64, u64), QuotaError> {
        match self.leadership.role() {
            Role::Leader { term, since_millis } => Ok((term, since_millis)),
            Role::Follower => Err(QuotaError::NotLeader),
        }
    }

    /// The lease book of the current term: a replica that becomes leader
    /// starts empty books, as after a restart (grants capped at the static
    /// shares for one TTL from the moment it took over).
    fn books(&self, term: u64, since_millis: u64) -> Result<MutexGuard<'_, TermBook>, QuotaError> {
        let mut books = self.leases.lock().map_err(|_| QuotaError::Internal)?;
        if books.term != Some(term) {
            books.term = Some(term);
            books.book = LeaseBook::new(since_millis, millis(LEASE_TTL), millis(LEASE_REFRESH));
            self.stores.reports.reset();
        }
        Ok(books)
    }

    /// Handle one call: decode, authenticate, then [`Quota::grant`].
    pub async fn lease(
        &self,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
        peer: Option<IpAddr>,
    ) -> Result<LeaseGrant, QuotaError> {
        // Before anything costly (a TokenReview): followers do not answer,
        // and neither does a leader whose stores have not listed the cluster.
        self.leading()?;
        if !self.stores.synced() {
            return Err(QuotaError::NotReady);
        }
        let token = auth::bearer(headers).ok_or(QuotaError::NoToken)?;
        let report = decode(body)?;
        let identity = self.auth.authenticate(token, peer).await?;
        self.grant(&identity, &report, wall_millis())
    }

    /// Everything after authentication, from memory only: authorize, pace,
    /// record the report, lease.
    pub fn grant(
        &self,
        identity: &Identity,
        report: &LeaseReport,
        now: u64,
    ) -> Result<LeaseGrant, QuotaError> {
        let (term, since_millis) = self.leading()?;
        // Start the term's books before the report touches them.
        drop(self.books(term, since_millis)?);
        let authorized = authorize(&self.stores, identity, report)?;
        // Refused before its report counts: the sidecar sends it again later.
        self.renewals
            .lock()
            .map_err(|_| QuotaError::Internal)?
            .admit(&report.namespace, &report.pod, now)
            .map_err(|retry_after_millis| QuotaError::TooFrequent {
                namespace: report.namespace.clone(),
                pod: report.pod.clone(),
                retry_after_millis,
            })?;
        let mut account_plan = self.stores.account_plan(&authorized.account, None, now);
        allocation_of(&account_plan, &authorized, report)?;
        let recorded = record(
            &self.stores.reports,
            &authorized,
            report,
            &account_plan,
            now,
        );
        let window = throttle::window_of(now, account_plan.budget.period_millis);
        self.notify(&authorized, recorded, window);
        // The report's own demand counts in its grant: a pod that turned idle
        // gives its share up now, one that has work again asks for it now.
        if recorded.demand_moved {
            account_plan = self.stores.account_plan(&authorized.account, None, now);
        }
        let job = allocation_of(&account_plan, &authorized, report)?;
        let request = lease_request(&authorized, &account_plan, job, &report.pod);
        let (grant, ordinary) = {
            let book = &mut self.books(term, since_millis)?.book;
            let grant = book.lease(now, &request);
            (grant, book.ordinary_refresh(request.usable.period_millis))
        };
        self.count(&authorized.key, report);
        let mut refresh_millis = grant.refresh_millis;
        // Where idle capacity is lent, a pod whose requests wait holds all it
        // was granted: it comes back sooner, to take capacity as it frees and
        // to give back lent capacity soon after its lender returns.
        if authorized.integration.lend_idle_capacity && report.usage.queued > 0 {
            refresh_millis = refresh_millis.min(lease_book::waiting_refresh(ordinary));
        }
        // A pod that was throttled comes back soon: its account's budget may
        // be about to drop (adaptation), and it should send less at once.
        if report.usage.throttled > 0 {
            refresh_millis = refresh_millis.min(lease_book::cut_refresh(ordinary));
        }
        Ok(LeaseGrant {
            requests: grant.share.requests,
            period_millis: grant.share.period_millis,
            max_concurrency: grant.share.max_concurrency,
            ttl_millis: grant.ttl_millis,
            refresh_millis,
        })
    }

    /// Queue what a report changed: the integration's status, its
    /// account's plan (demand, at most once per `window`), its account's
    /// budget (throttling).
    fn notify(&self, authorized: &Authorized, recorded: Recorded, window: u64) {
        let integration = &authorized.integration;
        let replan = self
            .replans
            .lock()
            .is_ok_and(|mut gate| gate.replan(&integration.account, recorded.demand_moved, window));
        if replan {
            for sibling in self.stores.on_account(&integration.account) {
                let _ = self.queues.integrations.send(sibling);
            }
        } else if recorded.throttling_changed {
            let _ = self
                .queues
                .integrations
                .send(ObjectRef::new(&integration.name).within(&integration.namespace));
        }
        if recorded.account_throttled {
            let _ = self
                .queues
                .accounts
                .send(ObjectRef::new(&integration.account));
        }
    }

    /// Count an accepted report in the metrics: every counter saturates,
    /// and status codes are bounded per job (see `QuotaMetrics::code_label`).
    fn count(&self, key: &JobKey, report: &LeaseReport) {
        let labels = JobLabels::of(key);
        let usage = &report.usage;
        let metrics = &self.metrics;
        for (code, count) in &usage.by_status {
            let code = metrics.code_label(key, code);
            crate::metrics::count(
                &metrics.requests.get_or_create(&CodeLabels::of(key, &code)),
                *count,
            );
        }
        crate::metrics::count(&metrics.throttled.get_or_create(&labels), usage.throttled);
        crate::metrics::count(&metrics.retries.get_or_create(&labels), usage.retries);
        metrics
            .peak_concurrency
            .get_or_create(&labels)
            .set(i64::try_from(usage.peak_concurrency).unwrap_or(i64::MAX));
        metrics
            .queued
            .get_or_create(&labels)
            .set(i64::try_from(usage.queued).unwrap_or(i64::MAX));
        crate::metrics::count(&metrics.lease_grants.get_or_create(&labels), 1);
    }

    /// Count a refused call by its reason.
    pub fn refused(&self, error: &QuotaError) {
        self.metrics
            .lease_refusals
            .get_or_create(&OutcomeLabels {
                outcome: error.reason().to_owned(),
            })
            .inc();
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
            .map(|l| l.book.live_leases(wall_millis()))
            .unwrap_or(0)
    }
}

/// The body as a report, or why not.
fn decode(body: Result<Bytes, BytesRejection>) -> Result<LeaseReport, QuotaError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            QuotaError::BodyTooLarge
        } else {
            QuotaError::UnreadableBody(rejection.body_text())
        }
    })?;
    if bytes.len() > MAX_BODY {
        return Err(QuotaError::BodyTooLarge);
    }
    serde_json::from_slice(&bytes).map_err(|error| QuotaError::MalformedReport(error.to_string()))
}

/// Whether the authenticated pod may speak for the job its report names:
/// it is the pod in the body, the integration and job exist, and the pod
/// (as the store has it, not as the body says) carries their labels.
pub fn authorize(
    stores: &Stores,
    identity: &Identity,
    report: &LeaseReport,
) -> Result<Authorized, QuotaError> {
    if identity.namespace != report.namespace || identity.pod != report.pod {
        return Err(QuotaError::NotYourPod {
            token: format!("{}/{}", identity.namespace, identity.pod),
            body: format!("{}/{}", report.namespace, report.pod),
        });
    }
    let integration_ref = ObjectRef::new(&report.integration).within(&report.namespace);
    let integration = stores
        .integrations
        .get(&integration_ref)
        .and_then(|sli| plan::validate(&sli).ok())
        .ok_or_else(|| QuotaError::UnknownIntegration {
            namespace: report.namespace.clone(),
            name: report.integration.clone(),
        })?;
    if !integration.jobs.iter().any(|j| j.name == report.job) {
        let registered: Vec<&str> = integration.jobs.iter().map(|j| j.name.as_str()).collect();
        return Err(QuotaError::UnknownJob {
            namespace: report.namespace.clone(),
            integration: report.integration.clone(),
            job: report.job.clone(),
            registered: registered.join(", "),
        });
    }
    // Read under the lock, nothing copied: the token's UID when another pod
    // now has the name, and whether the pod carries the report's job.
    let (gone, in_job) = stores
        .index
        .read()
        .ok()
        .and_then(|index| {
            let pod = index.pod(&report.namespace, &report.pod)?;
            // A token outlives its pod: bound to the pod's UID, it speaks
            // only for that pod, not for one recreated under the same name.
            let gone = identity
                .uid
                .as_deref()
                .filter(|token_uid| pod.uid.as_deref().is_some_and(|live| live != *token_uid));
            let in_job = pod
                .job
                .as_ref()
                .is_some_and(|job| job.integration == report.integration && job.job == report.job);
            Some((gone, in_job))
        })
        .unwrap_or((None, false));
    if let Some(token_uid) = gone {
        return Err(QuotaError::PodGone {
            namespace: report.namespace.clone(),
            pod: report.pod.clone(),
            token_uid: token_uid.to_owned(),
        });
    }
    if !in_job {
        return Err(QuotaError::PodNotInJob {
            namespace: report.namespace.clone(),
            pod: report.pod.clone(),
            integration: report.integration.clone(),
            job: report.job.clone(),
        });
    }
    let account =
        stores
            .account_of(&integration)
            .map_err(|problem| QuotaError::IntegrationNotReady {
                namespace: report.namespace.clone(),
                integration: report.integration.clone(),
                message: problem.to_string(),
            })?;
    let key = integration.key(&report.job);
    Ok(Authorized {
        integration,
        account,
        key,
    })
}

/// The job's allocation in the account's plan.
fn allocation_of<'a>(
    account_plan: &'a AccountPlan,
    authorized: &Authorized,
    report: &LeaseReport,
) -> Result<&'a JobAllocation, QuotaError> {
    account_plan
        .job(&authorized.key)
        .ok_or_else(|| QuotaError::UnknownJob {
            namespace: report.namespace.clone(),
            integration: report.integration.clone(),
            job: report.job.clone(),
            registered: "(the job has no allocation on its account)".into(),
        })
}

/// Fold a report into the throttle book, and (where lending is on) the
/// demand book; say what moved.
pub fn record(
    reports: &Reports,
    authorized: &Authorized,
    report: &LeaseReport,
    account_plan: &AccountPlan,
    now: u64,
) -> Recorded {
    let period = account_plan.budget.period_millis;
    let key = &authorized.key;
    let throttling_changed = reports.throttling.lock().is_ok_and(|mut throttling| {
        let window = throttle::window_of(now, period);
        // A job never reported counts as 0 windows: its first clean report changes nothing.
        let windows = |t: &throttle::ThrottleBook| {
            t.job(key)
                .map_or(0, |state| state.throttled_windows(window))
        };
        let before = windows(&throttling);
        throttling.report(key, report.usage.throttled, now, period);
        before != windows(&throttling)
    });
    // Demand moves capacity between jobs only where lending is on.
    let demand_moved = authorized.integration.lend_idle_capacity
        && reports.demand.write().is_ok_and(|mut book| {
            let seen = demand::Report {
                job: key,
                pod: &report.pod,
                sent: report.usage.requests,
                queued: report.usage.queued,
                idle_millis: report.usage.idle_millis,
            };
            book.report(seen, now, period)
        });
    let account = &authorized.account;
    let account_throttled = reports.accounts.lock().is_ok_and(|mut accounts| {
        let reported = WindowCounts {
            sent: report.usage.requests,
            throttled: report.usage.throttled,
            held_back: report.usage.held_back,
        };
        accounts.report(&account.name, reported, account.window_of(now), now)
    });
    Recorded {
        throttling_changed,
        demand_moved,
        account_throttled,
    }
}

/// What the lease book needs to decide this pod's grant.
fn lease_request<'a>(
    authorized: &'a Authorized,
    account_plan: &'a AccountPlan,
    job: &JobAllocation,
    pod: &'a str,
) -> LeaseRequest<'a> {
    let max_concurrency = authorized
        .integration
        .jobs
        .iter()
        .find(|j| j.name == authorized.key.job)
        .and_then(|j| j.max_concurrency);
    LeaseRequest {
        account: &authorized.account.name,
        usable: account_plan.budget,
        job: &authorized.key,
        pod,
        job_requests: job.requests,
        max_concurrency,
        // Pods without a lease pace by the plan's per-pod share (their file or env):
        // the book reserves it for each of them.
        live_pods: job.pods,
        static_share: job.per_pod,
    }
}

/// The lease book and the leadership term it belongs to.
struct TermBook {
    term: Option<u64>,
    book: LeaseBook,
}

/// The quota API's routes.
pub fn router(quota: Arc<Quota>) -> Router {
    Router::new()
        .route(LEASES_PATH, post(lease_handler))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(quota)
}

async fn lease_handler(
    State(quota): State<Arc<Quota>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match quota.lease(&headers, body, Some(peer.ip())).await {
        Ok(grant) => axum::Json(grant).into_response(),
        Err(error) => {
            quota.refused(&error);
            error.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use saleslayer_contract::Usage;
    use saleslayer_core::api::SalesLayerIntegration;
    use serde_json::json;

    use super::*;
    use crate::state::testing::{integration, labelled_pod, stores_with};

    fn identity(pod: &str) -> Identity {
        Identity {
            namespace: "shop".into(),
            service_account: "default".into(),
            pod: pod.into(),
            uid: None,
        }
    }

    fn report(pod: &str, job: &str, usage: Usage) -> LeaseReport {
        LeaseReport {
            namespace: "shop".into(),
            integration: "catalog".into(),
            job: job.into(),
            pod: pod.into(),
            usage,
        }
    }

    fn catalog(lend: bool) -> SalesLayerIntegration {
        integration(
            "shop",
            "catalog",
            json!({"account": "acme", "lendIdleCapacity": lend, "jobs": [
                {"name": "import", "weight": 3}, {"name": "prices", "weight": 1}]}),
        )
    }

    fn quota(stores: Stores) -> (Quota, crate::controller::QueueReceivers) {
        // Never contacted: grant() starts after authentication.
        let client = kube::Client::try_from(kube::Config::new(
            "https://127.0.0.1:1".parse().expect("url"),
        ))
        .expect("client");
        let (queues, requested) = crate::controller::queues();
        let metrics = crate::metrics::Metrics::default().quota;
        (
            Quota::new(stores, Authenticator::new(client), queues, metrics),
            requested,
        )
    }

    #[test]
    fn authorize_checks_the_body_against_the_token_and_the_store() {
        let stores = stores_with(
            vec![catalog(false)],
            vec![
                labelled_pod("shop", "import-0", "catalog", "import"),
                labelled_pod("shop", "stranger", "orders", "import"),
            ],
        );
        let ok = authorize(
            &stores,
            &identity("import-0"),
            &report("import-0", "import", Usage::default()),
        )
        .expect("its own pod, job and labels");
        assert_eq!(ok.key, JobKey::new("shop", "catalog", "import"));

        let reason = |id: &str, pod: &str, job: &str| {
            authorize(&stores, &identity(id), &report(pod, job, Usage::default()))
                .map_err(|e| e.reason())
                .err()
        };
        assert_eq!(reason("import-0", "import-1", "import"), Some("NotYourPod"));
        assert_eq!(reason("import-0", "import-0", "images"), Some("UnknownJob"));
        assert_eq!(
            reason("stranger", "stranger", "import"),
            Some("PodNotInJob")
        );
        assert_eq!(
            reason("import-0", "import-0", "prices"),
            Some("PodNotInJob")
        );
        let mut elsewhere = report("import-0", "import", Usage::default());
        elsewhere.integration = "orders".into();
        assert_eq!(
            authorize(&stores, &identity("import-0"), &elsewhere).map_err(|e| e.reason()),
            Err("UnknownIntegration")
        );
        // The store's pod has uid "uid-import-0"; a token of an earlier pod
        // of the same name does not speak for it.
        let mut earlier = identity("import-0");
        earlier.uid = Some("uid-of-a-deleted-pod".into());
        assert_eq!(
            authorize(
                &stores,
                &earlier,
                &report("import-0", "import", Usage::default())
            )
            .map_err(|e| e.reason()),
            Err("PodGone")
        );
        earlier.uid = Some("uid-import-0".into());
        assert!(
            authorize(
                &stores,
                &earlier,
                &report("import-0", "import", Usage::default())
            )
            .is_ok()
        );
    }

    #[test]
    fn recording_throttled_usage_marks_the_job_and_clean_usage_does_not() {
        let stores = stores_with(
            vec![catalog(false)],
            vec![labelled_pod("shop", "import-0", "catalog", "import")],
        );
        let who = identity("import-0");
        let clean = report("import-0", "import", Usage::default());
        let authorized = authorize(&stores, &who, &clean).expect("authorized");
        let plan = stores.account_plan(&authorized.account, None, 0);
        assert_eq!(
            record(&stores.reports, &authorized, &clean, &plan, 1_000),
            Recorded::default()
        );
        let throttled = report(
            "import-0",
            "import",
            Usage {
                throttled: 2,
                ..Usage::default()
            },
        );
        let recorded = record(&stores.reports, &authorized, &throttled, &plan, 2_000);
        assert!(recorded.throttling_changed);
        assert!(!recorded.demand_moved, "lending is off: demand is not kept");
    }

    #[tokio::test]
    async fn a_grant_follows_the_plan_and_throttling_queues_the_integration() {
        let stores = stores_with(
            vec![catalog(false)],
            vec![
                labelled_pod("shop", "import-0", "catalog", "import"),
                labelled_pod("shop", "prices-0", "catalog", "prices"),
            ],
        );
        let (quota, mut changes) = quota(stores);
        // 40 usable over weights 3:1: import 30, prices 10, one pod each.
        // Within one TTL of the term's start the static share caps the grant,
        // which here is the whole allocation.
        let grant = quota
            .grant(
                &identity("import-0"),
                &report("import-0", "import", Usage::default()),
                wall_millis(),
            )
            .expect("granted");
        assert_eq!((grant.requests, grant.period_millis), (30, 10_000));
        assert!(
            changes.integrations.try_recv().is_err(),
            "nothing to reconcile"
        );

        let throttled = Usage {
            throttled: 1,
            ..Usage::default()
        };
        quota
            .grant(
                &identity("prices-0"),
                &report("prices-0", "prices", throttled),
                wall_millis(),
            )
            .expect("granted");
        assert_eq!(
            changes.integrations.try_recv().ok(),
            Some(ObjectRef::new("catalog").within("shop"))
        );
    }

    #[tokio::test]
    async fn a_follower_refuses_before_reading_anything() {
        let (quota, _changes) = quota(stores_with(vec![], vec![]));
        let (_tx, rx) = tokio::sync::watch::channel(Role::Follower);
        let quota = quota.with_leadership(Leadership::from_receiver(rx));
        let refused = quota
            .lease(&HeaderMap::new(), Ok(Bytes::from_static(b"garbage")), None)
            .await;
        assert_eq!(refused.map_err(|e| e.reason()), Err("NotLeader"));
    }

    #[tokio::test]
    async fn a_leader_that_has_not_listed_answers_not_ready() {
        let stores = stores_with(vec![catalog(false)], vec![]);
        stores
            .synced
            .namespaces
            .store(false, std::sync::atomic::Ordering::Release);
        let (quota, _changes) = quota(stores);
        let refused = quota
            .lease(&HeaderMap::new(), Ok(Bytes::from_static(b"{}")), None)
            .await
            .map_err(|e| (e.status().as_u16(), e.reason()));
        assert_eq!(refused, Err((503, "NotReady")));
    }

    #[tokio::test]
    async fn a_report_of_u64_max_saturates_instead_of_wrapping_or_panicking() {
        let stores = stores_with(
            vec![catalog(true)],
            vec![labelled_pod("shop", "import-0", "catalog", "import")],
        );
        let (quota, _changes) = quota(stores);
        let huge = Usage {
            requests: u64::MAX,
            by_status: [("200".to_owned(), u64::MAX), ("429".to_owned(), u64::MAX)].into(),
            throttled: u64::MAX,
            retries: u64::MAX,
            peak_concurrency: u64::MAX,
            queued: u64::MAX,
            idle_millis: u64::MAX,
            held_back: u64::MAX,
        };
        let now = wall_millis();
        for call in 0..3 {
            quota
                .grant(
                    &identity("import-0"),
                    &report("import-0", "import", huge.clone()),
                    now + call * 5_000,
                )
                .expect("granted");
        }
        let labels = JobLabels::of(&JobKey::new("shop", "catalog", "import"));
        assert_eq!(
            quota.metrics.throttled.get_or_create(&labels).get(),
            u64::MAX
        );
        assert_eq!(quota.metrics.lease_grants.get_or_create(&labels).get(), 3);
    }

    #[tokio::test]
    async fn a_pod_renewing_too_often_gets_429_too_frequent_with_retry_after() {
        let stores = stores_with(
            vec![catalog(true)],
            vec![labelled_pod("shop", "import-0", "catalog", "import")],
        );
        let (quota, _changes) = quota(stores);
        let now = wall_millis();
        let queued = |queued| {
            report(
                "import-0",
                "import",
                Usage {
                    queued,
                    ..Usage::default()
                },
            )
        };
        quota
            .grant(&identity("import-0"), &queued(2), now)
            .expect("the first call is granted");
        let refused = quota
            .grant(&identity("import-0"), &queued(40), now + 100)
            .expect_err("100 ms later is too soon");
        assert_eq!(
            refused,
            QuotaError::TooFrequent {
                namespace: "shop".into(),
                pod: "import-0".into(),
                retry_after_millis: 150,
            }
        );
        // The refused report did not count: demand is still what the first said.
        let key = JobKey::new("shop", "catalog", "import");
        let wanted = quota
            .stores
            .reports
            .demand
            .read()
            .map(|book| book.wanted(&key, now + 100, 10_000));
        assert_eq!(wanted.ok().flatten(), Some(2));
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        // Once the interval has passed it is granted again.
        assert!(
            quota
                .grant(&identity("import-0"), &queued(40), now + 1_000)
                .is_ok()
        );
    }

    #[tokio::test]
    async fn demand_that_keeps_moving_queues_the_account_once_per_window() {
        let pods: Vec<String> = (0..10).map(|n| format!("import-{n}")).collect();
        let stores = stores_with(
            vec![catalog(true)],
            pods.iter()
                .map(|pod| labelled_pod("shop", pod, "catalog", "import"))
                .collect(),
        );
        let (quota, mut changes) = quota(stores);
        // acme's window is its period, 10 s; start at the start of one.
        let window_start = (wall_millis() / 10_000 + 1) * 10_000;
        let mut queued = |pods: &[String], at: u64| {
            for (n, pod) in (0u64..).zip(pods) {
                let usage = Usage {
                    queued: 50,
                    ..Usage::default()
                };
                quota
                    .grant(&identity(pod), &report(pod, "import", usage), at + n)
                    .expect("granted");
            }
            std::iter::from_fn(|| changes.integrations.try_recv().ok()).count()
        };
        // Ten pods each add 50 queued: demand moves with every report (50,
        // 100, … 500), and the account is queued once for the window.
        assert_eq!(queued(&pods, window_start), 1);
        // The next window's first report carries the moves that waited.
        assert_eq!(queued(&pods[..1], window_start + 10_000), 1);
    }

    #[test]
    fn bodies_are_decoded_or_refused_with_a_reason() {
        assert_eq!(
            decode(Ok(Bytes::from_static(b"{"))).map_err(|e| e.reason()),
            Err("MalformedReport")
        );
        let huge = Bytes::from(vec![b' '; MAX_BODY + 1]);
        assert_eq!(
            decode(Ok(huge)).map_err(|e| e.reason()),
            Err("BodyTooLarge")
        );
        let body = serde_json::to_vec(&report("a", "b", Usage::default())).expect("encode");
        assert_eq!(
            decode(Ok(Bytes::from(body))).map(|r| r.pod),
            Ok("a".to_owned())
        );
    }

    proptest::proptest! {
        /// Whatever the body, decoding answers a report or a refusal with
        /// a client error, and never panics.
        #[test]
        fn any_body_is_a_report_or_a_client_error(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            match decode(Ok(Bytes::from(body))) {
                Ok(_) => {}
                Err(error) => proptest::prop_assert!(
                    matches!(error.status().as_u16(), 400 | 413),
                    "{error:?}"
                ),
            }
        }

        /// Reports that are JSON but oddly shaped: missing or huge fields.
        #[test]
        fn oddly_shaped_reports_never_panic(
            pod in "[a-z0-9-]{0,80}",
            requests in proptest::prelude::any::<u64>(),
            code in "[0-9a-z]{0,6}",
            extra in proptest::prelude::any::<bool>(),
        ) {
            let mut value = serde_json::json!({"namespace": "shop", "integration": "catalog",
                "job": "import", "pod": pod, "usage": {"requests": requests, "byStatus": {code: requests}}});
            if extra {
                value["usage"]["unknown"] = serde_json::json!([1, 2, 3]);
            }
            let _ = decode(Ok(Bytes::from(value.to_string())));
        }
    }
}
