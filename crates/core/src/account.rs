//! A `SalesLayerAccount` as the planners use it: validated, its usable and
//! effective budgets worked out, and the answer to "may an integration in
//! this namespace use it?" (DESIGN.md §3a). Also the account's own status.
//!
//! Pure: namespaces' labels and the adaptation state come in as values.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use crate::adaptation::floor_of;
use crate::allocation::UsableBudget;
use crate::api::{
    AccountSummary, AdaptivePolicy, NamespacesFrom, RateLimit, SalesLayerAccount,
    SalesLayerAccountStatus, UsableStatus,
};
use crate::plan::show_budget;
use crate::status::{condition, merge_conditions};

/// Condition types and reasons of an account.
pub mod conditions {
    pub const READY: &str = "Ready";
    pub const ADAPTING: &str = "Adapting";

    pub const REASON_BUDGETED: &str = "Budgeted";
    pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
    pub const REASON_THROTTLED: &str = "ThrottledDespitePacing";
    pub const REASON_RECOVERING: &str = "ProbingBackUp";
    pub const REASON_FULL: &str = "FullBudget";
    pub const REASON_DISABLED: &str = "AdaptationDisabled";
}

/// What the schema should have refused but a stored account still holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAccount {
    #[error("spec.limit needs requests and periodSeconds of at least 1")]
    ZeroLimit,
    #[error("spec.headroomPercent is {0} but may be at most 90")]
    Headroom(u32),
    #[error("spec.headroomPercent {0} leaves no usable request of the limit")]
    NothingUsable(u32),
    #[error("spec.allowedNamespaces.selector is required when from is Selector")]
    MissingSelector,
    #[error("spec.allowedNamespaces.selector is not a valid label selector: {0}")]
    BadSelector(String),
}

/// Which namespaces may use an account.
#[derive(Debug, Clone, PartialEq)]
pub enum Allowed {
    All,
    Matching(Selector),
}

/// An account whose spec passed the checks the schema cannot make.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedAccount {
    pub name: String,
    pub generation: Option<i64>,
    pub limit: RateLimit,
    /// The limit after headroom.
    pub usable: UsableBudget,
    /// What the allocation splits now: the status's effective budget, kept
    /// within [the adaptive floor, usable]; usable when adaptation is off.
    pub effective: UsableBudget,
    pub allowed: Allowed,
    pub adaptive: AdaptivePolicy,
    /// Status codes that count as throttling, sorted.
    pub throttle_statuses: Vec<u16>,
}

impl ValidatedAccount {
    /// Whether an integration in a namespace with `labels` may use the account.
    pub fn allows(&self, labels: &BTreeMap<String, String>) -> bool {
        match &self.allowed {
            Allowed::All => true,
            Allowed::Matching(selector) => selector.matches(labels),
        }
    }

    /// The account's window (period) containing `now_millis`.
    pub fn window_of(&self, now_millis: u64) -> u64 {
        now_millis / self.usable.period_millis.max(1)
    }

    /// The selector as a person reads it, for messages.
    pub fn allowed_text(&self) -> String {
        match &self.allowed {
            Allowed::All => "all namespaces".into(),
            Allowed::Matching(selector) => format!("namespaces matching {selector}"),
        }
    }

    /// `429` or `429,503`: the throttle statuses as the pods' env carries them.
    pub fn throttle_statuses_text(&self) -> String {
        self.throttle_statuses
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Re-check what the schema should have refused, and work out the budgets.
pub fn validate_account(sla: &SalesLayerAccount) -> Result<ValidatedAccount, InvalidAccount> {
    let spec = &sla.spec;
    if spec.limit.requests == 0 || spec.limit.period_seconds == 0 {
        return Err(InvalidAccount::ZeroLimit);
    }
    if spec.headroom_percent > 90 {
        return Err(InvalidAccount::Headroom(spec.headroom_percent));
    }
    let usable = UsableBudget::from_limit(
        spec.limit.requests,
        spec.limit.period_seconds,
        spec.headroom_percent,
    );
    if usable.requests == 0 {
        return Err(InvalidAccount::NothingUsable(spec.headroom_percent));
    }
    let allowed = match (
        spec.allowed_namespaces.from,
        &spec.allowed_namespaces.selector,
    ) {
        (NamespacesFrom::All, _) => Allowed::All,
        (NamespacesFrom::Selector, None) => return Err(InvalidAccount::MissingSelector),
        (NamespacesFrom::Selector, Some(selector)) => Allowed::Matching(
            Selector::try_from(selector.clone())
                .map_err(|error| InvalidAccount::BadSelector(error.to_string()))?,
        ),
    };
    let mut throttle_statuses = spec.throttle_statuses.clone();
    throttle_statuses.sort_unstable();
    throttle_statuses.dedup();
    let effective = effective_from_status(sla.status.as_ref(), &spec.adaptive, usable);
    Ok(ValidatedAccount {
        name: sla.name_any(),
        generation: sla.metadata.generation,
        limit: spec.limit.clone(),
        usable,
        effective,
        allowed,
        adaptive: spec.adaptive.clone(),
        throttle_statuses,
    })
}

/// The effective budget the status records, if it still fits the usable
/// budget (same period, within [floor, usable]); usable otherwise.
fn effective_from_status(
    status: Option<&SalesLayerAccountStatus>,
    policy: &AdaptivePolicy,
    usable: UsableBudget,
) -> UsableBudget {
    if !policy.enabled {
        return usable;
    }
    let recorded = status
        .and_then(|s| s.effective.as_ref())
        .filter(|e| u64::from(e.period_seconds) * 1000 == usable.period_millis);
    match recorded {
        Some(e) => UsableBudget {
            requests: e
                .requests
                .clamp(floor_of(policy, usable.requests), usable.requests),
            period_millis: usable.period_millis,
        },
        None => usable,
    }
}

/// Why an integration gets nothing from its account.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountProblem {
    #[error(
        "SalesLayerAccount {account:?} does not exist; the platform team creates it, e.g. \
         `echo '{{\"apiVersion\":\"saleslayer.io/v1alpha1\",\"kind\":\"SalesLayerAccount\",\"metadata\":{{\"name\":\"{account}\"}}}}' | kubectl apply -f -`"
    )]
    NotFound { account: String },
    #[error(
        "SalesLayerAccount {account:?} does not allow integrations in namespace {namespace:?} (it allows {allowed}); ask the account's owner to allow this namespace"
    )]
    NotAllowed {
        account: String,
        namespace: String,
        allowed: String,
    },
    #[error("SalesLayerAccount {account:?} is invalid: {reason}")]
    Invalid { account: String, reason: String },
}

impl AccountProblem {
    /// The condition reason on the integration.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "AccountNotFound",
            Self::NotAllowed { .. } => "AccountNotAllowed",
            Self::Invalid { .. } => "AccountInvalid",
        }
    }
}

/// Whether an integration in `namespace` (with `labels`) may use the
/// account named `name`, found as `account` (if at all).
pub fn standing(
    name: &str,
    account: Option<Result<&ValidatedAccount, &InvalidAccount>>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), AccountProblem> {
    match account {
        None => Err(AccountProblem::NotFound {
            account: name.to_owned(),
        }),
        Some(Err(invalid)) => Err(AccountProblem::Invalid {
            account: name.to_owned(),
            reason: invalid.to_string(),
        }),
        Some(Ok(account)) if !account.allows(labels) => Err(AccountProblem::NotAllowed {
            account: name.to_owned(),
            namespace: namespace.to_owned(),
            allowed: account.allowed_text(),
        }),
        Some(Ok(_)) => Ok(()),
    }
}

/// What the account's reconcile counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountCounts {
    /// Integrations allowed on the account.
    pub integrations: u32,
    pub jobs: u32,
    pub pods: u32,
}

/// How the account was throttled, as the quota API counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountThrottleView {
    /// Consecutive windows with throttled responses, up to now.
    pub windows: u32,
    pub last_throttled_millis: Option<u64>,
}

/// The status an account should carry with `effective` requests per period.
pub fn account_status(
    account: &ValidatedAccount,
    effective: u32,
    counts: AccountCounts,
    throttling: AccountThrottleView,
    previous: Option<&SalesLayerAccountStatus>,
    now: Time,
) -> SalesLayerAccountStatus {
    let old = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let usable = account.usable;
    let effective = UsableBudget {
        requests: effective.min(usable.requests),
        period_millis: usable.period_millis,
    };
    let limit = UsableBudget {
        requests: account.limit.requests,
        period_millis: usable.period_millis,
    };
    let ready = condition(
        old,
        conditions::READY,
        true,
        conditions::REASON_BUDGETED,
        format!(
            "{} usable of a {} limit, {} of it split now over {} integrations, {} jobs and {} pods",
            show_budget(usable),
            show_budget(limit),
            show_budget(effective),
            counts.integrations,
            counts.jobs,
            counts.pods
        ),
        account.generation,
        &now,
    );
    let adapting = if !account.adaptive.enabled {
        condition(
            old,
            conditions::ADAPTING,
            false,
            conditions::REASON_DISABLED,
            "adaptation is off: the whole usable budget is split whatever Sales Layer answers"
                .into(),
            account.generation,
            &now,
        )
    } else if effective.requests < usable.requests {
        let (reason, why) = if throttling.windows > 0 {
            (
                conditions::REASON_THROTTLED,
                format!(
                    "Sales Layer throttled the account's paced pods in the last {} windows: someone outside the cluster uses it, or its real limit is lower",
                    throttling.windows
                ),
            )
        } else {
            (
                conditions::REASON_RECOVERING,
                format!(
                    "no throttling since; adding {} per clean window",
                    account.adaptive.increase_per_window
                ),
            )
        };
        condition(
            old,
            conditions::ADAPTING,
            true,
            reason,
            format!(
                "effective budget {} of usable {}: {why}",
                show_budget(effective),
                show_budget(usable)
            ),
            account.generation,
            &now,
        )
    } else {
        condition(
            old,
            conditions::ADAPTING,
            false,
            conditions::REASON_FULL,
            format!("the whole usable budget {} is split", show_budget(usable)),
            account.generation,
            &now,
        )
    };
    let to_status = |b: UsableBudget| UsableStatus {
        requests: b.requests,
        period_seconds: u32::try_from(b.period_millis / 1000).unwrap_or(u32::MAX),
    };
    SalesLayerAccountStatus {
        observed_generation: account.generation,
        usable: Some(to_status(usable)),
        effective: Some(to_status(effective)),
        integrations: counts.integrations,
        jobs: counts.jobs,
        pods: counts.pods,
        last_throttled: throttling
            .last_throttled_millis
            .and_then(crate::status::rfc3339),
        conditions: merge_conditions(old, [ready, adapting]),
        summary: Some(AccountSummary {
            limit: show_budget(limit),
            usable: show_budget(usable),
            effective: show_budget(effective),
            throttling: match throttling.windows {
                0 => "none".into(),
                1 => "1 window".into(),
                n => format!("{n} windows"),
            },
        }),
    }
}

/// The status of an account whose spec is invalid: `Ready=False`.
pub fn invalid_account_status(
    sla: &SalesLayerAccount,
    invalid: &InvalidAccount,
    now: Time,
) -> SalesLayerAccountStatus {
    let previous = sla.status.clone().unwrap_or_default();
    let ready = condition(
        &previous.conditions,
        conditions::READY,
        false,
        conditions::REASON_INVALID_SPEC,
        invalid.to_string(),
        sla.metadata.generation,
        &now,
    );
    SalesLayerAccountStatus {
        observed_generation: sla.metadata.generation,
        conditions: merge_conditions(&previous.conditions, [ready]),
        ..previous
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fixtures::{account, at};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_documented_account_has_40_usable_and_allows_everyone() {
        let valid = validate_account(&account("acme", json!({}))).expect("valid");
        assert_eq!(show_budget(valid.usable), "40/10s");
        assert_eq!(valid.effective, valid.usable);
        assert!(valid.allows(&BTreeMap::new()));
        assert_eq!(valid.throttle_statuses_text(), "429");
    }

    #[test]
    fn a_selector_admits_only_matching_namespaces() {
        let valid = validate_account(&account(
            "acme",
            json!({"allowedNamespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "shop"}}}}),
        ))
        .expect("valid");
        assert!(valid.allows(&labels(&[("team", "shop")])));
        assert!(!valid.allows(&labels(&[("team", "ops")])));
        assert!(!valid.allows(&BTreeMap::new()));
        let refused = standing("acme", Some(Ok(&valid)), "ops", &labels(&[("team", "ops")]));
        let problem = refused.expect_err("not allowed");
        assert_eq!(problem.reason(), "AccountNotAllowed");
        assert!(
            problem.to_string().contains("team=shop") && problem.to_string().contains("\"ops\""),
            "{problem}"
        );
    }

    #[test]
    fn a_missing_account_says_how_to_create_it() {
        let problem = standing("acme-prod", None, "shop", &BTreeMap::new()).expect_err("missing");
        assert_eq!(problem.reason(), "AccountNotFound");
        assert!(
            problem.to_string().contains("kubectl apply -f -")
                && problem.to_string().contains(r#""name":"acme-prod""#),
            "{problem}"
        );
    }

    #[test]
    fn invalid_accounts_are_refused_with_the_field_named() {
        let no_selector = account("acme", json!({"allowedNamespaces": {"from": "Selector"}}));
        assert_eq!(
            validate_account(&no_selector),
            Err(InvalidAccount::MissingSelector)
        );
        let nothing = account(
            "acme",
            json!({"limit": {"requests": 1, "periodSeconds": 10}, "headroomPercent": 50}),
        );
        assert_eq!(
            validate_account(&nothing),
            Err(InvalidAccount::NothingUsable(50))
        );
    }

    #[test]
    fn the_recorded_effective_budget_is_kept_within_bounds() {
        let mut sla = account("acme", json!({}));
        sla.status = Some(SalesLayerAccountStatus {
            effective: Some(UsableStatus {
                requests: 28,
                period_seconds: 10,
            }),
            ..SalesLayerAccountStatus::default()
        });
        assert_eq!(
            validate_account(&sla).expect("valid").effective.requests,
            28
        );
        sla.status = Some(SalesLayerAccountStatus {
            effective: Some(UsableStatus {
                requests: 2,
                period_seconds: 10,
            }),
            ..SalesLayerAccountStatus::default()
        });
        assert_eq!(
            validate_account(&sla).expect("valid").effective.requests,
            10,
            "never below the floor"
        );
        sla.spec.adaptive.enabled = false;
        assert_eq!(
            validate_account(&sla).expect("valid").effective.requests,
            40
        );
    }

    #[test]
    fn the_status_shows_the_budgets_and_whether_it_adapts() {
        let valid = validate_account(&account("acme", json!({}))).expect("valid");
        let counts = AccountCounts {
            integrations: 2,
            jobs: 5,
            pods: 9,
        };
        let throttled = AccountThrottleView {
            windows: 2,
            last_throttled_millis: Some(5_000),
        };
        let status = account_status(&valid, 28, counts, throttled, None, at(10));
        let summary = status.summary.clone().expect("summary");
        assert_eq!(
            (
                summary.limit.as_str(),
                summary.usable.as_str(),
                summary.effective.as_str(),
                summary.throttling.as_str()
            ),
            ("50/10s", "40/10s", "28/10s", "2 windows")
        );
        assert_eq!((status.integrations, status.jobs, status.pods), (2, 5, 9));
        let adapting = status
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::ADAPTING)
            .expect("Adapting");
        assert_eq!(
            (adapting.status.as_str(), adapting.reason.as_str()),
            ("True", conditions::REASON_THROTTLED)
        );
        let full = account_status(
            &valid,
            40,
            counts,
            AccountThrottleView::default(),
            Some(&status),
            at(20),
        );
        let adapting = full
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::ADAPTING)
            .expect("Adapting");
        assert_eq!(adapting.status, "False");
        assert_eq!(adapting.last_transition_time, at(20));
    }
}
