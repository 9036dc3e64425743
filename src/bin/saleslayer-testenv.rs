//! `saleslayer-testenv`: starts the local control plane of the tests
//! (etcd + kube-apiserver, see `saleslayer_operator::testenv`) and keeps it
//! running until interrupted. `make demo` runs it; it is not shipped.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use saleslayer_operator::testenv::ControlPlane;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let out: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/demo/kubeconfig"));
    let plane = ControlPlane::start().await?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(plane.kubeconfig(), &out)
        .with_context(|| format!("writing the kubeconfig to {}", out.display()))?;
    println!(
        "control plane ready at {} in {:.1} s; kubeconfig: {}",
        plane.server(),
        plane.started_in().as_secs_f64(),
        out.display()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let _ = std::fs::remove_file(&out);
    println!("control plane stopped");
    Ok(())
}
