//! The controller: keeps every `SalesLayerIntegration`'s status and its pods'
//! `saleslayer.io/limit` annotations equal to what the allocation says.
//!
//! ```text
//!  SLI watch ──┐ (siblings on the same account)      pod metadata watch
//!              ▼                                         │ (integration → account)
//!         reconcile(X): observe → validate → plan ──▶ apply pods of X ──▶ status of X
//! ```
//!
//! Each reconcile plans X's whole account from the in-memory stores (pure,
//! `plan`), then writes only X: its pods' annotations and its status, each
//! through server-side apply under [`FIELD_MANAGER`] and only when different.
//! A change to any integration or pod re-queues every integration of its
//! account, so siblings converge too. Nothing read from the cluster can
//! crash the process: errors requeue with backoff and show in `Ready`.
//!
//! Only the leader writes (`leader`): a follower's watches keep the stores
//! warm for its webhook, its reconciles write nothing, and every write checks
//! the role again just before it goes out. A replica that becomes leader
//! forgets what it had published and reconciles every integration.

mod apply;
mod events;
pub mod index;
pub mod plan;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::PartialObjectMeta;
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tracing::{Instrument, info, warn};

use crate::allocation::JobKey;
use crate::api::{ANNOTATION_LIMIT, LABEL_INTEGRATION, LABEL_JOB, SalesLayerIntegration};
use crate::leader::{Leadership, Role};
use crate::metrics::{AccountLabels, ControllerMetrics, JobLabels, OutcomeLabels};
use crate::quota::demand::DemandBook;
use crate::quota::throttle::ThrottleBook;
use apply::{annotate_pods, patch_status, publish_ca};
use events::{alert_on_change, publish_changes};
use index::PodIndex;
use plan::{AccountPlan, PodCounts, ValidatedIntegration};

/// The one field manager every write of the operator goes through.
pub const FIELD_MANAGER: &str = "saleslayer-operator";
/// Server-side filter for live pods: terminal phases never count.
pub const LIVE_POD_FIELDS: &str = "status.phase!=Succeeded,status.phase!=Failed";
/// How often an integration is reconciled even when nothing was seen to change.
const RESYNC: Duration = Duration::from_secs(300);

/// Errors of one reconcile, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("patching the status of {0}: {1}")]
    PatchStatus(String, #[source] kube::Error),
    #[error("annotating pod {0}: {1}")]
    AnnotatePod(String, #[source] kube::Error),
    #[error("publishing the CA ConfigMap in namespace {0}: {1}")]
    PublishCa(String, #[source] kube::Error),
    #[error("this replica stopped leading; the new leader writes")]
    NotLeader,
}

impl Error {
    /// Stable reason, used as metric label, Event reason and condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::PatchStatus(..) => "PatchStatus",
            Error::AnnotatePod(..) => "AnnotatePod",
            Error::PublishCa(..) => "PublishCa",
            Error::NotLeader => "NotLeader",
        }
    }
}

/// The controller's view of the cluster: integrations and live pod metadata.
#[derive(Clone)]
pub struct Stores {
    pub integrations: Store<SalesLayerIntegration>,
    pub pods: Store<PartialObjectMeta<Pod>>,
    /// Live pods per job, from the same watch as `pods`.
    pub index: Arc<RwLock<PodIndex>>,
    /// What jobs want, from the quota API's reports.
    pub demand: Arc<RwLock<DemandBook>>,
}

impl Stores {
    /// Every valid integration on `account`, and the live pods of their jobs.
    pub fn account_members(&self, account: &str) -> (Vec<ValidatedIntegration>, PodCounts) {
        let mut members: Vec<ValidatedIntegration> = self
            .integrations
            .state()
            .iter()
            .filter(|sli| sli.spec.account == account)
            .filter_map(|sli| plan::validate(sli).ok())
            .collect();
        members.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut pods = PodCounts::new();
        if let Ok(index) = self.index.read() {
            for member in &members {
                for job in &member.jobs {
                    let key = member.key(&job.name);
                    let count = index.count(&key);
                    if count > 0 {
                        pods.insert(key, count);
                    }
                }
            }
        }
        (members, pods)
    }

    /// The account's plan as of `now_ms`, optionally with one more live pod
    /// of `extra` (a pod being admitted).
    pub fn account_plan(&self, account: &str, extra: Option<&JobKey>, now_ms: u64) -> AccountPlan {
        let (members, mut pods) = self.account_members(account);
        if let Some(key) = extra {
            *pods.entry(key.clone()).or_default() += 1;
        }
        let mut demand = HashMap::new();
        if members.iter().any(|m| m.lend_idle_capacity)
            && let Ok(book) = self.demand.read()
        {
            for member in members.iter().filter(|m| m.lend_idle_capacity) {
                let period = member.budget().period_millis;
                for job in &member.jobs {
                    let key = member.key(&job.name);
                    if let Some(wanted) = book.demand(&key, now_ms, period) {
                        demand.insert(key, wanted);
                    }
                }
            }
        }
        plan::plan_account_with_demand(&members, &pods, &demand)
    }

    /// Refs of every integration on the same account as `namespace/name`.
    fn siblings_of(&self, namespace: &str, name: &str) -> Vec<ObjectRef<SalesLayerIntegration>> {
        let key = ObjectRef::new(name).within(namespace);
        match self.integrations.get(&key) {
            Some(sli) => self.on_account(&sli.spec.account),
            None => vec![key],
        }
    }

    /// Whether the pod watch's first list is complete (until then counts are low).
    pub fn pods_listed(&self) -> bool {
        self.index.read().is_ok_and(|index| index.listed())
    }

    /// Refs of every integration on `account`.
    pub fn on_account(&self, account: &str) -> Vec<ObjectRef<SalesLayerIntegration>> {
        self.integrations
            .state()
            .iter()
            .filter(|sli| sli.spec.account == account)
            .map(|sli| ObjectRef::from_obj(sli.as_ref()))
            .collect()
    }
}

/// The job a live pod runs, from its labels; `None` for a pod that is going away.
pub fn live_pod_key(pod: &PartialObjectMeta<Pod>) -> Option<JobKey> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let labels = pod.metadata.labels.as_ref()?;
    Some(JobKey {
        namespace: pod.metadata.namespace.clone()?,
        integration: labels.get(LABEL_INTEGRATION)?.clone(),
        job: labels.get(LABEL_JOB)?.clone(),
    })
}

struct Context {
    client: Client,
    stores: Stores,
    recorder: Recorder,
    /// The operator's CA, published as ConfigMap `saleslayer-operator-ca`.
    ca_pem: Option<String>,
    /// Namespaces whose CA ConfigMap is known to be current.
    ca_published: Mutex<BTreeSet<String>>,
    /// Throttled windows per job, filled by the quota API.
    throttling: Arc<Mutex<ThrottleBook>>,
    /// Client for alert notifications.
    http: reqwest::Client,
    metrics: ControllerMetrics,
    /// The window of each integration's last status write.
    status_windows: Mutex<HashMap<ObjectRef<SalesLayerIntegration>, u64>>,
    /// Whether this replica may write.
    leadership: Leadership,
}

impl Context {
    /// Checked right before every write: a replica that stopped leading
    /// must not write, even in a reconcile that started while it led.
    fn fence(&self) -> Result<(), Error> {
        if self.leadership.is_leader() {
            Ok(())
        } else {
            Err(Error::NotLeader)
        }
    }
}

/// What the controller shares with the rest of the operator.
pub struct Shared {
    /// The operator's CA, published as ConfigMap `saleslayer-operator-ca`.
    pub ca_pem: Option<String>,
    /// Throttled windows per job, filled by the quota API.
    pub throttling: Arc<Mutex<ThrottleBook>>,
    /// Integrations to reconcile because their throttling changed.
    pub changed: mpsc::UnboundedReceiver<ObjectRef<SalesLayerIntegration>>,
    /// The controller's series.
    pub metrics: ControllerMetrics,
    /// What jobs want, filled by the quota API.
    pub demand: Arc<RwLock<DemandBook>>,
    /// Whether this replica may write.
    pub leadership: Leadership,
}

impl Shared {
    /// Nothing shared: no CA, an empty throttle book, no quota API.
    pub fn standalone() -> Self {
        let (_, changed) = mpsc::unbounded_channel();
        Self {
            ca_pem: None,
            throttling: Arc::default(),
            changed,
            metrics: crate::metrics::Metrics::default().controller,
            demand: Arc::default(),
            leadership: Leadership::always(),
        }
    }
}

/// Build the watches and return the stores (for the webhook) and the
/// controller, which runs until `shutdown` resolves. The stores fill only
/// while the returned future is polled.
pub fn controller(
    client: Client,
    shared: Shared,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> (Stores, impl Future<Output = ()> + Send + 'static) {
    let integrations = Api::<SalesLayerIntegration>::all(client.clone());
    // Metadata only: full Pod objects would cost far more memory.
    let pods = Api::<PartialObjectMeta<Pod>>::all(client.clone());

    let (sli_reader, sli_writer) = reflector::store();
    let (pod_reader, pod_writer) = reflector::store();
    let stores = Stores {
        integrations: sli_reader.clone(),
        pods: pod_reader,
        index: Arc::default(),
        demand: shared.demand.clone(),
    };

    let sli_stream = reflector::reflector(
        sli_writer,
        watcher(integrations, watcher::Config::default())
            .modify(|sli: &mut SalesLayerIntegration| sli.metadata.managed_fields = None),
    )
    .default_backoff()
    .inspect(|event| {
        if let Err(error) = event {
            warn!(%error, "watching SalesLayerIntegrations failed; is the CRD installed? (`saleslayer-operator crd | kubectl apply -f -`)");
        }
    });
    let (sibling_tx, sibling_rx) = mpsc::unbounded_channel();
    let sli_stream =
        with_account_siblings(sli_stream.touched_objects(), stores.clone(), sibling_tx);

    let pod_config = watcher::Config::default()
        .labels(LABEL_INTEGRATION)
        .fields(LIVE_POD_FIELDS);
    let index = stores.index.clone();
    // Keep only what planning needs of each pod: managedFields and other
    // annotations (last-applied configurations, for one) would be most of
    // the memory at 10 000 pods.
    let slim = watcher(pods, pod_config).modify(|pod: &mut PartialObjectMeta<Pod>| {
        let meta = &mut pod.metadata;
        meta.managed_fields = None;
        meta.owner_references = None;
        meta.finalizers = None;
        meta.generate_name = None;
        meta.uid = None;
        meta.creation_timestamp = None;
        if let Some(annotations) = meta.annotations.as_mut() {
            annotations.retain(|key, _| key == ANNOTATION_LIMIT);
        }
        if let Some(labels) = meta.labels.as_mut() {
            labels.retain(|key, _| key == LABEL_INTEGRATION || key == LABEL_JOB);
        }
    });
    let pod_stream = reflector::reflector(pod_writer, slim)
        .default_backoff()
        .inspect(move |event| {
            if let (Ok(event), Ok(mut index)) = (event, index.write()) {
                index.apply(event);
            }
        })
        .touched_objects();
    let pod_stores = stores.clone();

    let context = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        client,
        stores: stores.clone(),
        ca_pem: shared.ca_pem,
        ca_published: Mutex::default(),
        throttling: shared.throttling,
        http: reqwest::Client::new(),
        metrics: shared.metrics,
        status_windows: Mutex::default(),
        leadership: shared.leadership,
    });
    let elected = on_each_term(context.clone());

    let running = Controller::for_stream(sli_stream, sli_reader)
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(50)))
        .watches_stream(pod_stream, move |pod: PartialObjectMeta<Pod>| {
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let integration = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_INTEGRATION).cloned())
                .unwrap_or_default();
            pod_stores.siblings_of(&namespace, &integration)
        })
        .reconcile_on(futures::stream::select(
            futures::stream::select(
                tokio_stream_from(sibling_rx),
                tokio_stream_from(shared.changed),
            ),
            elected,
        ))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile did not complete");
            }
        });
    (stores, running)
}

/// Run the controller alone until `shutdown` resolves.
pub async fn run(client: Client, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    controller(client, Shared::standalone(), shutdown).1.await;
}

/// Pass integration events through, and queue every integration on the
/// event's account (and on the account it had before, if it moved).
fn with_account_siblings(
    stream: impl Stream<Item = Result<SalesLayerIntegration, watcher::Error>> + Send + 'static,
    stores: Stores,
    siblings: mpsc::UnboundedSender<ObjectRef<SalesLayerIntegration>>,
) -> impl Stream<Item = Result<SalesLayerIntegration, watcher::Error>> + Send + 'static {
    let last_account: Mutex<HashMap<ObjectRef<SalesLayerIntegration>, String>> = Mutex::default();
    stream.inspect(move |event| {
        let Ok(sli) = event else { return };
        let me = ObjectRef::from_obj(sli);
        let account = sli.spec.account.clone();
        let previous = last_account
            .lock()
            .ok()
            .and_then(|mut map| map.insert(me.clone(), account.clone()));
        let mut refs = stores.on_account(&account);
        if let Some(old) = previous.filter(|old| *old != account) {
            refs.extend(stores.on_account(&old));
        }
        for sibling in refs.into_iter().filter(|r| *r != me) {
            let _ = siblings.send(sibling);
        }
    })
}

/// Every integration, each time this replica becomes leader, after it
/// forgot what it had published: it may have missed anything meanwhile.
fn on_each_term(
    ctx: Arc<Context>,
) -> impl Stream<Item = ObjectRef<SalesLayerIntegration>> + Send + 'static {
    let changes = ctx.leadership.changes();
    futures::stream::unfold(
        (changes, None::<u64>),
        move |(mut changes, mut last_term)| {
            let ctx = ctx.clone();
            async move {
                loop {
                    let role = *changes.borrow_and_update();
                    if let Role::Leader { term, .. } = role
                        && last_term != Some(term)
                    {
                        last_term = Some(term);
                        if let Ok(mut done) = ctx.ca_published.lock() {
                            done.clear();
                        }
                        if let Ok(mut windows) = ctx.status_windows.lock() {
                            windows.clear();
                        }
                        let all: Vec<_> = ctx
                            .stores
                            .integrations
                            .state()
                            .iter()
                            .map(|sli| ObjectRef::from_obj(sli.as_ref()))
                            .collect();
                        info!(
                            integrations = all.len(),
                            term, "leading: reconciling every integration"
                        );
                        return Some((futures::stream::iter(all), (changes, last_term)));
                    }
                    // A closed channel means the role never changes again.
                    changes.changed().await.ok()?;
                }
            }
        },
    )
    .flatten()
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn reconcile(sli: Arc<SalesLayerIntegration>, ctx: Arc<Context>) -> Result<Action, Error> {
    // A follower writes nothing; it is queued again when it becomes leader.
    if !ctx.leadership.is_leader() {
        return Ok(Action::await_change());
    }
    // Planning with a half-listed pod store would write 0-pod statuses.
    if !ctx.stores.pods_listed() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let started = std::time::Instant::now();
    ctx.metrics.reconciles.inc();
    let span = tracing::info_span!(
        "reconcile",
        namespace = %sli.namespace().unwrap_or_default(),
        integration = %sli.name_any(),
        account = %sli.spec.account
    );
    let result = reconcile_inner(sli, &ctx).instrument(span).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(sli: Arc<SalesLayerIntegration>, ctx: &Context) -> Result<Action, Error> {
    let namespace = sli.namespace().unwrap_or_default();
    let now = Time(Timestamp::now());

    // validate
    let integration = match plan::validate(&sli) {
        Ok(valid) => valid,
        Err(message) => {
            warn!(%message, "invalid spec");
            let status =
                plan::not_ready_status(&sli, plan::conditions::REASON_INVALID_SPEC, message, now);
            patch_status(ctx, &sli, &status).await?;
            return Ok(Action::requeue(RESYNC));
        }
    };
    // observe + plan
    let account_plan =
        ctx.stores
            .account_plan(&integration.account, None, crate::quota::now_millis());

    // apply: the CA for the pods' quota clients, and the pods whose share changed
    let applied = match publish_ca(ctx, &namespace).await {
        Ok(()) => annotate_pods(ctx, &integration, &account_plan).await,
        Err(error) => Err(error),
    };
    if let Err(error) = applied {
        // Say so in the status (best effort), then retry with backoff.
        let status = plan::not_ready_status(&sli, error.reason(), error.to_string(), now);
        if let Err(status_error) = patch_status(ctx, &sli, &status).await {
            warn!(%status_error, "could not record the failure in the status either");
        }
        return Err(error);
    }

    // status
    let now_ms = crate::quota::now_millis();
    let period = account_plan.budget.period_millis.max(1);
    let throttling = job_throttling(ctx, &integration, now_ms, period);
    let previous = sli.status.as_ref();
    let status = plan::desired_status(&integration, &account_plan, previous, &throttling, now);
    record(ctx, &integration, &account_plan, &status);
    let window = crate::quota::throttle::window_of(now_ms, period);
    let me = ObjectRef::from_obj(sli.as_ref());
    let written_this_window = ctx
        .status_windows
        .lock()
        .ok()
        .and_then(|w| w.get(&me).copied())
        == Some(window);
    let deferred = previous.is_some_and(|p| {
        !same_status(p, &status) && only_throttling_differs(p, &status) && written_this_window
    });
    if deferred {
        // Throttling is written at most once per window: the rest waits for the next.
        let next = (now_ms / period + 1) * period;
        return Ok(Action::requeue(Duration::from_millis(next - now_ms + 50)));
    }
    if previous.is_none_or(|p| !same_status(p, &status)) {
        ctx.fence()?;
        if let Ok(mut windows) = ctx.status_windows.lock() {
            windows.insert(me, window);
        }
        publish_changes(ctx, &sli, previous, &status, &account_plan).await;
        alert_on_change(ctx, &sli, &integration, previous, &status, &throttling).await;
        patch_status(ctx, &sli, &status).await?;
        info!(
            allocations = ?status.jobs.iter().map(|j| (&j.name, j.allocated_requests, j.pods)).collect::<Vec<_>>(),
            "status updated"
        );
    }
    // While any job is throttled, look again when the window ends: a window
    // without throttled reports ends the run even if nobody reports.
    if throttling.values().any(|t| t.windows > 0) {
        let next = (now_ms / period + 1) * period;
        return Ok(Action::requeue(Duration::from_millis(next - now_ms + 50)));
    }
    Ok(Action::requeue(RESYNC))
}

/// Allocation gauges for the integration's jobs and its account.
fn record(
    ctx: &Context,
    integration: &ValidatedIntegration,
    account_plan: &AccountPlan,
    status: &crate::api::SalesLayerIntegrationStatus,
) {
    let metrics = &ctx.metrics;
    let account = AccountLabels {
        account: account_plan.account.clone(),
    };
    metrics
        .usable
        .get_or_create(&account)
        .set(i64::from(account_plan.budget.requests));
    metrics
        .overcommitted
        .get_or_create(&account)
        .set(i64::from(account_plan.allocation.overcommit.is_some()));
    let threshold = integration.alerting.persistent_windows.max(1);
    for job in &status.jobs {
        let labels = JobLabels {
            namespace: integration.namespace.clone(),
            integration: integration.name.clone(),
            job: job.name.clone(),
        };
        metrics
            .allocated
            .get_or_create(&labels)
            .set(i64::from(job.allocated_requests));
        metrics.pods.get_or_create(&labels).set(i64::from(job.pods));
        metrics
            .persistent_throttling
            .get_or_create(&labels)
            .set(i64::from(job.throttled_windows >= threshold));
    }
}

/// The throttling of the integration's jobs as of `now_ms`.
fn job_throttling(
    ctx: &Context,
    integration: &ValidatedIntegration,
    now_ms: u64,
    period: u64,
) -> std::collections::BTreeMap<String, plan::JobThrottling> {
    let window = crate::quota::throttle::window_of(now_ms, period);
    let Ok(book) = ctx.throttling.lock() else {
        return Default::default();
    };
    integration
        .jobs
        .iter()
        .filter_map(|job| {
            let state = book.job(&integration.key(&job.name))?;
            let windows = state.throttled_windows(window);
            Some((
                job.name.clone(),
                plan::JobThrottling {
                    windows,
                    last_throttled_millis: state.last_throttled_millis,
                    throttled_requests: if windows > 0 { state.run_throttled } else { 0 },
                },
            ))
        })
        .collect()
}

/// Whether `a` and `b` differ only in what the quota API counts.
fn only_throttling_differs(
    a: &crate::api::SalesLayerIntegrationStatus,
    b: &crate::api::SalesLayerIntegrationStatus,
) -> bool {
    let strip = |s: &crate::api::SalesLayerIntegrationStatus| {
        let mut s = s.clone();
        for job in &mut s.jobs {
            job.throttled_windows = 0;
            job.last_throttled = None;
        }
        s.conditions
            .retain(|c| c.type_ != plan::conditions::PERSISTENT_THROTTLING);
        if let Some(summary) = s.summary.as_mut() {
            summary.throttling.clear();
        }
        s
    };
    same_status(&strip(a), &strip(b))
}

/// Equal for the purpose of writing: conditions compare without their
/// transition time (a new time alone is no change).
fn same_status(
    a: &crate::api::SalesLayerIntegrationStatus,
    b: &crate::api::SalesLayerIntegrationStatus,
) -> bool {
    let strip = |s: &crate::api::SalesLayerIntegrationStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

fn error_policy(sli: Arc<SalesLayerIntegration>, error: &Error, ctx: Arc<Context>) -> Action {
    if matches!(error, Error::NotLeader) {
        // Not a failure: leadership moved mid-reconcile.
        return Action::await_change();
    }
    ctx.metrics
        .reconcile_errors
        .get_or_create(&OutcomeLabels {
            outcome: error.reason().to_owned(),
        })
        .inc();
    warn!(
        namespace = %sli.namespace().unwrap_or_default(),
        integration = %sli.name_any(),
        reason = error.reason(),
        %error,
        "reconcile failed; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{JobStatus, PerPodStatus, SalesLayerIntegrationStatus};

    fn status(allocated: u32, throttled: u32) -> SalesLayerIntegrationStatus {
        SalesLayerIntegrationStatus {
            jobs: vec![JobStatus {
                name: "import".into(),
                allocated_requests: allocated,
                pods: 1,
                per_pod: PerPodStatus {
                    requests: allocated,
                    period_millis: 10_000,
                },
                throttled_windows: throttled,
                last_throttled: None,
            }],
            ..SalesLayerIntegrationStatus::default()
        }
    }

    #[test]
    fn throttling_only_changes_are_told_apart() {
        assert!(only_throttling_differs(&status(8, 0), &status(8, 3)));
        assert!(!only_throttling_differs(&status(8, 0), &status(9, 0)));
        assert!(same_status(&status(8, 1), &status(8, 1)));
    }
}
