//! Scenario 6: `helm upgrade` with a changed value rolls the Deployment
//! (new pods with the new setting, the old ones gone); `helm uninstall`
//! then leaves nothing of the release but what the chart's README says it
//! keeps: the CRD (Helm never deletes a chart's CRDs), and what the operator
//! made at run time — its CA Secret and leader Lease in its namespace, the
//! CA ConfigMap in the integrations' namespaces.

use std::collections::BTreeSet;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;

use crate::operator::{self, SELECTOR, chart_values, healthy};
use crate::support::{
    DEADLINE, OPERATOR_NS, RELEASE, all_ready, client, eventually, kubectl, node, output, root,
    running_pods, success,
};

/// `kind/name` of every object of these kinds, with `-n namespace` or cluster-wide.
async fn names(kinds: &str, namespace: Option<&str>) -> BTreeSet<String> {
    let mut args = vec!["get", kinds, "-o", "name"];
    if let Some(namespace) = namespace {
        args.extend(["-n", namespace]);
    }
    kubectl(&args).await.lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn s6_helm_upgrade_rolls_the_deployment_and_uninstall_leaves_only_what_the_readme_says() {
    let _operator = operator::ready().await;
    let client = client().await;
    let old: BTreeSet<String> = running_pods(&client, OPERATOR_NS, SELECTOR)
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();

    let begun = Instant::now();
    let mut upgrade = node().await.helm();
    upgrade
        .args(["upgrade", RELEASE])
        .arg(root().join("charts/saleslayer-operator"))
        .args(["-n", OPERATOR_NS, "--wait", "--timeout", "3m"]);
    for value in chart_values().await {
        upgrade.args(["--set", &value]);
    }
    upgrade.args(["--set", "logLevel=debug"]);
    success(&mut upgrade);
    let rolled = eventually(
        "two new Ready replicas and none of the old",
        DEADLINE,
        || async {
            let pods = running_pods(&client, OPERATOR_NS, SELECTOR).await;
            let names: BTreeSet<String> = pods
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            (pods.len() == 2 && pods.iter().all(all_ready) && names.is_disjoint(&old))
                .then_some(pods)
        },
    )
    .await;
    for pod in &rolled {
        let log = crate::support::pod_env(pod, "RUST_LOG");
        assert_eq!(
            log.as_deref(),
            Some("debug"),
            "the new pods run the new value"
        );
    }
    healthy(&client).await;
    println!(
        "s6: helm upgrade --set logLevel=debug rolled both replicas in {:.1} s",
        begun.elapsed().as_secs_f64()
    );

    let namespaced =
        "all,serviceaccounts,roles,rolebindings,secrets,configmaps,leases,poddisruptionbudgets";
    let cluster = "clusterroles,clusterrolebindings,mutatingwebhookconfigurations";
    let before_cluster = names(cluster, None).await;
    let begun = Instant::now();
    success(node().await.helm().args([
        "uninstall",
        RELEASE,
        "-n",
        OPERATOR_NS,
        "--wait",
        "--timeout",
        "3m",
    ]));
    let uninstalled = begun.elapsed();
    let pods = Api::<Pod>::namespaced(client.clone(), OPERATOR_NS);
    eventually("the operator's pods to be gone", DEADLINE, || async {
        let left = pods.list(&ListParams::default()).await.ok()?.items;
        left.is_empty().then_some(())
    })
    .await;
    println!(
        "s6: helm uninstall took {:.1} s; the operator's pods were gone {:.1} s after it began",
        uninstalled.as_secs_f64(),
        begun.elapsed().as_secs_f64()
    );

    let left = names(namespaced, Some(OPERATOR_NS)).await;
    let expected: BTreeSet<String> = [
        // What the operator made at run time (the chart's README).
        "secret/saleslayer-operator-tls",
        "lease.coordination.k8s.io/saleslayer-operator",
        // What Kubernetes puts in every namespace.
        "serviceaccount/default",
        "configmap/kube-root-ca.crt",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(left, expected, "left in {OPERATOR_NS}");
    let gone: BTreeSet<String> = before_cluster
        .difference(&names(cluster, None).await)
        .cloned()
        .collect();
    let release_objects = [
        format!("clusterrole.rbac.authorization.k8s.io/{RELEASE}"),
        format!("clusterrolebinding.rbac.authorization.k8s.io/{RELEASE}"),
        format!("mutatingwebhookconfiguration.admissionregistration.k8s.io/{RELEASE}"),
    ];
    for object in &release_objects {
        assert!(gone.contains(object), "{object} was removed");
    }
    let (crd, _, _) =
        output(
            node()
                .await
                .kubectl()
                .args(["get", "crd", "saleslayerintegrations.saleslayer.io"]),
        );
    assert!(crd, "the CRD stays (Helm never deletes a chart's crds/)");
    println!(
        "s6: after helm uninstall, {OPERATOR_NS} holds only {left:?}; the CRD stays; {} cluster objects removed",
        gone.len()
    );
}
