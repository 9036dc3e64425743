//! How fast the controller converges (issue 3, item 6): 200 integrations × 5 jobs ×
//! 10 pods on the testenv control plane; the time from a change to the status that
//! reflects it, and the operator's peak RSS. Goal: p99 under 1 s, RSS under 64 MiB.
//!
//! ```text
//!  this process ──create/patch──▶ kube-apiserver ◀──watch/apply── saleslayer-operator run
//!       ▲                              │                            (separate process:
//!       └──── watch of every SLI ──────┘                             its RSS is its own)
//! ```
//!
//! 1. Start etcd + kube-apiserver, install the CRD, create 20 namespaces, 200
//!    integrations on 40 accounts (5 each, in different namespaces, so siblings
//!    matter) and 10 000 pods, with the operator not yet running.
//! 2. Start the operator; time until every status equals what
//!    `plan::plan_account` predicts, then check every pod's annotation.
//! 3. One change at a time, alternating: add a pod to a random job, or patch a
//!    random job's weight (to one that changes the allocation). Time from the API
//!    call returning until the changed integration's status shows the predicted
//!    allocation, and until every integration of its account does.
//!
//! Statuses are observed through a watch, so a figure includes the watch's
//! delivery, as a user of `kubectl get -w` would see it. The operator runs as
//! a separate process (`target/release/saleslayer-operator`, or
//! `SALESLAYER_OPERATOR_BIN`), so build it first: `make bench` does.
//! `CONVERGENCE_CHANGES` sets the number of changes (default 200).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, conditions, wait, watcher};
use kube::{Api, Client, ResourceExt};
use saleslayer_contract::{ANNOTATION_LIMIT, LABEL_INTEGRATION, LABEL_JOB};
use saleslayer_core::account::ValidatedAccount;
use saleslayer_core::allocation::JobKey;
use saleslayer_core::api::{JobStatus, SalesLayerAccount, SalesLayerIntegration};
use saleslayer_core::plan::{self, PodCounts, ValidatedIntegration};
use saleslayer_testenv::ControlPlane;
use serde_json::json;
use tokio::sync::watch;

const NAMESPACES: usize = 20;
/// Integrations by default; `CONVERGENCE_INTEGRATIONS` scales the cluster
/// (each brings 5 jobs × 10 pods, so 1 000 integrations are 50 000 pods).
const DEFAULT_INTEGRATIONS: usize = 200;
const PER_ACCOUNT: usize = 5;
const JOBS: usize = 5;
const PODS_PER_JOB: usize = 10;
/// Creates in flight at once while filling the cluster.
const CONCURRENCY: usize = 32;
/// How long the operator may take to converge everything at start: past its
/// 300 s resync, so an integration a reconcile missed still gets there.
const INITIAL_DEADLINE: Duration = Duration::from_secs(330);
/// How long one change may take before it counts as not converged.
const CHANGE_DEADLINE: Duration = Duration::from_secs(30);
const DEFAULT_CHANGES: usize = 200;

static INTEGRATIONS_SET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// How many integrations this run creates.
fn integrations() -> usize {
    *INTEGRATIONS_SET.get().unwrap_or(&DEFAULT_INTEGRATIONS)
}

fn main() -> anyhow::Result<()> {
    let integrations = match std::env::var("CONVERGENCE_INTEGRATIONS") {
        Ok(n) => n
            .parse()
            .context("CONVERGENCE_INTEGRATIONS is not a number")?,
        Err(_) => DEFAULT_INTEGRATIONS,
    };
    let _ = INTEGRATIONS_SET.set(integrations);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let changes: usize = match std::env::var("CONVERGENCE_CHANGES") {
        Ok(n) => n.parse().context("CONVERGENCE_CHANGES is not a number")?,
        Err(_) => DEFAULT_CHANGES,
    };
    let operator_bin = operator_binary()?;
    let out_dir = operator_bin
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."))
        .join("convergence");
    std::fs::create_dir_all(&out_dir)?;

    let load_before = load_average();
    let begun = Instant::now();
    let plane = ControlPlane::start()
        .await
        .context("starting etcd + kube-apiserver (run `make testenv` first)")?;
    let client = plane.client().await?;
    println!(
        "control plane ready in {:.1} s",
        plane.started_in().as_secs_f64()
    );
    install_crd(&client).await?;

    let observed = Observed::watch(client.clone());
    let mut model = Model::default();
    let filled = Instant::now();
    fill(&plane, &client, &mut model).await?;
    let fill_time = filled.elapsed();
    println!(
        "created {NAMESPACES} namespaces, {} integrations, {} pods in {:.1} s",
        integrations(),
        model.pods.values().sum::<u32>(),
        fill_time.as_secs_f64()
    );

    // The operator starts on a full cluster: it lists, plans and writes everything.
    let requests_before = apiserver_requests(&client).await?;
    let log = out_dir.join("operator.log");
    let operator = Operator::start(&operator_bin, &plane.kubeconfig(), &log)?;
    let cpu_before = CpuTimes::now(operator.child.id());
    let started = Instant::now();
    let expected = model.expected_all();
    let initial = initial_convergence(&observed, &expected, started).await;
    let start_cpu = CpuTimes::now(operator.child.id()).since(&cpu_before, started.elapsed());
    let initial_rss = operator.rss();
    let initial_requests = apiserver_requests(&client).await?.since(&requests_before);
    let initial_reconciles = operator.reconciles().await;
    match initial.all {
        Some(all) => println!(
            "initial convergence: {:.2} s from the operator's start (RSS then {})",
            all.as_secs_f64(),
            mib(initial_rss.current)
        ),
        None => eprintln!(
            "initial convergence: only {} of {} statuses as planned after {INITIAL_DEADLINE:?}; operator log: {}",
            initial.matched,
            integrations(),
            log.display()
        ),
    }
    let wrong = check_annotations(&client, &model).await?;
    println!("pod annotations not as planned after initial convergence: {wrong}");
    let footprint = pod_metadata_footprint(&client).await?;
    // Changes are measured on a quiet operator, not on the tail of the start.
    let tail = settle(&operator).await;
    let settled_reconciles = operator.reconciles().await;

    // One change at a time.
    let requests_before = apiserver_requests(&client).await?;
    let mut seed = fastrand::Rng::with_seed(0x5a1e_51a7);
    let mut runs = Changes::default();
    for n in 0..changes {
        let kind = if n % 2 == 0 {
            ChangeKind::AddPod
        } else {
            ChangeKind::Weight
        };
        let i = seed.usize(0..integrations());
        let job = seed.usize(0..JOBS);
        let sample = match kind {
            ChangeKind::AddPod => add_pod(&client, &observed, &mut model, i, job, n).await?,
            ChangeKind::Weight => {
                change_weight(&client, &observed, &mut model, &mut seed, i, job).await?
            }
        };
        runs.record(kind, sample);
    }
    let change_requests = apiserver_requests(&client).await?.since(&requests_before);
    let change_reconciles = operator
        .reconciles()
        .await
        .zip(settled_reconciles)
        .map(|(end, start)| end - start);
    let wrong_after = check_annotations(&client, &model).await?;
    let rss = operator.stop()?;
    drop(plane);

    let report = Report {
        fill: fill_time,
        initial,
        initial_rss,
        initial_requests,
        initial_reconciles,
        start_cpu,
        tail,
        footprint,
        changes: runs,
        change_requests,
        change_reconciles,
        rss,
        wrong_annotations: wrong + wrong_after,
        total: begun.elapsed(),
        load: (load_before, load_average()),
    };
    report.print();
    println!("operator log: {}", log.display());
    if report.failures() > 0 {
        bail!(
            "{} convergences (initial or after a change) did not complete in time",
            report.failures()
        );
    }
    if report.wrong_annotations > 0 {
        bail!(
            "{} pod annotations differ from the plan",
            report.wrong_annotations
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The operator, as a separate process
// ---------------------------------------------------------------------------

/// `SALESLAYER_OPERATOR_BIN`, else the release binary next to this bench's
/// directory (`target/release/deps/convergence-…` → `target/release/`).
fn operator_binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("SALESLAYER_OPERATOR_BIN") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .map(|dir| dir.join("saleslayer-operator"))
            .ok_or_else(|| anyhow!("cannot place the bench executable in target/"))?,
    };
    if !path.is_file() {
        bail!(
            "no operator binary at {}: run `cargo build --release --bin saleslayer-operator` (or `make bench`), or set SALESLAYER_OPERATOR_BIN",
            path.display()
        );
    }
    // A stale binary would measure old code: say so rather than mislead.
    let built = std::fs::metadata(&path)?.modified()?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    if let Some(newest) = newest_mtime(&src)
        && newest > built
    {
        eprintln!(
            "warning: {} is older than src/; rebuild it to measure the current code",
            path.display()
        );
    }
    println!("operator binary: {}", path.display());
    Ok(path)
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            if meta.is_dir() {
                newest_mtime(&entry.path())
            } else {
                meta.modified().ok()
            }
        })
        .max()
}

/// Resident memory of the operator, in bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Rss {
    /// VmRSS when read.
    current: u64,
    /// The largest VmRSS the sampler saw (every 50 ms).
    sampled_max: u64,
    /// VmHWM: the kernel's own high-water mark.
    peak: u64,
}

/// Wait until the operator's reconcile count stops moving (2 s without a
/// reconcile, at most 2 minutes): until when it last moved, and by how much.
async fn settle(operator: &Operator) -> Option<(Duration, u64)> {
    let begun = Instant::now();
    let first = operator.reconciles().await?;
    let mut last = first;
    let mut moved = begun;
    while moved.elapsed() < Duration::from_secs(2) && begun.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = operator.reconciles().await?;
        if now != last {
            last = now;
            moved = Instant::now();
        }
    }
    Some((moved - begun, last - first))
}

/// `saleslayer-operator run` with its logs in a file, killed on drop.
struct Operator {
    child: Child,
    sampler: Arc<Sampler>,
    /// Where its /metrics is served.
    metrics: std::net::SocketAddr,
}

#[derive(Default)]
struct Sampler {
    stop: AtomicBool,
    max: AtomicU64,
}

impl Operator {
    fn start(bin: &Path, kubeconfig: &Path, log: &Path) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(log)?;
        // A known port, to read the operator's reconcile count.
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new(bin)
            .arg("run")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--metrics-bind")
            .arg(metrics.to_string())
            .args(["--webhook-bind", "127.0.0.1:0"])
            .args(["--quota-bind", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let sampler = Arc::new(Sampler::default());
        let pid = child.id();
        let shared = sampler.clone();
        std::thread::spawn(move || {
            while !shared.stop.load(Ordering::Relaxed) {
                if let Some(rss) = proc_status_kib(pid, "VmRSS:") {
                    shared.max.fetch_max(rss * 1024, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Ok(Self {
            child,
            sampler,
            metrics,
        })
    }

    /// `*reconciles_total` from the operator's /metrics, if it serves one.
    async fn reconciles(&self) -> Option<u64> {
        let addr = self.metrics;
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut stream =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .ok()?;
            let mut text = String::new();
            stream.read_to_string(&mut text).ok()?;
            text.lines().find_map(|line| {
                let (name, value) = line.split_once(' ')?;
                if name.ends_with("reconciles_total") {
                    value.trim().parse::<f64>().ok().map(|v| v.round() as u64)
                } else {
                    None
                }
            })
        })
        .await
        .ok()
        .flatten()
    }

    fn rss(&self) -> Rss {
        let pid = self.child.id();
        Rss {
            current: proc_status_kib(pid, "VmRSS:").unwrap_or(0) * 1024,
            sampled_max: self.sampler.max.load(Ordering::Relaxed),
            peak: proc_status_kib(pid, "VmHWM:").unwrap_or(0) * 1024,
        }
    }

    /// Read the memory figures, then stop the process (SIGTERM, then SIGKILL).
    fn stop(mut self) -> anyhow::Result<Rss> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the operator exited during the bench: {status}");
        }
        let rss = self.rss();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(rss)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.sampler.stop.store(true, Ordering::Relaxed);
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The 1-minute load average, as `/proc/loadavg` says it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// CPU time (user + system) of the processes that share the machine during
/// the start: the profile of where its time goes.
struct CpuTimes {
    apiserver: f64,
    etcd: f64,
    operator: f64,
    bench: f64,
}

/// The CPU seconds each used over `wall`.
struct StartCpu {
    wall: Duration,
    used: CpuTimes,
}

impl CpuTimes {
    /// Now, for the operator's `pid`, this process, and the kube-apiserver
    /// and etcd this process started (its children, by name).
    fn now(operator: u32) -> Self {
        let children = descendants_by_name();
        let of = |name: &str| children.get(name).and_then(|&pid| cpu_seconds(pid));
        Self {
            apiserver: of("kube-apiserver").unwrap_or(0.0),
            etcd: of("etcd").unwrap_or(0.0),
            operator: cpu_seconds(operator).unwrap_or(0.0),
            bench: cpu_seconds(std::process::id()).unwrap_or(0.0),
        }
    }

    fn since(&self, before: &Self, wall: Duration) -> StartCpu {
        StartCpu {
            wall,
            used: Self {
                apiserver: self.apiserver - before.apiserver,
                etcd: self.etcd - before.etcd,
                operator: self.operator - before.operator,
                bench: self.bench - before.bench,
            },
        }
    }
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// This process's descendants by their command name (the testenv starts
/// etcd and the kube-apiserver under a guarding shell).
fn descendants_by_name() -> HashMap<String, u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    // pid → (name, parent)
    let table: HashMap<u32, (String, u32)> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (name, fields) = proc_stat(pid)?;
            // After the name: state, then the parent's pid.
            let parent = fields.get(1)?.parse().ok()?;
            Some((pid, (name, parent)))
        })
        .collect();
    let me = std::process::id();
    let descends = |mut pid: u32| {
        for _ in 0..16 {
            match table.get(&pid) {
                Some((_, parent)) if *parent == me => return true,
                Some((_, parent)) if *parent > 1 => pid = *parent,
                _ => return false,
            }
        }
        false
    };
    table
        .iter()
        .filter(|(pid, _)| descends(**pid))
        .map(|(pid, (name, _))| (name.clone(), *pid))
        .collect()
}

/// `/proc/<pid>/stat`: the command name, and the fields after it.
fn proc_stat(pid: u32) -> Option<(String, Vec<String>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    let fields = stat
        .get(close + 1..)?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    Some((name, fields))
}

/// User + system CPU seconds of `pid` (fields 14 and 15 of its stat, in
/// clock ticks of 1/100 s, what Linux reports on every architecture it runs
/// this bench on).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let (_, fields) = proc_stat(pid)?;
    // Fields after the name start at field 3 (state): utime is 14, stime 15.
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    Some((ticks(14)? + ticks(15)?) as f64 / 100.0)
}

/// A `kB` field of `/proc/<pid>/status`, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------
// The cluster's contents and what the statuses should say
// ---------------------------------------------------------------------------

/// What the bench created: every integration as the controller validates it,
/// and the live pods per job. The expectation is computed from it with the
/// library's own planning, the same the controller runs.
#[derive(Default)]
struct Model {
    accounts: BTreeMap<String, ValidatedAccount>,
    integrations: BTreeMap<(String, String), ValidatedIntegration>,
    pods: PodCounts,
}

/// What a status should hold: the spec generation it answers and the jobs.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    generation: Option<i64>,
    jobs: Vec<JobStatus>,
}

impl Model {
    fn members(&self, account: &str) -> Vec<ValidatedIntegration> {
        self.integrations
            .values()
            .filter(|i| i.account == account)
            .cloned()
            .collect()
    }

    /// The statuses of every integration on `account`.
    fn expected(&self, account: &str) -> BTreeMap<(String, String), Expected> {
        let members = self.members(account);
        let account_plan = plan::plan_account(&self.accounts[account], &members, &self.pods);
        let now = Time(Timestamp::UNIX_EPOCH);
        members
            .iter()
            .map(|member| {
                let status = saleslayer_core::status::desired_status(
                    member,
                    &account_plan,
                    None,
                    &BTreeMap::new(),
                    now.clone(),
                );
                (
                    (member.namespace.clone(), member.name.clone()),
                    Expected {
                        generation: member.generation,
                        jobs: status.jobs,
                    },
                )
            })
            .collect()
    }

    fn expected_all(&self) -> BTreeMap<(String, String), Expected> {
        let accounts: std::collections::BTreeSet<&str> = self
            .integrations
            .values()
            .map(|i| i.account.as_str())
            .collect();
        accounts
            .into_iter()
            .flat_map(|account| self.expected(account))
            .collect()
    }
}

fn namespace_of(i: usize) -> String {
    format!("team-{:02}", i % NAMESPACES)
}

fn name_of(i: usize) -> String {
    format!("integration-{i:03}")
}

fn job_name(j: usize) -> String {
    format!("job-{j}")
}

/// Account `n`: limits differ between accounts.
fn account(n: usize) -> SalesLayerAccount {
    let spec = json!({
        "limit": {"requests": 500 + 100 * (n % 6), "periodSeconds": 10},
        "headroomPercent": 20,
    });
    SalesLayerAccount::new(
        &format!("account-{n:02}"),
        serde_json::from_value(spec).expect("a valid account"),
    )
}

/// Five consecutive integrations share an account, so each account spans five
/// namespaces. Weights, floors, caps and concurrency differ between jobs.
fn integration(i: usize) -> SalesLayerIntegration {
    let account = i / PER_ACCOUNT;
    let jobs: Vec<serde_json::Value> = (0..JOBS)
        .map(|j| {
            let mut job = json!({"name": job_name(j), "weight": 1 + (i * 7 + j * 3) % 10});
            match j {
                0 => job["minRequests"] = json!(5),
                1 => job["maxConcurrency"] = json!(20),
                4 => job["maxRequests"] = json!(120),
                _ => {}
            }
            job
        })
        .collect();
    let spec = json!({
        "account": format!("account-{account:02}"),
        "jobs": jobs,
    });
    let mut sli = SalesLayerIntegration::new(
        &name_of(i),
        serde_json::from_value(spec).expect("a valid spec"),
    );
    sli.metadata.namespace = Some(namespace_of(i));
    sli
}

fn pod(name: &str, integration: &str, job: &str) -> Pod {
    saleslayer_testenv::labelled_pod(Some(name), None, integration, job)
}

async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in saleslayer_core::api::crds() {
        let name = crd.name_any();
        crds.create(&PostParams::default(), &crd).await?;
        tokio::time::timeout(
            Duration::from_secs(30),
            wait::await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .context("the CRD was not Established within 30 s")??;
    }
    Ok(())
}

/// Namespaces, integrations and pods, `CONCURRENCY` creates at a time.
async fn fill(plane: &ControlPlane, client: &Client, model: &mut Model) -> anyhow::Result<()> {
    for n in 0..NAMESPACES {
        plane.namespace(client, &format!("team-{n:02}")).await?;
    }
    // The operator's own namespace, for its CA Secret.
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("saleslayer-system".into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await?;

    let accounts = Api::<SalesLayerAccount>::all(client.clone());
    for n in 0..integrations().div_ceil(PER_ACCOUNT) {
        let created = accounts
            .create(&PostParams::default(), &account(n))
            .await
            .with_context(|| format!("creating account {n}"))?;
        let valid = saleslayer_core::account::validate_account(&created)
            .map_err(|e| anyhow!("account {n}: {e}"))?;
        model.accounts.insert(valid.name.clone(), valid);
    }
    let created: Vec<SalesLayerIntegration> = futures::stream::iter(0..integrations())
        .map(|i| {
            let api = Api::<SalesLayerIntegration>::namespaced(client.clone(), &namespace_of(i));
            async move { create_retrying(&api, &integration(i)).await }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    for sli in &created {
        let valid = plan::validate(sli).map_err(|e| anyhow!("{}: {e}", sli.name_any()))?;
        model
            .integrations
            .insert((valid.namespace.clone(), valid.name.clone()), valid);
    }

    let pods = (0..integrations())
        .flat_map(|i| (0..JOBS).flat_map(move |j| (0..PODS_PER_JOB).map(move |k| (i, j, k))));
    futures::stream::iter(pods)
        .map(|(i, j, k)| {
            let api = Api::<Pod>::namespaced(client.clone(), &namespace_of(i));
            let integration = name_of(i);
            let job = job_name(j);
            async move {
                let name = format!("{integration}-{job}-{k}");
                api.create(&PostParams::default(), &pod(&name, &integration, &job))
                    .await
                    .with_context(|| format!("creating pod {name}"))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    for i in 0..integrations() {
        for j in 0..JOBS {
            let key = JobKey::new(namespace_of(i), name_of(i), job_name(j));
            model.pods.insert(key, PODS_PER_JOB as u32);
        }
    }
    Ok(())
}

/// Create, retrying while the API server does not serve the new CRD yet.
async fn create_retrying(
    api: &Api<SalesLayerIntegration>,
    sli: &SalesLayerIntegration,
) -> anyhow::Result<SalesLayerIntegration> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match api.create(&PostParams::default(), sli).await {
            Ok(created) => return Ok(created),
            Err(kube::Error::Api(status)) if status.code == 404 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error).context(format!("creating {}", sli.name_any())),
        }
    }
}

/// Pods whose `saleslayer.io/limit` annotation differs from the plan.
async fn check_annotations(client: &Client, model: &Model) -> anyhow::Result<usize> {
    let mut plans = HashMap::new();
    let pods = Api::<Pod>::all(client.clone())
        .list_metadata(&ListParams::default().labels(LABEL_INTEGRATION))
        .await?;
    let mut wrong = 0;
    for pod in &pods.items {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let namespace = pod.namespace().unwrap_or_default();
        let (Some(integration), Some(job)) = (labels.get(LABEL_INTEGRATION), labels.get(LABEL_JOB))
        else {
            continue;
        };
        let Some(member) = model
            .integrations
            .get(&(namespace.clone(), integration.clone()))
        else {
            continue;
        };
        let account_plan = plans.entry(member.account.clone()).or_insert_with(|| {
            plan::plan_account(
                &model.accounts[&member.account],
                &model.members(&member.account),
                &model.pods,
            )
        });
        let want = plan::pod_limit(account_plan, &member.key(job)).map(|l| l.to_json());
        let seen = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_LIMIT))
            .cloned();
        if seen != want {
            if wrong == 0 {
                eprintln!(
                    "pod {namespace}/{}: annotation {seen:?}, planned {want:?}",
                    pod.name_any()
                );
            }
            wrong += 1;
        }
    }
    Ok(wrong)
}

/// Bytes of the labelled pods' metadata as JSON, and the part that is
/// `managedFields`: what the controller's metadata watch keeps per pod.
async fn pod_metadata_footprint(client: &Client) -> anyhow::Result<(usize, usize)> {
    let pods = Api::<Pod>::all(client.clone())
        .list_metadata(&ListParams::default().labels(LABEL_INTEGRATION))
        .await?;
    let mut whole = 0;
    let mut managed = 0;
    for pod in pods.items {
        let mut meta = pod.metadata;
        whole += serde_json::to_vec(&meta)?.len();
        let fields = meta.managed_fields.take();
        managed += serde_json::to_vec(&fields)?.len();
    }
    Ok((whole, managed))
}

// ---------------------------------------------------------------------------
// Observing statuses
// ---------------------------------------------------------------------------

type Statuses = HashMap<(String, String), Expected>;

/// The latest status of every integration, kept by a watch; `version` ticks
/// on every event so waiters re-check.
#[derive(Clone)]
struct Observed {
    statuses: Arc<Mutex<Statuses>>,
    version: watch::Sender<u64>,
}

impl Observed {
    fn watch(client: Client) -> Self {
        let observed = Self {
            statuses: Arc::default(),
            version: watch::channel(0).0,
        };
        let writer = observed.clone();
        let api = Api::<SalesLayerIntegration>::all(client);
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default())
                .default_backoff()
                .touched_objects()
                .boxed();
            while let Some(event) = events.next().await {
                let Ok(sli) = event else { continue };
                let Some(status) = sli.status else { continue };
                let seen = Expected {
                    generation: status.observed_generation,
                    jobs: status.jobs,
                };
                let key = (
                    sli.metadata.namespace.unwrap_or_default(),
                    sli.metadata.name.unwrap_or_default(),
                );
                if let Ok(mut statuses) = writer.statuses.lock() {
                    statuses.insert(key, seen);
                }
                writer.version.send_modify(|v| *v += 1);
            }
        });
        observed
    }

    /// Wait until `done` holds for the observed statuses; the instant it was seen.
    async fn wait_for(
        &self,
        deadline: Duration,
        mut done: impl FnMut(&Statuses) -> bool,
    ) -> Result<Instant, tokio::time::error::Elapsed> {
        let mut changed = self.version.subscribe();
        tokio::time::timeout(deadline, async {
            loop {
                changed.borrow_and_update();
                if let Ok(statuses) = self.statuses.lock()
                    && done(&statuses)
                {
                    return Instant::now();
                }
                if changed.changed().await.is_err() {
                    // The watch task ended: nothing will change any more.
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
    }

    fn matching(&self, expected: &BTreeMap<(String, String), Expected>) -> usize {
        self.statuses.lock().map_or(0, |seen| {
            expected
                .iter()
                .filter(|(k, want)| seen.get(*k) == Some(*want))
                .count()
        })
    }
}

/// When half, 90 % and all of the statuses first matched the plan, from the
/// operator's start; `all` is `None` when the deadline passed first.
#[derive(Debug, Default)]
struct Progress {
    half: Option<Duration>,
    most: Option<Duration>,
    all: Option<Duration>,
    matched: usize,
}

async fn initial_convergence(
    observed: &Observed,
    expected: &BTreeMap<(String, String), Expected>,
    started: Instant,
) -> Progress {
    let total = expected.len();
    let mut progress = Progress::default();
    let mut changed = observed.version.subscribe();
    let mut reported = Instant::now();
    loop {
        changed.borrow_and_update();
        let matched = observed.matching(expected);
        let at = started.elapsed();
        progress.matched = matched;
        if matched * 2 >= total {
            progress.half.get_or_insert(at);
        }
        if matched * 10 >= total * 9 {
            progress.most.get_or_insert(at);
        }
        if matched == total {
            progress.all = Some(at);
            return progress;
        }
        if at > INITIAL_DEADLINE {
            return progress;
        }
        if reported.elapsed() >= Duration::from_secs(10) {
            println!(
                "  {:5.0} s: {matched} of {total} statuses as planned",
                at.as_secs_f64()
            );
            reported = Instant::now();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), changed.changed()).await;
    }
}

// ---------------------------------------------------------------------------
// Changes
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ChangeKind {
    AddPod,
    Weight,
}

impl ChangeKind {
    fn label(self) -> &'static str {
        match self {
            ChangeKind::AddPod => "pod added",
            ChangeKind::Weight => "weight changed",
        }
    }
}

/// One change: the API call, then convergence of the changed integration and of
/// its whole account, each measured from the call's return. `None`: not converged.
#[derive(Debug, Clone, Copy)]
struct Sample {
    call: Duration,
    changed: Option<Duration>,
    account: Option<Duration>,
}

#[derive(Default)]
struct Changes(BTreeMap<ChangeKind, Vec<Sample>>);

impl Changes {
    fn record(&mut self, kind: ChangeKind, sample: Sample) {
        self.0.entry(kind).or_default().push(sample);
    }
}

/// Wait for the changed integration, then for the rest of its account.
async fn converge(
    observed: &Observed,
    model: &Model,
    namespace: &str,
    name: &str,
    account: &str,
    call: Duration,
    returned: Instant,
) -> Sample {
    let expected = model.expected(account);
    let key = (namespace.to_owned(), name.to_owned());
    let mine = expected.get(&key).cloned();
    let changed = observed
        .wait_for(CHANGE_DEADLINE, |seen| {
            mine.is_some() && seen.get(&key) == mine.as_ref()
        })
        .await
        .ok()
        .map(|at| at - returned);
    let account_done = observed
        .wait_for(CHANGE_DEADLINE, |seen| {
            expected.iter().all(|(k, want)| seen.get(k) == Some(want))
        })
        .await
        .ok()
        .map(|at| at - returned);
    if changed.is_none() || account_done.is_none() {
        let seen = observed
            .statuses
            .lock()
            .ok()
            .and_then(|s| s.get(&key).cloned());
        eprintln!("{namespace}/{name} not converged; expected {mine:?}, last seen {seen:?}");
    }
    Sample {
        call,
        changed,
        account: account_done,
    }
}

async fn add_pod(
    client: &Client,
    observed: &Observed,
    model: &mut Model,
    i: usize,
    j: usize,
    n: usize,
) -> anyhow::Result<Sample> {
    let (namespace, name, job) = (namespace_of(i), name_of(i), job_name(j));
    let pod_name = format!("{name}-{job}-extra-{n}");
    let called = Instant::now();
    Api::<Pod>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &pod(&pod_name, &name, &job))
        .await
        .with_context(|| format!("creating pod {pod_name}"))?;
    let returned = Instant::now();
    *model
        .pods
        .entry(JobKey::new(&namespace, &name, &job))
        .or_default() += 1;
    let account = model.integrations[&(namespace.clone(), name.clone())]
        .account
        .clone();
    Ok(converge(
        observed,
        model,
        &namespace,
        &name,
        &account,
        returned - called,
        returned,
    )
    .await)
}

/// Patch one job's weight to a value under which the integration's allocation
/// differs (a change the status cannot already show).
async fn change_weight(
    client: &Client,
    observed: &Observed,
    model: &mut Model,
    seed: &mut fastrand::Rng,
    i: usize,
    j: usize,
) -> anyhow::Result<Sample> {
    let key = (namespace_of(i), name_of(i));
    let current = model.integrations[&key].clone();
    let account = current.account.clone();
    let before = model.expected(&account).remove(&key).map(|e| e.jobs);
    let mut weight = current.jobs[j].weight;
    for _ in 0..20 {
        let candidate = 1 + seed.u32(0..10);
        if candidate == current.jobs[j].weight {
            continue;
        }
        let mut trial = current.clone();
        trial.jobs[j].weight = candidate;
        model.integrations.insert(key.clone(), trial);
        let after = model.expected(&account).remove(&key).map(|e| e.jobs);
        model.integrations.insert(key.clone(), current.clone());
        weight = candidate;
        if after != before {
            break;
        }
    }

    let api = Api::<SalesLayerIntegration>::namespaced(client.clone(), &key.0);
    let patch =
        json!([{"op": "replace", "path": format!("/spec/jobs/{j}/weight"), "value": weight}]);
    let called = Instant::now();
    let patched = api
        .patch(
            &key.1,
            &PatchParams::default(),
            &Patch::<()>::Json(serde_json::from_value(patch)?),
        )
        .await
        .with_context(|| format!("patching {}/{}", key.0, key.1))?;
    let returned = Instant::now();
    let valid = plan::validate(&patched).map_err(|e| anyhow!("{e}"))?;
    model.integrations.insert(key.clone(), valid);
    Ok(converge(
        observed,
        model,
        &key.0,
        &key.1,
        &account,
        returned - called,
        returned,
    )
    .await)
}

// ---------------------------------------------------------------------------
// What the API server was asked, from its own /metrics
// ---------------------------------------------------------------------------

/// `apiserver_request_total` summed by (verb, resource, subresource), and
/// etcd operations as (`etcd <operation>`, resource, "").
#[derive(Debug, Default)]
struct Requests(BTreeMap<(String, String, String), f64>);

async fn apiserver_requests(client: &Client) -> anyhow::Result<Requests> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut totals = Requests::default();
    for line in text.lines() {
        // Requests by verb, and the writes that reached etcd: an apply that
        // changes nothing is answered without one.
        let (etcd, rest) = match (
            line.strip_prefix("apiserver_request_total{"),
            line.strip_prefix("etcd_request_duration_seconds_count{"),
        ) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => continue,
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix("=\""))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let value: f64 = value.trim().parse().unwrap_or(0.0);
        let key = if etcd {
            (
                format!("etcd {}", label("operation")),
                label("resource"),
                String::new(),
            )
        } else {
            (label("verb"), label("resource"), label("subresource"))
        };
        *totals.0.entry(key).or_default() += value;
    }
    Ok(totals)
}

impl Requests {
    fn since(&self, before: &Requests) -> Requests {
        Requests(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v - before.0.get(k).copied().unwrap_or(0.0)))
                .filter(|(_, v)| *v > 0.0)
                .collect(),
        )
    }

    fn count(&self, verb: &str, resource: &str, subresource: &str) -> u64 {
        let value = self
            .0
            .get(&(verb.to_owned(), resource.to_owned(), subresource.to_owned()))
            .copied()
            .unwrap_or(0.0);
        // Counters are whole numbers; the cast only drops the `.0`.
        value.round() as u64
    }

    /// The operator's writes: it alone applies (server-side) and records events.
    fn operator_writes(&self) -> String {
        format!(
            "{} pod applies ({} changed a pod), {} statuses, {} events",
            self.count("APPLY", "pods", ""),
            self.count("etcd update", "pods", ""),
            self.count("APPLY", "saleslayerintegrations", "status"),
            self.count("POST", "events", "") + self.count("PATCH", "events", ""),
        )
    }
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

struct Report {
    fill: Duration,
    initial: Progress,
    initial_rss: Rss,
    initial_requests: Requests,
    initial_reconciles: Option<u64>,
    /// Where the CPU went from the operator's start to initial convergence.
    start_cpu: StartCpu,
    /// After the statuses converged: how long the operator went on reconciling, and how often.
    tail: Option<(Duration, u64)>,
    footprint: (usize, usize),
    changes: Changes,
    change_requests: Requests,
    change_reconciles: Option<u64>,
    rss: Rss,
    wrong_annotations: usize,
    total: Duration,
    /// 1-minute load average at the start and the end: other work on the machine.
    load: (String, String),
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn count(n: Option<u64>) -> String {
    n.map_or_else(|| "n/a".to_owned(), |n| n.to_string())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl Report {
    fn failures(&self) -> usize {
        usize::from(self.initial.all.is_none())
            + self
                .changes
                .0
                .values()
                .flatten()
                .filter(|s| s.changed.is_none() || s.account.is_none())
                .count()
    }

    fn print(&self) {
        println!();
        let integrations = integrations();
        println!("| {integrations} integrations × {JOBS} jobs × {PODS_PER_JOB} pods | figure |");
        println!("|---|---|");
        println!(
            "| creating {NAMESPACES} namespaces, {integrations} integrations, {} pods (operator not running) | {:.1} s |",
            integrations * JOBS * PODS_PER_JOB,
            self.fill.as_secs_f64()
        );
        let secs = |d: Option<Duration>| {
            d.map_or_else(
                || format!("not within {} s", INITIAL_DEADLINE.as_secs()),
                |d| format!("{:.1} s", d.as_secs_f64()),
            )
        };
        println!(
            "| initial convergence: operator start → 50 % / 90 % / all {integrations} statuses as planned | {} / {} / {} |",
            secs(self.initial.half),
            secs(self.initial.most),
            secs(self.initial.all)
        );
        println!(
            "| … operator writes meanwhile; reconciles | {}; {} |",
            self.initial_requests.operator_writes(),
            count(self.initial_reconciles)
        );
        let (wall, cpu) = (self.start_cpu.wall, &self.start_cpu.used);
        println!(
            "| … CPU meanwhile (s of CPU over {:.1} s on {} cores): kube-apiserver / etcd / operator / this bench (its watch) | {:.1} / {:.1} / {:.1} / {:.1} |",
            wall.as_secs_f64(),
            std::thread::available_parallelism().map_or(0, usize::from),
            cpu.apiserver,
            cpu.etcd,
            cpu.operator,
            cpu.bench
        );
        if let Some((time, reconciles)) = self.tail {
            println!(
                "| … then reconciles until the operator is quiet (2 s without one) | {reconciles} more over {:.1} s |",
                time.as_secs_f64()
            );
        }
        println!(
            "| operator RSS after initial convergence | {} |",
            mib(self.initial_rss.current)
        );
        println!(
            "| the pods' metadata as the operator's watch lists it, as JSON (of which managedFields; it keeps only each pod's UID, job and limit) | {} ({}) |",
            mib(self.footprint.0 as u64),
            mib(self.footprint.1 as u64)
        );
        println!(
            "| operator peak RSS (VmHWM; largest 50 ms sample) | {} ({}) |",
            mib(self.rss.peak),
            mib(self.rss.sampled_max)
        );
        println!(
            "| operator writes during the changes; reconciles | {}; {} |",
            self.change_requests.operator_writes(),
            count(self.change_reconciles)
        );
        println!(
            "| pod annotations not as planned (after initial convergence and at the end) | {} |",
            self.wrong_annotations
        );
        println!(
            "| whole run, control plane start to stop | {:.0} s |",
            self.total.as_secs_f64()
        );
        println!(
            "| 1-minute load average at start / end ({} cores) | {} / {} |",
            std::thread::available_parallelism().map_or(0, usize::from),
            self.load.0,
            self.load.1
        );
        println!();
        println!(
            "| change → status as planned | n | API call p50 | p50 | p90 | p99 | max | whole account p50 | p99 | max |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for (kind, samples) in &self.changes.0 {
            let sorted = |pick: fn(&Sample) -> Option<Duration>| {
                let mut v: Vec<Duration> = samples.iter().filter_map(pick).collect();
                v.sort();
                v
            };
            let calls = sorted(|s| Some(s.call));
            let changed = sorted(|s| s.changed);
            let account = sorted(|s| s.account);
            let missed = samples.len() - changed.len();
            println!(
                "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                kind.label(),
                if missed > 0 {
                    format!(" ({missed} not converged)")
                } else {
                    String::new()
                },
                samples.len(),
                ms(percentile(&calls, 0.5)),
                ms(percentile(&changed, 0.5)),
                ms(percentile(&changed, 0.9)),
                ms(percentile(&changed, 0.99)),
                ms(percentile(&changed, 1.0)),
                ms(percentile(&account, 0.5)),
                ms(percentile(&account, 0.99)),
                ms(percentile(&account, 1.0)),
            );
        }
        println!("BENCH {}", self.bench_line());
    }

    /// The headline figures as one JSON object, to compare runs by machine.
    fn bench_line(&self) -> serde_json::Value {
        let secs = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 100.0).round() / 100.0);
        let mib = |b: u64| round1(b as f64 / (1024.0 * 1024.0));
        let total_changes: usize = self.changes.0.values().map(Vec::len).sum();
        let mut per_kind = serde_json::Map::new();
        for (kind, samples) in &self.changes.0 {
            let mut changed: Vec<Duration> = samples.iter().filter_map(|s| s.changed).collect();
            changed.sort();
            let key = match kind {
                ChangeKind::AddPod => "pod_added",
                ChangeKind::Weight => "weight_changed",
            };
            per_kind.insert(
                format!("{key}_p50_ms"),
                json!(percentile(&changed, 0.5).as_millis()),
            );
            per_kind.insert(
                format!("{key}_p99_ms"),
                json!(percentile(&changed, 0.99).as_millis()),
            );
        }
        let mut line = json!({
            "bench": "convergence",
            "integrations": integrations(),
            "pods": integrations() * JOBS * PODS_PER_JOB,
            "peak_rss_mib": mib(self.rss.peak),
            "rss_after_start_mib": mib(self.initial_rss.current),
            "initial_convergence_s": secs(self.initial.all),
            "initial_reconciles": self.initial_reconciles,
            "start_cpu_s": {
                "wall": secs(Some(self.start_cpu.wall)),
                "kube_apiserver": round1(self.start_cpu.used.apiserver),
                "etcd": round1(self.start_cpu.used.etcd),
                "operator": round1(self.start_cpu.used.operator),
                "bench": round1(self.start_cpu.used.bench),
            },
            "changes": total_changes,
            "reconciles_per_change": self.change_reconciles.filter(|_| total_changes > 0)
                .map(|r| ((r as f64 / total_changes as f64) * 100.0).round() / 100.0),
            "wrong_annotations": self.wrong_annotations,
        });
        if let Some(fields) = line.as_object_mut() {
            fields.extend(per_kind);
        }
        line
    }
}
