//! The sidecar's cost (issue 15 item 5, issue 10): its binary's size, its
//! resident memory idle and under load, and the latency it adds per request
//! under its grant, against calling the simulator directly.
//!
//! The sidecar runs as its own process (the binary the image ships), in
//! front of the simulator in this process; `CLIENTS` workers send `RATE`
//! requests per second in all for `SECONDS`, well under the sidecar's grant
//! and the simulator's limit, first through the sidecar, then directly.
//! RSS is read from `/proc/<pid>/status` (VmRSS idle, VmHWM after the load).
//!
//! Run: `cargo build --release -p saleslayer-sidecar && cargo bench --bench sidecar`.
//! Another binary: `SIDECAR_BIN=path SIDECAR_ARGS=proxy cargo bench --bench sidecar`
//! (how the figures of the single-binary sidecar before the workspace split
//! were taken). Ends with one `BENCH {json}` line.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use saleslayer_simulator::{API_KEY_HEADER, PRODUCTS_PATH, SimulatorConfig};
use saleslayer_testenv::free_port;
use serde_json::json;

const CLIENTS: usize = 8;
const RATE: u32 = 400;
const SECONDS: u64 = 10;

struct Sidecar {
    child: Child,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A line of `/proc/<pid>/status` in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// p50 and p99 of `samples`, in milliseconds.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(index).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    (at(0.50), at(0.99))
}

/// `RATE` requests per second for `SECONDS` over `CLIENTS` workers; the
/// latency of each.
async fn load(base: &str) -> Vec<Duration> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .expect("client");
    let url = Arc::new(format!("{base}{PRODUCTS_PATH}?$top=10"));
    let spacing = Duration::from_secs_f64(CLIENTS as f64 / f64::from(RATE));
    let each = RATE as usize * SECONDS as usize / CLIENTS;
    let mut workers = Vec::new();
    for worker in 0..CLIENTS {
        let (http, url) = (http.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(each);
            // Spread the workers over one spacing so sends do not bunch.
            tokio::time::sleep(spacing.mul_f64(worker as f64 / CLIENTS as f64)).await;
            let mut next = Instant::now();
            for _ in 0..each {
                tokio::time::sleep_until(next.into()).await;
                next += spacing;
                let start = Instant::now();
                let answered = http
                    .get(url.as_str())
                    .header(API_KEY_HEADER, "bench")
                    .send()
                    .await;
                if let Ok(response) = answered {
                    let ok = response.status().is_success();
                    let _ = response.bytes().await;
                    if ok {
                        samples.push(start.elapsed());
                    }
                }
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.expect("worker"));
    }
    all
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let root = saleslayer_testenv::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let binary = std::env::var_os("SIDECAR_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| target.join("release/saleslayer-sidecar"));
    let prefix: Vec<String> = std::env::var("SIDECAR_ARGS")
        .map(|a| a.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let size = std::fs::metadata(&binary)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; build it with `cargo build --release --bin saleslayer-sidecar`",
                binary.display()
            )
        })
        .len();

    let simulator_port = free_port();
    tokio::spawn(saleslayer_simulator::serve(
        ([127, 0, 0, 1], simulator_port).into(),
        SimulatorConfig {
            requests: 1_000_000,
            period: Duration::from_secs(1),
        },
        futures::future::pending(),
    ));
    let (proxy_port, metrics_port) = (free_port(), free_port());
    let child = Command::new(&binary)
        .args(&prefix)
        .args(["--bind", &format!("127.0.0.1:{proxy_port}")])
        .args(["--metrics-bind", &format!("127.0.0.1:{metrics_port}")])
        .env(
            "SALESLAYER_UPSTREAM",
            format!("http://127.0.0.1:{simulator_port}"),
        )
        .env("SALESLAYER_RATE_REQUESTS", "2000")
        .env("SALESLAYER_RATE_PERIOD_MS", "1000")
        .env("SALESLAYER_MAX_CONCURRENCY", "32")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the sidecar starts");
    let sidecar = Sidecar { child };
    let pid = sidecar.child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while reqwest::get(format!("http://127.0.0.1:{metrics_port}/healthz"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the sidecar did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = status_kib(pid, "VmRSS:");

    let through = load(&format!("http://127.0.0.1:{proxy_port}")).await;
    let loaded = status_kib(pid, "VmRSS:");
    let peak = status_kib(pid, "VmHWM:");
    let direct = load(&format!("http://127.0.0.1:{simulator_port}")).await;
    drop(sidecar);

    let (p50, p99) = percentiles(through.clone());
    let (d50, d99) = percentiles(direct.clone());
    println!("sidecar {} ({})", binary.display(), prefix.join(" "));
    println!("  binary: {:.1} MiB", size as f64 / 1024.0 / 1024.0);
    println!(
        "  RSS: idle {:.1} MiB, under load {:.1} MiB, peak {:.1} MiB",
        mib(idle),
        mib(loaded),
        mib(peak)
    );
    println!(
        "  {RATE}/s for {SECONDS} s over {CLIENTS} workers: through the sidecar p50 {p50:.2} ms p99 {p99:.2} ms ({} answered); direct p50 {d50:.2} ms p99 {d99:.2} ms ({} answered)",
        through.len(),
        direct.len()
    );
    println!("  added: p50 {:.2} ms, p99 {:.2} ms", p50 - d50, p99 - d99);
    println!(
        "BENCH {}",
        json!({
            "bench": "sidecar",
            "binary": binary.file_name().and_then(|n| n.to_str()),
            "binary_mib": (size as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            "rss_idle_mib": (mib(idle) * 10.0).round() / 10.0,
            "rss_load_mib": (mib(loaded) * 10.0).round() / 10.0,
            "rss_peak_mib": (mib(peak) * 10.0).round() / 10.0,
            "rate": RATE,
            "through_p50_ms": (p50 * 100.0).round() / 100.0,
            "through_p99_ms": (p99 * 100.0).round() / 100.0,
            "direct_p50_ms": (d50 * 100.0).round() / 100.0,
            "direct_p99_ms": (d99 * 100.0).round() / 100.0,
            "added_p50_ms": ((p50 - d50) * 100.0).round() / 100.0,
            "added_p99_ms": ((p99 - d99) * 100.0).round() / 100.0,
        })
    );
}
