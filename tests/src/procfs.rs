//! Reading processes from `/proc`: who a process is (ids, groups, flags), what it holds
//! (fds), its parent, and finding a cluster's agent and zygotes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::Cluster;

/// The value of `field` in `/proc/<pid>/status` (e.g. "Uid" -> "1001\t1001\t1001\t1001").
pub fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(&format!("{field}:"))
            .map(|v| v.trim().to_string())
    })
}

/// Numbers in a `/proc/<pid>/status` field ("Uid", "Gid", "Groups").
pub fn status_ids(pid: u32, field: &str) -> Vec<u32> {
    status_field(pid, field)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The parent pid (`PPid:`).
pub fn ppid(pid: u32) -> Option<u32> {
    status_field(pid, "PPid")?.parse().ok()
}

/// The nice value of a process, or of one of its threads as `"<pid>/task/<tid>"` (field
/// 19 of `stat`).
pub fn nice(pid: impl std::fmt::Display) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..]
        .split(' ')
        .nth(16)?
        .parse()
        .ok()
}

/// The nice value of each of `pid`'s threads, by thread name.
pub fn thread_nices(pid: u32) -> Vec<(String, i32)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_string_lossy().into_owned();
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
            Some((name.trim().to_string(), nice(format!("{pid}/task/{tid}"))?))
        })
        .collect()
}

/// The short name (`/proc/<pid>/comm`).
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// argv, NUL-separated in `/proc/<pid>/cmdline`.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The environment block a process was exec'd with (`/proc/<pid>/environ`).
pub fn environ(pid: u32) -> BTreeMap<String, String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Open fds and what they point to (`socket:[123]`, `pipe:[456]`, a path).
pub fn fds(pid: u32) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in entries.flatten() {
            if let (Some(fd), Ok(target)) = (
                e.file_name().to_str().and_then(|s| s.parse().ok()),
                std::fs::read_link(e.path()),
            ) {
                out.insert(fd, target.to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// The inode of a `socket:[N]` or `pipe:[N]` fd target.
pub fn inode_of(target: &str) -> Option<u64> {
    target.split_once(":[")?.1.strip_suffix(']')?.parse().ok()
}

/// A unix socket from `/proc/net/unix`: its state (1 listening, 3 connected) and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSock {
    pub state: u32,
    pub path: Option<PathBuf>,
}

/// Unix sockets of this network namespace by inode.
pub fn unix_sockets() -> BTreeMap<u64, UnixSock> {
    let text = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let mut out = BTreeMap::new();
    // Num RefCount Protocol Flags Type St Inode Path
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 7 {
            continue;
        }
        let (Ok(state), Ok(inode)) = (u32::from_str_radix(cols[5], 16), cols[6].parse::<u64>())
        else {
            continue;
        };
        out.insert(
            inode,
            UnixSock {
                state,
                path: cols.get(7).map(PathBuf::from),
            },
        );
    }
    out
}

/// Every pid whose parent is `parent`.
pub fn children(parent: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|p| ppid(*p) == Some(parent))
        .collect()
}

/// Every pid on the host.
pub fn all_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// The pid of `c`'s agent: the `roost-agent` started with `--state-dir <c.state_dir>`.
pub fn agent_pid(c: &Cluster) -> Option<u32> {
    let state_dir = c.state_dir.to_string_lossy().into_owned();
    all_pids().into_iter().find(|p| {
        let argv = cmdline(*p);
        argv.first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "roost-agent"))
            && argv
                .windows(2)
                .any(|w| w[0] == "--state-dir" && w[1] == state_dir)
    })
}

/// The zygotes of the agent `agent` (its children named `roost-zygote`).
pub fn zygote_pids(agent: u32) -> Vec<u32> {
    children(agent)
        .into_iter()
        .filter(|p| comm(*p) == "roost-zygote")
        .collect()
}
