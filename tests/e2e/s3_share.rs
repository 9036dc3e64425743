//! Scenario 3: a weight change reaches a running pod at the three speeds
//! the README states: the pod's `saleslayer.io/limit` annotation (the
//! controller), the limit file the kubelet refreshes from it (downward API),
//! and the sidecar's lease. Each time is measured from the `kubectl apply`
//! and printed.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use saleslayer_contract::{ANNOTATION_LIMIT, LIMIT_FILE};
use serde_json::Value;

use crate::operator;
use crate::support::{DEADLINE, apply, client};
use crate::workload::{catalog, exec, name, run, sidecar, with_integration};

const ACCOUNT: &str = "acme-s3";

fn requests(limit: &str) -> Option<u64> {
    serde_json::from_str::<Value>(limit).ok()?["requests"].as_u64()
}

#[tokio::test]
async fn s3_a_weight_change_reaches_a_running_pod_through_the_file_and_its_lease() {
    let _operator = operator::ready().await;
    let client = client().await;
    let namespace = with_integration("s3", ACCOUNT).await;
    let pod = name(&run(&client, &namespace, "product-import", ACCOUNT, 1).await[0]);
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let annotation = || async {
        pods.get(&pod)
            .await
            .ok()
            .and_then(|p| p.metadata.annotations?.get(ANNOTATION_LIMIT).cloned())
            .and_then(|l| requests(&l))
    };
    let file = || async {
        let (ok, text, _) = exec(&namespace, &pod, "sync", &format!("cat {LIMIT_FILE}")).await;
        ok.then(|| requests(&text)).flatten()
    };
    let lease = || async {
        sidecar(&client, &namespace, &pod)
            .await
            .filter(|s| s.on_lease)
            .map(|s| s.grant_requests as u64)
    };
    // Settled: the annotation, the file and the lease agree.
    let before = crate::support::eventually("the share settled in all three", DEADLINE, || async {
        let (a, f, l) = (annotation().await?, file().await?, lease().await?);
        (a == f && f == l).then_some(a)
    })
    .await;

    // Weights 3:1:1 give product-import 24 of 40; 1:1:1 (price-sync capped
    // at 8) give it 16.
    let changed = Instant::now();
    apply(&catalog(&namespace, ACCOUNT, &[("product-import", 1)])).await;
    let mut seen: [Option<Duration>; 3] = [None; 3];
    let mut values = [before; 3];
    while seen.iter().any(Option::is_none) {
        assert!(
            changed.elapsed() < DEADLINE + Duration::from_secs(60),
            "the new share reached the pod only partly: {seen:?} {values:?}"
        );
        let now = [annotation().await, file().await, lease().await];
        for (i, value) in now.into_iter().enumerate() {
            if let Some(value) = value
                && seen[i].is_none()
                && value != before
            {
                seen[i] = Some(changed.elapsed());
                values[i] = value;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(values[0], values[1], "the file holds the annotation");
    assert!(
        values[2] <= values[0],
        "the lease grants no more than the plan"
    );
    let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
    println!(
        "s3: product-import's share {before} -> {} after the weight change: annotation {:.1} s, limit file {:.1} s, lease {:.1} s (lease {} requests)",
        values[0],
        secs(seen[0]),
        secs(seen[1]),
        secs(seen[2]),
        values[2]
    );
}
