//! `saleslayer-sidecar`: the pacing proxy the operator's webhook injects
//! into pods annotated `saleslayer.io/proxy: "true"`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use saleslayer_sidecar::ProxyArgs;

/// Paces, retries and reports a pod's Sales Layer requests.
#[derive(Debug, Parser)]
#[command(name = "saleslayer-sidecar", version, about)]
struct Cli {
    #[command(flatten)]
    args: ProxyArgs,
}

fn main() -> ExitCode {
    let args = Cli::parse().args;
    saleslayer_runtime::init_tracing("info");
    let served = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(saleslayer_sidecar::RunError::Serve)
        .and_then(|runtime| {
            runtime.block_on(saleslayer_sidecar::run(
                args,
                saleslayer_runtime::shutdown_signal(),
            ))
        });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("saleslayer-sidecar: {error}");
            ExitCode::FAILURE
        }
    }
}
