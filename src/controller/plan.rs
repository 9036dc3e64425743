//! The pure middle of a reconcile: validate integrations, plan an account's
//! allocation, and build the status and pod annotations that follow from it.
//!
//! Everything here takes values and returns values: no client, no clock (the
//! time is a parameter), no `async`. The controller feeds it snapshots of its
//! stores; the webhook feeds it the same snapshot with one more pod counted.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use crate::allocation::{self, AccountAllocation, JobKey, JobRequest, PodShare, UsableBudget};
use crate::api::{
    Alerting, JobSpec, JobStatus, PerPodStatus, RateLimit, RetryPolicy, SalesLayerIntegration,
    SalesLayerIntegrationStatus, StatusSummary, UsableStatus,
};

/// Condition types and reasons, in one place (STYLE.md §5).
pub mod conditions {
    pub const READY: &str = "Ready";
    pub const OVERCOMMITTED: &str = "Overcommitted";
    pub const ACCOUNT_SHARED: &str = "AccountShared";
    pub const PERSISTENT_THROTTLING: &str = "PersistentThrottling";

    pub const REASON_ALLOCATED: &str = "Allocated";
    pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
    pub const REASON_FLOORS_EXCEED_BUDGET: &str = "FloorsExceedBudget";
    pub const REASON_FLOORS_FIT: &str = "FloorsFit";
    pub const REASON_SHARED: &str = "SharedAccount";
    pub const REASON_LIMITS_DISAGREE: &str = "LimitsDisagree";
    pub const REASON_SOLE: &str = "SoleIntegration";
    pub const REASON_THROTTLED: &str = "ThrottledPersistently";
    pub const REASON_NOT_THROTTLED: &str = "NotThrottled";
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

/// An integration whose spec passed the checks the schema cannot make.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedIntegration {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub account: String,
    pub limit: RateLimit,
    pub headroom_percent: u32,
    pub lend_idle_capacity: bool,
    pub jobs: Vec<JobSpec>,
    pub retry: RetryPolicy,
    pub alerting: Alerting,
}

impl ValidatedIntegration {
    /// The usable budget this integration declares for its account.
    pub fn budget(&self) -> UsableBudget {
        UsableBudget::from_limit(
            self.limit.requests,
            self.limit.period_seconds,
            self.headroom_percent,
        )
    }

    /// The allocation key of one of its jobs.
    pub fn key(&self, job: &str) -> JobKey {
        JobKey {
            namespace: self.namespace.clone(),
            integration: self.name.clone(),
            job: job.to_owned(),
        }
    }
}

/// Re-check what the API server's schema should already have refused, so a
/// spec stored before the schema (or written around it) cannot mislead the plan.
pub fn validate(sli: &SalesLayerIntegration) -> Result<ValidatedIntegration, String> {
    let spec = &sli.spec;
    let namespace = sli.namespace().unwrap_or_default();
    if spec.account.is_empty() {
        return Err("spec.account is empty".into());
    }
    if spec.limit.requests == 0 || spec.limit.period_seconds == 0 {
        return Err("spec.limit needs requests and periodSeconds of at least 1".into());
    }
    if spec.headroom_percent > 90 {
        return Err(format!(
            "spec.headroomPercent is {} but may be at most 90",
            spec.headroom_percent
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for job in &spec.jobs {
        if !seen.insert(job.name.as_str()) {
            return Err(format!("job name {:?} appears twice", job.name));
        }
        if let (Some(min), Some(max)) = (job.min_requests, job.max_requests)
            && min > max
        {
            return Err(format!(
                "job {}: minRequests {min} exceeds maxRequests {max}",
                job.name
            ));
        }
    }
    Ok(ValidatedIntegration {
        namespace,
        name: sli.name_any(),
        generation: sli.metadata.generation,
        account: spec.account.clone(),
        limit: spec.limit.clone(),
        headroom_percent: spec.headroom_percent,
        lend_idle_capacity: spec.lend_idle_capacity,
        jobs: spec.jobs.clone(),
        retry: spec.retry.clone(),
        alerting: spec.alerting.clone(),
    })
}

/// Live pods per job, keyed like the allocation.
pub type PodCounts = HashMap<JobKey, u32>;

/// One account's plan: the budget that applies and every job's allocation.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountPlan {
    pub account: String,
    pub budget: UsableBudget,
    pub allocation: AccountAllocation,
    /// `namespace/name` of every valid integration on the account, sorted.
    pub members: Vec<String>,
    /// Set when members declare different limits: says which, and what applies.
    pub limits_disagree: Option<String>,
}

impl AccountPlan {
    /// The allocation of one job, if it is registered.
    pub fn job(&self, key: &JobKey) -> Option<&allocation::JobAllocation> {
        self.allocation
            .jobs
            .binary_search_by(|job| job.key.cmp(key))
            .ok()
            .map(|index| &self.allocation.jobs[index])
    }
}

/// Allocate one account's budget over the jobs of all its integrations.
/// `members` must all name the same account.
pub fn plan_account(members: &[ValidatedIntegration], pods: &PodCounts) -> AccountPlan {
    plan_account_with_demand(members, pods, &HashMap::new())
}

/// As [`plan_account`], with the demand pods reported; it caps jobs of
/// integrations that lend idle capacity (`lendIdleCapacity`), never below
/// their floor, so what they do not use goes to jobs that queue.
pub fn plan_account_with_demand(
    members: &[ValidatedIntegration],
    pods: &PodCounts,
    demand: &HashMap<JobKey, u32>,
) -> AccountPlan {
    let mut names: Vec<String> = members
        .iter()
        .map(|m| format!("{}/{}", m.namespace, m.name))
        .collect();
    names.sort();
    let account = members
        .first()
        .map(|m| m.account.clone())
        .unwrap_or_default();

    // The smallest declared rate applies: the safe reading of a disagreement.
    let mut budgets: Vec<(UsableBudget, String)> = members
        .iter()
        .map(|m| (m.budget(), format!("{}/{}", m.namespace, m.name)))
        .collect();
    budgets.sort_by(|(a, an), (b, bn)| {
        let left = u128::from(a.requests) * u128::from(b.period_millis);
        let right = u128::from(b.requests) * u128::from(a.period_millis);
        left.cmp(&right)
            .then(a.period_millis.cmp(&b.period_millis))
            .then(an.cmp(bn))
    });
    let budget = budgets.first().map(|(b, _)| *b).unwrap_or(UsableBudget {
        requests: 0,
        period_millis: 10_000,
    });
    let limits_disagree = budgets
        .iter()
        .any(|(b, _)| *b != budget)
        .then(|| {
            let declared: Vec<String> = budgets
                .iter()
                .map(|(b, name)| format!("{name} declares {}", show_budget(*b)))
                .collect();
            format!(
                "integrations on account {account} disagree on its limit ({}); the smallest, {}, applies to all",
                declared.join(", "),
                show_budget(budget)
            )
        });

    // Members come sorted by namespace and name; with each member's jobs
    // sorted by name the whole input is in key order, which the allocation
    // sorts in linear time (a shuffled 10 000-job account costs it 2.5x more).
    let jobs: Vec<JobRequest> = members
        .iter()
        .flat_map(|member| {
            let mut sorted: Vec<&JobSpec> = member.jobs.iter().collect();
            sorted.sort_unstable_by(|a, b| a.name.cmp(&b.name));
            sorted.into_iter().map(move |job| {
                let key = member.key(&job.name);
                JobRequest {
                    live_pods: pods.get(&key).copied().unwrap_or(0),
                    demand: if member.lend_idle_capacity {
                        demand.get(&key).copied()
                    } else {
                        None
                    },
                    key,
                    weight: job.weight,
                    min_requests: job.min_requests.unwrap_or(0),
                    max_requests: job.max_requests,
                    max_concurrency: job.max_concurrency,
                    lend_idle: member.lend_idle_capacity,
                }
            })
        })
        .collect();
    AccountPlan {
        account,
        budget,
        allocation: allocation::allocate(budget, &jobs),
        members: names,
        limits_disagree,
    }
}

/// `40/10s`, or `40/1500ms` when the period is not whole seconds.
pub fn show_budget(budget: UsableBudget) -> String {
    if budget.period_millis.is_multiple_of(1000) {
        format!("{}/{}s", budget.requests, budget.period_millis / 1000)
    } else {
        format!("{}/{}ms", budget.requests, budget.period_millis)
    }
}

/// The JSON kept in a pod's `saleslayer.io/limit` annotation and limit file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitAnnotation {
    pub requests: u32,
    pub period_millis: u64,
    pub max_concurrency: u32,
}

impl From<PodShare> for LimitAnnotation {
    fn from(share: PodShare) -> Self {
        Self {
            requests: share.requests,
            period_millis: share.period_millis,
            max_concurrency: share.max_concurrency,
        }
    }
}

impl LimitAnnotation {
    /// The annotation's value.
    pub fn to_json(self) -> String {
        // Serialising three integers cannot fail; fall back to an explicit form anyway.
        serde_json::to_string(&self).unwrap_or_else(|_| {
            format!(
                r#"{{"requests":{},"periodMillis":{},"maxConcurrency":{}}}"#,
                self.requests, self.period_millis, self.max_concurrency
            )
        })
    }
}

/// The status an integration should carry under `plan`. Conditions keep
/// their previous transition time when their status did not change.
pub fn desired_status(
    integration: &ValidatedIntegration,
    plan: &AccountPlan,
    previous: Option<&SalesLayerIntegrationStatus>,
    throttling: &BTreeMap<String, JobThrottling>,
    now: Time,
) -> SalesLayerIntegrationStatus {
    let mut jobs = Vec::with_capacity(integration.jobs.len());
    for job in &integration.jobs {
        let key = integration.key(&job.name);
        let Some(allocated) = plan.job(&key) else {
            continue;
        };
        let throttled = throttling.get(&job.name).copied().unwrap_or_default();
        jobs.push(JobStatus {
            name: job.name.clone(),
            allocated_requests: allocated.requests,
            pods: allocated.pods,
            per_pod: PerPodStatus {
                requests: allocated.per_pod.requests,
                period_millis: allocated.per_pod.period_millis,
            },
            throttled_windows: throttled.windows,
            last_throttled: throttled.last_throttled_millis.and_then(rfc3339),
        });
    }
    let pods: u32 = jobs.iter().map(|j| j.pods).sum();
    let allocated: u32 = jobs.iter().map(|j| j.allocated_requests).sum();
    let generation = integration.generation;
    let old = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);

    let ready = condition(
        old,
        conditions::READY,
        true,
        conditions::REASON_ALLOCATED,
        format!(
            "{allocated} of the account's {} requests go to this integration's {} jobs over {pods} pods",
            show_budget(plan.budget),
            jobs.len()
        ),
        generation,
        &now,
    );
    let overcommitted = match plan.allocation.overcommit {
        Some(over) => condition(
            old,
            conditions::OVERCOMMITTED,
            true,
            conditions::REASON_FLOORS_EXCEED_BUDGET,
            format!(
                "floors sum to {} but the account's usable budget is {}; every floor was scaled down proportionally",
                over.floors, over.usable
            ),
            generation,
            &now,
        ),
        None => condition(
            old,
            conditions::OVERCOMMITTED,
            false,
            conditions::REASON_FLOORS_FIT,
            "the floors of the account's jobs fit its usable budget".into(),
            generation,
            &now,
        ),
    };
    let threshold = integration.alerting.persistent_windows.max(1);
    let persistent: Vec<String> = jobs
        .iter()
        .filter(|j| j.throttled_windows >= threshold)
        .map(|j| j.name.clone())
        .collect();
    let throttling_condition = if persistent.is_empty() {
        condition(
            old,
            conditions::PERSISTENT_THROTTLING,
            false,
            conditions::REASON_NOT_THROTTLED,
            format!("no job was throttled in {threshold} consecutive windows"),
            generation,
            &now,
        )
    } else {
        let detail: Vec<String> = jobs
            .iter()
            .filter(|j| j.throttled_windows >= threshold)
            .map(|j| format!("{} ({} windows)", j.name, j.throttled_windows))
            .collect();
        condition(
            old,
            conditions::PERSISTENT_THROTTLING,
            true,
            conditions::REASON_THROTTLED,
            format!(
                "throttled in at least {threshold} consecutive windows: {}; lower their concurrency or raise their share",
                detail.join(", ")
            ),
            generation,
            &now,
        )
    };
    let me = format!("{}/{}", integration.namespace, integration.name);
    let others: Vec<&str> = plan
        .members
        .iter()
        .filter(|m| **m != me)
        .map(String::as_str)
        .collect();
    let shared = match (&plan.limits_disagree, others.is_empty()) {
        (Some(message), _) => condition(
            old,
            conditions::ACCOUNT_SHARED,
            true,
            conditions::REASON_LIMITS_DISAGREE,
            message.clone(),
            generation,
            &now,
        ),
        (None, false) => condition(
            old,
            conditions::ACCOUNT_SHARED,
            true,
            conditions::REASON_SHARED,
            format!(
                "account {} is shared with {}; all their jobs split one budget of {}",
                plan.account,
                others.join(", "),
                show_budget(plan.budget)
            ),
            generation,
            &now,
        ),
        (None, true) => condition(
            old,
            conditions::ACCOUNT_SHARED,
            false,
            conditions::REASON_SOLE,
            format!("no other integration uses account {}", plan.account),
            generation,
            &now,
        ),
    };

    SalesLayerIntegrationStatus {
        observed_generation: generation,
        usable: Some(UsableStatus {
            requests: plan.budget.requests,
            period_seconds: u32::try_from(plan.budget.period_millis / 1000).unwrap_or(u32::MAX),
        }),
        summary: Some(StatusSummary {
            usable: show_budget(plan.budget),
            jobs: u32::try_from(jobs.len()).unwrap_or(u32::MAX),
            pods,
            throttling: if persistent.is_empty() {
                "none".to_owned()
            } else {
                persistent.join(",")
            },
        }),
        jobs,
        conditions: merge_conditions(old, [ready, overcommitted, shared, throttling_condition]),
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

/// The pod's share, as its annotation should read.
pub fn pod_limit(plan: &AccountPlan, key: &JobKey) -> Option<LimitAnnotation> {
    plan.job(key).map(|job| LimitAnnotation::from(job.per_pod))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SalesLayerIntegrationSpec;

    fn sli(namespace: &str, name: &str, spec: serde_json::Value) -> SalesLayerIntegration {
        let spec: SalesLayerIntegrationSpec = serde_json::from_value(spec).expect("spec");
        let mut sli = SalesLayerIntegration::new(name, spec);
        sli.metadata.namespace = Some(namespace.into());
        sli.metadata.generation = Some(3);
        sli
    }

    fn valid(namespace: &str, name: &str, spec: serde_json::Value) -> ValidatedIntegration {
        validate(&sli(namespace, name, spec)).expect("valid")
    }

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("time"))
    }

    fn find<'a>(status: &'a SalesLayerIntegrationStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present")
    }

    #[test]
    fn validation_catches_what_the_schema_should_have() {
        let dup = sli(
            "shop",
            "x",
            serde_json::json!({"account": "a", "jobs": [{"name": "j"}, {"name": "j"}]}),
        );
        assert!(validate(&dup).unwrap_err().contains("appears twice"));
        let inverted = sli(
            "shop",
            "x",
            serde_json::json!({"account": "a", "jobs": [{"name": "j", "minRequests": 5, "maxRequests": 2}]}),
        );
        assert!(
            validate(&inverted)
                .unwrap_err()
                .contains("minRequests 5 exceeds maxRequests 2")
        );
        let headroom = sli(
            "shop",
            "x",
            serde_json::json!({"account": "a", "headroomPercent": 95, "jobs": [{"name": "j"}]}),
        );
        assert!(validate(&headroom).unwrap_err().contains("at most 90"));
        let zero = sli(
            "shop",
            "x",
            serde_json::json!({"account": "a", "limit": {"requests": 0, "periodSeconds": 10}, "jobs": []}),
        );
        assert!(validate(&zero).is_err());
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
        let plan = plan_account(std::slice::from_ref(&member), &pods);
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
        assert_eq!(
            pod_limit(&plan, &member.key("a")).map(LimitAnnotation::to_json),
            Some(r#"{"requests":12,"periodMillis":10000,"maxConcurrency":12}"#.to_owned())
        );
    }

    #[test]
    fn disagreeing_limits_take_the_smallest_and_say_so() {
        let a = valid(
            "shop",
            "a",
            serde_json::json!({"account": "acme", "jobs": [{"name": "j"}]}),
        );
        let b = valid(
            "ops",
            "b",
            serde_json::json!({"account": "acme", "limit": {"requests": 30, "periodSeconds": 10},
                "headroomPercent": 0, "jobs": [{"name": "k"}]}),
        );
        let plan = plan_account(&[a.clone(), b], &PodCounts::new());
        assert_eq!(show_budget(plan.budget), "30/10s");
        let message = plan.limits_disagree.clone().expect("disagreement noted");
        assert!(message.contains("shop/a declares 40/10s"), "{message}");
        assert!(
            message.contains("the smallest, 30/10s, applies"),
            "{message}"
        );
        let status = desired_status(&a, &plan, None, &BTreeMap::new(), at(1));
        let shared = find(&status, conditions::ACCOUNT_SHARED);
        assert_eq!(
            (shared.status.as_str(), shared.reason.as_str()),
            ("True", conditions::REASON_LIMITS_DISAGREE)
        );
        let total: u32 = plan.allocation.jobs.iter().map(|j| j.requests).sum();
        assert!(total <= 30);
    }

    #[test]
    fn overcommitted_floors_are_a_condition_with_numbers() {
        let member = valid(
            "shop",
            "x",
            serde_json::json!({"account": "acme", "jobs": [
                {"name": "a", "minRequests": 30}, {"name": "b", "minRequests": 22}]}),
        );
        let plan = plan_account(std::slice::from_ref(&member), &PodCounts::new());
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
        let plan = plan_account(std::slice::from_ref(&member), &PodCounts::new());
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
}
