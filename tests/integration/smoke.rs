//! The control plane itself works: objects made through `kube::Client` are
//! seen by real `kubectl`, and bound service-account tokens are issued and
//! authenticated (the quota API relies on both).

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodSpec, ServiceAccount};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use saleslayer_testenv::ControlPlane;

use crate::support::succeed;

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_reads_what_the_client_wrote() {
    let plane = ControlPlane::start().await.expect("control plane starts");
    eprintln!("control plane ready in {:?}", plane.started_in());
    let client = plane.client().await.expect("client");
    plane.namespace(&client, "smoke").await.expect("namespace");

    let map = ConfigMap {
        metadata: meta("greeting"),
        data: Some([("hello".to_owned(), "world".to_owned())].into()),
        ..ConfigMap::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), "smoke")
        .create(&PostParams::default(), &map)
        .await
        .expect("create configmap");

    let name = succeed(plane.kubectl().args([
        "get",
        "namespace",
        "smoke",
        "-o",
        "jsonpath={.metadata.name}",
    ]));
    assert_eq!(name, "smoke");
    let hello = succeed(
        plane
            .kubectl()
            .args(["-n", "smoke", "get", "configmap", "greeting"])
            .args(["-o", "jsonpath={.data.hello}"]),
    );
    assert_eq!(hello, "world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_bound_token_passes_token_review() {
    let plane = ControlPlane::start().await.expect("control plane starts");
    let client = plane.client().await.expect("client");
    plane.namespace(&client, "shop").await.expect("namespace");

    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), "shop");
    accounts
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: meta("importer"),
                ..ServiceAccount::default()
            },
        )
        .await
        .expect("create service account");
    let pod = Pod {
        metadata: meta("importer-0"),
        spec: Some(PodSpec {
            service_account_name: Some("importer".into()),
            containers: vec![Container {
                name: "main".into(),
                image: Some("busybox".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    let pod = Api::<Pod>::namespaced(client.clone(), "shop")
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");

    let token = saleslayer_testenv::bound_token(&client, &pod, "saleslayer-operator", 600)
        .await
        .expect("token request")
        .expect("a token");
    assert!(!token.is_empty());

    let review = TokenReview {
        spec: TokenReviewSpec {
            token,
            audiences: Some(vec!["saleslayer-operator".into()]),
        },
        ..TokenReview::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("token review");
    let status = reviewed.status.expect("review status");
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.expect("user info");
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:shop:importer")
    );
    let extra = user.extra.unwrap_or_default();
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-name"),
        Some(&vec!["importer-0".to_owned()])
    );
    assert_eq!(status.audiences, Some(vec!["saleslayer-operator".into()]));

    // A token for another audience is not accepted for ours.
    let elsewhere = saleslayer_testenv::bound_token(&client, &pod, "someone-else", 600)
        .await
        .expect("token request")
        .expect("a token");
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: elsewhere,
            audiences: Some(vec!["saleslayer-operator".into()]),
        },
        ..TokenReview::default()
    };
    let reviewed = Api::<TokenReview>::all(client)
        .create(&PostParams::default(), &review)
        .await
        .expect("token review");
    assert_ne!(reviewed.status.and_then(|s| s.authenticated), Some(true));
}
