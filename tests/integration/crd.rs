//! The CRDs as installed by real `kubectl`: every rule of DESIGN.md §3 is
//! enforced by the API server with a message that names it.

use crate::support::Env;

fn account(spec: &str) -> String {
    format!(
        "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerAccount
metadata: {{name: acme}}
spec:
{spec}"
    )
}

/// Apply each case and check it is refused with every needle in its message.
fn refused(env: &Env, cases: &[(&str, String, &[&str])]) {
    for (case, manifest, expected) in cases {
        let (ok, output) = env.kubectl_apply(manifest);
        assert!(!ok, "{case}: accepted, but should be refused:\n{output}");
        for needle in *expected {
            assert!(
                output.contains(needle),
                "{case}: the refusal does not mention {needle:?}:\n{output}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_cluster_scoped_and_bad_ones_refused_with_the_rule_named() {
    let env = Env::bare().await;
    let scope = env.kubectl(&[
        "get",
        "crd",
        "saleslayeraccounts.saleslayer.io",
        "-o",
        "jsonpath={.spec.scope} {.spec.names.shortNames[0]}",
    ]);
    assert_eq!(scope, "Cluster sla");
    refused(
        &env,
        &[
            (
                "requests 0",
                account("  limit: {requests: 0, periodSeconds: 10}\n"),
                &["spec.limit.requests", "greater than or equal to 1"],
            ),
            (
                "period 0",
                account("  limit: {requests: 50, periodSeconds: 0}\n"),
                &["spec.limit.periodSeconds", "greater than or equal to 1"],
            ),
            (
                "headroom 95",
                account("  headroomPercent: 95\n"),
                &["spec.headroomPercent", "less than or equal to 90"],
            ),
            (
                "selector missing",
                account("  allowedNamespaces: {from: Selector}\n"),
                &[
                    "spec.allowedNamespaces",
                    "allowedNamespaces.selector is required when from is Selector",
                ],
            ),
            (
                "unknown source of namespaces",
                account("  allowedNamespaces: {from: Some}\n"),
                &["spec.allowedNamespaces.from", "Unsupported value"],
            ),
            (
                "throttle status 99",
                account("  throttleStatuses: [99]\n"),
                &["spec.throttleStatuses[0]", "greater than or equal to 100"],
            ),
            (
                "throttle status twice",
                account("  throttleStatuses: [429, 429]\n"),
                &["spec.throttleStatuses[1]", "Duplicate value"],
            ),
            (
                "decrease 0",
                account("  adaptive: {decreasePercent: 0}\n"),
                &[
                    "spec.adaptive.decreasePercent",
                    "greater than or equal to 1",
                ],
            ),
            (
                "floor above usable",
                account("  adaptive: {minPercent: 101}\n"),
                &["spec.adaptive.minPercent", "less than or equal to 100"],
            ),
        ],
    );

    // An empty spec is the documented account, defaulted.
    let (ok, output) = env.kubectl_apply(&account("  {}\n"));
    assert!(ok, "an empty spec is refused: {output}");
    let defaults = env.kubectl(&[
        "get", "sla", "acme", "-o",
        "jsonpath={.spec.limit.requests}/{.spec.limit.periodSeconds} {.spec.headroomPercent} {.spec.allowedNamespaces.from} {.spec.adaptive.decreasePercent} {.spec.adaptive.increasePerWindow} {.spec.adaptive.minPercent} {.spec.throttleStatuses}",
    ]);
    assert_eq!(defaults, "50/10 20 All 30 1 25 [429]");
}

fn integration(spec: &str) -> String {
    format!(
        "apiVersion: saleslayer.io/v1alpha1
kind: SalesLayerIntegration
metadata: {{name: catalog, namespace: shop}}
spec:
{spec}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_integrations_are_refused_with_the_rule_named() {
    let env = Env::with_crd().await;
    env.namespace("shop").await;

    let cases = [
        (
            "duplicate job names",
            "  account: acme\n  jobs: [{name: a}, {name: a}]\n",
            &["spec.jobs", "Duplicate value"][..],
        ),
        (
            "min above max",
            "  account: acme\n  jobs: [{name: a, minRequests: 9, maxRequests: 3}]\n",
            &["spec.jobs[0]", "minRequests must not exceed maxRequests"][..],
        ),
        (
            "job name not a DNS label",
            "  account: acme\n  jobs: [{name: Product_Import}]\n",
            &["spec.jobs[0].name", "should match"][..],
        ),
        (
            "maxAttempts 0",
            "  account: acme\n  jobs: [{name: a}]\n  retry: {maxAttempts: 0}\n",
            &["spec.retry.maxAttempts", "greater than or equal to 1"][..],
        ),
        (
            "maxAttempts 11",
            "  account: acme\n  jobs: [{name: a}]\n  retry: {maxAttempts: 11}\n",
            &["spec.retry.maxAttempts", "less than or equal to 10"][..],
        ),
        (
            "negative weight",
            "  account: acme\n  jobs: [{name: a, weight: -1}]\n",
            &["spec.jobs[0].weight", "greater than or equal to 0"][..],
        ),
        (
            "no account",
            "  jobs: [{name: a}]\n",
            &["spec.account", "Required value"][..],
        ),
    ];
    let cases: Vec<(&str, String, &[&str])> = cases
        .into_iter()
        .map(|(case, spec, expected)| (case, integration(spec), expected))
        .collect();
    refused(&env, &cases);

    // The same object, valid, is accepted and defaulted.
    let (ok, output) = env.kubectl_apply(&integration("  account: acme\n  jobs: [{name: a}]\n"));
    assert!(ok, "a valid spec is refused: {output}");
    let defaults = env.kubectl(&[
        "-n", "shop", "get", "sli", "catalog", "-o", "jsonpath={.spec.lendIdleCapacity} {.spec.retry.maxAttempts} {.spec.alerting.persistentWindows}",
    ]);
    assert_eq!(defaults, "false 4 6");
}
