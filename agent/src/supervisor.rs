//! The per-site worker lifecycle (DESIGN.md, "Per-site worker lifecycle").
//!
//! Each site known to this node has a [`Slot`]: its spec, its socket (bound on first use and
//! kept), the current worker if one runs, the workers still stopping, and the requests in
//! flight. A request takes a [`Ticket`] (starting a worker if none is current) and gives it
//! back when done; the idle reaper stops a worker that has had nothing in flight for the
//! site's idle timeout. Because all workers of a site share the agent-owned socket, a request
//! that arrives while a worker stops is simply served by the next one: nothing is refused.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use roost_proto::{Informer, SiteSpec};
use serde::Serialize;
use thiserror::Error;
use tokio::runtime::Handle;
use tracing::{info, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::socket::{ensure_dir, log_path, SiteSocket};
use crate::users::{SiteUser, UserError};
use crate::worker;

/// Why a request could not be given a worker.
#[derive(Debug, Error)]
pub enum AcquireError {
    #[error("{0}")]
    User(#[from] UserError),
    #[error("cannot create the site's socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot start the site's worker: {0}")]
    Spawn(std::io::Error),
    #[error("the site was removed")]
    Removed,
    #[error("the site is failing to start (next try in {retry_in_secs} s)")]
    CrashLoop { retry_in_secs: u64, last_failure: String },
}

/// A request's claim on a site's worker; dropping it ends the request.
pub struct Ticket {
    slot: Arc<Slot>,
    pub socket_path: PathBuf,
    /// Which worker generation was current, so pooled connections never cross workers.
    pub generation: u64,
    pub request_timeout: Duration,
    issued: Instant,
}

impl Ticket {
    /// Why the site's worker died after this request was sent to it, if it did: a worker
    /// that can't import its app fails every waiting request at once with this reason.
    pub fn failure_since_issued(&self) -> Option<String> {
        let st = self.slot.lock();
        match &st.last_failure {
            Some((at, why)) if *at >= self.issued => Some(why.clone()),
            _ => None,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.slot.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        st.last_active = Instant::now();
    }
}

/// What `/sites` on the admin port reports per site.
#[derive(Debug, Serialize)]
pub struct SiteStatus {
    pub host: String,
    pub user: String,
    pub state: &'static str,
    pub pid: Option<i32>,
    pub stopping: Vec<i32>,
    pub in_flight: u32,
    pub idle_for_secs: u64,
}

struct Slot {
    host: String,
    state: Mutex<SlotState>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct SlotState {
    spec: Arc<SiteSpec>,
    socket: Option<SiteSocket>,
    current: Option<Running>,
    stopping: Vec<i32>,
    in_flight: u32,
    last_active: Instant,
    next_generation: u64,
    removed: bool,
    /// Unexpected exits in a row of workers that did not live to [`STABLE_AFTER`].
    failures: u32,
    /// No new worker before this instant (crash-loop backoff).
    retry_at: Option<Instant>,
    last_failure: Option<(Instant, String)>,
}

/// A worker that has run this long before crashing is not in a crash loop.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Ceiling of the crash-loop backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Running {
    pid: i32,
    generation: u64,
    started: Instant,
}

/// Why a worker is being stopped, for logs and metrics.
#[derive(Clone, Copy, Debug)]
pub enum StopReason {
    Idle,
    Replaced,
    Removed,
    Shutdown,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Idle => "idle",
            StopReason::Replaced => "replaced",
            StopReason::Removed => "removed",
            StopReason::Shutdown => "shutdown",
        }
    }
}

/// All sites of this node.
pub struct Supervisor {
    cfg: Arc<Config>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    metrics: Arc<Metrics>,
    /// The control runtime: worker reapers and timers live here, not on request threads.
    runtime: Handle,
}

impl Supervisor {
    pub fn new(cfg: Arc<Config>, metrics: Arc<Metrics>, runtime: Handle) -> std::io::Result<Arc<Self>> {
        ensure_dir(&cfg.state_dir, 0o755)?;
        ensure_dir(&cfg.state_dir.join("sites"), 0o711)?;
        ensure_dir(&cfg.state_dir.join("logs"), 0o750)?;
        Ok(Arc::new(Self {
            cfg,
            slots: Mutex::new(HashMap::new()),
            metrics,
            runtime,
        }))
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claim a worker for one request to `host`, starting one if none is current.
    pub fn acquire(self: &Arc<Self>, host: &str, spec: &Arc<SiteSpec>) -> Result<Ticket, AcquireError> {
        let slot = {
            let mut slots = self.slots();
            slots
                .entry(host.to_string())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        host: host.to_string(),
                        state: Mutex::new(SlotState {
                            spec: spec.clone(),
                            socket: None,
                            current: None,
                            stopping: Vec::new(),
                            in_flight: 0,
                            last_active: Instant::now(),
                            next_generation: 1,
                            removed: false,
                            failures: 0,
                            retry_at: None,
                            last_failure: None,
                        }),
                    })
                })
                .clone()
        };
        let mut st = slot.lock();
        if st.removed {
            return Err(AcquireError::Removed);
        }
        if st.current.is_none() {
            if let Some(retry_at) = st.retry_at.filter(|t| *t > Instant::now()) {
                return Err(AcquireError::CrashLoop {
                    retry_in_secs: retry_at.saturating_duration_since(Instant::now()).as_secs().max(1),
                    last_failure: st.last_failure.as_ref().map(|f| f.1.clone()).unwrap_or_default(),
                });
            }
            self.start_worker(&slot, &mut st)?;
        }
        let Some(current) = &st.current else {
            return Err(AcquireError::Removed);
        };
        let generation = current.generation;
        let socket_path = st.socket.as_ref().map(|s| s.path.clone()).unwrap_or_default();
        st.in_flight += 1;
        st.last_active = Instant::now();
        Ok(Ticket {
            request_timeout: Duration::from_secs(st.spec.request_timeout),
            slot: slot.clone(),
            socket_path,
            generation,
            issued: Instant::now(),
        })
    }

    fn start_worker(self: &Arc<Self>, slot: &Arc<Slot>, st: &mut SlotState) -> Result<(), AcquireError> {
        let spec = st.spec.clone();
        let user = SiteUser::lookup(&spec.user)?;
        let socket_ok = st.socket.as_ref().is_some_and(|s| s.uid == user.uid);
        if !socket_ok {
            let socket = SiteSocket::create(&self.cfg.state_dir, &slot.host, user.uid, user.gid)
                .map_err(AcquireError::Socket)?;
            st.socket = Some(socket);
        }
        let socket = st.socket.as_ref().expect("socket was just ensured");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(log_path(&self.cfg.state_dir, &slot.host))
            .map_err(AcquireError::Spawn)?;
        // Register the child with the control runtime's reaper, whatever thread we are on.
        let _enter = self.runtime.enter();
        let grace = self.cfg.stop_grace.as_secs().max(1);
        let proc = worker::spawn(&spec, &slot.host, &user, socket, log, grace, &[])
            .map_err(AcquireError::Spawn)?;
        let pid = proc.pid();
        let generation = st.next_generation;
        st.next_generation += 1;
        st.current = Some(Running {
            pid,
            generation,
            started: Instant::now(),
        });
        self.metrics.worker_starts.inc();
        self.metrics.workers.inc();
        info!(site = %slot.host, pid, user = %user.name, uid = user.uid.as_raw(), generation, "worker started");

        let this = self.clone();
        let slot = slot.clone();
        self.runtime.spawn(async move {
            let status = proc.wait().await;
            this.on_exit(&slot, generation, pid, status);
        });
        Ok(())
    }

    fn on_exit(&self, slot: &Slot, generation: u64, pid: i32, status: String) {
        // Reap whatever the worker left in its process group (e.g. gunicorn's children).
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        self.metrics.workers.dec();
        let mut st = slot.lock();
        let was_stopping = st.stopping.contains(&pid);
        st.stopping.retain(|p| *p != pid);
        if st.current.as_ref().is_some_and(|c| c.generation == generation) {
            let lived = st.current.take().map(|c| c.started.elapsed()).unwrap_or_default();
            self.metrics.worker_crashes.inc();
            let log = log_path(&self.cfg.state_dir, &slot.host);
            let tail = last_lines(&log, 20);
            // The Python exception says more than gunicorn's closing "failed to boot".
            let last = tail
                .lines()
                .rev()
                .find(|l| l.contains("Error:") || l.contains("Exception:"))
                .or_else(|| tail.lines().last())
                .unwrap_or("no output")
                .trim()
                .to_string();
            st.failures = if lived < STABLE_AFTER { st.failures + 1 } else { 0 };
            st.retry_at = (st.failures > 1).then(|| {
                let backoff = Duration::from_secs(1 << (st.failures - 2).min(5)).min(MAX_BACKOFF);
                Instant::now() + backoff
            });
            st.last_failure = Some((Instant::now(), format!("worker exited ({status}): {last}")));
            warn!(site = %slot.host, pid, %status, lived_ms = lived.as_millis() as u64, in_flight = st.in_flight,
                failures = st.failures, log = %log.display(), output = %tail,
                "worker exited unexpectedly");
            if st.in_flight > 0 {
                // Requests wait in the socket's backlog for a worker that will not come:
                // closing the agent's end resets them now, and they answer 503 with the reason
                // instead of hanging until their timeout. The next start binds a new socket.
                st.socket = None;
            }
        } else if was_stopping {
            info!(site = %slot.host, pid, %status, "worker stopped");
        }
    }

    /// Move the current worker to `stopping` and ask it to finish (SIGTERM), with SIGKILL
    /// after the grace period.
    fn stop_current(&self, slot: &Arc<Slot>, st: &mut SlotState, reason: StopReason) {
        let Some(running) = st.current.take() else { return };
        let pid = running.pid;
        st.stopping.push(pid);
        // A worker we stop was healthy enough: the crash-loop count starts over.
        st.failures = 0;
        st.retry_at = None;
        self.metrics.worker_stops.with_label_values(&[reason.as_str()]).inc();
        info!(site = %slot.host, pid, reason = reason.as_str(), "stopping worker");
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let grace = self.cfg.stop_grace;
        let slot = slot.clone();
        self.runtime.spawn(async move {
            tokio::time::sleep(grace).await;
            let still_there = slot.lock().stopping.contains(&pid);
            if still_there {
                warn!(site = %slot.host, pid, "worker ignored SIGTERM for the grace period; killing it");
                let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            }
        });
    }

    /// Stop workers that have had nothing in flight for their site's idle timeout.
    pub fn reap_idle(self: &Arc<Self>) {
        let slots: Vec<Arc<Slot>> = self.slots().values().cloned().collect();
        for slot in slots {
            let mut st = slot.lock();
            let idle_for = Duration::from_secs(st.spec.idle_timeout);
            if st.current.is_some() && st.in_flight == 0 && st.last_active.elapsed() >= idle_for {
                self.stop_current(&slot, &mut st, StopReason::Idle);
            }
        }
    }

    /// Bring the slots in line with the sites in etcd: stop and forget removed sites, replace
    /// workers whose spec changed (new worker first, then the old one drains).
    pub fn reconcile(self: &Arc<Self>, sites: &BTreeMap<String, Arc<SiteSpec>>) {
        let slots: Vec<(String, Arc<Slot>)> =
            self.slots().iter().map(|(h, s)| (h.clone(), s.clone())).collect();
        for (host, slot) in slots {
            let mut st = slot.lock();
            match sites.get(&host) {
                None => {
                    st.removed = true;
                    self.stop_current(&slot, &mut st, StopReason::Removed);
                    if let Some(socket) = st.socket.take() {
                        socket.remove();
                    }
                    drop(st);
                    self.slots().remove(&host);
                    info!(site = %host, "site removed from this node");
                }
                Some(spec) if **spec != *st.spec => {
                    st.spec = spec.clone();
                    if let Some(old) = st.current.take() {
                        match self.start_worker(&slot, &mut st) {
                            Ok(()) => {
                                // Stop the old worker, which start_worker has displaced.
                                let new = st.current.take();
                                st.current = Some(old);
                                self.stop_current(&slot, &mut st, StopReason::Replaced);
                                st.current = new;
                            }
                            Err(e) => {
                                warn!(site = %host, error = %e, "changed site failed to start; keeping the old worker");
                                st.current = Some(old);
                            }
                        }
                    }
                    info!(site = %host, "site spec changed");
                }
                Some(_) => {}
            }
        }
    }

    /// Stop every worker (agent shutdown) and wait until they are gone or the grace ends.
    pub async fn shutdown(self: &Arc<Self>) {
        let slots: Vec<Arc<Slot>> = self.slots().values().cloned().collect();
        for slot in &slots {
            let mut st = slot.lock();
            st.removed = true;
            self.stop_current(slot, &mut st, StopReason::Shutdown);
        }
        let deadline = Instant::now() + self.cfg.stop_grace + Duration::from_secs(1);
        while Instant::now() < deadline {
            if slots.iter().all(|s| s.lock().stopping.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Requests in flight on this node.
    pub fn in_flight(&self) -> u32 {
        self.slots().values().map(|s| s.lock().in_flight).sum()
    }

    pub fn status(&self) -> Vec<SiteStatus> {
        let slots: Vec<Arc<Slot>> = self.slots().values().cloned().collect();
        let mut out: Vec<SiteStatus> = slots
            .iter()
            .map(|slot| {
                let st = slot.lock();
                let state = match (&st.current, st.stopping.is_empty()) {
                    (Some(_), _) => "ready",
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
                    idle_for_secs: if st.in_flight == 0 { st.last_active.elapsed().as_secs() } else { 0 },
                }
            })
            .collect();
        out.sort_by(|a, b| a.host.cmp(&b.host));
        out
    }
}

/// The last `n` lines of a site's log, for the agent's own log when a worker dies.
fn last_lines(path: &std::path::Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Drive the supervisor from the control runtime: reconcile on every change of the site
/// snapshot, reap idle workers a few times a second.
pub async fn run(supervisor: Arc<Supervisor>, sites: Arc<Informer<SiteSpec>>) {
    let mut changes = sites.subscribe();
    let mut last_seen: Option<Arc<roost_proto::Snapshot<SiteSpec>>> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
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
            _ = tick.tick() => supervisor.reap_idle(),
        }
    }
}
