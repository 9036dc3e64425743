//! `catalog-sync`: sync every product of the catalog, resuming from the
//! checkpoint; the settings are in `config.rs` and the README.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use catalog_sync::{Config, Sync, log};

fn main() -> ExitCode {
    let config = match Config::from_lookup(|name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(error) => {
            log::warn(&format!("cannot start: {error}"));
            return ExitCode::from(2);
        }
    };
    // reqwest is built without a default TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            log::warn(&format!("starting the async runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    // SIGTERM (the pod deleted, evicted or drained) stops the run between
    // two checkpoints; the Job's next pod resumes after the last one.
    let synced = Sync::new(config).and_then(|mut sync| {
        runtime.block_on(async {
            let terminate = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut signal) => {
                        signal.recv().await;
                    }
                    Err(error) => {
                        log::warn(&format!("cannot watch for SIGTERM: {error}"));
                        std::future::pending::<()>().await;
                    }
                }
            };
            sync.run_until(terminate).await
        })
    });
    match synced {
        Ok(checkpoint) => {
            println!("catalog-sync: {} products synced", checkpoint.items);
            ExitCode::SUCCESS
        }
        Err(error) => {
            log::warn(&format!("stopped: {error}"));
            ExitCode::from(error.exit_code())
        }
    }
}
