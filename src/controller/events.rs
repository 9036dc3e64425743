//! What a person reading `kubectl describe` and the owner's alert channel
//! learn from a reconcile: Events on allocation changes and overcommit, and
//! persistent-throttling alerts (Event + notification) when they flip.
//!
//! Deciding is pure ([`announcements`], [`throttling_notification`]: from the
//! previous and the new status); only [`publish`] and [`notify`] do I/O, and
//! the reconcile calls them after the status write succeeded, so a failed
//! write never repeats an Event or a notification. Failures here are
//! logged, never fatal.

use std::collections::BTreeMap;

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};
use saleslayer_core::api::{SalesLayerIntegration, SalesLayerIntegrationStatus};
use saleslayer_core::plan::{self, AccountPlan, ValidatedIntegration};
use saleslayer_core::status::{self, JobThrottling};
use tracing::warn;

use super::Context;
use crate::alerts::Notification;

/// One Event to publish about an integration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Announcement {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// The Events a move from `previous` to `status` deserves: the allocation
/// changed; the account became overcommitted; persistent throttling fired
/// or resolved.
pub(super) fn announcements(
    previous: Option<&SalesLayerIntegrationStatus>,
    status: &SalesLayerIntegrationStatus,
    account_plan: &AccountPlan,
) -> Vec<Announcement> {
    let mut out = Vec::new();
    let shares = |s: &SalesLayerIntegrationStatus| {
        s.jobs
            .iter()
            .map(|j| (j.name.clone(), j.allocated_requests, j.pods))
            .collect::<Vec<_>>()
    };
    if previous.map(shares) != Some(shares(status)) {
        let jobs = status
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
        out.push(Announcement {
            warning: false,
            reason: "AllocationChanged",
            note: format!(
                "of {} requests: {jobs}",
                plan::show_budget(account_plan.budget)
            ),
        });
    }
    let was_over = previous.is_some_and(|p| is_true(p, status::conditions::OVERCOMMITTED));
    if let (Some(over), false) = (account_plan.allocation.overcommit, was_over) {
        out.push(Announcement {
            warning: true,
            reason: "Overcommitted",
            note: format!(
                "floors on account {} sum to {} but its usable budget is {}; floors were scaled down",
                account_plan.account, over.floors, over.usable
            ),
        });
    }
    if let Some((firing, message)) = throttling_flip(previous, status) {
        out.push(Announcement {
            warning: firing,
            reason: if firing {
                "PersistentThrottling"
            } else {
                "ThrottlingResolved"
            },
            note: message,
        });
    }
    out
}

/// The notification for the owner when `PersistentThrottling` flips, if
/// the integration names a target.
pub(super) fn throttling_notification(
    integration: &ValidatedIntegration,
    previous: Option<&SalesLayerIntegrationStatus>,
    status: &SalesLayerIntegrationStatus,
    throttling: &BTreeMap<String, JobThrottling>,
) -> Option<Notification> {
    integration.alerting.notify.as_ref()?;
    let (firing, _) = throttling_flip(previous, status)?;
    // Firing: the jobs throttled now; resolved: the ones that were.
    let named = if firing { Some(status) } else { previous };
    let jobs: Vec<String> = named
        .and_then(|s| s.summary.as_ref())
        .map(|s| {
            s.throttling
                .split(',')
                .filter(|j| !j.is_empty() && *j != "none")
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let counted = || jobs.iter().filter_map(|j| throttling.get(j));
    let since = condition(status, status::conditions::PERSISTENT_THROTTLING)
        .map(|c| c.last_transition_time.0.to_string())
        .unwrap_or_default();
    Some(Notification {
        integration: integration.name.clone(),
        namespace: integration.namespace.clone(),
        throttled_requests: counted().map(|t| t.throttled_requests).sum(),
        windows: counted().map(|t| t.windows).max().unwrap_or(0),
        jobs,
        state: if firing { "firing" } else { "resolved" },
        since,
    })
}

/// `Some((firing, message))` when `PersistentThrottling` changed state.
fn throttling_flip(
    previous: Option<&SalesLayerIntegrationStatus>,
    status: &SalesLayerIntegrationStatus,
) -> Option<(bool, String)> {
    let now = condition(status, status::conditions::PERSISTENT_THROTTLING)?;
    let is = now.status == "True";
    let was = previous.is_some_and(|p| is_true(p, status::conditions::PERSISTENT_THROTTLING));
    (was != is).then(|| (is, now.message.clone()))
}

fn condition<'a>(
    status: &'a SalesLayerIntegrationStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

fn is_true(status: &SalesLayerIntegrationStatus, type_: &str) -> bool {
    condition(status, type_).is_some_and(|c| c.status == "True")
}

/// Publish Events about an integration; a failure is logged, never fatal.
pub(super) async fn publish(
    ctx: &Context,
    sli: &SalesLayerIntegration,
    announcements: Vec<Announcement>,
) {
    publish_about(ctx, sli, announcements).await;
}

/// Publish Events about any object of ours (an account, an integration).
pub(super) async fn publish_about<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    object: &K,
    announcements: Vec<Announcement>,
) {
    let reference = object.object_ref(&());
    for announcement in announcements {
        if ctx.fence().is_err() {
            return;
        }
        let event = Event {
            type_: if announcement.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: announcement.reason.into(),
            note: Some(announcement.note),
            action: "Allocate".into(),
            secondary: None,
        };
        // A Recorder of its own per Event: kube's Recorder folds Events of
        // the same reason about the same object into a series that keeps the
        // first note, so "AllocationChanged" would show the first allocation
        // forever. Each change here is news, with its own note.
        let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
        if let Err(error) = recorder.publish(&event, &reference).await {
            warn!(%error, reason = announcement.reason, "publishing an event failed");
        }
    }
}

/// Send `notification` to the integration's target (in its own task).
pub(super) async fn notify(
    ctx: &Context,
    integration: &ValidatedIntegration,
    notification: Notification,
) {
    let Some(notify) = &integration.alerting.notify else {
        return;
    };
    match crate::alerts::target(&ctx.client, &integration.namespace, &notify.secret_ref).await {
        Ok(url) => {
            tokio::spawn(crate::alerts::send(ctx.http.clone(), url, notification));
        }
        Err(error) => warn!(%error, "cannot notify about persistent throttling"),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use saleslayer_core::plan::{PodCounts, plan_account, validate};
    use saleslayer_core::status::desired_status;
    use serde_json::json;

    use super::*;
    use crate::state::testing::integration;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("time"))
    }

    fn acme() -> saleslayer_core::account::ValidatedAccount {
        saleslayer_core::account::validate_account(&crate::state::testing::account(
            "acme",
            json!({}),
        ))
        .expect("valid account")
    }

    fn member(spec: serde_json::Value) -> ValidatedIntegration {
        validate(&integration("shop", "catalog", spec)).expect("valid")
    }

    fn throttled(windows: u32) -> BTreeMap<String, JobThrottling> {
        [(
            "import".to_owned(),
            JobThrottling {
                windows,
                last_throttled_millis: Some(1_000),
                throttled_requests: 7,
            },
        )]
        .into()
    }

    #[test]
    fn a_first_status_announces_its_allocation_and_an_unchanged_one_nothing() {
        let member = member(json!({"account": "acme", "jobs": [{"name": "import"}]}));
        let plan = plan_account(&acme(), std::slice::from_ref(&member), &PodCounts::new());
        let first = desired_status(&member, &plan, None, &BTreeMap::new(), at(1));
        let said = announcements(None, &first, &plan);
        assert_eq!(said.len(), 1, "{said:?}");
        assert_eq!(said[0].reason, "AllocationChanged");
        assert!(
            said[0].note.starts_with("of 40/10s requests: import 40"),
            "{}",
            said[0].note
        );
        let again = desired_status(&member, &plan, Some(&first), &BTreeMap::new(), at(2));
        assert!(announcements(Some(&first), &again, &plan).is_empty());
    }

    #[test]
    fn overcommit_is_announced_once_as_a_warning() {
        let member = member(json!({"account": "acme", "jobs": [
            {"name": "import", "minRequests": 30}, {"name": "prices", "minRequests": 22}]}));
        let plan = plan_account(&acme(), std::slice::from_ref(&member), &PodCounts::new());
        let first = desired_status(&member, &plan, None, &BTreeMap::new(), at(1));
        let said = announcements(None, &first, &plan);
        let over = said
            .iter()
            .find(|a| a.reason == "Overcommitted")
            .expect("announced");
        assert!(over.warning && over.note.contains("sum to 52"), "{over:?}");
        let again = desired_status(&member, &plan, Some(&first), &BTreeMap::new(), at(2));
        assert!(announcements(Some(&first), &again, &plan).is_empty());
    }

    #[test]
    fn persistent_throttling_fires_and_resolves_with_a_notification_each_way() {
        let member = member(json!({"account": "acme", "jobs": [{"name": "import"}],
            "alerting": {"persistentWindows": 3, "notify": {"secretRef": {"name": "hook", "key": "url"}}}}));
        let plan = plan_account(&acme(), std::slice::from_ref(&member), &PodCounts::new());
        let calm = desired_status(&member, &plan, None, &throttled(2), at(1));
        assert!(throttling_notification(&member, None, &calm, &throttled(2)).is_none());

        let firing = desired_status(&member, &plan, Some(&calm), &throttled(3), at(2));
        let said = announcements(Some(&calm), &firing, &plan);
        assert!(
            said.iter()
                .any(|a| a.reason == "PersistentThrottling" && a.warning),
            "{said:?}"
        );
        let sent = throttling_notification(&member, Some(&calm), &firing, &throttled(3))
            .expect("a notification");
        assert_eq!(
            (
                sent.state,
                sent.jobs.clone(),
                sent.windows,
                sent.throttled_requests
            ),
            ("firing", vec!["import".to_owned()], 3, 7)
        );
        assert!(
            throttling_notification(&member, Some(&firing), &firing, &throttled(4)).is_none(),
            "no flip, no notification"
        );

        let resolved = desired_status(&member, &plan, Some(&firing), &BTreeMap::new(), at(3));
        let said = announcements(Some(&firing), &resolved, &plan);
        assert!(
            said.iter()
                .any(|a| a.reason == "ThrottlingResolved" && !a.warning),
            "{said:?}"
        );
        let sent = throttling_notification(&member, Some(&firing), &resolved, &BTreeMap::new())
            .expect("a resolve notification");
        assert_eq!(
            (sent.state, sent.jobs),
            ("resolved", vec!["import".to_owned()])
        );
    }
}
