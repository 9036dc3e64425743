//! Live pods per job, kept up to date from the pod watch's events, so that
//! planning an account costs a lookup per job instead of a scan of every pod
//! (the webhook and the quota API plan on their hot paths).
//!
//! Fed only by [`PodIndex::apply`] with the watcher's events; read by the
//! controller, the webhook and the quota API through a lock held briefly.

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Pod;
use kube::api::PartialObjectMeta;
use kube::runtime::watcher;

use super::live_pod_key;
use saleslayer_core::allocation::JobKey;

/// Names of the live pods of each job.
#[derive(Debug, Default)]
pub struct PodIndex {
    /// (namespace, pod) → the job it counts for.
    pods: HashMap<(String, String), JobKey>,
    /// job → its live pods' names.
    jobs: HashMap<JobKey, BTreeSet<String>>,
    /// A relist in progress: the next state, swapped in when it is complete.
    relist: Option<Box<PodIndex>>,
    /// Whether a first complete list has been seen.
    listed: bool,
}

impl PodIndex {
    /// Fold one watcher event in; the jobs whose live pods it changed (an
    /// annotation written on a known pod changes none).
    pub fn apply(&mut self, event: &watcher::Event<PartialObjectMeta<Pod>>) -> Vec<JobKey> {
        match event {
            watcher::Event::Apply(pod) => self.upsert(pod),
            watcher::Event::Delete(pod) => self.remove(pod),
            watcher::Event::Init => {
                self.relist = Some(Box::default());
                Vec::new()
            }
            watcher::Event::InitApply(pod) => match self.relist.as_mut() {
                Some(next) => {
                    next.upsert(pod);
                    Vec::new()
                }
                None => self.upsert(pod),
            },
            watcher::Event::InitDone => {
                let mut changed = Vec::new();
                if let Some(next) = self.relist.take() {
                    let jobs: BTreeSet<&JobKey> =
                        self.jobs.keys().chain(next.jobs.keys()).collect();
                    changed = jobs
                        .into_iter()
                        .filter(|job| self.jobs.get(*job) != next.jobs.get(*job))
                        .cloned()
                        .collect();
                    let listed = self.listed;
                    *self = *next;
                    self.listed = listed;
                }
                self.listed = true;
                changed
            }
        }
    }

    /// Whether the watch has delivered its first complete list.
    pub fn listed(&self) -> bool {
        self.listed
    }

    /// Live pods of `job`.
    pub fn count(&self, job: &JobKey) -> u32 {
        self.jobs
            .get(job)
            .map_or(0, |pods| u32::try_from(pods.len()).unwrap_or(u32::MAX))
    }

    /// Names of the live pods of `job`.
    pub fn pods_of(&self, job: &JobKey) -> impl Iterator<Item = &String> {
        self.jobs.get(job).into_iter().flatten()
    }

    fn upsert(&mut self, pod: &PartialObjectMeta<Pod>) -> Vec<JobKey> {
        let id = identity(pod);
        let key = live_pod_key(pod);
        match (self.pods.get(&id), key) {
            (Some(old), Some(new)) if *old == new => Vec::new(),
            (_, Some(new)) => {
                let mut changed: Vec<JobKey> = self.remove_id(&id).into_iter().collect();
                self.jobs
                    .entry(new.clone())
                    .or_default()
                    .insert(id.1.clone());
                self.pods.insert(id, new.clone());
                changed.push(new);
                changed
            }
            (_, None) => self.remove_id(&id).into_iter().collect(),
        }
    }

    fn remove(&mut self, pod: &PartialObjectMeta<Pod>) -> Vec<JobKey> {
        self.remove_id(&identity(pod)).into_iter().collect()
    }

    /// Forget a pod; the job it counted for, if any.
    fn remove_id(&mut self, id: &(String, String)) -> Option<JobKey> {
        let old = self.pods.remove(id)?;
        if let Some(names) = self.jobs.get_mut(&old) {
            names.remove(&id.1);
            if names.is_empty() {
                self.jobs.remove(&old);
            }
        }
        Some(old)
    }
}

fn identity(pod: &PartialObjectMeta<Pod>) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(name: &str, job: &str) -> PartialObjectMeta<Pod> {
        PartialObjectMeta {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: Some(
                    [
                        ("saleslayer.io/integration".to_owned(), "catalog".to_owned()),
                        ("saleslayer.io/job".to_owned(), job.to_owned()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        }
    }

    fn key(job: &str) -> JobKey {
        JobKey {
            namespace: "shop".into(),
            integration: "catalog".into(),
            job: job.into(),
        }
    }

    #[test]
    fn counts_follow_applies_deletes_and_relabels() {
        let mut index = PodIndex::default();
        index.apply(&watcher::Event::Apply(pod("a", "import")));
        index.apply(&watcher::Event::Apply(pod("b", "import")));
        assert!(
            index
                .apply(&watcher::Event::Apply(pod("b", "import")))
                .is_empty(),
            "a known pod changed nothing"
        );
        assert_eq!(index.count(&key("import")), 2);
        assert_eq!(
            index.apply(&watcher::Event::Apply(pod("b", "prices"))),
            vec![key("import"), key("prices")]
        );
        assert_eq!(
            (index.count(&key("import")), index.count(&key("prices"))),
            (1, 1)
        );
        index.apply(&watcher::Event::Delete(pod("a", "import")));
        assert_eq!(index.count(&key("import")), 0);
        let mut leaving = pod("b", "prices");
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        index.apply(&watcher::Event::Apply(leaving));
        assert_eq!(index.count(&key("prices")), 0);
    }

    #[test]
    fn a_relist_replaces_the_state_when_complete() {
        let mut index = PodIndex::default();
        index.apply(&watcher::Event::Apply(pod("gone", "import")));
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(pod("kept", "import")));
        assert_eq!(index.count(&key("import")), 1, "old state until InitDone");
        assert!(!index.listed());
        assert_eq!(index.apply(&watcher::Event::InitDone), vec![key("import")]);
        assert!(index.listed());
        assert_eq!(index.pods_of(&key("import")).collect::<Vec<_>>(), ["kept"]);
    }
}
