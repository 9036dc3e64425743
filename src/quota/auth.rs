//! Who is calling the quota API: the bearer token is the pod's projected
//! service-account token (audience `saleslayer-operator`), checked with a
//! TokenReview and cached until the token expires, in a cache of bounded size.
//!
//! Tokens are never logged; the cache keys them as given, in memory only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};

use super::Refusal;
use crate::webhook::mutate::TOKEN_AUDIENCE;

/// Most tokens kept; beyond it the expired ones go, then all of them.
const CACHE_LIMIT: usize = 20_000;
/// How long a token is trusted when its expiry cannot be read from it.
const DEFAULT_TRUST: Duration = Duration::from_secs(60);
/// Extra keys of a pod-bound token's user.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";

/// The pod a token was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
}

/// Checks tokens through TokenReview, with a cache.
pub struct Authenticator {
    client: Client,
    cache: Mutex<HashMap<String, (Identity, Instant)>>,
}

impl Authenticator {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            cache: Mutex::default(),
        }
    }

    /// The identity of a valid, pod-bound token for our audience.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, Refusal> {
        let now = Instant::now();
        if let Some(identity) = self.cache.lock().ok().and_then(|cache| {
            cache
                .get(token)
                .filter(|(_, until)| *until > now)
                .map(|(i, _)| i.clone())
        }) {
            return Ok(identity);
        }
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
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "TokenReviewFailed",
                    "the token could not be checked right now; retry",
                )
            })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "InvalidToken",
                "the token is not valid for audience saleslayer-operator",
            ));
        }
        let identity = identity_of(&status.user.unwrap_or_default())?;
        let until = now + trust_for(token);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.retain(|_, (_, until)| *until > now);
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
            }
            cache.insert(token.to_owned(), (identity.clone(), until));
        }
        Ok(identity)
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
pub fn identity_of(
    user: &k8s_openapi::api::authentication::v1::UserInfo,
) -> Result<Identity, Refusal> {
    let forbidden =
        |message: &str| Refusal::new(StatusCode::FORBIDDEN, "NotAPodToken", message.to_owned());
    let username = user.username.as_deref().unwrap_or_default();
    let mut parts = username.split(':');
    let (Some("system"), Some("serviceaccount"), Some(namespace), Some(account), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(forbidden("the token is not a service-account token"));
    };
    let pod = user
        .extra
        .as_ref()
        .and_then(|extra| extra.get(EXTRA_POD_NAME))
        .and_then(|names| names.first())
        .ok_or_else(|| {
            forbidden(
                "the token is not bound to a pod (use the projected token the webhook mounts)",
            )
        })?;
    Ok(Identity {
        namespace: namespace.to_owned(),
        service_account: account.to_owned(),
        pod: pod.clone(),
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
            let now = super::now_millis() / 1000;
            Duration::from_secs(exp.saturating_sub(now).min(24 * 3600))
        }
        None => DEFAULT_TRUST,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    #[test]
    fn a_pod_token_names_its_pod() {
        let user = UserInfo {
            username: Some("system:serviceaccount:shop:importer".into()),
            extra: Some([(EXTRA_POD_NAME.to_owned(), vec!["import-0".to_owned()])].into()),
            ..UserInfo::default()
        };
        assert_eq!(
            identity_of(&user),
            Ok(Identity {
                namespace: "shop".into(),
                service_account: "importer".into(),
                pod: "import-0".into()
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
            identity_of(&person).map_err(|r| r.status),
            Err(StatusCode::FORBIDDEN)
        );
        let unbound = UserInfo {
            username: Some("system:serviceaccount:shop:importer".into()),
            ..UserInfo::default()
        };
        assert_eq!(
            identity_of(&unbound).map_err(|r| r.reason),
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
        let exp = super::super::now_millis() / 1000 + 600;
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp}}}"#));
        let trust = trust_for(&format!("header.{payload}.signature"));
        assert!(trust <= Duration::from_secs(600) && trust >= Duration::from_secs(590));
        assert_eq!(trust_for("garbage"), DEFAULT_TRUST);
    }
}
