//! Per-site resource limits through the kernel's cgroups (DESIGN.md, decision 5).
//!
//! - cgroup v2, where `/sys/fs/cgroup` is the unified hierarchy with the memory controller:
//!   `memory.max`, `memory.swap.max`, `pids.max`, OOM kills counted in `memory.events`.
//! - cgroup v1, where the memory (and pids) hierarchies are mounted separately, as on our
//!   test machines: `memory.limit_in_bytes` (+ `memsw` when present), `pids.max`, OOM kills
//!   counted in `memory.oom_control`.
//! - neither writable: no kernel limits; the supervisor falls back to an RSS watchdog.
//!
//! Site groups nest under the agent's own cgroup (`<own>/roost/<host>`), the way a delegated
//! systemd service does it, so a limit placed on the agent's service also bounds its sites.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// Which kind of kernel limits this node has.
#[derive(Debug, Clone)]
pub enum Cgroups {
    V2 {
        base: PathBuf,
    },
    V1 {
        memory: PathBuf,
        pids: Option<PathBuf>,
    },
    Unavailable,
}

/// One site's cgroup(s).
#[derive(Debug, Clone)]
pub struct SiteCgroup {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    V2(PathBuf),
    V1 {
        memory: PathBuf,
        pids: Option<PathBuf>,
    },
}

impl Cgroups {
    /// Find the hierarchies from `/proc/self/mounts` and `/proc/self/cgroup` and create this
    /// agent's group, `name`, in each. `name` must be unique per agent on the host: a starting
    /// agent kills what it finds in its own group (leftovers of its previous run), so two
    /// agents sharing one would kill each other's workers. Never fails: without cgroups the
    /// node still serves.
    pub fn detect(name: &str) -> Self {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let found = detect_from(&mounts, &own, name);
        let ready = match found {
            Cgroups::V2 { base } => {
                prepare_v2(&base, name).map(|sites| Cgroups::V2 { base: sites })
            }
            Cgroups::V1 { memory, pids } => fs::create_dir_all(&memory)
                .and_then(|_| pids.as_ref().map_or(Ok(()), fs::create_dir_all))
                .map(|_| Cgroups::V1 { memory, pids }),
            Cgroups::Unavailable => Ok(Cgroups::Unavailable),
        };
        match ready {
            Ok(found) => {
                info!(cgroups = ?found, "per-site limits");
                found
            }
            Err(e) => {
                warn!(error = %e, "cannot create cgroups; falling back to the RSS watchdog");
                Cgroups::Unavailable
            }
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Cgroups::V2 { .. } => "cgroup v2",
            Cgroups::V1 { pids: Some(_), .. } => "cgroup v1 (memory, pids)",
            Cgroups::V1 { pids: None, .. } => "cgroup v1 (memory)",
            Cgroups::Unavailable => "none (RSS watchdog)",
        }
    }

    /// The cgroup of `host`, created if missing; `None` without cgroups.
    pub fn site(&self, host: &str) -> io::Result<Option<SiteCgroup>> {
        let kind = match self {
            Cgroups::V2 { base } => {
                let dir = base.join(host);
                fs::create_dir_all(&dir)?;
                Kind::V2(dir)
            }
            Cgroups::V1 { memory, pids } => {
                let m = memory.join(host);
                fs::create_dir_all(&m)?;
                let p = match pids {
                    Some(p) => {
                        let d = p.join(host);
                        fs::create_dir_all(&d)?;
                        Some(d)
                    }
                    None => None,
                };
                Kind::V1 { memory: m, pids: p }
            }
            Cgroups::Unavailable => return Ok(None),
        };
        Ok(Some(SiteCgroup { kind }))
    }

    /// Kill whatever a previous agent left in site cgroups (workers of an agent that was
    /// SIGKILLed) and remove those groups. Returns how many processes were killed.
    pub fn clean_leftovers(&self) -> usize {
        let bases: Vec<&PathBuf> = match self {
            Cgroups::V2 { base } => vec![base],
            Cgroups::V1 { memory, pids } => std::iter::once(memory).chain(pids.iter()).collect(),
            Cgroups::Unavailable => vec![],
        };
        let mut killed = 0;
        for base in bases {
            let Ok(entries) = fs::read_dir(base) else {
                continue;
            };
            for entry in entries.flatten() {
                let dir = entry.path();
                if !dir.is_dir() {
                    continue;
                }
                let pids = read_pids(&dir.join("cgroup.procs"));
                for pid in &pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                killed += pids.len();
                remove_when_empty(&dir);
            }
        }
        killed
    }
}

impl Cgroups {
    /// On a clean exit: remove the (empty) site groups and the agent's own group, so a host
    /// that runs agents with changing state directories does not collect empty groups.
    pub fn remove_all(&self) {
        self.clean_leftovers();
        match self {
            Cgroups::V2 { base } => remove_when_empty(base),
            Cgroups::V1 { memory, pids } => {
                remove_when_empty(memory);
                if let Some(p) = pids {
                    remove_when_empty(p);
                }
            }
            Cgroups::Unavailable => {}
        }
    }
}

impl SiteCgroup {
    /// Apply the site's limits; `None` removes a limit. Call while the group is empty or
    /// before raising usage (lowering a v1 limit below current usage fails with EBUSY).
    pub fn set_limits(&self, memory_bytes: Option<u64>, pids_max: Option<u64>) -> io::Result<()> {
        match &self.kind {
            Kind::V2(dir) => {
                let mem = memory_bytes.map_or("max".to_string(), |b| b.to_string());
                fs::write(dir.join("memory.max"), &mem)?;
                // Swap would let a site exceed its limit slowly instead of being stopped.
                let _ = fs::write(dir.join("memory.swap.max"), "0");
                let pids = pids_max.map_or("max".to_string(), |p| p.to_string());
                let _ = fs::write(dir.join("pids.max"), pids);
            }
            Kind::V1 { memory, pids } => {
                let mem = memory_bytes.map_or("-1".to_string(), |b| b.to_string());
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                // memsw must stay >= the memory limit: order the writes accordingly.
                if memory_bytes.is_some() {
                    fs::write(memory.join("memory.limit_in_bytes"), &mem)?;
                    if memsw.exists() {
                        fs::write(&memsw, &mem)?;
                    }
                } else {
                    if memsw.exists() {
                        fs::write(&memsw, "-1")?;
                    }
                    fs::write(memory.join("memory.limit_in_bytes"), &mem)?;
                }
                if let Some(p) = pids {
                    let v = pids_max.map_or("max".to_string(), |n| n.to_string());
                    fs::write(p.join("pids.max"), v)?;
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a new worker writes its pid to.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        match &self.kind {
            Kind::V2(dir) => vec![dir.join("cgroup.procs")],
            Kind::V1 { memory, pids } => std::iter::once(memory.join("cgroup.procs"))
                .chain(pids.iter().map(|p| p.join("cgroup.procs")))
                .collect(),
        }
    }

    /// How many processes the kernel has killed in this group for exceeding its memory limit.
    pub fn oom_kills(&self) -> u64 {
        let (file, _) = match &self.kind {
            Kind::V2(dir) => (dir.join("memory.events"), ()),
            Kind::V1 { memory, .. } => (memory.join("memory.oom_control"), ()),
        };
        parse_counter(&fs::read_to_string(file).unwrap_or_default(), "oom_kill")
    }

    /// Memory charged to the group now.
    pub fn memory_bytes(&self) -> Option<u64> {
        let file = match &self.kind {
            Kind::V2(dir) => dir.join("memory.current"),
            Kind::V1 { memory, .. } => memory.join("memory.usage_in_bytes"),
        };
        fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// Pids in the group.
    pub fn pids(&self) -> Vec<i32> {
        let file = match &self.kind {
            Kind::V2(dir) => dir.join("cgroup.procs"),
            Kind::V1 { memory, .. } => memory.join("cgroup.procs"),
        };
        read_pids(&file)
    }

    /// Remove the group (the site is gone); processes still in it are killed first.
    pub fn remove(&self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        match &self.kind {
            Kind::V2(dir) => remove_when_empty(dir),
            Kind::V1 { memory, pids } => {
                remove_when_empty(memory);
                if let Some(p) = pids {
                    remove_when_empty(p);
                }
            }
        }
    }
}

/// Decide the hierarchy from the text of `/proc/self/mounts` and `/proc/self/cgroup`. For
/// v1 the result holds the agent's group `name` in each hierarchy; for v2 the agent's own
/// group, which [`prepare_v2`] arranges.
fn detect_from(mounts: &str, own: &str, name: &str) -> Cgroups {
    let mut v2_mount = None;
    let mut v1_memory = None;
    let mut v1_pids = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let (dir, fstype, opts) = (f[1], f[2], f[3]);
        match fstype {
            "cgroup2" => v2_mount = v2_mount.or(Some(dir.to_string())),
            "cgroup" => {
                let opts: Vec<&str> = opts.split(',').collect();
                if opts.contains(&"memory") {
                    v1_memory = Some(dir.to_string());
                }
                if opts.contains(&"pids") {
                    v1_pids = Some(dir.to_string());
                }
            }
            _ => {}
        }
    }
    // /proc/self/cgroup: "hier-id:controllers:path"; v2 is "0::path".
    let own_path = |controller: Option<&str>| -> String {
        own.lines()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
                let matches = match controller {
                    None => ctrls.is_empty(),
                    Some(c) => ctrls.split(',').any(|x| x == c),
                };
                matches.then(|| path.trim_start_matches('/').to_string())
            })
            .next()
            .unwrap_or_default()
    };
    if let Some(memory) = v1_memory {
        let base = Path::new(&memory).join(own_path(Some("memory"))).join(name);
        let pids = v1_pids.map(|p| Path::new(&p).join(own_path(Some("pids"))).join(name));
        return Cgroups::V1 { memory: base, pids };
    }
    if let Some(root) = v2_mount {
        let controllers =
            fs::read_to_string(Path::new(&root).join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "memory") {
            let base = Path::new(&root).join(own_path(None));
            return Cgroups::V2 { base };
        }
    }
    Cgroups::Unavailable
}

/// cgroup v2 allows no processes in a group that distributes controllers to children: move
/// the agent into a leaf `agent/` of its own group, enable memory and pids below, and put
/// sites under `<name>/` (what systemd expects of a service with `Delegate=yes`). Returns the
/// directory sites go in.
fn prepare_v2(base: &Path, name: &str) -> io::Result<PathBuf> {
    let own_procs = read_pids(&base.join("cgroup.procs"));
    if !own_procs.is_empty() {
        let leaf = base.join("agent");
        fs::create_dir_all(&leaf)?;
        for pid in own_procs {
            let _ = fs::write(leaf.join("cgroup.procs"), pid.to_string());
        }
    }
    fs::write(base.join("cgroup.subtree_control"), "+memory +pids")?;
    let sites = base.join(name);
    fs::create_dir_all(&sites)?;
    fs::write(sites.join("cgroup.subtree_control"), "+memory +pids")?;
    Ok(sites)
}

fn read_pids(file: &Path) -> Vec<i32> {
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn remove_when_empty(dir: &Path) {
    // rmdir fails while the kernel still counts exiting tasks; try for a moment.
    for _ in 0..20 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(25)),
        }
    }
    warn!(cgroup = %dir.display(), "could not remove cgroup");
}

fn parse_counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_MOUNTS: &str = "tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
    const V1_OWN: &str = "8:pids:/\n4:memory:/process_api/abc\n0::/\n";

    #[test]
    fn v1_hierarchies_nest_under_the_agents_own_group() {
        match detect_from(V1_MOUNTS, V1_OWN, "roost-n1") {
            Cgroups::V1 { memory, pids } => {
                assert_eq!(
                    memory,
                    PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/roost-n1")
                );
                assert_eq!(pids, Some(PathBuf::from("/sys/fs/cgroup/pids/roost-n1")));
            }
            other => panic!("expected v1, got {other:?}"),
        }
    }

    #[test]
    fn no_cgroup_mounts_means_unavailable() {
        assert!(matches!(
            detect_from("proc /proc proc rw 0 0\n", "", "roost"),
            Cgroups::Unavailable
        ));
    }

    #[test]
    fn oom_counters_are_read_from_either_format() {
        assert_eq!(
            parse_counter("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"),
            3
        );
        assert_eq!(
            parse_counter("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\n", "oom_kill"),
            2
        );
        assert_eq!(parse_counter("", "oom_kill"), 0);
    }
}
