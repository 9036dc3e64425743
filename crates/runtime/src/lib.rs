//! The async plumbing every process of saleslayer-operator shares (the
//! operator, the sidecar, the simulator): the clock, the `/metrics`
//! exposition, serving HTTP to clients that may be hostile, logs, and
//! shutdown on a signal.
//!
//! May import: tokio, axum, prometheus-client, tracing. Never: a Kubernetes
//! client, the pod contract, any decision of the operator. Everything here is
//! small and generic on purpose; what a part decides lives in that part.
#![forbid(unsafe_code)]

pub mod clock;
pub mod metrics;
pub mod serve;

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}

/// Logs: JSON in a cluster or when piped, readable text on a terminal;
/// `RUST_LOG` filters, else `default_filter`.
pub fn init_tracing(default_filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if in_cluster || !std::io::stderr().is_terminal() {
        builder.json().with_writer(std::io::stderr).init();
    } else {
        builder.with_writer(std::io::stderr).init();
    }
}
