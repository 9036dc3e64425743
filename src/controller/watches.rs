//! The four watches that fill the stores (accounts, integrations, namespace
//! labels, live pod metadata), and what each event queues.
//!
//! An event queues reconciles only when it changes what planning reads: an
//! integration's generation or account, an account's generation, a
//! namespace's labels, the set of a job's live pods. Status writes (ours,
//! the effective budget included: the reconcile that writes it has already
//! planned with it) and annotation writes (ours) change none of those, so
//! they queue nothing. What is queued is the account concerned ([`route`]):
//! its reconcile plans once and writes every integration on it, so one
//! change costs one reconcile. [`Seen`] decides that, purely, from the
//! events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use saleslayer_contract::{CA_CONFIGMAP, CA_CONFIGMAP_KEY, LABEL_INTEGRATION};
use saleslayer_core::allocation::JobKey;
use saleslayer_core::api::{SalesLayerAccount, SalesLayerIntegration};
use tracing::warn;

use super::Queues;
use crate::metrics::Metrics;
use crate::state::{LIVE_POD_FIELDS, PodIndex, Reports, Stores};

type Watched<K> = BoxStream<'static, Result<K, watcher::Error>>;

/// The stores and the streams that fill them (as they are polled).
pub(super) struct Watches {
    pub stores: Stores,
    pub accounts: Watched<SalesLayerAccount>,
    pub integrations: Watched<SalesLayerIntegration>,
    pub namespaces: Watched<PartialObjectMeta<Namespace>>,
    pub pods: Watched<PartialObjectMeta<Pod>>,
    pub ca_maps: Watched<ConfigMap>,
}

/// The CA this process last published in each namespace.
pub(super) type Published = Arc<Mutex<BTreeMap<String, String>>>;

/// Start watching; every event that changes a plan queues its reconciles,
/// and a CA ConfigMap deleted or changed by someone else queues the
/// integrations of its namespace, which publish it again.
pub(super) fn watch(
    client: &Client,
    reports: Reports,
    queues: &Queues,
    published: Published,
    metrics: Arc<Metrics>,
) -> Watches {
    let (sla_reader, sla_writer) = reflector::store();
    let (sli_reader, sli_writer) = reflector::store();
    let (ns_reader, ns_writer) = reflector::store();
    let stores = Stores {
        accounts: sla_reader,
        integrations: sli_reader,
        namespaces: ns_reader,
        index: Arc::new(std::sync::RwLock::new(PodIndex::default())),
        reports,
        synced: Arc::default(),
    };
    let seen = Arc::new(Mutex::new(Seen::default()));

    let accounts = {
        let (stores, queues, seen) = (stores.clone(), queues.clone(), seen.clone());
        let metrics = metrics.clone();
        reflector::reflector(
            sla_writer,
            watcher(Api::<SalesLayerAccount>::all(client.clone()), watcher::Config::default())
                .modify(|sla: &mut SalesLayerAccount| sla.metadata.managed_fields = None),
        )
        .default_backoff()
        .inspect(move |event| match event {
            Ok(event) => {
                match event {
                    watcher::Event::InitDone => stores.synced.accounts.store(true, Ordering::Release),
                    watcher::Event::Delete(sla) => metrics.forget_account(&sla.name_any()),
                    _ => {}
                }
                let moved = seen.lock().map(|mut s| s.account(event)).unwrap_or_default();
                queue_accounts(&stores, &queues, moved);
            }
            Err(error) => warn!(%error, "watching SalesLayerAccounts failed; are the CRDs installed? (`saleslayer-operator crd | kubectl apply -f -`)"),
        })
        .touched_objects()
        .boxed()
    };

    let integrations = {
        let (stores, queues, seen) = (stores.clone(), queues.clone(), seen.clone());
        let metrics = metrics.clone();
        reflector::reflector(
            sli_writer,
            watcher(Api::<SalesLayerIntegration>::all(client.clone()), watcher::Config::default())
                .modify(|sli: &mut SalesLayerIntegration| sli.metadata.managed_fields = None),
        )
        .default_backoff()
        .inspect(move |event| match event {
            Ok(event) => {
                match event {
                    watcher::Event::InitDone => {
                        stores.synced.integrations.store(true, Ordering::Release);
                    }
                    watcher::Event::Delete(sli) => {
                        let namespace = sli.namespace().unwrap_or_default();
                        let keys: Vec<JobKey> = sli
                            .spec
                            .jobs
                            .iter()
                            .map(|job| JobKey::new(&namespace, sli.name_any(), &job.name))
                            .collect();
                        metrics.forget_jobs(&keys);
                    }
                    _ => {}
                }
                let moved = seen.lock().map(|mut s| s.integration(event)).unwrap_or_default();
                queue_accounts(&stores, &queues, moved);
            }
            Err(error) => warn!(%error, "watching SalesLayerIntegrations failed; are the CRDs installed? (`saleslayer-operator crd | kubectl apply -f -`)"),
        })
        .touched_objects()
        .boxed()
    };

    let namespaces = {
        let (stores, queues, seen) = (stores.clone(), queues.clone(), seen);
        // Labels only: accounts select namespaces by them.
        reflector::reflector(
            ns_writer,
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                watcher::Config::default(),
            )
            .modify(|ns: &mut PartialObjectMeta<Namespace>| {
                let labels = ns.metadata.labels.take();
                ns.metadata = kube::api::ObjectMeta {
                    name: ns.metadata.name.take(),
                    resource_version: ns.metadata.resource_version.take(),
                    labels,
                    ..kube::api::ObjectMeta::default()
                };
            }),
        )
        .default_backoff()
        .inspect(move |event| match event {
            Ok(event) => {
                if matches!(event, watcher::Event::InitDone) {
                    stores.synced.namespaces.store(true, Ordering::Release);
                }
                let relabelled = seen
                    .lock()
                    .map(|mut s| s.namespace(event))
                    .unwrap_or_default();
                let accounts: BTreeSet<String> = relabelled
                    .iter()
                    .flat_map(|namespace| accounts_used_in(&stores, namespace))
                    .collect();
                queue_accounts(&stores, &queues, accounts);
            }
            Err(error) => warn!(%error, "watching namespaces failed"),
        })
        .touched_objects()
        .boxed()
    };

    let pods = {
        let (stores, queues) = (stores.clone(), queues.clone());
        let pod_config = watcher::Config::default()
            .labels(LABEL_INTEGRATION)
            .fields(LIVE_POD_FIELDS);
        // Only the pod index keeps anything of each pod (its UID, job and
        // limit annotation): no store of their metadata, which would be
        // most of the memory at 10 000 pods.
        watcher(
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            pod_config,
        )
        .default_backoff()
        .inspect(move |event| {
            let Ok(event) = event else { return };
            let changed = stores
                .index
                .write()
                .map(|mut index| index.apply(event))
                .unwrap_or_default();
            let accounts: BTreeSet<String> = changed
                .iter()
                .filter_map(|job| stores.account_name_of(&job.namespace, &job.integration))
                .collect();
            queue_accounts(&stores, &queues, accounts);
        })
        .touched_objects()
        .boxed()
    };

    let ca_maps = {
        let (stores, queues) = (stores.clone(), queues.clone());
        watcher(
            Api::<ConfigMap>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={CA_CONFIGMAP}")),
        )
        .default_backoff()
        .inspect(move |event| {
            let Ok(event) = event else { return };
            let Ok(mut published) = published.lock() else {
                return;
            };
            for namespace in ca_maps_to_restore(&published, event) {
                published.remove(&namespace);
                for sli in stores.integrations.state() {
                    if sli.metadata.namespace.as_deref() == Some(namespace.as_str()) {
                        let _ = queues.integrations.send(ObjectRef::from_obj(sli.as_ref()));
                    }
                }
            }
        })
        .touched_objects()
        .boxed()
    };

    Watches {
        stores,
        accounts,
        integrations,
        namespaces,
        pods,
        ca_maps,
    }
}

/// The namespaces whose CA ConfigMap an event shows gone, or holding
/// something else than what was published there.
fn ca_maps_to_restore(
    published: &BTreeMap<String, String>,
    event: &watcher::Event<ConfigMap>,
) -> Vec<String> {
    let changed = |map: &ConfigMap| {
        let namespace = map.namespace().unwrap_or_default();
        let held = map.data.as_ref().and_then(|d| d.get(CA_CONFIGMAP_KEY));
        match published.get(&namespace) {
            Some(ca) if held != Some(ca) => Some(namespace),
            _ => None,
        }
    };
    match event {
        watcher::Event::Delete(map) => map
            .namespace()
            .filter(|ns| published.contains_key(ns))
            .into_iter()
            .collect(),
        watcher::Event::Apply(map) | watcher::Event::InitApply(map) => {
            changed(map).into_iter().collect()
        }
        watcher::Event::Init | watcher::Event::InitDone => Vec::new(),
    }
}

/// Queue every integration on each of `accounts`, and the accounts.
/// Queue the reconcile of each account that a change concerns: it plans the
/// account and writes every integration on it. The integrations of an
/// account that does not exist or is invalid are queued themselves (each
/// says what is wrong in its status).
fn queue_accounts(stores: &Stores, queues: &Queues, accounts: impl IntoIterator<Item = String>) {
    for account in accounts {
        if matches!(stores.account(&account), Some(Ok(_))) {
            let _ = queues.accounts.send(ObjectRef::new(&account));
        } else {
            for integration in stores.on_account(&account) {
                let _ = queues.integrations.send(integration);
            }
        }
    }
}

/// Who reconciles a change that concerns one integration.
#[derive(Debug, PartialEq)]
pub(super) enum Route {
    /// Its account, which plans once and writes all its integrations.
    Account(ObjectRef<SalesLayerAccount>),
    /// The integration itself: its spec is invalid, or its account does not
    /// exist or is invalid.
    Integration,
}

/// Where a change that concerns `sli` is reconciled: by its account when
/// the integration's spec is valid and the account exists and is valid,
/// else by the integration's own reconcile.
pub(super) fn route(stores: &Stores, sli: &SalesLayerIntegration) -> Route {
    if saleslayer_core::plan::validate(sli).is_ok()
        && matches!(stores.account(&sli.spec.account), Some(Ok(_)))
    {
        Route::Account(ObjectRef::new(&sli.spec.account))
    } else {
        Route::Integration
    }
}

/// The accounts that integrations in `namespace` name.
fn accounts_used_in(stores: &Stores, namespace: &str) -> Vec<String> {
    stores
        .integrations
        .state()
        .iter()
        .filter(|sli| sli.metadata.namespace.as_deref() == Some(namespace))
        .map(|sli| sli.spec.account.clone())
        .collect()
}

/// What planning last read of each object, to tell a change that moves a
/// plan from one that does not (a status or annotation write of ours).
#[derive(Debug, Default)]
pub(super) struct Seen {
    /// Integration → (generation, account).
    integrations: HashMap<(String, String), (Option<i64>, String)>,
    /// Account → generation.
    accounts: HashMap<String, Option<i64>>,
    /// Namespace → labels.
    namespaces: HashMap<String, BTreeMap<String, String>>,
}

impl Seen {
    /// The accounts whose plans an integration event moves.
    pub fn integration(
        &mut self,
        event: &watcher::Event<SalesLayerIntegration>,
    ) -> BTreeSet<String> {
        let mut moved = BTreeSet::new();
        let key =
            |sli: &SalesLayerIntegration| (sli.namespace().unwrap_or_default(), sli.name_any());
        match event {
            watcher::Event::Apply(sli) | watcher::Event::InitApply(sli) => {
                let now = (sli.metadata.generation, sli.spec.account.clone());
                match self.integrations.insert(key(sli), now.clone()) {
                    Some(before) if before == now => {}
                    Some((_, old_account)) => {
                        moved.insert(old_account);
                        moved.insert(now.1);
                    }
                    None => {
                        moved.insert(now.1);
                    }
                }
            }
            watcher::Event::Delete(sli) => {
                if let Some((_, account)) = self.integrations.remove(&key(sli)) {
                    moved.insert(account);
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
        moved
    }

    /// The accounts whose plans an account event moves: its spec changed,
    /// or it came or went. Its status does not: the effective budget in it
    /// is written by the account's reconcile, which planned with it.
    pub fn account(&mut self, event: &watcher::Event<SalesLayerAccount>) -> BTreeSet<String> {
        let mut moved = BTreeSet::new();
        match event {
            watcher::Event::Apply(sla) | watcher::Event::InitApply(sla) => {
                let now = sla.metadata.generation;
                if self.accounts.insert(sla.name_any(), now) != Some(now) {
                    moved.insert(sla.name_any());
                }
            }
            watcher::Event::Delete(sla) => {
                self.accounts.remove(&sla.name_any());
                moved.insert(sla.name_any());
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
        moved
    }

    /// The namespaces whose labels an event changed.
    pub fn namespace(
        &mut self,
        event: &watcher::Event<PartialObjectMeta<Namespace>>,
    ) -> BTreeSet<String> {
        let mut relabelled = BTreeSet::new();
        match event {
            watcher::Event::Apply(ns) | watcher::Event::InitApply(ns) => {
                let labels = ns.metadata.labels.clone().unwrap_or_default();
                let name = ns.name_any();
                if self.namespaces.insert(name.clone(), labels.clone()) != Some(labels) {
                    relabelled.insert(name);
                }
            }
            watcher::Event::Delete(ns) => {
                self.namespaces.remove(&ns.name_any());
                relabelled.insert(ns.name_any());
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
        relabelled
    }
}

#[cfg(test)]
mod tests {
    use saleslayer_core::api::{SalesLayerAccountStatus, UsableStatus};
    use serde_json::json;

    use super::*;
    use crate::state::testing::{account, integration, namespace};

    #[test]
    fn a_status_write_moves_nothing_a_spec_change_moves_its_account() {
        let mut seen = Seen::default();
        let mut sli = integration(
            "shop",
            "catalog",
            json!({"account": "acme", "jobs": [{"name": "a"}]}),
        );
        assert_eq!(
            seen.integration(&watcher::Event::Apply(sli.clone())),
            ["acme".to_owned()].into()
        );
        sli.status = Some(Default::default());
        assert!(
            seen.integration(&watcher::Event::Apply(sli.clone()))
                .is_empty(),
            "status only"
        );
        sli.metadata.generation = Some(2);
        assert_eq!(
            seen.integration(&watcher::Event::Apply(sli.clone())),
            ["acme".to_owned()].into()
        );
        sli.spec.account = "other".into();
        sli.metadata.generation = Some(3);
        assert_eq!(
            seen.integration(&watcher::Event::Apply(sli.clone())),
            ["acme".to_owned(), "other".to_owned()].into(),
            "both the old and the new account re-plan"
        );
        assert_eq!(
            seen.integration(&watcher::Event::Delete(sli)),
            ["other".to_owned()].into()
        );
    }

    #[test]
    fn an_account_moves_plans_when_its_spec_changes_not_its_status() {
        let mut seen = Seen::default();
        let mut sla = account("acme", json!({}));
        assert_eq!(seen.account(&watcher::Event::Apply(sla.clone())).len(), 1);
        let status = |requests| SalesLayerAccountStatus {
            effective: Some(UsableStatus {
                requests,
                period_seconds: 10,
            }),
            pods: requests,
            ..SalesLayerAccountStatus::default()
        };
        sla.status = Some(status(40));
        assert!(
            seen.account(&watcher::Event::Apply(sla.clone())).is_empty(),
            "first effective: written by the reconcile that planned with it"
        );
        let mut same_budget = status(40);
        same_budget.pods = 99;
        sla.status = Some(same_budget);
        assert!(
            seen.account(&watcher::Event::Apply(sla.clone())).is_empty(),
            "counts only"
        );
        sla.status = Some(status(28));
        assert!(
            seen.account(&watcher::Event::Apply(sla.clone())).is_empty(),
            "lowered: the same"
        );
        sla.metadata.generation = Some(2);
        assert_eq!(
            seen.account(&watcher::Event::Apply(sla)).len(),
            1,
            "a new spec"
        );
    }

    #[test]
    fn only_relabelled_namespaces_move_plans() {
        let mut seen = Seen::default();
        let shop = namespace("shop", &[("team", "shop")]);
        assert_eq!(
            seen.namespace(&watcher::Event::Apply(shop.clone())).len(),
            1
        );
        assert!(seen.namespace(&watcher::Event::Apply(shop)).is_empty());
        let moved = namespace("shop", &[("team", "ops")]);
        assert_eq!(seen.namespace(&watcher::Event::Apply(moved)).len(), 1);
    }

    #[test]
    fn a_ca_map_deleted_or_changed_by_someone_else_is_restored() {
        let published: BTreeMap<String, String> = [("shop".to_owned(), "CA".to_owned())].into();
        let map = |namespace: &str, data: &str| ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(CA_CONFIGMAP.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            data: Some([(CA_CONFIGMAP_KEY.to_owned(), data.to_owned())].into()),
            ..Default::default()
        };
        assert!(
            ca_maps_to_restore(&published, &watcher::Event::Apply(map("shop", "CA"))).is_empty()
        );
        assert_eq!(
            ca_maps_to_restore(&published, &watcher::Event::Apply(map("shop", "tampered"))),
            ["shop"]
        );
        assert_eq!(
            ca_maps_to_restore(&published, &watcher::Event::Delete(map("shop", "CA"))),
            ["shop"]
        );
        assert!(
            ca_maps_to_restore(&published, &watcher::Event::Delete(map("ops", "CA"))).is_empty(),
            "not ours to restore"
        );
    }
}
