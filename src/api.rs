//! The `SalesLayerIntegration` custom resource (group `saleslayer.io`,
//! `v1alpha1`), exactly as DESIGN.md §3 describes it.
//!
//! This module owns the wire shape of the API: field names, defaults, and the
//! validation the API server enforces (OpenAPI bounds and CEL rules, each on
//! the narrowest object it concerns, every list and string bounded so the
//! rules' estimated cost stays finite). It holds no logic beyond defaults and
//! the labels/annotations of the pod contract; the controller turns a spec
//! into a validated form before planning.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of every resource, label and annotation of the operator.
pub const GROUP: &str = "saleslayer.io";
/// Pod label naming the integration a pod belongs to.
pub const LABEL_INTEGRATION: &str = "saleslayer.io/integration";
/// Pod label naming the registered job a pod runs.
pub const LABEL_JOB: &str = "saleslayer.io/job";
/// Pod annotation with the pod's current share, as JSON (DESIGN.md §5).
pub const ANNOTATION_LIMIT: &str = "saleslayer.io/limit";

/// The most jobs one integration may register (bounds CEL cost and status size).
pub const MAX_JOBS: usize = 64;

/// A company's integration with one Sales Layer account: the account's
/// budget and the jobs that share it.
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats the same keys"
)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "saleslayer.io",
    version = "v1alpha1",
    kind = "SalesLayerIntegration",
    plural = "saleslayerintegrations",
    shortname = "sli",
    namespaced,
    status = "SalesLayerIntegrationStatus",
    printcolumn(name = "Account", type_ = "string", json_path = ".spec.account"),
    printcolumn(
        name = "Usable",
        type_ = "string",
        json_path = ".status.summary.usable"
    ),
    printcolumn(name = "Jobs", type_ = "integer", json_path = ".status.summary.jobs"),
    printcolumn(name = "Pods", type_ = "integer", json_path = ".status.summary.pods"),
    printcolumn(
        name = "Throttling",
        type_ = "string",
        json_path = ".status.summary.throttling"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SalesLayerIntegrationSpec {
    /// The budget key: every integration naming this account shares one budget.
    #[schemars(length(min = 1, max = 253))]
    pub account: String,
    /// The account's rate limit (default: the documented 50 requests per 10 s).
    #[serde(default)]
    pub limit: RateLimit,
    /// Share of the limit kept unused: usable = floor(requests * (100 - headroom) / 100).
    #[serde(default = "default_headroom")]
    #[schemars(range(min = 0, max = 90))]
    pub headroom_percent: u32,
    /// Lend the share of jobs with no live pods to busy jobs (off by default).
    #[serde(default)]
    pub lend_idle_capacity: bool,
    /// The registered jobs, keyed by name.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(validation = kube::core::Rule::new("self.all(j, self.exists_one(k, k.name == j.name))")
        .message("job names must be unique"))]
    pub jobs: Vec<JobSpec>,
    /// How pods retry throttled requests.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// When persistent throttling raises an alert, and whom it notifies.
    #[serde(default)]
    pub alerting: Alerting,
}

/// Requests per period.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Requests allowed per period (at least 1).
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests: u32,
    /// Length of the period in seconds (at least 1).
    #[schemars(range(min = 1, max = 86_400))]
    pub period_seconds: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            requests: 50,
            period_seconds: 10,
        }
    }
}

/// One registered job: a workload that sends requests on the account.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.minRequests) || !has(self.maxRequests) || self.minRequests <= self.maxRequests"
).message("minRequests must not exceed maxRequests"))]
pub struct JobSpec {
    /// The job's name, a DNS label; pods name it in the `saleslayer.io/job` label.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Relative share of what remains after floors (0 = floor only).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 10_000))]
    pub weight: u32,
    /// Requests per period the job always gets (its floor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub min_requests: Option<u32>,
    /// Requests per period the job never exceeds (its cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_requests: Option<u32>,
    /// Requests in flight at once across all the job's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_concurrency: Option<u32>,
}

/// Exponential backoff for throttled requests.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.baseDelayMillis <= self.maxDelayMillis")
    .message("baseDelayMillis must not exceed maxDelayMillis"))]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 to 10).
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: u32,
    /// Delay before the first retry.
    #[serde(default = "default_base_delay")]
    #[schemars(range(min = 1, max = 600_000))]
    pub base_delay_millis: u32,
    /// Longest delay between two attempts.
    #[serde(default = "default_max_delay")]
    #[schemars(range(min = 1, max = 600_000))]
    pub max_delay_millis: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            base_delay_millis: default_base_delay(),
            max_delay_millis: default_max_delay(),
        }
    }
}

/// Persistent-throttling alerts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Alerting {
    /// Throttled in this many consecutive windows = persistent.
    #[serde(default = "default_persistent_windows")]
    #[schemars(range(min = 1, max = 10_000))]
    pub persistent_windows: u32,
    /// Where to POST a JSON notification when the alert fires and resolves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
}

impl Default for Alerting {
    fn default() -> Self {
        Self {
            persistent_windows: default_persistent_windows(),
            notify: None,
        }
    }
}

/// A notification target kept in a Secret (the URL is a credential).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Notify {
    /// The Secret key that holds the webhook URL.
    pub secret_ref: SecretKeyRef,
}

/// A key of a Secret in the integration's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// What the controller observed and decided.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SalesLayerIntegrationStatus {
    /// The generation of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The account's usable budget after headroom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usable: Option<UsableStatus>,
    /// Per-job allocations and per-pod shares.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub jobs: Vec<JobStatus>,
    /// `Ready`, `Overcommitted`, `AccountShared`, `PersistentThrottling`.
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub conditions: Vec<Condition>,
    /// Display values for `kubectl get sli`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<StatusSummary>,
}

/// The usable budget: requests per period.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UsableStatus {
    pub requests: u32,
    pub period_seconds: u32,
}

/// One job's allocation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    pub name: String,
    /// Requests per period the job may send, all its pods together.
    pub allocated_requests: u32,
    /// Live pods of the job.
    pub pods: u32,
    /// What each pod may send.
    pub per_pod: PerPodStatus,
    /// Consecutive windows with throttled responses.
    #[serde(default)]
    pub throttled_windows: u32,
    /// When a response of this job was last throttled (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_throttled: Option<String>,
}

/// One pod's share.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PerPodStatus {
    pub requests: u32,
    pub period_millis: u64,
}

/// Values shaped for the printer columns.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StatusSummary {
    /// e.g. `40/10s`.
    pub usable: String,
    pub jobs: u32,
    pub pods: u32,
    /// `none`, or the jobs throttled persistently.
    pub throttling: String,
}

fn default_headroom() -> u32 {
    20
}
fn default_weight() -> u32 {
    1
}
fn default_max_attempts() -> u32 {
    4
}
fn default_base_delay() -> u32 {
    1000
}
fn default_max_delay() -> u32 {
    8000
}
fn default_persistent_windows() -> u32 {
    6
}

/// The CRD to install: the derived one, without the integer formats the API
/// server does not know (`uint32`, `uint64`), which make `kubectl apply` warn.
/// The bounds that matter are explicit `minimum`/`maximum` values.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    let mut crd = SalesLayerIntegration::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            strip_unsigned_formats(schema);
        }
    }
    crd
}

fn strip_unsigned_formats(
    schema: &mut k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
) {
    if matches!(
        schema.format.as_deref(),
        Some("uint32" | "uint64" | "uint8" | "uint16")
    ) {
        schema.format = None;
    }
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        strip_unsigned_formats(child);
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items)) =
        schema.items.as_mut()
    {
        strip_unsigned_formats(items);
    }
}

/// The CRD as YAML, as `saleslayer-operator crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(&crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crd_matches_the_types() {
        let committed = include_str!("../crds/saleslayer.io_saleslayerintegrations.yaml");
        let generated = crd_yaml().expect("the CRD serialises");
        assert!(
            committed == generated,
            "crds/ is stale: run `make crds` and commit the result"
        );
    }

    #[test]
    fn defaults_are_the_documented_limit() {
        let spec: SalesLayerIntegrationSpec =
            serde_json::from_str(r#"{"account":"acme","jobs":[{"name":"a"}]}"#)
                .expect("a minimal spec parses");
        assert_eq!(
            spec.limit,
            RateLimit {
                requests: 50,
                period_seconds: 10
            }
        );
        assert_eq!(spec.headroom_percent, 20);
        assert!(!spec.lend_idle_capacity);
        assert_eq!(
            spec.retry,
            RetryPolicy {
                max_attempts: 4,
                base_delay_millis: 1000,
                max_delay_millis: 8000
            }
        );
        assert_eq!(spec.alerting.persistent_windows, 6);
        assert_eq!(spec.jobs[0].weight, 1);
    }
}
