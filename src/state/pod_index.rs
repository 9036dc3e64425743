//! Live pods per job, and the little the operator reads of each watched pod,
//! kept up to date from the pod watch's events, so that planning an account
//! costs a lookup per job instead of a scan of every pod (the webhook and the
//! quota API plan on their hot paths).
//!
//! This is the operator's only copy of the pods: at 10 000 pods a reflector
//! store of their metadata cost about 30 MiB, this about a tenth of it.
//!
//! Fed only by [`PodIndex::apply`] with the watcher's events; read by the
//! controller, the webhook and the quota API through a lock held briefly.

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Pod;
use kube::api::PartialObjectMeta;
use kube::runtime::watcher;
use saleslayer_contract::ANNOTATION_LIMIT;

use super::pod_job_key;
use saleslayer_core::allocation::JobKey;

/// What the operator reads of one watched pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedPod {
    /// Its UID: a token bound to another pod of the same name speaks for nobody.
    pub uid: Option<String>,
    /// The job its labels name, going away or not (a terminating pod may
    /// still report its last usage); `None` without both labels.
    pub job: Option<JobKey>,
    /// Whether it counts as live (not being deleted).
    pub live: bool,
    /// Its `saleslayer.io/limit` annotation, as written.
    pub limit: Option<String>,
}

impl WatchedPod {
    fn of(pod: &PartialObjectMeta<Pod>) -> Self {
        let meta = &pod.metadata;
        Self {
            uid: meta.uid.clone(),
            live: meta.deletion_timestamp.is_none(),
            job: pod_job_key(pod),
            limit: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_LIMIT))
                .cloned(),
        }
    }

    /// The job it counts for while live.
    fn counts_for(&self) -> Option<&JobKey> {
        self.job.as_ref().filter(|_| self.live)
    }
}

/// The watched pods, and the names of the live pods of each job.
#[derive(Debug, Default)]
pub struct PodIndex {
    /// (namespace, pod) → what the operator reads of it.
    pods: HashMap<(String, String), WatchedPod>,
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

    /// What the watch last said of pod `namespace/name`, live or going away.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&WatchedPod> {
        self.pods.get(&(namespace.to_owned(), name.to_owned()))
    }

    fn upsert(&mut self, pod: &PartialObjectMeta<Pod>) -> Vec<JobKey> {
        let id = identity(pod);
        let watched = WatchedPod::of(pod);
        let before = self.pods.get(&id).and_then(WatchedPod::counts_for).cloned();
        let after = watched.counts_for().cloned();
        if before == after {
            self.pods.insert(id, watched);
            return Vec::new();
        }
        let mut changed: Vec<JobKey> = self.remove_id(&id).into_iter().collect();
        if let Some(new) = after {
            self.jobs
                .entry(new.clone())
                .or_default()
                .insert(id.1.clone());
            changed.push(new);
        }
        self.pods.insert(id, watched);
        changed
    }

    fn remove(&mut self, pod: &PartialObjectMeta<Pod>) -> Vec<JobKey> {
        self.remove_id(&identity(pod)).into_iter().collect()
    }

    /// Forget a pod; the job it counted for, if any.
    fn remove_id(&mut self, id: &(String, String)) -> Option<JobKey> {
        let old = self.pods.remove(id)?;
        let job = old.counts_for()?.clone();
        if let Some(names) = self.jobs.get_mut(&job) {
            names.remove(&id.1);
            if names.is_empty() {
                self.jobs.remove(&job);
            }
        }
        Some(job)
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
    use saleslayer_contract::LABEL_JOB;

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
        let going = index
            .pod("shop", "b")
            .expect("a terminating pod is still known");
        assert_eq!(
            (going.live, going.job.as_ref()),
            (false, Some(&key("prices")))
        );
        index.apply(&watcher::Event::Delete(pod("b", "prices")));
        assert!(index.pod("shop", "b").is_none());
    }

    #[test]
    fn keeps_the_uid_and_the_limit_annotation_of_each_pod() {
        let mut index = PodIndex::default();
        let mut annotated = pod("a", "import");
        annotated.metadata.uid = Some("uid-a".into());
        annotated.metadata.annotations = Some(
            [
                (ANNOTATION_LIMIT.to_owned(), "{\"requests\":4}".to_owned()),
                (
                    "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
                    "{}".to_owned(),
                ),
            ]
            .into(),
        );
        assert_eq!(
            index.apply(&watcher::Event::Apply(annotated)),
            vec![key("import")]
        );
        let seen = index.pod("shop", "a").expect("known");
        assert_eq!(seen.uid.as_deref(), Some("uid-a"));
        assert_eq!(seen.limit.as_deref(), Some("{\"requests\":4}"));
        // A new annotation on a known pod is kept, and moves no job.
        let mut rewritten = pod("a", "import");
        rewritten.metadata.annotations =
            Some([(ANNOTATION_LIMIT.to_owned(), "{\"requests\":5}".to_owned())].into());
        assert!(index.apply(&watcher::Event::Apply(rewritten)).is_empty());
        assert_eq!(
            index.pod("shop", "a").and_then(|p| p.limit.as_deref()),
            Some("{\"requests\":5}")
        );
        // Without its job label a pod is known but counts for nothing.
        let mut unlabelled = pod("c", "import");
        if let Some(labels) = unlabelled.metadata.labels.as_mut() {
            labels.remove(LABEL_JOB);
        }
        assert!(index.apply(&watcher::Event::Apply(unlabelled)).is_empty());
        assert_eq!(index.pod("shop", "c").map(|p| p.job.is_none()), Some(true));
        assert_eq!(index.count(&key("import")), 1);
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
