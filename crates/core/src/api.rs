//! The custom resources (group `saleslayer.io`, `v1alpha1`), exactly as
//! DESIGN.md §3 describes them: the cluster-scoped `SalesLayerAccount` (the
//! budget, owned by the platform team) and the namespaced
//! `SalesLayerIntegration` (the jobs of one team on an account).
//!
//! This module owns the wire shape of the API: field names, defaults, and the
//! validation the API server enforces (OpenAPI bounds and CEL rules, each on
//! the narrowest object it concerns, every list and string bounded so the
//! rules' estimated cost stays finite). It holds no logic beyond defaults and
//! the CRD YAML generated from these types; `plan::validate` turns a spec
//! into a validated form before planning.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// The most jobs one integration may register (bounds CEL cost and status size).
pub const MAX_JOBS: usize = 64;

/// A team's integration with one Sales Layer account: the jobs that share
/// the account's budget.
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
    /// The `SalesLayerAccount` whose budget the jobs share.
    #[schemars(length(min = 1, max = 253))]
    pub account: String,
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

/// A Sales Layer account: its rate limit and who may use it. Cluster-scoped
/// and owned by the platform team; integrations name it in `spec.account`.
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats the same keys"
)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "saleslayer.io",
    version = "v1alpha1",
    kind = "SalesLayerAccount",
    plural = "saleslayeraccounts",
    shortname = "sla",
    status = "SalesLayerAccountStatus",
    printcolumn(name = "Limit", type_ = "string", json_path = ".status.summary.limit"),
    printcolumn(
        name = "Usable",
        type_ = "string",
        json_path = ".status.summary.usable"
    ),
    printcolumn(
        name = "Effective",
        type_ = "string",
        json_path = ".status.summary.effective"
    ),
    printcolumn(
        name = "Integrations",
        type_ = "integer",
        json_path = ".status.integrations"
    ),
    printcolumn(name = "Pods", type_ = "integer", json_path = ".status.pods"),
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
pub struct SalesLayerAccountSpec {
    /// The account's rate limit (default: the documented 50 requests per 10 s).
    #[serde(default)]
    pub limit: RateLimit,
    /// Share of the limit kept unused: usable = floor(requests * (100 - headroom) / 100).
    #[serde(default = "default_headroom")]
    #[schemars(range(min = 0, max = 90))]
    pub headroom_percent: u32,
    /// The namespaces whose integrations may use this account (default: all).
    #[serde(default)]
    pub allowed_namespaces: AllowedNamespaces,
    /// How the budget adapts when Sales Layer throttles anyway.
    #[serde(default)]
    pub adaptive: AdaptivePolicy,
    /// The status codes that mean "throttled" (Sales Layer documents none).
    #[serde(default = "default_throttle_statuses")]
    #[schemars(length(min = 1, max = 8), inner(range(min = 100, max = 599)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub throttle_statuses: Vec<u16>,
}

/// Which namespaces may use an account.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.from != 'Selector' || has(self.selector)")
    .message("allowedNamespaces.selector is required when from is Selector"))]
pub struct AllowedNamespaces {
    /// `All` (the default) or `Selector`.
    #[serde(default)]
    pub from: NamespacesFrom,
    /// With `from: Selector`: the labels a namespace must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// Where an account's integrations may live.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum NamespacesFrom {
    #[default]
    All,
    Selector,
}

/// Additive increase, multiplicative decrease of the effective budget over
/// the account's windows (one window = one period of the limit).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AdaptivePolicy {
    /// Adapt at all (default true); off, effective is always usable.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The most a window with throttled responses cuts: effective goes to what
    /// got through less one request, but never below effective * (100 -
    /// decreasePercent) / 100.
    #[serde(default = "default_decrease")]
    #[schemars(range(min = 1, max = 90))]
    pub decrease_percent: u32,
    /// A clean window: effective += increasePerWindow, up to usable (for
    /// holdWindows after a decrease, up to just below the level that was
    /// throttled).
    #[serde(default = "default_increase")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub increase_per_window: u32,
    /// Effective never goes below this share of usable.
    #[serde(default = "default_min_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub min_percent: u32,
    /// Windows after a decrease during which clean windows climb no higher
    /// than just below the level that was throttled; then they probe past it.
    #[serde(default = "default_hold_windows")]
    #[schemars(range(min = 0, max = 10_000))]
    pub hold_windows: u32,
}

impl Default for AdaptivePolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            decrease_percent: default_decrease(),
            increase_per_window: default_increase(),
            min_percent: default_min_percent(),
            hold_windows: default_hold_windows(),
        }
    }
}

/// What the controller observed and decided about an account.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SalesLayerAccountStatus {
    /// The generation of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The limit after headroom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usable: Option<UsableStatus>,
    /// What the allocation splits now: usable, lowered while Sales Layer throttles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective: Option<UsableStatus>,
    /// Integrations allowed on the account.
    #[serde(default)]
    pub integrations: u32,
    /// Their registered jobs.
    #[serde(default)]
    pub jobs: u32,
    /// Their live pods.
    #[serde(default)]
    pub pods: u32,
    /// When a response on the account was last throttled (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_throttled: Option<String>,
    /// `Ready`, `Adapting`.
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,
    /// Display values for `kubectl get sla`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<AccountSummary>,
}

/// Values shaped for the account's printer columns.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AccountSummary {
    /// e.g. `50/10s`.
    pub limit: String,
    pub usable: String,
    pub effective: String,
    /// `none`, or the consecutive windows with throttled responses.
    pub throttling: String,
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
    /// Requests each pod may have in flight (at least 1, even when the job
    /// has more pods than its maxConcurrency: see `ConcurrencyExceeded`).
    #[serde(default)]
    pub max_concurrency: u32,
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
fn default_true() -> bool {
    true
}
fn default_decrease() -> u32 {
    30
}
fn default_increase() -> u32 {
    1
}
fn default_min_percent() -> u32 {
    25
}
fn default_hold_windows() -> u32 {
    30
}
fn default_throttle_statuses() -> Vec<u16> {
    vec![429]
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

/// Where each CRD is committed, relative to the repository: `crds/<file>`.
pub const CRD_FILES: [&str; 2] = [
    "saleslayer.io_saleslayeraccounts.yaml",
    "saleslayer.io_saleslayerintegrations.yaml",
];

/// The CRDs to install, in the order of [`CRD_FILES`]: the derived ones,
/// without the integer formats the API server does not know (`uint32`,
/// `uint16`), which make `kubectl apply` warn. The bounds that matter are
/// explicit `minimum`/`maximum` values.
pub fn crds() -> [CustomResourceDefinition; 2] {
    let mut crds = [SalesLayerAccount::crd(), SalesLayerIntegration::crd()];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(schema) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                strip_unsigned_formats(schema);
            }
        }
    }
    crds
}

fn strip_unsigned_formats(schema: &mut JSONSchemaProps) {
    if matches!(
        schema.format.as_deref(),
        Some("uint32" | "uint64" | "uint8" | "uint16")
    ) {
        schema.format = None;
    }
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        strip_unsigned_formats(child);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        strip_unsigned_formats(items);
    }
}

/// One CRD as YAML, as `crds/` holds it.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(crd)
}

/// Every CRD as one multi-document YAML stream, as `saleslayer-operator crd` prints it.
pub fn crds_yaml() -> Result<String, serde_saphyr::ser::Error> {
    let docs = crds().iter().map(crd_yaml).collect::<Result<Vec<_>, _>>()?;
    Ok(docs
        .iter()
        .map(|doc| format!("---\n{doc}"))
        .collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crds_match_the_types() {
        let committed = [
            include_str!("../../../crds/saleslayer.io_saleslayeraccounts.yaml"),
            include_str!("../../../crds/saleslayer.io_saleslayerintegrations.yaml"),
        ];
        for (crd, committed) in crds().iter().zip(committed) {
            let generated = crd_yaml(crd).expect("the CRD serialises");
            assert!(
                committed == generated,
                "crds/ is stale: run `make crds` and commit the result"
            );
        }
    }

    #[test]
    fn account_defaults_are_the_documented_limit_and_policy() {
        let spec: SalesLayerAccountSpec = serde_json::from_str("{}").expect("an empty spec parses");
        assert_eq!(
            spec.limit,
            RateLimit {
                requests: 50,
                period_seconds: 10
            }
        );
        assert_eq!(spec.headroom_percent, 20);
        assert_eq!(spec.allowed_namespaces.from, NamespacesFrom::All);
        assert_eq!(spec.adaptive, AdaptivePolicy::default());
        assert_eq!(
            (
                spec.adaptive.enabled,
                spec.adaptive.decrease_percent,
                spec.adaptive.increase_per_window,
                spec.adaptive.min_percent
            ),
            (true, 30, 1, 25)
        );
        assert_eq!(spec.throttle_statuses, vec![429]);
    }

    #[test]
    fn integration_defaults() {
        let spec: SalesLayerIntegrationSpec =
            serde_json::from_str(r#"{"account":"acme","jobs":[{"name":"a"}]}"#)
                .expect("a minimal spec parses");
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
