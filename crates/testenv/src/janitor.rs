//! The node's janitor: a detached shell (`setsid`, so a terminal's Ctrl-C
//! or the test's process group dying does not reach it) started before the
//! node's first namespace exists. It holds the read end of a pipe whose write
//! end only this process holds; when that pipe closes — the [`crate::Node`]
//! is dropped, the test binary exits (statics never drop) or is killed with
//! SIGKILL — it removes everything the node made, in order: the kubelet and
//! controllers, the pods, every other process (containerd's shims too), the
//! mounts, the network namespace with the CNI bridge and the veth pair, the
//! cgroups and the directory. The order and the commands are in
//! `janitor.sh`.
//!
//! Everything it removes is named after the node's own id, so it never
//! touches anything else on the machine.

use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;
use crate::netns::Layout;

const SCRIPT: &str = include_str!("janitor.sh");
/// How long a clean-up may take before the drop stops waiting for it.
const FINISH_DEADLINE: Duration = Duration::from_secs(60);

/// The running janitor of one node; dropping it runs the clean-up and waits.
pub(crate) struct Janitor {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Janitor {
    /// Start the janitor of `layout` (nothing of the node exists yet).
    pub(crate) fn spawn(layout: &Layout) -> Result<Self, Error> {
        let mut child = Command::new("setsid")
            .args(["sh", "-c", SCRIPT, "saleslayer-janitor"])
            .arg(&layout.dir)
            .args([&layout.netns, &layout.veth, &layout.cgroup])
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::Tool("setsid", e))?;
        let pipe = child.stdin.take();
        Ok(Self { child, pipe })
    }

    /// The janitor's process id (it lives on after this process is killed).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Close the pipe and wait until the clean-up is done.
    pub(crate) fn finish(&mut self) {
        drop(self.pipe.take());
        let deadline = Instant::now() + FINISH_DEADLINE;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() > deadline => {
                    eprintln!(
                        "testenv: the node's janitor (pid {}) has not finished after {FINISH_DEADLINE:?}; leaving it running",
                        self.child.id()
                    );
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        self.finish();
    }
}
