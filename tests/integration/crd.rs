//! The CRD as installed by real `kubectl`: every rule of DESIGN.md §3 is
//! enforced by the API server with a message that names it.

use crate::support::Env;

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
async fn invalid_specs_are_refused_with_the_rule_named() {
    let env = Env::with_crd().await;
    env.namespace("shop").await;

    let cases = [
        (
            "requests 0",
            "  account: acme\n  limit: {requests: 0, periodSeconds: 10}\n  jobs: [{name: a}]\n",
            &["spec.limit.requests", "greater than or equal to 1"][..],
        ),
        (
            "headroom 95",
            "  account: acme\n  headroomPercent: 95\n  jobs: [{name: a}]\n",
            &["spec.headroomPercent", "less than or equal to 90"][..],
        ),
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
            "period 0",
            "  account: acme\n  limit: {requests: 50, periodSeconds: 0}\n  jobs: [{name: a}]\n",
            &["spec.limit.periodSeconds", "greater than or equal to 1"][..],
        ),
    ];
    for (case, spec, expected) in cases {
        let (ok, output) = env.kubectl_apply(&integration(spec));
        assert!(!ok, "{case}: accepted, but should be refused:\n{output}");
        for needle in expected {
            assert!(
                output.contains(needle),
                "{case}: the refusal does not mention {needle:?}:\n{output}"
            );
        }
    }

    // The same object, valid, is accepted and defaulted.
    let (ok, output) = env.kubectl_apply(&integration("  account: acme\n  jobs: [{name: a}]\n"));
    assert!(ok, "a valid spec is refused: {output}");
    let headroom = env.kubectl(&[
        "-n", "shop", "get", "sli", "catalog", "-o", "jsonpath={.spec.headroomPercent} {.spec.limit.requests}/{.spec.limit.periodSeconds} {.spec.retry.maxAttempts}",
    ]);
    assert_eq!(headroom, "20 50/10 4");
}
