//! The node's namespaces and names (network safety, DESIGN.md §9).
//!
//! Every part of the node runs inside a network namespace this module makes
//! (`ip netns add`) and enters with `nsenter --net` (not `ip netns exec`,
//! which remounts /sys and hides the cgroup v1 mounts), plus a private mount
//! namespace. Inside: `lo`, the CNI bridge, and one veth pair to the host on
//! a private /30 that overlaps no host route. There is no default route, so
//! a packet to any other address fails inside the namespace at once. The
//! host reaches the API server (and nothing else needs reaching) over that
//! /30. `netns.sh` holds the commands; the janitor undoes them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

const SCRIPT: &str = include_str!("netns.sh");
/// The /30 links are taken from this /16 (private, RFC 1918).
const LINK_POOL: (Ipv4Addr, u32) = (Ipv4Addr::new(10, 213, 0, 0), 16);
/// Pods' addresses, inside the namespace only.
pub(crate) const POD_CIDR: &str = "10.244.0.0/24";
/// Services' cluster IPs, inside the namespace only.
pub(crate) const SERVICE_CIDR: &str = "10.96.0.0/24";
/// The `kubernetes` Service's cluster IP (the first of SERVICE_CIDR).
pub(crate) const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// The names and paths of one node, all derived from its random id.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// `<tmp>/saleslayer-node-<id>`: every file of the node.
    pub(crate) dir: PathBuf,
    /// The network namespace, `saleslayer-<id>`.
    pub(crate) netns: String,
    /// The host's end of the veth pair, `slv-<id>`.
    pub(crate) veth: String,
    /// The cgroup in every hierarchy (the kubelet's cgroupRoot).
    pub(crate) cgroup: String,
}

impl Layout {
    /// Names for the node whose directory is `dir` (`.../saleslayer-node-<id>`).
    pub(crate) fn new(dir: &Path) -> Result<Self, Error> {
        let id = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("saleslayer-node-"))
            .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()))
            .ok_or_else(|| Error::Setup(format!("{} is not a node directory", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            netns: format!("saleslayer-{id}"),
            veth: format!("slv-{id}"),
            cgroup: format!("saleslayer-{id}"),
        })
    }

    /// The network namespace's path, for `nsenter --net`.
    pub(crate) fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// The private mount namespace's binding, for `nsenter --mount`.
    pub(crate) fn mount_ns_path(&self) -> PathBuf {
        self.dir.join("ns/mnt")
    }

    /// `program` run inside the node's network and mount namespaces.
    pub(crate) fn enter(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.netns_path().display()))
            .arg(format!("--mount={}", self.mount_ns_path().display()))
            .arg(format!("--wd={}", self.dir.display()))
            .arg("--")
            .arg(program);
        command
    }
}

/// The /30 between the host and the node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Link {
    /// The host's address on it.
    pub(crate) host: Ipv4Addr,
    /// The node's address on it: the node's InternalIP, where the API
    /// server, the kubelet and CoreDNS listen.
    pub(crate) node: Ipv4Addr,
}

impl Link {
    /// The first free /30 of the pool, starting at an offset drawn from
    /// `seed` so nodes started together rarely race for the same one.
    pub(crate) fn choose(seed: u32) -> Result<Self, Error> {
        let taken = host_prefixes()?;
        let (pool, bits) = LINK_POOL;
        let count = 1u32 << (32 - bits - 2);
        for step in 0..count {
            let index = (seed.wrapping_add(step)) % count;
            let network = u32::from(pool) + index * 4;
            if taken
                .iter()
                .all(|&(addr, len)| !overlaps((network, 30), (addr, len)))
            {
                return Ok(Self {
                    host: Ipv4Addr::from(network + 1),
                    node: Ipv4Addr::from(network + 2),
                });
            }
        }
        Err(Error::Setup(format!(
            "every /30 of {pool}/{bits} overlaps a route or address of this host; \
             the node needs one that does not"
        )))
    }

    /// Make the namespaces and the link (the janitor must already run).
    pub(crate) fn set_up(&self, layout: &Layout) -> Result<(), Error> {
        for (name, cidr) in [("pod", POD_CIDR), ("service", SERVICE_CIDR)] {
            if let Some(prefix) = parse_prefix(cidr)
                && overlaps(prefix, (u32::from(self.host) & !3, 30))
            {
                return Err(Error::Setup(format!(
                    "the {name} range {cidr} overlaps the node link"
                )));
            }
        }
        let output = Command::new("sh")
            .args(["-c", SCRIPT, "saleslayer-netns"])
            .arg(&layout.dir)
            .args([&layout.netns, &layout.veth])
            .arg(format!("{}/30", self.host))
            .arg(format!("{}/30", self.node))
            .arg(&layout.cgroup)
            .arg(POD_CIDR)
            .output()
            .map_err(|e| Error::Tool("sh", e))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(Error::Setup(format!(
                "making the node's namespaces failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    }
}

/// Every IPv4 prefix this host routes or owns, the default route excepted
/// (it overlaps everything, and no packet of the node may use it anyway).
fn host_prefixes() -> Result<Vec<(u32, u32)>, Error> {
    let mut prefixes = Vec::new();
    for args in [
        &["-4", "-o", "route", "show", "table", "all"][..],
        &["-4", "-o", "addr", "show"][..],
    ] {
        let output = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| Error::Tool("ip", e))?;
        if !output.status.success() {
            return Err(Error::Setup(format!(
                "ip {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            prefixes.extend(line.split_whitespace().filter_map(parse_prefix));
        }
    }
    Ok(prefixes)
}

/// `a.b.c.d/len` or a bare address (a /32); `default` and others are not prefixes.
fn parse_prefix(word: &str) -> Option<(u32, u32)> {
    let (addr, len) = word.split_once('/').unwrap_or((word, "32"));
    let addr: Ipv4Addr = addr.parse().ok()?;
    let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((u32::from(addr), len))
}

/// Whether two prefixes share an address.
fn overlaps((a, a_len): (u32, u32), (b, b_len): (u32, u32)) -> bool {
    let len = a_len.min(b_len);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a & mask == b & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_overlap_when_one_holds_the_other() {
        let p = |s| parse_prefix(s).expect("a prefix");
        assert!(overlaps(p("10.213.0.0/30"), p("10.0.0.0/8")));
        assert!(overlaps(p("10.213.0.4/30"), p("10.213.0.6")));
        assert!(!overlaps(p("10.213.0.0/30"), p("10.213.0.4/30")));
        assert!(!overlaps(p("10.213.0.0/30"), p("192.0.2.0/24")));
        assert_eq!(parse_prefix("default"), None);
        assert_eq!(parse_prefix("dev"), None);
    }

    #[test]
    fn a_layout_is_named_after_the_directory_id() {
        let layout = Layout::new(Path::new("/tmp/saleslayer-node-Ab12Cd")).expect("a layout");
        assert_eq!(layout.netns, "saleslayer-Ab12Cd");
        assert_eq!(layout.veth, "slv-Ab12Cd");
        assert!(
            layout.veth.len() <= 15,
            "interface names are at most 15 bytes"
        );
        assert!(Layout::new(Path::new("/tmp/other")).is_err());
        assert!(Layout::new(Path::new("/tmp/saleslayer-node-a/b")).is_err());
    }
}
