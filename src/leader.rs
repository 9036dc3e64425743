//! Leader election on a `coordination.k8s.io` Lease (DESIGN.md §8): decides
//! which replica may write. Only the leader reconciles (status, pod
//! annotations, CA ConfigMaps, Events) and answers the quota API; every
//! replica keeps its stores warm and serves the webhook.
//!
//! ```text
//!  Lease ──get──▶ step() (pure: renew / acquire / wait) ──replace(resourceVersion)──▶ Lease
//!                    │
//!                    ▼ Role (watch channel) ──▶ controller, quota API, own pod's label, metric
//! ```
//!
//! Why not a crate: kube-lease-manager 0.13 fits kube 5, but its leader keeps
//! reporting `true` while renewals fail past the lease's expiry, and it takes
//! over an expired lease with an unconditional patch, so two candidates can
//! both believe they won. Here every write is a `replace` guarded by the
//! resourceVersion just read (a lost race is a 409, never a second holder),
//! and a leader that has not renewed stops writing [`FENCE_MARGIN`] before
//! any other replica may consider the lease expired. kube-runtime 5 has no
//! leader election of its own.
//!
//! Time: expiry is judged by when this process *saw* the record change
//! (its own monotonic clock, as client-go does), never by comparing the
//! Lease's `renewTime` with the local wall clock, so clock skew between nodes
//! cannot make two leaders. This module never writes anything but the Lease
//! and the `saleslayer.io/leader` label of its own pod (and removes that
//! label from pods of former leaders).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::FIELD_MANAGER;

/// The label the leader puts on its own pod; the quota Service selects it.
pub const LABEL_LEADER: &str = "saleslayer.io/leader";
/// How long a Lease holds without renewal (a killed leader is replaced after this).
pub const LEASE_DURATION: Duration = Duration::from_secs(10);
/// How often the leader renews.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// How often a follower looks at the Lease.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long before the lease could expire for others a leader that could not
/// renew stops writing: room for a write already in flight.
pub const FENCE_MARGIN: Duration = Duration::from_secs(2);
/// The longest one call to the API server may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// What this replica is, as the rest of the operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Computes, serves the webhook, writes nothing.
    Follower,
    /// Writes. `term` counts this process's leaderships; `since_millis` is
    /// the wall-clock time it became leader (a new term starts like a restart).
    Leader { term: u64, since_millis: u64 },
}

impl Role {
    pub fn is_leader(&self) -> bool {
        matches!(self, Role::Leader { .. })
    }
}

/// A read-only view of this replica's [`Role`], cheap to clone.
#[derive(Clone)]
pub struct Leadership(watch::Receiver<Role>);

impl Leadership {
    /// Always the leader (no election): tests, benchmarks, `--leader-elect=false`.
    pub fn always() -> Self {
        let (_, rx) = watch::channel(Role::Leader {
            term: 1,
            since_millis: saleslayer_runtime::clock::wall_millis(),
        });
        Self(rx)
    }

    /// Follow the roles sent on `rx` (the election's channel).
    pub fn from_receiver(rx: watch::Receiver<Role>) -> Self {
        Self(rx)
    }

    /// The role now.
    pub fn role(&self) -> Role {
        *self.0.borrow()
    }

    pub fn is_leader(&self) -> bool {
        self.role().is_leader()
    }

    /// A receiver that sees every change of role.
    pub fn changes(&self) -> watch::Receiver<Role> {
        self.0.clone()
    }
}

/// What a replica should do with the Lease record it just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It names us: write a new renewTime.
    Renew,
    /// Nobody holds it, or the holder let it expire: try to take it.
    Acquire,
    /// Someone else holds it and, by our clock, it has not expired.
    Wait,
}

/// The step for replica `me` at `now_ms`, given the record's holder and
/// duration and when this replica last saw the record change.
pub fn step(
    me: &str,
    holder: Option<&str>,
    duration_ms: u64,
    changed_seen_ms: u64,
    now_ms: u64,
) -> Step {
    match holder.filter(|h| !h.is_empty()) {
        Some(holder) if holder == me => Step::Renew,
        None => Step::Acquire,
        Some(_) if now_ms >= changed_seen_ms.saturating_add(duration_ms) => Step::Acquire,
        Some(_) => Step::Wait,
    }
}

/// When a leader whose last successful write was sent at `sent_ms` must stop
/// writing. Others count expiry from when they saw that write, which is never
/// earlier than when it was sent, so the leader stops first.
pub fn fence_at(sent_ms: u64, duration_ms: u64) -> u64 {
    sent_ms.saturating_add(duration_ms.saturating_sub(millis(FENCE_MARGIN)))
}

/// When this replica last saw the Lease record change (by resourceVersion).
#[derive(Debug, Default, Clone)]
pub struct LeaseSighting {
    version: Option<String>,
    changed_ms: u64,
}

impl LeaseSighting {
    /// Record that the Lease at `version` was seen at `now_ms`; returns when it
    /// was first seen at that version.
    pub fn observe(&mut self, version: &str, now_ms: u64) -> u64 {
        if self.version.as_deref() != Some(version) {
            self.version = Some(version.to_owned());
            self.changed_ms = now_ms;
        }
        self.changed_ms
    }
}

/// Which Lease, who we are, and which pod to label.
#[derive(Debug, Clone)]
pub struct Election {
    pub lease: String,
    pub namespace: String,
    pub identity: String,
    /// The replica's own pod as (namespace, name), labelled while it leads.
    pub pod: Option<(String, String)>,
}

impl Election {
    /// The Lease `lease` in `namespace`, this replica's identity from the
    /// environment, and its pod when `POD_NAME` and `POD_NAMESPACE` are set.
    pub fn from_env(lease: &str, namespace: &str) -> Self {
        let pod = match (std::env::var("POD_NAMESPACE"), std::env::var("POD_NAME")) {
            (Ok(ns), Ok(name)) if !ns.is_empty() && !name.is_empty() => Some((ns, name)),
            _ => None,
        };
        Self {
            lease: lease.to_owned(),
            namespace: namespace.to_owned(),
            identity: identity(),
            pod,
        }
    }
}

/// `POD_NAME`, else `<hostname>-<pid>`.
pub fn identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "saleslayer-operator".into());
    format!("{host}-{}", std::process::id())
}

/// Start leading: by election on the Lease when `elect`, else alone. The
/// returned task ends after `shutdown` once the Lease is released and the
/// pod's label removed; await it before exiting.
pub fn start(
    client: Client,
    election: Election,
    elect: bool,
    gauge: Gauge,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Leadership, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Role::Follower);
    let labeller = election.pod.clone().map(|(namespace, name)| {
        tokio::spawn(label_own_pod(
            Api::namespaced(client.clone(), &namespace),
            name,
            rx.clone(),
        ))
    });
    let task = tokio::spawn(async move {
        if elect {
            info!(lease = %election.lease, namespace = %election.namespace, identity = %election.identity, "leader election on");
            campaign(client, election, &tx, &gauge, shutdown).await;
        } else {
            lead(&tx, &gauge, 1);
            shutdown.await;
            follow(&tx, &gauge);
        }
        // Closing the channel tells the labeller to remove the label and stop.
        drop(tx);
        if let Some(labeller) = labeller {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT * 2, labeller).await;
        }
    });
    (Leadership(rx), task)
}

/// Register `saleslayer_leader` (1 on the leader) and return it.
pub fn register(registry: &mut Registry) -> Gauge {
    let gauge = Gauge::default();
    registry.register(
        "leader",
        "1 while this replica is the leader",
        gauge.clone(),
    );
    gauge
}

fn lead(tx: &watch::Sender<Role>, gauge: &Gauge, term: u64) {
    let _ = tx.send(Role::Leader {
        term,
        since_millis: saleslayer_runtime::clock::wall_millis(),
    });
    gauge.set(1);
}

fn follow(tx: &watch::Sender<Role>, gauge: &Gauge) {
    let _ = tx.send(Role::Follower);
    gauge.set(0);
}

/// Renew or acquire every [`RENEW_EVERY`] / [`RETRY_EVERY`] until `shutdown`,
/// then release the Lease if held.
async fn campaign(
    client: Client,
    election: Election,
    tx: &watch::Sender<Role>,
    gauge: &Gauge,
    shutdown: impl Future<Output = ()>,
) {
    let leases = Api::<Lease>::namespaced(client, &election.namespace);
    let started = Instant::now();
    let now_ms = || millis(started.elapsed());
    let at = |ms: u64| tokio::time::Instant::from_std(started + Duration::from_millis(ms));
    let mut sighting = LeaseSighting::default();
    // While leading: when to stop writing unless a renewal succeeds first.
    let mut fence: Option<u64> = None;
    let mut term = 0;
    let mut holder_seen: Option<String> = None;
    futures::pin_mut!(shutdown);
    loop {
        let sent = now_ms();
        let attempt = tokio::time::timeout(
            REQUEST_TIMEOUT,
            try_hold(&leases, &election, &mut sighting, sent, fence.is_some()),
        );
        let far = now_ms().saturating_add(millis(LEASE_DURATION));
        let outcome = tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = tokio::time::sleep_until(at(fence.unwrap_or(far))), if fence.is_some() => None,
            result = attempt => Some(result),
        };
        match outcome {
            Some(Ok(Ok(Held::Yes))) => {
                if fence.is_none() {
                    term += 1;
                    lead(tx, gauge, term);
                    info!(identity = %election.identity, lease = %election.lease, term, "became the leader");
                }
                fence = Some(fence_at(sent, millis(LEASE_DURATION)));
            }
            Some(Ok(Ok(Held::By(holder)))) => {
                if fence.take().is_some() {
                    follow(tx, gauge);
                    let leader = holder.as_deref().unwrap_or("nobody");
                    warn!(%leader, "another replica holds the Lease; stopped leading");
                }
                if holder != holder_seen {
                    let leader = holder.as_deref().unwrap_or("nobody");
                    info!(%leader, "following the leader");
                    holder_seen = holder;
                }
            }
            // A leader keeps leading until its fence; a follower looks again.
            Some(Ok(Ok(Held::Raced))) => {
                debug!(lease = %election.lease, "the Lease changed while we wrote it")
            }
            Some(Ok(Err(error))) => {
                warn!(%error, lease = %election.lease, "reading or writing the Lease failed")
            }
            Some(Err(_)) => warn!(lease = %election.lease, "the API server did not answer in time"),
            None => {}
        }
        if fence.is_some_and(|f| now_ms() >= f) {
            fence = None;
            follow(tx, gauge);
            warn!(lease = %election.lease, "could not renew the Lease in time; stopped leading");
        }
        let wait = if fence.is_some() {
            RENEW_EVERY
        } else {
            RETRY_EVERY
        };
        let wake = match fence {
            Some(f) => sent.saturating_add(millis(wait)).min(f),
            None => sent.saturating_add(millis(wait)),
        };
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = tokio::time::sleep_until(at(wake)) => {}
        }
    }
    if fence.is_some() {
        // Stop writing first, then hand over: a released Lease is taken at once.
        follow(tx, gauge);
        match tokio::time::timeout(REQUEST_TIMEOUT, release(&leases, &election)).await {
            Ok(Ok(())) => info!(lease = %election.lease, "released the Lease"),
            Ok(Err(error)) => {
                warn!(%error, "releasing the Lease failed; another replica takes over when it expires")
            }
            Err(_) => {
                warn!("releasing the Lease timed out; another replica takes over when it expires")
            }
        }
    }
}

/// The outcome of one look at the Lease.
enum Held {
    /// We hold it now.
    Yes,
    /// Someone else does.
    By(Option<String>),
    /// Someone wrote the Lease between our read and our write: look again.
    Raced,
}

/// Read the Lease and renew or take it if [`step`] says so.
async fn try_hold(
    leases: &Api<Lease>,
    election: &Election,
    sighting: &mut LeaseSighting,
    now_ms: u64,
    leading: bool,
) -> Result<Held, kube::Error> {
    let me = election.identity.as_str();
    let duration_seconds = i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(i32::MAX);
    let now = MicroTime(Timestamp::now());
    let Some(mut lease) = leases.get_opt(&election.lease).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(election.lease.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_owned()),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match leases.create(&post_params(), &lease).await {
            Ok(created) => {
                seen(sighting, &created, now_ms);
                Ok(Held::Yes)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Held::Raced),
            Err(error) => Err(error),
        };
    };
    let changed = seen(sighting, &lease, now_ms);
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let duration_ms = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(millis(LEASE_DURATION), |s| s.saturating_mul(1000));
    match step(me, holder.as_deref(), duration_ms, changed, now_ms) {
        Step::Wait => return Ok(Held::By(holder)),
        Step::Renew if leading => {}
        // Free, expired, or ours from before a restart: a new term.
        Step::Renew | Step::Acquire => {
            if holder.as_deref() != Some(me) {
                spec.lease_transitions =
                    Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
                debug!(previous = ?holder, "taking the Lease");
            }
            spec.holder_identity = Some(me.to_owned());
            spec.acquire_time = Some(now.clone());
        }
    }
    spec.lease_duration_seconds = Some(duration_seconds);
    spec.renew_time = Some(now);
    // The resourceVersion just read guards the write: if anyone wrote in
    // between, this is a 409 and we hold nothing.
    match leases
        .replace(&election.lease, &post_params(), &lease)
        .await
    {
        Ok(written) => {
            seen(sighting, &written, now_ms);
            Ok(Held::Yes)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Held::Raced),
        Err(error) => Err(error),
    }
}

/// Give the Lease up (only if we still hold it) so a follower takes it at once.
async fn release(leases: &Api<Lease>, election: &Election) -> Result<(), kube::Error> {
    let Some(mut lease) = leases.get_opt(&election.lease).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(election.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    leases
        .replace(&election.lease, &post_params(), &lease)
        .await
        .map(|_| ())
}

fn seen(sighting: &mut LeaseSighting, lease: &Lease, now_ms: u64) -> u64 {
    let version = lease.metadata.resource_version.as_deref().unwrap_or("");
    sighting.observe(version, now_ms)
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    }
}

/// Keep [`LABEL_LEADER`] on the own pod exactly while leading; when the role
/// channel closes (shutdown), remove it and stop.
async fn label_own_pod(pods: Api<Pod>, name: String, mut role: watch::Receiver<Role>) {
    loop {
        let leading = role.borrow_and_update().is_leader();
        let mut closed = false;
        loop {
            match set_leader_label(&pods, &name, leading).await {
                Ok(()) => break,
                Err(error) => {
                    warn!(%error, pod = %name, leading, "could not update the pod's leader label; retrying")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(RENEW_EVERY) => {}
                changed = role.changed() => {
                    closed = changed.is_err();
                    break;
                }
            }
        }
        if closed || role.changed().await.is_err() {
            if let Err(error) = set_leader_label(&pods, &name, false).await {
                warn!(%error, pod = %name, "could not remove the pod's leader label");
            }
            return;
        }
    }
}

/// Label (or unlabel) pod `name`; a new leader also unlabels former leaders'
/// pods, which a killed process could not do itself.
async fn set_leader_label(pods: &Api<Pod>, name: &str, leading: bool) -> Result<(), kube::Error> {
    let value = leading.then_some("true");
    patch_label(pods, name, value).await?;
    if leading {
        let stale = pods
            .list_metadata(&ListParams::default().labels(&format!("{LABEL_LEADER}=true")))
            .await?;
        for pod in stale.items {
            if let Some(other) = pod.metadata.name.filter(|n| n != name) {
                patch_label(pods, &other, None).await?;
                info!(pod = %other, "removed the leader label of a former leader");
            }
        }
    }
    Ok(())
}

async fn patch_label(pods: &Api<Pod>, name: &str, value: Option<&str>) -> Result<(), kube::Error> {
    let patch = json!({"metadata": {"labels": {LABEL_LEADER: value}}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    match pods.patch(name, &params, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        // The pod is gone (or never existed out of cluster): nothing to label.
        Err(kube::Error::Api(status)) if status.code == 404 => {
            debug!(pod = %name, "no such pod to label");
            Ok(())
        }
        Err(error) => Err(error),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: u64 = 10_000;

    #[test]
    fn a_replica_renews_a_lease_that_names_it() {
        assert_eq!(step("a", Some("a"), D, 0, 0), Step::Renew);
        // Even long after: the record names us, so nobody else took it.
        assert_eq!(step("a", Some("a"), D, 0, 5 * D), Step::Renew);
    }

    #[test]
    fn a_free_lease_is_taken_at_once() {
        assert_eq!(step("b", None, D, 100, 100), Step::Acquire);
        // A released lease has an empty holder.
        assert_eq!(step("b", Some(""), D, 100, 100), Step::Acquire);
    }

    #[test]
    fn another_holder_is_waited_for_until_its_lease_expires_by_our_clock() {
        let seen = 1_000;
        assert_eq!(step("b", Some("a"), D, seen, seen), Step::Wait);
        assert_eq!(step("b", Some("a"), D, seen, seen + D - 1), Step::Wait);
        assert_eq!(step("b", Some("a"), D, seen, seen + D), Step::Acquire);
        // The holder's own duration counts, not ours.
        assert_eq!(step("b", Some("a"), 30_000, seen, seen + D), Step::Wait);
    }

    #[test]
    fn expiry_counts_from_the_last_change_seen_not_the_first_sighting() {
        let mut sighting = LeaseSighting::default();
        assert_eq!(sighting.observe("1", 0), 0);
        // The leader renews: a new resourceVersion restarts the clock.
        assert_eq!(sighting.observe("2", 2_000), 2_000);
        // Unchanged since: still counted from 2 000.
        assert_eq!(sighting.observe("2", 9_000), 2_000);
        let changed = sighting.observe("2", 11_999);
        assert_eq!(step("b", Some("a"), D, changed, 11_999), Step::Wait);
        assert_eq!(step("b", Some("a"), D, changed, 12_000), Step::Acquire);
    }

    #[test]
    fn a_leader_that_cannot_renew_stops_before_anyone_may_take_over() {
        // The leader's last successful write was sent at `sent`; others saw it
        // no earlier than that, so they may take over at `sent + D` at the earliest.
        for sent in [0, 1, 7_777, u64::MAX / 2] {
            let stop = fence_at(sent, D);
            let earliest_takeover = sent + D;
            assert!(stop < earliest_takeover);
            assert_eq!(earliest_takeover - stop, millis(FENCE_MARGIN));
            // And it keeps leading for several renewal attempts before that.
            assert!(stop - sent >= 3 * millis(RENEW_EVERY));
        }
    }

    #[test]
    fn a_killed_leader_is_replaced_within_fifteen_seconds() {
        // Worst case: the follower saw the last renewal one poll late and
        // notices expiry one poll late.
        let worst = millis(RETRY_EVERY) + millis(LEASE_DURATION) + millis(RETRY_EVERY);
        assert!(worst < 15_000, "{worst} ms");
    }

    #[test]
    fn leadership_without_election_is_a_single_leading_term() {
        let leadership = Leadership::always();
        assert!(leadership.is_leader());
        assert!(matches!(leadership.role(), Role::Leader { term: 1, .. }));
    }
}
