//! Who is calling the quota API: the bearer token is the pod's projected
//! service-account token (audience `saleslayer-operator`), checked with a
//! TokenReview. A valid token is cached until it expires, with the pod's
//! UID, so a deleted pod's token stops working as soon as the pod is gone
//! (`authorize` checks the UID against the live pod). A refused token is
//! cached briefly too, and a client that keeps failing is slowed down, so
//! bad requests cannot turn into a TokenReview each. Both caches are bounded.
//!
//! Tokens are never logged; the caches key them as given, in memory only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use kube::api::PostParams;
use kube::{Api, Client};
use saleslayer_contract::TOKEN_AUDIENCE;
use saleslayer_runtime::clock::wall_millis;

use super::QuotaError;

/// Most tokens kept in each cache; beyond it the expired ones go, then all of them.
const CACHE_LIMIT: usize = 20_000;
/// How long a token is trusted when its expiry cannot be read from it.
const DEFAULT_TRUST: Duration = Duration::from_secs(60);
/// How long a refused token is refused without asking the API server again.
const NEGATIVE_TRUST: Duration = Duration::from_secs(30);
/// Failed authentications a client may have per [`FAILURE_WINDOW`].
const FAILURES_ALLOWED: u32 = 10;
/// The window over which failures are counted.
const FAILURE_WINDOW: Duration = Duration::from_secs(10);
/// Most clients whose failures are tracked.
const CLIENTS_LIMIT: usize = 10_000;
/// Extra keys of a pod-bound token's user.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// The pod a token was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    /// The UID of the pod the token is bound to.
    pub uid: Option<String>,
}

/// Checks tokens through TokenReview, with caches.
pub struct Authenticator {
    client: Client,
    valid: Mutex<HashMap<String, (Identity, Instant)>>,
    refused: Mutex<HashMap<String, (QuotaError, Instant)>>,
    failures: Mutex<FailureCounter>,
}

impl Authenticator {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            valid: Mutex::default(),
            refused: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// The identity of a valid, pod-bound token for our audience, called
    /// from `peer` (when known).
    pub async fn authenticate(
        &self,
        token: &str,
        peer: Option<IpAddr>,
    ) -> Result<Identity, QuotaError> {
        let now = Instant::now();
        if let Some(identity) = lookup(&self.valid, token, now) {
            return Ok(identity);
        }
        if let Some(peer) = peer
            && let Some(wait) = self.failures.lock().ok().and_then(|f| f.blocked(peer, now))
        {
            return Err(QuotaError::TooManyFailures {
                retry_after_seconds: wait.as_secs().max(1),
            });
        }
        let checked = match lookup(&self.refused, token, now) {
            Some(refusal) => Err(refusal),
            None => self.review(token, now).await,
        };
        if let (Err(error), Some(peer)) = (&checked, peer)
            && !matches!(error, QuotaError::TokenReviewFailed)
            && let Ok(mut failures) = self.failures.lock()
        {
            failures.fail(peer, now);
        }
        checked
    }

    /// Ask the API server, and cache the answer.
    async fn review(&self, token: &str, now: Instant) -> Result<Identity, QuotaError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![TOKEN_AUDIENCE.into()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "TokenReview failed");
                QuotaError::TokenReviewFailed
            })?;
        let status = reviewed.status.unwrap_or_default();
        let audiences = status.audiences.unwrap_or_default();
        let checked = if status.authenticated != Some(true)
            || !audiences.iter().any(|a| a == TOKEN_AUDIENCE)
        {
            Err(QuotaError::InvalidToken)
        } else {
            identity_of(&status.user.unwrap_or_default())
        };
        match &checked {
            Ok(identity) => remember(&self.valid, token, identity.clone(), now + trust_for(token)),
            Err(refusal) => remember(&self.refused, token, refusal.clone(), now + NEGATIVE_TRUST),
        }
        checked
    }
}

fn lookup<T: Clone>(
    cache: &Mutex<HashMap<String, (T, Instant)>>,
    token: &str,
    now: Instant,
) -> Option<T> {
    let cache = cache.lock().ok()?;
    cache
        .get(token)
        .filter(|(_, until)| *until > now)
        .map(|(value, _)| value.clone())
}

fn remember<T>(
    cache: &Mutex<HashMap<String, (T, Instant)>>,
    token: &str,
    value: T,
    until: Instant,
) {
    let Ok(mut cache) = cache.lock() else { return };
    if cache.len() >= CACHE_LIMIT {
        let now = Instant::now();
        cache.retain(|_, (_, until)| *until > now);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
    }
    cache.insert(token.to_owned(), (value, until));
}

/// Failed authentications per client address, in fixed windows.
#[derive(Debug, Default)]
struct FailureCounter {
    by_peer: HashMap<IpAddr, (Instant, u32)>,
}

impl FailureCounter {
    /// How long `peer` must wait, if it failed too often in its window.
    fn blocked(&self, peer: IpAddr, now: Instant) -> Option<Duration> {
        let (since, count) = self.by_peer.get(&peer)?;
        let ends = *since + FAILURE_WINDOW;
        (*count >= FAILURES_ALLOWED && ends > now).then(|| ends - now)
    }

    fn fail(&mut self, peer: IpAddr, now: Instant) {
        if self.by_peer.len() >= CLIENTS_LIMIT && !self.by_peer.contains_key(&peer) {
            self.by_peer
                .retain(|_, (since, _)| *since + FAILURE_WINDOW > now);
            if self.by_peer.len() >= CLIENTS_LIMIT {
                self.by_peer.clear();
            }
        }
        let entry = self.by_peer.entry(peer).or_insert((now, 0));
        if entry.0 + FAILURE_WINDOW <= now {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The pod identity of a reviewed user, or 403 if the token is not a pod's.
pub fn identity_of(user: &UserInfo) -> Result<Identity, QuotaError> {
    let username = user.username.as_deref().unwrap_or_default();
    let mut parts = username.split(':');
    let (Some("system"), Some("serviceaccount"), Some(namespace), Some(account), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(QuotaError::NotAPodToken(
            "the token is not a service-account token",
        ));
    };
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|extra| extra.get(key))
            .and_then(|values| values.first())
            .cloned()
    };
    let pod = extra(EXTRA_POD_NAME).ok_or(QuotaError::NotAPodToken(
        "the token is not bound to a pod (use the projected token the webhook mounts)",
    ))?;
    Ok(Identity {
        namespace: namespace.to_owned(),
        service_account: account.to_owned(),
        pod,
        uid: extra(EXTRA_POD_UID),
    })
}

/// How long to trust a reviewed token: until its `exp`, at most a day.
fn trust_for(token: &str) -> Duration {
    let exp = token
        .split('.')
        .nth(1)
        .and_then(|payload| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|claims| claims.get("exp").and_then(serde_json::Value::as_u64));
    match exp {
        Some(exp) => {
            let now = wall_millis() / 1000;
            Duration::from_secs(exp.saturating_sub(now).min(24 * 3600))
        }
        None => DEFAULT_TRUST,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn a_pod_token_names_its_pod_and_uid() {
        let user = UserInfo {
            username: Some("system:serviceaccount:shop:importer".into()),
            extra: Some(
                [
                    (EXTRA_POD_NAME.to_owned(), vec!["import-0".to_owned()]),
                    (EXTRA_POD_UID.to_owned(), vec!["1234".to_owned()]),
                ]
                .into(),
            ),
            ..UserInfo::default()
        };
        assert_eq!(
            identity_of(&user),
            Ok(Identity {
                namespace: "shop".into(),
                service_account: "importer".into(),
                pod: "import-0".into(),
                uid: Some("1234".into()),
            })
        );
    }

    #[test]
    fn other_tokens_are_forbidden() {
        let person = UserInfo {
            username: Some("alice".into()),
            ..UserInfo::default()
        };
        assert_eq!(
            identity_of(&person).map_err(|r| r.status().as_u16()),
            Err(403)
        );
        let unbound = UserInfo {
            username: Some("system:serviceaccount:shop:importer".into()),
            ..UserInfo::default()
        };
        assert_eq!(
            identity_of(&unbound).map_err(|r| r.reason()),
            Err("NotAPodToken")
        );
    }

    #[test]
    fn bearer_header_is_parsed() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            "Bearer abc.def".parse().expect("header"),
        );
        assert_eq!(bearer(&headers), Some("abc.def"));
        headers.insert(header::AUTHORIZATION, "Basic xyz".parse().expect("header"));
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn token_expiry_bounds_the_cache() {
        let exp = wall_millis() / 1000 + 600;
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp}}}"#));
        let trust = trust_for(&format!("header.{payload}.signature"));
        assert!(trust <= Duration::from_secs(600) && trust >= Duration::from_secs(590));
        assert_eq!(trust_for("garbage"), DEFAULT_TRUST);
    }

    #[test]
    fn a_client_that_keeps_failing_waits_out_its_window() {
        let mut failures = FailureCounter::default();
        let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
        let other = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 8));
        let start = Instant::now();
        for _ in 0..FAILURES_ALLOWED - 1 {
            failures.fail(peer, start);
        }
        assert_eq!(failures.blocked(peer, start), None);
        failures.fail(peer, start);
        assert!(failures.blocked(peer, start).is_some());
        assert_eq!(
            failures.blocked(other, start),
            None,
            "only the failing client"
        );
        assert_eq!(failures.blocked(peer, start + FAILURE_WINDOW), None);
    }

    #[tokio::test]
    async fn a_refused_token_is_remembered_without_another_review() {
        // The client points nowhere: a second TokenReview would fail with
        // TokenReviewFailed, so InvalidToken can only come from the cache.
        let client = kube::Client::try_from(kube::Config::new(
            "https://127.0.0.1:1".parse().expect("url"),
        ))
        .expect("client");
        let auth = Authenticator::new(client);
        remember(
            &auth.refused,
            "bad",
            QuotaError::InvalidToken,
            Instant::now() + NEGATIVE_TRUST,
        );
        assert_eq!(
            auth.authenticate("bad", None).await.map_err(|e| e.reason()),
            Err("InvalidToken")
        );
        assert_eq!(
            auth.authenticate("unknown", None)
                .await
                .map_err(|e| e.reason()),
            Err("TokenReviewFailed")
        );
    }
}
