//! The cluster's processes, and how they end.
//!
//! - [`Guarded`] (the control-plane mode): a child under a small `sh` guard
//!   that holds a pipe from this process and stops the child as soon as that
//!   pipe closes, so nothing outlives a test binary that was killed.
//! - [`Component`] (the node mode): a child started inside the node's
//!   namespaces and its cgroup, with its pid recorded for the janitor, which
//!   alone stops it (see `janitor.rs`): the node's parts must end in order.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::Error;
use crate::netns::Layout;

/// The last lines of a log file (for error messages).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child process under an `sh` guard: closing the guard's stdin (on drop, or
/// when this process dies) makes the guard stop the child and wait for it.
pub(crate) struct Guarded {
    pub(crate) name: &'static str,
    guard: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl Guarded {
    pub(crate) fn spawn(
        name: &'static str,
        program: PathBuf,
        args: &[String],
        dir: &Path,
    ) -> Result<Self, Error> {
        let log = dir.join(format!("{name}.log"));
        let output = fs::File::create(&log)?;
        // The guard keeps its stdin (which only this process holds open) as
        // fd 3 for a watcher that stops the child once the pipe closes; the
        // guard itself exits with the child, so an early exit is seen. The
        // data is thrown away, so there is no graceful shutdown to wait for.
        let script = r#"exec 3<&0; "$@" 3<&- & child=$!; (read _ignored <&3; kill -9 $child 2>/dev/null) & wait $child"#;
        let mut guard = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()?;
        let stdin = guard.stdin.take();
        Ok(Self {
            name,
            guard,
            stdin,
            log,
        })
    }

    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.guard.try_wait().ok().flatten()
    }

    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log, 12)
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.exited().is_none() {
            if Instant::now() > deadline {
                let _ = self.guard.kill();
                let _ = self.guard.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One of the node's processes, inside its namespaces and cgroup.
pub(crate) struct Component {
    pub(crate) name: &'static str,
    child: Child,
    pub(crate) log: PathBuf,
}

impl Component {
    /// Start `program` inside the node: its network and mount namespaces,
    /// the node's pids cgroup (so the janitor finds it and whatever it
    /// forks, containerd's shims included), its pid in `<dir>/pids/<name>`,
    /// its output in `<dir>/logs/<name>.log`.
    pub(crate) fn spawn(
        layout: &Layout,
        name: &'static str,
        program: &Path,
        args: &[String],
        path: &str,
    ) -> Result<Self, Error> {
        let logs = layout.dir.join("logs");
        fs::create_dir_all(&logs)?;
        let log = logs.join(format!("{name}.log"));
        let output = fs::File::create(&log)?;
        let procs = format!("/sys/fs/cgroup/pids/{}/node/cgroup.procs", layout.cgroup);
        let pid_file = layout.dir.join("pids").join(name);
        let child = layout
            .enter("sh")
            .args([
                "-c",
                r#"echo $$ > "$1" && echo $$ > "$2" && shift 2 && exec "$@""#,
                "sh",
                &procs,
            ])
            .arg(pid_file)
            .arg(program)
            .args(args)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .map_err(|e| Error::Tool("nsenter", e))?;
        Ok(Self { name, child, log })
    }

    /// Whether it has exited (and how).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Fail with its log when it has exited.
    pub(crate) fn check(&mut self) -> Result<(), Error> {
        match self.exited() {
            Some(status) => Err(Error::Exited {
                process: self.name,
                status,
                log: log_tail(&self.log, 20),
            }),
            None => Ok(()),
        }
    }

    /// Reap it once the janitor has stopped it (no zombie stays behind).
    pub(crate) fn reap(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
