//! Per-site resource limits through the kernel's cgroups (DESIGN.md, decision 5).
//!
//! - cgroup v2, where `/sys/fs/cgroup` is the unified hierarchy with the memory controller:
//!   `memory.max`, `memory.swap.max`, `pids.max`, OOM kills counted in `memory.events`;
//!   `cpu.max` and `cpu.weight`, `io.weight` where those controllers are available.
//! - cgroup v1, where the memory (and pids, cpu, cpuacct, blkio) hierarchies are mounted
//!   separately, as on our test machines: `memory.limit_in_bytes` (+ `memsw` when present),
//!   `pids.max`, OOM kills counted in `memory.oom_control`; `cpu.cfs_quota_us` and
//!   `cpu.shares`, `blkio.bfq.weight` (or `blkio.weight`), CPU time in `cpuacct.usage`.
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
        /// The optional controllers enabled for the sites.
        has: V2Controllers,
    },
    /// The agent's group in each v1 hierarchy.
    V1(V1Groups),
    Unavailable,
}

/// cgroup v2 controllers besides memory, when the kernel hands them to the sites.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct V2Controllers {
    pub pids: bool,
    pub cpu: bool,
    pub io: bool,
}

/// One group per cgroup v1 hierarchy. Hierarchies mounted together (`cpu,cpuacct`) share
/// a path; memory is required, the others are used where mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Groups {
    pub memory: PathBuf,
    pub pids: Option<PathBuf>,
    pub cpu: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
    pub blkio: Option<PathBuf>,
}

impl V1Groups {
    /// The same groups one level down (a site's, under the agent's).
    fn join(&self, name: &str) -> Self {
        let j = |p: &Option<PathBuf>| p.as_ref().map(|p| p.join(name));
        Self {
            memory: self.memory.join(name),
            pids: j(&self.pids),
            cpu: j(&self.cpu),
            cpuacct: j(&self.cpuacct),
            blkio: j(&self.blkio),
        }
    }

    /// The groups named `name` beside these (in the same parents).
    fn sibling(&self, name: &str) -> Self {
        let s = |p: &PathBuf| {
            p.parent()
                .map_or_else(|| PathBuf::from(name), |d| d.join(name))
        };
        Self {
            memory: s(&self.memory),
            pids: self.pids.as_ref().map(s),
            cpu: self.cpu.as_ref().map(s),
            cpuacct: self.cpuacct.as_ref().map(s),
            blkio: self.blkio.as_ref().map(s),
        }
    }

    /// Every distinct directory, memory first.
    fn dirs(&self) -> Vec<&PathBuf> {
        let mut out = vec![&self.memory];
        for p in [&self.pids, &self.cpu, &self.cpuacct, &self.blkio]
            .into_iter()
            .flatten()
        {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }
}

/// What a site's group is limited to. Weights are cgroup v2's scale (1..=10000, default 100).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids_max: Option<u64>,
    /// CPU cap in cores; `None`: no cap.
    pub cpu_cores: Option<f64>,
    pub cpu_weight: u32,
    pub io_weight: u32,
}

/// The CPU weight of a site whose worker is still starting: the lowest there is, so a
/// storm of cold starts can't take CPU from sites that already serve (issue 11).
pub const STARTING_CPU_WEIGHT: u32 = 1;
/// The period `cpu_cores` is a share of (the kernel's default, 100 ms).
const CPU_PERIOD_US: u64 = 100_000;
/// The kernel's smallest quota.
const MIN_CPU_QUOTA_US: u64 = 1_000;

/// One site's cgroup(s).
#[derive(Debug, Clone)]
pub struct SiteCgroup {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    V2 { dir: PathBuf, has: V2Controllers },
    V1(V1Groups),
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
            Cgroups::V1(groups) => groups
                .dirs()
                .into_iter()
                .try_for_each(|d| fs::create_dir_all(d).map_err(|e| with_path(e, d)))
                .map(|_| Cgroups::V1(groups)),
            Cgroups::Unavailable => Ok(Cgroups::Unavailable),
        };
        match ready {
            Ok(found) => {
                info!(cgroups = ?found, "per-site limits");
                if !matches!(found, Cgroups::Unavailable) && !found.has_io() {
                    info!("no io/blkio cgroup controller: sites' io_weight is not applied");
                }
                found
            }
            Err(e) => {
                warn!(error = %e, "cannot create cgroups; falling back to the RSS watchdog");
                Cgroups::Unavailable
            }
        }
    }

    /// "cgroup v1 (memory, pids, cpu, cpuacct)", for the log.
    pub fn describe(&self) -> String {
        let (version, names): (&str, Vec<&str>) = match self {
            Cgroups::V2 { has, .. } => (
                "v2",
                [
                    ("memory", true),
                    ("pids", has.pids),
                    ("cpu", has.cpu),
                    ("io", has.io),
                ]
                .into_iter()
                .filter_map(|(n, on)| on.then_some(n))
                .collect(),
            ),
            Cgroups::V1(g) => (
                "v1",
                [
                    ("memory", true),
                    ("pids", g.pids.is_some()),
                    ("cpu", g.cpu.is_some()),
                    ("cpuacct", g.cpuacct.is_some()),
                    ("blkio", g.blkio.is_some()),
                ]
                .into_iter()
                .filter_map(|(n, on)| on.then_some(n))
                .collect(),
            ),
            Cgroups::Unavailable => return "none (RSS watchdog)".into(),
        };
        format!("cgroup {version} ({})", names.join(", "))
    }

    /// Whether sites' block I/O can be weighted here.
    pub fn has_io(&self) -> bool {
        match self {
            Cgroups::V2 { has, .. } => has.io,
            Cgroups::V1(g) => g.blkio.is_some(),
            Cgroups::Unavailable => false,
        }
    }

    /// Whether sites' CPU can be capped and weighted here.
    pub fn has_cpu(&self) -> bool {
        match self {
            Cgroups::V2 { has, .. } => has.cpu,
            Cgroups::V1(g) => g.cpu.is_some(),
            Cgroups::Unavailable => false,
        }
    }

    /// The cgroup of `host`, created if missing; `None` without cgroups.
    pub fn site(&self, host: &str) -> io::Result<Option<SiteCgroup>> {
        let kind = match self {
            Cgroups::V2 { base, has } => {
                let dir = base.join(host);
                fs::create_dir_all(&dir).map_err(|e| with_path(e, &dir))?;
                Kind::V2 { dir, has: *has }
            }
            Cgroups::V1(groups) => {
                let site = groups.join(host);
                for d in site.dirs() {
                    fs::create_dir_all(d).map_err(|e| with_path(e, d))?;
                }
                Kind::V1(site)
            }
            Cgroups::Unavailable => return Ok(None),
        };
        Ok(Some(SiteCgroup { kind }))
    }

    /// Whether a group made under a placeholder name can become a site's by a rename
    /// (`launch/ready.rs`): v1 allows renames within a parent; v2 refuses them.
    pub fn renames_groups(&self) -> bool {
        matches!(self, Cgroups::V1(_))
    }

    /// Kill whatever a previous agent left in site cgroups (workers of an agent that was
    /// SIGKILLed) and remove those groups. Returns how many processes were killed.
    pub fn clean_leftovers(&self) -> usize {
        let bases: Vec<&PathBuf> = match self {
            Cgroups::V2 { base, .. } => vec![base],
            Cgroups::V1(groups) => groups.dirs(),
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
            Cgroups::V1(groups) => groups.dirs().into_iter().for_each(|d| remove_when_empty(d)),
            Cgroups::Unavailable => {}
        }
    }
}

impl SiteCgroup {
    /// Apply the site's limits; `None` removes a limit. Call while the group is empty or
    /// before raising usage (lowering a v1 limit below current usage fails with EBUSY).
    /// Block I/O weight is best effort: a kernel without it (or whose disk scheduler takes
    /// no weights) is logged, and the site starts anyway.
    pub fn set_limits(&self, limits: &Limits) -> io::Result<()> {
        match &self.kind {
            Kind::V2 { dir, has } => {
                let mem = limits
                    .memory_bytes
                    .map_or("max".to_string(), |b| b.to_string());
                write_file(&dir.join("memory.max"), &mem)?;
                // Swap would let a site exceed its limit slowly instead of being stopped. The
                // file is missing only when the kernel accounts no swap (then none is used).
                match fs::write(dir.join("memory.swap.max"), "0") {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    r => r.map_err(|e| with_path(e, &dir.join("memory.swap.max")))?,
                }
                if has.pids {
                    let v = limits.pids_max.map_or("max".to_string(), |p| p.to_string());
                    write_file(&dir.join("pids.max"), &v)?;
                }
                if has.cpu {
                    let quota = limits
                        .cpu_cores
                        .map_or("max".to_string(), |c| cpu_quota_us(c).to_string());
                    write_file(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
                if has.io {
                    best_effort_io(
                        &dir.join("io.weight"),
                        &format!("default {}", limits.io_weight),
                    );
                }
            }
            Kind::V1(g) => {
                let memory = &g.memory;
                let mem = limits
                    .memory_bytes
                    .map_or("-1".to_string(), |b| b.to_string());
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                // memsw must stay >= the memory limit: order the writes accordingly.
                if limits.memory_bytes.is_some() {
                    write_file(&memory.join("memory.limit_in_bytes"), &mem)?;
                    if memsw.exists() {
                        write_file(&memsw, &mem)?;
                    }
                } else {
                    if memsw.exists() {
                        write_file(&memsw, "-1")?;
                    }
                    write_file(&memory.join("memory.limit_in_bytes"), &mem)?;
                }
                if let Some(p) = &g.pids {
                    let v = limits.pids_max.map_or("max".to_string(), |n| n.to_string());
                    write_file(&p.join("pids.max"), &v)?;
                }
                if let Some(cpu) = &g.cpu {
                    write_file(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    let quota = limits
                        .cpu_cores
                        .map_or("-1".to_string(), |c| cpu_quota_us(c).to_string());
                    write_file(&cpu.join("cpu.cfs_quota_us"), &quota)?;
                }
                if let Some(blkio) = &g.blkio {
                    // BFQ's weight (1..=1000, default 100) where the kernel has BFQ; CFQ's
                    // (10..=1000, default 500) otherwise, as systemd converts them.
                    let bfq = blkio.join("blkio.bfq.weight");
                    if bfq.exists() {
                        best_effort_io(&bfq, &limits.io_weight.clamp(1, 1000).to_string());
                    } else {
                        let cfq = (limits.io_weight as u64 * 5).clamp(10, 1000);
                        best_effort_io(&blkio.join("blkio.weight"), &cfq.to_string());
                    }
                }
            }
        }
        self.set_cpu_weight(limits.cpu_weight)
    }

    /// The group's CPU weight (v2 scale): what it gets against its siblings when the CPU is
    /// contended. Raised and lowered while workers run (a starting worker gets the least).
    pub fn set_cpu_weight(&self, weight: u32) -> io::Result<()> {
        match &self.kind {
            Kind::V2 { dir, has } if has.cpu => write_file(
                &dir.join("cpu.weight"),
                &weight.clamp(1, 10_000).to_string(),
            ),
            Kind::V1(V1Groups { cpu: Some(cpu), .. }) => {
                write_file(&cpu.join("cpu.shares"), &cpu_shares(weight).to_string())
            }
            _ => Ok(()),
        }
    }

    /// The same (empty) group under `host`'s name, in every hierarchy, or nothing renamed
    /// at all: a hierarchy that refuses (a group of that name exists) undoes the others.
    pub fn rename_to(&self, host: &str) -> io::Result<SiteCgroup> {
        let Kind::V1(groups) = &self.kind else {
            return Err(io::Error::other("cgroup v2 does not rename groups"));
        };
        let renamed = groups.sibling(host);
        let moves: Vec<(&PathBuf, &PathBuf)> =
            groups.dirs().into_iter().zip(renamed.dirs()).collect();
        for (done, (from, to)) in moves.iter().enumerate() {
            if let Err(e) = fs::rename(from, to) {
                for (back_from, back_to) in moves[..done].iter().rev() {
                    let _ = fs::rename(back_to, back_from);
                }
                return Err(with_path(e, to));
            }
        }
        Ok(SiteCgroup {
            kind: Kind::V1(renamed),
        })
    }

    /// The `cgroup.procs` files a new worker writes its pid to.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        match &self.kind {
            Kind::V2 { dir, .. } => vec![dir.join("cgroup.procs")],
            Kind::V1(g) => g.dirs().iter().map(|d| d.join("cgroup.procs")).collect(),
        }
    }

    /// How many processes the kernel has killed in this group for exceeding its memory limit.
    pub fn oom_kills(&self) -> u64 {
        let (file, _) = match &self.kind {
            Kind::V2 { dir, .. } => (dir.join("memory.events"), ()),
            Kind::V1(g) => (g.memory.join("memory.oom_control"), ()),
        };
        parse_counter(&fs::read_to_string(file).unwrap_or_default(), "oom_kill")
    }

    /// Memory charged to the group now.
    pub fn memory_bytes(&self) -> Option<u64> {
        let file = match &self.kind {
            Kind::V2 { dir, .. } => dir.join("memory.current"),
            Kind::V1(g) => g.memory.join("memory.usage_in_bytes"),
        };
        fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// CPU time used by the group's processes, in seconds. v2 counts every process that was
    /// ever in the group (`cpu.stat`), and so does v1's `cpuacct.usage` where the cpuacct
    /// hierarchy is mounted; without it, the processes in the group now and the children they
    /// reaped (`/proc/<pid>/stat`).
    pub fn cpu_seconds(&self) -> Option<f64> {
        match &self.kind {
            Kind::V2 { dir, .. } => {
                let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
                Some(parse_counter(&stat, "usage_usec") as f64 / 1e6)
            }
            Kind::V1(V1Groups {
                cpuacct: Some(acct),
                ..
            }) => {
                let ns: u64 = fs::read_to_string(acct.join("cpuacct.usage"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                Some(ns as f64 / 1e9)
            }
            Kind::V1(V1Groups { memory, .. }) => {
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

    /// Remove the group if no process is in it; whether it is gone.
    pub fn remove_if_empty(&self) -> bool {
        let dirs = match &self.kind {
            Kind::V2 { dir, .. } => vec![dir],
            Kind::V1(g) => g.dirs(),
        };
        dirs.into_iter()
            .all(|d| fs::remove_dir(d).is_ok() || !d.exists())
    }

    /// Remove the group (the site is gone); processes still in it are killed first.
    pub fn remove(&self) {
        match &self.kind {
            Kind::V2 { dir, .. } => {
                kill_all_in(dir);
                remove_when_empty(dir)
            }
            Kind::V1(g) => {
                kill_all_in(&g.memory);
                for d in g.dirs() {
                    remove_when_empty(d);
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
    // v1 hierarchy mount points by controller.
    let mut v1: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
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
                for c in ["memory", "pids", "cpu", "cpuacct", "blkio"] {
                    if opts.contains(&c) {
                        v1.insert(c, dir.to_string());
                    }
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
    if let Some(memory) = v1.get("memory") {
        let group = |c: &str| {
            v1.get(c)
                .map(|mount| Path::new(mount).join(own_path(Some(c))).join(name))
        };
        return Cgroups::V1(V1Groups {
            memory: Path::new(memory).join(own_path(Some("memory"))).join(name),
            pids: group("pids"),
            cpu: group("cpu"),
            cpuacct: group("cpuacct"),
            blkio: group("blkio"),
        });
    }
    if let Some(root) = v2_mount {
        let controllers =
            fs::read_to_string(Path::new(&root).join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "memory") {
            let base = Path::new(&root).join(delegated_group(&own_path(None)));
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            return Cgroups::V2 {
                base,
                has: V2Controllers {
                    pids: has("pids"),
                    cpu: has("cpu"),
                    io: has("io"),
                },
            };
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
    let delegated_has = enable_controllers(delegated)?;
    let sites = delegated.join(name);
    fs::create_dir_all(&sites).map_err(|e| with_path(e, &sites))?;
    let has = enable_controllers(&sites)?;
    if !delegated_has.pids {
        warn!(cgroup = %delegated.display(), "cgroup v2 without the pids controller: no per-site process limit");
    }
    if !has.cpu {
        warn!(cgroup = %delegated.display(), "cgroup v2 without the cpu controller: no per-site cpu_limit or CPU weight");
    }
    if !has.io {
        info!(cgroup = %delegated.display(), "cgroup v2 without the io controller: io_weight is not applied");
    }
    if !delegated.join(name).join("memory.swap.max").exists() {
        info!("the kernel accounts no swap for cgroups (no memory.swap.max): memory.max alone bounds a site");
    }
    Ok(Cgroups::V2 { base: sites, has })
}

/// Hand memory, and pids, cpu and io where available, to `group`'s children. Memory is
/// required; returns which others are on. Each controller is its own write: one the parent
/// lacks fails alone.
fn enable_controllers(group: &Path) -> io::Result<V2Controllers> {
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
    let enable = |c: &str| has(c) && write_file(&control, &format!("+{c}")).is_ok();
    Ok(V2Controllers {
        pids: enable("pids"),
        cpu: enable("cpu"),
        io: enable("io"),
    })
}

/// The quota of `cores` per [`CPU_PERIOD_US`].
fn cpu_quota_us(cores: f64) -> u64 {
    ((cores * CPU_PERIOD_US as f64).round() as u64).max(MIN_CPU_QUOTA_US)
}

/// A v2 weight as v1 `cpu.shares` (default 1024 for 100; the kernel's range 2..=262144).
/// The starting weight maps to the kernel's minimum, 2.
fn cpu_shares(weight: u32) -> u64 {
    if weight <= STARTING_CPU_WEIGHT {
        return 2;
    }
    (weight as u64 * 1024 / 100).clamp(2, 262_144)
}

/// Block I/O weights are best effort: the controller may take none for this disk scheduler.
fn best_effort_io(file: &Path, value: &str) {
    if let Err(e) = fs::write(file, value) {
        warn!(file = %file.display(), error = %e, "cannot set the site's I/O weight; it runs with the default");
    }
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
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
    const V1_OWN: &str = "8:pids:/\n5:cpu,cpuacct:/\n4:memory:/process_api/abc\n0::/\n";

    #[test]
    fn v1_hierarchies_nest_under_the_agents_own_group() {
        match detect_from(V1_MOUNTS, V1_OWN, "roost-n1") {
            Cgroups::V1(g) => {
                assert_eq!(
                    g.memory,
                    PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/roost-n1")
                );
                assert_eq!(g.pids, Some(PathBuf::from("/sys/fs/cgroup/pids/roost-n1")));
                // cpu and cpuacct mounted together: one group serves both.
                assert_eq!(
                    g.cpu,
                    Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/roost-n1"))
                );
                assert_eq!(g.cpuacct, g.cpu);
                assert_eq!(g.blkio, None);
                assert_eq!(g.dirs().len(), 3);
                let site = g.join("a.example");
                assert_eq!(
                    site.cpu,
                    Some(PathBuf::from(
                        "/sys/fs/cgroup/cpu,cpuacct/roost-n1/a.example"
                    ))
                );
            }
            other => panic!("expected v1, got {other:?}"),
        }
    }

    #[test]
    fn cpu_limits_and_weights_convert_to_the_kernels_units() {
        assert_eq!(cpu_quota_us(0.5), 50_000);
        assert_eq!(cpu_quota_us(2.0), 200_000);
        assert_eq!(cpu_quota_us(0.001), MIN_CPU_QUOTA_US);
        assert_eq!(cpu_shares(100), 1024);
        assert_eq!(cpu_shares(STARTING_CPU_WEIGHT), 2);
        assert_eq!(cpu_shares(50), 512);
        assert_eq!(cpu_shares(10_000), 102_400);
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
