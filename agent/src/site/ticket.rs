//! What a request holds while it uses a site, what it can be refused with, and the little
//! per-site state that readers outside the site's actor may see without asking it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc::UnboundedSender;

use super::actor::Msg;
use super::gate::{Claim, Gate, Released};
use super::Ctx;

/// Why a request could not be given a worker.
#[derive(Clone, Debug, Error)]
pub enum AcquireError {
    #[error("cannot start the site's worker: {0}")]
    Start(String),
    #[error("the site was removed")]
    Removed,
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("the site is failing to start (next try in {retry_in_secs} s)")]
    CrashLoop { retry_in_secs: u64 },
    #[error("{waiting} requests are already waiting for the site to start")]
    StartQueueFull { waiting: u32 },
    #[error("the node is at capacity and no idle worker can be stopped")]
    AtCapacity,
    #[error("{limit} requests are in flight, the site's limit of concurrent requests")]
    TooManyRequests { limit: u32 },
}

/// Why a worker is being stopped, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Idle,
    Replaced,
    Recycled,
    Evicted,
    Removed,
    Shutdown,
    StartTimeout,
    MemoryLimit,
    /// A new spec's worker that failed before answering.
    SpecFailed,
    /// Placement moved the site to another node.
    Moved,
}

impl StopReason {
    pub const ALL: [StopReason; 10] = [
        StopReason::Idle,
        StopReason::Replaced,
        StopReason::Recycled,
        StopReason::Evicted,
        StopReason::Removed,
        StopReason::Shutdown,
        StopReason::StartTimeout,
        StopReason::MemoryLimit,
        StopReason::SpecFailed,
        StopReason::Moved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Idle => "idle",
            StopReason::Replaced => "replaced",
            StopReason::Recycled => "recycled",
            StopReason::Evicted => "evicted",
            StopReason::Removed => "removed",
            StopReason::Shutdown => "shutdown",
            StopReason::StartTimeout => "start_timeout",
            StopReason::MemoryLimit => "memory_limit",
            StopReason::SpecFailed => "spec_failed",
            StopReason::Moved => "moved",
        }
    }
}

/// One site's state that others read without a round trip to its actor: the request path
/// (claim the ready worker; is my worker alive, why did it die) and eviction (is it idle,
/// since when).
pub struct SiteShared {
    pub host: String,
    /// The site's actor.
    pub tx: UnboundedSender<Msg>,
    /// Claims on the current worker without the actor (see [`super::gate`]).
    pub gate: Gate,
    /// Where the current worker's tickets go; published before the gate opens for its epoch.
    pub route: ArcSwapOption<Route>,
    /// Tickets of retired epochs the actor still counts (they share the site's limit).
    pub retired_in_flight: AtomicU32,
    /// When the last request ended, in ms since the agent's start.
    pub last_active_ms: AtomicU64,
    /// The generation and pid of the worker new requests go to (0: none).
    pub current_generation: AtomicU64,
    pub current_pid: AtomicI32,
    /// The first generation known to have answered (so tickets tell the actor only once).
    pub answered_generation: AtomicU64,
    pub failures: Mutex<Failures>,
    /// The actor is giving the site back (placed on another node), as reconcile last told it
    /// or a request since undid.
    pub leaving: AtomicBool,
    /// The actor ended by giving the site back: a request that still reached it retries.
    pub gave_back: AtomicBool,
}

#[derive(Default)]
pub struct Failures {
    /// When a worker last died with requests, and why.
    pub last_failure: Option<(Instant, String)>,
    /// The cgroup's OOM-kill counter as last seen, and when it last went up.
    pub oom_seen: u64,
    pub last_oom: Option<Instant>,
}

/// One worker's term as requests see it: what a ticket of `epoch` carries. Immutable; the
/// actor publishes a new one for each worker that becomes current.
#[derive(Debug)]
pub struct Route {
    pub epoch: u32,
    pub generation: u64,
    pub pid: i32,
    pub socket_path: Arc<Path>,
    /// The socket's address, which connections to it report: `socket_path` unless it was
    /// bound ahead under a placeholder name (`launch/ready.rs`).
    pub socket_address: Arc<Path>,
    pub request_timeout: Duration,
    pub memory_limit_mb: Option<u64>,
    /// The site's own limit of concurrent requests; the node's default is read per claim,
    /// since SIGHUP may change it.
    pub max_concurrent_requests: Option<u32>,
}

impl SiteShared {
    pub fn new(host: &str, tx: UnboundedSender<Msg>, now_ms: u64) -> Self {
        Self {
            host: host.to_string(),
            tx,
            gate: Gate::new(),
            route: ArcSwapOption::empty(),
            retired_in_flight: AtomicU32::new(0),
            last_active_ms: AtomicU64::new(now_ms),
            current_generation: AtomicU64::new(0),
            current_pid: AtomicI32::new(0),
            answered_generation: AtomicU64::new(0),
            failures: Mutex::new(Failures::default()),
            leaving: AtomicBool::new(false),
            gave_back: AtomicBool::new(false),
        }
    }

    pub fn failures(&self) -> std::sync::MutexGuard<'_, Failures> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record the cgroup's OOM-kill counter; true when it went up since last seen.
    pub fn note_oom_kills(&self, kills: u64, ctx: &Ctx, memory_limit_mb: Option<u64>) -> bool {
        let mut f = self.failures();
        if kills <= f.oom_seen {
            return false;
        }
        let new = kills - f.oom_seen;
        f.oom_seen = kills;
        f.last_oom = Some(Instant::now());
        ctx.metrics.memory_limit_kills.inc_by(new);
        tracing::warn!(site = %self.host, kills = new, limit_mb = ?memory_limit_mb,
            "the kernel killed a worker process for exceeding the site's memory limit");
        true
    }
}

/// A request's claim on a site's worker; dropping it ends the request.
pub struct Ticket {
    pub(super) shared: Arc<SiteShared>,
    pub(super) ctx: Arc<Ctx>,
    pub socket_path: Arc<Path>,
    /// See [`Route::socket_address`].
    pub socket_address: Arc<Path>,
    /// Which worker generation was current, so pooled connections never cross workers.
    pub generation: u64,
    /// The gate's epoch it was counted in.
    pub(super) epoch: u32,
    /// The worker's process (its group's leader).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) pid: i32,
    pub request_timeout: Duration,
    pub(super) memory_limit_mb: Option<u64>,
    pub(super) issued: Instant,
}

impl Ticket {
    /// A ticket for `route`'s worker, already counted in the gate (by a claim or the actor).
    pub(super) fn counted(shared: &Arc<SiteShared>, ctx: &Arc<Ctx>, route: &Route) -> Self {
        ctx.in_flight.fetch_add(1, Ordering::AcqRel);
        Ticket {
            shared: shared.clone(),
            ctx: ctx.clone(),
            socket_path: route.socket_path.clone(),
            socket_address: route.socket_address.clone(),
            generation: route.generation,
            epoch: route.epoch,
            pid: route.pid,
            request_timeout: route.request_timeout,
            memory_limit_mb: route.memory_limit_mb,
            issued: Instant::now(),
        }
    }

    /// The fast path: claim the site's ready worker with atomics only. `None` when the gate
    /// is closed or has moved on: the request must ask the actor.
    pub(super) fn claim(
        shared: &Arc<SiteShared>,
        ctx: &Arc<Ctx>,
    ) -> Option<Result<Self, AcquireError>> {
        let route = shared.route.load();
        let route = route.as_ref()?;
        let limit = route
            .max_concurrent_requests
            .or_else(|| ctx.cfg.load().site_limits.max_concurrent_requests);
        // Requests still on retired workers count against the site's limit too.
        let room = limit.map_or(u32::MAX, |max| {
            max.saturating_sub(shared.retired_in_flight.load(Ordering::Acquire))
        });
        match shared.gate.claim(route.epoch, room) {
            Claim::Granted => Some(Ok(Self::counted(shared, ctx, route))),
            Claim::Full => Some(Err(AcquireError::TooManyRequests {
                limit: limit.unwrap_or(room),
            })),
            Claim::Closed => None,
        }
    }

    /// Whether this ticket's worker has answered a request yet.
    pub fn worker_has_answered(&self) -> bool {
        self.shared.answered_generation.load(Ordering::Acquire) == self.generation
    }

    /// The worker answered (a response header arrived): it has started. `accepted` is when
    /// the agent accepted the request, so a new worker's first answer times its cold start.
    pub fn mark_answered(&self, accepted: Instant) {
        if self.shared.answered_generation.load(Ordering::Acquire) != self.generation {
            let _ = self.shared.tx.send(Msg::Answered {
                generation: self.generation,
                accepted,
            });
        }
    }

    /// A request ran past the site's timeout: its worker may be stuck; replace it.
    pub fn recycle(&self) {
        let _ = self.shared.tx.send(Msg::Recycle {
            generation: self.generation,
        });
    }

    /// Is the worker this ticket was issued for still the current one, and alive? A request
    /// that failed on a worker that is gone must not be retried: the retry could be what
    /// kills the next worker too (a request that crashes its worker).
    pub fn worker_alive(&self) -> bool {
        if self.shared.current_generation.load(Ordering::Acquire) != self.generation {
            return false;
        }
        let pid = self.shared.current_pid.load(Ordering::Acquire);
        process_alive(pid)
    }

    /// Why a request to this ticket's worker failed, if the agent knows: the worker died, or
    /// a process of it was killed for memory, after the request was sent.
    pub async fn failure_reason(&self) -> Option<String> {
        let kills = self.ctx.launcher.oom_kills(&self.shared.host).await;
        self.shared
            .note_oom_kills(kills, &self.ctx, self.memory_limit_mb);
        let f = self.shared.failures();
        if f.last_oom.is_some_and(|at| at >= self.issued) {
            return Some(format!(
                "exceeded its memory limit of {} MiB",
                self.memory_limit_mb.unwrap_or(0)
            ));
        }
        match &f.last_failure {
            Some((at, why)) if *at >= self.issued => Some(why.clone()),
            _ => None,
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("site", &self.shared.host)
            .field("generation", &self.generation)
            .field("socket_path", &self.socket_path)
            .finish()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.ctx.in_flight.fetch_sub(1, Ordering::AcqRel);
        // Before the release: an actor that sees the count fall to 0 reads this time.
        self.shared
            .last_active_ms
            .store(self.ctx.now_ms(), Ordering::Release);
        let tell = match self.shared.gate.release(self.epoch) {
            Released::Counted { quiet: false } => None,
            Released::Counted { quiet: true } => Some(Msg::Quiet),
            Released::Retired => Some(Msg::Release {
                generation: self.generation,
            }),
        };
        if let Some(msg) = tell {
            let _ = self.shared.tx.send(msg);
        }
    }
}

/// Whether `pid` lives on: not gone from /proc, not a zombie, not exiting, and not about to
/// be (a SIGKILL pending). A worker killed as a group (a request that crashes it) closes its
/// connections before its leader is a zombie; in that moment the leader is exiting or has the
/// SIGKILL pending, and a retry must not go to the worker started after it.
fn process_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    !ending(&stat) && !sigkill_pending(&status)
}

/// From /proc/<pid>/stat: a zombie, dead, or exiting (`PF_EXITING` in its flags) task.
fn ending(stat: &str) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Some(after_comm) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return true;
    };
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("X");
    let flags = fields
        .get(6)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    matches!(state, "Z" | "X" | "x") || flags & PF_EXITING != 0
}

/// From /proc/<pid>/status: a SIGKILL pending for the process or one of its threads.
fn sigkill_pending(status: &str) -> bool {
    const SIGKILL_BIT: u64 = 1 << (9 - 1);
    status.lines().any(|l| {
        l.strip_prefix("ShdPnd:")
            .or_else(|| l.strip_prefix("SigPnd:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & SIGKILL_BIT != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exiting_or_doomed_processes_are_not_alive() {
        let stat = |state: &str, flags: u64| {
            format!("42 (gunicorn: a) b) {state} 1 42 42 0 -1 {flags} 0 0 0 0 1 2 0 0 20 0 1")
        };
        assert!(!ending(&stat("S", 0x400040)));
        assert!(ending(&stat("Z", 0x400040)));
        assert!(ending(&stat("R", 0x400044)), "PF_EXITING");
        assert!(ending("garbage"));
        assert!(!sigkill_pending(
            "SigPnd:\t0000000000000000\nShdPnd:\t0000000000004000\n"
        ));
        assert!(sigkill_pending(
            "SigPnd:\t0000000000000000\nShdPnd:\t0000000000000100\n"
        ));
        assert!(sigkill_pending("SigPnd:\t0000000000000100\n"));
    }

    #[test]
    fn a_killed_process_is_not_alive_before_it_is_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        assert!(process_alive(pid));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        // Unreaped, it is a zombie (or still exiting): either way, not alive.
        assert!(!process_alive(pid));
        let _ = child.wait();
        assert!(!process_alive(pid), "a reaped process is not alive");
    }
}

/// What `/sites` on the admin port reports per site.
#[derive(Debug, Serialize, Clone)]
pub struct SiteStatus {
    pub host: String,
    pub user: String,
    pub state: &'static str,
    pub pid: Option<i32>,
    pub stopping: Vec<i32>,
    /// A changed spec's worker, starting beside the serving one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate: Option<i32>,
    pub in_flight: u32,
    pub idle_for_secs: u64,
    pub memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    pub failures: u32,
    /// Set while a changed spec's worker failed and the previous spec's worker serves:
    /// "serving the previous spec: <reason>".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}
