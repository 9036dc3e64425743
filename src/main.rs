//! The `saleslayer-operator` binary: parses the command line and hands each
//! subcommand to its module.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use saleslayer_operator::cli::{Cli, Command, CrdArgs, RunArgs, SimulateArgs};
use saleslayer_operator::operator;
use saleslayer_runtime::{init_tracing, shutdown_signal};
use saleslayer_sidecar::ProxyArgs;

/// Logs by default: our own at info, the Kubernetes client only when it warns.
const LOG_FILTER: &str = "info,kube_runtime=warn,kube_client=warn";

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd(args) => print_crd(&args),
        Command::Run(args) => run(*args),
        Command::Proxy(args) => proxy(*args),
        Command::Simulate(args) => simulate(args),
    }
}

fn print_crd(args: &CrdArgs) -> ExitCode {
    use saleslayer_core::api::{CRD_FILES, crd_yaml, crds, crds_yaml};
    let written = match &args.dir {
        None => crds_yaml()
            .map(|yaml| print!("{yaml}"))
            .map_err(|e| e.to_string()),
        Some(dir) => crds().iter().zip(CRD_FILES).try_for_each(|(crd, file)| {
            let yaml = crd_yaml(crd).map_err(|e| e.to_string())?;
            std::fs::write(dir.join(file), yaml)
                .map_err(|e| format!("writing {}: {e}", dir.join(file).display()))
        }),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("saleslayer-operator crd: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    init_tracing(LOG_FILTER);
    // One TLS provider for the whole process (kube, the webhook server).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("saleslayer-operator run: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(operate(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn operate(args: RunArgs) -> anyhow::Result<()> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .context("loading the kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig (--kubeconfig, KUBECONFIG) and not in a cluster")?,
    };
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    tracing::info!(
        quota = %args.quota_bind,
        metrics = %args.metrics_bind,
        "starting"
    );
    operator::run(client, args, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

fn simulate(args: SimulateArgs) -> ExitCode {
    init_tracing(LOG_FILTER);
    let served = tokio::runtime::Runtime::new()
        .and_then(|runtime| runtime.block_on(saleslayer_simulator::run(args, shutdown_signal())));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("simulate: {error}");
            ExitCode::FAILURE
        }
    }
}

fn proxy(args: ProxyArgs) -> ExitCode {
    init_tracing(LOG_FILTER);
    // The same sidecar as `saleslayer-sidecar`; it installs its TLS provider itself.
    let served = tokio::runtime::Runtime::new()
        .map_err(saleslayer_sidecar::RunError::Serve)
        .and_then(|runtime| runtime.block_on(saleslayer_sidecar::run(args, shutdown_signal())));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("proxy: {error}");
            ExitCode::FAILURE
        }
    }
}
