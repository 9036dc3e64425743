//! Scenario 4: `kubectl rollout restart` of the operator while a Job keeps
//! creating labelled pods, and this test creates one more every 100 ms
//! (never scheduled: a node selector nothing matches, so only admission is
//! exercised): no pod is denied (no `FailedCreate`, no refused create), every
//! pod created meanwhile carries its injected share, and no share is above
//! the plan (the job's allocation in the integration's status).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ListParams, PostParams};
use saleslayer_contract::{ANNOTATION_INJECTED, env};
use serde_json::json;

use crate::operator::{self, healthy};
use crate::support::{
    DEADLINE, OPERATOR_NS, RELEASE, apply, client, eventually, kubectl, pod_env, setup,
};
use crate::workload::with_integration;

const ACCOUNT: &str = "acme-s4";

fn job(namespace: &str, image: &str) -> String {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "batch", "namespace": namespace},
        "spec": {
            "completions": 5000,
            "parallelism": 4,
            "backoffLimit": 1000,
            "template": {
                "metadata": {"labels": {"saleslayer.io/integration": "catalog",
                                        "saleslayer.io/job": "product-import"}},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532},
                    "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                                    "command": ["true"],
                                    "securityContext": {"readOnlyRootFilesystem": true,
                                                        "allowPrivilegeEscalation": false,
                                                        "capabilities": {"drop": ["ALL"]}}}]
                }
            }
        }
    })
    .to_string()
}

/// A labelled pod that no node will run: admission only.
fn unschedulable(namespace: &str, image: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "admitted-", "namespace": namespace,
                     "labels": {"saleslayer.io/integration": "catalog",
                                "saleslayer.io/job": "product-import"}},
        "spec": {
            "nodeSelector": {"e2e.saleslayer.io/nowhere": "true"},
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never"}]
        }
    }))
    .expect("a pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_a_rollout_restart_denies_no_pod_and_gives_none_more_than_the_plan() {
    let _operator = operator::ready().await;
    let client = client().await;
    let namespace = with_integration("s4", ACCOUNT).await;
    apply(&job(&namespace, &setup().await.workload_image)).await;
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    eventually("the Job to have made a few pods", DEADLINE, || async {
        let made = pods.list(&ListParams::default()).await.ok()?.items.len();
        (made >= 4).then_some(())
    })
    .await;

    let operator_pods = Api::<Pod>::namespaced(client.clone(), OPERATOR_NS);
    let old: Vec<String> = operator_pods
        .list(&ListParams::default().labels(operator::SELECTOR))
        .await
        .expect("the operator's pods")
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let creating = Arc::new(AtomicBool::new(true));
    let creator = {
        let (pods, creating) = (pods.clone(), creating.clone());
        let pod = unschedulable(&namespace, &setup().await.workload_image);
        tokio::spawn(async move {
            let mut refused = Vec::new();
            let mut created = 0;
            while creating.load(Ordering::Relaxed) {
                match pods.create(&PostParams::default(), &pod).await {
                    Ok(_) => created += 1,
                    Err(error) => refused.push(error.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (created, refused)
        })
    };
    let started = Timestamp::now();
    let begun = Instant::now();
    kubectl(&[
        "-n",
        OPERATOR_NS,
        "rollout",
        "restart",
        &format!("deployment/{RELEASE}"),
    ])
    .await;
    kubectl(&[
        "-n",
        OPERATOR_NS,
        "rollout",
        "status",
        &format!("deployment/{RELEASE}"),
        "--timeout=300s",
    ])
    .await;
    let leader = healthy(&client).await;
    let rolled = begun.elapsed();
    // The old replicas serve until they are gone: the window ends then.
    eventually("the old replicas to be gone", DEADLINE, || async {
        let names: Vec<String> = operator_pods
            .list(&ListParams::default().labels(operator::SELECTOR))
            .await
            .ok()?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        old.iter().all(|o| !names.contains(o)).then_some(())
    })
    .await;
    let took = begun.elapsed();
    let ended = Timestamp::now();
    creating.store(false, Ordering::Relaxed);
    let (created, refused) = creator.await.expect("the creator ran");
    kubectl(&["-n", &namespace, "delete", "job", "batch", "--wait=false"]).await;
    assert!(
        refused.is_empty(),
        "creates refused during the rollout: {refused:#?}"
    );

    let status = kubectl(&["-n", &namespace, "get", "sli", "catalog", "-o", "json"]).await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    let allocated = status["status"]["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["name"] == "product-import"))
        .and_then(|j| j["allocatedRequests"].as_u64())
        .expect("product-import's allocation in the status");

    let during: Vec<Pod> = pods
        .list(&ListParams::default().labels("saleslayer.io/job=product-import"))
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.creation_timestamp.as_ref().is_some_and(|t| {
                // Creation times have whole seconds.
                t.0 >= started - Duration::from_secs(1) && t.0 <= ended
            })
        })
        .collect();
    assert!(!during.is_empty(), "the Job made pods during the rollout");
    for pod in &during {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        assert!(
            annotations.contains_key(ANNOTATION_INJECTED),
            "{name} was injected"
        );
        let share: u64 = pod_env(pod, env::RATE_REQUESTS)
            .and_then(|s| s.parse().ok())
            .expect("an injected share");
        assert!(
            (1..=allocated).contains(&share),
            "{name}'s share {share} is within the job's allocation {allocated}"
        );
    }
    let denied: Vec<String> = Api::<Event>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default().fields("reason=FailedCreate"))
        .await
        .expect("events")
        .items
        .into_iter()
        .map(|e| e.message.unwrap_or_default())
        .collect();
    assert!(
        denied.is_empty(),
        "pods were refused during the rollout: {denied:#?}"
    );
    println!(
        "s4: rollout restart: new replicas Ready with a leader ({leader}) in {:.1} s, old ones gone in {:.1} s; \
         {} labelled pods created meanwhile ({} by the Job, {created} by the test from its start), none denied, \
         every share within the plan's {allocated}",
        rolled.as_secs_f64(),
        took.as_secs_f64(),
        during.len(),
        during
            .iter()
            .filter(|p| p.metadata.generate_name.as_deref() == Some("batch-"))
            .count()
    );
}
