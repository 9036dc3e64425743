//! The pod-mutating admission webhook over HTTPS (DESIGN.md §5, §8).
//!
//! The HTTP layer only decodes the AdmissionReview, hands it to the pure
//! [`injection::review`] of the core, and encodes the answer; a body that is not an
//! AdmissionReview gets HTTP 400 with a JSON error. Every replica serves it
//! from its own in-memory stores, so admission never waits on an API call.
//! Out of cluster (`--webhook-url`) the operator registers its own
//! MutatingWebhookConfiguration; in a cluster the chart makes it and the
//! operator only keeps its `caBundle` current.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
pub use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use kube::{Api, Client};
use serde_json::json;

use saleslayer_contract::LABEL_INTEGRATION;
use saleslayer_core::account::AccountProblem;
use saleslayer_core::allocation::JobKey;
use saleslayer_core::injection::{self, Injection, IntegrationView};
use saleslayer_core::plan::{self, AccountPlan, ValidatedIntegration};
use saleslayer_runtime::clock::wall_millis;

use crate::FIELD_MANAGER;
use crate::metrics::{OutcomeLabels, ReasonLabels, WebhookMetrics};
use crate::state::Stores;
use crate::tls::ServingTls;
use saleslayer_runtime::serve::ServeLimits;

/// Name of the MutatingWebhookConfiguration (and of its one webhook's prefix).
pub const CONFIGURATION_NAME: &str = "saleslayer-operator";
/// The webhook's name inside the configuration.
pub const WEBHOOK_NAME: &str = "pods.saleslayer.io";
/// The largest AdmissionReview accepted (the API server's own request limit).
const MAX_BODY: usize = 3 * 1024 * 1024;

impl IntegrationView for Stores {
    fn ready(&self) -> bool {
        self.synced()
    }

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

    fn plan_with_new_pod(
        &self,
        integration: &ValidatedIntegration,
        job: &str,
    ) -> Result<AccountPlan, AccountProblem> {
        let key: JobKey = integration.key(job);
        self.plan_for(integration, Some(&key), wall_millis())
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
    let answer = respond(&body, &shared.stores, &shared.injection);
    let outcome = match (answer.status, answer.denial) {
        (StatusCode::OK, None) => "allowed",
        (StatusCode::OK, Some(_)) => "denied",
        (StatusCode::SERVICE_UNAVAILABLE, _) => "not_ready",
        _ => "malformed",
    };
    let metrics = &shared.metrics;
    metrics
        .admissions
        .get_or_create(&OutcomeLabels {
            outcome: outcome.into(),
        })
        .inc();
    if let Some(reason) = answer.denial {
        metrics
            .denials
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }
    metrics.latency.observe(started.elapsed().as_secs_f64());
    (answer.status, axum::Json(answer.body)).into_response()
}

/// What the webhook answers one call.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// The AdmissionReview, or `{"error", "reason"}`.
    pub body: serde_json::Value,
    /// Why the pod was denied, if it was.
    pub denial: Option<&'static str>,
}

/// Decode an AdmissionReview, decide, encode: HTTP 200 with the review's
/// answer, or 400 with `{"error", "reason"}` for a body that is not one.
pub fn respond(body: &[u8], view: &dyn IntegrationView, injection: &Injection) -> Answer {
    // Not an AdmissionReview answer: the API server counts a non-200 as a
    // failed call, so failurePolicy decides and the pod's creator retries,
    // instead of a denial made from half-listed stores.
    if !view.ready() {
        return Answer {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: json!({
                "error": "saleslayer-operator is starting and has not listed the cluster yet; retry shortly",
                "reason": "NotReady",
            }),
            denial: None,
        };
    }
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
    let decision = injection::patch_for(&request, view, injection);
    let denial = decision.as_ref().err().map(injection::Denial::reason);
    if let Err(denial) = &decision {
        tracing::info!(
            namespace = request.namespace.as_deref().unwrap_or_default(),
            reason = denial.reason(),
            message = %denial,
            "pod denied"
        );
    }
    let response = injection::response_for(&request, decision);
    match serde_json::to_value(response.into_review()) {
        Ok(body) => Answer {
            status: StatusCode::OK,
            body,
            denial,
        },
        Err(error) => Answer {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: json!({"error": format!("encoding the answer: {error}"), "reason": "EncodeFailed"}),
            denial: None,
        },
    }
}

fn bad_request(message: String) -> Answer {
    Answer {
        status: StatusCode::BAD_REQUEST,
        body: json!({"error": message, "reason": "MalformedAdmissionReview"}),
        denial: None,
    }
}

/// Serve `router` over HTTPS on `bind` within `limits` until `shutdown`
/// resolves; each handshake uses `tls`'s certificate of the moment.
///
/// The operator serves one request per connection (see [`limits`]): the
/// API server pools HTTP/1.1 connections to a webhook Service by host name
/// and never retries a POST, so a replica that closes a pooled connection as
/// it stops (a rollout, a deleted leader) would fail the pod create being
/// written on it ("write: broken pipe", seen on the e2e node). Without
/// keep-alive every call dials the Service anew and reaches a replica that
/// serves.
pub async fn serve(
    bind: SocketAddr,
    tls: Arc<ServingTls>,
    router: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    saleslayer_runtime::serve::serve_wrapped(listener, router, limits, shutdown, move |stream| {
        let tls = tls.clone();
        async move { tls.accept(stream).await }
    })
    .await
}

/// What the webhook and the quota API allow a client: no keep-alive (see
/// [`serve`]), a 10 s header-read timeout, 256 connections at once.
pub fn limits() -> ServeLimits {
    ServeLimits {
        keep_alive: false,
        ..ServeLimits::default()
    }
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
    use crate::state::testing::{
        account, integration, namespace, stores_with, stores_with_accounts,
    };

    /// One integration, `shop/catalog`, with two jobs and no live pods, on
    /// the documented account `acme`.
    fn fixed() -> Stores {
        stores_with(
            vec![integration(
                "shop",
                "catalog",
                json!({"account": "acme", "jobs": [
                    {"name": "import", "weight": 3, "maxConcurrency": 4}, {"name": "prices"}]}),
            )],
            vec![],
        )
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
        let answer = respond(body.to_string().as_bytes(), &fixed(), &injection());
        (answer.status, answer.body)
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
        assert_eq!(
            sidecar["command"],
            json!(["/usr/local/bin/saleslayer-sidecar"])
        );
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
            let Answer {
                status,
                body: error,
                ..
            } = respond(body, &fixed(), &injection());
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(error["reason"], "MalformedAdmissionReview");
            assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }

    #[test]
    fn pods_of_an_integration_its_account_does_not_take_are_denied() {
        let missing = stores_with_accounts(
            vec![],
            vec![],
            vec![integration(
                "shop",
                "catalog",
                json!({"account": "acme-prod", "jobs": [{"name": "import"}]}),
            )],
            vec![],
        );
        let answer = respond(
            review_of(pod("import")).to_string().as_bytes(),
            &missing,
            &injection(),
        );
        assert_eq!(answer.denial, Some("AccountNotFound"));
        let message = answer.body["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.contains("kubectl apply -f -") && message.contains("acme-prod"),
            "{message}"
        );

        let elsewhere = stores_with_accounts(
            vec![account(
                "acme-prod",
                json!({"allowedNamespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "ops"}}}}),
            )],
            vec![namespace("shop", &[("team", "shop")])],
            vec![integration(
                "shop",
                "catalog",
                json!({"account": "acme-prod", "jobs": [{"name": "import"}]}),
            )],
            vec![],
        );
        let answer = respond(
            review_of(pod("import")).to_string().as_bytes(),
            &elsewhere,
            &injection(),
        );
        assert_eq!(answer.denial, Some("AccountNotAllowed"));
        let message = answer.body["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.contains("does not allow integrations in namespace \"shop\""),
            "{message}"
        );
    }

    #[test]
    fn the_accounts_throttle_statuses_are_injected() {
        let stores = stores_with_accounts(
            vec![account("acme", json!({"throttleStatuses": [503, 429]}))],
            vec![],
            vec![integration(
                "shop",
                "catalog",
                json!({"account": "acme", "jobs": [{"name": "import"}]}),
            )],
            vec![],
        );
        let original = pod("import");
        let answer = respond(
            review_of(original.clone()).to_string().as_bytes(),
            &stores,
            &injection(),
        );
        let injected = patched(&original, &answer.body);
        let env = &injected["spec"]["containers"][0]["env"];
        assert!(
            env.as_array().is_some_and(|e| e
                .contains(&json!({"name": "SALESLAYER_THROTTLE_STATUSES", "value": "429,503"}))),
            "{env}"
        );
    }

    #[test]
    fn a_replica_that_has_not_listed_fails_the_call_instead_of_denying() {
        let stores = fixed();
        stores
            .synced
            .integrations
            .store(false, std::sync::atomic::Ordering::Release);
        let answer = respond(
            review_of(pod("import")).to_string().as_bytes(),
            &stores,
            &injection(),
        );
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.denial, None);
        assert_eq!(answer.body["reason"], "NotReady");
        assert!(
            answer.body.get("response").is_none(),
            "no AdmissionReview: not a denial"
        );
    }

    proptest! {
        #[test]
        fn any_bytes_get_an_answer(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let status = respond(&body, &fixed(), &injection()).status;
            prop_assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST);
        }

        #[test]
        fn truncated_reviews_get_an_answer(cut in 0usize..2000, job in "[a-z]{0,8}") {
            let full = review_of(pod(&job)).to_string();
            let cut = cut.min(full.len());
            let status = respond(&full.as_bytes()[..cut], &fixed(), &injection()).status;
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
