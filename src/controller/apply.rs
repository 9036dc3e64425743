//! The controller's writes: pod annotations, the CA ConfigMap and status,
//! each through server-side apply under [`FIELD_MANAGER`]. Only the
//! reconcile calls these, after planning, and each checks that this replica
//! still leads right before it writes.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ObjectMeta, PartialObjectMetaExt, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use saleslayer_contract::{ANNOTATION_LIMIT, CA_CONFIGMAP, CA_CONFIGMAP_KEY};
use saleslayer_core::api::{SalesLayerAccount, SalesLayerAccountStatus, SalesLayerIntegration};
use saleslayer_core::plan::{self, AccountPlan, ValidatedIntegration};

use super::{Context, Error};
use crate::FIELD_MANAGER;
use crate::state::Stores;

/// The pods of `integration` whose `saleslayer.io/limit` annotation differs
/// from what `account_plan` gives them, with the value each should carry.
pub(super) fn pod_writes(
    stores: &Stores,
    integration: &ValidatedIntegration,
    account_plan: &AccountPlan,
) -> Vec<(String, String)> {
    let mut writes = Vec::new();
    let Ok(index) = stores.index.read() else {
        return writes;
    };
    for job in &integration.jobs {
        let key = integration.key(&job.name);
        let Some(limit) = plan::pod_limit(account_plan, &key) else {
            continue;
        };
        let wanted = limit.to_json();
        for name in index.pods_of(&key) {
            let current = index
                .pod(&key.namespace, name)
                .and_then(|pod| pod.limit.as_ref());
            if current != Some(&wanted) {
                writes.push((name.clone(), wanted.clone()));
            }
        }
    }
    writes
}

/// Pod annotations written at once per reconcile: enough that a job's pods
/// are rewritten in a few round trips, few enough not to flood the API
/// server (a change on a busy account writes its pods in waves).
const POD_WRITES_AT_ONCE: usize = 16;

/// Write the annotations [`pod_writes`] found stale, a bounded number at a time.
pub(super) async fn annotate_pods(
    ctx: &Context,
    integration: &ValidatedIntegration,
    account_plan: &AccountPlan,
) -> Result<(), Error> {
    let writes = pod_writes(&ctx.stores, integration, account_plan);
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &integration.namespace);
    let pods = &pods;
    futures::stream::iter(writes)
        .map(|(name, wanted)| async move {
            // Closed only on shutdown, when nothing more is written anyway.
            let _permit = ctx
                .pod_writes
                .acquire()
                .await
                .map_err(|_| Error::NotLeader)?;
            ctx.fence()?;
            let patch = ObjectMeta {
                name: Some(name.clone()),
                annotations: Some([(ANNOTATION_LIMIT.to_string(), wanted)].into()),
                ..ObjectMeta::default()
            }
            .into_request_partial::<Pod>();
            // The metadata form: the API server answers with the pod's
            // metadata only, not its whole spec and status.
            pods.patch_metadata(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(|_| ())
            .or_else(|error| match error {
                // The pod went away meanwhile: nothing left to annotate.
                kube::Error::Api(ref status) if status.code == 404 => Ok(()),
                other => Err(Error::AnnotatePod(
                    format!("{}/{name}", integration.namespace),
                    other,
                )),
            })
        })
        .buffer_unordered(POD_WRITES_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
}

/// Apply ConfigMap `saleslayer-operator-ca` in `namespace` when it does not
/// hold the current CA yet (once per namespace, until the CA changes or the
/// ConfigMap is found deleted).
pub(super) async fn publish_ca(ctx: &Context, namespace: &str) -> Result<(), Error> {
    let Some(ca) = ctx.ca.as_ref().map(|ca| ca.borrow().clone()) else {
        return Ok(());
    };
    if ctx
        .ca_published
        .lock()
        .is_ok_and(|done| done.get(namespace) == Some(&ca))
    {
        return Ok(());
    }
    ctx.fence()?;
    let map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CA_CONFIGMAP},
        "data": {CA_CONFIGMAP_KEY: ca},
    });
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(ctx.client.clone(), namespace)
        .patch(
            CA_CONFIGMAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&map),
        )
        .await
        .map_err(|error| Error::PublishCa(namespace.to_owned(), error))?;
    if let Ok(mut done) = ctx.ca_published.lock() {
        done.insert(namespace.to_owned(), ca);
    }
    Ok(())
}

pub(super) async fn patch_status(
    ctx: &Context,
    sli: &SalesLayerIntegration,
    status: &saleslayer_core::api::SalesLayerIntegrationStatus,
) -> Result<(), Error> {
    ctx.fence()?;
    let namespace = sli.namespace().unwrap_or_default();
    let name = sli.name_any();
    let patch = json!({
        "apiVersion": SalesLayerIntegration::api_version(&()),
        "kind": SalesLayerIntegration::kind(&()),
        "status": status,
    });
    Api::<SalesLayerIntegration>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(|_| ())
        .map_err(|error| Error::PatchStatus(format!("{namespace}/{name}"), error))
}

pub(super) async fn patch_account_status(
    ctx: &Context,
    sla: &SalesLayerAccount,
    status: &SalesLayerAccountStatus,
) -> Result<(), Error> {
    ctx.fence()?;
    let name = sla.name_any();
    let patch = json!({
        "apiVersion": SalesLayerAccount::api_version(&()),
        "kind": SalesLayerAccount::kind(&()),
        "status": status,
    });
    Api::<SalesLayerAccount>::all(ctx.client.clone())
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(|_| ())
        .map_err(|error| Error::PatchStatus(name, error))
}

#[cfg(test)]
mod tests {
    use saleslayer_core::plan::validate;
    use serde_json::json;

    use super::*;
    use crate::state::testing::{integration, labelled_pod, stores_with};

    #[test]
    fn only_pods_whose_annotation_differs_are_written() {
        let sli = integration(
            "shop",
            "catalog",
            json!({"account": "acme", "jobs": [{"name": "import", "weight": 3}, {"name": "prices"}]}),
        );
        let member = validate(&sli).expect("valid");
        let mut current = labelled_pod("shop", "import-0", "catalog", "import");
        let mut stale = labelled_pod("shop", "import-1", "catalog", "import");
        let fresh = labelled_pod("shop", "prices-0", "catalog", "prices");
        let stores = stores_with(
            vec![sli.clone()],
            vec![current.clone(), stale.clone(), fresh.clone()],
        );
        let plan = stores.plan_for(&member, None, 0).expect("acme allows shop");
        // import: 30 over 2 pods; prices: 10 over 1.
        let import = r#"{"requests":15,"periodMillis":10000,"maxConcurrency":15}"#;
        current.metadata.annotations =
            Some([(ANNOTATION_LIMIT.to_owned(), import.to_owned())].into());
        stale.metadata.annotations = Some([(ANNOTATION_LIMIT.to_owned(), "{}".to_owned())].into());
        let stores = stores_with(vec![sli], vec![current, stale, fresh]);
        let mut writes = pod_writes(&stores, &member, &plan);
        writes.sort();
        assert_eq!(
            writes,
            vec![
                ("import-1".to_owned(), import.to_owned()),
                (
                    "prices-0".to_owned(),
                    r#"{"requests":10,"periodMillis":10000,"maxConcurrency":10}"#.to_owned()
                ),
            ]
        );
    }
}
