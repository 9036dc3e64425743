//! The admission webhook through a real API server: pods get their share
//! injected, bad pods are refused with a message, unlabelled pods are never
//! sent to the webhook.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use saleslayer_core::api::SalesLayerIntegration;

use crate::support::{Env, eventually, labelled_pod};

/// The catalog integration with three jobs on acme-prod.
pub const INTEGRATION: &str = "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerIntegration
metadata: {name: catalog, namespace: shop}
spec:
  account: acme-prod
  jobs:
  - {name: product-import, weight: 3, maxConcurrency: 4}
  - {name: price-sync, weight: 1}
  - {name: stock-sync, weight: 1}
  retry: {maxAttempts: 5, baseDelayMillis: 500, maxDelayMillis: 4000}
";

async fn ready(env: &Env) {
    let (ok, out) = env.kubectl_apply(INTEGRATION);
    assert!(ok, "{out}");
    // The webhook answers from the operator's stores: wait until they hold it.
    eventually("integration reconciled", || async {
        let sli = Api::<SalesLayerIntegration>::namespaced(env.client.clone(), "shop")
            .get("catalog")
            .await
            .map_err(|e| e.to_string())?;
        sli.status.map(|_| ()).ok_or_else(|| "no status".to_owned())
    })
    .await;
}

fn env_of(container: &Container) -> BTreeMap<String, String> {
    container
        .env
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.value.clone()?)))
        .collect()
}

fn labelled(name: Option<&str>, generate: Option<&str>, job: &str) -> Pod {
    labelled_pod(name, generate, "catalog", job)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_their_share_injected() {
    let env = Env::with_operator().await;
    env.namespace("shop").await;
    ready(&env).await;
    let pods = Api::<Pod>::namespaced(env.client.clone(), "shop");

    // A pod with a native sidecar: both containers are injected.
    let mut pod = labelled(Some("import-0"), None, "product-import");
    pod.spec.as_mut().expect("spec").init_containers = Some(vec![Container {
        name: "sidecar".into(),
        image: Some("example.com/sidecar:1".into()),
        restart_policy: Some("Always".into()),
        ..Container::default()
    }]);
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let spec = pod.spec.as_ref().expect("spec");
    let main = env_of(&spec.containers[0]);
    // The first pod of product-import is counted live: 24 of 40, all its own.
    let expected = [
        ("SALESLAYER_INTEGRATION", "catalog"),
        ("SALESLAYER_JOB", "product-import"),
        ("SALESLAYER_ACCOUNT", "acme-prod"),
        ("SALESLAYER_RATE_REQUESTS", "24"),
        ("SALESLAYER_RATE_PERIOD_MS", "10000"),
        ("SALESLAYER_JOB_RATE_REQUESTS", "24"),
        ("SALESLAYER_JOB_RATE_PERIOD_MS", "10000"),
        ("SALESLAYER_MAX_CONCURRENCY", "4"),
        ("SALESLAYER_RETRY_MAX_ATTEMPTS", "5"),
        ("SALESLAYER_RETRY_BASE_DELAY_MS", "500"),
        ("SALESLAYER_RETRY_MAX_DELAY_MS", "4000"),
        ("SALESLAYER_LIMIT_FILE", "/etc/saleslayer/limit"),
        ("SALESLAYER_TOKEN_FILE", "/var/run/saleslayer/token"),
        ("SALESLAYER_CA_FILE", "/var/run/saleslayer/ca.crt"),
    ];
    for (name, value) in expected {
        assert_eq!(
            main.get(name).map(String::as_str),
            Some(value),
            "{name} in {main:?}"
        );
    }
    assert!(
        main.get("SALESLAYER_QUOTA_URL")
            .is_some_and(|u| u.starts_with("https://127.0.0.1:"))
    );
    let sidecar = env_of(&spec.init_containers.as_ref().expect("init containers")[0]);
    assert_eq!(
        sidecar.get("SALESLAYER_JOB").map(String::as_str),
        Some("product-import")
    );

    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert!(
        volumes.contains(&"saleslayer-limit") && volumes.contains(&"saleslayer-quota"),
        "{volumes:?}"
    );
    let quota = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "saleslayer-quota")
        .expect("quota volume");
    let token = quota
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s[0].service_account_token.as_ref())
        .expect("token projection");
    assert_eq!(token.audience.as_deref(), Some("saleslayer-operator"));
    let mounts: Vec<(&str, &str)> = spec.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert!(
        mounts.contains(&("saleslayer-limit", "/etc/saleslayer")),
        "{mounts:?}"
    );

    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let limit: serde_json::Value =
        serde_json::from_str(&annotations["saleslayer.io/limit"]).expect("limit JSON");
    assert_eq!(
        limit,
        serde_json::json!({"requests": 24, "periodMillis": 10000, "maxConcurrency": 4})
    );
    assert!(annotations["saleslayer.io/injected"].contains("\"sidecar\""));

    // The CA the pods trust is published in their namespace.
    env.ca_pem("shop").await;

    // A pod made by a Job (generateName, no name yet) is injected; the second
    // pod of the job halves the share at admission.
    let generated = pods
        .create(
            &PostParams::default(),
            &labelled(None, Some("product-import-"), "product-import"),
        )
        .await
        .expect("create generated pod");
    let generated_env = env_of(&generated.spec.as_ref().expect("spec").containers[0]);
    assert_eq!(
        generated_env
            .get("SALESLAYER_RATE_REQUESTS")
            .map(String::as_str),
        Some("12")
    );
    assert_eq!(
        generated_env
            .get("SALESLAYER_MAX_CONCURRENCY")
            .map(String::as_str),
        Some("2")
    );

    // Re-submitting an injected pod (same spec, new name) duplicates nothing.
    let mut again = pod.clone();
    again.metadata = ObjectMeta {
        name: Some("import-copy".into()),
        labels: pod.metadata.labels.clone(),
        annotations: pod.metadata.annotations.clone(),
        ..ObjectMeta::default()
    };
    let again = pods
        .create(&PostParams::default(), &again)
        .await
        .expect("create copy");
    let again_spec = again.spec.as_ref().expect("spec");
    let names: Vec<&str> = again_spec.containers[0]
        .env
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(names.len(), unique.len(), "duplicated env: {names:?}");
    assert_eq!(
        again_spec
            .volumes
            .iter()
            .flatten()
            .filter(|v| v.name.starts_with("saleslayer-"))
            .count(),
        2
    );

    // Dry-run requests are answered too.
    let (ok, out) = env.kubectl_stdin(
        &["create", "--dry-run=server", "-o", "jsonpath={.metadata.annotations.saleslayer\\.io/limit}", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: dry, namespace: shop, labels: {saleslayer.io/integration: catalog, saleslayer.io/job: price-sync}}\nspec: {containers: [{name: main, image: x}]}\n",
    );
    assert!(ok, "{out}");
    assert!(out.contains("\"requests\":8"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pods_are_refused_and_unlabelled_pods_never_reach_the_webhook() {
    let mut env = Env::with_operator().await;
    env.namespace("shop").await;
    ready(&env).await;

    let (ok, out) = env.kubectl_stdin(
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: stray, namespace: shop, labels: {saleslayer.io/integration: catalog, saleslayer.io/job: image-sync}}\nspec: {containers: [{name: main, image: x}]}\n",
    );
    assert!(!ok, "a pod of an unregistered job was admitted: {out}");
    assert!(
        out.contains("\"image-sync\"") && out.contains("product-import, price-sync, stock-sync")
            || out.contains("\"image-sync\"") && out.contains("registered jobs"),
        "{out}"
    );

    let (ok, out) = env.kubectl_stdin(
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: lost, namespace: shop, labels: {saleslayer.io/integration: nope, saleslayer.io/job: a}}\nspec: {containers: [{name: main, image: x}]}\n",
    );
    assert!(!ok, "{out}");
    assert!(out.contains("\"nope\"") && out.contains("catalog"), "{out}");

    // With the webhook gone (failurePolicy Fail), labelled pods are refused
    // but unlabelled pods are created: they are never sent to it.
    env.stop_operator();
    let pods = Api::<Pod>::namespaced(env.client.clone(), "shop");
    eventually("labelled pods refused once the webhook is down", || async {
        match pods
            .create(
                &PostParams::default(),
                &labelled(None, Some("probe-"), "price-sync"),
            )
            .await
        {
            Err(kube::Error::Api(status)) if status.message.contains("pods.saleslayer.io") => {
                Ok(())
            }
            other => Err(format!("{:?}", other.map(|p| p.metadata.name))),
        }
    })
    .await;
    let plain = Pod {
        metadata: ObjectMeta {
            name: Some("plain".into()),
            ..ObjectMeta::default()
        },
        spec: labelled(None, None, "x").spec,
        ..Pod::default()
    };
    let plain = pods
        .create(&PostParams::default(), &plain)
        .await
        .expect("unlabelled pod admitted");
    assert!(
        !plain
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("saleslayer.io/injected")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_replace_the_operators_own_ca() {
    // Files as cert-manager would mount them.
    let dir = tempfile::tempdir().expect("tempdir");
    let authority = saleslayer_operator::certs::Authority::generate().expect("CA");
    let serving = authority
        .issue(&["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("serving certificate");
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(path("ca.crt"), &authority.ca_pem).expect("write");
    std::fs::write(path("tls.crt"), &serving.cert_pem).expect("write");
    std::fs::write(path("tls.key"), &serving.key_pem).expect("write");
    let env = Env::with_operator_args(|args| {
        args.ca_file = Some(path("ca.crt"));
        args.tls_cert_file = Some(path("tls.crt"));
        args.tls_key_file = Some(path("tls.key"));
    })
    .await;
    env.namespace("shop").await;
    ready(&env).await;

    // The API server trusts the mounted CA, so admission works through it.
    let pod = Api::<Pod>::namespaced(env.client.clone(), "shop")
        .create(
            &PostParams::default(),
            &labelled(Some("import-0"), None, "product-import"),
        )
        .await
        .expect("pod admitted");
    assert!(
        pod.metadata
            .annotations
            .unwrap_or_default()
            .contains_key("saleslayer.io/limit")
    );
    let bundle =
        Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(
            env.client.clone(),
        )
        .get("saleslayer-operator")
        .await
        .expect("configuration")
        .webhooks
        .and_then(|w| w.into_iter().next())
        .and_then(|w| w.client_config.ca_bundle)
        .expect("caBundle");
    assert_eq!(bundle.0, authority.ca_pem.as_bytes());
    // And the operator made no CA of its own.
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(
        env.client.clone(),
        "saleslayer-system",
    )
    .get_opt("saleslayer-operator-tls")
    .await
    .expect("read secret");
    assert!(secret.is_none());

    // cert-manager renews with another CA: the next handshake serves the new
    // certificate (a client that trusts only the new CA gets through), the
    // webhook trusts the new CA, and pods get it in their CA ConfigMap —
    // without a restart.
    let renewed_ca = saleslayer_operator::certs::Authority::generate().expect("CA");
    let renewed = renewed_ca
        .issue(&["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("serving certificate");
    std::fs::write(path("ca.crt"), &renewed_ca.ca_pem).expect("write");
    std::fs::write(path("tls.crt"), &renewed.cert_pem).expect("write");
    std::fs::write(path("tls.key"), &renewed.key_pem).expect("write");
    let trusting_the_new_ca = reqwest::Client::builder()
        .tls_certs_only(
            reqwest::Certificate::from_pem_bundle(renewed_ca.ca_pem.as_bytes()).expect("PEM"),
        )
        .build()
        .expect("client");
    let quota = format!("https://127.0.0.1:{}/v1/leases", env.quota_port);
    eventually("the renewed certificate served", || async {
        trusting_the_new_ca
            .post(&quota)
            .body("{}")
            .send()
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    })
    .await;
    eventually("the webhook trusts the renewed CA", || async {
        let bundle =
            Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(
                env.client.clone(),
            )
            .get("saleslayer-operator")
            .await
            .map_err(|e| e.to_string())?
            .webhooks
            .and_then(|w| w.into_iter().next())
            .and_then(|w| w.client_config.ca_bundle)
            .ok_or("no caBundle")?;
        if bundle.0 == renewed_ca.ca_pem.as_bytes() {
            Ok(())
        } else {
            Err("the old CA".to_owned())
        }
    })
    .await;
    eventually("pods get the renewed CA", || async {
        let published = env.ca_pem("shop").await;
        if published == renewed_ca.ca_pem {
            Ok(())
        } else {
            Err("the old CA".to_owned())
        }
    })
    .await;
    // And admission still works through the renewed certificate.
    Api::<Pod>::namespaced(env.client.clone(), "shop")
        .create(
            &PostParams::default(),
            &labelled(Some("import-1"), None, "product-import"),
        )
        .await
        .expect("pod admitted through the renewed certificate");
}

/// `saleslayer.io/proxy: "true"`: the API server accepts the pod with the
/// proxy as a native sidecar, and the workload is pointed at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_annotation_gets_a_native_sidecar_the_api_server_accepts() {
    let env = Env::with_operator().await;
    env.namespace("shop").await;
    ready(&env).await;
    let pods = Api::<Pod>::namespaced(env.client.clone(), "shop");
    let mut pod = labelled(Some("price-0"), None, "price-sync");
    pod.metadata.annotations = Some(BTreeMap::from([(
        "saleslayer.io/proxy".to_owned(),
        "true".to_owned(),
    )]));
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let spec = pod.spec.as_ref().expect("spec");
    let init = spec.init_containers.as_ref().expect("init containers");
    let sidecar = &init[0];
    assert_eq!(sidecar.name, "saleslayer-proxy");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        sidecar.command,
        Some(vec![saleslayer_contract::PROXY_COMMAND.to_owned()])
    );
    let sidecar_env = env_of(sidecar);
    assert_eq!(
        sidecar_env.get("SALESLAYER_JOB").map(String::as_str),
        Some("price-sync")
    );
    assert!(sidecar_env.contains_key("SALESLAYER_UPSTREAM"));
    assert!(!sidecar_env.contains_key("SALESLAYER_API_URL"));
    let main = env_of(&spec.containers[0]);
    assert_eq!(
        main.get("SALESLAYER_API_URL").map(String::as_str),
        Some("http://127.0.0.1:8787")
    );

    let mut wrong = labelled(Some("price-1"), None, "price-sync");
    wrong.metadata.annotations = Some(BTreeMap::from([(
        "saleslayer.io/proxy".to_owned(),
        "please".to_owned(),
    )]));
    let refused = pods
        .create(&PostParams::default(), &wrong)
        .await
        .expect_err("a proxy annotation that is not true/false is refused");
    assert!(
        refused.to_string().contains("saleslayer.io/proxy"),
        "{refused}"
    );
}

/// Issue 12 item 8: a CA ConfigMap deleted (or changed) by someone else is
/// published again at once, so new injected pods of that namespace start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_ca_configmap_is_restored() {
    let env = Env::with_operator().await;
    env.namespace("shop").await;
    ready(&env).await;
    let ca = env.ca_pem("shop").await;
    let maps = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(env.client.clone(), "shop");
    maps.delete("saleslayer-operator-ca", &Default::default())
        .await
        .expect("deleted");
    eventually("the CA ConfigMap back", || async {
        match maps
            .get_opt("saleslayer-operator-ca")
            .await
            .map_err(|e| e.to_string())?
        {
            Some(map) if map.data.as_ref().and_then(|d| d.get("ca.crt")) == Some(&ca) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    env.kubectl(&[
        "-n",
        "shop",
        "patch",
        "configmap",
        "saleslayer-operator-ca",
        "--type=merge",
        "-p",
        r#"{"data": {"ca.crt": "tampered"}}"#,
    ]);
    eventually("the CA ConfigMap repaired", || async {
        let map = maps
            .get("saleslayer-operator-ca")
            .await
            .map_err(|e| e.to_string())?;
        if map.data.as_ref().and_then(|d| d.get("ca.crt")) == Some(&ca) {
            Ok(())
        } else {
            Err(format!("{:?}", map.data))
        }
    })
    .await;
}
