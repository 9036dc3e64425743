//! What a person reading `kubectl describe` and the owner's alert channel
//! learn from a reconcile: Events on allocation changes and overcommit, and
//! persistent-throttling alerts (Event + notification) when they flip.
//! Failures here are logged, never fatal.

use kube::Resource;
use kube::runtime::events::{Event, EventType};
use tracing::warn;

use super::{Context, plan};
use crate::api::{SalesLayerIntegration, SalesLayerIntegrationStatus};
use plan::{AccountPlan, ValidatedIntegration};

/// Events for a person reading `kubectl describe`: allocation changes, and
/// the moment an account becomes overcommitted.
pub(super) async fn publish_changes(
    ctx: &Context,
    sli: &SalesLayerIntegration,
    previous: Option<&SalesLayerIntegrationStatus>,
    status: &SalesLayerIntegrationStatus,
    account_plan: &AccountPlan,
) {
    let reference = sli.object_ref(&());
    let shares = |s: &SalesLayerIntegrationStatus| {
        s.jobs
            .iter()
            .map(|j| (j.name.clone(), j.allocated_requests, j.pods))
            .collect::<Vec<_>>()
    };
    if previous.map(shares) != Some(shares(status)) {
        let note = status
            .jobs
            .iter()
            .map(|j| {
                format!(
                    "{} {} ({} per pod over {} pods)",
                    j.name, j.allocated_requests, j.per_pod.requests, j.pods
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let note = format!(
            "of {} requests: {note}",
            plan::show_budget(account_plan.budget)
        );
        emit(
            ctx,
            &reference,
            EventType::Normal,
            "AllocationChanged",
            note,
        )
        .await;
    }
    let was_over = previous.is_some_and(|p| {
        p.conditions
            .iter()
            .any(|c| c.type_ == plan::conditions::OVERCOMMITTED && c.status == "True")
    });
    if let (Some(over), false) = (account_plan.allocation.overcommit, was_over) {
        let note = format!(
            "floors on account {} sum to {} but its usable budget is {}; floors were scaled down",
            account_plan.account, over.floors, over.usable
        );
        emit(ctx, &reference, EventType::Warning, "Overcommitted", note).await;
    }
}

/// Publish an Event about an integration; a failure is logged, never fatal.
async fn emit(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    if ctx.fence().is_err() {
        return;
    }
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Allocate".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, reference).await {
        warn!(%error, reason, "publishing an event failed");
    }
}

/// When `PersistentThrottling` flips: an Event, and a notification if configured.
pub(super) async fn alert_on_change(
    ctx: &Context,
    sli: &SalesLayerIntegration,
    integration: &ValidatedIntegration,
    previous: Option<&SalesLayerIntegrationStatus>,
    status: &SalesLayerIntegrationStatus,
    throttling: &std::collections::BTreeMap<String, plan::JobThrottling>,
) {
    let firing = |s: &SalesLayerIntegrationStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == plan::conditions::PERSISTENT_THROTTLING)
            .map(|c| {
                (
                    c.status == "True",
                    c.message.clone(),
                    c.last_transition_time.clone(),
                )
            })
    };
    let was = previous.and_then(firing).is_some_and(|(on, _, _)| on);
    let Some((is, message, since)) = firing(status) else {
        return;
    };
    if was == is {
        return;
    }
    let reference = sli.object_ref(&());
    let (type_, reason, state) = if is {
        (EventType::Warning, "PersistentThrottling", "firing")
    } else {
        (EventType::Normal, "ThrottlingResolved", "resolved")
    };
    emit(ctx, &reference, type_, reason, message).await;
    let Some(notify) = &integration.alerting.notify else {
        return;
    };
    let jobs: Vec<String> = if is {
        status
            .summary
            .as_ref()
            .map(|s| s.throttling.split(',').map(str::to_owned).collect())
            .unwrap_or_default()
    } else {
        previous
            .and_then(|p| p.summary.as_ref())
            .map(|s| {
                s.throttling
                    .split(',')
                    .filter(|j| *j != "none")
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let notification = crate::alerts::Notification {
        integration: integration.name.clone(),
        namespace: integration.namespace.clone(),
        throttled_requests: jobs
            .iter()
            .filter_map(|j| throttling.get(j))
            .map(|t| t.throttled_requests)
            .sum(),
        windows: jobs
            .iter()
            .filter_map(|j| throttling.get(j))
            .map(|t| t.windows)
            .max()
            .unwrap_or(0),
        jobs,
        state,
        since: since.0.to_string(),
    };
    match crate::alerts::target(&ctx.client, &integration.namespace, &notify.secret_ref).await {
        Ok(url) => {
            tokio::spawn(crate::alerts::send(ctx.http.clone(), url, notification));
        }
        Err(error) => warn!(%error, "cannot notify about persistent throttling"),
    }
}
