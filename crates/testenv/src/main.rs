//! `saleslayer-testenv`: starts one of the test clusters (see the
//! `saleslayer-testenv` library) and keeps it running until interrupted.
//! `make demo` runs the node mode; it is not shipped.
//!
//! ```text
//! saleslayer-testenv [control-plane] [KUBECONFIG]      etcd + kube-apiserver
//! saleslayer-testenv node [KUBECONFIG] [--image NAME]  a whole node; imports
//!                                                       the named images of
//!                                                       `make image`
//! ```
//! The kubeconfig is copied to KUBECONFIG (default `target/demo/kubeconfig`)
//! once the cluster is ready, and removed when it stops (SIGINT, SIGTERM).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use saleslayer_testenv::{ControlPlane, Node};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    let node = match args.peek().map(String::as_str) {
        Some("node") => {
            args.next();
            true
        }
        Some("control-plane") => {
            args.next();
            false
        }
        _ => false,
    };
    let mut out = PathBuf::from("target/demo/kubeconfig");
    let mut images = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--image" if node => images.push(args.next().context("--image needs a name")?),
            flag if flag.starts_with('-') => bail!(
                "unknown option {flag}; usage: saleslayer-testenv [control-plane|node] [KUBECONFIG] [--image NAME]..."
            ),
            path => out = PathBuf::from(path),
        }
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }

    if node {
        let node = Node::start().await?;
        for name in &images {
            let reference = node
                .import(name)
                .with_context(|| format!("importing the {name} image"))?;
            println!("imported {reference}");
        }
        publish(node.kubeconfig(), &out)?;
        println!(
            "node ready at {} in {:.1} s (network namespace {}, janitor pid {}); kubeconfig: {}",
            node.server(),
            node.started_in().as_secs_f64(),
            node.netns(),
            node.janitor_pid(),
            out.display()
        );
        stopped().await?;
        let _ = std::fs::remove_file(&out);
        drop(node);
        println!("node stopped and removed");
    } else {
        let plane = ControlPlane::start().await?;
        publish(&plane.kubeconfig(), &out)?;
        println!(
            "control plane ready at {} in {:.1} s; kubeconfig: {}",
            plane.server(),
            plane.started_in().as_secs_f64(),
            out.display()
        );
        stopped().await?;
        let _ = std::fs::remove_file(&out);
        println!("control plane stopped");
    }
    Ok(())
}

fn publish(kubeconfig: &Path, out: &Path) -> anyhow::Result<()> {
    std::fs::copy(kubeconfig, out)
        .with_context(|| format!("writing the kubeconfig to {}", out.display()))?;
    Ok(())
}

async fn stopped() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
