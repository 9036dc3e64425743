//! The client as a process against the simulator on loopback: killed
//! halfway, it resumes from its checkpoint, and the simulator's `/stats`
//! show that no finished page was fetched again; through the sidecar, a
//! throttling upstream still yields the whole catalog.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use catalog_sync::Checkpoint;
use saleslayer_runtime::clock::SystemClock;
use saleslayer_runtime::serve::{ServeLimits, serve};
use saleslayer_sidecar::pacer::Limit;
use saleslayer_sidecar::retry::{RetryPolicy, ThrottleStatuses};
use saleslayer_sidecar::{Proxy, ProxyConfig};
use saleslayer_simulator::{
    PRODUCTS, SimulatorConfig, SimulatorOptions, SimulatorStats, ThrottleSignal, router_with,
};

const KEY: &str = "sync-key";
/// 5 000 products, 100 a page.
const PAGES: u64 = 50;

async fn simulator(requests: u32, signal: ThrottleSignal) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let options = SimulatorOptions {
        signal,
        ..SimulatorOptions::default()
    };
    let config = SimulatorConfig {
        requests,
        period: Duration::from_secs(1),
    };
    let app = router_with(config, &options, Arc::new(SystemClock::default()));
    tokio::spawn(serve(
        listener,
        app,
        ServeLimits::default(),
        std::future::pending(),
    ));
    url
}

async fn stats(simulator: &str) -> SimulatorStats {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::get(format!("{simulator}/stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats JSON")
}

/// `catalog-sync` with only the given variables (and the key).
fn client(vars: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_catalog-sync"));
    command.env_clear().env("SALESLAYER_API_KEY", KEY);
    for (name, value) in vars {
        command.env(name, value);
    }
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

/// Wait for `child` to exit (at most `deadline`); its stdout.
async fn finish(child: Child, deadline: Duration) -> String {
    let waited = tokio::time::timeout(
        deadline,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    );
    let output = waited
        .await
        .expect("the client did not finish in time")
        .expect("join")
        .expect("wait");
    assert!(
        output.status.success(),
        "{:?}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn checkpoint(path: &Path) -> Option<Checkpoint> {
    Checkpoint::load(path).ok().flatten()
}

fn files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("state/checkpoint.json"),
        dir.join("products.jsonl"),
        dir.join("metrics.prom"),
    )
}

/// The client without a sidecar against `upstream`, pacing itself by its
/// env share (20 per second), its files in `dir`.
fn self_paced(upstream: &str, dir: &Path) -> Vec<(&'static str, String)> {
    let (checkpoint_file, output, metrics) = files(dir);
    vec![
        ("CATALOG_SYNC_UPSTREAM", upstream.to_owned()),
        ("SALESLAYER_RATE_REQUESTS", "20".into()),
        ("SALESLAYER_RATE_PERIOD_MS", "1000".into()),
        (
            "CATALOG_SYNC_CHECKPOINT",
            checkpoint_file.display().to_string(),
        ),
        ("CATALOG_SYNC_OUTPUT", output.display().to_string()),
        ("CATALOG_SYNC_METRICS_FILE", metrics.display().to_string()),
    ]
}

/// Run the client again to the end: it fetches exactly the pages after the
/// `checkpointed` ones (`before` were accepted so far); the accepted count
/// after it.
async fn resume(upstream: &str, vars: &[(&str, String)], before: u64, checkpointed: u64) -> u64 {
    let stdout = finish(
        client(vars).spawn().expect("restart"),
        Duration::from_secs(120),
    )
    .await;
    assert!(
        stdout.contains(&format!("{PRODUCTS} products synced")),
        "{stdout}"
    );
    let after = stats(upstream).await.by_key[KEY].accepted;
    assert_eq!(
        after - before,
        PAGES - checkpointed,
        "the resumed run fetched exactly the pages after the checkpoint"
    );
    after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_resumes_without_fetching_finished_pages_again() {
    let upstream = simulator(50, ThrottleSignal::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (checkpoint_file, output, metrics) = files(dir.path());
    let vars = self_paced(&upstream, dir.path());
    let mut first = client(&vars).spawn().expect("start the client");
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint(&checkpoint_file).is_none_or(|c| c.pages < PAGES / 2) {
        assert!(
            Instant::now() < deadline,
            "no half-way checkpoint within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().expect("kill");
    let _ = first.wait();
    let killed_at = checkpoint(&checkpoint_file).expect("a checkpoint");
    assert!(!killed_at.done && killed_at.pages < PAGES, "{killed_at:?}");
    let before = stats(&upstream).await.by_key[KEY].accepted;
    // At most the one page in flight at the kill was fetched and not checkpointed.
    assert!(
        before == killed_at.pages || before == killed_at.pages + 1,
        "{before} fetched, {} checkpointed",
        killed_at.pages
    );

    let after = resume(&upstream, &vars, before, killed_at.pages).await;
    let done = checkpoint(&checkpoint_file).expect("final checkpoint");
    assert_eq!(
        (done.done, done.items, done.pages, done.last_id),
        (true, PRODUCTS, PAGES, Some(PRODUCTS))
    );
    // Every product written once, in order, despite the kill.
    let text = std::fs::read_to_string(&output).expect("output");
    let ids: Vec<u64> = text
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).expect("a JSON line")["prod_id"]
                .as_u64()
                .expect("an id")
        })
        .collect();
    assert_eq!(ids, (1..=PRODUCTS).collect::<Vec<_>>());
    let metrics = std::fs::read_to_string(&metrics).expect("metrics");
    assert!(
        metrics.contains("\ncatalog_sync_products 5000\n")
            && metrics.contains("\ncatalog_sync_done 1\n"),
        "{metrics}"
    );

    // Once done, another run fetches nothing and says so.
    let stdout = finish(
        client(&vars).spawn().expect("rerun"),
        Duration::from_secs(30),
    )
    .await;
    assert!(stdout.contains("5000 products synced"), "{stdout}");
    assert_eq!(stats(&upstream).await.by_key[KEY].accepted, after);
}

/// A sidecar in process, pacing at `share` and retrying `throttle` statuses.
async fn sidecar(upstream: &str, share: Limit, throttle: &str) -> String {
    let config = ProxyConfig {
        upstream: upstream.to_owned(),
        env_share: share,
        policy: RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(800),
            throttle_statuses: ThrottleStatuses::parse(throttle).expect("statuses"),
        },
        queue: 64,
        upstream_timeout: Duration::from_secs(10),
        limit_file: None,
        quota: None,
        max_body: saleslayer_sidecar::MAX_BODY,
        serve: ServeLimits::default(),
    };
    let proxy = Proxy::new(
        &config,
        Arc::new(SystemClock::default()),
        fastrand::Rng::new(),
    )
    .expect("proxy");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(serve(
        listener,
        saleslayer_sidecar::router(proxy),
        ServeLimits::default(),
        std::future::pending(),
    ));
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_sidecar_a_throttling_upstream_still_yields_the_whole_catalog() {
    // The upstream allows 10 a second and signals 503 without Retry-After;
    // the sidecar's share (40 a second) is four times too generous, so it is throttled
    // and retries by its own backoff.
    let upstream = simulator(
        10,
        ThrottleSignal {
            status: 503,
            retry_after: false,
        },
    )
    .await;
    let share = Limit {
        requests: 40,
        period_millis: 1_000,
        max_concurrency: 1,
    };
    let proxy = sidecar(&upstream, share, "429,503").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (checkpoint_file, _, _) = files(dir.path());
    let vars = [
        ("SALESLAYER_API_URL", proxy),
        ("SALESLAYER_THROTTLE_STATUSES", "429,503".into()),
        (
            "CATALOG_SYNC_CHECKPOINT",
            checkpoint_file.display().to_string(),
        ),
    ];
    let stdout = finish(
        client(&vars).spawn().expect("start"),
        Duration::from_secs(120),
    )
    .await;
    assert!(stdout.contains("5000 products synced"), "{stdout}");
    let seen = stats(&upstream).await;
    assert_eq!(seen.by_key[KEY].accepted, PAGES, "each page served once");
    assert!(
        seen.throttled > 0,
        "the sidecar was throttled and retried: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_between_checkpoints_with_143_and_a_restart_resumes() {
    let upstream = simulator(50, ThrottleSignal::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (checkpoint_file, output, _) = files(dir.path());
    let vars = self_paced(&upstream, dir.path());
    let first = client(&vars).spawn().expect("start the client");
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint(&checkpoint_file).is_none_or(|c| c.pages < 5) {
        assert!(Instant::now() < deadline, "no fifth checkpoint within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // As the kubelet stops a container: SIGTERM, then wait.
    let terminated = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(terminated.success());
    let stopped = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || first.wait_with_output()),
    )
    .await
    .expect("the client stopped within 10 s of SIGTERM")
    .expect("join")
    .expect("wait");
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(143), "{stderr}");
    let at_stop = checkpoint(&checkpoint_file).expect("a checkpoint");
    assert!(
        stderr.contains(&format!("{} pages are checkpointed", at_stop.pages)),
        "{stderr}"
    );
    assert!(!at_stop.done && at_stop.pages < PAGES, "{at_stop:?}");
    // A page in flight at the signal is dropped, never half written.
    let before = stats(&upstream).await.by_key[KEY].accepted;
    assert!(
        before == at_stop.pages || before == at_stop.pages + 1,
        "{before} fetched, {} checkpointed",
        at_stop.pages
    );
    let lines = std::fs::read_to_string(&output)
        .expect("output")
        .lines()
        .count() as u64;
    assert_eq!(lines, at_stop.items, "the output ends at the checkpoint");

    resume(&upstream, &vars, before, at_stop.pages).await;
}
