//! The per-site worker lifecycle (DESIGN.md, "Per-site worker lifecycle").
//!
//! Each site known to this node has a [`Slot`]: its spec, its socket (bound on first use and
//! kept), its cgroup, the current worker if one runs, the workers still stopping, and the
//! requests in flight. A request takes a [`Ticket`] (starting a worker if none is current)
//! and gives it back when done. Because all workers of a site share the agent-owned socket,
//! a request that arrives while a worker stops is served by the next one: nothing is refused
//! for being unlucky in its timing.
//!
//! ```text
//! idle ──request──▶ starting ──first response──▶ ready ──idle_timeout──▶ draining ──exit──▶ idle
//!                      │ no answer in start_timeout / exits      └─ crash ─▶ idle (+ backoff)
//!                      └────────────▶ failed: waiting requests get 503 at once, backoff
//! ```

mod slot;
mod watchdog;

pub use slot::{AcquireError, SiteStatus, StopReason, Ticket};
use slot::{Running, Slot, SlotState};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use roost_proto::{Informer, SiteSpec};
use tokio::runtime::Handle;
use tracing::{info, warn};

use crate::cgroup::Cgroups;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::sitelog;
use crate::socket::{ensure_dir, SiteSocket};
use crate::users::SiteUser;
use crate::worker;

const MIB: u64 = 1024 * 1024;

/// All sites of this node.
pub struct Supervisor {
    /// Swapped whole on SIGHUP: limits and timeouts are read per use, never cached.
    cfg: ArcSwap<Config>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    metrics: Arc<Metrics>,
    /// The control runtime: worker reapers and timers live here, not on request threads.
    runtime: Handle,
    cgroups: Cgroups,
    /// Current workers (not counting stopping ones), for the node's worker limit.
    running: AtomicUsize,
}

impl Supervisor {
    pub fn new(
        cfg: Arc<Config>,
        metrics: Arc<Metrics>,
        runtime: Handle,
    ) -> std::io::Result<Arc<Self>> {
        ensure_dir(&cfg.state_dir, 0o755)?;
        ensure_dir(&cfg.state_dir.join("sites"), 0o711)?;
        ensure_dir(&cfg.state_dir.join("logs"), 0o750)?;
        let cgroups = if cfg.cgroups {
            Cgroups::detect(&cfg.cgroup_name())
        } else {
            Cgroups::Unavailable
        };
        let leftovers = cgroups.clean_leftovers();
        if leftovers > 0 {
            warn!(
                killed = leftovers,
                "killed workers left behind by a previous agent"
            );
        }
        info!(limits = cgroups.describe(), max_workers = cfg.max_workers, memory_budget_mb = ?cfg.memory_budget_mb,
            "supervisor ready");
        Ok(Arc::new(Self {
            cfg: ArcSwap::new(cfg),
            slots: Mutex::new(HashMap::new()),
            metrics,
            runtime,
            cgroups,
            running: AtomicUsize::new(0),
        }))
    }

    fn cfg(&self) -> Arc<Config> {
        self.cfg.load_full()
    }

    /// Apply re-read settings (SIGHUP). Node identity, addresses and the state directory
    /// are fixed for the process's life; the caller keeps those from the running config.
    pub fn reconfigure(&self, cfg: Arc<Config>) {
        info!(max_workers = cfg.max_workers, memory_budget_mb = ?cfg.memory_budget_mb,
            start_timeout = ?cfg.start_timeout, "settings reloaded");
        self.cfg.store(cfg);
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn all_slots(&self) -> Vec<Arc<Slot>> {
        self.slots().values().cloned().collect()
    }

    /// Claim a worker for one request to `host`, starting one if none is current.
    pub fn acquire(
        self: &Arc<Self>,
        host: &str,
        spec: &Arc<SiteSpec>,
    ) -> Result<Ticket, AcquireError> {
        let slot = self
            .slots()
            .entry(host.to_string())
            .or_insert_with(|| Arc::new(Slot::new(host, spec.clone())))
            .clone();
        {
            let mut st = slot.lock();
            if st.removed {
                return Err(AcquireError::Removed);
            }
            if let Some(cur) = &st.current {
                if !cur.answered && st.in_flight >= self.cfg().start_queue_limit {
                    self.metrics
                        .rejected
                        .with_label_values(&["start_queue_full"])
                        .inc();
                    return Err(AcquireError::StartQueueFull {
                        waiting: st.in_flight,
                    });
                }
                return Ok(self.ticket(&slot, &mut st));
            }
            check_backoff(&st)?;
        }
        // Making room may stop other sites' workers: never while holding this slot's lock.
        self.make_room(host)?;
        let mut st = slot.lock();
        if st.removed {
            return Err(AcquireError::Removed);
        }
        if st.current.is_none() {
            check_backoff(&st)?;
            self.start_worker(&slot, &mut st)?;
        }
        Ok(self.ticket(&slot, &mut st))
    }

    fn ticket(&self, slot: &Arc<Slot>, st: &mut SlotState) -> Ticket {
        st.in_flight += 1;
        st.last_active = Instant::now();
        Ticket {
            slot: slot.clone(),
            socket_path: st
                .socket
                .as_ref()
                .map(|s| s.path.clone())
                .unwrap_or_default(),
            generation: st.current.as_ref().map_or(0, |c| c.generation),
            request_timeout: Duration::from_secs(st.spec.request_timeout),
            issued: Instant::now(),
        }
    }

    /// Enforce the node's limits before a start: stop least recently used idle workers of
    /// other sites while the node is full; fail when none can be stopped.
    fn make_room(self: &Arc<Self>, except: &str) -> Result<(), AcquireError> {
        let mut evicted_for_memory = false;
        let cfg = self.cfg();
        loop {
            let full = self.running.load(Ordering::Acquire) >= cfg.max_workers;
            let over_memory = !evicted_for_memory
                && cfg
                    .memory_budget_mb
                    .is_some_and(|budget| self.memory_in_use() >= budget * MIB);
            if !full && !over_memory {
                return Ok(());
            }
            let victim = self
                .all_slots()
                .into_iter()
                .filter(|s| s.host != except)
                .filter_map(|s| {
                    let st = s.lock();
                    (st.current.is_some() && st.in_flight == 0).then(|| (st.last_active, s.clone()))
                })
                .min_by_key(|(last, _)| *last);
            let Some((_, victim)) = victim else {
                self.metrics
                    .rejected
                    .with_label_values(&["at_capacity"])
                    .inc();
                warn!(site = %except, running = self.running.load(Ordering::Relaxed), "node full: no idle worker to stop");
                return Err(AcquireError::AtCapacity);
            };
            let mut st = victim.lock();
            if st.current.is_some() && st.in_flight == 0 {
                self.stop_current(&victim, &mut st, StopReason::Evicted);
                // Memory comes back only once the victim has exited: one eviction per start.
                evicted_for_memory |= over_memory;
            }
        }
    }

    /// Bytes charged to the site cgroups of this node.
    fn memory_in_use(&self) -> u64 {
        self.all_slots()
            .iter()
            .filter_map(|s| s.lock().cgroup.as_ref().and_then(|c| c.memory_bytes()))
            .sum()
    }

    fn start_worker(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        st: &mut SlotState,
    ) -> Result<(), AcquireError> {
        let spec = st.spec.clone();
        let user = SiteUser::lookup(&spec.user)?;
        if !st.socket.as_ref().is_some_and(|s| s.uid == user.uid) {
            let socket = SiteSocket::create(&self.cfg().state_dir, &slot.host, user.uid, user.gid)
                .map_err(AcquireError::Socket)?;
            st.socket = Some(socket);
        }
        let procs = self.prepare_cgroup(slot, st);
        let socket = st.socket.as_ref().expect("socket was just ensured");
        let log = sitelog::open_for_worker(&self.cfg().state_dir, &slot.host)
            .map_err(AcquireError::Spawn)?;
        // Register the child with the control runtime's reaper, whatever thread we are on.
        let _enter = self.runtime.enter();
        let grace = self.cfg().stop_grace.as_secs().max(1);
        let proc = worker::spawn(&worker::Launch {
            spec: &spec,
            host: &slot.host,
            user: &user,
            socket,
            log,
            grace_secs: grace,
            cgroup_procs: &procs,
        })
        .map_err(AcquireError::Spawn)?;
        let pid = proc.pid();
        let generation = st.next_generation;
        st.next_generation += 1;
        st.current = Some(Running {
            pid,
            generation,
            started: Instant::now(),
            answered: false,
        });
        self.running.fetch_add(1, Ordering::AcqRel);
        self.metrics.worker_starts.inc();
        self.metrics.workers.inc();
        info!(site = %slot.host, pid, user = %user.name, uid = user.uid.as_raw(), generation, "worker started");

        let this = self.clone();
        let exited = slot.clone();
        self.runtime.spawn(async move {
            let status = proc.wait().await;
            this.on_exit(&exited, generation, pid, status);
        });
        let this = self.clone();
        let watched = slot.clone();
        let start_timeout = self.cfg().start_timeout;
        self.runtime.spawn(async move {
            tokio::time::sleep(start_timeout).await;
            this.check_started(&watched, generation);
        });
        Ok(())
    }

    /// The site's cgroup with the spec's limits applied; the files a new worker joins.
    /// A cgroup that can't be set up is logged and the worker runs without it.
    fn prepare_cgroup(&self, slot: &Slot, st: &mut SlotState) -> Vec<std::path::PathBuf> {
        // Created (again) at every start: cheap, and it heals a group someone removed.
        let cg = match self.cgroups.site(&slot.host) {
            Ok(Some(cg)) => cg,
            Ok(None) => return Vec::new(),
            Err(e) => {
                self.metrics.limit_failures.inc();
                tracing::error!(site = %slot.host, error = %e, "cannot create the site's cgroup; starting without kernel limits");
                return Vec::new();
            }
        };
        if st.cgroup.is_none() {
            st.oom_seen = cg.oom_kills();
        }
        let memory = st.spec.memory_limit_mb.map(|mb| mb * MIB);
        if let Err(e) = cg.set_limits(memory, Some(self.cfg().pids_max)) {
            self.metrics.limit_failures.inc();
            tracing::error!(site = %slot.host, error = %e, "cannot set the site's limits; starting without kernel limits");
            return Vec::new();
        }
        let files = cg.procs_files();
        st.cgroup = Some(cg);
        files
    }

    /// A worker that has not answered its first request within the start timeout has failed
    /// to start: kill it and answer the waiting requests now, with backoff for the next try.
    fn check_started(&self, slot: &Arc<Slot>, generation: u64) {
        let mut st = slot.lock();
        let stuck = st
            .current
            .as_ref()
            .is_some_and(|c| c.generation == generation && !c.answered)
            && st.in_flight > 0;
        if !stuck {
            return;
        }
        let secs = self.cfg().start_timeout.as_secs();
        self.metrics.start_timeouts.inc();
        let pid = st.current.as_ref().map_or(0, |c| c.pid);
        warn!(site = %slot.host, pid, waiting = st.in_flight, timeout_secs = secs, "worker did not answer in time; killing it");
        self.fail_start(
            &mut st,
            format!("the worker did not answer within {secs} s of starting"),
        );
        self.stop_current(slot, &mut st, StopReason::StartTimeout);
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
    }

    /// Record a failed start: back off, and reset the requests waiting in the socket backlog
    /// (closing the agent's end of the socket) so they answer 503 now, not at their timeout.
    fn fail_start(&self, st: &mut SlotState, why: String) {
        st.failures += 1;
        st.retry_at = (st.failures > 1).then(|| {
            let exp = Duration::from_secs(1 << (st.failures - 2).min(10));
            Instant::now() + exp.min(self.cfg().max_crash_backoff)
        });
        st.last_failure = Some((Instant::now(), why));
        if st.in_flight > 0 {
            st.socket = None;
        }
    }

    fn take_current(&self, st: &mut SlotState) -> Option<Running> {
        let cur = st.current.take();
        if cur.is_some() {
            self.running.fetch_sub(1, Ordering::AcqRel);
        }
        cur
    }

    fn on_exit(self: &Arc<Self>, slot: &Arc<Slot>, generation: u64, pid: i32, status: String) {
        // Reap whatever the worker left in its process group (e.g. gunicorn's children).
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        self.metrics.workers.dec();
        let mut st = slot.lock();
        let was_stopping = st.stopping.contains(&pid);
        st.stopping.retain(|p| *p != pid);
        let oom = self.refresh_oom(slot, &mut st);
        if st
            .current
            .as_ref()
            .is_some_and(|c| c.generation == generation)
        {
            let cur = self
                .take_current(&mut st)
                .expect("current was just checked");
            self.metrics.worker_crashes.inc();
            let log = sitelog::path(&self.cfg().state_dir, &slot.host);
            let tail = sitelog::tail(&log, 20).unwrap_or_default();
            let why = if oom {
                format!(
                    "killed for exceeding its memory limit of {} MiB",
                    st.spec.memory_limit_mb.unwrap_or(0)
                )
            } else {
                // The Python exception says more than gunicorn's closing "failed to boot".
                let last = tail
                    .lines()
                    .rev()
                    .find(|l| l.contains("Error:") || l.contains("Exception:"))
                    .or_else(|| tail.lines().last())
                    .unwrap_or("no output")
                    .trim();
                format!("worker exited ({status}): {last}")
            };
            warn!(site = %slot.host, pid, %status, lived_ms = cur.started.elapsed().as_millis() as u64,
                answered = cur.answered, in_flight = st.in_flight, log = %log.display(), output = %tail,
                reason = %why, "worker exited unexpectedly");
            if cur.answered {
                // A worker that served requests and then died is not a start failure. The
                // requests it had accepted are lost with it; those still waiting in the
                // socket's backlog are served by a new worker, started now.
                st.last_failure = Some((Instant::now(), why));
                if st.in_flight > 0 && !st.removed {
                    if let Err(e) = self.start_worker(slot, &mut st) {
                        warn!(site = %slot.host, error = %e, "cannot restart the crashed worker");
                        st.socket = None;
                    }
                }
            } else {
                self.fail_start(&mut st, why);
            }
        } else if was_stopping {
            info!(site = %slot.host, pid, %status, "worker stopped");
        }
        if st.removed && st.current.is_none() && st.stopping.is_empty() {
            if let Some(cg) = st.cgroup.take() {
                std::thread::spawn(move || cg.remove());
            }
        }
    }

    /// Has the kernel OOM-killed something in the site's cgroup since we last looked?
    fn refresh_oom(&self, slot: &Slot, st: &mut SlotState) -> bool {
        let Some(kills) = st.cgroup.as_ref().map(|c| c.oom_kills()) else {
            return false;
        };
        if kills <= st.oom_seen {
            return false;
        }
        let new = kills - st.oom_seen;
        st.oom_seen = kills;
        st.last_oom = Some(Instant::now());
        self.metrics.oom_kills.inc_by(new);
        warn!(site = %slot.host, kills = new, limit_mb = ?st.spec.memory_limit_mb,
            "the kernel killed a worker process for exceeding the site's memory limit");
        true
    }

    /// Why a request to this ticket's worker failed, if the supervisor knows: the worker
    /// died, or a process of it was killed for memory, after the request was sent.
    pub fn failure_reason(&self, ticket: &Ticket) -> Option<String> {
        {
            let mut st = ticket.slot.lock();
            self.refresh_oom(&ticket.slot, &mut st);
            if st.last_oom.is_some_and(|at| at >= ticket.issued) {
                return Some(format!(
                    "exceeded its memory limit of {} MiB",
                    st.spec.memory_limit_mb.unwrap_or(0)
                ));
            }
        }
        ticket.failure_since_issued()
    }

    /// Is the worker this ticket was issued for still the current one, and alive? A request
    /// that failed on a worker that is gone must not be retried: the retry could be what
    /// kills the next worker too (a request that crashes its worker).
    pub fn worker_alive(&self, ticket: &Ticket) -> bool {
        let st = ticket.slot.lock();
        match &st.current {
            Some(c) if c.generation == ticket.generation => {
                // Gone from /proc, or a zombie/dead task: not alive.
                std::fs::read_to_string(format!("/proc/{}/stat", c.pid))
                    .ok()
                    .and_then(|s| {
                        s.rfind(')')
                            .and_then(|i| s[i + 1..].trim_start().chars().next())
                    })
                    .is_some_and(|state| state != 'Z' && state != 'X')
            }
            _ => false,
        }
    }

    /// Move the current worker to `stopping` and ask it to finish (SIGTERM), with SIGKILL
    /// of its whole process group after the grace period.
    fn stop_current(&self, slot: &Arc<Slot>, st: &mut SlotState, reason: StopReason) {
        let Some(running) = self.take_current(st) else {
            return;
        };
        let pid = running.pid;
        st.stopping.push(pid);
        self.metrics
            .worker_stops
            .with_label_values(&[reason.as_str()])
            .inc();
        info!(site = %slot.host, pid, reason = reason.as_str(), "stopping worker");
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let grace = self.cfg().stop_grace;
        let slot = slot.clone();
        self.runtime.spawn(async move {
            tokio::time::sleep(grace).await;
            if slot.lock().stopping.contains(&pid) {
                warn!(site = %slot.host, pid, "worker did not stop within the grace period; killing it");
                let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            }
        });
    }

    /// Start a new worker, then drain the current one. Used for spec changes and to recycle
    /// a worker stuck in a request. If the new one can't start, the old one keeps serving.
    fn replace_current(self: &Arc<Self>, slot: &Arc<Slot>, st: &mut SlotState, reason: StopReason) {
        // Raw take: `old` still counts as running until stop_current retires it.
        let Some(old) = st.current.take() else { return };
        match self.start_worker(slot, st) {
            Ok(()) => {
                let new = st.current.replace(old);
                self.stop_current(slot, st, reason);
                st.current = new;
            }
            Err(e) => {
                warn!(site = %slot.host, error = %e, "replacement worker failed to start; keeping the old one");
                st.current = Some(old);
            }
        }
    }

    /// A request ran past the site's timeout: its worker may be stuck, so replace it. The
    /// new worker takes new requests at once; the old one finishes what it can.
    pub fn recycle(self: &Arc<Self>, ticket: &Ticket) {
        let slot = ticket.slot.clone();
        let mut st = slot.lock();
        if st
            .current
            .as_ref()
            .is_some_and(|c| c.generation == ticket.generation)
            && !st.removed
        {
            warn!(site = %slot.host, "a request timed out; recycling the worker");
            self.replace_current(&slot, &mut st, StopReason::Recycled);
        }
    }

    /// Periodic work: stop idle workers, enforce the RSS watchdog where there are no
    /// cgroups, notice OOM kills, cap log files.
    pub fn housekeeping(self: &Arc<Self>, check_memory: bool) {
        let slots = self.all_slots();
        for slot in &slots {
            let mut st = slot.lock();
            let idle_for = Duration::from_secs(st.spec.idle_timeout);
            if st.current.is_some() && st.in_flight == 0 && st.last_active.elapsed() >= idle_for {
                self.stop_current(slot, &mut st, StopReason::Idle);
            }
            if check_memory && st.current.is_some() {
                self.refresh_oom(slot, &mut st);
                let log = sitelog::path(&self.cfg().state_dir, &slot.host);
                if let Ok(true) = sitelog::rotate_if_large(&log, self.cfg().log_max_bytes) {
                    info!(site = %slot.host, log = %log.display(), "site log rotated");
                }
            }
        }
        if check_memory && matches!(self.cgroups, Cgroups::Unavailable) {
            self.rss_watchdog(&slots);
        }
    }

    fn rss_watchdog(self: &Arc<Self>, slots: &[Arc<Slot>]) {
        let limited: Vec<(Arc<Slot>, i32, u64)> = slots
            .iter()
            .filter_map(|s| {
                let st = s.lock();
                let limit = st.spec.memory_limit_mb? * MIB;
                st.current.as_ref().map(|c| (s.clone(), c.pid, limit))
            })
            .collect();
        if limited.is_empty() {
            return;
        }
        let rss = watchdog::group_rss(&limited.iter().map(|(_, pid, _)| *pid).collect::<Vec<_>>());
        for (slot, pid, limit) in limited {
            let used = rss.get(&pid).copied().unwrap_or(0);
            if used > limit {
                let mut st = slot.lock();
                if st.current.as_ref().is_some_and(|c| c.pid == pid) {
                    warn!(site = %slot.host, pid, rss_mb = used / MIB, limit_mb = limit / MIB,
                        "worker exceeds its memory limit (RSS watchdog); killing it");
                    self.metrics.oom_kills.inc();
                    st.last_oom = Some(Instant::now());
                    self.stop_current(&slot, &mut st, StopReason::MemoryLimit);
                    let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                }
            }
        }
    }

    /// Bring the slots in line with the sites in etcd: stop and forget removed sites, replace
    /// workers whose spec changed (new worker first, then the old one drains).
    pub fn reconcile(self: &Arc<Self>, sites: &BTreeMap<String, Arc<SiteSpec>>) {
        let slots: Vec<(String, Arc<Slot>)> = self
            .slots()
            .iter()
            .map(|(h, s)| (h.clone(), s.clone()))
            .collect();
        for (host, slot) in slots {
            let mut st = slot.lock();
            match sites.get(&host) {
                None => {
                    st.removed = true;
                    self.stop_current(&slot, &mut st, StopReason::Removed);
                    if let Some(socket) = st.socket.take() {
                        socket.remove();
                    }
                    if st.stopping.is_empty() {
                        if let Some(cg) = st.cgroup.take() {
                            std::thread::spawn(move || cg.remove());
                        }
                    }
                    drop(st);
                    self.slots().remove(&host);
                    info!(site = %host, "site removed from this node");
                }
                Some(spec) if **spec != *st.spec => {
                    st.spec = spec.clone();
                    // Crash-loop state belonged to the old spec.
                    st.failures = 0;
                    st.retry_at = None;
                    self.replace_current(&slot, &mut st, StopReason::Replaced);
                    info!(site = %host, "site spec changed");
                }
                Some(_) => {}
            }
        }
    }

    /// Stop every worker (agent shutdown) and wait until they are gone or the grace ends.
    pub async fn shutdown(self: &Arc<Self>) {
        let slots = self.all_slots();
        for slot in &slots {
            let mut st = slot.lock();
            st.removed = true;
            self.stop_current(slot, &mut st, StopReason::Shutdown);
        }
        let deadline = Instant::now() + self.cfg().stop_grace + Duration::from_secs(1);
        while Instant::now() < deadline {
            if slots.iter().all(|s| s.lock().stopping.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cgroups = self.cgroups.clone();
        let _ = tokio::task::spawn_blocking(move || cgroups.remove_all()).await;
    }

    /// Requests in flight on this node.
    pub fn in_flight(&self) -> u32 {
        self.all_slots().iter().map(|s| s.lock().in_flight).sum()
    }

    pub fn status(&self) -> Vec<SiteStatus> {
        let mut out: Vec<SiteStatus> = self
            .all_slots()
            .iter()
            .map(|slot| {
                let st = slot.lock();
                let state = match (&st.current, st.stopping.is_empty()) {
                    (Some(c), _) if c.answered => "ready",
                    (Some(_), _) => "starting",
                    (None, false) => "draining",
                    (None, true) => "idle",
                };
                SiteStatus {
                    host: slot.host.clone(),
                    user: st.spec.user.clone(),
                    state,
                    pid: st.current.as_ref().map(|c| c.pid),
                    stopping: st.stopping.clone(),
                    in_flight: st.in_flight,
                    idle_for_secs: if st.in_flight == 0 {
                        st.last_active.elapsed().as_secs()
                    } else {
                        0
                    },
                    memory_bytes: st.cgroup.as_ref().and_then(|c| c.memory_bytes()),
                    failures: st.failures,
                }
            })
            .collect();
        out.sort_by(|a, b| a.host.cmp(&b.host));
        out
    }
}

fn check_backoff(st: &SlotState) -> Result<(), AcquireError> {
    match st.retry_at {
        Some(at) if at > Instant::now() => Err(AcquireError::CrashLoop {
            retry_in_secs: at
                .saturating_duration_since(Instant::now())
                .as_secs()
                .max(1),
        }),
        _ => Ok(()),
    }
}

/// Drive the supervisor from the control runtime: reconcile on every change of the site
/// snapshot; stop idle workers five times a second; check memory and logs every second.
pub async fn run(supervisor: Arc<Supervisor>, sites: Arc<Informer<SiteSpec>>) {
    let mut changes = sites.subscribe();
    let mut last_seen: Option<Arc<roost_proto::Snapshot<SiteSpec>>> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = changes.changed() => {
                let snap = sites.snapshot();
                if last_seen.as_ref().is_some_and(|l| Arc::ptr_eq(l, &snap)) {
                    continue;
                }
                if sites.is_synced() {
                    supervisor.reconcile(&snap.items);
                }
                last_seen = Some(snap);
            }
            _ = tick.tick() => {
                ticks += 1;
                supervisor.housekeeping(ticks.is_multiple_of(5));
            }
        }
    }
}
