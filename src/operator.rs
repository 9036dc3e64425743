//! `saleslayer-operator run`: wires the parts together — certificates, leader
//! election, the controller and its stores, the admission webhook, the quota
//! API — and keeps running whatever a part cannot do yet, saying so in a
//! warning. Every replica watches and serves the webhook; only the leader
//! writes and answers the quota API.
//!
//! Data enters through the Kubernetes client and the webhook's HTTPS port;
//! nothing here decides allocations (that is `controller::plan` and
//! `allocation`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use futures::FutureExt;
use kube::Client;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::certs::{self, Authority};
use crate::cli::RunArgs;
use crate::controller;
use crate::leader;
use crate::metrics::Metrics;
use crate::quota::{self, Quota, auth::Authenticator, throttle::ThrottleBook};
use crate::webhook::{self, mutate::Injection};

/// The Services of the chart whose DNS names the serving certificate covers.
const SERVICES: [&str; 2] = ["saleslayer-operator-webhook", "saleslayer-operator-quota"];

/// Failures that stop `run` before it serves anything.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Certificates(#[from] certs::Error),
    #[error("loading the TLS configuration: {0}")]
    Tls(#[source] std::io::Error),
}

/// The namespace of the operator's own Secret: the flag, else `POD_NAMESPACE`,
/// else `saleslayer-system`.
pub fn namespace(args: &RunArgs) -> String {
    args.namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "saleslayer-system".into())
}

/// Run until `shutdown` resolves.
pub async fn run(
    client: Client,
    args: RunArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let namespace = namespace(&args);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    // Certificates: from files (cert-manager), else the operator's own CA.
    let names = certs::serving_names(&SERVICES, &namespace, args.webhook_url.as_deref());
    let (ca_pem, serving, authority) =
        match (&args.tls_cert_file, &args.tls_key_file, &args.ca_file) {
            (Some(cert), Some(key), Some(ca)) => {
                let (ca_pem, serving) = certs::from_files(ca, cert, key)?;
                (ca_pem, serving, None)
            }
            _ => {
                let authority = certs::authority(&client, &namespace).await?;
                let serving = authority.issue(&names)?;
                (authority.ca_pem.clone(), serving, Some(authority))
            }
        };
    let tls = RustlsConfig::from_pem(
        serving.cert_pem.clone().into_bytes(),
        serving.key_pem.clone().into_bytes(),
    )
    .await
    .map_err(Error::Tls)?;

    let mut metrics = Metrics::default();
    let leader_gauge = leader::register(&mut metrics.registry);
    let metrics = Arc::new(metrics);
    let election = leader::Election::from_env(&args.lease_name, &namespace);
    let (leadership, election) = leader::start(
        client.clone(),
        election,
        leader_elect(&args),
        leader_gauge,
        stopped(),
    );
    let metrics_server = tokio::spawn(crate::metrics::serve(
        args.metrics_bind,
        metrics.clone(),
        stopped(),
    ));
    info!(metrics = %args.metrics_bind, "serving /metrics, /healthz, /readyz");
    let throttling = Arc::new(Mutex::new(ThrottleBook::default()));
    let (changed_tx, changed_rx) = mpsc::unbounded_channel();
    let shared = controller::Shared {
        ca_pem: Some(ca_pem.clone()),
        throttling: throttling.clone(),
        changed: changed_rx,
        metrics: metrics.controller.clone(),
        demand: Arc::default(),
        leadership: leadership.clone(),
    };
    let (stores, controller) = controller::controller(client.clone(), shared, stopped());
    let controller = tokio::spawn(controller);

    // Serve first, then register: a registered webhook that does not answer
    // would refuse every labelled pod (failurePolicy Fail).
    let injection = Injection {
        quota_url: quota_url(&args, &namespace),
        proxy_image: args.proxy_image.clone(),
        proxy_upstream: args.proxy_upstream.clone(),
    };
    let quota = Arc::new(
        Quota::new(
            stores.clone(),
            Authenticator::new(client.clone()),
            throttling,
            changed_tx,
            metrics.quota.clone(),
        )
        .with_leadership(leadership),
    );
    let quota_server = tokio::spawn(webhook::serve(
        args.quota_bind,
        tls.clone(),
        quota::router(quota),
        stopped(),
    ));
    info!(quota = %args.quota_bind, "serving the quota API");
    let router = webhook::router(stores, injection, metrics.webhook.clone());
    let server = tokio::spawn(webhook::serve(
        args.webhook_bind,
        tls.clone(),
        router,
        stopped(),
    ));
    info!(webhook = %args.webhook_bind, "serving the admission webhook");
    match &args.webhook_url {
        Some(url) => match webhook::register(&client, url, &ca_pem).await {
            Ok(()) => info!(
                "registered MutatingWebhookConfiguration {}",
                webhook::CONFIGURATION_NAME
            ),
            Err(error) => {
                warn!(%error, "could not register the MutatingWebhookConfiguration; pods are not injected until it exists")
            }
        },
        None => {
            if let Err(error) =
                webhook::patch_ca_bundle(&client, &args.webhook_configuration, &ca_pem).await
            {
                warn!(%error, configuration = %args.webhook_configuration, "could not set the webhook's caBundle; install the chart (or pass --webhook-url out of cluster)");
            }
        }
    }

    if let Some(authority) = authority {
        tokio::spawn(reissue(authority, names, tls, stopped()));
    }

    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            warn!(%error, bind = %args.webhook_bind, "the webhook server stopped; the controller keeps running")
        }
        Err(error) => warn!(%error, "the webhook server task failed"),
    }
    match quota_server.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            warn!(%error, bind = %args.quota_bind, "the quota API stopped; the controller keeps running")
        }
        Err(error) => warn!(%error, "the quota API task failed"),
    }
    let _ = controller.await;
    // Hands the Lease over and removes the pod's leader label.
    let _ = election.await;
    match metrics_server.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(%error, bind = %args.metrics_bind, "/metrics could not be served"),
        Err(error) => warn!(%error, "the metrics task failed"),
    }
    Ok(())
}

/// `--leader-elect`, else on in a cluster (a service host and no kubeconfig).
fn leader_elect(args: &RunArgs) -> bool {
    args.leader_elect.unwrap_or_else(|| {
        std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            && args.kubeconfig.is_none()
            && std::env::var_os("KUBECONFIG").is_none()
    })
}

/// The quota API's URL as pods should see it.
fn quota_url(args: &RunArgs, namespace: &str) -> String {
    if let Some(url) = &args.quota_url {
        return url.clone();
    }
    let port = args.quota_bind.port();
    match args
        .webhook_url
        .as_deref()
        .and_then(|u| u.split_once("://"))
    {
        Some((scheme, rest)) => {
            let authority = rest.split('/').next().unwrap_or(rest);
            let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
            format!("{scheme}://{host}:{port}")
        }
        None => format!("https://saleslayer-operator-quota.{namespace}.svc:{port}"),
    }
}

/// Issue a fresh serving certificate every [`certs::REISSUE_EVERY`].
async fn reissue(
    authority: Authority,
    names: Vec<String>,
    tls: RustlsConfig,
    stopped: impl Future<Output = ()>,
) {
    let stopped = stopped.fuse();
    futures::pin_mut!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(certs::REISSUE_EVERY) => {}
        }
        let renewed = match authority.issue(&names) {
            Ok(serving) => tls
                .reload_from_pem(serving.cert_pem.into_bytes(), serving.key_pem.into_bytes())
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match renewed {
            Ok(()) => info!("serving certificate renewed"),
            Err(error) => {
                warn!(%error, "renewing the serving certificate failed; retrying in a minute");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    }
}
