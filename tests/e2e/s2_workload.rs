//! Scenario 2: the example integration and its workloads
//! (`examples/catalog.yaml`, `examples/workload.yaml`): real pods annotated
//! `saleslayer.io/proxy: "true"` run with the injected native sidecar, call
//! `$SALESLAYER_API_URL` in a loop against the simulator (a pod behind a
//! Service) as fast as the sidecar lets them, and get no 429 while their
//! sidecars renew their leases.

use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use saleslayer_contract::PROXY_CONTAINER;

use crate::operator;
use crate::support::{DEADLINE, client, eventually, kubectl};
use crate::workload::{Sidecar, key_stats, name, run, sidecar, with_integration};

const ACCOUNT: &str = "acme-s2";

fn has_native_sidecar(pod: &Pod) -> bool {
    let declared = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.name == PROXY_CONTAINER && c.restart_policy.as_deref() == Some("Always"))
        });
    let started = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.name == PROXY_CONTAINER && c.started == Some(true) && c.ready)
        });
    declared && started
}

#[tokio::test]
async fn s2_example_workloads_run_with_their_sidecars_and_get_no_429() {
    let _operator = operator::ready().await;
    let client = client().await;
    let namespace = with_integration("s2", ACCOUNT).await;
    let begun = Instant::now();
    let mut pods = Vec::new();
    for (job, replicas) in [("product-import", 2), ("price-sync", 1), ("stock-sync", 1)] {
        pods.extend(run(&client, &namespace, job, ACCOUNT, replicas).await);
    }
    println!(
        "s2: {} workload pods Running with their sidecars {:.1} s after the first apply",
        pods.len(),
        begun.elapsed().as_secs_f64()
    );
    for pod in &pods {
        assert!(
            has_native_sidecar(pod),
            "{} runs the native sidecar",
            name(pod)
        );
    }
    let (accepted_before, _) = key_stats(&client, ACCOUNT).await;
    let counting = Instant::now();

    // Two windows of the account's period at least, and every sidecar on a
    // renewed lease with answers served.
    let figures: Vec<(String, Sidecar)> = eventually(
        "every sidecar on a renewed lease, two windows served",
        DEADLINE,
        || async {
            let mut figures = Vec::new();
            for pod in &pods {
                let figure = sidecar(&client, &namespace, &name(pod)).await?;
                (figure.on_lease && figure.renewals_ok >= 2.0 && figure.ok >= 3.0).then_some(())?;
                figures.push((name(pod), figure));
            }
            (counting.elapsed().as_secs() >= 20).then_some(figures)
        },
    )
    .await;
    let (accepted, throttled) = key_stats(&client, ACCOUNT).await;
    let seconds = counting.elapsed().as_secs_f64();
    assert_eq!(
        throttled, 0,
        "the simulator throttled none of {ACCOUNT}'s requests"
    );
    for (pod, figure) in &figures {
        assert_eq!(figure.throttled, 0.0, "{pod}'s sidecar saw no throttling");
        println!(
            "s2: {pod}: lease {} requests / {} s, {} answers 200, {} lease renewals",
            figure.grant_requests, figure.grant_period_seconds, figure.ok, figure.renewals_ok
        );
    }
    let rate = (accepted - accepted_before) as f64 / seconds * 10.0;
    println!(
        "s2: the simulator accepted {} requests of {ACCOUNT} in {seconds:.1} s ({rate:.1} per 10 s; usable 40, limit 50), throttled 0",
        accepted - accepted_before
    );
    let first = name(&pods[0]);
    let logs = kubectl(&["-n", &namespace, "logs", &first, "-c", "sync", "--tail=4"]).await;
    println!("s2: kubectl logs {first} -c sync --tail=4\n{logs}");
}
