//! The chart as `helm lint` and `helm template` see it, with no cluster: the
//! objects it renders with defaults and with every option on, and the values
//! its schema refuses.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Value, json};

use super::{EVERY_OPTION, NAMESPACE, RELEASE, chart, helm, output, success};

/// `helm template` with `--set` options: the rendered objects.
fn template(home: &Path, sets: &[&str]) -> Vec<Value> {
    let mut command = helm(home);
    command
        .args(["template", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE]);
    for set in sets {
        command.args(["--set", set]);
    }
    let rendered = success(&mut command);
    serde_saphyr::from_multiple::<Value>(&rendered)
        .expect("helm renders YAML")
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .filter_map(|o| o["kind"].as_str().map(str::to_owned))
        .collect()
}

/// The operator's container's environment as name → value (or field path).
fn container_env(deployment: &Value) -> std::collections::BTreeMap<String, String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|v| {
            let value = v["value"]
                .as_str()
                .or(v["valueFrom"]["fieldRef"]["fieldPath"].as_str())
                .unwrap_or_default();
            (
                v["name"].as_str().unwrap_or_default().to_owned(),
                value.to_owned(),
            )
        })
        .collect()
}

#[test]
fn chart_crds_are_the_repository_crds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in saleslayer_core::api::CRD_FILES {
        let repository = std::fs::read(root.join("crds").join(file)).expect("crds/ holds the CRD");
        let copy = std::fs::read(chart().join("crds").join(file)).expect("the chart holds the CRD");
        assert!(
            repository == copy,
            "charts/saleslayer-operator/crds/{file} differs from crds/{file}: run `make crds`"
        );
    }
}

#[test]
fn chart_lints_and_renders_with_defaults_and_every_option() {
    let home = tempfile::tempdir().expect("temp dir");
    let lint = success(helm(home.path()).args(["lint", "--strict"]).arg(chart()));
    assert!(lint.contains("0 chart(s) failed"), "{lint}");

    let defaults = template(home.path(), &[]);
    let expected: BTreeSet<String> = [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "MutatingWebhookConfiguration",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds(&defaults), expected);

    let deployment = find(&defaults, "Deployment", RELEASE);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        container["image"],
        "ghcr.io/saleslayer-operator/saleslayer-operator:0.1.0"
    );
    assert_eq!(container["args"], json!(["run"]));
    let env = container_env(deployment);
    for (name, value) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("SALESLAYER_LEADER_ELECT", "true"),
        ("SALESLAYER_WEBHOOK_CONFIGURATION", RELEASE),
        (
            "SALESLAYER_PROXY_IMAGE",
            "ghcr.io/saleslayer-operator/saleslayer-operator:0.1.0",
        ),
        ("SALESLAYER_PROXY_UPSTREAM", "https://api.saleslayer.com"),
        (
            "SALESLAYER_QUOTA_URL",
            "https://saleslayer-operator-quota.saleslayer-system.svc:8443",
        ),
    ] {
        assert_eq!(env.get(name).map(String::as_str), Some(value), "{name}");
    }
    // Restricted pod security.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "metrics");
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert_eq!(
        pod["topologySpreadConstraints"][0]["topologyKey"],
        "kubernetes.io/hostname"
    );

    // Services: the webhook on 443 → 9443, the quota API on the leader only.
    let webhook = find(&defaults, "Service", "saleslayer-operator-webhook");
    assert_eq!(webhook["spec"]["ports"][0]["port"], 443);
    assert_eq!(webhook["spec"]["ports"][0]["targetPort"], "webhook");
    let quota = find(&defaults, "Service", "saleslayer-operator-quota");
    assert_eq!(
        quota["spec"]["selector"],
        json!({"app.kubernetes.io/name": "saleslayer-operator",
            "app.kubernetes.io/instance": RELEASE, "saleslayer.io/leader": "true"})
    );
    assert_eq!(quota["spec"]["ports"][0]["port"], 8443);
    let metrics = find(&defaults, "Service", "saleslayer-operator-metrics");
    assert_eq!(metrics["spec"]["ports"][0]["port"], 8080);

    let configuration = find(&defaults, "MutatingWebhookConfiguration", RELEASE);
    let hook = &configuration["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate");
    assert_eq!(
        hook["objectSelector"]["matchExpressions"][0],
        json!({"key": "saleslayer.io/integration", "operator": "Exists"})
    );
    assert_eq!(hook["rules"][0]["operations"], json!(["CREATE"]));
    assert_eq!(hook["rules"][0]["resources"], json!(["pods"]));

    // No wildcard anywhere, and no Secret beyond the operator's own by default.
    for kind in ["ClusterRole", "Role"] {
        let role = find(&defaults, kind, RELEASE);
        for rule in role["rules"].as_array().expect("rules") {
            for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                let values = rule[field].as_array().cloned().unwrap_or_default();
                assert!(!values.contains(&json!("*")), "{kind} rule {rule}");
            }
        }
    }
    let cluster_rules = &find(&defaults, "ClusterRole", RELEASE)["rules"];
    assert!(
        !cluster_rules.to_string().contains("secrets"),
        "{cluster_rules}"
    );

    // Every option on.
    let every = template(home.path(), &EVERY_OPTION);
    for kind in ["ServiceMonitor", "PrometheusRule", "Issuer", "Certificate"] {
        assert!(kinds(&every).contains(kind), "no {kind}");
    }
    let rule = find(&every, "PrometheusRule", RELEASE).to_string();
    for alert in [
        "saleslayer_persistent_throttling",
        "saleslayer_overcommitted",
        r#"absent(up{job=\"saleslayer-operator-metrics\""#,
    ] {
        assert!(rule.contains(alert), "no {alert} in {rule}");
    }
    // The NetworkPolicy admits the API server to the webhook, labelled pods
    // to the quota API, Prometheus to /metrics; nothing else.
    let policy = find(&every, "NetworkPolicy", RELEASE);
    let ingress = policy["spec"]["ingress"].as_array().expect("ingress rules");
    let port = |rule: &Value| rule["ports"][0]["port"].as_u64();
    assert_eq!(
        ingress.iter().map(port).collect::<Vec<_>>(),
        [Some(9443), Some(8443), Some(8080)]
    );
    assert_eq!(ingress[0]["from"][0]["ipBlock"]["cidr"], "10.0.0.1/32");
    assert_eq!(
        ingress[1]["from"][0]["podSelector"]["matchExpressions"][0]["key"],
        "saleslayer.io/integration"
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    let configuration = find(&every, "MutatingWebhookConfiguration", RELEASE);
    assert_eq!(
        configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "saleslayer-system/saleslayer-operator-serving"
    );
    assert_eq!(configuration["webhooks"][0]["failurePolicy"], "Ignore");
    let deployment = find(&every, "Deployment", RELEASE);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["args"],
        json!([
            "run",
            "--tls-cert-file=/etc/saleslayer-operator/tls/tls.crt",
            "--tls-key-file=/etc/saleslayer-operator/tls/tls.key",
            "--ca-file=/etc/saleslayer-operator/tls/ca.crt"
        ])
    );
    assert_eq!(
        container_env(deployment)
            .get("SALESLAYER_PROXY_IMAGE")
            .map(String::as_str),
        Some("ghcr.io/saleslayer-operator/saleslayer-operator:0.1.0-test")
    );
    let serving = find(&every, "Certificate", "saleslayer-operator-serving");
    assert!(
        serving["spec"]["dnsNames"].as_array().is_some_and(
            |names| names.contains(&json!("saleslayer-operator-webhook.saleslayer-system.svc"))
        ),
        "{serving}"
    );
    let notify = find(&every, "ClusterRole", RELEASE)["rules"]
        .as_array()
        .and_then(|rules| {
            rules
                .iter()
                .find(|r| r["resources"] == json!(["secrets"]))
                .cloned()
        })
        .expect("a rule for the notify Secrets");
    assert_eq!(notify["resourceNames"], json!(["slack-hook"]));
    assert_eq!(notify["verbs"], json!(["get"]));

    // A wrong-typed value fails with the schema's error.
    for (set, path) in [
        ("replicaCount=two", "/replicaCount"),
        ("serviceMonitor.enabled=maybe", "/serviceMonitor/enabled"),
        ("webhook.failurePolicy=Sometimes", "/webhook/failurePolicy"),
        ("replicas=2", "additional properties 'replicas'"),
    ] {
        let (ok, _, stderr) = output(
            helm(home.path())
                .args(["template", RELEASE])
                .arg(chart())
                .args(["--set", set]),
        );
        assert!(!ok, "--set {set} rendered");
        assert!(
            stderr.contains("values don't meet the specifications of the schema")
                && stderr.contains(path),
            "--set {set}: {stderr}"
        );
    }
}
