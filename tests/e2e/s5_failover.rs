//! Scenario 5: the leader's pod goes away, twice. First deleted as users
//! delete pods (SIGTERM: it releases the Lease), then crashed (its process
//! killed with SIGKILL through containerd and its pod force-deleted: the
//! Lease must expire). Each time a follower takes the Lease and the leader
//! label; sampled every ~100 ms throughout, never two replicas report
//! `saleslayer_leader 1` nor carry the label at once; and the workloads'
//! sidecars keep pacing on their leases meanwhile (on a lease at every
//! sample, answers served, nothing throttled) and renew them with the new
//! leader. The failover times are printed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kube::Client;

use crate::operator::{self, SELECTOR, healthy, leaders, lease_holder};
use crate::support::{
    DEADLINE, OPERATOR_NS, client, eventually, kubectl, metric, node, pod_metrics, running_pods,
    success,
};
use crate::workload::{Sidecar, key_stats, name, run, sidecar, with_integration};

const ACCOUNT: &str = "acme-s5";
/// The operator's metrics port (the chart's `metrics` port).
const METRICS_PORT: u16 = 8080;
/// How long one sample may wait for a pod's /metrics (a pod being torn
/// down can leave a proxied request hanging).
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Replicas whose /metrics say `saleslayer_leader 1`.
async fn writers(client: &Client) -> usize {
    let mut count = 0;
    for pod in running_pods(client, OPERATOR_NS, SELECTOR).await {
        let name = pod.metadata.name.unwrap_or_default();
        let scraped = tokio::time::timeout(
            SAMPLE_TIMEOUT,
            pod_metrics(client, OPERATOR_NS, &name, METRICS_PORT),
        )
        .await
        .ok()
        .flatten();
        if scraped.is_some_and(|text| metric(&text, "saleslayer_leader", &[]) >= 1.0) {
            count += 1;
        }
    }
    count
}

async fn sidecars(client: &Client, namespace: &str, pods: &[String]) -> Vec<Option<Sidecar>> {
    let mut figures = Vec::new();
    for pod in pods {
        figures.push(
            tokio::time::timeout(SAMPLE_TIMEOUT, sidecar(client, namespace, pod))
                .await
                .ok()
                .flatten(),
        );
    }
    figures
}

/// What the watcher saw while it ran.
#[derive(Default)]
struct Watch {
    stop: AtomicBool,
    samples: AtomicUsize,
    most_labelled: AtomicUsize,
    most_writers: AtomicUsize,
    sidecar_samples: AtomicUsize,
    off_lease: AtomicUsize,
}

/// Delete (or crash) the leader; the successor and the failover time.
async fn hand_over(client: &Client, leader: &str, crash: bool) -> (String, Duration) {
    let begun = Instant::now();
    if crash {
        let pod = running_pods(client, OPERATOR_NS, SELECTOR)
            .await
            .into_iter()
            .find(|p| p.metadata.name.as_deref() == Some(leader))
            .expect("the leader's pod");
        let container = pod
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.first().and_then(|c| c.container_id.clone()))
            .expect("the leader's container");
        let id = container.trim_start_matches("containerd://");
        success(
            node()
                .await
                .ctr()
                .args(["tasks", "kill", "--signal", "SIGKILL", id]),
        );
        kubectl(&[
            "-n",
            OPERATOR_NS,
            "delete",
            "pod",
            leader,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ])
        .await;
    } else {
        kubectl(&["-n", OPERATOR_NS, "delete", "pod", leader, "--wait=false"]).await;
    }
    let successor = eventually(
        "a follower to take the Lease and the label",
        DEADLINE,
        || async {
            let holder = lease_holder(client).await?;
            let labelled = leaders(client).await;
            (holder != leader && labelled == [holder.clone()]).then_some(holder)
        },
    )
    .await;
    (successor, begun.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_the_leader_going_away_hands_over_to_one_follower_while_sidecars_keep_pacing() {
    let _operator = operator::ready().await;
    let client = client().await;
    let namespace = with_integration("s5", ACCOUNT).await;
    let workloads: Vec<String> = run(&client, &namespace, "product-import", ACCOUNT, 2)
        .await
        .iter()
        .map(name)
        .collect();
    eventually("both sidecars on a lease", DEADLINE, || async {
        sidecars(&client, &namespace, &workloads)
            .await
            .iter()
            .all(|s| s.is_some_and(|s| s.on_lease))
            .then_some(())
    })
    .await;

    let watch = Arc::new(Watch::default());
    let watcher = {
        let (client, watch) = (client.clone(), watch.clone());
        let (namespace, workloads) = (namespace.clone(), workloads.clone());
        tokio::spawn(async move {
            while !watch.stop.load(Ordering::Relaxed) {
                watch
                    .most_labelled
                    .fetch_max(leaders(&client).await.len(), Ordering::Relaxed);
                watch
                    .most_writers
                    .fetch_max(writers(&client).await, Ordering::Relaxed);
                for figure in sidecars(&client, &namespace, &workloads)
                    .await
                    .into_iter()
                    .flatten()
                {
                    watch.sidecar_samples.fetch_add(1, Ordering::Relaxed);
                    if !figure.on_lease {
                        watch.off_lease.fetch_add(1, Ordering::Relaxed);
                    }
                }
                watch.samples.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let (_, throttled_before) = key_stats(&client, ACCOUNT).await;
    let mut report = Vec::new();
    for crash in [false, true] {
        let leader = healthy(&client).await;
        let before = sidecars(&client, &namespace, &workloads).await;
        let (successor, failover) = hand_over(&client, &leader, crash).await;
        // The sidecars renew with the new leader, and were served meanwhile.
        eventually(
            "every sidecar to renew its lease with the new leader",
            DEADLINE,
            || async {
                let now = sidecars(&client, &namespace, &workloads).await;
                now.iter()
                    .zip(&before)
                    .all(|(now, before)| match (now, before) {
                        (Some(now), Some(before)) => {
                            now.on_lease
                                && now.renewals_ok > before.renewals_ok
                                && now.ok > before.ok
                        }
                        _ => false,
                    })
                    .then_some(())
            },
        )
        .await;
        let back = healthy(&client).await;
        report.push(format!(
            "{} {leader}: {successor} led {:.1} s later (new leader after recovery: {back})",
            if crash {
                "crashed (SIGKILL, pod force-deleted)"
            } else {
                "deleted"
            },
            failover.as_secs_f64()
        ));
    }
    watch.stop.store(true, Ordering::Relaxed);
    let _ = watcher.await;

    let (_, throttled) = key_stats(&client, ACCOUNT).await;
    assert_eq!(
        throttled, throttled_before,
        "nothing was throttled meanwhile"
    );
    let labelled = watch.most_labelled.load(Ordering::Relaxed);
    let writing = watch.most_writers.load(Ordering::Relaxed);
    let off_lease = watch.off_lease.load(Ordering::Relaxed);
    assert!(labelled <= 1, "two pods carried the leader label at once");
    assert!(
        writing <= 1,
        "two replicas reported saleslayer_leader 1 at once"
    );
    assert_eq!(
        off_lease, 0,
        "a sidecar fell off its lease during a failover"
    );
    for line in &report {
        println!("s5: {line}");
    }
    println!(
        "s5: {} samples: at most {labelled} pod labelled leader and {writing} replica writing at once; \
         {} sidecar samples, every one on its lease; nothing throttled",
        watch.samples.load(Ordering::Relaxed),
        watch.sidecar_samples.load(Ordering::Relaxed)
    );
}
