//! The pod-mutating admission webhook over HTTPS (DESIGN.md §5, §8).
//!
//! The HTTP layer only decodes the AdmissionReview, hands it to the pure
//! [`mutate::review`], and encodes the answer; a body that is not an
//! AdmissionReview gets HTTP 400 with a JSON error. Every replica serves it
//! from its own in-memory stores, so admission never waits on an API call.
//! Out of cluster (`--webhook-url`) the operator registers its own
//! MutatingWebhookConfiguration; in a cluster the chart makes it and the
//! operator only keeps its `caBundle` current.

pub mod mutate;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
pub use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use kube::{Api, Client};
use serde_json::json;

use crate::allocation::JobKey;
use crate::api::LABEL_INTEGRATION;
use crate::controller::plan::{self, AccountPlan, ValidatedIntegration};
use crate::controller::{FIELD_MANAGER, Stores};
use crate::metrics::{OutcomeLabels, WebhookMetrics};
use mutate::{Injection, IntegrationView};

/// Name of the MutatingWebhookConfiguration (and of its one webhook's prefix).
pub const CONFIGURATION_NAME: &str = "saleslayer-operator";
/// The webhook's name inside the configuration.
pub const WEBHOOK_NAME: &str = "pods.saleslayer.io";
/// The largest AdmissionReview accepted (the API server's own request limit).
const MAX_BODY: usize = 3 * 1024 * 1024;

impl IntegrationView for Stores {
    fn integration(&self, namespace: &str, name: &str) -> Option<ValidatedIntegration> {
        let key = kube::runtime::reflector::ObjectRef::new(name).within(namespace);
        self.integrations
            .get(&key)
            .and_then(|sli| plan::validate(&sli).ok())
    }

    fn integrations_in(&self, namespace: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .integrations
            .state()
            .iter()
            .filter(|sli| sli.metadata.namespace.as_deref() == Some(namespace))
            .filter_map(|sli| sli.metadata.name.clone())
            .collect();
        names.sort();
        names
    }

    fn plan_with_new_pod(&self, integration: &ValidatedIntegration, job: &str) -> AccountPlan {
        let key: JobKey = integration.key(job);
        self.account_plan(&integration.account, Some(&key), crate::quota::now_millis())
    }
}

struct Shared {
    stores: Stores,
    injection: Injection,
    metrics: WebhookMetrics,
}

/// The webhook's routes, over the given view of the cluster.
pub fn router(stores: Stores, injection: Injection, metrics: WebhookMetrics) -> Router {
    Router::new()
        .route("/mutate", post(mutate_handler))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Arc::new(Shared {
            stores,
            injection,
            metrics,
        }))
}

async fn mutate_handler(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let started = std::time::Instant::now();
    let (status, answer) = respond(&body, &shared.stores, &shared.injection);
    let outcome = match (status, answer["response"]["allowed"].as_bool()) {
        (StatusCode::OK, Some(true)) => "allowed",
        (StatusCode::OK, _) => "denied",
        _ => "malformed",
    };
    shared
        .metrics
        .admissions
        .get_or_create(&OutcomeLabels {
            outcome: outcome.into(),
        })
        .inc();
    shared
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    (status, axum::Json(answer)).into_response()
}

/// Decode an AdmissionReview, decide, encode: HTTP 200 with the review's
/// answer, or 400 with `{"error", "reason"}` for a body that is not one.
pub fn respond(
    body: &[u8],
    view: &dyn IntegrationView,
    injection: &Injection,
) -> (StatusCode, serde_json::Value) {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => return bad_request(format!("the body is not an AdmissionReview: {error}")),
    };
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(error) => {
            return bad_request(format!("the AdmissionReview carries no request: {error}"));
        }
    };
    let response = mutate::review(&request, view, injection);
    if !response.allowed {
        tracing::info!(
            namespace = request.namespace.as_deref().unwrap_or_default(),
            message = %response.result.message,
            "pod denied"
        );
    }
    match serde_json::to_value(response.into_review()) {
        Ok(answer) => (StatusCode::OK, answer),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": format!("encoding the answer: {error}"), "reason": "EncodeFailed"}),
        ),
    }
}

fn bad_request(message: String) -> (StatusCode, serde_json::Value) {
    (
        StatusCode::BAD_REQUEST,
        json!({"error": message, "reason": "MalformedAdmissionReview"}),
    )
}

/// Serve `router` over HTTPS on `bind` until `shutdown` resolves. `tls` can
/// be reloaded with a new certificate while serving.
pub async fn serve(
    bind: SocketAddr,
    tls: RustlsConfig,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
    });
    axum_server::bind_rustls(bind, tls)
        .handle(handle)
        .serve(router.into_make_service())
        .await
}

/// Create or update the MutatingWebhookConfiguration pointing at `url`
/// (out of cluster), trusting `ca_pem`.
pub async fn register(client: &Client, url: &str, ca_pem: &str) -> Result<(), kube::Error> {
    let configuration = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIGURATION_NAME},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"url": url, "caBundle": base64(ca_pem.as_bytes())},
            "rules": [{
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
            "objectSelector": {"matchExpressions": [{"key": LABEL_INTEGRATION, "operator": "Exists"}]},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "timeoutSeconds": 5,
            "reinvocationPolicy": "IfNeeded",
        }],
    });
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(
            CONFIGURATION_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&configuration),
        )
        .await
        .map(|_| ())
}

/// Standard base64 (the caBundle field's encoding).
pub fn base64(bytes: &[u8]) -> String {
    serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// In a cluster: set the caBundle of the chart's webhook configuration.
pub async fn patch_ca_bundle(
    client: &Client,
    configuration: &str,
    ca_pem: &str,
) -> Result<(), kube::Error> {
    let api = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let current = api.get(configuration).await?;
    let bundle = k8s_openapi::ByteString(ca_pem.as_bytes().to_vec());
    let webhooks: Vec<serde_json::Value> = current
        .webhooks
        .unwrap_or_default()
        .iter()
        .map(|w| json!({"name": w.name, "clientConfig": {"caBundle": bundle}}))
        .collect();
    let patch = json!({"webhooks": webhooks});
    api.patch(
        configuration,
        &PatchParams::default(),
        &Patch::Strategic(&patch),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::api::SalesLayerIntegration;
    use crate::controller::plan::PodCounts;

    /// One integration, `shop/catalog`, with two jobs and no live pods.
    struct Fixed(ValidatedIntegration);

    impl Fixed {
        fn new() -> Self {
            let spec = serde_json::from_value(json!({"account": "acme", "jobs": [
                {"name": "import", "weight": 3, "maxConcurrency": 4}, {"name": "prices"}]}))
            .expect("spec");
            let mut sli = SalesLayerIntegration::new("catalog", spec);
            sli.metadata.namespace = Some("shop".into());
            Self(plan::validate(&sli).expect("valid"))
        }
    }

    impl IntegrationView for Fixed {
        fn integration(&self, namespace: &str, name: &str) -> Option<ValidatedIntegration> {
            (namespace == "shop" && name == "catalog").then(|| self.0.clone())
        }
        fn integrations_in(&self, namespace: &str) -> Vec<String> {
            if namespace == "shop" {
                vec!["catalog".into()]
            } else {
                Vec::new()
            }
        }
        fn plan_with_new_pod(&self, integration: &ValidatedIntegration, job: &str) -> AccountPlan {
            let pods: PodCounts = [(integration.key(job), 1)].into();
            plan::plan_account(std::slice::from_ref(integration), &pods)
        }
    }

    fn injection() -> Injection {
        Injection {
            quota_url: "https://quota.example:8443".into(),
            proxy_image: "saleslayer-operator:test".into(),
            proxy_upstream: "https://api.saleslayer.com".into(),
        }
    }

    fn review_of(pod: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "0b4b6c1e-1111-2222-3333-444455556666",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "userInfo": {"username": "someone"},
                "object": pod,
                "dryRun": false,
            }
        })
    }

    fn pod(job: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "import-", "namespace": "shop",
                "labels": {"saleslayer.io/integration": "catalog", "saleslayer.io/job": job}},
            "spec": {"containers": [{"name": "main", "image": "x",
                "env": [{"name": "KEEP", "value": "me"}]}]}})
    }

    fn answer(body: &serde_json::Value) -> (StatusCode, serde_json::Value) {
        respond(body.to_string().as_bytes(), &Fixed::new(), &injection())
    }

    /// Apply the answer's JSON Patch to `pod`.
    fn patched(pod: &serde_json::Value, answer: &serde_json::Value) -> serde_json::Value {
        let mut pod = pod.clone();
        // kube encodes the patch bytes as a JSON array (Go decodes either form).
        if let Some(encoded) = answer["response"].get("patch") {
            let bytes: Vec<u8> = serde_json::from_value(encoded.clone()).expect("patch bytes");
            let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("JSON Patch");
            json_patch::patch(&mut pod, &patch).expect("patch applies");
        }
        pod
    }

    #[test]
    fn injects_then_changes_nothing_on_reinvocation() {
        let original = pod("import");
        let (status, first) = answer(&review_of(original.clone()));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(first["response"]["allowed"], true);
        let injected = patched(&original, &first);
        let env = &injected["spec"]["containers"][0]["env"];
        assert_eq!(env[0], json!({"name": "KEEP", "value": "me"}));
        assert!(env.as_array().is_some_and(|e| {
            e.contains(&json!({"name": "SALESLAYER_RATE_REQUESTS", "value": "30"}))
        }));
        assert_eq!(
            injected["metadata"]["annotations"]["saleslayer.io/limit"],
            r#"{"requests":30,"periodMillis":10000,"maxConcurrency":4}"#
        );

        let (_, second) = answer(&review_of(injected.clone()));
        assert_eq!(second["response"]["allowed"], true);
        assert!(
            second["response"].get("patch").is_none(),
            "re-invocation patched again: {second}"
        );
    }

    #[test]
    fn the_proxy_annotation_adds_a_native_sidecar_once() {
        let mut original = pod("import");
        original["metadata"]["annotations"] = json!({"saleslayer.io/proxy": "true"});
        original["spec"]["initContainers"] = json!([{"name": "migrate", "image": "y"}]);
        let (_, first) = answer(&review_of(original.clone()));
        assert_eq!(first["response"]["allowed"], true, "{first}");
        let injected = patched(&original, &first);
        let init = &injected["spec"]["initContainers"];
        let sidecar = &init[0];
        assert_eq!(sidecar["name"], "saleslayer-proxy");
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert_eq!(sidecar["image"], "saleslayer-operator:test");
        assert_eq!(sidecar["args"], json!(["proxy"]));
        assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(init[1]["name"], "migrate");
        let has = |container: &serde_json::Value, var: serde_json::Value| {
            container["env"]
                .as_array()
                .is_some_and(|e| e.contains(&var))
        };
        assert!(has(
            sidecar,
            json!({"name": "SALESLAYER_UPSTREAM", "value": "https://api.saleslayer.com"})
        ));
        assert!(has(
            sidecar,
            json!({"name": "SALESLAYER_RATE_REQUESTS", "value": "30"})
        ));
        assert!(has(
            sidecar,
            json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
        ));
        assert!(!has(
            sidecar,
            json!({"name": "SALESLAYER_API_URL", "value": "http://127.0.0.1:8787"})
        ));
        for app in [&injected["spec"]["containers"][0], &init[1]] {
            assert!(
                has(
                    app,
                    json!({"name": "SALESLAYER_API_URL", "value": "http://127.0.0.1:8787"})
                ),
                "{app}"
            );
        }

        let (_, second) = answer(&review_of(injected.clone()));
        assert!(
            second["response"].get("patch").is_none(),
            "re-invocation patched again: {second}"
        );

        let (_, plain) = answer(&review_of(pod("import")));
        let plain = patched(&pod("import"), &plain);
        assert!(plain["spec"].get("initContainers").is_none(), "{plain}");
        assert!(!has(
            &plain["spec"]["containers"][0],
            json!({"name": "SALESLAYER_API_URL", "value": "http://127.0.0.1:8787"})
        ));

        let mut wrong = pod("import");
        wrong["metadata"]["annotations"] = json!({"saleslayer.io/proxy": "yes"});
        let (_, refused) = answer(&review_of(wrong));
        assert_eq!(refused["response"]["allowed"], false);
        let message = refused["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.contains("saleslayer.io/proxy") && message.contains("\"yes\""),
            "{message}"
        );
    }

    #[test]
    fn denials_name_what_is_missing_and_what_exists() {
        let (_, unknown_job) = answer(&review_of(pod("images")));
        assert_eq!(unknown_job["response"]["allowed"], false);
        let message = unknown_job["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.contains("\"images\"") && message.contains("import, prices"),
            "{message}"
        );

        let mut elsewhere = pod("import");
        elsewhere["metadata"]["labels"]["saleslayer.io/integration"] = json!("orders");
        let (_, unknown) = answer(&review_of(elsewhere));
        let message = unknown["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.contains("\"orders\"") && message.contains("existing: catalog"),
            "{message}"
        );

        let mut targeted = pod("import");
        targeted["metadata"]["annotations"] = json!({"saleslayer.io/containers": "main,worker"});
        let (_, missing) = answer(&review_of(targeted));
        let message = missing["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.contains("worker") && message.contains("the pod has: main"),
            "{message}"
        );
    }

    #[test]
    fn malformed_reviews_are_400_with_a_json_error() {
        for body in [
            &b"not json"[..],
            b"{}",
            b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}",
        ] {
            let (status, error) = respond(body, &Fixed::new(), &injection());
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(error["reason"], "MalformedAdmissionReview");
            assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }

    proptest! {
        #[test]
        fn any_bytes_get_an_answer(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (status, _) = respond(&body, &Fixed::new(), &injection());
            prop_assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST);
        }

        #[test]
        fn truncated_reviews_get_an_answer(cut in 0usize..2000, job in "[a-z]{0,8}") {
            let full = review_of(pod(&job)).to_string();
            let cut = cut.min(full.len());
            let (status, _) = respond(&full.as_bytes()[..cut], &Fixed::new(), &injection());
            prop_assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST);
        }

        #[test]
        fn mangled_pods_never_panic(value in proptest::arbitrary::any::<(bool, u8, String)>()) {
            // Pods with odd shapes: missing spec, odd names and labels.
            let (with_spec, n, text) = value;
            let mut p = pod(&text);
            if !with_spec { p.as_object_mut().map(|o| o.remove("spec")); }
            p["metadata"]["annotations"] = json!({"saleslayer.io/containers": text.repeat(usize::from(n % 4))});
            let (status, _) = answer(&review_of(p));
            prop_assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST);
        }
    }
}
