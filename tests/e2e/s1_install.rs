//! Scenario 1: `helm install` of the chart as users install it, with the
//! locally imported image: two replicas Running and Ready from that image,
//! one leader (the Lease's holder, the one labelled), and the webhook reached
//! by the API server through its Service — a labelled pod gets its share
//! injected, and a pod naming an unknown job is denied with the message.

use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use saleslayer_contract::{ANNOTATION_INJECTED, env};

use crate::operator::{SELECTOR, healthy, install, installed, lease_holder, simulator};
use crate::support::{
    DEADLINE, OPERATOR_NS, all_ready, apply, client, eventually, exclusive, namespace, pod_env,
    running_pods, setup, try_apply,
};
use crate::workload::catalog;

fn labelled_pod(namespace: &str, name: &str, job: &str, image: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"saleslayer.io/integration": "catalog", "saleslayer.io/job": job}},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532},
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                            "command": ["sh", "-c", "while true; do sleep 1; done"],
                            "securityContext": {"readOnlyRootFilesystem": true,
                                                "allowPrivilegeEscalation": false,
                                                "capabilities": {"drop": ["ALL"]}}}]
        }
    })
    .to_string()
}

#[tokio::test]
async fn s1_helm_install_runs_two_replicas_with_one_leader_and_a_webhook_behind_its_service() {
    let _guard = exclusive().await;
    simulator().await;
    let begun = Instant::now();
    if !installed().await {
        let took = install().await;
        println!("s1: helm install --wait took {:.1} s", took.as_secs_f64());
    }
    let client = client().await;
    let leader = healthy(&client).await;
    println!(
        "s1: two replicas Ready and one leader ({leader}) {:.1} s after helm install began",
        begun.elapsed().as_secs_f64()
    );
    assert_eq!(
        lease_holder(&client).await.as_deref(),
        Some(leader.as_str())
    );
    let image = &setup().await.operator_image;
    for pod in running_pods(&client, OPERATOR_NS, SELECTOR).await {
        let spec = pod.spec.expect("a spec");
        let container = &spec.containers[0];
        assert_eq!(container.image.as_deref(), Some(image.as_str()));
        assert_eq!(container.image_pull_policy.as_deref(), Some("Never"));
        let security = container
            .security_context
            .as_ref()
            .expect("a security context");
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.run_as_non_root, Some(true));
    }

    // The API server calls the webhook at its Service's pod endpoints.
    let namespace = namespace("s1").await;
    apply(&catalog(&namespace, "acme-s1", &[])).await;
    let workload = &setup().await.workload_image;
    let created = Instant::now();
    apply(&labelled_pod(
        &namespace,
        "importer",
        "product-import",
        workload,
    ))
    .await;
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let pod = pods.get("importer").await.expect("the pod was admitted");
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    assert!(
        annotations.contains_key(ANNOTATION_INJECTED),
        "{annotations:?}"
    );
    let share = pod_env(&pod, env::RATE_REQUESTS).expect("a share was injected");
    println!(
        "s1: a labelled pod admitted through the webhook Service in {:.0} ms with a share of {share} requests",
        created.elapsed().as_secs_f64() * 1000.0
    );
    eventually("the admitted pod to run", DEADLINE, || async {
        running_pods(&client, &namespace, "saleslayer.io/job=product-import")
            .await
            .into_iter()
            .find(all_ready)
    })
    .await;

    let (admitted, message) = try_apply(&labelled_pod(
        &namespace,
        "stranger",
        "no-such-job",
        workload,
    ))
    .await;
    assert!(!admitted, "a pod of an unknown job is denied");
    assert!(
        message.contains("no-such-job") && message.contains("product-import"),
        "the denial names the job and the registered ones: {message}"
    );
    println!("s1: a pod of an unknown job is denied: {}", message.trim());
}
