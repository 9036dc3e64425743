//! The operator's shared view of the cluster and of what pods report: the
//! account, integration and namespace stores the watches fill, the pod index, and
//! one [`Reports`] handle for the demand and throttle books the quota API
//! fills. Below every part that reads it (controller, webhook, quota API),
//! above the pure core it plans with.
//!
//! Nothing here writes to the API server, and nothing here decides: it
//! gathers values and hands them to `saleslayer_core::plan`.

pub mod pod_index;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use saleslayer_contract::{LABEL_INTEGRATION, LABEL_JOB};
use saleslayer_core::account::{self, AccountProblem, InvalidAccount, ValidatedAccount};
use saleslayer_core::adaptation::{AccountThrottling, Adaptation};
use saleslayer_core::allocation::JobKey;
use saleslayer_core::api::{SalesLayerAccount, SalesLayerIntegration};
use saleslayer_core::demand::DemandBook;
use saleslayer_core::plan::{self, AccountPlan, PodCounts, ValidatedIntegration};
use saleslayer_core::throttle::ThrottleBook;

pub use pod_index::{PodIndex, WatchedPod};

/// Server-side filter for live pods: terminal phases never count.
pub const LIVE_POD_FIELDS: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// What pods report through the quota API: what each job wants, how often
/// it was throttled, and each account's throttled windows and adaptation.
/// Written by the quota API and the account reconcile (the leader's), read
/// by the controller and the planners.
#[derive(Clone, Default)]
pub struct Reports {
    pub demand: Arc<RwLock<DemandBook>>,
    pub throttling: Arc<Mutex<ThrottleBook>>,
    pub accounts: Arc<Mutex<AccountThrottling>>,
    /// Each account's effective budget as this leader steps it.
    pub adaptation: Arc<Mutex<HashMap<String, Adaptation>>>,
}

impl Reports {
    /// Forget everything: a new leadership term starts like a restart (and
    /// the adaptation starts again from each account's status).
    pub fn reset(&self) {
        if let Ok(mut demand) = self.demand.write() {
            *demand = DemandBook::default();
        }
        if let Ok(mut throttling) = self.throttling.lock() {
            *throttling = ThrottleBook::default();
        }
        if let Ok(mut accounts) = self.accounts.lock() {
            *accounts = AccountThrottling::default();
        }
        if let Ok(mut adaptation) = self.adaptation.lock() {
            adaptation.clear();
        }
    }
}

/// Which watches have delivered their first complete list. Until all have,
/// the stores miss objects: the webhook would deny valid pods and inject
/// shares counted over too few pods, so nothing answers from them.
#[derive(Debug, Default)]
pub struct Synced {
    pub accounts: AtomicBool,
    pub integrations: AtomicBool,
    pub namespaces: AtomicBool,
}

/// The operator's view of the cluster: accounts, integrations, namespaces'
/// labels and live pod metadata.
#[derive(Clone)]
pub struct Stores {
    pub accounts: Store<SalesLayerAccount>,
    pub integrations: Store<SalesLayerIntegration>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// The watched pods (what is read of each) and the live pods per job.
    pub index: Arc<RwLock<PodIndex>>,
    /// What pods reported through the quota API.
    pub reports: Reports,
    /// Which watches have listed (the pods' is the index's `listed`).
    pub synced: Arc<Synced>,
}

impl Stores {
    /// Whether every watch has delivered its first complete list.
    pub fn synced(&self) -> bool {
        let synced = &self.synced;
        synced.accounts.load(Ordering::Acquire)
            && synced.integrations.load(Ordering::Acquire)
            && synced.namespaces.load(Ordering::Acquire)
            && self.pods_listed()
    }

    /// The account `name`, validated; `None` when it does not exist.
    pub fn account(&self, name: &str) -> Option<Result<ValidatedAccount, InvalidAccount>> {
        self.accounts
            .get(&ObjectRef::new(name))
            .map(|sla| account::validate_account(&sla))
    }

    /// The labels of namespace `name` (none while it is not known).
    pub fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        self.namespaces
            .get(&ObjectRef::new(name))
            .and_then(|ns| ns.metadata.labels.clone())
            .unwrap_or_default()
    }

    /// The account of `integration`, if the integration may use it.
    pub fn account_of(
        &self,
        integration: &ValidatedIntegration,
    ) -> Result<ValidatedAccount, AccountProblem> {
        let found = self.account(&integration.account);
        let labels = self.namespace_labels(&integration.namespace);
        account::standing(
            &integration.account,
            found.as_ref().map(|a| a.as_ref()),
            &integration.namespace,
            &labels,
        )?;
        match found {
            Some(Ok(account)) => Ok(account),
            // standing() refused both already; kept total for the compiler.
            _ => Err(AccountProblem::NotFound {
                account: integration.account.clone(),
            }),
        }
    }

    /// Every valid integration that `account` allows, sorted, and the live
    /// pods of their jobs.
    pub fn account_members(
        &self,
        account: &ValidatedAccount,
    ) -> (Vec<ValidatedIntegration>, PodCounts) {
        let mut members: Vec<ValidatedIntegration> = self
            .integrations
            .state()
            .iter()
            .filter(|sli| sli.spec.account == account.name)
            .filter_map(|sli| plan::validate(sli).ok())
            .filter(|member| account.allows(&self.namespace_labels(&member.namespace)))
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

    /// The plan of `integration`'s account as of `now_ms`, optionally with
    /// one more live pod of `extra` (a pod being admitted), or why the
    /// account gives it nothing.
    pub fn plan_for(
        &self,
        integration: &ValidatedIntegration,
        extra: Option<&JobKey>,
        now_ms: u64,
    ) -> Result<AccountPlan, AccountProblem> {
        let account = self.account_of(integration)?;
        Ok(self.account_plan(&account, extra, now_ms))
    }

    /// `account`'s plan as of `now_ms`, optionally with one more live pod of
    /// `extra`.
    pub fn account_plan(
        &self,
        account: &ValidatedAccount,
        extra: Option<&JobKey>,
        now_ms: u64,
    ) -> AccountPlan {
        let (members, mut pods) = self.account_members(account);
        if let Some(key) = extra {
            *pods.entry(key.clone()).or_default() += 1;
        }
        let mut demand = HashMap::new();
        if members.iter().any(|m| m.lend_idle_capacity)
            && let Ok(book) = self.reports.demand.read()
        {
            let period = account.usable.period_millis;
            for member in members.iter().filter(|m| m.lend_idle_capacity) {
                for job in &member.jobs {
                    let key = member.key(&job.name);
                    if let Some(wanted) = book.demand(&key, now_ms, period) {
                        demand.insert(key, wanted);
                    }
                }
            }
        }
        plan::plan_account_with_demand(account, &members, &pods, &demand)
    }

    /// Refs of every integration on the same account as `namespace/name`.
    pub fn siblings_of(
        &self,
        namespace: &str,
        name: &str,
    ) -> Vec<ObjectRef<SalesLayerIntegration>> {
        let key = ObjectRef::new(name).within(namespace);
        match self.integrations.get(&key) {
            Some(sli) => self.on_account(&sli.spec.account),
            None => vec![key],
        }
    }

    /// The account of integration `namespace/name`, if it is known.
    pub fn account_name_of(&self, namespace: &str, name: &str) -> Option<String> {
        self.integrations
            .get(&ObjectRef::new(name).within(namespace))
            .map(|sli| sli.spec.account.clone())
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

/// The job a pod's labels name, whether it is live or going away.
pub fn pod_job_key(pod: &PartialObjectMeta<Pod>) -> Option<JobKey> {
    let labels = pod.metadata.labels.as_ref()?;
    Some(JobKey {
        namespace: pod.metadata.namespace.clone()?,
        integration: labels.get(LABEL_INTEGRATION)?.clone(),
        job: labels.get(LABEL_JOB)?.clone(),
    })
}

#[cfg(test)]
pub mod testing {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::runtime::{reflector, watcher};

    use super::*;

    /// An integration `namespace/name` with `spec` (JSON), generation 1.
    pub fn integration(
        namespace: &str,
        name: &str,
        spec: serde_json::Value,
    ) -> SalesLayerIntegration {
        let spec = serde_json::from_value(spec).expect("a valid spec");
        let mut sli = SalesLayerIntegration::new(name, spec);
        sli.metadata.namespace = Some(namespace.into());
        sli.metadata.generation = Some(1);
        sli
    }

    /// A live pod's metadata, labelled for `integration`/`job`, with UID `uid-<name>`.
    pub fn labelled_pod(
        namespace: &str,
        name: &str,
        integration: &str,
        job: &str,
    ) -> PartialObjectMeta<Pod> {
        PartialObjectMeta {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                uid: Some(format!("uid-{name}")),
                labels: Some(
                    [
                        (LABEL_INTEGRATION.to_owned(), integration.to_owned()),
                        (LABEL_JOB.to_owned(), job.to_owned()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        }
    }

    /// An account `name` with `spec` (JSON).
    pub fn account(name: &str, spec: serde_json::Value) -> SalesLayerAccount {
        let spec = serde_json::from_value(spec).expect("a valid account spec");
        let mut sla = SalesLayerAccount::new(name, spec);
        sla.metadata.generation = Some(1);
        sla
    }

    /// A namespace with `labels`.
    pub fn namespace(name: &str, labels: &[(&str, &str)]) -> PartialObjectMeta<Namespace> {
        PartialObjectMeta {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        }
    }

    /// Stores holding exactly `integrations` and `pods`, the pods listed,
    /// and the documented account `acme` (50/10 s, all namespaces).
    pub fn stores_with(
        integrations: Vec<SalesLayerIntegration>,
        pods: Vec<PartialObjectMeta<Pod>>,
    ) -> Stores {
        stores_with_accounts(
            vec![account("acme", serde_json::json!({}))],
            vec![],
            integrations,
            pods,
        )
    }

    /// Stores holding exactly these accounts, namespaces, integrations and pods.
    pub fn stores_with_accounts(
        accounts: Vec<SalesLayerAccount>,
        namespaces: Vec<PartialObjectMeta<Namespace>>,
        integrations: Vec<SalesLayerIntegration>,
        pods: Vec<PartialObjectMeta<Pod>>,
    ) -> Stores {
        let (sla_reader, mut sla_writer) = reflector::store();
        for sla in accounts {
            sla_writer.apply_watcher_event(&watcher::Event::Apply(sla));
        }
        let (ns_reader, mut ns_writer) = reflector::store();
        for ns in namespaces {
            ns_writer.apply_watcher_event(&watcher::Event::Apply(ns));
        }
        let (sli_reader, mut sli_writer) = reflector::store();
        for sli in integrations {
            sli_writer.apply_watcher_event(&watcher::Event::Apply(sli));
        }
        let mut index = PodIndex::default();
        let mut events = vec![watcher::Event::Init];
        events.extend(pods.into_iter().map(watcher::Event::InitApply));
        events.push(watcher::Event::InitDone);
        for event in &events {
            index.apply(event);
        }
        let synced = Synced::default();
        for flag in [&synced.accounts, &synced.integrations, &synced.namespaces] {
            flag.store(true, Ordering::Release);
        }
        Stores {
            accounts: sla_reader,
            integrations: sli_reader,
            namespaces: ns_reader,
            index: Arc::new(RwLock::new(index)),
            reports: Reports::default(),
            synced: Arc::new(synced),
        }
    }
}
