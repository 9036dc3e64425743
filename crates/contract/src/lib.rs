//! The pod contract (DESIGN.md §5–§6): everything a pod and the operator
//! agree on, and nothing else. Labels and annotations, the variables the
//! webhook injects, the paths it mounts, the JSON of the limit annotation, and
//! the quota API's wire types.
//!
//! ```text
//!  operator (webhook, controller, quota API) ──writes──▶ this contract ◀──reads── sidecar, clients
//! ```
//!
//! May import: serde, serde_json. Never: a Kubernetes client or type, an
//! async runtime, a clock, I/O. A workload's client in Rust can depend on
//! this crate alone.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// API group of every resource, label and annotation of the operator.
pub const GROUP: &str = "saleslayer.io";
/// Pod label naming the integration a pod belongs to.
pub const LABEL_INTEGRATION: &str = "saleslayer.io/integration";
/// Pod label naming the registered job a pod runs.
pub const LABEL_JOB: &str = "saleslayer.io/job";
/// Pod annotation with the pod's current share, as a [`Limit`] in JSON.
pub const ANNOTATION_LIMIT: &str = "saleslayer.io/limit";
/// Annotation naming the containers to inject (comma-separated); all when absent.
pub const ANNOTATION_CONTAINERS: &str = "saleslayer.io/containers";
/// Annotation recording what the webhook injected.
pub const ANNOTATION_INJECTED: &str = "saleslayer.io/injected";
/// Annotation asking for the pacing sidecar: `"true"` or `"false"`.
pub const ANNOTATION_PROXY: &str = "saleslayer.io/proxy";

/// Name of the ConfigMap holding the operator's CA, published in every namespace with an integration.
pub const CA_CONFIGMAP: &str = "saleslayer-operator-ca";
/// The key of the CA certificate in that ConfigMap.
pub const CA_CONFIGMAP_KEY: &str = "ca.crt";
/// Audience of the projected service-account token the quota API accepts.
pub const TOKEN_AUDIENCE: &str = "saleslayer-operator";

/// Name of the injected sidecar (an init container with `restartPolicy: Always`).
pub const PROXY_CONTAINER: &str = "saleslayer-proxy";
/// The sidecar's program inside the operator's image.
pub const PROXY_COMMAND: &str = "/usr/local/bin/saleslayer-sidecar";
/// Where the sidecar listens for the workload's requests.
pub const PROXY_BIND: &str = "127.0.0.1:8787";
/// Where the workload reaches the sidecar: `SALESLAYER_API_URL`.
pub const PROXY_URL: &str = "http://127.0.0.1:8787";
/// The sidecar's `/metrics` and `/healthz` port.
pub const PROXY_METRICS_PORT: u16 = 8788;

/// The directory of the downward-API limit file.
pub const LIMIT_DIR: &str = "/etc/saleslayer";
/// The limit file: the pod's [`ANNOTATION_LIMIT`], kept current by the kubelet.
pub const LIMIT_FILE: &str = "/etc/saleslayer/limit";
/// The directory of the projected token and the CA.
pub const QUOTA_DIR: &str = "/var/run/saleslayer";
/// The pod's projected service-account token for the quota API.
pub const TOKEN_FILE: &str = "/var/run/saleslayer/token";
/// The CA that signs the quota API's certificate.
pub const CA_FILE: &str = "/var/run/saleslayer/ca.crt";

/// The quota API's one route.
pub const LEASES_PATH: &str = "/v1/leases";

/// The variables the webhook injects into every targeted container.
pub mod env {
    pub const INTEGRATION: &str = "SALESLAYER_INTEGRATION";
    pub const JOB: &str = "SALESLAYER_JOB";
    pub const ACCOUNT: &str = "SALESLAYER_ACCOUNT";
    /// This pod's share at admission.
    pub const RATE_REQUESTS: &str = "SALESLAYER_RATE_REQUESTS";
    pub const RATE_PERIOD_MS: &str = "SALESLAYER_RATE_PERIOD_MS";
    /// The whole job's allocation.
    pub const JOB_RATE_REQUESTS: &str = "SALESLAYER_JOB_RATE_REQUESTS";
    pub const JOB_RATE_PERIOD_MS: &str = "SALESLAYER_JOB_RATE_PERIOD_MS";
    /// This pod's share of the job's concurrency (at least 1).
    pub const MAX_CONCURRENCY: &str = "SALESLAYER_MAX_CONCURRENCY";
    pub const RETRY_MAX_ATTEMPTS: &str = "SALESLAYER_RETRY_MAX_ATTEMPTS";
    pub const RETRY_BASE_DELAY_MS: &str = "SALESLAYER_RETRY_BASE_DELAY_MS";
    pub const RETRY_MAX_DELAY_MS: &str = "SALESLAYER_RETRY_MAX_DELAY_MS";
    /// Status codes that mean "throttled" on this account, comma-separated.
    pub const THROTTLE_STATUSES: &str = "SALESLAYER_THROTTLE_STATUSES";
    pub const LIMIT_FILE: &str = "SALESLAYER_LIMIT_FILE";
    pub const QUOTA_URL: &str = "SALESLAYER_QUOTA_URL";
    pub const TOKEN_FILE: &str = "SALESLAYER_TOKEN_FILE";
    pub const CA_FILE: &str = "SALESLAYER_CA_FILE";
    /// Set in app containers of pods with the sidecar: where to send requests.
    pub const API_URL: &str = "SALESLAYER_API_URL";
    /// Set in the sidecar: where it forwards.
    pub const UPSTREAM: &str = "SALESLAYER_UPSTREAM";
    /// Set in the sidecar from the downward API.
    pub const POD_NAME: &str = "POD_NAME";
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
}

/// What one pod may send: the JSON of its `saleslayer.io/limit` annotation
/// and limit file, `{"requests":12,"periodMillis":10000,"maxConcurrency":2}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limit {
    pub requests: u32,
    pub period_millis: u64,
    pub max_concurrency: u32,
}

impl Limit {
    /// The annotation's value.
    pub fn to_json(self) -> String {
        format!(
            r#"{{"requests":{},"periodMillis":{},"maxConcurrency":{}}}"#,
            self.requests, self.period_millis, self.max_concurrency
        )
    }
}

/// A pod's call to the quota API: who it is and what it did since its
/// previous call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseReport {
    pub namespace: String,
    pub integration: String,
    pub job: String,
    pub pod: String,
    #[serde(default)]
    pub usage: Usage,
}

/// Usage since the previous call. Every counter is what one pod says of
/// itself; the operator trusts none of it beyond that pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Requests sent upstream, retries included.
    #[serde(default)]
    pub requests: u64,
    /// Answers by status code.
    #[serde(default)]
    pub by_status: BTreeMap<String, u64>,
    /// Answers that were throttling (by the account's throttle statuses).
    #[serde(default)]
    pub throttled: u64,
    #[serde(default)]
    pub retries: u64,
    #[serde(default)]
    pub peak_concurrency: u64,
    /// Unmet demand: requests waiting for capacity now (a gauge).
    #[serde(default)]
    pub queued: u64,
    /// How long the pod has had nothing to do, up to now: no request waiting,
    /// none in flight, none started (a gauge; 0 while it works). Once it
    /// reaches [`idle_after`] of the limit's period, the pod wants nothing,
    /// whatever it sent earlier in the interval this report covers.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub idle_millis: u64,
    /// Sends the pod's grant allowed while throttled answers held its whole
    /// gate, which it therefore did not make: the grant's rate times the time
    /// held. A 429 costs a pod far more than the one refused request, and the
    /// account's adaptation counts both to size its cut (DESIGN.md §3a).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_back: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// How long a pod must have had nothing to do before it counts as idle under a
/// limit of `period_millis`: half a period, between 500 ms and 5 s. The
/// sidecar renews as soon as it turns idle, and again as soon as work waits.
pub fn idle_after(period_millis: u64) -> u64 {
    (period_millis / 2).clamp(500, 5_000)
}

/// Whether a pod with `queued` requests waiting, and nothing to do for
/// `idle_millis`, is idle under a limit of `period_millis`: it wants nothing.
pub fn is_idle(queued: u64, idle_millis: u64, period_millis: u64) -> bool {
    queued == 0 && idle_millis >= idle_after(period_millis)
}

/// The least time between two lease calls of one pod that the quota API
/// accepts. A sidecar leaves at least twice this between its calls.
pub const MIN_RENEWAL_INTERVAL_MILLIS: u64 = 250;

/// The quota API's answer: the pod's grant until `ttlMillis` from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseGrant {
    pub requests: u32,
    pub period_millis: u64,
    pub max_concurrency: u32,
    pub ttl_millis: u64,
    pub refresh_millis: u64,
}

impl LeaseGrant {
    /// The grant as a limit to pace by.
    pub fn limit(self) -> Limit {
        Limit {
            requests: self.requests,
            period_millis: self.period_millis,
            max_concurrency: self.max_concurrency,
        }
    }
}

/// The body of every error the operator's HTTP APIs answer:
/// `{"error": "<sentence>", "reason": "<StableReason>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub reason: String,
}

/// What counts as throttling when an account names nothing else (DESIGN.md §3a).
pub const DEFAULT_THROTTLE_STATUSES: [u16; 1] = [429];

/// Read `SALESLAYER_THROTTLE_STATUSES`: status codes from 400 to 599
/// separated by commas (`429,503`). An empty list is an error: a pod that
/// counts nothing as throttling would never back off.
pub fn parse_throttle_statuses(text: &str) -> Result<Vec<u16>, String> {
    let codes = text
        .split(',')
        .map(str::trim)
        .filter(|code| !code.is_empty())
        .map(|code| {
            code.parse::<u16>()
                .ok()
                .filter(|c| (400..=599).contains(c))
                .ok_or_else(|| format!("{code:?} is not a status from 400 to 599"))
        })
        .collect::<Result<Vec<u16>, String>>()?;
    if codes.is_empty() {
        return Err("no status given; the default is 429".into());
    }
    Ok(codes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_annotation_reads_as_documented() {
        let limit = Limit {
            requests: 12,
            period_millis: 10_000,
            max_concurrency: 2,
        };
        assert_eq!(
            limit.to_json(),
            r#"{"requests":12,"periodMillis":10000,"maxConcurrency":2}"#
        );
        let parsed: Limit = serde_json::from_str(&limit.to_json()).expect("round trip");
        assert_eq!(parsed, limit);
    }

    #[test]
    fn a_report_parses_from_the_documented_example() {
        let body = r#"{"namespace":"shop","integration":"catalog","job":"price-sync","pod":"price-sync-7d9f-x2","usage":{"requests":10,"byStatus":{"200":8,"429":2},"throttled":2,"retries":1,"peakConcurrency":2,"queued":5}}"#;
        let report: LeaseReport = serde_json::from_str(body).expect("documented shape");
        assert_eq!(report.usage.by_status.get("429"), Some(&2));
        assert_eq!(report.usage.queued, 5);
        let minimal: LeaseReport =
            serde_json::from_str(r#"{"namespace":"a","integration":"b","job":"c","pod":"d"}"#)
                .expect("usage is optional");
        assert_eq!(minimal.usage, Usage::default());
    }

    #[test]
    fn throttle_statuses_read_as_the_variable_documents() {
        assert_eq!(parse_throttle_statuses(" 429, 503 ,"), Ok(vec![429, 503]));
        for bad in ["", " , ", "abc", "200", "600", "429,70000", "-1"] {
            assert!(parse_throttle_statuses(bad).is_err(), "{bad:?}");
        }
    }
}
