//! `saleslayer-operator run`: wires the parts together — certificates, leader
//! election, the controller and its stores, the admission webhook, the quota
//! API — and keeps running whatever a part cannot do yet, saying so in a
//! warning. Every replica watches and serves the webhook; only the leader
//! writes and answers the quota API.
//!
//! Data enters through the Kubernetes client and the webhook's HTTPS port;
//! nothing here decides allocations (that is `saleslayer_core::plan` and
//! `saleslayer_core::allocation`).

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use kube::Client;
use tokio::sync::watch;
use tracing::{info, warn};

use saleslayer_core::injection::Injection;

use crate::certs::{self, Authority};
use crate::cli::RunArgs;
use crate::controller;
use crate::leader;
use crate::metrics::Metrics;
use crate::quota::{self, Quota, auth::Authenticator};
use crate::state::Reports;
use crate::tls::{self, CertificateFiles, Certificates, ServingTls};
use crate::webhook;
use saleslayer_runtime::serve::ServeLimits;

/// The Services of the chart whose DNS names the serving certificate covers.
const SERVICES: [&str; 2] = ["saleslayer-operator-webhook", "saleslayer-operator-quota"];

/// Why `run` stopped with an error: it could not start, or a part that
/// must always run ended before shutdown. Either way the process exits
/// non-zero and Kubernetes restarts it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Certificates(#[from] certs::Error),
    #[error("loading the TLS configuration: {0}")]
    Tls(#[source] crate::tls::TlsError),
    #[error("{0} stopped before shutdown: {1}")]
    PartEnded(&'static str, String),
    #[error("{0} panicked")]
    PartPanicked(&'static str),
}

/// The parts of a running operator that must all keep running.
#[derive(Default)]
struct Parts {
    running: tokio::task::JoinSet<(&'static str, Result<(), String>)>,
}

impl Parts {
    fn spawn<E: std::fmt::Display>(
        &mut self,
        name: &'static str,
        part: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        self.running
            .spawn(async move { (name, part.await.map_err(|e| e.to_string())) });
    }

    /// Wait for `stopped`, or for the first part to end, which is then an
    /// error and stops the others through `stop`. Every part gets `drain`
    /// to finish; what is still running then is aborted. `stopping` says
    /// whether shutdown has begun (`stopped` resolves once it has): a part
    /// that ends then is no failure.
    async fn supervise(
        mut self,
        stopped: impl Future<Output = ()>,
        stopping: impl Fn() -> bool,
        stop: impl FnOnce(),
        drain: Duration,
    ) -> Result<(), Error> {
        let mut stopped = std::pin::pin!(stopped);
        let first = tokio::select! {
            biased;
            () = &mut stopped => None,
            Some(ended) = self.running.join_next() => {
                // Read from the shutdown flag itself, not from `stopped`: a part
                // that stops on shutdown can end (and be joined here) in the
                // same instant, before `stopped` is polled as ready (seen in the
                // SIGTERM tests, about one run in six).
                (!stopping()).then_some(ended)
            }
        };
        let failure = first.map(|ended| match ended {
            Ok((name, Ok(()))) => Error::PartEnded(name, "it returned".into()),
            Ok((name, Err(error))) => Error::PartEnded(name, error),
            Err(_) => Error::PartPanicked("a part"),
        });
        if let Some(failure) = &failure {
            tracing::error!(%failure, "stopping every part");
            stop();
        }
        let drained = tokio::time::timeout(drain, async {
            while let Some(ended) = self.running.join_next().await {
                match ended {
                    Ok((name, Err(error))) => warn!(part = name, %error, "stopped with an error"),
                    Ok(_) => {}
                    Err(error) => warn!(%error, "a part panicked while stopping"),
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!("parts still running after {drain:?}; aborting them");
            self.running.abort_all();
        }
        failure.map_or(Ok(()), Err)
    }
}

/// How long the parts have to stop once asked.
const DRAIN: Duration = Duration::from_secs(15);

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
    let stop_tx = Arc::new(stop_tx);
    let on_signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = on_signal.send(true);
    });
    let stop_flag = stop_rx.clone();
    let stopping = move || *stop_flag.borrow();
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    // Certificates: from files (cert-manager), else the operator's own CA.
    let names = certs::serving_names(&SERVICES, &namespace, args.webhook_url.as_deref());
    let files = match (&args.tls_cert_file, &args.tls_key_file, &args.ca_file) {
        (Some(cert), Some(key), Some(ca)) => Some(CertificateFiles {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        }),
        _ => None,
    };
    let (certificates, authority) = match &files {
        Some(files) => (
            files.read().map_err(|e| {
                Error::Certificates(certs::Error::ReadFile(files.cert.display().to_string(), e))
            })?,
            None,
        ),
        None => {
            let authority = certs::authority(&client, &namespace).await?;
            let serving = authority.issue(&names)?;
            (
                Certificates {
                    ca_pem: authority.ca_pem.clone(),
                    cert_pem: serving.cert_pem,
                    key_pem: serving.key_pem,
                },
                Some(authority),
            )
        }
    };
    let tls = ServingTls::from_pem(
        certificates.cert_pem.as_bytes(),
        certificates.key_pem.as_bytes(),
    )
    .map_err(Error::Tls)?;
    let ca_pem = certificates.ca_pem.clone();
    // The CA pods and the API server trust: it changes only when mounted
    // files bring a new one.
    let (ca_tx, ca_rx) = watch::channel(ca_pem.clone());

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
    let mut parts = Parts::default();
    parts.spawn("the leader election", election);
    tokio::spawn(forget_when_following(leadership.clone(), metrics.clone()));

    let (queues, requested) = controller::queues();
    let shared = controller::Shared {
        ca: Some(ca_rx),
        reports: Reports::default(),
        requested,
        metrics: metrics.clone(),
        leadership: leadership.clone(),
    };
    let (stores, controller) = controller::controller(client.clone(), shared, stopped());
    let ready_stores = stores.clone();
    parts.spawn(
        "the metrics server",
        crate::metrics::serve(
            args.metrics_bind,
            metrics.clone(),
            Arc::new(move || ready_stores.synced()),
            ServeLimits::default(),
            stopped(),
        ),
    );
    info!(metrics = %args.metrics_bind, "serving /metrics, /healthz, /readyz");
    parts.spawn("the controller", async move {
        controller.await;
        Ok::<(), std::convert::Infallible>(())
    });

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
            queues,
            metrics.quota.clone(),
        )
        .with_leadership(leadership),
    );
    parts.spawn(
        "the quota API",
        webhook::serve(
            args.quota_bind,
            tls.clone(),
            quota::router(quota),
            webhook::limits(),
            stopped(),
        ),
    );
    info!(quota = %args.quota_bind, "serving the quota API");
    let router = webhook::router(stores, injection, metrics.webhook.clone());
    parts.spawn(
        "the webhook server",
        webhook::serve(
            args.webhook_bind,
            tls.clone(),
            router,
            webhook::limits(),
            stopped(),
        ),
    );
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

    match (authority, files) {
        (Some(authority), _) => {
            tokio::spawn(reissue(authority, names, tls, stopped()));
        }
        (None, Some(files)) => {
            // cert-manager renews the files: serve the new certificate from
            // the next handshake, and trust a new CA where it is published.
            let (client, configuration, url) = (
                client.clone(),
                args.webhook_configuration.clone(),
                args.webhook_url.clone(),
            );
            let on_new_ca = move |ca: String| {
                let _ = ca_tx.send(ca.clone());
                let (client, configuration, url) =
                    (client.clone(), configuration.clone(), url.clone());
                tokio::spawn(async move {
                    let patched = match &url {
                        Some(url) => webhook::register(&client, url, &ca).await,
                        None => webhook::patch_ca_bundle(&client, &configuration, &ca).await,
                    };
                    match patched {
                        Ok(()) => info!("the webhook trusts the renewed CA"),
                        Err(error) => warn!(%error, "could not give the webhook the renewed CA"),
                    }
                });
            };
            tokio::spawn(tls::follow_files(
                files,
                certificates,
                tls,
                FOLLOW_FILES_EVERY,
                on_new_ca,
                stopped(),
            ));
        }
        (None, None) => {}
    }

    // Runs until shutdown; a part that ends first ends the process with an
    // error, so Kubernetes restarts it rather than leave it half working.
    parts
        .supervise(
            stopped(),
            stopping,
            move || {
                let _ = stop_tx.send(true);
            },
            DRAIN,
        )
        .await
}

/// A replica that stops leading computes no allocation and answers no
/// lease: its per-job and per-account series go, so an alert's `max by`
/// sees only the leader's.
async fn forget_when_following(leadership: leader::Leadership, metrics: Arc<Metrics>) {
    let mut changes = leadership.changes();
    let mut led = changes.borrow_and_update().is_leader();
    while changes.changed().await.is_ok() {
        let leads = changes.borrow_and_update().is_leader();
        if led && !leads {
            metrics.forget_leadership();
            info!("stopped leading: its allocation and usage series are removed");
        }
        led = leads;
    }
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

/// How often mounted certificate files are read again.
const FOLLOW_FILES_EVERY: Duration = Duration::from_secs(5);

/// Issue a fresh serving certificate every [`certs::REISSUE_EVERY`].
async fn reissue(
    authority: Authority,
    names: Vec<String>,
    tls: Arc<ServingTls>,
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
                .reload(serving.cert_pem.as_bytes(), serving.key_pem.as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_part_that_ends_before_shutdown_stops_the_others_and_is_an_error() {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut parts = Parts::default();
        parts.spawn("the quitter", async { Err::<(), _>("port taken") });
        let mut rx = stop_rx.clone();
        parts.spawn("the stayer", async move {
            let _ = rx.wait_for(|stop| *stop).await;
            Ok::<(), String>(())
        });
        let result = parts
            .supervise(
                futures::future::pending(),
                || false,
                move || {
                    let _ = stop_tx.send(true);
                },
                DRAIN,
            )
            .await;
        match result {
            Err(Error::PartEnded(name, why)) => {
                assert_eq!((name, why.as_str()), ("the quitter", "port taken"));
            }
            other => panic!("expected the quitter's failure, got {other:?}"),
        }
        assert!(*stop_rx.borrow(), "the others were told to stop");
    }

    #[tokio::test]
    async fn a_part_that_ends_once_shutdown_began_is_no_failure() {
        // Shutdown has begun (the flag is set) but the future that says so
        // has not resolved yet: the part that stopped on it is no failure.
        let mut parts = Parts::default();
        parts.spawn("the election", async { Ok::<(), String>(()) });
        let result = parts
            .supervise(futures::future::pending(), || true, || {}, DRAIN)
            .await;
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn a_panicking_part_is_an_error_and_shutdown_is_not() {
        let mut parts = Parts::default();
        parts.spawn("the panicker", async {
            panic!("boom");
            #[allow(unreachable_code)]
            Ok::<(), String>(())
        });
        let result = parts
            .supervise(futures::future::pending(), || false, || {}, DRAIN)
            .await;
        assert!(matches!(result, Err(Error::PartPanicked(_))), "{result:?}");

        let mut parts = Parts::default();
        parts.spawn(
            "the server",
            futures::future::pending::<Result<(), String>>(),
        );
        // Shutdown asked: the still-running part is aborted after the drain.
        let result = parts
            .supervise(async {}, || true, || {}, Duration::from_millis(20))
            .await;
        assert!(result.is_ok(), "{result:?}");
    }
}
