//! The node mode's own tests: it starts, runs a pod, and leaves nothing
//! behind — when dropped, when the test panics, and when the process that
//! started it is killed with SIGKILL (the janitor's job).
//!
//! Each test starts its own node (about 10 s). Not part of `cargo test`
//! (`test = false` in Cargo.toml: a node needs root, `make testenv-node` and
//! `make image`); `make e2e` runs them with
//! `cargo test -p saleslayer-testenv --test node`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use saleslayer_testenv::Node;

/// What a node is named after: `saleslayer-node-<id>`, `saleslayer-<id>`, `slv-<id>`.
struct Traces {
    dir: PathBuf,
    netns: String,
    veth: String,
    cgroup: String,
}

impl Traces {
    fn of(dir: &Path, netns: &str) -> Self {
        let id = netns.trim_start_matches("saleslayer-");
        Self {
            dir: dir.to_path_buf(),
            netns: netns.to_owned(),
            veth: format!("slv-{id}"),
            cgroup: netns.to_owned(),
        }
    }

    /// Everything of the node still on the machine, as sentences.
    fn left(&self) -> Vec<String> {
        let mut left = Vec::new();
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        if Path::new("/run/netns").join(&self.netns).exists() {
            left.push(format!("network namespace {}", self.netns));
        }
        let link = Command::new("ip")
            .args(["link", "show", &self.veth])
            .output()
            .expect("ip runs");
        if link.status.success() {
            left.push(format!("link {}", self.veth));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let dir = self.dir.display().to_string();
        for line in mounts.lines() {
            if line.contains(&dir) || line.contains(&self.netns) {
                left.push(format!("mount {line}"));
            }
        }
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in hierarchies.flatten() {
                let cgroup = hierarchy.path().join(&self.cgroup);
                if cgroup.exists() {
                    left.push(format!("cgroup {}", cgroup.display()));
                }
            }
        }
        for process in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let path = process.path();
            let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
            let cgroups = std::fs::read_to_string(path.join("cgroup")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&dir) || cgroups.contains(&self.cgroup) {
                left.push(format!(
                    "process {} ({})",
                    process.file_name().to_string_lossy(),
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                ));
            }
        }
        left
    }

    /// Wait until nothing is left (the janitor works on its own time); the
    /// time it took, or what is still there.
    fn wait_gone(&self, deadline: Duration) -> Result<Duration, Vec<String>> {
        let begun = Instant::now();
        loop {
            let left = self.left();
            if left.is_empty() {
                return Ok(begun.elapsed());
            }
            if begun.elapsed() > deadline {
                return Err(left);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A running pod on `node` (the workload image), so there are containers,
/// shims, mounts and a pod network namespace to clean up.
fn run_pod(kubectl: impl Fn() -> Command, image: &str) {
    let manifest = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: sleeper, namespace: default}}
spec:
  securityContext: {{runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532}}
  containers:
  - name: main
    image: {image}
    imagePullPolicy: Never
    command: [sh, -c, 'while true; do sleep 1; done']
    securityContext: {{readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
"#
    );
    let mut apply = kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    if let Some(mut stdin) = apply.stdin.take() {
        std::io::Write::write_all(&mut stdin, manifest.as_bytes()).expect("manifest written");
    }
    assert!(apply.wait().expect("kubectl ends").success());
    let waited = kubectl()
        .args([
            "wait",
            "--for=condition=Ready",
            "pod/sleeper",
            "--timeout=60s",
        ])
        .output()
        .expect("kubectl runs");
    assert!(
        waited.status.success(),
        "{}",
        String::from_utf8_lossy(&waited.stderr)
    );
}

#[tokio::test]
async fn a_dropped_node_leaves_nothing_behind() {
    let node = Node::start().await.expect("the node starts");
    println!(
        "node Ready in {:.1} s ({})",
        node.started_in().as_secs_f64(),
        node.server()
    );
    let image = node.import("workload").expect("the workload image imports");
    run_pod(|| node.kubectl(), &image);
    let traces = Traces::of(node.dir(), node.netns());
    assert!(!traces.left().is_empty(), "a running node leaves traces");
    let begun = Instant::now();
    drop(node);
    let left = traces.left();
    assert!(left.is_empty(), "left after drop: {left:#?}");
    println!(
        "dropped with a running pod: everything gone in {:.1} s",
        begun.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn a_panicking_test_leaves_nothing_behind() {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let node = Node::start().await.expect("the node starts");
        let _ = sender.send(Traces::of(node.dir(), node.netns()));
        panic!("a test fails while its node runs");
    });
    let traces = receiver.await.expect("the node started");
    let outcome = task.await;
    assert!(outcome.is_err_and(|e| e.is_panic()));
    let left = traces.left();
    assert!(left.is_empty(), "left after the panic: {left:#?}");
}

#[test]
fn a_killed_test_process_leaves_nothing_behind() {
    let base = tempfile::tempdir().expect("a temporary directory");
    let kubeconfig = base.path().join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_saleslayer-testenv"))
        .arg("node")
        .arg(&kubeconfig)
        .args(["--image", "workload"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("saleslayer-testenv runs");
    let stdout = child.stdout.take().expect("its stdout");
    let mut ready = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("a line");
        println!("child: {line}");
        if line.starts_with("node ready") {
            ready = Some(line);
            break;
        }
    }
    let ready = ready.expect("the child reports a ready node");
    let word_after = |marker: &str| {
        ready
            .split(marker)
            .nth(1)
            .and_then(|rest| {
                rest.split(|c: char| c == ',' || c == ')' || c == ' ')
                    .next()
            })
            .map(str::to_owned)
            .expect("the ready line names it")
    };
    let netns = word_after("network namespace ");
    let janitor: u32 = word_after("janitor pid ").parse().expect("a pid");
    let id = netns.trim_start_matches("saleslayer-");
    let dir = std::env::temp_dir().join(format!("saleslayer-node-{id}"));
    let traces = Traces::of(&dir, &netns);

    let kubectl = || {
        let mut command = Command::new("kubectl");
        command.env("KUBECONFIG", &kubeconfig);
        command
    };
    let image = saleslayer_testenv::image("workload").expect("make image built the workload");
    run_pod(kubectl, &image.reference);
    let before = traces.left();
    let processes = before.iter().filter(|t| t.starts_with("process")).count();
    assert!(
        processes >= 10,
        "the node runs its parts and a pod: {before:#?}"
    );

    child.kill().expect("SIGKILL");
    let killed = Instant::now();
    let _ = child.wait();
    match traces.wait_gone(Duration::from_secs(60)) {
        Ok(took) => println!(
            "SIGKILL with {processes} processes and a running pod: everything gone {:.1} s later",
            took.as_secs_f64()
        ),
        Err(left) => panic!("left 60 s after SIGKILL: {left:#?}"),
    }
    // The janitor's parent was killed: init reaps it, on its own time.
    let done = || {
        std::fs::read_to_string(format!("/proc/{janitor}/stat")).map_or(true, |stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "the janitor {janitor} exits when done"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "janitor finished {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
}
