//! Framework zygotes: the second level of the zygote tree (issue 14; docs/first-hit.md).
//!
//! - Workers' module reports arrive on their spec channel ([`Frameworks::read_report`]) and
//!   feed the [`Learner`]; a set it promotes is queued for the builder thread.
//! - The builder, for each set: forks a *probe* from the base zygote (a throwaway root child)
//!   that imports the set's modules one by one and keeps only those with no side effect;
//!   then forks the framework zygote from the base zygote, hands it its own control and
//!   events sockets and the kept modules, and waits until it has imported them. From then
//!   on it forks workers exactly like the base zygote (`zygote.rs`).
//! - A framework zygote that dies is forgotten at once (its sites fork from the base
//!   zygote) and built again after a pause; one larger than `frameworks_max_rss_mb`, or one
//!   that cannot be built, is stopped and its set refused until the agent restarts.
//! - The sets, as probed, are kept in `<state-dir>/frameworks.json` with the fingerprint of
//!   their interpreter and package directories; at start the agent builds them again from
//!   there, before any site starts, unless the fingerprint changed.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use serde_json::json;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::{info, warn};

use super::fdpass::{recv_with_fds, send_with_fds, set_timeouts};
use super::frameworks::{
    parse_report, valid_module_name, Fingerprint, FrameworkSet, Learner, Packages, SiteUse,
    StateFile, StoredSet,
};
use super::zygote::{read_events, Asked, Zygote, Zygotes};
use crate::config::FrameworkSettings;

/// Why a module was left out of a framework zygote (the probe's reasons, and the agent's).
pub const LEFT_OUT_REASONS: [&str; 8] = [
    "import_error",
    "reads_settings",
    "starts_thread",
    "opens_socket",
    "opens_fd",
    "not_root_owned",
    "forbidden",
    "other",
];

/// How long a probe or a framework zygote may take to import a set.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(60);
/// First pause before a dead framework zygote is built again (doubling while it keeps dying).
const RESTART_AFTER: Duration = Duration::from_secs(1);
const MAX_RESTART_AFTER: Duration = Duration::from_secs(60);
/// A framework zygote that lived this long has its restart pause reset.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How often the builder checks the zygotes' memory.
const MEMORY_CHECK_EVERY: Duration = Duration::from_secs(5);

type Key = (PathBuf, Packages);

/// One live framework zygote.
pub struct FrameworkZygote {
    pub zygote: Arc<Zygote>,
    pub name: String,
    pub modules: usize,
    started: Instant,
    /// What its modules were probed against.
    fingerprint: Fingerprint,
    /// Whether the builder already handled its death.
    gone: AtomicBool,
}

/// What the metrics show of the framework zygotes.
pub struct Stats {
    /// (set name, pid, modules, RSS bytes) of each live framework zygote.
    pub zygotes: Vec<(String, i32, usize, u64)>,
    pub left_out: Vec<(&'static str, u64)>,
    pub forks_base: u64,
    pub forks_framework: u64,
    pub reports_refused: u64,
}

enum Job {
    Build(FrameworkSet),
    Died(Key, i32),
}

/// The agent's framework zygotes and what it learnt.
pub struct Frameworks {
    settings: FrameworkSettings,
    learner: Mutex<Learner>,
    live: Mutex<HashMap<Key, Arc<FrameworkZygote>>>,
    builder: Mutex<mpsc::Sender<Job>>,
    file: StateFile,
    stored: Mutex<Vec<StoredSet>>,
    /// `<state-dir>/sites`: each site's directory keeps what its last run used.
    sites_dir: PathBuf,
    left_out: [AtomicU64; LEFT_OUT_REASONS.len()],
    pub(super) forks_base: AtomicU64,
    pub(super) forks_framework: AtomicU64,
    reports_refused: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Frameworks {
    /// Start the builder thread, and queue the sets of the state file that still match
    /// their interpreter (their zygotes start as soon as the base zygote is up).
    pub(super) fn start(
        settings: FrameworkSettings,
        state_dir: &Path,
        zygotes: Weak<Zygotes>,
    ) -> io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel();
        let fw = Arc::new(Self {
            learner: Mutex::new(Learner::new(
                settings.min_sites,
                settings.max_sets,
                settings.pin.clone(),
                settings.forbid.clone(),
            )),
            settings,
            live: Mutex::new(HashMap::new()),
            builder: Mutex::new(tx.clone()),
            file: StateFile::new(state_dir),
            stored: Mutex::new(Vec::new()),
            sites_dir: state_dir.join("sites"),
            left_out: Default::default(),
            forks_base: AtomicU64::new(0),
            forks_framework: AtomicU64::new(0),
            reports_refused: AtomicU64::new(0),
        });
        if !fw.settings.enabled {
            return Ok(fw);
        }
        fw.restore_from_file(&tx);
        let builder = Builder {
            fw: Arc::downgrade(&fw),
            zygotes,
            restarts: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("roost-frameworks".into())
            .spawn(move || builder.run(rx))?;
        Ok(fw)
    }

    fn restore_from_file(&self, queue: &mpsc::Sender<Job>) {
        let stored = match self.file.load() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "ignoring the framework state file; sets will be learnt again");
                return;
            }
        };
        let mut kept = Vec::new();
        let mut learner = lock(&self.learner);
        for s in stored {
            if s.fingerprint.current() != s.fingerprint {
                info!(set = %s.set.name(), interpreter = %s.set.interpreter.display(),
                    "the interpreter or its packages changed since this framework set was learnt; discarding it");
                continue;
            }
            if learner.restore(s.set.clone()) {
                let _ = queue.send(Job::Build(s.set.clone()));
                kept.push(s);
            }
        }
        drop(learner);
        info!(
            sets = kept.len(),
            file = %self.file.path().display(),
            "framework sets restored"
        );
        *lock(&self.stored) = kept;
        self.save();
    }

    fn save(&self) {
        let stored = lock(&self.stored).clone();
        if let Err(e) = self.file.save(&stored) {
            warn!(file = %self.file.path().display(), error = %e, "cannot write the framework state file");
        }
    }

    /// The live framework zygote `host` should fork from, if any.
    pub(super) fn zygote_for(
        &self,
        host: &str,
        interpreter: &Path,
    ) -> Option<Arc<FrameworkZygote>> {
        // No framework zygote runs: nothing to choose between, and nothing to read (for a
        // never-started site, its use file is a failed open on the start's path: 36 µs).
        if !self.settings.enabled || lock(&self.live).is_empty() {
            return None;
        }
        let key = {
            let mut learner = lock(&self.learner);
            if learner.packages_of(host).is_none() {
                // Not seen since the agent started: what its site file says (one small read).
                if let Some(used) = SiteUse::load(&self.sites_dir.join(host)) {
                    learner.remember_site(host, &used.interpreter, &used.packages);
                }
            }
            let set = learner.choose(host, interpreter)?;
            (set.interpreter.clone(), set.packages.clone())
        };
        lock(&self.live)
            .get(&key)
            .filter(|z| !z.zygote.is_dead())
            .cloned()
    }

    /// A framework zygote failed a fork: forget it now (the builder restarts it).
    pub(super) fn failed(&self, fz: &FrameworkZygote) {
        let key = lock(&self.live)
            .iter()
            .find(|(_, z)| z.zygote.pid() == fz.zygote.pid())
            .map(|(k, _)| k.clone());
        if let Some(key) = key {
            let _ = lock(&self.builder).send(Job::Died(key, fz.zygote.pid()));
        }
    }

    /// Read the report a worker sends after its first response (one message, or EOF when
    /// it exits without one) and learn from it. Runs as a task for the worker's life.
    pub(super) async fn read_report(
        self: Arc<Self>,
        channel: OwnedFd,
        host: String,
        interpreter: PathBuf,
    ) {
        if !self.settings.enabled {
            return;
        }
        if nix::fcntl::fcntl(
            &channel,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .is_err()
        {
            return;
        }
        // SAFETY: the OwnedFd stays open, and the same fd, for as long as the AsyncFd lives.
        let Ok(fd) = (unsafe { AsyncFd::register_with_interest(channel, Interest::READABLE) })
        else {
            return;
        };
        let bytes = loop {
            let Ok(mut guard) = fd.readable().await else {
                return;
            };
            match guard.try_io(|inner| recv_with_fds(inner.get_ref().as_raw_fd(), 0)) {
                Ok(Ok((bytes, _))) => break bytes,
                Ok(Err(_)) => return,
                Err(_would_block) => continue,
            }
        };
        if bytes.is_empty() {
            return; // the worker exited before its first response
        }
        let report = match parse_report(&bytes) {
            Ok(r) => r,
            Err(e) => {
                self.reports_refused.fetch_add(1, Ordering::Relaxed);
                warn!(site = %host, error = %e, "refused a worker's module report");
                return;
            }
        };
        let (promoted, changed) = {
            let mut learner = lock(&self.learner);
            let before = learner
                .packages_of(&host)
                .map(|(i, p)| (i.to_path_buf(), p.clone()));
            let promoted = learner.observe(&host, &interpreter, &report);
            let after = learner
                .packages_of(&host)
                .map(|(i, p)| (i.to_path_buf(), p.clone()));
            (promoted, (before != after).then_some(after))
        };
        if let Some(after) = changed {
            let dir = self.sites_dir.join(&host);
            let written = match after {
                Some((interpreter, packages)) => SiteUse {
                    interpreter,
                    packages,
                }
                .save(&dir),
                None => std::fs::remove_file(dir.join("framework")).or_else(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                }),
            };
            if let Err(e) = written {
                warn!(site = %host, error = %e, "cannot record what the site's worker imported");
            }
        }
        for set in promoted {
            info!(set = %set.name(), modules = set.modules.len(), interpreter = %interpreter.display(),
                "sites share a framework; building its zygote");
            let _ = lock(&self.builder).send(Job::Build(set));
        }
    }

    fn count_left_out(&self, reason: &str) {
        let i = LEFT_OUT_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(LEFT_OUT_REASONS.len() - 1);
        self.left_out[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> Stats {
        let zygotes = lock(&self.live)
            .values()
            .filter(|z| !z.zygote.is_dead())
            .map(|z| {
                let rss = rss_bytes(z.zygote.pid()).unwrap_or(0);
                (z.name.clone(), z.zygote.pid(), z.modules, rss)
            })
            .collect();
        Stats {
            zygotes,
            left_out: LEFT_OUT_REASONS
                .iter()
                .zip(&self.left_out)
                .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
                .collect(),
            forks_base: self.forks_base.load(Ordering::Relaxed),
            forks_framework: self.forks_framework.load(Ordering::Relaxed),
            reports_refused: self.reports_refused.load(Ordering::Relaxed),
        }
    }
}

/// A process's resident set, from `/proc/<pid>/status`.
fn rss_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The builder thread: probes and starts framework zygotes, restarts dead ones, watches
/// their memory.
struct Builder {
    fw: Weak<Frameworks>,
    zygotes: Weak<Zygotes>,
    /// Sets to build again (when; None: not scheduled) and the last pause, which doubles
    /// while a zygote keeps dying young.
    restarts: HashMap<Key, (Option<Instant>, Duration)>,
}

impl Builder {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        let mut last_memory_check = Instant::now();
        loop {
            match jobs.recv_timeout(Duration::from_millis(250)) {
                Ok(Job::Build(set)) => self.build(set),
                Ok(Job::Died(key, pid)) => self.died(key, pid),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let due: Vec<Key> = self
                .restarts
                .iter()
                .filter(|(_, (at, _))| at.is_some_and(|at| at <= Instant::now()))
                .map(|(k, _)| k.clone())
                .collect();
            for key in due {
                let Some(fw) = self.fw.upgrade() else { return };
                let set = lock(&fw.learner)
                    .sets()
                    .iter()
                    .find(|s| s.interpreter == key.0 && s.packages == key.1)
                    .cloned();
                match set {
                    Some(set) => self.build(set),
                    None => {
                        self.restarts.remove(&key); // refused or discarded meanwhile
                    }
                }
            }
            if last_memory_check.elapsed() >= MEMORY_CHECK_EVERY {
                last_memory_check = Instant::now();
                self.check_live();
            }
        }
    }

    fn died(&mut self, key: Key, pid: i32) {
        let Some(fw) = self.fw.upgrade() else { return };
        let mut live = lock(&fw.live);
        let Some(z) = live.get(&key).filter(|z| z.zygote.pid() == pid).cloned() else {
            return;
        };
        if z.gone.swap(true, Ordering::AcqRel) {
            return;
        }
        live.remove(&key);
        drop(live);
        z.zygote.mark_dead();
        let pause = match self.restarts.get(&key) {
            Some((_, p)) if z.started.elapsed() < STABLE_AFTER => (*p * 2).min(MAX_RESTART_AFTER),
            _ => RESTART_AFTER,
        };
        warn!(set = %z.name, pid, restart_in_ms = pause.as_millis() as u64,
            "framework zygote exited; its sites fork from the base zygote until it is back");
        self.restarts
            .insert(key, (Some(Instant::now() + pause), pause));
    }

    /// Each live framework zygote: over its memory limit, it is stopped and its set refused;
    /// with its interpreter or packages changed, stopped and its set forgotten (to be learnt
    /// again against the new packages).
    fn check_live(&mut self) {
        let Some(fw) = self.fw.upgrade() else { return };
        let live: Vec<(Key, Arc<FrameworkZygote>)> = lock(&fw.live)
            .iter()
            .map(|(k, z)| (k.clone(), z.clone()))
            .collect();
        for (key, z) in live {
            if z.fingerprint.current() != z.fingerprint {
                info!(set = %z.name, pid = z.zygote.pid(),
                    "the interpreter or its packages changed; stopping the framework zygote, to learn the set again");
                lock(&fw.live).remove(&key);
                z.gone.store(true, Ordering::Release);
                z.zygote.kill();
                lock(&fw.learner).discard(&key.0, &key.1);
                lock(&fw.stored)
                    .retain(|s| !(s.set.interpreter == key.0 && s.set.packages == key.1));
                fw.save();
                self.restarts.remove(&key);
                continue;
            }
            let Some(rss) = rss_bytes(z.zygote.pid()) else {
                continue;
            };
            if rss > fw.settings.max_rss_bytes {
                warn!(set = %z.name, pid = z.zygote.pid(), rss_bytes = rss, limit_bytes = fw.settings.max_rss_bytes,
                    "framework zygote is over frameworks_max_rss_mb; stopping it and refusing its set");
                self.refuse(&fw, &key);
                lock(&fw.live).remove(&key);
                z.gone.store(true, Ordering::Release);
                z.zygote.kill();
            }
        }
    }

    fn refuse(&mut self, fw: &Frameworks, key: &Key) {
        lock(&fw.learner).refuse(&key.0, &key.1);
        lock(&fw.stored).retain(|s| !(s.set.interpreter == key.0 && s.set.packages == key.1));
        fw.save();
        self.restarts.remove(key);
    }

    fn build(&mut self, set: FrameworkSet) {
        let Some(fw) = self.fw.upgrade() else { return };
        let Some(zygotes) = self.zygotes.upgrade() else {
            return;
        };
        let key = (set.interpreter.clone(), set.packages.clone());
        if lock(&fw.live).contains_key(&key) {
            return;
        }
        let name = set.name();
        let started = Instant::now();
        match self.try_build(&fw, &zygotes, &set) {
            Ok((z, kept, fingerprint)) => {
                let modules = kept.len();
                info!(set = %name, pid = z.pid(), modules, ms = started.elapsed().as_millis() as u64,
                    "framework zygote ready");
                let fz = Arc::new(FrameworkZygote {
                    zygote: z,
                    name,
                    modules,
                    fingerprint: fingerprint.clone(),
                    started: Instant::now(),
                    gone: AtomicBool::new(false),
                });
                lock(&fw.live).insert(key.clone(), fz);
                if let Some((at, _)) = self.restarts.get_mut(&key) {
                    *at = None;
                }
                let stored = StoredSet {
                    set: FrameworkSet {
                        modules: kept,
                        ..set
                    },
                    fingerprint,
                };
                let mut all = lock(&fw.stored);
                all.retain(|s| !(s.set.interpreter == key.0 && s.set.packages == key.1));
                all.push(stored);
                drop(all);
                fw.save();
            }
            Err(BuildError::Retry(e))
                if self
                    .restarts
                    .get(&key)
                    .is_some_and(|(_, p)| *p >= MAX_RESTART_AFTER) =>
            {
                warn!(set = %name, error = %e, "cannot build this framework zygote after retrying for minutes; its sites fork from the base zygote");
                self.refuse(&fw, &key);
            }
            Err(BuildError::Retry(e)) => {
                let pause = self
                    .restarts
                    .get(&key)
                    .map(|(_, p)| (*p * 2).min(MAX_RESTART_AFTER))
                    .unwrap_or(RESTART_AFTER);
                warn!(set = %name, error = %e, retry_in_ms = pause.as_millis() as u64, "cannot build a framework zygote yet");
                self.restarts
                    .insert(key, (Some(Instant::now() + pause), pause));
            }
            Err(BuildError::Refuse(e)) => {
                warn!(set = %name, error = %e, "cannot build this framework zygote; its sites fork from the base zygote");
                self.refuse(&fw, &key);
            }
        }
    }

    fn try_build(
        &self,
        fw: &Arc<Frameworks>,
        zygotes: &Arc<Zygotes>,
        set: &FrameworkSet,
    ) -> Result<(Arc<Zygote>, Vec<String>, Fingerprint), BuildError> {
        let base = zygotes.base(&set.interpreter).map_err(BuildError::Retry)?;
        // The operator's forbids, as configured now (a stored set predates them).
        let (modules, forbidden) = lock(&fw.learner).without_forbidden(&set.modules);
        for m in forbidden {
            fw.count_left_out("forbidden");
            info!(set = %set.name(), module = %m, reason = "forbidden", "module left out of the framework zygote (frameworks_forbid)");
        }
        // 1. The probe: which of the modules a root zygote may hold.
        let (probe, probe_pid) = fork_child(&base, "probe")
            .map_err(|e| BuildError::Retry(format!("forking a probe: {e}")))?;
        let reply = exchange(&probe, json!({"modules": modules}), &[]).map_err(|e| {
            kill(probe_pid); // a module that hangs on import must not keep it
            BuildError::Retry(format!("probe: {e}"))
        })?;
        let kept = names(&reply["kept"])
            .ok_or_else(|| BuildError::Refuse("the probe's answer has no module list".into()))?;
        let paths: Vec<PathBuf> = reply["paths"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str())
                    .map(PathBuf::from)
                    .filter(|p| p.is_absolute())
                    .take(64)
                    .collect()
            })
            .unwrap_or_default();
        for item in reply["left_out"]
            .as_array()
            .into_iter()
            .flatten()
            .take(10_000)
        {
            let module = item["module"].as_str().unwrap_or("?");
            let reason = item["reason"].as_str().unwrap_or("other");
            let reason = LEFT_OUT_REASONS
                .iter()
                .find(|r| **r == reason)
                .copied()
                .unwrap_or("other");
            fw.count_left_out(reason);
            info!(set = %set.name(), module, reason, detail = item["detail"].as_str().unwrap_or(""),
                "module left out of the framework zygote");
        }
        if kept.is_empty() {
            return Err(BuildError::Refuse(
                "no module of the set passed the probe".into(),
            ));
        }
        // 2. The framework zygote, with its own control and events sockets.
        let fingerprint = Fingerprint::of(&set.interpreter, &paths);
        let (control, control_theirs) =
            seqpacket().map_err(|e| BuildError::Retry(e.to_string()))?;
        let (events, events_theirs) = seqpacket().map_err(|e| BuildError::Retry(e.to_string()))?;
        set_timeouts(control.as_raw_fd(), super::zygote::FORK_TIMEOUT)
            .map_err(|e| BuildError::Retry(e.to_string()))?;
        let (chan, pid) = fork_child(&base, "framework")
            .map_err(|e| BuildError::Retry(format!("forking the framework zygote: {e}")))?;
        let reply = exchange(
            &chan,
            json!({"modules": kept, "packages": set.packages}),
            &[control_theirs.as_raw_fd(), events_theirs.as_raw_fd()],
        );
        drop(control_theirs);
        drop(events_theirs);
        let reply = reply.map_err(|e| {
            kill(pid);
            BuildError::Retry(format!("framework zygote: {e}"))
        })?;
        if reply["ready"] != json!(true) {
            kill(pid);
            return Err(BuildError::Refuse(format!(
                "the framework zygote refused: {}",
                reply["error"].as_str().unwrap_or("no reason given")
            )));
        }
        let z = Arc::new(Zygote::new(set.interpreter.clone(), pid, control));
        let key = (set.interpreter.clone(), set.packages.clone());
        let exits = zygotes.exit_board();
        let fw_weak = Arc::downgrade(fw);
        let z_weak = Arc::downgrade(&z);
        std::thread::Builder::new()
            .name("roost-fw-zygote-ev".into())
            .spawn(move || {
                read_events(events, exits, z_weak);
                // EOF: the framework zygote is gone.
                if let Some(fw) = fw_weak.upgrade() {
                    let _ = lock(&fw.builder).send(Job::Died(key, pid));
                }
            })
            .map_err(|e| {
                kill(pid);
                BuildError::Retry(e.to_string())
            })?;
        Ok((z, kept, fingerprint))
    }
}

enum BuildError {
    /// Try again later (the base zygote is restarting, a timeout).
    Retry(String),
    /// The set can't have a zygote (nothing passed the probe, it refused).
    Refuse(String),
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn seqpacket() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// A channel to a probe or framework zygote: ours, with a timeout, and theirs.
/// A child of `base` that becomes a `role` ("probe", "framework"): the agent's end of its
/// channel, bounded by the import timeout, and its pid.
fn fork_child(base: &Arc<Zygote>, role: &str) -> io::Result<(OwnedFd, i32)> {
    let asked = Asked::new(base, role)?;
    let pid = asked.answer()?.pid;
    set_timeouts(asked.ours.as_raw_fd(), IMPORT_TIMEOUT)?;
    Ok((asked.ours, pid))
}

/// Send one request on `chan` and read the one answer.
fn exchange(
    chan: &OwnedFd,
    request: serde_json::Value,
    fds: &[i32],
) -> io::Result<serde_json::Value> {
    send_with_fds(chan.as_raw_fd(), request.to_string().as_bytes(), fds)?;
    let (bytes, _) = recv_with_fds(chan.as_raw_fd(), 0)?;
    if bytes.is_empty() {
        return Err(io::Error::other(
            "it exited without an answer (see the agent's log)",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| io::Error::other(format!("bad answer: {e}")))
}

/// A JSON list of valid module names, or None.
fn names(v: &serde_json::Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|m| {
            m.as_str()
                .filter(|m| valid_module_name(m))
                .map(String::from)
        })
        .collect()
}
