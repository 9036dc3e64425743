//! Scenario 7 (issue 14): the batch client `catalog-sync` as a Kubernetes
//! Job (`examples/catalog-sync-job.yaml`), paced by its injected sidecar,
//! its checkpoint on a PersistentVolumeClaim. Its pod is deleted halfway; the
//! Job's next pod resumes after the last checkpointed page, and the
//! simulator's `/stats` show that no finished page was fetched again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::Client;
use serde_json::{Value, json};

use crate::operator;
use crate::support::{DEADLINE, client, eventually, kubectl, node, running_pods};
use crate::workload::{example, key_stats, manifest, name, with_integration};

const ACCOUNT: &str = "acme-s7";
/// The simulator's catalog and the Job's page size.
const PRODUCTS: u64 = 5_000;
const PAGE_SIZE: u64 = 50;
const PAGES: u64 = PRODUCTS / PAGE_SIZE;
/// The image's user, who must be able to write the checkpoint.
const USER: u32 = 65532;

/// The checkpoint the Job's pods keep, read from the volume's directory.
fn checkpoint(dir: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join("checkpoint.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn pages(checkpoint: &Value) -> u64 {
    checkpoint["pages"].as_u64().unwrap_or(0)
}

/// The example Job in `namespace` with its Secret and claim, plus a hostPath
/// PersistentVolume at `dir` bound to the claim (the node has no
/// provisioner).
async fn job_manifest(namespace: &str, dir: &Path) -> String {
    let image = &crate::support::setup().await.workload_image;
    let volume = format!("catalog-sync-{namespace}");
    let mut objects = Vec::new();
    for mut object in example("catalog-sync-job.yaml") {
        object["metadata"]["namespace"] = json!(namespace);
        match object["kind"].as_str() {
            Some("Secret") => object["stringData"]["api-key"] = json!(ACCOUNT),
            Some("PersistentVolumeClaim") => {
                object["spec"]["storageClassName"] = json!("");
                object["spec"]["volumeName"] = json!(volume);
            }
            Some("Job") => {
                let container = &mut object["spec"]["template"]["spec"]["containers"][0];
                container["image"] = json!(image);
            }
            _ => {}
        }
        objects.push(object);
    }
    objects.push(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": volume},
        "spec": {
            "capacity": {"storage": "16Mi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "claimRef": {"namespace": namespace, "name": "catalog-sync-state"},
            "hostPath": {"path": dir.display().to_string(), "type": "Directory"},
        }
    }));
    manifest(&objects)
}

/// The volume's directory on the node, owned by the image's user.
async fn volume_dir(namespace: &str) -> PathBuf {
    let dir = node().await.dir().join("volumes").join(namespace);
    std::fs::create_dir_all(&dir).expect("the volume's directory");
    std::os::unix::fs::chown(&dir, Some(USER), Some(USER)).expect("chown the volume's directory");
    dir
}

/// The Job's pods that have not finished (the one running the sync).
async fn active_pod(client: &Client, namespace: &str) -> Option<String> {
    running_pods(client, namespace, "app=catalog-sync")
        .await
        .first()
        .map(name)
}

#[tokio::test]
async fn s7_a_killed_batch_job_resumes_without_fetching_finished_pages_again() {
    let _operator = operator::ready().await;
    let client = client().await;
    let namespace = with_integration("s7", ACCOUNT).await;
    let dir = volume_dir(&namespace).await;
    let (accepted_at_start, _) = key_stats(&client, ACCOUNT).await;
    let begun = Instant::now();
    crate::support::apply(&job_manifest(&namespace, &dir).await).await;

    // Halfway: the first pod has checkpointed half the pages.
    let first = eventually("the Job's pod half way through", DEADLINE, || async {
        let pod = active_pod(&client, &namespace).await?;
        (pages(&checkpoint(&dir)?) >= PAGES / 2).then_some(pod)
    })
    .await;
    let halfway = begun.elapsed();
    // Deleted as an eviction or a drain would: SIGTERM, and gone once the
    // kubelet has stopped its containers.
    kubectl(&["-n", &namespace, "delete", "pod", &first, "--wait=true"]).await;
    let killed_at = checkpoint(&dir).expect("a checkpoint after the kill");
    let (accepted_at_kill, _) = key_stats(&client, ACCOUNT).await;
    let fetched = accepted_at_kill - accepted_at_start;
    assert!(
        killed_at["done"] == json!(false) && pages(&killed_at) < PAGES,
        "the first pod was stopped before the end: {killed_at}"
    );
    // At most the page in flight at the kill was fetched and not checkpointed.
    assert!(
        fetched == pages(&killed_at) || fetched == pages(&killed_at) + 1,
        "{fetched} pages fetched by the first pod, {} checkpointed",
        pages(&killed_at)
    );

    // The Job replaces the pod; the new one resumes and completes.
    let second = eventually("the Job complete", Duration::from_secs(300), || async {
        let job = kubectl(&["-n", &namespace, "get", "job", "catalog-sync", "-o", "json"]).await;
        let job: Value = serde_json::from_str(&job).ok()?;
        (job["status"]["succeeded"].as_u64() == Some(1)).then_some(())?;
        let pods = kubectl(&[
            "-n",
            &namespace,
            "get",
            "pods",
            "-l",
            "app=catalog-sync",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.phase}{\"\\n\"}{end}",
        ])
        .await;
        pods.lines()
            .find(|line| line.ends_with(" Succeeded"))
            .and_then(|line| line.split(' ').next())
            .map(str::to_owned)
    })
    .await;
    let took = begun.elapsed();
    assert_ne!(second, first, "a new pod finished the sync");
    let done = checkpoint(&dir).expect("the final checkpoint");
    assert_eq!(
        (
            done["done"].as_bool(),
            done["items"].as_u64(),
            pages(&done),
            done["lastId"].as_u64()
        ),
        (Some(true), Some(PRODUCTS), PAGES, Some(PRODUCTS)),
        "the whole catalog synced: {done}"
    );
    let (accepted_at_end, throttled) = key_stats(&client, ACCOUNT).await;
    assert_eq!(
        accepted_at_end - accepted_at_kill,
        PAGES - pages(&killed_at),
        "the resumed pod fetched exactly the pages after the checkpoint"
    );
    assert_eq!(throttled, 0, "the sidecars kept the Job under the limit");
    let logs = kubectl(&["-n", &namespace, "logs", &second, "-c", "sync"]).await;
    assert!(
        logs.contains(&format!(
            "resuming after product {}",
            killed_at["lastId"].as_u64().unwrap_or(0)
        )),
        "the new pod says where it resumed:\n{logs}"
    );
    println!(
        "s7: pod {first} deleted at page {} of {PAGES} ({:.1} s after the Job was created); \
         {second} resumed and finished at {:.1} s; the simulator accepted {fetched} pages before \
         the kill and {} after, 0 throttled",
        pages(&killed_at),
        halfway.as_secs_f64(),
        took.as_secs_f64(),
        accepted_at_end - accepted_at_kill
    );
    let first_line = logs.lines().find(|l| l.contains("resuming")).unwrap_or("");
    println!("s7: kubectl logs {second} -c sync | grep resuming\n{first_line}");
}
