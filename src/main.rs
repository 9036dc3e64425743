//! The `saleslayer-operator` binary: parses the command line and hands each
//! subcommand to its module.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use saleslayer_operator::cli::{Cli, Command, ProxyArgs, RunArgs, SimulateArgs};
use saleslayer_operator::operator;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd => print_crd(),
        Command::Run(args) => run(*args),
        Command::Proxy(args) => proxy(*args),
        Command::Simulate(args) => simulate(args),
    }
}

fn print_crd() -> ExitCode {
    match saleslayer_operator::api::crd_yaml() {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("saleslayer-operator crd: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    init_tracing();
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

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
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

/// JSON logs in a cluster or when piped; readable text on a terminal.
fn init_tracing() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_runtime=warn,kube_client=warn"));
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if in_cluster || !std::io::stderr().is_terminal() {
        builder.json().with_writer(std::io::stderr).init();
    } else {
        builder.with_writer(std::io::stderr).init();
    }
}

fn simulate(args: SimulateArgs) -> ExitCode {
    init_tracing();
    let config = saleslayer_operator::simulator::SimulatorConfig {
        requests: args.requests,
        period: std::time::Duration::from_secs(args.period_seconds.into()),
    };
    let served = tokio::runtime::Runtime::new().and_then(|runtime| {
        runtime.block_on(saleslayer_operator::simulator::serve(
            args.bind,
            config,
            shutdown_signal(),
        ))
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("simulate: {error}");
            ExitCode::FAILURE
        }
    }
}

fn proxy(args: ProxyArgs) -> ExitCode {
    init_tracing();
    // The proxy installs the TLS provider its clients need itself.
    let served = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            runtime.block_on(saleslayer_operator::proxy::run(args, shutdown_signal()))
        });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("proxy: {error:#}");
            ExitCode::FAILURE
        }
    }
}
