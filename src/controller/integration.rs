//! The reconcile of one `SalesLayerIntegration`: observe → validate → plan
//! → apply → status. It plans the integration's whole account from the
//! stores, then writes only this integration: its pods' annotations and its
//! status (through server-side apply, and only when different), and says
//! what changed in Events and notifications once the status write landed.
//!
//! An integration on a valid account is written by its account's reconcile
//! ([`write_member`] and [`write_unplanned`], called for every integration
//! of the account from one plan); the integration's own reconcile runs for
//! the rest: an invalid spec, an account that does not exist or is invalid
//! (the queues route everything else to the account, see `route`).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use saleslayer_core::account::AccountProblem;
use saleslayer_core::api::{SalesLayerIntegration, SalesLayerIntegrationStatus};
use saleslayer_core::plan::{self, AccountPlan, ValidatedIntegration};
use saleslayer_core::status;
use saleslayer_core::throttle;
use saleslayer_runtime::clock::wall_millis;
use tracing::{Instrument, info, warn};

use super::apply::{annotate_pods, patch_status, publish_ca};
use super::{Context, Error, RESYNC, events, on_failure, past_window_end, watches};
use crate::metrics::JobLabels;

pub(super) async fn reconcile(
    sli: Arc<SalesLayerIntegration>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    // A follower writes nothing; it is queued again when it becomes leader.
    if !ctx.leadership.is_leader() {
        return Ok(Action::await_change());
    }
    // Queued before its account was known (the integrations' watch listed
    // first): the account's reconcile writes it with its siblings, and
    // writing it here too would apply the same pods twice.
    if let watches::Route::Account(account) = watches::route(&ctx.stores, &sli) {
        let _ = ctx.accounts.send(account);
        return Ok(Action::await_change());
    }
    // Planning with a half-listed pod store would write 0-pod statuses.
    if !ctx.stores.pods_listed() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let started = std::time::Instant::now();
    ctx.metrics.reconciles.inc();
    let span = tracing::info_span!(
        "reconcile",
        namespace = %sli.namespace().unwrap_or_default(),
        integration = %sli.name_any(),
        account = %sli.spec.account
    );
    let result = reconcile_inner(sli, &ctx).instrument(span).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(sli: Arc<SalesLayerIntegration>, ctx: &Context) -> Result<Action, Error> {
    let now = Time(Timestamp::now());

    // validate
    let integration = match plan::validate(&sli) {
        Ok(valid) => valid,
        Err(invalid) => {
            warn!(%invalid, "invalid spec");
            let status = status::not_ready_status(&sli, invalid.reason(), invalid.to_string(), now);
            patch_status(ctx, &sli, &status).await?;
            return Ok(Action::requeue(RESYNC));
        }
    };
    // observe + plan: nothing for an integration its account does not take
    match ctx.stores.plan_for(&integration, None, wall_millis()) {
        Ok(plan) => Ok(Action::requeue(
            write_member(ctx, &sli, &integration, &plan)
                .await?
                .unwrap_or(RESYNC),
        )),
        Err(problem) => {
            write_unplanned(ctx, &sli, &integration, &problem).await?;
            Ok(Action::requeue(RESYNC))
        }
    }
}

/// The status of an integration its account gives nothing (not found, not
/// allowed, invalid), written only when different; its series forgotten.
pub(super) async fn write_unplanned(
    ctx: &Context,
    sli: &SalesLayerIntegration,
    integration: &ValidatedIntegration,
    problem: &AccountProblem,
) -> Result<(), Error> {
    let previous = sli.status.as_ref();
    let status = status::unplanned_status(integration, problem, previous, Time(Timestamp::now()));
    if previous.is_none_or(|p| !same_status(p, &status)) {
        warn!(
            namespace = %sli.namespace().unwrap_or_default(),
            integration = %sli.name_any(),
            reason = problem.reason(),
            %problem,
            "the account gives this integration nothing"
        );
        ctx.fence()?;
        patch_status(ctx, sli, &status).await?;
    }
    forget_series(ctx, integration);
    Ok(())
}

/// Write one integration of `account_plan`: the CA in its namespace, its
/// pods' shares, then its status and what changed (Events, notification).
/// When to look again, if sooner than the resync (a window's end while
/// throttled).
pub(super) async fn write_member(
    ctx: &Context,
    sli: &SalesLayerIntegration,
    integration: &ValidatedIntegration,
    account_plan: &AccountPlan,
) -> Result<Option<Duration>, Error> {
    let namespace = sli.namespace().unwrap_or_default();
    let now = Time(Timestamp::now());

    // apply: the CA for the pods' quota clients, and the pods whose share changed
    let applied = match publish_ca(ctx, &namespace).await {
        Ok(()) => annotate_pods(ctx, integration, account_plan).await,
        Err(error) => Err(error),
    };
    if let Err(error) = applied {
        // Say so in the status (best effort), then retry with backoff.
        let status = status::not_ready_status(sli, error.reason(), error.to_string(), now);
        if let Err(status_error) = patch_status(ctx, sli, &status).await {
            warn!(%status_error, "could not record the failure in the status either");
        }
        return Err(error);
    }

    // status
    let now_ms = wall_millis();
    let period = account_plan.budget.period_millis.max(1);
    let throttling = job_throttling(ctx, integration, now_ms, period);
    let previous = sli.status.as_ref();
    let status = status::desired_status(integration, account_plan, previous, &throttling, now);
    record(ctx, integration, &status);
    let window = throttle::window_of(now_ms, period);
    let me = ObjectRef::from_obj(sli);
    let written_this_window = ctx
        .status_windows
        .lock()
        .ok()
        .and_then(|w| w.get(&me).copied())
        == Some(window);
    let deferred = previous.is_some_and(|p| {
        !same_status(p, &status) && only_throttling_differs(p, &status) && written_this_window
    });
    if deferred {
        // Throttling is written at most once per window: the rest waits for the next.
        return Ok(Some(past_window_end(now_ms, period)));
    }
    if previous.is_none_or(|p| !same_status(p, &status)) {
        ctx.fence()?;
        if let Ok(mut windows) = ctx.status_windows.lock() {
            windows.insert(me, window);
        }
        // Decided before, said after the write: a write that fails is
        // retried, and its Events and notification go out once it lands.
        let said = events::announcements(previous, &status, account_plan);
        let notification =
            events::throttling_notification(integration, previous, &status, &throttling);
        patch_status(ctx, sli, &status).await?;
        events::publish(ctx, sli, said).await;
        if let Some(notification) = notification {
            events::notify(ctx, integration, notification).await;
        }
        info!(
            namespace = %namespace,
            integration = %sli.name_any(),
            allocations = ?status.jobs.iter().map(|j| (&j.name, j.allocated_requests, j.pods)).collect::<Vec<_>>(),
            "status updated"
        );
    }
    // While any job is throttled, look again when the window ends: a window
    // without throttled reports ends the run even if nobody reports.
    if throttling.values().any(|t| t.windows > 0) {
        return Ok(Some(past_window_end(now_ms, period)));
    }
    Ok(None)
}

/// Drop the job series of an integration that gets nothing.
fn forget_series(ctx: &Context, integration: &ValidatedIntegration) {
    let keys: Vec<_> = integration
        .jobs
        .iter()
        .map(|job| integration.key(&job.name))
        .collect();
    ctx.all_metrics.forget_jobs(&keys);
}

/// Allocation gauges for the integration's jobs (the account's own gauges
/// are the account reconcile's).
fn record(ctx: &Context, integration: &ValidatedIntegration, status: &SalesLayerIntegrationStatus) {
    let metrics = &ctx.metrics;
    let threshold = integration.alerting.persistent_windows.max(1);
    for job in &status.jobs {
        let labels = JobLabels::of(&integration.key(&job.name));
        metrics
            .allocated
            .get_or_create(&labels)
            .set(i64::from(job.allocated_requests));
        metrics.pods.get_or_create(&labels).set(i64::from(job.pods));
        metrics
            .persistent_throttling
            .get_or_create(&labels)
            .set(i64::from(job.throttled_windows >= threshold));
    }
}

/// The throttling of the integration's jobs as of `now_ms`.
fn job_throttling(
    ctx: &Context,
    integration: &ValidatedIntegration,
    now_ms: u64,
    period: u64,
) -> std::collections::BTreeMap<String, status::JobThrottling> {
    let window = throttle::window_of(now_ms, period);
    let Ok(book) = ctx.stores.reports.throttling.lock() else {
        return Default::default();
    };
    integration
        .jobs
        .iter()
        .filter_map(|job| {
            let state = book.job(&integration.key(&job.name))?;
            let windows = state.throttled_windows(window);
            Some((
                job.name.clone(),
                status::JobThrottling {
                    windows,
                    last_throttled_millis: state.last_throttled_millis,
                    throttled_requests: if windows > 0 { state.run_throttled } else { 0 },
                },
            ))
        })
        .collect()
}

/// Whether `a` and `b` differ only in what the quota API counts.
fn only_throttling_differs(
    a: &SalesLayerIntegrationStatus,
    b: &SalesLayerIntegrationStatus,
) -> bool {
    let strip = |s: &SalesLayerIntegrationStatus| {
        let mut s = s.clone();
        for job in &mut s.jobs {
            job.throttled_windows = 0;
            job.last_throttled = None;
        }
        s.conditions
            .retain(|c| c.type_ != status::conditions::PERSISTENT_THROTTLING);
        if let Some(summary) = s.summary.as_mut() {
            summary.throttling.clear();
        }
        s
    };
    same_status(&strip(a), &strip(b))
}

/// Equal for the purpose of writing: conditions compare without their
/// transition time (a new time alone is no change).
fn same_status(a: &SalesLayerIntegrationStatus, b: &SalesLayerIntegrationStatus) -> bool {
    let strip = |s: &SalesLayerIntegrationStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

pub(super) fn error_policy(
    sli: Arc<SalesLayerIntegration>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let Some(retry) = on_failure(&ctx, error) else {
        return Action::await_change();
    };
    warn!(
        namespace = %sli.namespace().unwrap_or_default(),
        integration = %sli.name_any(),
        reason = error.reason(),
        %error,
        "reconcile failed; retrying"
    );
    retry
}

#[cfg(test)]
mod tests {
    use saleslayer_core::api::{JobStatus, PerPodStatus};

    use super::*;

    fn status(allocated: u32, throttled: u32) -> SalesLayerIntegrationStatus {
        SalesLayerIntegrationStatus {
            jobs: vec![JobStatus {
                name: "import".into(),
                allocated_requests: allocated,
                pods: 1,
                per_pod: PerPodStatus {
                    requests: allocated,
                    period_millis: 10_000,
                    max_concurrency: allocated,
                },
                throttled_windows: throttled,
                last_throttled: None,
            }],
            ..SalesLayerIntegrationStatus::default()
        }
    }

    #[test]
    fn throttling_only_changes_are_told_apart() {
        assert!(only_throttling_differs(&status(8, 0), &status(8, 3)));
        assert!(!only_throttling_differs(&status(8, 0), &status(9, 0)));
        assert!(same_status(&status(8, 1), &status(8, 1)));
    }
}
