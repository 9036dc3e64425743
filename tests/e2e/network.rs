//! Network safety (a hard rule, DESIGN.md §9) and cluster networking: a dial
//! to a ClusterIP nobody has fails locally at once, from the node's network
//! namespace and from a pod; a pod reaches no address outside the node, not
//! even the host's end of the link; names outside the cluster do not
//! resolve; and pods reach Services by name, themselves included.
//!
//! Times are printed, never asserted: the assertion is on the kind of
//! failure (unreachable or refused, never a timeout).

use std::net::Ipv4Addr;
use std::time::Instant;

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;

use crate::support::{DEADLINE, apply, client, eventually, namespace, node, output};
use crate::workload::{exec, manifest, probe};

/// An address in the Service range (10.96.0.0/24) that no Service holds.
async fn unassigned_cluster_ip() -> Ipv4Addr {
    let services = Api::<Service>::all(client().await)
        .list(&ListParams::default())
        .await
        .expect("services");
    let taken: Vec<String> = services
        .items
        .iter()
        .filter_map(|s| s.spec.as_ref()?.cluster_ip.clone())
        .collect();
    (200..250)
        .map(|last| Ipv4Addr::new(10, 96, 0, last))
        .find(|ip| !taken.contains(&ip.to_string()))
        .expect("a free ClusterIP")
}

/// A connection error that happened locally, not a timeout.
fn refused_locally(message: &str) -> bool {
    let message = message.to_lowercase();
    (message.contains("unreachable")
        || message.contains("refused")
        || message.contains("no route to host"))
        && !message.contains("timed out")
}

#[tokio::test]
async fn an_unassigned_cluster_ip_fails_at_once_from_the_node() {
    let node = node().await;
    let ip = unassigned_cluster_ip().await;
    let begun = Instant::now();
    let (ok, _, stderr) = output(
        node.enter("bash")
            .args(["-c", &format!("exec 3<>/dev/tcp/{ip}/443")]),
    );
    let took = begun.elapsed();
    assert!(!ok, "nothing answers on {ip}");
    assert!(refused_locally(&stderr), "{stderr}");
    println!(
        "node namespace -> {ip}:443 failed in {:.1} ms: {}",
        took.as_secs_f64() * 1000.0,
        stderr.lines().last().unwrap_or_default()
    );
}

#[tokio::test]
async fn a_pod_reaches_nothing_outside_the_node() {
    let node = node().await;
    let client = client().await;
    let namespace = namespace("network").await;
    probe(&client, &namespace, "probe").await;
    let unassigned = unassigned_cluster_ip().await;
    let targets = [
        (format!("{unassigned}"), "an unassigned ClusterIP"),
        ("1.1.1.1".to_owned(), "an outside address"),
        ("192.0.2.1".to_owned(), "the documentation range"),
        (node.host_ip().to_string(), "the host's end of the link"),
    ];
    for (address, what) in &targets {
        let (ok, said, took) = exec(
            &namespace,
            "probe",
            "main",
            &format!("nc -w 30 {address} 443 </dev/null"),
        )
        .await;
        assert!(!ok, "{what} {address} answered a pod: {said}");
        assert!(refused_locally(&said), "{what} {address}: {said}");
        println!(
            "pod -> {what} {address}:443 failed in {:.0} ms (kubectl exec included): {}",
            took.as_secs_f64() * 1000.0,
            said.lines().next().unwrap_or_default()
        );
    }
    let (ok, said, _) = exec(&namespace, "probe", "main", "nslookup example.com").await;
    assert!(!ok && said.contains("NXDOMAIN"), "{said}");
    println!("pod: example.com does not resolve (NXDOMAIN from the node's CoreDNS)");
}

#[tokio::test]
async fn pods_reach_services_by_name() {
    let client = client().await;
    let namespace = namespace("dns").await;
    let image = &crate::support::setup().await.workload_image;
    let web = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": namespace, "labels": {"app": "web"}},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532},
            "containers": [{
                "name": "main",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", "echo hello > /www/index.html && exec httpd -f -p 8080 -h /www"],
                "volumeMounts": [{"name": "www", "mountPath": "/www"}],
                "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                    "capabilities": {"drop": ["ALL"]}}
            }],
            "volumes": [{"name": "www", "emptyDir": {}}]
        }
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "site", "namespace": namespace},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
    });
    apply(&manifest(&[web, service])).await;
    probe(&client, &namespace, "probe").await;
    for (pod, container) in [("probe", "main"), ("web", "main")] {
        // Not named `web` as the pod is: a pod's own name resolves to
        // itself through its /etc/hosts.
        for url in [
            "http://site/".to_owned(),
            format!("http://site.{namespace}.svc.cluster.local/"),
        ] {
            let said = eventually(&format!("{pod} gets {url}"), DEADLINE, || async {
                let (ok, said, _) =
                    exec(&namespace, pod, container, &format!("wget -q -O - {url}")).await;
                ok.then_some(said)
            })
            .await;
            assert_eq!(said.trim(), "hello");
        }
    }
    println!("pods reach the Service site by its short and full names, the web pod behind it too");
}
