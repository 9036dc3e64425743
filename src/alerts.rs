//! Notifications when persistent throttling fires and resolves (DESIGN.md §6).
//!
//! The target URL is a credential: it is read from the Secret that
//! `spec.alerting.notify.secretRef` names, used, and never logged. A
//! notification is a JSON POST, retried after 1, 2 and 4 s (with jitter) on
//! connection errors and 5xx, at most 4 attempts, never on 4xx. Sending runs
//! in its own task so a slow receiver never holds up a reconcile.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use serde::Serialize;
use tracing::{info, warn};

use saleslayer_core::api::SecretKeyRef;

/// Attempts in all, the first included.
pub const MAX_ATTEMPTS: u32 = 4;

/// What a notification says.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub integration: String,
    pub namespace: String,
    pub jobs: Vec<String>,
    /// `firing` or `resolved`.
    pub state: &'static str,
    pub throttled_requests: u64,
    pub windows: u32,
    /// RFC 3339 time the state began.
    pub since: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Secret {0}: {1}")]
    ReadSecret(String, #[source] kube::Error),
    #[error("Secret {0} has no key {1}")]
    MissingKey(String, String),
}

/// Read the notification URL from its Secret.
pub async fn target(
    client: &Client,
    namespace: &str,
    secret: &SecretKeyRef,
) -> Result<String, Error> {
    let at = format!("{namespace}/{}", secret.name);
    let found = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(&secret.name)
        .await
        .map_err(|error| Error::ReadSecret(at.clone(), error))?;
    found
        .data
        .and_then(|d| d.get(&secret.key).cloned())
        .and_then(|bytes| String::from_utf8(bytes.0).ok())
        .map(|url| url.trim().to_owned())
        .ok_or(Error::MissingKey(at, secret.key.clone()))
}

/// Delay before retry `attempt` (1-based): 1, 2, 4 s, with up to 25 % jitter.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.saturating_sub(1).min(10));
    base.mul_f64(1.0 + 0.25 * jitter.clamp(0.0, 1.0))
}

/// Send `notification` to `url` with retries; logs the outcome, never the URL.
pub async fn send(http: reqwest::Client, url: String, notification: Notification) {
    for attempt in 1..=MAX_ATTEMPTS {
        let outcome = http
            .post(&url)
            .timeout(Duration::from_secs(10))
            .json(&notification)
            .send()
            .await;
        let retry = match outcome {
            Ok(response) if response.status().is_success() => {
                info!(integration = %notification.integration, namespace = %notification.namespace, state = notification.state, "notification delivered");
                return;
            }
            Ok(response) if response.status().is_client_error() => {
                warn!(integration = %notification.integration, status = %response.status(), "notification refused; not retried");
                return;
            }
            Ok(response) => format!("status {}", response.status()),
            // Strip the URL from the error: it is a credential.
            Err(error) => error.without_url().to_string(),
        };
        if attempt == MAX_ATTEMPTS {
            warn!(integration = %notification.integration, error = %retry, "notification failed after {MAX_ATTEMPTS} attempts");
            return;
        }
        tokio::time::sleep(backoff(attempt, jitter())).await;
    }
}

/// A number in [0, 1) from the clock's low bits: enough to spread retries.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_with_bounded_jitter() {
        assert_eq!(backoff(1, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(2, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(5));
        assert!(backoff(1, 7.0) <= Duration::from_millis(1250));
    }

    #[test]
    fn notification_shape() {
        let n = Notification {
            integration: "catalog".into(),
            namespace: "shop".into(),
            jobs: vec!["price-sync".into()],
            state: "firing",
            throttled_requests: 12,
            windows: 6,
            since: "2026-11-27T20:00:00Z".into(),
        };
        let value = serde_json::to_value(&n).expect("json");
        assert_eq!(value["throttledRequests"], 12);
        assert_eq!(value["state"], "firing");
        assert_eq!(value["jobs"][0], "price-sync");
    }
}
