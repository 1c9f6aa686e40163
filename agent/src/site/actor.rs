//! One site's actor: a task that owns the site's state and changes it only in answer to a
//! message, so no lock guards it and every transition can be driven by a test.
//!
//! ```text
//! idle ──acquire──▶ starting ──first answer──▶ ready ──idle_timeout──▶ draining ──exit──▶ idle
//!                      │ exits / no answer in start_timeout    └─ crash ─▶ idle (restart if requests wait)
//!                      └──────▶ failed: waiting requests get 503 at once, backoff
//!
//! ready ──spec changed──▶ ready + candidate (own socket) ──probe answered──▶ ready (new),
//!                                 │                                         old drains
//!                                 └─ exits / no answer ─▶ ready (old spec), "serving the previous spec"
//! ```
//!
//! Slow work (reserving a slot of the node, binding sockets, starting workers, probing) runs
//! in tasks the actor spawns; they report back with a message. Timers (idle stop, start
//! deadline, stop grace) are the actor's own.
//!
//! Requests to a ready worker do not come here: they claim it through the site's gate
//! (`gate.rs`, whose comment has the protocol). The actor keeps the gate open exactly while
//! its current worker has answered and nothing is changing (no stop, removal, shutdown or
//! give-back); it publishes each current worker's [`Route`] and retires the gate's epoch
//! whenever that worker stops being current, taking over the count of its requests still in
//! flight. So the actor's own in-flight count is the gate's plus those it took over.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use roost_proto::SiteSpec;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{info, warn};

use super::capacity::{Capacity, Reservation, Running};
use super::gate::MAX_COUNT;
use super::ticket::{AcquireError, Route, SiteShared, SiteStatus, StopReason, Ticket};
use super::Ctx;
use crate::launch::{
    BootWeight, BoxFut, Exit, LauncherKind, Listener, SocketRole, Started, Worker,
};

pub enum Msg {
    /// A request wants a worker.
    Acquire {
        reply: oneshot::Sender<Result<Ticket, AcquireError>>,
    },
    /// A request ended on a worker whose gate epoch is retired.
    Release {
        generation: u64,
    },
    /// The current worker's last request in flight ended (the actor asked, see `gate.rs`).
    Quiet,
    /// A worker answered a request accepted at `accepted`.
    Answered {
        generation: u64,
        accepted: std::time::Instant,
    },
    /// A request timed out on this worker: replace it.
    Recycle {
        generation: u64,
    },
    SpecChanged(Arc<SiteSpec>),
    Removed,
    /// Whether placement puts the site on this node; `false` gives the site back once it is
    /// idle (its worker, socket and cgroup), `true` keeps it after all.
    Placement {
        here: bool,
    },
    /// The site's socket directory and cgroup are removed (it is being given back).
    Forgotten,
    /// The node is full: stop the worker if it is idle; the answer says whether it did.
    Evict {
        reply: oneshot::Sender<bool>,
    },
    /// The RSS watchdog found this worker over the site's memory limit.
    MemoryLimit {
        pid: i32,
    },
    /// Periodic housekeeping (the cgroup's OOM counter).
    Tick,
    Status {
        reply: oneshot::Sender<SiteStatus>,
    },
    /// Stop everything; `done` is dropped once every worker has exited.
    Shutdown {
        done: oneshot::Sender<()>,
    },
    // Reports of the actor's own tasks and timers.
    Launched {
        generation: u64,
        role: Role,
        result: Result<Launch, AcquireError>,
    },
    Exited {
        generation: u64,
        exit: Exit,
        oom: bool,
    },
    StartDeadline {
        generation: u64,
    },
    Probed {
        generation: u64,
        result: Result<(), String>,
    },
    GraceOver {
        generation: u64,
    },
}

/// Which worker a start is for: the one requests go to, or a changed spec's candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Serving,
    Candidate,
}

pub struct Launch {
    reservation: Reservation,
    listener: Arc<Listener>,
    started: Started,
    spec: Arc<SiteSpec>,
    weight: BootWeight,
}

/// A live worker process.
struct Proc {
    generation: u64,
    worker: Arc<dyn Worker>,
    launcher: LauncherKind,
    /// Its slot of the node's worker limit, given back when the process tree is gone.
    _reservation: Reservation,
    listener: Arc<Listener>,
    spec: Arc<SiteSpec>,
    started: Instant,
    answered: bool,
    /// The CPU weight it booted with; `Lowest` is raised when it answers.
    weight: BootWeight,
    /// Requests holding a ticket for this worker, once it is no longer current (while it is,
    /// the gate counts them).
    in_flight: u32,
    /// Asked to stop (SIGTERM sent), and why.
    stopping: Option<StopReason>,
    /// Stop once its requests are done (a replaced worker finishing what it accepted).
    drain_then_stop: Option<StopReason>,
}

pub struct Actor {
    host: String,
    ctx: Arc<Ctx>,
    shared: Arc<SiteShared>,
    /// The actor's own address (`shared.tx`), for the tasks it spawns.
    tx: UnboundedSender<Msg>,
    /// The spec the serving worker runs, and the next start uses.
    spec: Arc<SiteSpec>,
    /// The socket requests go to, and its path.
    serving: Option<(Arc<Listener>, PathBuf)>,
    current: Option<Proc>,
    candidate: Option<Proc>,
    retiring: Vec<Proc>,
    /// The generation of a serving / candidate start in progress.
    starting: Option<u64>,
    candidate_starting: Option<u64>,
    /// Requests waiting for a start in progress.
    pending: Vec<oneshot::Sender<Result<Ticket, AcquireError>>>,
    /// Tickets of retired gate epochs still in flight (the gate counts the current one's).
    in_flight_retired: u32,
    /// The gate will send `Quiet` when the current worker's last request ends.
    watching: bool,
    next_generation: u64,
    /// Workers in a row that died before answering anything.
    failures: u32,
    /// No new worker before this instant (crash-loop backoff).
    retry_at: Option<Instant>,
    /// A changed spec being tried, or that failed.
    new_spec: Option<Arc<SiteSpec>>,
    /// Why the changed spec's worker failed, while the previous spec's serves.
    spec_failure: Option<String>,
    removed: bool,
    shutting_down: bool,
    /// Placed on another node: give the site back once nothing is in flight or starting.
    leaving: bool,
    /// Its socket directory and cgroup are being removed; requests wait for `Forgotten`.
    forgetting: bool,
    /// Given back: the actor ends, and a later request here starts a fresh one.
    left: bool,
    done: Vec<oneshot::Sender<()>>,
}

impl Actor {
    pub fn new(host: &str, spec: Arc<SiteSpec>, ctx: Arc<Ctx>, shared: Arc<SiteShared>) -> Self {
        Self {
            host: host.to_string(),
            ctx,
            tx: shared.tx.clone(),
            shared,
            spec,
            serving: None,
            current: None,
            candidate: None,
            retiring: Vec::new(),
            starting: None,
            candidate_starting: None,
            pending: Vec::new(),
            in_flight_retired: 0,
            watching: false,
            next_generation: 1,
            failures: 0,
            retry_at: None,
            new_spec: None,
            spec_failure: None,
            removed: false,
            shutting_down: false,
            leaving: false,
            forgetting: false,
            left: false,
            done: Vec::new(),
        }
    }

    pub async fn run(mut self, mut rx: UnboundedReceiver<Msg>) {
        loop {
            let idle_at = self.idle_deadline();
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                _ = sleep_until(idle_at) => self.idle_due(),
            }
            self.give_back_when_idle();
            self.refresh_gate();
            if self.finished() {
                break;
            }
        }
        let unregister = |ctx: &Ctx| {
            ctx.actors
                .remove_if(&self.host, |_, h| Arc::ptr_eq(&h.shared, &self.shared))
        };
        if self.left {
            // Out of the registry first: a request from now on starts a fresh actor, and one
            // that reached this actor anyway is told to retry (its reply is dropped unsent).
            self.shared.gave_back.store(true, Ordering::Release);
            unregister(&self.ctx);
        }
        // Whatever arrives from now on finds the channel closed.
        rx.close();
        while let Ok(msg) = rx.try_recv() {
            if let Msg::Acquire { reply } = msg {
                if !self.left {
                    let _ = reply.send(Err(self.gone()));
                }
            }
        }
        unregister(&self.ctx);
        if self.removed {
            self.ctx.launcher.forget(&self.host).await;
            info!(site = %self.host, "site removed from this node");
        }
        drop(self.done);
    }

    fn gone(&self) -> AcquireError {
        if self.shutting_down {
            AcquireError::ShuttingDown
        } else {
            AcquireError::Removed
        }
    }

    fn finished(&self) -> bool {
        (self.removed || self.shutting_down || self.left)
            && self.current.is_none()
            && self.candidate.is_none()
            && self.retiring.is_empty()
            && self.starting.is_none()
            && self.candidate_starting.is_none()
    }

    /// Requests holding a ticket: the current worker's (counted by the gate) and those of
    /// workers no longer current.
    fn in_flight(&self) -> u32 {
        self.shared.gate.in_flight() + self.in_flight_retired
    }

    /// When the last request ended.
    fn last_active(&self) -> Instant {
        self.ctx
            .instant_of(self.shared.last_active_ms.load(Ordering::Acquire))
    }

    /// When the current worker may stop for being idle: `idle_timeout` after the last
    /// request ended. Requests still in flight are found when it is due (`idle_due`).
    fn idle_deadline(&self) -> Option<Instant> {
        let cur = self.current.as_ref()?;
        if self.watching
            || self.in_flight_retired > 0
            || self.candidate.is_some()
            || cur.stopping.is_some()
        {
            return None;
        }
        Some(self.last_active() + Duration::from_secs(self.spec.idle_timeout))
    }

    /// The idle deadline passed: stop the worker if nothing is in flight (closing the gate in
    /// the same step, so no claim slips in); otherwise wait for the last request's `Quiet`.
    fn idle_due(&mut self) {
        let Some(due) = self.idle_deadline() else {
            return;
        };
        if Instant::now() < due {
            return; // a request ended since: the next deadline is later
        }
        if self.shared.gate.close_if_idle() {
            self.stop_current(StopReason::Idle);
        } else {
            self.watching = self.shared.gate.watch();
        }
    }

    /// Open the gate exactly while requests may go to the current worker without asking.
    fn refresh_gate(&self) {
        let open = !self.removed
            && !self.shutting_down
            && !self.leaving
            && !self.forgetting
            && self
                .current
                .as_ref()
                .is_some_and(|c| c.answered && c.stopping.is_none());
        let gate = &self.shared.gate;
        if open && !gate.is_open() {
            gate.open();
        } else if !open && gate.is_open() {
            gate.close();
        }
    }

    pub fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Acquire { reply } => self.acquire(reply),
            Msg::Release { generation } => self.release(generation),
            Msg::Quiet => self.watching = false,
            Msg::Answered {
                generation,
                accepted,
            } => self.answered(generation, accepted),
            Msg::Recycle { generation } => self.recycle(generation),
            Msg::SpecChanged(spec) => self.spec_changed(spec),
            Msg::Removed => self.stop_all(StopReason::Removed),
            Msg::Placement { here } => self.placement(here),
            Msg::Forgotten => self.forgotten(),
            Msg::Evict { reply } => {
                // The gate closes only if nothing is in flight, in the same step: last.
                let idle = self.in_flight_retired == 0
                    && self.candidate.is_none()
                    && self.candidate_starting.is_none()
                    && self.current.as_ref().is_some_and(|c| c.stopping.is_none())
                    && self.shared.gate.close_if_idle();
                if idle {
                    self.stop_current(StopReason::Evicted);
                }
                let _ = reply.send(idle);
            }
            Msg::MemoryLimit { pid } => {
                if self.current.as_ref().is_some_and(|c| c.worker.pid() == pid) {
                    warn!(site = %self.host, pid, limit_mb = ?self.spec.memory_limit_mb,
                        "worker exceeds its memory limit (RSS watchdog); killing it");
                    self.ctx.metrics.memory_limit_kills.inc();
                    self.shared.failures().last_oom = Some(std::time::Instant::now());
                    self.stop_current(StopReason::MemoryLimit);
                    if let Some(p) = self.retiring.last() {
                        p.worker.kill();
                    }
                }
            }
            Msg::Tick => self.housekeeping(),
            Msg::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Msg::Shutdown { done } => {
                self.done.push(done);
                self.stop_all(StopReason::Shutdown);
            }
            Msg::Launched {
                generation,
                role: Role::Serving,
                result,
            } => self.launched(generation, result),
            Msg::Launched {
                generation,
                role: Role::Candidate,
                result,
            } => self.candidate_launched(generation, result),
            Msg::Exited {
                generation,
                exit,
                oom,
            } => self.exited(generation, exit, oom),
            Msg::StartDeadline { generation } => self.start_deadline(generation),
            Msg::Probed { generation, result } => self.probed(generation, result),
            Msg::GraceOver { generation } => {
                if let Some(p) = self.retiring.iter().find(|p| p.generation == generation) {
                    warn!(site = %self.host, pid = p.worker.pid(), "worker did not stop within the grace period; killing it");
                    p.worker.kill();
                }
            }
        }
    }

    fn acquire(&mut self, reply: oneshot::Sender<Result<Ticket, AcquireError>>) {
        if self.removed || self.shutting_down {
            let _ = reply.send(Err(self.gone()));
            return;
        }
        // The site's entry-process limit: refused here, before any worker (or thread of one)
        // is taken or started for the request.
        let cfg = self.ctx.cfg();
        let max = self
            .spec
            .max_concurrent_requests
            .or(cfg.site_limits.max_concurrent_requests);
        if let Some(max) = max {
            if self.in_flight() + self.pending.len() as u32 >= max {
                let _ = reply.send(Err(AcquireError::TooManyRequests { limit: max }));
                return;
            }
        }
        let limit = cfg.start_queue_limit;
        if self.forgetting {
            // Its socket is being removed: the request waits, then gets a fresh one.
            if self.pending.len() as u32 >= limit {
                let _ = reply.send(Err(AcquireError::StartQueueFull {
                    waiting: self.pending.len() as u32,
                }));
            } else {
                self.pending.push(reply);
            }
            return;
        }
        if self.leaving {
            // A proxy still sends it here (one behind on the node set, or failing over):
            // serve it; the next placement change decides again.
            info!(site = %self.host, "a request arrived for a site placed on another node; keeping it here");
            self.stay();
        }
        if let Some(cur) = &self.current {
            let in_flight = self.in_flight();
            let result = if !cur.answered && in_flight >= limit {
                Err(AcquireError::StartQueueFull { waiting: in_flight })
            } else {
                if !cur.answered {
                    self.ctx.metrics.cold_waits.inc();
                }
                // Claims through the open gate race this one: the limit is checked again
                // in the same step that counts the ticket.
                self.ticket(max)
            };
            let _ = reply.send(result);
            return;
        }
        if self.starting.is_some() {
            if self.pending.len() as u32 >= limit {
                let _ = reply.send(Err(AcquireError::StartQueueFull {
                    waiting: self.pending.len() as u32,
                }));
            } else {
                self.ctx.metrics.cold_waits.inc();
                self.pending.push(reply);
            }
            return;
        }
        if let Some(at) = self.retry_at.filter(|at| *at > Instant::now()) {
            let _ = reply.send(Err(AcquireError::CrashLoop {
                retry_in_secs: at
                    .saturating_duration_since(Instant::now())
                    .as_secs()
                    .max(1),
            }));
            return;
        }
        self.ctx.metrics.cold_waits.inc();
        self.pending.push(reply);
        self.begin_start();
    }

    /// A ticket for the current worker, counted in the gate unless `max` requests (of the
    /// site's limit, if it has one) are already in flight.
    fn ticket(&mut self, max: Option<u32>) -> Result<Ticket, AcquireError> {
        let route = self
            .shared
            .route
            .load_full()
            .filter(|r| r.epoch == self.shared.gate.epoch())
            .expect("the current worker's route is published");
        let room = max.map_or(MAX_COUNT, |m| {
            m.saturating_sub(self.in_flight_retired + self.pending.len() as u32)
        });
        if !self.shared.gate.add(room) {
            return Err(AcquireError::TooManyRequests {
                limit: max.unwrap_or(MAX_COUNT),
            });
        }
        Ok(Ticket::counted(&self.shared, &self.ctx, &route))
    }

    /// A request on a worker that is no longer current ended.
    fn release(&mut self, generation: u64) {
        self.set_in_flight_retired(self.in_flight_retired.saturating_sub(1));
        if let Some(p) = self.proc_mut(generation) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
        self.stop_drained();
    }

    fn set_in_flight_retired(&mut self, n: u32) {
        self.in_flight_retired = n;
        self.shared.retired_in_flight.store(n, Ordering::Release);
    }

    /// Make `proc` the worker requests go to, and publish its route (the gate opens once it
    /// has answered, see `refresh_gate`).
    fn install_current(&mut self, proc: Proc) {
        if let Some(old) = self.take_current() {
            // Not expected: a start is begun only without a current worker. Never leak one.
            self.retiring.push(old);
            let i = self.retiring.len() - 1;
            self.stop_retiring(i, StopReason::Replaced);
        }
        let epoch = self.shared.gate.epoch();
        debug_assert_eq!(
            self.shared.gate.in_flight(),
            0,
            "a fresh epoch counts nothing"
        );
        let socket_path: Arc<std::path::Path> = self
            .serving
            .as_ref()
            .map(|(_, p)| Arc::from(p.as_path()))
            .unwrap_or_else(|| Arc::from(std::path::Path::new("")));
        // The same path unless the socket was bound ahead under another name (ready.rs).
        let socket_address = match &self.serving {
            Some((l, p)) if l.address != *p => Arc::from(l.address.as_path()),
            _ => socket_path.clone(),
        };
        self.shared.route.store(Some(Arc::new(Route {
            epoch,
            generation: proc.generation,
            pid: proc.worker.pid(),
            socket_path,
            socket_address,
            request_timeout: Duration::from_secs(proc.spec.request_timeout),
            memory_limit_mb: proc.spec.memory_limit_mb,
            max_concurrent_requests: proc.spec.max_concurrent_requests,
        })));
        self.current = Some(proc);
        self.publish_current();
    }

    /// The current worker stops being current: close the gate, retire its epoch, and take
    /// over the count of its requests still in flight (they now report to the actor).
    fn take_current(&mut self) -> Option<Proc> {
        let mut cur = self.current.take()?;
        let in_flight = self.shared.gate.retire();
        self.watching = false;
        cur.in_flight += in_flight;
        self.set_in_flight_retired(self.in_flight_retired + in_flight);
        self.publish_current();
        Some(cur)
    }

    /// Stop replaced workers that have finished their last request.
    fn stop_drained(&mut self) {
        let mut to_stop = Vec::new();
        for (i, p) in self.retiring.iter().enumerate() {
            if p.in_flight == 0 && p.stopping.is_none() && p.drain_then_stop.is_some() {
                to_stop.push(i);
            }
        }
        for i in to_stop {
            let reason = self.retiring[i]
                .drain_then_stop
                .unwrap_or(StopReason::Replaced);
            self.stop_retiring(i, reason);
        }
    }

    fn proc_mut(&mut self, generation: u64) -> Option<&mut Proc> {
        self.current
            .iter_mut()
            .chain(self.candidate.iter_mut())
            .chain(self.retiring.iter_mut())
            .find(|p| p.generation == generation)
    }

    fn answered(&mut self, generation: u64, accepted: std::time::Instant) {
        if let Some(cur) = self.current.as_mut().filter(|c| c.generation == generation) {
            if !cur.answered {
                // From now on requests claim it through the gate (`refresh_gate`).
                cur.answered = true;
                // The first answer of a new worker: one cold start, timed from the request.
                self.ctx
                    .metrics
                    .cold_start
                    .with_label_values(&[cur.launcher.as_str()])
                    .observe(accepted.elapsed().as_secs_f64());
                if cur.weight == BootWeight::Lowest {
                    let (ctx, host) = (self.ctx.clone(), self.host.clone());
                    tokio::spawn(async move { ctx.launcher.answered(&host).await });
                }
                self.failures = 0;
                self.retry_at = None;
                self.shared
                    .answered_generation
                    .store(generation, Ordering::Release);
            }
        }
    }

    fn recycle(&mut self, generation: u64) {
        let stuck = self
            .current
            .as_ref()
            .is_some_and(|c| c.generation == generation && c.answered);
        if stuck && !self.removed && !self.shutting_down {
            warn!(site = %self.host, "a request timed out; recycling the worker");
            self.stop_current(StopReason::Recycled);
            // Requests waiting in the shared socket's backlog go to the new worker.
            if self.starting.is_none() {
                self.begin_start();
            }
        }
    }

    fn placement(&mut self, here: bool) {
        if self.removed || self.shutting_down || self.left {
            return;
        }
        if here {
            // While its files are being removed the give-back completes; `forgotten` decides.
            if self.leaving && !self.forgetting {
                info!(site = %self.host, "the site is placed on this node again; keeping it");
                self.stay();
            }
            return;
        }
        if !self.leaving {
            info!(site = %self.host, in_flight = self.in_flight(),
                "the site is placed on another node now; giving it back here once idle");
            self.leaving = true;
            self.shared.leaving.store(true, Ordering::Release);
        }
    }

    fn stay(&mut self) {
        self.leaving = false;
        self.shared.leaving.store(false, Ordering::Release);
    }

    /// Once a site placed elsewhere has nothing in flight and nothing starting: stop its
    /// worker, then (when every process is gone) remove its socket directory and cgroup.
    /// Runs after every message, so the last release or exit moves it on.
    fn give_back_when_idle(&mut self) {
        if !self.leaving || self.forgetting || self.left || self.removed || self.shutting_down {
            return;
        }
        // No claims from now on; the last request in flight on the gate says when it ends.
        self.shared.gate.close();
        if self.shared.gate.watch() {
            self.watching = true;
            return;
        }
        let busy = self.in_flight_retired > 0
            || !self.pending.is_empty()
            || self.starting.is_some()
            || self.candidate_starting.is_some()
            || self.candidate.is_some();
        if busy {
            return;
        }
        self.stop_current(StopReason::Moved);
        if !self.retiring.is_empty() {
            return; // the last exit comes back here
        }
        self.forgetting = true;
        // The agent's end of the socket closes before its directory goes.
        self.serving = None;
        let (ctx, host, tx) = (self.ctx.clone(), self.host.clone(), self.tx.clone());
        tokio::spawn(async move {
            ctx.launcher.forget(&host).await;
            let _ = tx.send(Msg::Forgotten);
        });
    }

    fn forgotten(&mut self) {
        self.forgetting = false;
        if self.removed || self.shutting_down {
            return;
        }
        if self.pending.is_empty() {
            self.left = true;
            info!(site = %self.host, "site given back: it is placed on another node");
            return;
        }
        // Requests came while its files were removed: serve them from a new socket.
        info!(site = %self.host, waiting = self.pending.len(),
            "requests arrived while the site was being given back; keeping it here");
        self.stay();
        self.begin_start();
    }

    fn next_generation(&mut self) -> u64 {
        let g = self.next_generation;
        self.next_generation += 1;
        g
    }

    /// Start a worker for the current spec on the serving socket (bound first if needed).
    fn begin_start(&mut self) {
        let generation = self.next_generation();
        self.starting = Some(generation);
        let (ctx, host, spec, tx) = (
            self.ctx.clone(),
            self.host.clone(),
            self.spec.clone(),
            self.tx.clone(),
        );
        let listener = self.serving.as_ref().map(|(l, _)| l.clone());
        // Alone in the site's group, a booting worker gets the least CPU, so a storm of
        // cold starts can't slow the sites that already serve.
        let alone = self.current.is_none() && self.candidate.is_none() && self.retiring.is_empty();
        let weight = if alone {
            BootWeight::Lowest
        } else {
            BootWeight::Site
        };
        tokio::spawn(async move {
            let result = launch(&ctx, &host, spec, listener, SocketRole::Serving, weight).await;
            report_launch(&tx, generation, Role::Serving, result);
        });
    }

    fn launched(&mut self, generation: u64, result: Result<Launch, AcquireError>) {
        if self.starting == Some(generation) {
            self.starting = None;
        }
        let launch = match result {
            Ok(l) => l,
            Err(e) => {
                warn!(site = %self.host, error = %e, "cannot start worker");
                for reply in self.pending.drain(..) {
                    let _ = reply.send(Err(e.clone()));
                }
                return;
            }
        };
        if self.serving.is_none() {
            self.serving = Some((launch.listener.clone(), launch.listener.path.clone()));
        }
        let stale = *launch.spec != *self.spec;
        let proc = self.adopt(generation, launch);
        self.install_current(proc);
        if self.removed || self.shutting_down {
            let why = self.gone();
            for reply in self.pending.drain(..) {
                let _ = reply.send(Err(why.clone()));
            }
            let reason = if self.removed {
                StopReason::Removed
            } else {
                StopReason::Shutdown
            };
            self.stop_current(reason);
            return;
        }
        if stale {
            // The spec changed while this worker was starting: start one for the new spec;
            // waiting requests stay in the socket's backlog for it.
            self.stop_current(StopReason::Replaced);
            self.begin_start();
            return;
        }
        let timeout = self.ctx.cfg().start_timeout;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = tx.send(Msg::StartDeadline { generation });
        });
        for reply in std::mem::take(&mut self.pending) {
            // Their limit was checked when they came.
            let _ = reply.send(self.ticket(None));
        }
    }

    /// A started worker becomes a `Proc` whose exit is watched.
    fn adopt(&mut self, generation: u64, launch: Launch) -> Proc {
        let Launch {
            reservation,
            listener,
            started,
            spec,
            weight,
        } = launch;
        let Started {
            worker,
            launcher,
            exited,
        } = started;
        self.ctx
            .metrics
            .spawns
            .with_label_values(&[launcher.as_str()])
            .inc();
        self.ctx.capacity.add_running(
            &self.host,
            Running {
                shared: self.shared.clone(),
                tx: self.tx.clone(),
            },
        );
        self.watch_exit(generation, exited, spec.memory_limit_mb);
        info!(site = %self.host, pid = worker.pid(), generation, "worker running");
        Proc {
            generation,
            worker,
            launcher,
            _reservation: reservation,
            listener,
            spec,
            started: Instant::now(),
            answered: false,
            weight,
            in_flight: 0,
            stopping: None,
            drain_then_stop: None,
        }
    }

    fn watch_exit(&self, generation: u64, exited: BoxFut<Exit>, memory_limit_mb: Option<u64>) {
        let (ctx, shared, tx) = (self.ctx.clone(), self.shared.clone(), self.tx.clone());
        tokio::spawn(async move {
            let exit = exited.await;
            let kills = ctx.launcher.oom_kills(&shared.host).await;
            let oom = shared.note_oom_kills(kills, &ctx, memory_limit_mb);
            let _ = tx.send(Msg::Exited {
                generation,
                exit,
                oom,
            });
        });
    }

    /// Tell readers outside the actor which worker is current.
    fn publish_current(&self) {
        let (generation, pid, answered) = match &self.current {
            Some(c) => (c.generation, c.worker.pid(), c.answered),
            None => (0, 0, false),
        };
        self.shared
            .current_generation
            .store(generation, Ordering::Release);
        self.shared.current_pid.store(pid, Ordering::Release);
        if answered {
            self.shared
                .answered_generation
                .store(generation, Ordering::Release);
        }
    }

    fn start_deadline(&mut self, generation: u64) {
        let stuck = self
            .current
            .as_ref()
            .is_some_and(|c| c.generation == generation && !c.answered && c.stopping.is_none())
            && self.in_flight() > 0;
        if !stuck {
            return;
        }
        let secs = self.ctx.cfg().start_timeout.as_secs();
        self.ctx.metrics.start_timeouts.inc();
        let pid = self.current.as_ref().map_or(0, |c| c.worker.pid());
        warn!(site = %self.host, pid, waiting = self.in_flight(), timeout_secs = secs, "worker did not answer in time; killing it");
        self.fail_start(format!(
            "the worker did not answer within {secs} s of starting"
        ));
        self.stop_current(StopReason::StartTimeout);
        if let Some(p) = self.retiring.last() {
            p.worker.kill();
        }
    }

    /// Record a failed start: back off, and reset the requests waiting in the socket backlog
    /// (closing the agent's end of the socket) so they answer 503 now, not at their timeout.
    fn fail_start(&mut self, why: String) {
        self.failures += 1;
        let max = self.ctx.cfg().max_crash_backoff;
        self.retry_at = (self.failures > 1).then(|| {
            let exp = Duration::from_secs(1 << (self.failures - 2).min(10));
            Instant::now() + exp.min(max)
        });
        self.shared.failures().last_failure = Some((std::time::Instant::now(), why));
        if self.in_flight() > 0 {
            self.serving = None;
        }
    }

    fn exited(&mut self, generation: u64, exit: Exit, oom: bool) {
        let why = if oom {
            format!(
                "killed for exceeding its memory limit of {} MiB",
                self.spec.memory_limit_mb.unwrap_or(0)
            )
        } else {
            format!("worker exited ({}): {}", exit.status, exit.last_line)
        };
        let is_current = self
            .current
            .as_ref()
            .is_some_and(|c| c.generation == generation);
        if let Some(cur) = is_current.then(|| self.take_current()).flatten() {
            if cur.stopping.is_some() {
                info!(site = %self.host, pid = cur.worker.pid(), status = %exit.status, "worker stopped");
            } else {
                self.crashed(cur, why);
            }
        } else if let Some(cand) = self.candidate.take_if(|c| c.generation == generation) {
            if cand.stopping.is_none() {
                self.spec_failed(why);
            }
            drop(cand);
        } else if let Some(i) = self
            .retiring
            .iter()
            .position(|p| p.generation == generation)
        {
            let p = self.retiring.remove(i);
            info!(site = %self.host, pid = p.worker.pid(), status = %exit.status, "worker stopped");
        }
        if self.current.is_none() && self.candidate.is_none() && self.retiring.is_empty() {
            self.ctx.capacity.remove_running(&self.host);
        }
    }

    fn crashed(&mut self, cur: Proc, why: String) {
        self.ctx.metrics.worker_crashes.inc();
        warn!(site = %self.host, pid = cur.worker.pid(), lived_ms = cur.started.elapsed().as_millis() as u64,
            answered = cur.answered, in_flight = self.in_flight(), reason = %why, "worker exited unexpectedly");
        if cur.answered {
            // A worker that served requests and then died is not a start failure. The
            // requests it had accepted are lost with it; those still waiting in the
            // socket's backlog are served by a new worker, started now.
            self.shared.failures().last_failure = Some((std::time::Instant::now(), why));
            drop(cur);
            if self.in_flight() > 0
                && !self.removed
                && !self.shutting_down
                && self.starting.is_none()
            {
                self.begin_start();
            }
        } else {
            drop(cur);
            self.fail_start(why);
        }
    }

    /// Move the current worker to the retiring ones and ask it to stop.
    fn stop_current(&mut self, reason: StopReason) {
        if let Some(cur) = self.take_current() {
            self.retiring.push(cur);
            let i = self.retiring.len() - 1;
            self.stop_retiring(i, reason);
        }
    }

    fn stop_retiring(&mut self, i: usize, reason: StopReason) {
        let p = &mut self.retiring[i];
        if p.stopping.is_some() {
            return;
        }
        p.stopping = Some(reason);
        self.ctx
            .metrics
            .worker_stops
            .with_label_values(&[reason.as_str()])
            .inc();
        info!(site = %self.host, pid = p.worker.pid(), reason = reason.as_str(), "stopping worker");
        p.worker.terminate();
        let (generation, grace, tx) = (p.generation, self.ctx.cfg().stop_grace, self.tx.clone());
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let _ = tx.send(Msg::GraceOver { generation });
        });
    }

    fn stop_candidate(&mut self, reason: StopReason) {
        self.candidate_starting = None;
        if let Some(c) = self.candidate.take() {
            self.retiring.push(c);
            let i = self.retiring.len() - 1;
            self.stop_retiring(i, reason);
        }
    }

    /// Removal or shutdown: stop every worker; the actor ends once they are gone.
    fn stop_all(&mut self, reason: StopReason) {
        match reason {
            StopReason::Removed => self.removed = true,
            _ => self.shutting_down = true,
        }
        let why = self.gone();
        for reply in self.pending.drain(..) {
            let _ = reply.send(Err(why.clone()));
        }
        self.stop_current(reason);
        self.stop_candidate(reason);
        for i in 0..self.retiring.len() {
            self.stop_retiring(i, reason);
        }
    }

    fn spec_changed(&mut self, spec: Arc<SiteSpec>) {
        if *spec == *self.spec {
            // Back to the serving spec: forget the change that was tried.
            if self.new_spec.take().is_some() {
                self.stop_candidate(StopReason::Replaced);
                self.spec_failure = None;
                info!(site = %self.host, "site spec changed back to the one serving");
            }
            return;
        }
        if self.new_spec.as_ref().is_some_and(|n| **n == *spec) {
            return; // already being tried, or already failed
        }
        info!(site = %self.host, "site spec changed");
        self.stop_candidate(StopReason::Replaced);
        self.spec_failure = None;
        if self.leaving {
            // Placed on another node (a changed pin, typically): no new worker here. The
            // current one finishes its requests; the spec applies if the site is kept.
            self.new_spec = None;
            self.spec = spec;
            if let Some(mut old) = self.take_current() {
                old.drain_then_stop = Some(StopReason::Moved);
                self.retiring.push(old);
                self.stop_drained();
            }
            return;
        }
        let serving = self
            .current
            .as_ref()
            .is_some_and(|c| c.answered && c.stopping.is_none());
        if !serving {
            // No worker has proven itself: the new spec applies at once. A start in
            // progress sees the change when it reports, and starts again.
            self.new_spec = None;
            self.spec = spec;
            self.failures = 0;
            self.retry_at = None;
            if self.current.is_some() {
                self.stop_current(StopReason::Replaced);
                if self.in_flight() > 0 && self.starting.is_none() {
                    self.begin_start();
                }
            }
            return;
        }
        // A worker serves: the new one gets its own socket and must answer a request before
        // any client request goes to it.
        self.new_spec = Some(spec.clone());
        let generation = self.next_generation();
        self.candidate_starting = Some(generation);
        let (ctx, host, tx) = (self.ctx.clone(), self.host.clone(), self.tx.clone());
        tokio::spawn(async move {
            let result = launch(
                &ctx,
                &host,
                spec,
                None,
                SocketRole::Candidate,
                BootWeight::Site,
            )
            .await;
            report_launch(&tx, generation, Role::Candidate, result);
        });
    }

    fn candidate_launched(&mut self, generation: u64, result: Result<Launch, AcquireError>) {
        if self.candidate_starting != Some(generation) {
            // Superseded while starting: stop what started.
            if let Ok(launch) = result {
                let p = self.adopt(generation, launch);
                self.retiring.push(p);
                let i = self.retiring.len() - 1;
                self.stop_retiring(i, StopReason::Replaced);
            }
            return;
        }
        self.candidate_starting = None;
        let launch = match result {
            Ok(l) => l,
            Err(e) => {
                self.spec_failed(e.to_string());
                return;
            }
        };
        let proc = self.adopt(generation, launch);
        let (ctx, host, tx, listener) = (
            self.ctx.clone(),
            self.host.clone(),
            self.tx.clone(),
            proc.listener.clone(),
        );
        let timeout = self.ctx.cfg().start_timeout;
        self.candidate = Some(proc);
        tokio::spawn(async move {
            let result =
                match tokio::time::timeout(timeout, ctx.launcher.probe(&host, &listener)).await {
                    Ok(answered) => answered,
                    Err(_) => Err(format!(
                        "the new worker did not answer within {} s",
                        timeout.as_secs()
                    )),
                };
            let _ = tx.send(Msg::Probed { generation, result });
        });
    }

    fn probed(&mut self, generation: u64, result: Result<(), String>) {
        if !self
            .candidate
            .as_ref()
            .is_some_and(|c| c.generation == generation && c.stopping.is_none())
        {
            return;
        }
        // The switch happens here, in the actor, so nothing can come between the decision
        // and the rename.
        let promoted = result.and_then(|()| {
            let cand = self.candidate.as_ref().expect("candidate was just checked");
            self.ctx.launcher.promote(&self.host, &cand.listener)
        });
        let path = match promoted {
            Ok(path) => path,
            Err(why) => {
                self.spec_failed(why);
                return;
            }
        };
        let mut new = self.candidate.take().expect("candidate was just checked");
        new.answered = true;
        // The old worker finishes the requests it has (and those in its socket's backlog,
        // which only its tickets can have reached), then stops.
        if let Some(mut old) = self.take_current() {
            old.drain_then_stop = Some(StopReason::Replaced);
            self.retiring.push(old);
        }
        self.serving = Some((new.listener.clone(), path));
        self.spec = new.spec.clone();
        self.new_spec = None;
        self.spec_failure = None;
        self.failures = 0;
        self.retry_at = None;
        info!(site = %self.host, pid = new.worker.pid(), generation, "the new spec's worker answered; it serves from now on");
        self.install_current(new);
        self.stop_drained();
    }

    /// The changed spec's worker failed: the previous one keeps serving.
    fn spec_failed(&mut self, why: String) {
        self.ctx.metrics.spec_change_failures.inc();
        warn!(site = %self.host, reason = %why, "the changed spec's worker failed; the previous spec's worker keeps serving");
        self.spec_failure = Some(why);
        if let Some(c) = self.candidate.as_ref() {
            c.worker.kill();
        }
        self.stop_candidate(StopReason::SpecFailed);
    }

    fn housekeeping(&self) {
        if self.current.is_none() && self.candidate.is_none() {
            return;
        }
        let (ctx, shared, limit) = (
            self.ctx.clone(),
            self.shared.clone(),
            self.spec.memory_limit_mb,
        );
        tokio::spawn(async move {
            let kills = ctx.launcher.oom_kills(&shared.host).await;
            shared.note_oom_kills(kills, &ctx, limit);
        });
    }

    fn status(&self) -> SiteStatus {
        let in_flight = self.in_flight();
        let state = match (&self.current, self.starting, self.retiring.is_empty()) {
            (Some(c), _, _) if c.answered => "ready",
            (Some(_), _, _) | (None, Some(_), _) => "starting",
            (None, None, false) => "draining",
            (None, None, true) => "idle",
        };
        SiteStatus {
            host: self.host.clone(),
            user: self.spec.user.clone(),
            state,
            pid: self.current.as_ref().map(|c| c.worker.pid()),
            stopping: self.retiring.iter().map(|p| p.worker.pid()).collect(),
            candidate: self.candidate.as_ref().map(|c| c.worker.pid()),
            in_flight,
            idle_for_secs: if in_flight == 0 {
                self.last_active().elapsed().as_secs()
            } else {
                0
            },
            memory_bytes: None,
            memory_limit_bytes: self.spec.memory_limit_mb.map(|mb| mb * 1024 * 1024),
            cpu_seconds: None,
            failures: self.failures,
            note: match (&self.spec_failure, self.leaving) {
                (Some(why), _) => Some(format!("serving the previous spec: {why}")),
                (None, true) => Some("placed on another node: given back once idle".to_string()),
                (None, false) => None,
            },
        }
    }
}

/// Reserve a slot of the node, bind the socket if there is none, start the worker.
async fn launch(
    ctx: &Arc<Ctx>,
    host: &str,
    spec: Arc<SiteSpec>,
    listener: Option<Arc<Listener>>,
    role: SocketRole,
    weight: BootWeight,
) -> Result<Launch, AcquireError> {
    let reservation = Capacity::reserve(ctx, host).await?;
    let (listener, started) = match listener {
        Some(listener) => {
            let started = ctx.launcher.start(host, &spec, &listener, weight).await;
            (listener, started)
        }
        None => {
            let (listener, started) = ctx
                .launcher
                .clone()
                .bind_and_start(host, &spec, role, weight)
                .await
                .map_err(|e| AcquireError::Start(e.0))?;
            (listener, Ok(started))
        }
    };
    let started = started.map_err(|e| AcquireError::Start(e.0))?;
    Ok(Launch {
        reservation,
        listener,
        started,
        spec,
        weight,
    })
}

/// Hand a start's result to its actor; if the actor is gone, end the worker.
fn report_launch(
    tx: &UnboundedSender<Msg>,
    generation: u64,
    role: Role,
    result: Result<Launch, AcquireError>,
) {
    if let Err(tokio::sync::mpsc::error::SendError(Msg::Launched {
        result: Ok(launch), ..
    })) = tx.send(Msg::Launched {
        generation,
        role,
        result,
    }) {
        launch.started.worker.kill();
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
