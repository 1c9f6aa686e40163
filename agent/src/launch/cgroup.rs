//! Per-site resource limits through the kernel's cgroups (DESIGN.md, decision 5).
//!
//! - cgroup v2, where `/sys/fs/cgroup` is the unified hierarchy with the memory controller:
//!   `memory.max`, `memory.swap.max`, `pids.max`, OOM kills counted in `memory.events`.
//! - cgroup v1, where the memory (and pids) hierarchies are mounted separately, as on our
//!   test machines: `memory.limit_in_bytes` (+ `memsw` when present), `pids.max`, OOM kills
//!   counted in `memory.oom_control`.
//! - neither writable: no kernel limits; the supervisor falls back to an RSS watchdog.
//!
//! Site groups nest under the agent's own cgroup, the way a delegated systemd service does it,
//! so a limit placed on the agent's service also bounds its sites:
//! - v1: `<own>/<name>/<host>` in the memory (and pids) hierarchy.
//! - v2: the agent's group D is the one it started in (its service's, with `Delegate=yes`), or
//!   the parent of the leaf `agent` when it starts already there (systemd's
//!   `DelegateSubgroup=agent`, or a restart into its predecessor's leaf). The agent moves itself
//!   into `D/agent` ("no internal processes": D may hold no process once it hands controllers to
//!   its children) and puts sites in `D/<name>/<host>`. It moves no process but its own: D
//!   holding others means D was not delegated to it, so it falls back to the RSS watchdog.
//!   docs/cgroups.md is the operator's side of this.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// Which kind of kernel limits this node has.
#[derive(Debug, Clone)]
pub enum Cgroups {
    V2 {
        base: PathBuf,
        /// Whether the pids controller is enabled for the sites (`pids.max`).
        pids: bool,
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
    V2 {
        dir: PathBuf,
        pids: bool,
    },
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
            Cgroups::V2 { base, .. } => prepare_v2(&base, name),
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
            Cgroups::V2 { pids: true, .. } => "cgroup v2 (memory, pids)",
            Cgroups::V2 { pids: false, .. } => "cgroup v2 (memory)",
            Cgroups::V1 { pids: Some(_), .. } => "cgroup v1 (memory, pids)",
            Cgroups::V1 { pids: None, .. } => "cgroup v1 (memory)",
            Cgroups::Unavailable => "none (RSS watchdog)",
        }
    }

    /// The cgroup of `host`, created if missing; `None` without cgroups.
    pub fn site(&self, host: &str) -> io::Result<Option<SiteCgroup>> {
        let kind = match self {
            Cgroups::V2 { base, pids } => {
                let dir = base.join(host);
                fs::create_dir_all(&dir)?;
                Kind::V2 { dir, pids: *pids }
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
            Cgroups::V2 { base, .. } => vec![base],
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
                killed += kill_all_in(&dir);
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
            Cgroups::V2 { base, .. } => remove_when_empty(base),
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
            Kind::V2 { dir, pids } => {
                let mem = memory_bytes.map_or("max".to_string(), |b| b.to_string());
                write_file(&dir.join("memory.max"), &mem)?;
                // Swap would let a site exceed its limit slowly instead of being stopped. The
                // file is missing only when the kernel accounts no swap (then none is used).
                match fs::write(dir.join("memory.swap.max"), "0") {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    r => r.map_err(|e| with_path(e, &dir.join("memory.swap.max")))?,
                }
                if *pids {
                    let v = pids_max.map_or("max".to_string(), |p| p.to_string());
                    write_file(&dir.join("pids.max"), &v)?;
                }
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
            Kind::V2 { dir, .. } => vec![dir.join("cgroup.procs")],
            Kind::V1 { memory, pids } => std::iter::once(memory.join("cgroup.procs"))
                .chain(pids.iter().map(|p| p.join("cgroup.procs")))
                .collect(),
        }
    }

    /// How many processes the kernel has killed in this group for exceeding its memory limit.
    pub fn oom_kills(&self) -> u64 {
        let (file, _) = match &self.kind {
            Kind::V2 { dir, .. } => (dir.join("memory.events"), ()),
            Kind::V1 { memory, .. } => (memory.join("memory.oom_control"), ()),
        };
        parse_counter(&fs::read_to_string(file).unwrap_or_default(), "oom_kill")
    }

    /// Memory charged to the group now.
    pub fn memory_bytes(&self) -> Option<u64> {
        let file = match &self.kind {
            Kind::V2 { dir, .. } => dir.join("memory.current"),
            Kind::V1 { memory, .. } => memory.join("memory.usage_in_bytes"),
        };
        fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// CPU time used by the group's processes, in seconds. v2 counts every process that was
    /// ever in the group (`cpu.stat`); v1 has no cpuacct hierarchy of ours, so it sums the
    /// processes in the group now and the children they reaped (`/proc/<pid>/stat`).
    pub fn cpu_seconds(&self) -> Option<f64> {
        match &self.kind {
            Kind::V2 { dir, .. } => {
                let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
                Some(parse_counter(&stat, "usage_usec") as f64 / 1e6)
            }
            Kind::V1 { memory, .. } => {
                let ticks = read_pids(&memory.join("cgroup.procs"))
                    .into_iter()
                    .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/stat")).ok())
                    .filter_map(|stat| process_cpu_ticks(&stat))
                    .sum::<u64>();
                // SAFETY: sysconf has no preconditions.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
                Some(ticks as f64 / hz)
            }
        }
    }

    /// Remove the group (the site is gone); processes still in it are killed first.
    pub fn remove(&self) {
        match &self.kind {
            Kind::V2 { dir, .. } => {
                kill_all_in(dir);
                remove_when_empty(dir)
            }
            Kind::V1 { memory, pids } => {
                kill_all_in(memory);
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
            let base = Path::new(&root).join(delegated_group(&own_path(None)));
            let pids = controllers.split_whitespace().any(|c| c == "pids");
            return Cgroups::V2 { base, pids };
        }
    }
    Cgroups::Unavailable
}

/// The leaf of the agent's delegated group that holds the agent itself (and its zygotes).
const AGENT_LEAF: &str = "agent";

/// The group delegated to the agent, from its own v2 group (relative to the mount): the
/// parent when it started in its leaf already, else the group itself.
fn delegated_group(own: &str) -> &str {
    match own.rsplit_once('/') {
        Some((parent, AGENT_LEAF)) => parent,
        None if own == AGENT_LEAF => "",
        _ => own,
    }
}

/// Arrange the delegated group `delegated` (see the module comment): the agent into its leaf,
/// memory (and pids, when the kernel has it) handed down to `<name>/`, the group sites go in.
fn prepare_v2(delegated: &Path, name: &str) -> io::Result<Cgroups> {
    let leaf = delegated.join(AGENT_LEAF);
    let me = std::process::id() as i32;
    // The real root has no cgroup.type and allows processes beside enabled controllers.
    let is_root = !delegated.join("cgroup.type").exists();
    let strangers: Vec<i32> = read_pids(&delegated.join("cgroup.procs"))
        .into_iter()
        .filter(|p| *p != me)
        .collect();
    if !is_root && !strangers.is_empty() {
        return Err(io::Error::other(format!(
            "{} holds processes that are not this agent's ({strangers:?}): it was not delegated \
             to the agent alone; run the agent in a cgroup of its own (systemd: Delegate=yes)",
            delegated.display()
        )));
    }
    fs::create_dir_all(&leaf).map_err(|e| with_path(e, &leaf))?;
    if !read_pids(&leaf.join("cgroup.procs")).contains(&me) {
        // One write moves every thread of the agent.
        write_file(&leaf.join("cgroup.procs"), &me.to_string())?;
    }
    let pids = enable_controllers(delegated)?;
    let sites = delegated.join(name);
    fs::create_dir_all(&sites).map_err(|e| with_path(e, &sites))?;
    enable_controllers(&sites)?;
    if !pids {
        warn!(cgroup = %delegated.display(), "cgroup v2 without the pids controller: no per-site process limit");
    }
    if !delegated.join(name).join("memory.swap.max").exists() {
        info!("the kernel accounts no swap for cgroups (no memory.swap.max): memory.max alone bounds a site");
    }
    Ok(Cgroups::V2 { base: sites, pids })
}

/// Hand memory, and pids where available, to `group`'s children. Memory is required; returns
/// whether pids is on. Each controller is its own write: one the parent lacks fails alone.
fn enable_controllers(group: &Path) -> io::Result<bool> {
    let control = group.join("cgroup.subtree_control");
    let available = fs::read_to_string(group.join("cgroup.controllers"))
        .map_err(|e| with_path(e, &group.join("cgroup.controllers")))?;
    let has = |c: &str| available.split_whitespace().any(|x| x == c);
    if !has("memory") {
        return Err(io::Error::other(format!(
            "{}: the memory controller is not delegated here (cgroup.controllers: {:?})",
            group.display(),
            available.trim()
        )));
    }
    write_file(&control, "+memory")?;
    Ok(has("pids") && write_file(&control, "+pids").is_ok())
}

/// Kill every process in `dir`. cgroup v2's `cgroup.kill` (Linux 5.14) takes the group at once,
/// including a fork bomb's children forked meanwhile; elsewhere, each pid listed.
fn kill_all_in(dir: &Path) -> usize {
    let pids = read_pids(&dir.join("cgroup.procs"));
    if pids.is_empty() {
        return 0;
    }
    if fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    pids.len()
}

fn write_file(file: &Path, value: &str) -> io::Result<()> {
    fs::write(file, value).map_err(|e| with_path(e, file))
}

fn with_path(e: io::Error, file: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", file.display()))
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

/// utime + stime + cutime + cstime of one `/proc/<pid>/stat` line, in clock ticks.
fn process_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // After the name: state is field 3 of stat(5), so utime (14) is index 11 here.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<i64>().ok());
    Some((ticks(11)? + ticks(12)? + ticks(13)?.max(0) + ticks(14)?.max(0)) as u64)
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
    fn v2_sites_go_beside_the_agents_leaf_even_when_it_starts_in_it() {
        assert_eq!(
            delegated_group("system.slice/roost-agent.service"),
            "system.slice/roost-agent.service"
        );
        // systemd's DelegateSubgroup=agent, or a restart into the predecessor's leaf.
        assert_eq!(
            delegated_group("system.slice/roost-agent.service/agent"),
            "system.slice/roost-agent.service"
        );
        assert_eq!(delegated_group("agent"), "");
        assert_eq!(delegated_group(""), "");
        assert_eq!(delegated_group("x/agents"), "x/agents");
    }

    #[test]
    fn no_cgroup_mounts_means_unavailable() {
        assert!(matches!(
            detect_from("proc /proc proc rw 0 0\n", "", "roost"),
            Cgroups::Unavailable
        ));
    }

    #[test]
    fn cpu_ticks_are_read_after_a_command_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime ...
        let stat = "42 (gunicorn: (a b)) S 1 42 42 0 -1 4194560 100 0 0 0 70 30 5 -1 20 0 1";
        assert_eq!(process_cpu_ticks(stat), Some(105));
        assert_eq!(process_cpu_ticks("garbage"), None);
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
