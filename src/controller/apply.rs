//! The controller's writes: pod annotations, the CA ConfigMap and status,
//! each through server-side apply under [`FIELD_MANAGER`]. Only the
//! reconcile calls these, after planning, and each checks that this replica
//! still leads right before it writes.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{Context, Error, FIELD_MANAGER, plan};
use crate::api::{ANNOTATION_LIMIT, SalesLayerIntegration};
use plan::{AccountPlan, ValidatedIntegration};

pub(super) async fn annotate_pods(
    ctx: &Context,
    integration: &ValidatedIntegration,
    account_plan: &AccountPlan,
) -> Result<(), Error> {
    // Which pods need a new annotation, decided under the lock, written after.
    let mut writes = Vec::new();
    if let Ok(index) = ctx.stores.index.read() {
        for job in &integration.jobs {
            let key = integration.key(&job.name);
            let Some(limit) = plan::pod_limit(account_plan, &key) else {
                continue;
            };
            let wanted = limit.to_json();
            for name in index.pods_of(&key) {
                let current = ctx
                    .stores
                    .pods
                    .get(&ObjectRef::new(name).within(&key.namespace))
                    .and_then(|pod| {
                        pod.metadata
                            .annotations
                            .as_ref()?
                            .get(ANNOTATION_LIMIT)
                            .cloned()
                    });
                if current.as_ref() != Some(&wanted) {
                    writes.push((name.clone(), wanted.clone()));
                }
            }
        }
    }
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &integration.namespace);
    for (name, wanted) in writes {
        ctx.fence()?;
        let patch = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "annotations": { ANNOTATION_LIMIT: wanted } },
        });
        pods.patch(
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
        })?;
    }
    Ok(())
}

/// Apply ConfigMap `saleslayer-operator-ca` in `namespace` once per process.
pub(super) async fn publish_ca(ctx: &Context, namespace: &str) -> Result<(), Error> {
    let Some(ca) = ctx.ca_pem.as_ref() else {
        return Ok(());
    };
    if ctx
        .ca_published
        .lock()
        .map(|done| done.contains(namespace))
        .unwrap_or(false)
    {
        return Ok(());
    }
    ctx.fence()?;
    let map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": crate::webhook::mutate::CA_CONFIGMAP},
        "data": {"ca.crt": ca},
    });
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(ctx.client.clone(), namespace)
        .patch(
            crate::webhook::mutate::CA_CONFIGMAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&map),
        )
        .await
        .map_err(|error| Error::PublishCa(namespace.to_owned(), error))?;
    if let Ok(mut done) = ctx.ca_published.lock() {
        done.insert(namespace.to_owned());
    }
    Ok(())
}

pub(super) async fn patch_status(
    ctx: &Context,
    sli: &SalesLayerIntegration,
    status: &crate::api::SalesLayerIntegrationStatus,
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
