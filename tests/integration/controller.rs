//! The controller on a real control plane: allocations converge into status
//! and pod annotations, rebalance on change, and accounts are shared.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use saleslayer_core::api::SalesLayerIntegration;
use serde_json::{Value, json};

use crate::support::{Env, eventually};

fn three_jobs(namespace: &str, lend: bool) -> String {
    format!(
        "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerIntegration
metadata: {{name: catalog, namespace: {namespace}}}
spec:
  account: acme-prod
  lendIdleCapacity: {lend}
  jobs:
  - {{name: product-import, weight: 3, maxConcurrency: 4}}
  - {{name: price-sync, weight: 1}}
  - {{name: stock-sync, weight: 1}}
"
    )
}

/// (job, allocated, pods, per-pod requests) from the status, sorted by job.
async fn allocations(
    env: &Env,
    namespace: &str,
    name: &str,
) -> Result<Vec<(String, u32, u32, u32)>, String> {
    let sli = Api::<SalesLayerIntegration>::namespaced(env.client.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| e.to_string())?;
    let status = sli.status.ok_or("no status yet")?;
    let mut jobs: Vec<_> = status
        .jobs
        .iter()
        .map(|j| {
            (
                j.name.clone(),
                j.allocated_requests,
                j.pods,
                j.per_pod.requests,
            )
        })
        .collect();
    jobs.sort();
    Ok(jobs)
}

async fn expect_allocations(
    env: &Env,
    namespace: &str,
    name: &str,
    want: &[(&str, u32, u32, u32)],
) {
    let mut want: Vec<(String, u32, u32, u32)> = want
        .iter()
        .map(|(n, a, p, r)| ((*n).to_owned(), *a, *p, *r))
        .collect();
    want.sort();
    eventually(
        &format!("{namespace}/{name} allocations {want:?}"),
        || async {
            let seen = allocations(env, namespace, name).await?;
            if seen == want {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        },
    )
    .await;
}

async fn limit_annotation(env: &Env, namespace: &str, pod: &str) -> Result<Value, String> {
    let pod = Api::<Pod>::namespaced(env.client.clone(), namespace)
        .get(pod)
        .await
        .map_err(|e| e.to_string())?;
    let raw = pod
        .metadata
        .annotations
        .and_then(|a| a.get("saleslayer.io/limit").cloned())
        .ok_or("no saleslayer.io/limit annotation")?;
    serde_json::from_str(&raw).map_err(|e| format!("{raw}: {e}"))
}

async fn expect_limit(env: &Env, namespace: &str, pod: &str, want: Value) {
    eventually(
        &format!("annotation of {namespace}/{pod} = {want}"),
        || async {
            let seen = limit_annotation(env, namespace, pod).await?;
            if seen == want {
                Ok(())
            } else {
                Err(seen.to_string())
            }
        },
    )
    .await;
}

async fn condition(
    env: &Env,
    namespace: &str,
    name: &str,
    type_: &str,
) -> Result<(String, String, String), String> {
    let sli = Api::<SalesLayerIntegration>::namespaced(env.client.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| e.to_string())?;
    let status = sli.status.ok_or("no status")?;
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .ok_or_else(|| format!("no {type_} condition in {:?}", status.conditions))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_jobs_converge_and_rebalance() {
    let env = Env::with_controller().await;
    env.namespace("shop").await;
    let (ok, out) = env.kubectl_apply(&three_jobs("shop", false));
    assert!(ok, "{out}");
    env.pod("shop", "import-0", "catalog", "product-import")
        .await;
    env.pod("shop", "import-1", "catalog", "product-import")
        .await;
    env.pod("shop", "price-0", "catalog", "price-sync").await;
    env.pod("shop", "stock-0", "catalog", "stock-sync").await;

    // 50/10 s with 20 % headroom = 40, split 3:1:1.
    expect_allocations(
        &env,
        "shop",
        "catalog",
        &[
            ("product-import", 24, 2, 12),
            ("price-sync", 8, 1, 8),
            ("stock-sync", 8, 1, 8),
        ],
    )
    .await;
    expect_limit(
        &env,
        "shop",
        "import-0",
        json!({"requests": 12, "periodMillis": 10000, "maxConcurrency": 2}),
    )
    .await;
    expect_limit(
        &env,
        "shop",
        "import-1",
        json!({"requests": 12, "periodMillis": 10000, "maxConcurrency": 2}),
    )
    .await;
    expect_limit(
        &env,
        "shop",
        "price-0",
        json!({"requests": 8, "periodMillis": 10000, "maxConcurrency": 8}),
    )
    .await;

    // A second price-sync pod halves that job's per-pod share.
    env.pod("shop", "price-1", "catalog", "price-sync").await;
    expect_allocations(
        &env,
        "shop",
        "catalog",
        &[
            ("product-import", 24, 2, 12),
            ("price-sync", 8, 2, 4),
            ("stock-sync", 8, 1, 8),
        ],
    )
    .await;
    expect_limit(
        &env,
        "shop",
        "price-0",
        json!({"requests": 4, "periodMillis": 10000, "maxConcurrency": 4}),
    )
    .await;

    // Equal weights: 40 / 3 → 14/13/13, the odd unit to the first key.
    let slis = Api::<SalesLayerIntegration>::namespaced(env.client.clone(), "shop");
    let patch = json!({"apiVersion": "saleslayer.io/v1alpha1", "kind": "SalesLayerIntegration",
        "spec": {"account": "acme-prod", "jobs": [
            {"name": "product-import", "weight": 1},
            {"name": "price-sync", "weight": 1},
            {"name": "stock-sync", "weight": 1}]}});
    slis.patch(
        "catalog",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&patch),
    )
    .await
    .expect("patch weights");
    expect_allocations(
        &env,
        "shop",
        "catalog",
        &[
            ("price-sync", 14, 2, 7),
            ("product-import", 13, 2, 6),
            ("stock-sync", 13, 1, 13),
        ],
    )
    .await;

    // Status says what is ready, and kubectl shows it in columns.
    let (status, reason, _) = condition(&env, "shop", "catalog", "Ready")
        .await
        .expect("Ready");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Allocated"));
    let table = env.kubectl(&["-n", "shop", "get", "sli"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "ACCOUNT",
            "USABLE",
            "JOBS",
            "PODS",
            "THROTTLING",
            "READY",
            "AGE"
        ]
    );
    let row: Vec<&str> = lines.next().expect("a row").split_whitespace().collect();
    assert_eq!(
        &row[..7],
        ["catalog", "acme-prod", "40/10s", "3", "5", "none", "True"],
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_job_lends_its_share_when_lending_is_on() {
    let env = Env::with_controller().await;
    env.namespace("shop").await;
    let (ok, out) = env.kubectl_apply(&three_jobs("shop", true));
    assert!(ok, "{out}");
    env.pod("shop", "import-0", "catalog", "product-import")
        .await;
    env.pod("shop", "price-0", "catalog", "price-sync").await;
    env.pod("shop", "stock-0", "catalog", "stock-sync").await;
    expect_allocations(
        &env,
        "shop",
        "catalog",
        &[
            ("product-import", 24, 1, 24),
            ("price-sync", 8, 1, 8),
            ("stock-sync", 8, 1, 8),
        ],
    )
    .await;

    // stock-sync loses its only pod: its share goes to the busy jobs (3:1).
    Api::<Pod>::namespaced(env.client.clone(), "shop")
        .delete("stock-0", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete pod");
    expect_allocations(
        &env,
        "shop",
        "catalog",
        &[
            ("product-import", 30, 1, 30),
            ("price-sync", 10, 1, 10),
            ("stock-sync", 0, 0, 0),
        ],
    )
    .await;
    expect_limit(
        &env,
        "shop",
        "import-0",
        json!({"requests": 30, "periodMillis": 10000, "maxConcurrency": 4}),
    )
    .await;

    // And it returns when a pod appears.
    env.pod("shop", "stock-1", "catalog", "stock-sync").await;
    expect_allocations(
        &env,
        "shop",
        "catalog",
        &[
            ("product-import", 24, 1, 24),
            ("price-sync", 8, 1, 8),
            ("stock-sync", 8, 1, 8),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_is_one_budget_across_the_namespaces_it_allows() {
    let env = Env::with_controller().await;
    // The platform team opens acme-prod to the namespaces labelled team=shop|ops.
    let (ok, out) = env.kubectl_apply(
        "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerAccount
metadata: {name: acme-prod}
spec:
  allowedNamespaces:
    from: Selector
    selector:
      matchExpressions: [{key: team, operator: In, values: [shop, ops]}]
",
    );
    assert!(ok, "{out}");
    for (namespace, team) in [("shop", "shop"), ("ops", "ops"), ("guest", "guest")] {
        env.namespace(namespace).await;
        env.kubectl(&["label", "namespace", namespace, &format!("team={team}")]);
    }
    for (namespace, name, job) in [
        ("shop", "catalog", "import"),
        ("ops", "reports", "export"),
        ("guest", "scraper", "crawl"),
    ] {
        let (ok, out) = env.kubectl_apply(&format!(
            "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerIntegration
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  account: acme-prod
  jobs: [{{name: {job}, weight: 1, minRequests: 30}}]
"
        ));
        assert!(ok, "{out}");
    }
    env.pod("shop", "import-0", "catalog", "import").await;
    env.pod("ops", "export-0", "reports", "export").await;
    env.pod("guest", "crawl-0", "scraper", "crawl").await;
    // Two allowed namespaces split the 40 usable; their floors of 30 each
    // overcommit it, and the guest's floor counts for nothing.
    expect_allocations(&env, "shop", "catalog", &[("import", 20, 1, 20)]).await;
    expect_allocations(&env, "ops", "reports", &[("export", 20, 1, 20)]).await;
    let (status, _, message) = eventually("guest/scraper not allowed", || async {
        let c = condition(&env, "guest", "scraper", "Ready").await?;
        if c.1 == "AccountNotAllowed" {
            Ok(c)
        } else {
            Err(format!("{c:?}"))
        }
    })
    .await;
    assert_eq!(status, "False");
    assert!(
        message.contains("does not allow integrations in namespace \"guest\""),
        "{message}"
    );
    assert_eq!(
        allocations(&env, "guest", "scraper").await.expect("status"),
        vec![],
        "allocated nothing"
    );
    for namespace_name in [("shop", "catalog"), ("ops", "reports")] {
        let (namespace, name) = namespace_name;
        let (status, reason, message) = eventually("AccountShared", || {
            condition(&env, namespace, name, "AccountShared")
        })
        .await;
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("True", "SharedAccount"),
            "{message}"
        );
        assert!(
            message.contains("shared by 2 integrations in 2 namespaces"),
            "{message}"
        );
        for other in ["catalog", "reports", "scraper", "guest"] {
            assert!(
                other == name || !message.contains(other),
                "another team's integration is named: {message}"
            );
        }
    }

    // The account lets the guest in: it gets its share at once.
    env.kubectl(&["label", "--overwrite", "namespace", "guest", "team=ops"]);
    // Three floors of 30 in 40: 14/13/13, the odd unit to the first key.
    expect_allocations(&env, "guest", "scraper", &[("crawl", 14, 1, 14)]).await;
    expect_allocations(&env, "shop", "catalog", &[("import", 13, 1, 13)]).await;

    // An integration on an account nobody made: Ready=False, and the fix.
    let (ok, out) = env.kubectl_apply(
        "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerIntegration
metadata: {name: orphan, namespace: shop}
spec:
  account: acme-nowhere
  jobs: [{name: a}]
",
    );
    assert!(ok, "{out}");
    let (_, _, message) = eventually("shop/orphan AccountNotFound", || async {
        let c = condition(&env, "shop", "orphan", "Ready").await?;
        if c.1 == "AccountNotFound" {
            Ok(c)
        } else {
            Err(format!("{c:?}"))
        }
    })
    .await;
    assert!(
        message.contains("kubectl apply -f -") && message.contains("acme-nowhere"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floors_above_the_budget_are_scaled_down_and_said_so() {
    let env = Env::with_controller().await;
    env.namespace("shop").await;
    env.namespace("ops").await;
    let (ok, out) = env.kubectl_apply(&three_jobs("shop", false));
    assert!(ok, "{out}");
    let (ok, out) = env.kubectl_apply(
        "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerAccount
metadata: {name: acme-staging}
spec: {}
",
    );
    assert!(ok, "{out}");
    // Floors above the budget: scaled down, and said so.
    let (ok, out) = env.kubectl_apply(
        "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerIntegration
metadata: {name: greedy, namespace: ops}
spec:
  account: acme-staging
  jobs:
  - {name: a, minRequests: 30}
  - {name: b, minRequests: 22}
",
    );
    assert!(ok, "{out}");
    let (status, reason, message) = eventually("Overcommitted", || async {
        let c = condition(&env, "ops", "greedy", "Overcommitted").await?;
        if c.0 == "True" {
            Ok(c)
        } else {
            Err(format!("{c:?}"))
        }
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "FloorsExceedBudget")
    );
    assert!(
        message.contains("52") && message.contains("40"),
        "{message}"
    );
    eventually("Warning event Overcommitted on ops/greedy", || async {
        let events = env.kubectl(&[
            "-n",
            "ops",
            "get",
            "events",
            "-o",
            "jsonpath={range .items[*]}{.type}/{.reason}/{.involvedObject.name}{'\\n'}{end}",
        ]);
        if events.lines().any(|l| l == "Warning/Overcommitted/greedy") {
            Ok(())
        } else {
            Err(events)
        }
    })
    .await;
    eventually("Normal event AllocationChanged on shop/catalog", || async {
        let events = env.kubectl(&[
            "-n",
            "shop",
            "get",
            "events",
            "-o",
            "jsonpath={range .items[*]}{.type}/{.reason}/{.involvedObject.name}{'\\n'}{end}",
        ]);
        if events
            .lines()
            .any(|l| l == "Normal/AllocationChanged/catalog")
        {
            Ok(())
        } else {
            Err(events)
        }
    })
    .await;
    let total: u32 = allocations(&env, "ops", "greedy")
        .await
        .expect("status")
        .iter()
        .map(|j| j.1)
        .sum();
    assert_eq!(total, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_with_only_the_crd_and_stops_on_sigterm() {
    let env = Env::with_crd().await;
    env.namespace("shop").await;
    let mut operator = std::process::Command::new(env!("CARGO_BIN_EXE_saleslayer-operator"))
        .arg("run")
        .arg("--kubeconfig")
        .arg(env.plane.kubeconfig())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("operator starts");
    let (ok, out) = env.kubectl_apply(&three_jobs("shop", false));
    assert!(ok, "{out}");
    env.pod("shop", "import-0", "catalog", "product-import")
        .await;
    expect_allocations(
        &env,
        "shop",
        "catalog",
        &[
            ("product-import", 24, 1, 24),
            ("price-sync", 8, 0, 8),
            ("stock-sync", 8, 0, 8),
        ],
    )
    .await;

    let status = std::process::Command::new("kill")
        .args(["-TERM", &operator.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = operator.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "operator did not stop on SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let mut logs = String::new();
    use std::io::Read;
    operator
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logs)
        .expect("logs");
    assert!(exit.success(), "exit {exit:?}; logs:\n{logs}");
    // Not a terminal: JSON lines.
    let first = logs.lines().next().expect("some logs");
    assert!(
        serde_json::from_str::<Value>(first).is_ok(),
        "not JSON: {first}"
    );
    assert!(logs.contains("shutting down"), "{logs}");
}

/// Issue 12 item 9: Events (and notifications) go out only after the status
/// write that records the change succeeded, so a write the API server
/// refuses is retried without repeating them. A ValidatingAdmissionPolicy
/// refuses every status write of integrations for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_the_status_write_that_records_them() {
    let env = Env::with_controller().await;
    env.namespace("shop").await;
    let (ok, out) = env.kubectl_apply(&three_jobs("shop", false));
    assert!(ok, "{out}");
    env.pod("shop", "import-0", "catalog", "product-import")
        .await;
    expect_allocations(
        &env,
        "shop",
        "catalog",
        &[
            ("product-import", 24, 1, 24),
            ("price-sync", 8, 0, 8),
            ("stock-sync", 8, 0, 8),
        ],
    )
    .await;
    let (ok, out) = env.kubectl_apply(
        "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: no-integration-status}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [saleslayer.io]
      apiVersions: ['*']
      operations: [UPDATE]
      resources: [saleslayerintegrations/status]
  validations:
  - expression: 'false'
    message: status writes are refused by this test
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: no-integration-status}
spec:
  policyName: no-integration-status
  validationActions: [Deny]
",
    );
    assert!(ok, "{out}");
    // The policy takes effect once the API server has loaded it.
    eventually("status writes refused", || async {
        let (ok, out) = env.kubectl_stdin(
            &[
                "-n",
                "shop",
                "patch",
                "sli",
                "catalog",
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status": {"summary": {"usable": "probe", "jobs": 0, "pods": 0, "throttling": "none"}}}"#,
            ],
            "",
        );
        if !ok && out.contains("refused by this test") {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;

    // A change worth an Event: the status write that records it fails, and
    // fails again on each retry.
    env.pod("shop", "import-1", "catalog", "product-import")
        .await;
    let errors = |text: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(r#"saleslayer_reconcile_errors_total{outcome="PatchStatus"}"#))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let metrics = format!("http://127.0.0.1:{}/metrics", env.metrics_port);
    eventually("two refused status writes", || async {
        let text = reqwest::get(&metrics)
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        match errors(&text) {
            n if n >= 2 => Ok(()),
            n => Err(format!("{n} refused writes so far")),
        }
    })
    .await;
    let two_pods = |events: &str| {
        events
            .lines()
            .filter(|l| l.starts_with("AllocationChanged/") && l.contains("over 2 pods"))
            .count()
    };
    let events = || {
        env.kubectl(&[
            "-n",
            "shop",
            "get",
            "events",
            "-o",
            "jsonpath={range .items[*]}{.reason}/{.note}{.message}{'\\n'}{end}",
        ])
    };
    assert_eq!(
        two_pods(&events()),
        0,
        "an Event for a status that was never written:\n{}",
        events()
    );

    // The write goes through: the change is recorded, then announced.
    env.kubectl(&[
        "delete",
        "validatingadmissionpolicybinding",
        "no-integration-status",
    ]);
    expect_allocations(
        &env,
        "shop",
        "catalog",
        &[
            ("product-import", 24, 2, 12),
            ("price-sync", 8, 0, 8),
            ("stock-sync", 8, 0, 8),
        ],
    )
    .await;
    eventually("AllocationChanged once the status is written", || async {
        let seen = events();
        if two_pods(&seen) >= 1 {
            Ok(())
        } else {
            Err(seen)
        }
    })
    .await;
}
