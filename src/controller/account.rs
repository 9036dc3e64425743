//! The reconcile of one `SalesLayerAccount`: validate it, count what uses
//! it, step its effective budget (AIMD over its windows, on the throttled
//! responses its pods reported), write its status, then plan the account
//! once with that budget and write every integration on it (their pods'
//! shares and statuses, `integration::write_member`). A change to anything
//! an account's plan reads is routed here (`watches::route`), so it costs
//! one reconcile, not one per integration of the account.
//!
//! A lowered or restored budget is written at once, since every plan on the
//! account reads it from the account's status (so a new leader starts from
//! it too); counts and messages that alone changed are written at most once
//! per window. While the account adapts it is looked at again at each
//! window's end, so a clean window raises the budget even if nobody reports.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use saleslayer_core::account::{
    self, AccountCounts, AccountThrottleView, ValidatedAccount, conditions,
};
use saleslayer_core::adaptation::Adaptation;
use saleslayer_core::api::{SalesLayerAccount, SalesLayerAccountStatus};
use saleslayer_core::lease_book::{DEFAULT_REFRESH_MILLIS, refresh_for, settle_windows};
use saleslayer_core::plan::{self, AccountPlan, show_budget};
use saleslayer_runtime::clock::wall_millis;
use tracing::{Instrument, info, warn};

use super::apply::patch_account_status;
use super::events::{self, Announcement};
use super::{Context, Error, RESYNC, integration, on_failure, past_window_end};
use crate::metrics::AccountLabels;

pub(super) async fn reconcile(
    sla: Arc<SalesLayerAccount>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    if !ctx.leadership.is_leader() {
        return Ok(Action::await_change());
    }
    if !ctx.stores.pods_listed() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    ctx.metrics.reconciles.inc();
    let span = tracing::info_span!("reconcile_account", account = %sla.name_any());
    reconcile_inner(sla, &ctx).instrument(span).await
}

async fn reconcile_inner(sla: Arc<SalesLayerAccount>, ctx: &Context) -> Result<Action, Error> {
    let now = Time(Timestamp::now());
    let account = match account::validate_account(&sla) {
        Ok(account) => account,
        Err(invalid) => {
            warn!(%invalid, "invalid account");
            let status = account::invalid_account_status(&sla, &invalid, now);
            if sla.status.as_ref() != Some(&status) {
                patch_account_status(ctx, &sla, &status).await?;
            }
            return Ok(Action::requeue(RESYNC));
        }
    };
    let now_ms = wall_millis();
    let window = account.window_of(now_ms);
    let (effective, throttling) = step(ctx, &account, window);
    // Planned with the budget just stepped: the integrations follow it now.
    let mut stepped = account.clone();
    stepped.effective.requests = effective;
    let plan = ctx.stores.account_plan(&stepped, None, now_ms);
    let counts = AccountCounts {
        integrations: u32::try_from(plan.members.len()).unwrap_or(u32::MAX),
        jobs: u32::try_from(plan.allocation.jobs.len()).unwrap_or(u32::MAX),
        pods: plan.allocation.jobs.iter().map(|j| j.pods).sum(),
    };
    let previous = sla.status.as_ref();
    let status = account::account_status(&account, effective, counts, throttling, previous, now);
    record(
        ctx,
        &account,
        effective,
        plan.allocation.overcommit.is_some(),
    );

    let before = previous
        .and_then(|p| p.effective.as_ref())
        .map(|e| e.requests);
    let moved = before != Some(effective);
    let me = ObjectRef::from_obj(sla.as_ref());
    let written_this_window = ctx
        .account_windows
        .lock()
        .ok()
        .and_then(|w| w.get(&me).copied())
        == Some(window);
    let changed = previous.is_none_or(|previous| !same(previous, &status));
    let write = match previous {
        None => true,
        Some(previous) if significant(previous) != significant(&status) || moved => true,
        Some(_) => changed && !written_this_window,
    };
    // Counts that moved in a window already written wait for its end, not
    // for the resync (`kubectl get sla` showed 0 pods for minutes).
    let deferred = changed && !write;
    if write {
        ctx.fence()?;
        patch_account_status(ctx, &sla, &status).await?;
        if let Ok(mut windows) = ctx.account_windows.lock() {
            windows.insert(me, window);
        }
        if let Some(before) = before.filter(|_| moved) {
            announce(ctx, &sla, &account, before, effective).await;
        }
    }
    let mut again = write_integrations(ctx, &plan).await?.unwrap_or(RESYNC);
    // Adapting: look again when the window ends, so a clean window counts.
    if deferred || effective < account.usable.requests || throttling.windows > 0 {
        again = again.min(past_window_end(now_ms, account.usable.period_millis));
    }
    Ok(Action::requeue(again))
}

/// Write every integration that names the account, from `plan`: members get
/// their pods' shares and their status; the others (in a namespace the
/// account does not allow) say why they get nothing. An integration whose
/// spec is invalid is left to its own reconcile, which says so. Goes on past
/// a failed write and returns the first error (the reconcile is retried);
/// else when to look again, if sooner than the resync.
async fn write_integrations(ctx: &Context, plan: &AccountPlan) -> Result<Option<Duration>, Error> {
    let mut sooner: Option<Duration> = None;
    let mut failed = None;
    for reference in ctx.stores.on_account(&plan.account) {
        let Some(sli) = ctx.stores.integrations.get(&reference) else {
            continue;
        };
        let Ok(integration) = plan::validate(&sli) else {
            continue;
        };
        let name = format!("{}/{}", integration.namespace, integration.name);
        let written = if plan.members.contains(&name) {
            integration::write_member(ctx, &sli, &integration, plan).await
        } else {
            match ctx.stores.account_of(&integration) {
                Err(problem) => integration::write_unplanned(ctx, &sli, &integration, &problem)
                    .await
                    .map(|()| None),
                // Allowed since the plan was made: the namespace watch that
                // saw it queued this account again.
                Ok(_) => Ok(None),
            }
        };
        match written {
            Ok(next) => sooner = sooner.into_iter().chain(next).min(),
            Err(Error::NotLeader) => return Err(Error::NotLeader),
            Err(error) => {
                failed.get_or_insert(error);
            }
        }
    }
    match failed {
        Some(error) => Err(error),
        None => Ok(sooner),
    }
}

/// Step the account's effective budget to `window`; the leader starts from
/// what the status says (a new leader keeps the budget it inherits).
fn step(ctx: &Context, account: &ValidatedAccount, window: u64) -> (u32, AccountThrottleView) {
    let reports = &ctx.stores.reports;
    let (Ok(throttling), Ok(mut adaptation)) = (reports.accounts.lock(), reports.adaptation.lock())
    else {
        return (account.effective.requests, AccountThrottleView::default());
    };
    let usable = account.usable.requests;
    let state = adaptation
        .entry(account.name.clone())
        .or_insert_with(|| Adaptation::start(account.effective.requests, usable, window));
    let period = account.usable.period_millis;
    let settle = settle_windows(period, refresh_for(period, DEFAULT_REFRESH_MILLIS));
    state.step(&account.adaptive, usable, window, settle, |w| {
        throttling.counts(&account.name, w)
    });
    let view = AccountThrottleView {
        windows: throttling.run(&account.name, window),
        last_throttled_millis: throttling.last_throttled_millis(&account.name),
    };
    (state.effective(), view)
}

/// What of an account's status a write must not wait for.
#[derive(Debug, PartialEq, Eq)]
struct Significant {
    generation: Option<i64>,
    usable: Option<(u32, u32)>,
    effective: Option<(u32, u32)>,
    integrations: u32,
    /// (type, status, reason) of each condition.
    conditions: Vec<(String, String, String)>,
}

/// The budgets, the count of integrations, and each condition's state.
fn significant(status: &SalesLayerAccountStatus) -> Significant {
    Significant {
        generation: status.observed_generation,
        usable: status
            .usable
            .as_ref()
            .map(|u| (u.requests, u.period_seconds)),
        effective: status
            .effective
            .as_ref()
            .map(|e| (e.requests, e.period_seconds)),
        integrations: status.integrations,
        conditions: status
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect(),
    }
}

/// Equal for the purpose of writing: conditions compare without their
/// transition time.
fn same(a: &SalesLayerAccountStatus, b: &SalesLayerAccountStatus) -> bool {
    let strip = |s: &SalesLayerAccountStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

/// The account's gauges.
fn record(ctx: &Context, account: &ValidatedAccount, effective: u32, overcommitted: bool) {
    let labels = AccountLabels {
        account: account.name.clone(),
    };
    let metrics = &ctx.metrics;
    metrics
        .usable
        .get_or_create(&labels)
        .set(i64::from(account.usable.requests));
    metrics
        .effective
        .get_or_create(&labels)
        .set(i64::from(effective));
    metrics
        .overcommitted
        .get_or_create(&labels)
        .set(i64::from(overcommitted));
}

/// Events on the account and on each of its integrations when its budget
/// was lowered, or came back to the whole usable budget.
async fn announce(
    ctx: &Context,
    sla: &SalesLayerAccount,
    account: &ValidatedAccount,
    before: u32,
    effective: u32,
) {
    let Some(announcement) = budget_announcement(account, before, effective) else {
        return;
    };
    info!(before, effective, "effective budget moved");
    events::publish_about(ctx, sla, vec![announcement.clone()]).await;
    for sli in ctx.stores.on_account(&account.name) {
        if let Some(sli) = ctx.stores.integrations.get(&sli) {
            events::publish_about(ctx, sli.as_ref(), vec![announcement.clone()]).await;
        }
    }
}

/// The Event for a move of the effective budget from `before` to
/// `effective`: every decrease, and the return to the full budget (the
/// single steps up in between show in the status, not as Events).
pub(super) fn budget_announcement(
    account: &ValidatedAccount,
    before: u32,
    effective: u32,
) -> Option<Announcement> {
    let budget = |requests| {
        show_budget(saleslayer_core::allocation::UsableBudget {
            requests,
            period_millis: account.usable.period_millis,
        })
    };
    if effective < before {
        Some(Announcement {
            warning: true,
            reason: "BudgetLowered",
            note: format!(
                "account {}: effective budget lowered from {} to {} because Sales Layer throttled paced pods (someone outside the cluster uses the account, or its real limit is lower)",
                account.name,
                budget(before),
                budget(effective)
            ),
        })
    } else if effective > before && effective >= account.usable.requests {
        Some(Announcement {
            warning: false,
            reason: "BudgetRestored",
            note: format!(
                "account {}: effective budget back to the whole usable {}",
                account.name,
                budget(effective)
            ),
        })
    } else {
        None
    }
}

pub(super) fn error_policy(
    sla: Arc<SalesLayerAccount>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let Some(retry) = on_failure(&ctx, error) else {
        return Action::await_change();
    };
    warn!(account = %sla.name_any(), reason = error.reason(), %error, "account reconcile failed; retrying");
    retry
}

/// Whether `status` says the account adapts (for tests and logs).
pub fn adapting(status: &SalesLayerAccountStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == conditions::ADAPTING && c.status == "True")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::state::testing::account as sla;

    fn acme() -> ValidatedAccount {
        account::validate_account(&sla("acme", json!({}))).expect("valid")
    }

    #[test]
    fn lowering_is_a_warning_and_only_the_full_return_is_announced() {
        let acme = acme();
        let lowered = budget_announcement(&acme, 40, 28).expect("announced");
        assert!(lowered.warning && lowered.reason == "BudgetLowered");
        assert!(
            lowered.note.contains("from 40/10s to 28/10s"),
            "{}",
            lowered.note
        );
        assert_eq!(
            budget_announcement(&acme, 28, 29),
            None,
            "a step up is status only"
        );
        let back = budget_announcement(&acme, 39, 40).expect("announced");
        assert_eq!((back.warning, back.reason), (false, "BudgetRestored"));
        assert_eq!(budget_announcement(&acme, 40, 40), None);
    }

    #[test]
    fn counts_alone_are_not_significant_but_the_budget_is() {
        let acme = acme();
        let now = Time(Timestamp::UNIX_EPOCH);
        let a = account::account_status(
            &acme,
            40,
            AccountCounts {
                integrations: 1,
                jobs: 2,
                pods: 3,
            },
            AccountThrottleView::default(),
            None,
            now.clone(),
        );
        let more_pods = account::account_status(
            &acme,
            40,
            AccountCounts {
                integrations: 1,
                jobs: 2,
                pods: 4,
            },
            AccountThrottleView::default(),
            Some(&a),
            now.clone(),
        );
        assert!(!same(&a, &more_pods));
        assert_eq!(significant(&a), significant(&more_pods));
        let lowered = account::account_status(
            &acme,
            28,
            AccountCounts {
                integrations: 1,
                jobs: 2,
                pods: 3,
            },
            AccountThrottleView::default(),
            Some(&a),
            now,
        );
        assert_ne!(significant(&a), significant(&lowered));
        assert!(adapting(&lowered) && !adapting(&a));
    }
}
