//! The Helm chart (`charts/saleslayer-operator`) with the testenv's real
//! `helm`: it lints, renders with defaults and with every option on, refuses
//! a wrong-typed value by its schema, installs into a real API server, and its
//! ServiceAccount's RBAC is enough for the operator's whole job — run here out
//! of cluster while impersonating that account — and no more.

mod alerts;
mod render;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use saleslayer_core::api::SalesLayerIntegration;
use serde_json::json;

use crate::support::{ControlPlane, eventually, labelled_pod};
use crate::webhook::INTEGRATION;

const RELEASE: &str = "saleslayer-operator";
const NAMESPACE: &str = "saleslayer-system";
const ACCOUNT: &str = "system:serviceaccount:saleslayer-system:saleslayer-operator";

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/saleslayer-operator")
}

/// Every option of values.yaml switched on.
const EVERY_OPTION: [&str; 8] = [
    "networkPolicy.enabled=true",
    "networkPolicy.apiServerCIDRs={10.0.0.1/32}",
    "serviceMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "certManager.enabled=true",
    "rbac.notifySecretNames={slack-hook}",
    "webhook.failurePolicy=Ignore",
    "image.tag=0.1.0-test",
];

/// The testenv's `helm` with its state in `home`, not the user's.
fn helm(home: &Path) -> Command {
    let mut command = Command::new(saleslayer_testenv::bin_dir().join("helm"));
    command
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    command
}

/// Run `command`; (success, stdout, stderr).
fn output(command: &mut Command) -> (bool, String, String) {
    let out = command.output().expect("the command runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `command`, which must succeed; its stdout.
fn success(command: &mut Command) -> String {
    let (ok, stdout, stderr) = output(command);
    assert!(ok, "{command:?} failed:\n{stdout}{stderr}");
    stdout
}

/// `helm install` into `plane` (no `--wait`: no controller manager runs, so
/// no Deployment ever gets pods); the time it took.
fn install(plane: &ControlPlane, sets: &[&str]) -> Duration {
    let started = Instant::now();
    let mut command = plane.helm();
    command.args(["install", RELEASE]).arg(chart()).args([
        "--namespace",
        NAMESPACE,
        "--create-namespace",
    ]);
    for set in sets {
        command.args(["--set", set]);
    }
    success(&mut command);
    let took = started.elapsed();
    eprintln!("helm install took {:.2} s", took.as_secs_f64());
    took
}

/// `kubectl get` each object, which must exist.
fn assert_exist(plane: &ControlPlane, objects: &[(&str, &str, Option<&str>)]) {
    for (kind, name, namespace) in objects {
        let mut command = plane.kubectl();
        command.args(["get", kind, name, "-o", "name"]);
        if let Some(namespace) = namespace {
            command.args(["-n", namespace]);
        }
        let found = success(&mut command);
        assert!(found.trim().ends_with(&format!("/{name}")), "{found}");
    }
}

/// `kubectl auth can-i ... --as` the chart's ServiceAccount.
fn can_i(plane: &ControlPlane, args: &[&str]) -> bool {
    let (_, stdout, _) = output(
        plane
            .kubectl()
            .args(["auth", "can-i"])
            .args(args)
            .args(["--as", ACCOUNT]),
    );
    stdout.trim() == "yes"
}

/// A client of the test's admin that impersonates the chart's ServiceAccount:
/// what the operator is allowed to do in the cluster.
async fn impersonating(plane: &ControlPlane) -> Client {
    let mut kubeconfig = Kubeconfig::read_from(plane.kubeconfig()).expect("kubeconfig");
    for named in &mut kubeconfig.auth_infos {
        if let Some(user) = named.auth_info.as_mut() {
            user.impersonate = Some(ACCOUNT.into());
        }
    }
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

/// The catalog's account, and beside the catalog: an overcommitted account
/// that reports alerts through the Secret the chart lets it read, and a
/// Secret it must not read.
const MORE: &str = "---
apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerAccount
metadata: {name: acme-prod}
spec: {}
---
apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerAccount
metadata: {name: acme-test}
spec: {}
---
apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerIntegration
metadata: {name: overbooked, namespace: shop}
spec:
  account: acme-test
  jobs:
  - {name: a, minRequests: 30}
  - {name: b, minRequests: 30}
  alerting:
    notify: {secretRef: {name: slack-hook, key: url}}
---
apiVersion: v1
kind: Secret
metadata: {name: slack-hook, namespace: shop}
stringData: {url: 'http://127.0.0.1:9/hook'}
---
apiVersion: v1
kind: Secret
metadata: {name: unrelated, namespace: shop}
stringData: {password: hunter2}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installed_chart_lets_the_operator_do_its_whole_job_and_no_more() {
    let plane = ControlPlane::start().await.expect("control plane starts");
    let admin = plane.client().await.expect("client");
    install(&plane, &["rbac.notifySecretNames={slack-hook}"]);
    assert_exist(
        &plane,
        &[
            (
                "customresourcedefinition",
                "saleslayeraccounts.saleslayer.io",
                None,
            ),
            (
                "customresourcedefinition",
                "saleslayerintegrations.saleslayer.io",
                None,
            ),
            ("serviceaccount", RELEASE, Some(NAMESPACE)),
            ("deployment", RELEASE, Some(NAMESPACE)),
            ("service", "saleslayer-operator-webhook", Some(NAMESPACE)),
            ("service", "saleslayer-operator-quota", Some(NAMESPACE)),
            ("service", "saleslayer-operator-metrics", Some(NAMESPACE)),
            ("poddisruptionbudget", RELEASE, Some(NAMESPACE)),
            ("role", RELEASE, Some(NAMESPACE)),
            ("rolebinding", RELEASE, Some(NAMESPACE)),
            ("clusterrole", RELEASE, None),
            ("clusterrolebinding", RELEASE, None),
            ("mutatingwebhookconfiguration", RELEASE, None),
        ],
    );
    let helm_status = success(plane.helm().args(["status", RELEASE, "-n", NAMESPACE]));
    assert!(helm_status.contains("STATUS: deployed"), "{helm_status}");
    assert!(helm_status.contains("kubectl get sli -A"), "{helm_status}");

    plane
        .namespace(&admin, "shop")
        .await
        .expect("namespace shop");
    let manifests = plane.dir().join("integrations.yaml");
    std::fs::write(&manifests, format!("{INTEGRATION}{MORE}")).expect("write manifests");
    success(plane.kubectl().args(["apply", "-f"]).arg(&manifests));

    // The testenv's API server cannot reach in-cluster Services, so, as
    // admin, point the chart's webhook at the operator run here; the
    // operator itself then only patches the caBundle, as in a cluster.
    let (args, ports) = crate::support::run_args(NAMESPACE);
    let mut args = args;
    args.webhook_url = None;
    args.webhook_configuration = RELEASE.into();
    args.leader_elect = Some(true);
    let configurations = Api::<MutatingWebhookConfiguration>::all(admin.clone());
    let repoint = json!([{"op": "replace", "path": "/webhooks/0/clientConfig",
        "value": {"url": format!("https://127.0.0.1:{}/mutate", ports.webhook)}}]);
    configurations
        .patch(
            RELEASE,
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(repoint).expect("JSON Patch")),
        )
        .await
        .expect("repoint the webhook");

    let operator = impersonating(&plane).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(saleslayer_operator::operator::run(
        operator.clone(),
        args,
        async move {
            let _ = stopped.await;
        },
    ));

    // Its CA Secret, kept in its namespace, is what the caBundle trusts.
    let secrets = Api::<Secret>::namespaced(admin.clone(), NAMESPACE);
    let ca = eventually("the CA Secret", || async {
        let secret = secrets
            .get(saleslayer_operator::certs::SECRET_NAME)
            .await
            .map_err(|e| e.to_string())?;
        secret
            .data
            .and_then(|d| d.get("ca.crt").cloned())
            .ok_or_else(|| "no ca.crt".to_owned())
    })
    .await;
    eventually("the chart's caBundle patched", || async {
        let configuration = configurations
            .get(RELEASE)
            .await
            .map_err(|e| e.to_string())?;
        let bundle = configuration
            .webhooks
            .unwrap_or_default()
            .first()
            .and_then(|w| w.client_config.ca_bundle.clone());
        if bundle.as_ref() == Some(&ca) {
            Ok(())
        } else {
            Err(format!("{bundle:?}"))
        }
    })
    .await;

    // A labelled pod is injected through the chart's webhook configuration.
    let pods = Api::<Pod>::namespaced(admin.clone(), "shop");
    let first = eventually("the first pod injected", || async {
        let pod = labelled_pod(Some("import-0"), None, "catalog", "product-import");
        match pods.create(&PostParams::default(), &pod).await {
            Ok(pod) => Ok(pod),
            Err(error) => Err(error.to_string()),
        }
    })
    .await;
    let injected: Vec<String> = first.spec.as_ref().expect("spec").containers[0]
        .env
        .iter()
        .flatten()
        .map(|v| format!("{}={}", v.name, v.value.clone().unwrap_or_default()))
        .collect();
    assert!(
        injected.contains(&"SALESLAYER_RATE_REQUESTS=24".to_owned()),
        "{injected:?}"
    );
    pods.create(
        &PostParams::default(),
        &labelled_pod(Some("import-1"), None, "catalog", "product-import"),
    )
    .await
    .expect("second pod");

    // The controller writes status and rewrites the first pod's share.
    let slis = Api::<SalesLayerIntegration>::namespaced(admin.clone(), "shop");
    eventually("status with both pods", || async {
        let sli = slis.get("catalog").await.map_err(|e| e.to_string())?;
        let job = sli
            .status
            .as_ref()
            .and_then(|s| s.jobs.iter().find(|j| j.name == "product-import"))
            .map(|j| (j.allocated_requests, j.pods));
        if job == Some((24, 2)) {
            Ok(())
        } else {
            Err(format!("{job:?}"))
        }
    })
    .await;
    eventually("the first pod's limit annotation rewritten", || async {
        let pod = pods.get("import-0").await.map_err(|e| e.to_string())?;
        let limit = pod
            .metadata
            .annotations
            .and_then(|a| a.get("saleslayer.io/limit").cloned())
            .unwrap_or_default();
        if limit == r#"{"requests":12,"periodMillis":10000,"maxConcurrency":2}"# {
            Ok(())
        } else {
            Err(limit)
        }
    })
    .await;
    eventually("the CA ConfigMap in shop", || async {
        let map = Api::<ConfigMap>::namespaced(admin.clone(), "shop")
            .get("saleslayer-operator-ca")
            .await
            .map_err(|e| e.to_string())?;
        let published = map.data.and_then(|d| d.get("ca.crt").cloned());
        if published.as_deref().map(str::as_bytes) == Some(&ca.0[..]) {
            Ok(())
        } else {
            Err(format!("{published:?}"))
        }
    })
    .await;
    eventually("an Event on the integration", || async {
        let events = success(plane.kubectl().args([
            "-n",
            "shop",
            "get",
            "events",
            "-o",
            "jsonpath={range .items[*]}{.reason}{'\\n'}{end}",
        ]));
        if events.lines().any(|l| l == "AllocationChanged") {
            Ok(())
        } else {
            Err(events)
        }
    })
    .await;
    // The overcommitted account shows in the gauge the PrometheusRule reads.
    eventually("saleslayer_overcommitted", || async {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", ports.metrics))
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        let want = [
            r#"saleslayer_overcommitted{account="acme-test"} 1"#,
            r#"saleslayer_overcommitted{account="acme-prod"} 0"#,
        ];
        if want.iter().all(|line| text.contains(line)) {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;

    // It leads on the chart's Lease in its own namespace.
    let leases =
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(admin.clone(), NAMESPACE);
    eventually("the leader election Lease held", || async {
        let lease = leases.get(RELEASE).await.map_err(|e| e.to_string())?;
        let holder = lease.spec.and_then(|s| s.holder_identity);
        if holder.as_deref().is_some_and(|h| !h.is_empty()) {
            Ok(())
        } else {
            Err(format!("{holder:?}"))
        }
    })
    .await;

    // What it may do, and what it may not.
    for (args, allowed) in [
        (&["get", "secrets/slack-hook", "-n", "shop"][..], true),
        (&["get", "secrets/unrelated", "-n", "shop"][..], false),
        (&["list", "secrets", "-n", "shop"][..], false),
        (&["get", "secrets/unrelated", "-n", NAMESPACE][..], false),
        (
            &["get", "secrets/saleslayer-operator-tls", "-n", NAMESPACE][..],
            true,
        ),
        (&["create", "secrets", "-n", "shop"][..], false),
        (
            &["update", "leases/saleslayer-operator", "-n", NAMESPACE][..],
            true,
        ),
        (&["create", "leases", "-n", NAMESPACE][..], true),
        (&["update", "leases", "-n", "shop"][..], false),
        (&["create", "tokenreviews.authentication.k8s.io"][..], true),
        (&["watch", "saleslayeraccounts.saleslayer.io"][..], true),
        (
            &[
                "patch",
                "saleslayeraccounts.saleslayer.io/acme-prod",
                "--subresource=status",
            ][..],
            true,
        ),
        (
            &["patch", "saleslayeraccounts.saleslayer.io/acme-prod"][..],
            false,
        ),
        (
            &["delete", "saleslayeraccounts.saleslayer.io/acme-prod"][..],
            false,
        ),
        (&["list", "namespaces"][..], true),
        (
            &["patch", "configmaps/saleslayer-operator-ca", "-n", "shop"][..],
            true,
        ),
        (
            &["patch", "configmaps/kube-root-ca.crt", "-n", "shop"][..],
            false,
        ),
        (
            &["get", "configmaps/some-app-config", "-n", "shop"][..],
            false,
        ),
        (&["patch", "namespaces/shop"][..], false),
        (&["delete", "pods", "-n", "shop"][..], false),
        (&["patch", "pods", "-n", NAMESPACE][..], true),
        (&["list", "pods", "-n", NAMESPACE][..], true),
        (&["get", "pods", "-n", NAMESPACE][..], false),
        (
            &["get", "leases/saleslayer-operator", "-n", NAMESPACE][..],
            true,
        ),
        (&["get", "leases/someone-elses", "-n", NAMESPACE][..], false),
        (
            &["patch", "mutatingwebhookconfigurations/someone-elses"][..],
            false,
        ),
        (
            &["patch", "mutatingwebhookconfigurations/saleslayer-operator"][..],
            true,
        ),
    ] {
        assert_eq!(can_i(&plane, args), allowed, "can-i {args:?}");
    }
    let refused = Api::<Secret>::namespaced(operator.clone(), "shop")
        .get("unrelated")
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(status)) if status.code == 403),
        "{refused:?}"
    );
    let allowed = Api::<Secret>::namespaced(operator, "shop")
        .get("slack-hook")
        .await;
    assert!(allowed.is_ok(), "{allowed:?}");

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
}

/// Minimal stand-ins for the CRDs of the Prometheus Operator and
/// cert-manager, which the testenv does not have.
fn stand_in_crd(group: &str, kind: &str, plural: &str) -> String {
    format!(
        "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: {plural}.{group}}}
spec:
  group: {group}
  names: {{kind: {kind}, plural: {plural}, singular: {singular}, listKind: {kind}List}}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
---
",
        singular = kind.to_lowercase()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_option_installs_its_objects() {
    let plane = ControlPlane::start().await.expect("control plane starts");
    let crds: String = [
        ("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
        ("monitoring.coreos.com", "PrometheusRule", "prometheusrules"),
        ("cert-manager.io", "Issuer", "issuers"),
        ("cert-manager.io", "Certificate", "certificates"),
    ]
    .iter()
    .map(|(group, kind, plural)| stand_in_crd(group, kind, plural))
    .collect();
    let file = plane.dir().join("stand-in-crds.yaml");
    std::fs::write(&file, crds).expect("write CRDs");
    success(plane.kubectl().args(["apply", "-f"]).arg(&file));
    success(plane.kubectl().args([
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
        "crd/issuers.cert-manager.io",
        "crd/certificates.cert-manager.io",
    ]));

    install(&plane, &EVERY_OPTION);
    assert_exist(
        &plane,
        &[
            ("servicemonitor", RELEASE, Some(NAMESPACE)),
            ("prometheusrule", RELEASE, Some(NAMESPACE)),
            ("networkpolicy", RELEASE, Some(NAMESPACE)),
            ("issuer", "saleslayer-operator-selfsigned", Some(NAMESPACE)),
            ("issuer", "saleslayer-operator-ca", Some(NAMESPACE)),
            ("certificate", "saleslayer-operator-ca", Some(NAMESPACE)),
            (
                "certificate",
                "saleslayer-operator-serving",
                Some(NAMESPACE),
            ),
            ("deployment", RELEASE, Some(NAMESPACE)),
            ("mutatingwebhookconfiguration", RELEASE, None),
        ],
    );
    let annotation = success(plane.kubectl().args([
        "get",
        "mutatingwebhookconfiguration",
        RELEASE,
        "-o",
        "jsonpath={.metadata.annotations.cert-manager\\.io/inject-ca-from}",
    ]));
    assert_eq!(annotation, "saleslayer-system/saleslayer-operator-serving");
    let volume = success(plane.kubectl().args([
        "-n",
        NAMESPACE,
        "get",
        "deployment",
        RELEASE,
        "-o",
        "jsonpath={.spec.template.spec.volumes[?(@.name=='tls')].secret.secretName}",
    ]));
    assert_eq!(volume, "saleslayer-operator-serving");
    let can = can_i(&plane, &["get", "secrets/slack-hook", "-n", "anywhere"]);
    assert!(can, "notifySecretNames grants the named Secret");
}
