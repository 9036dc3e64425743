//! The chart's PrometheusRule, checked by Prometheus' own `promtool` (built
//! by `tests/testenv/build.sh`): the rules load, and each alert fires on the
//! series the operator exports, with the labels and text a person reads
//! (`promtool test rules`). And `SalesLayerOperatorDown` exists only with the
//! ServiceMonitor that makes Prometheus scrape the operator under its job.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::{NAMESPACE, RELEASE, chart, helm, success};

/// The rule groups of the PrometheusRule `helm template` renders with `sets`.
fn rule_groups(home: &Path, sets: &[&str]) -> Option<Value> {
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
        .find(|doc| doc["kind"] == "PrometheusRule")
        .map(|rule| serde_json::json!({"groups": rule["spec"]["groups"]}))
}

fn promtool() -> Command {
    Command::new(saleslayer_testenv::bin_dir().join("promtool"))
}

fn alert_names(groups: &Value) -> Vec<String> {
    groups["groups"][0]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

/// One promtool unit test per alert, on the series and labels the operator
/// exports (never `namespace`/`job` of its own, which Prometheus owns).
const ALERT_TESTS: &str = r#"rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'saleslayer_persistent_throttling{integration_namespace="shop", integration="catalog", saleslayer_job="price-sync", namespace="saleslayer-system", job="saleslayer-operator-metrics", instance="10.0.0.5:8080"}'
        values: '0 1 1 1 1'
      - series: 'saleslayer_persistent_throttling{integration_namespace="shop", integration="catalog", saleslayer_job="product-import", namespace="saleslayer-system", job="saleslayer-operator-metrics", instance="10.0.0.5:8080"}'
        values: '0 0 0 0 0'
    alert_rule_test:
      - eval_time: 1m
        alertname: SalesLayerPersistentThrottling
        exp_alerts: []
      - eval_time: 3m
        alertname: SalesLayerPersistentThrottling
        exp_alerts:
          - exp_labels:
              severity: warning
              integration_namespace: shop
              integration: catalog
              saleslayer_job: price-sync
            exp_annotations:
              summary: Sales Layer job shop/catalog/price-sync is throttled persistently
              description: The job was throttled by Sales Layer in its integration's persistentWindows consecutive windows. `kubectl -n shop describe sli catalog` shows its allocation and Events.
  - interval: 1m
    input_series:
      - series: 'saleslayer_overcommitted{account="acme-prod", namespace="saleslayer-system", job="saleslayer-operator-metrics", instance="10.0.0.5:8080"}'
        values: '1x20'
      - series: 'saleslayer_overcommitted{account="acme-test", namespace="saleslayer-system", job="saleslayer-operator-metrics", instance="10.0.0.5:8080"}'
        values: '0x20'
    alert_rule_test:
      - eval_time: 5m
        alertname: SalesLayerAccountOvercommitted
        exp_alerts: []
      - eval_time: 15m
        alertname: SalesLayerAccountOvercommitted
        exp_alerts:
          - exp_labels:
              severity: warning
              account: acme-prod
            exp_annotations:
              summary: Sales Layer account acme-prod is overcommitted
              description: The minRequests of the jobs on this account add up to more than its effective budget, so every floor was scaled down. `kubectl get sli -A` lists its integrations; their Overcommitted condition gives the numbers.
  - interval: 1m
    input_series:
      - series: 'up{job="saleslayer-operator-metrics", namespace="saleslayer-system", instance="10.0.0.5:8080"}'
        values: '1 1 0 0 0 0 0 0 0 0'
      - series: 'up{job="someone-else", namespace="saleslayer-system", instance="10.0.0.6:8080"}'
        values: '1x10'
    alert_rule_test:
      - eval_time: 3m
        alertname: SalesLayerOperatorDown
        exp_alerts: []
      - eval_time: 9m
        alertname: SalesLayerOperatorDown
        exp_alerts:
          - exp_labels:
              severity: critical
            exp_annotations:
              summary: No saleslayer-operator replica is up
              description: Prometheus scrapes no replica of saleslayer-operator in saleslayer-system. Labelled pods cannot be admitted while the webhook's failurePolicy is Fail, and no shares are rebalanced.
"#;

#[test]
fn every_alert_passes_promtool_check_and_its_unit_test() {
    let home = tempfile::tempdir().expect("temp dir");
    let groups = rule_groups(
        home.path(),
        &["prometheusRule.enabled=true", "serviceMonitor.enabled=true"],
    )
    .expect("a PrometheusRule is rendered");
    assert_eq!(
        alert_names(&groups),
        [
            "SalesLayerPersistentThrottling",
            "SalesLayerAccountOvercommitted",
            "SalesLayerOperatorDown"
        ]
    );
    let rules = home.path().join("rules.yaml");
    std::fs::write(&rules, serde_saphyr::to_string(&groups).expect("YAML")).expect("write rules");
    let check = success(promtool().args(["check", "rules"]).arg(&rules));
    assert!(check.contains("SUCCESS: 3 rules found"), "{check}");
    let tests = home.path().join("alerts_test.yaml");
    std::fs::write(&tests, ALERT_TESTS).expect("write tests");
    let out = promtool()
        .args(["test", "rules"])
        .arg(&tests)
        .current_dir(home.path())
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool test rules failed:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn operator_down_is_not_alerted_without_the_service_monitor() {
    let home = tempfile::tempdir().expect("temp dir");
    let groups = rule_groups(home.path(), &["prometheusRule.enabled=true"])
        .expect("a PrometheusRule is rendered");
    assert_eq!(
        alert_names(&groups),
        [
            "SalesLayerPersistentThrottling",
            "SalesLayerAccountOvercommitted"
        ],
        "no scrape under the chart's job name without its ServiceMonitor"
    );
}
