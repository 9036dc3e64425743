//! The admission decision for one pod, as a pure function: from the
//! AdmissionRequest and a read-only view of the integrations to either a JSON
//! Patch that injects the pod's share (DESIGN.md §5) or a denial that names
//! what is missing and what exists.
//!
//! No I/O and no clock: the view is answered from the controller's in-memory
//! stores. The patch is the difference between the pod as received and the
//! pod with everything injected, so a pod that already carries it all (a
//! re-invoked webhook) gets an empty patch.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, DownwardAPIVolumeFile,
    DownwardAPIVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector,
    Pod, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::admission::{AdmissionRequest, AdmissionResponse};
use serde::Serialize;

use saleslayer_contract::{
    ANNOTATION_CONTAINERS, ANNOTATION_INJECTED, ANNOTATION_LIMIT, ANNOTATION_PROXY, CA_CONFIGMAP,
    CA_CONFIGMAP_KEY, LABEL_INTEGRATION, LABEL_JOB, LIMIT_DIR, Limit, PROXY_COMMAND,
    PROXY_CONTAINER, PROXY_METRICS_PORT, PROXY_URL, QUOTA_DIR, TOKEN_AUDIENCE, env,
};

use crate::account::AccountProblem;
use crate::plan::{AccountPlan, ValidatedIntegration};

const LIMIT_VOLUME: &str = "saleslayer-limit";
const QUOTA_VOLUME: &str = "saleslayer-quota";
/// The shortest expiry the API server allows; the kubelet refreshes it.
const TOKEN_SECONDS: i64 = 600;

/// What the webhook needs to know about the cluster, answered from memory.
pub trait IntegrationView {
    /// The valid integration `namespace/name`, if there is one.
    fn integration(&self, namespace: &str, name: &str) -> Option<ValidatedIntegration>;
    /// Names of the integrations in `namespace`, sorted (for denial messages).
    fn integrations_in(&self, namespace: &str) -> Vec<String>;
    /// Whether the view has seen the whole cluster yet: until then a missing
    /// integration may only be unseen, so no decision is made from it.
    fn ready(&self) -> bool {
        true
    }
    /// The account plan of `integration` with one more live pod of `job`,
    /// or why its account gives it nothing.
    fn plan_with_new_pod(
        &self,
        integration: &ValidatedIntegration,
        job: &str,
    ) -> Result<AccountPlan, AccountProblem>;
}

/// Settings that are the same for every pod.
#[derive(Debug, Clone)]
pub struct Injection {
    /// `SALESLAYER_QUOTA_URL`.
    pub quota_url: String,
    /// Image of the sidecar for pods annotated `saleslayer.io/proxy: "true"`.
    pub proxy_image: String,
    /// Where that sidecar forwards (the Sales Layer API).
    pub proxy_upstream: String,
}

/// Why a pod is refused; the message is shown to whoever created the pod,
/// the reason is the webhook metric's label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("the admission request carries no pod")]
    NoPod,
    #[error(
        "pod label {LABEL_INTEGRATION}={name:?} names no SalesLayerIntegration in namespace {namespace:?} (existing: {existing})"
    )]
    UnknownIntegration {
        namespace: String,
        name: String,
        existing: String,
    },
    #[error(
        "job {job:?} (label {LABEL_JOB}) is not registered in SalesLayerIntegration {namespace}/{integration}; registered jobs: {registered}"
    )]
    UnknownJob {
        namespace: String,
        integration: String,
        job: String,
        registered: String,
    },
    #[error(
        "pod has label {LABEL_INTEGRATION} but no {LABEL_JOB}; registered jobs of {namespace}/{integration}: {registered}"
    )]
    MissingJobLabel {
        namespace: String,
        integration: String,
        registered: String,
    },
    #[error(
        "no allocation for job {job:?} of {namespace}/{integration}; is its account's controller running?"
    )]
    NoAllocation {
        namespace: String,
        integration: String,
        job: String,
    },
    #[error("annotation {ANNOTATION_PROXY} is {0:?}; it must be \"true\" or \"false\"")]
    ProxyAnnotation(String),
    #[error(
        "annotation {ANNOTATION_CONTAINERS} names containers the pod does not have: {unknown} (the pod has: {existing})"
    )]
    UnknownContainers { unknown: String, existing: String },
    #[error("{0}")]
    Account(AccountProblem),
    #[error("saleslayer-operator could not build its patch: {0}")]
    Patch(String),
}

impl Denial {
    /// Stable reason: the metric label and the log field.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoPod => "NoPod",
            Self::UnknownIntegration { .. } => "UnknownIntegration",
            Self::UnknownJob { .. } => "UnknownJob",
            Self::MissingJobLabel { .. } => "MissingJobLabel",
            Self::NoAllocation { .. } => "NoAllocation",
            Self::ProxyAnnotation(_) => "ProxyAnnotation",
            Self::UnknownContainers { .. } => "UnknownContainers",
            Self::Account(problem) => problem.reason(),
            Self::Patch(_) => "Patch",
        }
    }
}

/// The whole decision: an allowed response with a patch, or a denial.
pub fn review(
    request: &AdmissionRequest<Pod>,
    view: &dyn IntegrationView,
    injection: &Injection,
) -> AdmissionResponse {
    response_for(request, patch_for(request, view, injection))
}

/// The admission response that carries `decision`.
pub fn response_for(
    request: &AdmissionRequest<Pod>,
    decision: Result<json_patch::Patch, Denial>,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    match decision {
        Ok(patch) if patch.0.is_empty() => response,
        Ok(patch) => match response.clone().with_patch(patch) {
            Ok(patched) => patched,
            Err(error) => response.deny(format!(
                "saleslayer-operator could not encode its patch: {error}"
            )),
        },
        Err(denial) => response.deny(denial.to_string()),
    }
}

/// The JSON Patch that injects the pod's share, or why the pod is refused.
pub fn patch_for(
    request: &AdmissionRequest<Pod>,
    view: &dyn IntegrationView,
    injection: &Injection,
) -> Result<json_patch::Patch, Denial> {
    let Some(pod) = request.object.as_ref() else {
        return Err(Denial::NoPod);
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let Some(integration_name) = labels.get(LABEL_INTEGRATION) else {
        // The objectSelector only sends labelled pods; anything else passes untouched.
        return Ok(json_patch::Patch(Vec::new()));
    };
    let Some(integration) = view.integration(&namespace, integration_name) else {
        let existing = view.integrations_in(&namespace);
        return Err(Denial::UnknownIntegration {
            namespace,
            name: integration_name.clone(),
            existing: list_or_none(&existing),
        });
    };
    let registered: Vec<String> = integration.jobs.iter().map(|j| j.name.clone()).collect();
    let job_name = match labels.get(LABEL_JOB) {
        Some(job) if registered.contains(job) => job.clone(),
        Some(job) => {
            return Err(Denial::UnknownJob {
                namespace,
                integration: integration_name.clone(),
                job: job.clone(),
                registered: list_or_none(&registered),
            });
        }
        None => {
            return Err(Denial::MissingJobLabel {
                namespace,
                integration: integration_name.clone(),
                registered: list_or_none(&registered),
            });
        }
    };

    let plan = view
        .plan_with_new_pod(&integration, &job_name)
        .map_err(Denial::Account)?;
    let key = crate::allocation::JobKey {
        namespace: namespace.clone(),
        integration: integration.name.clone(),
        job: job_name.clone(),
    };
    let Some(job) = plan.job(&key) else {
        return Err(Denial::NoAllocation {
            namespace,
            integration: integration_name.clone(),
            job: job_name,
        });
    };
    let share = Limit::from(job.per_pod);
    let proxy = wants_proxy(pod)?;

    let env = environment(
        &integration,
        &job_name,
        &plan,
        job.requests,
        share,
        injection,
    );
    let mut mutated = pod.clone();
    let targets = targets(pod)?;
    let spec = mutated.spec.get_or_insert_with(Default::default);
    let mut injected = Vec::new();
    let mut app_env = env.clone();
    if proxy {
        app_env.push(plain(env::API_URL, PROXY_URL.into()));
    }
    for container in spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut())
        .filter(|c| c.name != PROXY_CONTAINER)
    {
        if targets.as_ref().is_none_or(|t| t.contains(&container.name)) {
            inject_container(container, &app_env);
            injected.push(container.name.clone());
        }
    }
    if proxy {
        let init = spec.init_containers.get_or_insert_with(Vec::new);
        let sidecar = sidecar(&env, injection);
        // First, so init containers after it can use it too; replaced in place when there.
        match init.iter().position(|c| c.name == PROXY_CONTAINER) {
            Some(index) => init[index] = sidecar,
            None => init.insert(0, sidecar),
        }
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    upsert_by_name(volumes, limit_volume(), |v| &v.name);
    upsert_by_name(volumes, quota_volume(), |v| &v.name);

    let record = InjectedRecord {
        containers: injected,
        volumes: [LIMIT_VOLUME, QUOTA_VOLUME],
        proxy,
    };
    let annotations = mutated
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    annotations.insert(ANNOTATION_LIMIT.into(), share.to_json());
    annotations.insert(
        ANNOTATION_INJECTED.into(),
        serde_json::to_string(&record).unwrap_or_default(),
    );

    let before =
        serde_json::to_value(pod).map_err(|e| Denial::Patch(format!("reading the pod: {e}")))?;
    let after = serde_json::to_value(&mutated)
        .map_err(|e| Denial::Patch(format!("building the patch: {e}")))?;
    Ok(json_patch::diff(&before, &after))
}

#[derive(Serialize)]
struct InjectedRecord {
    containers: Vec<String>,
    volumes: [&'static str; 2],
    proxy: bool,
}

/// Whether the pod asks for the sidecar.
fn wants_proxy(pod: &Pod) -> Result<bool, Denial> {
    let value = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_PROXY));
    match value.map(|v| v.trim()) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Denial::ProxyAnnotation(other.to_owned())),
    }
}

fn plain(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }
}

fn field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// The pacing sidecar: the operator's image running `proxy`, a native
/// sidecar (`restartPolicy: Always`) with the pod's env, its identity from
/// the downward API, the same mounts, and the restricted security profile.
/// Its startup probe holds the workload back until it listens.
fn sidecar(env: &[EnvVar], injection: &Injection) -> Container {
    let mut container = Container {
        name: PROXY_CONTAINER.into(),
        image: Some(injection.proxy_image.clone()),
        command: Some(vec![PROXY_COMMAND.into()]),
        restart_policy: Some("Always".into()),
        ports: Some(vec![ContainerPort {
            name: Some("proxy-metrics".into()),
            container_port: i32::from(PROXY_METRICS_PORT),
            ..ContainerPort::default()
        }]),
        startup_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::Int(i32::from(PROXY_METRICS_PORT)),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(1),
            failure_threshold: Some(30),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("10m".into())),
                ("memory".into(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), Quantity("64Mi".into()))])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let mut vars = env.to_vec();
    vars.push(plain(env::UPSTREAM, injection.proxy_upstream.clone()));
    vars.push(field(env::POD_NAME, "metadata.name"));
    vars.push(field(env::POD_NAMESPACE, "metadata.namespace"));
    inject_container(&mut container, &vars);
    container
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The containers named in `saleslayer.io/containers`, each checked to exist.
fn targets(pod: &Pod) -> Result<Option<BTreeSet<String>>, Denial> {
    let Some(wanted) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_CONTAINERS))
    else {
        return Ok(None);
    };
    let spec = pod.spec.as_ref();
    let existing: Vec<String> = spec
        .into_iter()
        .flat_map(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(s.containers.iter())
        })
        .map(|c| c.name.clone())
        .collect();
    let wanted: BTreeSet<String> = wanted
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    let unknown: Vec<String> = wanted
        .iter()
        .filter(|n| !existing.contains(n))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(Denial::UnknownContainers {
            unknown: unknown.join(", "),
            existing: list_or_none(&existing),
        });
    }
    Ok(Some(wanted))
}

fn environment(
    integration: &ValidatedIntegration,
    job: &str,
    plan: &AccountPlan,
    job_requests: u32,
    share: Limit,
    injection: &Injection,
) -> Vec<EnvVar> {
    let pairs = [
        (env::INTEGRATION, integration.name.clone()),
        (env::JOB, job.to_owned()),
        (env::ACCOUNT, integration.account.clone()),
        (env::RATE_REQUESTS, share.requests.to_string()),
        (env::RATE_PERIOD_MS, share.period_millis.to_string()),
        (env::JOB_RATE_REQUESTS, job_requests.to_string()),
        (
            env::JOB_RATE_PERIOD_MS,
            plan.budget.period_millis.to_string(),
        ),
        (env::MAX_CONCURRENCY, share.max_concurrency.to_string()),
        (
            env::RETRY_MAX_ATTEMPTS,
            integration.retry.max_attempts.to_string(),
        ),
        (
            env::RETRY_BASE_DELAY_MS,
            integration.retry.base_delay_millis.to_string(),
        ),
        (
            env::RETRY_MAX_DELAY_MS,
            integration.retry.max_delay_millis.to_string(),
        ),
        (env::LIMIT_FILE, saleslayer_contract::LIMIT_FILE.to_owned()),
        (env::QUOTA_URL, injection.quota_url.clone()),
        (env::THROTTLE_STATUSES, throttle_statuses(plan)),
        (env::TOKEN_FILE, saleslayer_contract::TOKEN_FILE.to_owned()),
        (env::CA_FILE, saleslayer_contract::CA_FILE.to_owned()),
    ];
    pairs
        .into_iter()
        .map(|(name, value)| plain(name, value))
        .collect()
}

/// `429` or `429,503`: what counts as throttling on the pod's account.
fn throttle_statuses(plan: &AccountPlan) -> String {
    if plan.throttle_statuses.is_empty() {
        return "429".into();
    }
    plan.throttle_statuses
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn inject_container(container: &mut Container, env: &[EnvVar]) {
    let vars = container.env.get_or_insert_with(Vec::new);
    for var in env {
        upsert_by_name(vars, var.clone(), |v| &v.name);
    }
    let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
    for (name, path) in [(LIMIT_VOLUME, LIMIT_DIR), (QUOTA_VOLUME, QUOTA_DIR)] {
        upsert_by_name(
            mounts,
            VolumeMount {
                name: name.into(),
                mount_path: path.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            |m| &m.name,
        );
    }
}

/// Replace the item with the same name in place, or append it.
fn upsert_by_name<T>(items: &mut Vec<T>, item: T, name: impl Fn(&T) -> &String) {
    match items
        .iter()
        .position(|existing| name(existing) == name(&item))
    {
        Some(index) => items[index] = item,
        None => items.push(item),
    }
}

fn limit_volume() -> Volume {
    Volume {
        name: LIMIT_VOLUME.into(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![DownwardAPIVolumeFile {
                path: "limit".into(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{ANNOTATION_LIMIT}']"),
                    api_version: None,
                }),
                ..DownwardAPIVolumeFile::default()
            }]),
            ..DownwardAPIVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn quota_volume() -> Volume {
    Volume {
        name: QUOTA_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(TOKEN_SECONDS),
                        path: "token".into(),
                        ..ServiceAccountTokenProjection::default()
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: CA_CONFIGMAP.into(),
                        items: Some(vec![KeyToPath {
                            key: CA_CONFIGMAP_KEY.into(),
                            path: CA_CONFIGMAP_KEY.into(),
                            ..KeyToPath::default()
                        }]),
                        optional: None,
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    }
}
