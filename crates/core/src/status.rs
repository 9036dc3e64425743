//! The status an integration should carry, built from its validated spec,
//! its account's plan and what the quota API counted, one function per part:
//! the job rows, then each condition, then the printer-column summary.
//!
//! Pure: the time is a parameter, and a condition keeps its previous
//! transition time while its status holds, so a status that did not change
//! compares equal and is not written again.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::account::AccountProblem;
use crate::api::{
    JobStatus, PerPodStatus, SalesLayerIntegration, SalesLayerIntegrationStatus, StatusSummary,
    UsableStatus,
};
use crate::plan::{AccountPlan, ValidatedIntegration, show_budget};

/// Condition types and reasons, in one place (STYLE.md §5).
pub mod conditions {
    pub const READY: &str = "Ready";
    pub const OVERCOMMITTED: &str = "Overcommitted";
    pub const ACCOUNT_SHARED: &str = "AccountShared";
    pub const PERSISTENT_THROTTLING: &str = "PersistentThrottling";
    pub const CONCURRENCY_EXCEEDED: &str = "ConcurrencyExceeded";

    pub const REASON_ALLOCATED: &str = "Allocated";
    pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
    pub const REASON_FLOORS_EXCEED_BUDGET: &str = "FloorsExceedBudget";
    pub const REASON_FLOORS_FIT: &str = "FloorsFit";
    pub const REASON_SHARED: &str = "SharedAccount";
    pub const REASON_SOLE: &str = "SoleIntegration";
    pub const REASON_THROTTLED: &str = "ThrottledPersistently";
    pub const REASON_NOT_THROTTLED: &str = "NotThrottled";
    pub const REASON_MORE_PODS_THAN_CONCURRENCY: &str = "MorePodsThanConcurrency";
    pub const REASON_WITHIN_CONCURRENCY: &str = "WithinConcurrency";
}

/// One job's throttling as the quota API counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobThrottling {
    /// Consecutive throttled windows up to now.
    pub windows: u32,
    /// When a throttled response was last reported (ms since the epoch).
    pub last_throttled_millis: Option<u64>,
    /// Throttled responses in the current run of windows.
    pub throttled_requests: u64,
}

/// What every condition of one status shares: the previous conditions (for
/// transition times), the spec's generation and the time now.
struct Stamp<'a> {
    old: &'a [Condition],
    generation: Option<i64>,
    now: &'a Time,
}

impl Stamp<'_> {
    fn condition(&self, type_: &str, status: bool, reason: &str, message: String) -> Condition {
        condition(
            self.old,
            type_,
            status,
            reason,
            message,
            self.generation,
            self.now,
        )
    }
}

/// The status an integration should carry under `plan`.
pub fn desired_status(
    integration: &ValidatedIntegration,
    plan: &AccountPlan,
    previous: Option<&SalesLayerIntegrationStatus>,
    throttling: &BTreeMap<String, JobThrottling>,
    now: Time,
) -> SalesLayerIntegrationStatus {
    let jobs = job_statuses(integration, plan, throttling);
    let stamp = Stamp {
        old: previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]),
        generation: integration.generation,
        now: &now,
    };
    let threshold = integration.alerting.persistent_windows.max(1);
    let persistent = persistently_throttled(&jobs, threshold);
    let conditions = [
        ready(&stamp, plan, &jobs),
        overcommitted(&stamp, plan),
        account_shared(&stamp, integration, plan),
        persistent_throttling(&stamp, &jobs, threshold),
        concurrency_exceeded(&stamp, integration, &jobs),
    ];
    SalesLayerIntegrationStatus {
        observed_generation: integration.generation,
        usable: Some(UsableStatus {
            requests: plan.budget.requests,
            period_seconds: u32::try_from(plan.budget.period_millis / 1000).unwrap_or(u32::MAX),
        }),
        summary: Some(summary(plan, &jobs, &persistent)),
        jobs,
        conditions: merge_conditions(stamp.old, conditions),
    }
}

/// One row per registered job: its allocation, pods, per-pod share and throttling.
pub fn job_statuses(
    integration: &ValidatedIntegration,
    plan: &AccountPlan,
    throttling: &BTreeMap<String, JobThrottling>,
) -> Vec<JobStatus> {
    integration
        .jobs
        .iter()
        .filter_map(|job| {
            let allocated = plan.job(&integration.key(&job.name))?;
            let throttled = throttling.get(&job.name).copied().unwrap_or_default();
            Some(JobStatus {
                name: job.name.clone(),
                allocated_requests: allocated.requests,
                pods: allocated.pods,
                per_pod: PerPodStatus {
                    requests: allocated.per_pod.requests,
                    period_millis: allocated.per_pod.period_millis,
                    max_concurrency: allocated.per_pod.max_concurrency,
                },
                throttled_windows: throttled.windows,
                last_throttled: throttled.last_throttled_millis.and_then(rfc3339),
            })
        })
        .collect()
}

/// Names of the jobs throttled in at least `threshold` consecutive windows.
fn persistently_throttled(jobs: &[JobStatus], threshold: u32) -> Vec<&str> {
    jobs.iter()
        .filter(|j| j.throttled_windows >= threshold)
        .map(|j| j.name.as_str())
        .collect()
}

/// `Ready=True`: what the integration got of the account.
fn ready(stamp: &Stamp, plan: &AccountPlan, jobs: &[JobStatus]) -> Condition {
    let pods: u32 = jobs.iter().map(|j| j.pods).sum();
    let allocated: u32 = jobs.iter().map(|j| j.allocated_requests).sum();
    stamp.condition(
        conditions::READY,
        true,
        conditions::REASON_ALLOCATED,
        format!(
            "{allocated} of the account's {} requests go to this integration's {} jobs over {pods} pods",
            show_budget(plan.budget),
            jobs.len()
        ),
    )
}

/// `Overcommitted`: whether the floors of the account's jobs exceed its budget.
fn overcommitted(stamp: &Stamp, plan: &AccountPlan) -> Condition {
    match plan.allocation.overcommit {
        Some(over) => stamp.condition(
            conditions::OVERCOMMITTED,
            true,
            conditions::REASON_FLOORS_EXCEED_BUDGET,
            format!(
                "floors sum to {} but the account's effective budget is {}; every floor was scaled down proportionally",
                over.floors, over.usable
            ),
        ),
        None => stamp.condition(
            conditions::OVERCOMMITTED,
            false,
            conditions::REASON_FLOORS_FIT,
            "the floors of the account's jobs fit its effective budget".into(),
        ),
    }
}

/// `AccountShared`: whether other integrations split the account's budget.
/// It says how many, never which: other teams' integrations are theirs.
fn account_shared(
    stamp: &Stamp,
    integration: &ValidatedIntegration,
    plan: &AccountPlan,
) -> Condition {
    let me = format!("{}/{}", integration.namespace, integration.name);
    let others = plan.members.iter().filter(|m| **m != me).count();
    if others == 0 {
        stamp.condition(
            conditions::ACCOUNT_SHARED,
            false,
            conditions::REASON_SOLE,
            format!("no other integration uses account {}", plan.account),
        )
    } else {
        stamp.condition(
            conditions::ACCOUNT_SHARED,
            true,
            conditions::REASON_SHARED,
            format!(
                "account {} is shared by {} integrations in {} namespaces; all their jobs split its effective budget of {}",
                plan.account,
                others + 1,
                plan.namespaces,
                show_budget(plan.budget)
            ),
        )
    }
}

/// `PersistentThrottling`: which jobs were throttled in `threshold` windows in a row.
fn persistent_throttling(stamp: &Stamp, jobs: &[JobStatus], threshold: u32) -> Condition {
    let detail: Vec<String> = jobs
        .iter()
        .filter(|j| j.throttled_windows >= threshold)
        .map(|j| format!("{} ({} windows)", j.name, j.throttled_windows))
        .collect();
    if detail.is_empty() {
        stamp.condition(
            conditions::PERSISTENT_THROTTLING,
            false,
            conditions::REASON_NOT_THROTTLED,
            format!("no job was throttled in {threshold} consecutive windows"),
        )
    } else {
        stamp.condition(
            conditions::PERSISTENT_THROTTLING,
            true,
            conditions::REASON_THROTTLED,
            format!(
                "throttled in at least {threshold} consecutive windows: {}; lower their concurrency or raise their share",
                detail.join(", ")
            ),
        )
    }
}

/// `ConcurrencyExceeded`: jobs whose pods may have more requests in flight,
/// all together, than the job's `maxConcurrency`. Every pod gets at least
/// one request in flight, so a job with more pods than its maxConcurrency
/// exceeds it; this says so instead of staying silent.
fn concurrency_exceeded(
    stamp: &Stamp,
    integration: &ValidatedIntegration,
    jobs: &[JobStatus],
) -> Condition {
    let over: Vec<String> = jobs
        .iter()
        .filter_map(|job| {
            let cap = integration
                .jobs
                .iter()
                .find(|spec| spec.name == job.name)?
                .max_concurrency?;
            let in_flight = u64::from(job.pods) * u64::from(job.per_pod.max_concurrency);
            (in_flight > u64::from(cap)).then(|| {
                format!(
                    "{} runs {} pods for a maxConcurrency of {cap}, so up to {in_flight} requests may be in flight",
                    job.name, job.pods
                )
            })
        })
        .collect();
    if over.is_empty() {
        stamp.condition(
            conditions::CONCURRENCY_EXCEEDED,
            false,
            conditions::REASON_WITHIN_CONCURRENCY,
            "every job's pods together stay within its maxConcurrency".into(),
        )
    } else {
        stamp.condition(
            conditions::CONCURRENCY_EXCEEDED,
            true,
            conditions::REASON_MORE_PODS_THAN_CONCURRENCY,
            format!(
                "{}: every pod may have at least one request in flight; run fewer pods or raise maxConcurrency",
                over.join("; ")
            ),
        )
    }
}

/// The values `kubectl get sli` shows.
fn summary(plan: &AccountPlan, jobs: &[JobStatus], persistent: &[&str]) -> StatusSummary {
    StatusSummary {
        usable: show_budget(plan.budget),
        jobs: u32::try_from(jobs.len()).unwrap_or(u32::MAX),
        pods: jobs.iter().map(|j| j.pods).sum(),
        throttling: if persistent.is_empty() {
            "none".to_owned()
        } else {
            persistent.join(",")
        },
    }
}

/// `2026-11-27T20:00:00Z` for milliseconds since the epoch.
pub fn rfc3339(millis: u64) -> Option<String> {
    let millis = i64::try_from(millis).ok()?;
    k8s_openapi::jiff::Timestamp::from_millisecond(millis)
        .ok()
        .map(|t| t.to_string())
}

/// The status of an integration that could not be planned or applied:
/// `Ready=False` with `reason`; what was allocated before stays visible.
pub fn not_ready_status(
    sli: &SalesLayerIntegration,
    reason: &str,
    message: String,
    now: Time,
) -> SalesLayerIntegrationStatus {
    let previous = sli.status.clone().unwrap_or_default();
    let ready = condition(
        &previous.conditions,
        conditions::READY,
        false,
        reason,
        message,
        sli.metadata.generation,
        &now,
    );
    SalesLayerIntegrationStatus {
        observed_generation: sli.metadata.generation,
        conditions: merge_conditions(&previous.conditions, [ready]),
        ..previous
    }
}

/// The status of an integration its account gives nothing (missing, not
/// allowing its namespace, invalid): `Ready=False` naming why, and no jobs.
pub fn unplanned_status(
    integration: &ValidatedIntegration,
    problem: &AccountProblem,
    previous: Option<&SalesLayerIntegrationStatus>,
    now: Time,
) -> SalesLayerIntegrationStatus {
    let old = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let ready = condition(
        old,
        conditions::READY,
        false,
        problem.reason(),
        problem.to_string(),
        integration.generation,
        &now,
    );
    let mut conditions = merge_conditions(old, [ready]);
    // Conditions about an allocation that no longer exists would mislead.
    conditions.retain(|c| c.type_ == conditions::READY);
    SalesLayerIntegrationStatus {
        observed_generation: integration.generation,
        usable: None,
        jobs: Vec::new(),
        conditions,
        summary: Some(StatusSummary {
            usable: "none".into(),
            jobs: u32::try_from(integration.jobs.len()).unwrap_or(u32::MAX),
            pods: 0,
            throttling: "none".into(),
        }),
    }
}

/// A condition that keeps `old`'s transition time while its status holds.
pub fn condition(
    old: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Replace the conditions of the given types, keep the others, sorted by type.
pub fn merge_conditions<const N: usize>(old: &[Condition], new: [Condition; N]) -> Vec<Condition> {
    let mut by_type: BTreeMap<String, Condition> =
        old.iter().map(|c| (c.type_.clone(), c.clone())).collect();
    for c in new {
        by_type.insert(c.type_.clone(), c);
    }
    by_type.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{acme, at, sli, valid};
    use crate::plan::{PodCounts, plan_account};

    fn find<'a>(status: &'a SalesLayerIntegrationStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present")
    }

    #[test]
    fn three_jobs_split_the_documented_budget() {
        let member = valid(
            "shop",
            "catalog",
            serde_json::json!({"account": "acme", "jobs": [
                {"name": "a", "weight": 3}, {"name": "b"}, {"name": "c"}]}),
        );
        let pods: PodCounts = [(member.key("a"), 2), (member.key("b"), 1)].into();
        let plan = plan_account(&acme(), std::slice::from_ref(&member), &pods);
        assert_eq!(show_budget(plan.budget), "40/10s");
        let status = desired_status(&member, &plan, None, &BTreeMap::new(), at(100));
        let got: Vec<(&str, u32, u32, u32)> = status
            .jobs
            .iter()
            .map(|j| {
                (
                    j.name.as_str(),
                    j.allocated_requests,
                    j.pods,
                    j.per_pod.requests,
                )
            })
            .collect();
        assert_eq!(got, [("a", 24, 2, 12), ("b", 8, 1, 8), ("c", 8, 0, 8)]);
        let summary = status.summary.as_ref().expect("summary");
        assert_eq!(
            (summary.usable.as_str(), summary.jobs, summary.pods),
            ("40/10s", 3, 3)
        );
        assert_eq!(find(&status, conditions::READY).status, "True");
        assert_eq!(find(&status, conditions::OVERCOMMITTED).status, "False");
        assert_eq!(
            find(&status, conditions::ACCOUNT_SHARED).reason,
            conditions::REASON_SOLE
        );
        assert_eq!(status.observed_generation, Some(3));
    }

    #[test]
    fn overcommitted_floors_are_a_condition_with_numbers() {
        let member = valid(
            "shop",
            "x",
            serde_json::json!({"account": "acme", "jobs": [
                {"name": "a", "minRequests": 30}, {"name": "b", "minRequests": 22}]}),
        );
        let plan = plan_account(&acme(), std::slice::from_ref(&member), &PodCounts::new());
        let status = desired_status(&member, &plan, None, &BTreeMap::new(), at(1));
        let over = find(&status, conditions::OVERCOMMITTED);
        assert_eq!(over.status, "True");
        assert!(
            over.message.contains("floors sum to 52") && over.message.contains("is 40"),
            "{}",
            over.message
        );
    }

    #[test]
    fn transition_time_holds_while_the_status_holds() {
        let member = valid(
            "shop",
            "x",
            serde_json::json!({"account": "acme", "jobs": [{"name": "a"}]}),
        );
        let plan = plan_account(&acme(), std::slice::from_ref(&member), &PodCounts::new());
        let first = desired_status(&member, &plan, None, &BTreeMap::new(), at(10));
        let second = desired_status(&member, &plan, Some(&first), &BTreeMap::new(), at(20));
        assert_eq!(
            find(&second, conditions::READY).last_transition_time,
            at(10)
        );
        assert_eq!(first.jobs, second.jobs);

        let invalid = sli("shop", "x", serde_json::json!({"account": "", "jobs": []}));
        let mut with_status = invalid.clone();
        with_status.status = Some(second);
        let broken = not_ready_status(
            &with_status,
            conditions::REASON_INVALID_SPEC,
            "spec.account is empty".into(),
            at(30),
        );
        let ready = find(&broken, conditions::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", conditions::REASON_INVALID_SPEC)
        );
        assert_eq!(ready.last_transition_time, at(30));
        // What was allocated before stays visible.
        assert_eq!(broken.jobs.len(), 1);
    }

    fn stamp_at(seconds: i64) -> (Vec<Condition>, Time) {
        (Vec::new(), at(seconds))
    }

    #[test]
    fn persistent_throttling_names_the_jobs_at_the_threshold() {
        let (old, now) = stamp_at(5);
        let stamp = Stamp {
            old: &old,
            generation: Some(2),
            now: &now,
        };
        let member = valid(
            "shop",
            "x",
            serde_json::json!({"account": "acme", "jobs": [{"name": "a"}, {"name": "b"}]}),
        );
        let plan = plan_account(&acme(), std::slice::from_ref(&member), &PodCounts::new());
        let throttling: BTreeMap<String, JobThrottling> = [
            (
                "a".to_owned(),
                JobThrottling {
                    windows: 6,
                    last_throttled_millis: Some(4_000),
                    throttled_requests: 9,
                },
            ),
            (
                "b".to_owned(),
                JobThrottling {
                    windows: 5,
                    ..JobThrottling::default()
                },
            ),
        ]
        .into();
        let jobs = job_statuses(&member, &plan, &throttling);
        assert_eq!(
            jobs[0].last_throttled.as_deref(),
            Some("1970-01-01T00:00:04Z")
        );
        let on = persistent_throttling(&stamp, &jobs, 6);
        assert_eq!(
            (on.status.as_str(), on.reason.as_str()),
            ("True", conditions::REASON_THROTTLED)
        );
        assert!(
            on.message.contains("a (6 windows)") && !on.message.contains("b ("),
            "{}",
            on.message
        );
        assert_eq!(on.observed_generation, Some(2));
        let off = persistent_throttling(&stamp, &jobs, 7);
        assert_eq!(off.status, "False");
        assert_eq!(
            summary(&plan, &jobs, &persistently_throttled(&jobs, 6)).throttling,
            "a"
        );
        assert_eq!(
            summary(&plan, &jobs, &persistently_throttled(&jobs, 7)).throttling,
            "none"
        );
    }

    #[test]
    fn a_sole_integration_is_not_shared_and_a_second_one_makes_it_shared() {
        let (old, now) = stamp_at(1);
        let stamp = Stamp {
            old: &old,
            generation: None,
            now: &now,
        };
        let a = valid(
            "shop",
            "a",
            serde_json::json!({"account": "acme", "jobs": [{"name": "j"}]}),
        );
        let b = valid(
            "ops",
            "b",
            serde_json::json!({"account": "acme", "jobs": [{"name": "k"}]}),
        );
        let alone = plan_account(&acme(), std::slice::from_ref(&a), &PodCounts::new());
        let sole = account_shared(&stamp, &a, &alone);
        assert_eq!(
            (sole.status.as_str(), sole.reason.as_str()),
            ("False", conditions::REASON_SOLE)
        );
        let together = plan_account(&acme(), &[a.clone(), b], &PodCounts::new());
        let shared = account_shared(&stamp, &a, &together);
        assert_eq!(
            (shared.status.as_str(), shared.reason.as_str()),
            ("True", conditions::REASON_SHARED)
        );
        assert!(
            shared
                .message
                .contains("shared by 2 integrations in 2 namespaces")
                && !shared.message.contains("ops/b"),
            "counts, never names: {}",
            shared.message
        );
    }

    #[test]
    fn more_pods_than_the_jobs_concurrency_is_said_in_a_condition() {
        let member = valid(
            "shop",
            "x",
            serde_json::json!({"account": "acme", "jobs": [{"name": "a", "maxConcurrency": 4}, {"name": "b"}]}),
        );
        let within: PodCounts = [(member.key("a"), 4), (member.key("b"), 9)].into();
        let plan = plan_account(&acme(), std::slice::from_ref(&member), &within);
        let status = desired_status(&member, &plan, None, &BTreeMap::new(), at(1));
        assert_eq!(
            find(&status, conditions::CONCURRENCY_EXCEEDED).status,
            "False"
        );
        assert_eq!(status.jobs[0].per_pod.max_concurrency, 1);
        let beyond: PodCounts = [(member.key("a"), 6)].into();
        let plan = plan_account(&acme(), std::slice::from_ref(&member), &beyond);
        let status = desired_status(&member, &plan, None, &BTreeMap::new(), at(1));
        let exceeded = find(&status, conditions::CONCURRENCY_EXCEEDED);
        assert_eq!(
            (exceeded.status.as_str(), exceeded.reason.as_str()),
            ("True", conditions::REASON_MORE_PODS_THAN_CONCURRENCY)
        );
        assert!(
            exceeded
                .message
                .contains("a runs 6 pods for a maxConcurrency of 4")
                && exceeded.message.contains("up to 6 requests"),
            "{}",
            exceeded.message
        );
    }
}
