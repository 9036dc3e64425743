//! Every answer of the quota API that is not a grant: one variant per way a
//! call can fail, each knowing its HTTP status and its stable reason (the
//! `reason` of the JSON body, the `outcome` label of the refusal metric).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use saleslayer_contract::ErrorBody;

use super::MAX_BODY;

/// Why a call to `POST /v1/leases` got no grant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error(
        "this replica is not the leader; the quota Service routes to the leader, try again shortly"
    )]
    NotLeader,
    #[error(
        "the operator is starting and has not yet listed the cluster's integrations and pods; try again shortly"
    )]
    NotReady,
    #[error(
        "an Authorization: Bearer token is required (the pod's projected service-account token)"
    )]
    NoToken,
    #[error("the token is not valid for audience saleslayer-operator")]
    InvalidToken,
    #[error("{0}")]
    NotAPodToken(&'static str),
    #[error(
        "the token was issued for pod {namespace}/{pod} (uid {token_uid}), which no longer exists"
    )]
    PodGone {
        namespace: String,
        pod: String,
        token_uid: String,
    },
    #[error("the token could not be checked right now; retry")]
    TokenReviewFailed,
    #[error("too many failed authentications from this client; retry in {retry_after_seconds} s")]
    TooManyFailures { retry_after_seconds: u64 },
    #[error(
        "pod {namespace}/{pod} renews again too soon (at most every 250 ms); retry in {retry_after_millis} ms"
    )]
    TooFrequent {
        namespace: String,
        pod: String,
        retry_after_millis: u64,
    },
    #[error("the report is larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("the body could not be read: {0}")]
    UnreadableBody(String),
    #[error("the body is not a lease request: {0}")]
    MalformedReport(String),
    #[error("the token belongs to pod {token}, not {body}")]
    NotYourPod { token: String, body: String },
    #[error("no SalesLayerIntegration {namespace}/{name}")]
    UnknownIntegration { namespace: String, name: String },
    #[error(
        "job {job:?} is not registered in {namespace}/{integration}; registered jobs: {registered}"
    )]
    UnknownJob {
        namespace: String,
        integration: String,
        job: String,
        registered: String,
    },
    #[error("SalesLayerIntegration {namespace}/{integration} is not ready: {message}")]
    IntegrationNotReady {
        namespace: String,
        integration: String,
        message: String,
    },
    #[error("pod {namespace}/{pod} does not carry labels {label_integration}={integration} and {label_job}={job}", label_integration = saleslayer_contract::LABEL_INTEGRATION, label_job = saleslayer_contract::LABEL_JOB)]
    PodNotInJob {
        namespace: String,
        pod: String,
        integration: String,
        job: String,
    },
    #[error("the quota API's state is unavailable")]
    Internal,
}

impl QuotaError {
    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotLeader | Self::NotReady | Self::TokenReviewFailed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::NoToken | Self::InvalidToken | Self::PodGone { .. } => StatusCode::UNAUTHORIZED,
            Self::NotAPodToken(_) | Self::NotYourPod { .. } | Self::PodNotInJob { .. } => {
                StatusCode::FORBIDDEN
            }
            Self::TooManyFailures { .. } | Self::TooFrequent { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnreadableBody(_) | Self::MalformedReport(_) => StatusCode::BAD_REQUEST,
            Self::UnknownIntegration { .. } | Self::UnknownJob { .. } => StatusCode::NOT_FOUND,
            Self::IntegrationNotReady { .. } => StatusCode::CONFLICT,
        }
    }

    /// The stable reason: the body's `reason` and the refusal metric's label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotLeader => "NotLeader",
            Self::NotReady => "NotReady",
            Self::NoToken => "NoToken",
            Self::InvalidToken => "InvalidToken",
            Self::NotAPodToken(_) => "NotAPodToken",
            Self::PodGone { .. } => "PodGone",
            Self::TokenReviewFailed => "TokenReviewFailed",
            Self::TooManyFailures { .. } => "TooManyFailures",
            Self::TooFrequent { .. } => "TooFrequent",
            Self::BodyTooLarge => "BodyTooLarge",
            Self::UnreadableBody(_) => "UnreadableBody",
            Self::MalformedReport(_) => "MalformedReport",
            Self::NotYourPod { .. } => "NotYourPod",
            Self::UnknownIntegration { .. } => "UnknownIntegration",
            Self::UnknownJob { .. } => "UnknownJob",
            Self::IntegrationNotReady { .. } => "IntegrationNotReady",
            Self::PodNotInJob { .. } => "PodNotInJob",
            Self::Internal => "Internal",
        }
    }

    /// Seconds a client should wait before it calls again, when the answer says so.
    fn retry_after_seconds(&self) -> Option<u64> {
        match self {
            Self::NotLeader | Self::NotReady | Self::TokenReviewFailed => Some(1),
            Self::TooManyFailures {
                retry_after_seconds,
            } => Some(*retry_after_seconds),
            Self::TooFrequent {
                retry_after_millis, ..
            } => Some(retry_after_millis.div_ceil(1000).max(1)),
            _ => None,
        }
    }
}

impl IntoResponse for QuotaError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.to_string(),
            reason: self.reason().to_owned(),
        };
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_seconds()
            && let Ok(value) = seconds.to_string().parse()
        {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_its_status_and_reason() {
        let cases = [
            (QuotaError::NotLeader, 503, "NotLeader"),
            (QuotaError::NotReady, 503, "NotReady"),
            (QuotaError::NoToken, 401, "NoToken"),
            (QuotaError::InvalidToken, 401, "InvalidToken"),
            (QuotaError::NotAPodToken("x"), 403, "NotAPodToken"),
            (QuotaError::BodyTooLarge, 413, "BodyTooLarge"),
            (
                QuotaError::MalformedReport("x".into()),
                400,
                "MalformedReport",
            ),
            (QuotaError::Internal, 500, "Internal"),
            (
                QuotaError::TooManyFailures {
                    retry_after_seconds: 2,
                },
                429,
                "TooManyFailures",
            ),
            (
                QuotaError::TooFrequent {
                    namespace: "shop".into(),
                    pod: "a".into(),
                    retry_after_millis: 1,
                },
                429,
                "TooFrequent",
            ),
        ];
        for (error, status, reason) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.reason(), reason);
        }
    }

    #[tokio::test]
    async fn a_refusal_is_a_json_body_with_retry_after_when_waiting_helps() {
        let too_frequent = QuotaError::TooFrequent {
            namespace: "shop".into(),
            pod: "a".into(),
            retry_after_millis: 700,
        };
        for (error, status, retry_after, reason, says) in [
            (QuotaError::NotReady, 503, "1", "NotReady", "try again"),
            (too_frequent, 429, "1", "TooFrequent", "retry in 700 ms"),
        ] {
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(
                response.headers().get(axum::http::header::RETRY_AFTER),
                Some(&axum::http::HeaderValue::from_static(retry_after))
            );
            let bytes = axum::body::to_bytes(response.into_body(), 4096)
                .await
                .expect("body");
            let body: ErrorBody = serde_json::from_slice(&bytes).expect("JSON error body");
            assert_eq!(body.reason, reason);
            assert!(body.error.contains(says), "{}", body.error);
        }
    }
}
