//! The controller: keeps every `SalesLayerAccount`'s status (its effective
//! budget included), every `SalesLayerIntegration`'s status and its pods'
//! `saleslayer.io/limit` annotations equal to what the allocation says.
//!
//! ```text
//!  SLA watch ─┐   SLI watch ─┐   namespace watch   pod metadata watch   quota API
//!             ▼              ▼          │                  │               │
//!          queues ◀── route ─┴──────────┴──────────────────┴───────────────┘
//!             │
//!             ▼
//!   reconcile account A: validate → count → step AIMD → status of A
//!     → plan A once with its effective budget
//!     → for each integration X on A: apply pods of X → status of X
//!                                    (then Events, notification)
//! ```
//!
//! A change to anything an account's plan reads — an integration's spec or
//! account, a namespace's labels, a live pod, an account's spec, what pods
//! report — queues that account (`watches::route`). Its reconcile plans the
//! whole account once from the in-memory stores (`saleslayer_core::plan`)
//! and writes each integration on it, through server-side apply under
//! [`FIELD_MANAGER`] and only when different, so one change costs one
//! reconcile. An integration's own reconcile runs only when no account
//! plans it: its spec is invalid, or its account is missing or invalid; it
//! says so in its status. Our own status and annotation writes queue
//! nothing. Nothing read from the cluster can crash the process: errors
//! requeue with backoff and show in `Ready`.
//!
//! Only the leader writes (`leader`): a follower's watches keep the stores
//! warm for its webhook, its reconciles write nothing, and every write checks
//! the role again just before it goes out. A replica that becomes leader
//! forgets what it had published and reconciles everything.

mod account;
mod apply;
mod events;
mod integration;
mod watches;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, PredicateConfig, WatchStreamExt, predicates};
use kube::{Client, Resource};
use saleslayer_core::api::{SalesLayerAccount, SalesLayerIntegration};
use tokio::sync::mpsc;
use tracing::info;

use crate::FIELD_MANAGER;
use crate::leader::{Leadership, Role};
use crate::metrics::{ControllerMetrics, Metrics};
use crate::state::{Reports, Stores};
pub use account::adapting;

/// How often everything is reconciled even when nothing was seen to change.
const RESYNC: Duration = Duration::from_secs(300);

/// From `now_ms` to just past the end of its window of `period_millis`:
/// when to look again so that a window that ends clean counts.
fn past_window_end(now_ms: u64, period_millis: u64) -> Duration {
    let period = period_millis.max(1);
    let next = (now_ms / period + 1) * period;
    Duration::from_millis(next - now_ms + 50)
}

/// What both reconciles do with a failure: nothing when leadership moved
/// mid-reconcile (not a failure; `None`), else count it by reason and retry
/// in 5 s. The caller logs it with its object's names.
fn on_failure(ctx: &Context, error: &Error) -> Option<kube::runtime::controller::Action> {
    if matches!(error, Error::NotLeader) {
        return None;
    }
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::OutcomeLabels {
            outcome: error.reason().to_owned(),
        })
        .inc();
    Some(kube::runtime::controller::Action::requeue(
        Duration::from_secs(5),
    ))
}

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

struct Context {
    client: Client,
    stores: Stores,
    /// Who publishes the Events (see `events::publish_about`).
    reporter: Reporter,
    /// The operator's CA, published as ConfigMap `saleslayer-operator-ca`.
    ca: Option<tokio::sync::watch::Receiver<String>>,
    /// The CA last published in each namespace.
    ca_published: watches::Published,
    /// Client for alert notifications.
    http: reqwest::Client,
    metrics: ControllerMetrics,
    /// Every series, to forget those of deleted integrations and accounts.
    all_metrics: Arc<Metrics>,
    /// The window of each integration's last status write.
    status_windows: Mutex<HashMap<ObjectRef<SalesLayerIntegration>, u64>>,
    /// The window of each account's last status write.
    account_windows: Mutex<HashMap<ObjectRef<SalesLayerAccount>, u64>>,
    /// Whether this replica may write.
    leadership: Leadership,
    /// Accounts to reconcile: where an integration reconcile hands over once
    /// its account is known.
    accounts: mpsc::UnboundedSender<ObjectRef<SalesLayerAccount>>,
    /// Pod annotation writes in flight, over every reconcile at once.
    pod_writes: tokio::sync::Semaphore,
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

/// Where the rest of the operator asks for reconciles.
#[derive(Clone)]
pub struct Queues {
    pub integrations: mpsc::UnboundedSender<ObjectRef<SalesLayerIntegration>>,
    pub accounts: mpsc::UnboundedSender<ObjectRef<SalesLayerAccount>>,
}

/// The receiving ends of [`Queues`].
pub struct QueueReceivers {
    pub integrations: mpsc::UnboundedReceiver<ObjectRef<SalesLayerIntegration>>,
    pub accounts: mpsc::UnboundedReceiver<ObjectRef<SalesLayerAccount>>,
}

/// Pod annotation writes in flight at once, over all reconciles. At start
/// every account's reconcile writes its pods together; unbounded, 40
/// accounts × 16 writes flooded a 2-core API server, whose queueing slowed
/// every write (and the status applies behind them) more than it helped.
const POD_WRITES_IN_FLIGHT: usize = 32;

/// A pair of connected queues.
pub fn queues() -> (Queues, QueueReceivers) {
    let (integrations, integrations_rx) = mpsc::unbounded_channel();
    let (accounts, accounts_rx) = mpsc::unbounded_channel();
    (
        Queues {
            integrations,
            accounts,
        },
        QueueReceivers {
            integrations: integrations_rx,
            accounts: accounts_rx,
        },
    )
}

/// What the controller shares with the rest of the operator.
pub struct Shared {
    /// The operator's CA (it changes when mounted files bring a new one),
    /// published as ConfigMap `saleslayer-operator-ca`.
    pub ca: Option<tokio::sync::watch::Receiver<String>>,
    /// What pods report, filled by the quota API.
    pub reports: Reports,
    /// Reconciles the quota API asks for (what pods reported changed).
    pub requested: QueueReceivers,
    /// Every part's series (the controller writes its own, and forgets
    /// those of deleted integrations and accounts).
    pub metrics: Arc<Metrics>,
    /// Whether this replica may write.
    pub leadership: Leadership,
}

/// Build the watches and return the stores (for the webhook and the quota
/// API) and the controllers, which run until `shutdown` resolves. The stores
/// fill only while the returned future is polled.
pub fn controller(
    client: Client,
    shared: Shared,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Stores, impl Future<Output = ()> + Send + 'static) {
    let (queued, own) = queues();
    let published = watches::Published::default();
    let watched = watches::watch(
        &client,
        shared.reports,
        &queued,
        published.clone(),
        shared.metrics.clone(),
    );
    let stores = watched.stores.clone();
    let context = Arc::new(Context {
        reporter: Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
        client,
        stores: stores.clone(),
        ca: shared.ca,
        ca_published: published,
        http: reqwest::Client::new(),
        metrics: shared.metrics.controller.clone(),
        all_metrics: shared.metrics.clone(),
        status_windows: Mutex::default(),
        account_windows: Mutex::default(),
        leadership: shared.leadership,
        accounts: queued.accounts.clone(),
        pod_writes: tokio::sync::Semaphore::new(POD_WRITES_IN_FLIGHT),
    });
    let shutdown = shutdown.shared();
    let debounce = ControllerConfig::default().debounce(Duration::from_millis(50));

    // Integrations: their own spec changes and every queue (pods, accounts,
    // namespaces queue through the watches); status-only updates do not
    // trigger them.
    // Whatever concerns an integration whose account plans it goes to that
    // account's reconcile instead (`watches::route`).
    let to_account = {
        let (stores, accounts) = (stores.clone(), queued.accounts.clone());
        move |sli: &SalesLayerIntegration| match watches::route(&stores, sli) {
            watches::Route::Account(account) => {
                let _ = accounts.send(account);
                false
            }
            watches::Route::Integration => true,
        }
    };
    let own_changes = {
        let to_account = to_account.clone();
        watched
            .integrations
            .predicate_filter(predicates::generation, PredicateConfig::default())
            .filter(move |changed| {
                futures::future::ready(changed.as_ref().map_or(true, &to_account))
            })
    };
    let routed = {
        let stores = stores.clone();
        merge([
            stream_from(own.integrations).boxed(),
            stream_from(shared.requested.integrations).boxed(),
            on_each_term(context.clone(), |stores| refs_of(&stores.integrations)).boxed(),
            on_new_ca(context.clone()).boxed(),
        ])
        .filter(move |reference| {
            futures::future::ready(
                stores
                    .integrations
                    .get(reference)
                    .is_none_or(|sli| to_account(&sli)),
            )
        })
    };
    let integrations = Controller::for_stream(own_changes, stores.integrations.clone())
        .with_config(debounce.clone())
        .reconcile_on(routed)
        .graceful_shutdown_on(shutdown.clone())
        .run(
            integration::reconcile,
            integration::error_policy,
            context.clone(),
        )
        .for_each(|_| async {});

    // Accounts: their own spec changes, and every queue.
    let accounts = Controller::for_stream(
        watched
            .accounts
            .predicate_filter(predicates::generation, PredicateConfig::default()),
        stores.accounts.clone(),
    )
    .with_config(debounce)
    .reconcile_on(merge([
        stream_from(own.accounts).boxed(),
        stream_from(shared.requested.accounts).boxed(),
        on_each_term(context.clone(), |stores| refs_of(&stores.accounts)).boxed(),
    ]))
    .graceful_shutdown_on(shutdown.clone())
    .run(account::reconcile, account::error_policy, context)
    .for_each(|_| async {});

    // Namespaces, pods and CA ConfigMaps only feed the stores and the queues.
    let namespaces = watched
        .namespaces
        .take_until(shutdown.clone())
        .for_each(|_| async {});
    let pods = watched
        .pods
        .take_until(shutdown.clone())
        .for_each(|_| async {});
    let ca_maps = watched.ca_maps.take_until(shutdown).for_each(|_| async {});

    let running = async move {
        futures::join!(integrations, accounts, namespaces, pods, ca_maps);
    };
    (stores, running)
}

/// Refs of everything in `store`.
fn refs_of<K>(store: &Store<K>) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .state()
        .iter()
        .map(|object| ObjectRef::from_obj(object.as_ref()))
        .collect()
}

/// Everything `all` lists, each time this replica becomes leader, after it
/// forgot what it had published: it may have missed anything meanwhile.
fn on_each_term<K>(
    ctx: Arc<Context>,
    all: impl Fn(&Stores) -> Vec<ObjectRef<K>> + Send + Sync + 'static,
) -> impl Stream<Item = ObjectRef<K>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
{
    let changes = ctx.leadership.changes();
    let all = Arc::new(all);
    futures::stream::unfold(
        (changes, None::<u64>),
        move |(mut changes, mut last_term)| {
            let ctx = ctx.clone();
            let all = all.clone();
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
                        if let Ok(mut windows) = ctx.account_windows.lock() {
                            windows.clear();
                        }
                        let refs = all(&ctx.stores);
                        info!(
                            objects = refs.len(),
                            term, "leading: reconciling everything"
                        );
                        return Some((futures::stream::iter(refs), (changes, last_term)));
                    }
                    // A closed channel means the role never changes again.
                    changes.changed().await.ok()?;
                }
            }
        },
    )
    .flatten()
}

/// Every integration, each time the CA changes (mounted files renewed):
/// each publishes the new CA into its namespace.
fn on_new_ca(
    ctx: Arc<Context>,
) -> impl Stream<Item = ObjectRef<SalesLayerIntegration>> + Send + 'static {
    let Some(ca) = ctx.ca.clone() else {
        return futures::stream::empty().left_stream();
    };
    futures::stream::unfold((ca, ctx), |(mut ca, ctx)| async move {
        // The value at start is published by the first reconciles.
        ca.changed().await.ok()?;
        let refs = refs_of(&ctx.stores.integrations);
        info!(
            integrations = refs.len(),
            "the CA changed: publishing it again"
        );
        Some((futures::stream::iter(refs), (ca, ctx)))
    })
    .flatten()
    .right_stream()
}

fn stream_from<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn merge<T: Send + 'static, const N: usize>(
    streams: [futures::stream::BoxStream<'static, T>; N],
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::select_all(streams)
}
