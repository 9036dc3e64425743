//! The pure middle of a reconcile: validate integrations and plan an
//! account's allocation, from which `status` builds the status and the pod
//! annotations follow ([`pod_limit`]).
//!
//! Everything here takes values and returns values: no client, no clock (the
//! time is a parameter), no `async`. The controller feeds it snapshots of its
//! stores; the webhook feeds it the same snapshot with one more pod counted.

use std::collections::HashMap;

use kube::ResourceExt;
use saleslayer_contract::Limit;

use crate::account::ValidatedAccount;
use crate::allocation::{self, AccountAllocation, JobKey, JobRequest, PodShare, UsableBudget};
use crate::api::{Alerting, JobSpec, RetryPolicy, SalesLayerIntegration};

/// What the schema should have refused but a stored spec still holds: the
/// integration is not planned and its status says why (`Ready=False`,
/// reason `InvalidSpec`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpec {
    #[error("spec.account is empty")]
    EmptyAccount,
    #[error("job name {0:?} appears twice")]
    DuplicateJob(String),
    #[error("job {job}: minRequests {min} exceeds maxRequests {max}")]
    FloorAboveCap { job: String, min: u32, max: u32 },
}

impl InvalidSpec {
    /// The condition reason of every invalid spec.
    pub fn reason(&self) -> &'static str {
        crate::status::conditions::REASON_INVALID_SPEC
    }
}

/// An integration whose spec passed the checks the schema cannot make.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedIntegration {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub account: String,
    pub lend_idle_capacity: bool,
    pub jobs: Vec<JobSpec>,
    pub retry: RetryPolicy,
    pub alerting: Alerting,
}

impl ValidatedIntegration {
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
pub fn validate(sli: &SalesLayerIntegration) -> Result<ValidatedIntegration, InvalidSpec> {
    let spec = &sli.spec;
    let namespace = sli.namespace().unwrap_or_default();
    if spec.account.is_empty() {
        return Err(InvalidSpec::EmptyAccount);
    }
    let mut seen = std::collections::BTreeSet::new();
    for job in &spec.jobs {
        if !seen.insert(job.name.as_str()) {
            return Err(InvalidSpec::DuplicateJob(job.name.clone()));
        }
        if let (Some(min), Some(max)) = (job.min_requests, job.max_requests)
            && min > max
        {
            return Err(InvalidSpec::FloorAboveCap {
                job: job.name.clone(),
                min,
                max,
            });
        }
    }
    Ok(ValidatedIntegration {
        namespace,
        name: sli.name_any(),
        generation: sli.metadata.generation,
        account: spec.account.clone(),
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
    /// What was split: the account's effective budget.
    pub budget: UsableBudget,
    /// The account's usable budget (the limit after headroom).
    pub usable: UsableBudget,
    pub allocation: AccountAllocation,
    /// `namespace/name` of every integration planned on the account, sorted.
    pub members: Vec<String>,
    /// Namespaces among them.
    pub namespaces: usize,
    /// The status codes that count as throttling on the account.
    pub throttle_statuses: Vec<u16>,
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

/// Allocate one account's effective budget over the jobs of the integrations
/// allowed on it. `members` must all name `account`; the caller leaves out
/// those whose namespace the account does not allow.
pub fn plan_account(
    account: &ValidatedAccount,
    members: &[ValidatedIntegration],
    pods: &PodCounts,
) -> AccountPlan {
    plan_account_with_demand(account, members, pods, &HashMap::new())
}

/// As [`plan_account`], with the demand pods reported; it caps jobs of
/// integrations that lend idle capacity (`lendIdleCapacity`), never below
/// their floor, so what they do not use goes to jobs that queue.
pub fn plan_account_with_demand(
    account: &ValidatedAccount,
    members: &[ValidatedIntegration],
    pods: &PodCounts,
    demand: &HashMap<JobKey, u32>,
) -> AccountPlan {
    let mut names: Vec<String> = members
        .iter()
        .map(|m| format!("{}/{}", m.namespace, m.name))
        .collect();
    names.sort();
    let namespaces = members
        .iter()
        .map(|m| m.namespace.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let budget = account.effective;
    // Concurrency follows the budget: a job's maxConcurrency shrinks by the
    // same factor as the effective budget (never below one).
    let scale = |cap: u32| -> u32 {
        if budget.requests >= account.usable.requests {
            return cap;
        }
        let scaled = (u64::from(cap) * u64::from(budget.requests))
            .div_ceil(u64::from(account.usable.requests.max(1)));
        u32::try_from(scaled).unwrap_or(cap).max(1)
    };

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
                    max_concurrency: job.max_concurrency.map(scale),
                    lend_idle: member.lend_idle_capacity,
                }
            })
        })
        .collect();
    AccountPlan {
        account: account.name.clone(),
        budget,
        usable: account.usable,
        allocation: allocation::allocate(budget, &jobs),
        members: names,
        namespaces,
        throttle_statuses: account.throttle_statuses.clone(),
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

impl From<PodShare> for Limit {
    fn from(share: PodShare) -> Self {
        Self {
            requests: share.requests,
            period_millis: share.period_millis,
            max_concurrency: share.max_concurrency,
        }
    }
}

/// The pod's share, as its annotation should read.
pub fn pod_limit(plan: &AccountPlan, key: &JobKey) -> Option<Limit> {
    plan.job(key).map(|job| Limit::from(job.per_pod))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::account::validate_account;
    use crate::fixtures::{account, acme, sli, valid};

    #[test]
    fn validation_catches_what_the_schema_should_have() {
        let dup = sli(
            "shop",
            "x",
            json!({"account": "a", "jobs": [{"name": "j"}, {"name": "j"}]}),
        );
        assert_eq!(validate(&dup), Err(InvalidSpec::DuplicateJob("j".into())));
        let inverted = sli(
            "shop",
            "x",
            json!({"account": "a", "jobs": [{"name": "j", "minRequests": 5, "maxRequests": 2}]}),
        );
        assert_eq!(
            validate(&inverted).map_err(|e| e.to_string()),
            Err("job j: minRequests 5 exceeds maxRequests 2".to_owned())
        );
        let nameless = sli("shop", "x", json!({"account": "", "jobs": []}));
        assert_eq!(validate(&nameless), Err(InvalidSpec::EmptyAccount));
    }

    #[test]
    fn the_pod_limit_is_the_per_pod_share() {
        let member = valid(
            "shop",
            "catalog",
            json!({"account": "acme", "jobs": [
                {"name": "a", "weight": 3}, {"name": "b"}, {"name": "c"}]}),
        );
        let pods: PodCounts = [(member.key("a"), 2), (member.key("b"), 1)].into();
        let plan = plan_account(&acme(), std::slice::from_ref(&member), &pods);
        assert_eq!(
            pod_limit(&plan, &member.key("a")).map(Limit::to_json),
            Some(r#"{"requests":12,"periodMillis":10000,"maxConcurrency":12}"#.to_owned())
        );
        assert_eq!(pod_limit(&plan, &member.key("unknown")), None);
    }

    #[test]
    fn the_effective_budget_is_split_and_concurrency_follows_it() {
        let mut sla = account("acme", json!({}));
        sla.status = Some(crate::api::SalesLayerAccountStatus {
            effective: Some(crate::api::UsableStatus {
                requests: 20,
                period_seconds: 10,
            }),
            ..Default::default()
        });
        let lowered = validate_account(&sla).expect("valid");
        let member = valid(
            "shop",
            "catalog",
            json!({"account": "acme", "jobs": [{"name": "a", "maxConcurrency": 8}]}),
        );
        let pods: PodCounts = [(member.key("a"), 1)].into();
        let plan = plan_account(&lowered, std::slice::from_ref(&member), &pods);
        assert_eq!(
            (show_budget(plan.budget), show_budget(plan.usable)),
            ("20/10s".into(), "40/10s".into())
        );
        let job = plan.job(&member.key("a")).expect("allocated");
        assert_eq!(job.requests, 20);
        assert_eq!(job.per_pod.max_concurrency, 4, "8 × 20/40");
        let full = plan_account(&acme(), std::slice::from_ref(&member), &pods);
        assert_eq!(
            full.job(&member.key("a"))
                .map(|j| j.per_pod.max_concurrency),
            Some(8)
        );
    }
}
