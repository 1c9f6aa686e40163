//! One site's state on this node, and the ticket a request holds while it uses the site.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use roost_proto::SiteSpec;
use serde::Serialize;
use thiserror::Error;

use crate::cgroup::SiteCgroup;
use crate::socket::SiteSocket;
use crate::users::UserError;

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
    CrashLoop { retry_in_secs: u64 },
    #[error("{waiting} requests are already waiting for the site to start")]
    StartQueueFull { waiting: u32 },
    #[error("the node is at capacity and no idle worker can be stopped")]
    AtCapacity,
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
}

impl StopReason {
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
        }
    }
}

pub(super) struct Slot {
    pub host: String,
    state: Mutex<SlotState>,
}

impl Slot {
    pub fn new(host: &str, spec: Arc<SiteSpec>) -> Self {
        Self {
            host: host.to_string(),
            state: Mutex::new(SlotState {
                spec,
                socket: None,
                cgroup: None,
                current: None,
                stopping: Vec::new(),
                in_flight: 0,
                last_active: Instant::now(),
                next_generation: 1,
                removed: false,
                failures: 0,
                retry_at: None,
                last_failure: None,
                oom_seen: 0,
                last_oom: None,
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) struct SlotState {
    pub spec: Arc<SiteSpec>,
    pub socket: Option<SiteSocket>,
    pub cgroup: Option<SiteCgroup>,
    pub current: Option<Running>,
    /// Pids of workers asked to stop that have not exited yet.
    pub stopping: Vec<i32>,
    pub in_flight: u32,
    pub last_active: Instant,
    pub next_generation: u64,
    pub removed: bool,
    /// Workers in a row that died before answering anything.
    pub failures: u32,
    /// No new worker before this instant (crash-loop backoff).
    pub retry_at: Option<Instant>,
    pub last_failure: Option<(Instant, String)>,
    /// The cgroup's OOM-kill counter as last seen, and when it last went up.
    pub oom_seen: u64,
    pub last_oom: Option<Instant>,
}

pub(super) struct Running {
    pub pid: i32,
    pub generation: u64,
    pub started: Instant,
    /// Set by the first response of this worker: until then requests are waiting for a start.
    pub answered: bool,
}

/// A request's claim on a site's worker; dropping it ends the request.
pub struct Ticket {
    pub(super) slot: Arc<Slot>,
    pub socket_path: PathBuf,
    /// Which worker generation was current, so pooled connections never cross workers.
    pub generation: u64,
    pub request_timeout: Duration,
    pub(super) issued: Instant,
}

impl Ticket {
    /// The worker answered (a response header arrived): it has started.
    pub fn mark_answered(&self) {
        let mut st = self.slot.lock();
        if let Some(cur) = st
            .current
            .as_mut()
            .filter(|c| c.generation == self.generation)
        {
            if !cur.answered {
                cur.answered = true;
                st.failures = 0;
                st.retry_at = None;
            }
        }
    }

    /// Why the site's worker died after this request was sent to it, if it did.
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
    pub memory_bytes: Option<u64>,
    pub failures: u32,
}
