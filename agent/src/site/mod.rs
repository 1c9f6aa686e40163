//! The sites of this node (DESIGN.md, decision 7 and "Per-site worker lifecycle").
//!
//! Each site that received a request here has an actor ([`actor`]): a task that owns the
//! site's state and is fed messages. The registry below only finds (or creates) a site's
//! actor. A request to a site whose worker is ready claims it through the site's [`gate`]
//! with atomics only, and its [`Ticket`]'s drop releases it the same way; the actor hears of
//! a request only when its state must change (a start, a drain, a give-back, the end of the
//! last request when an idle stop waits for it). Every other request sends `Acquire`.
//! Nothing on the request path locks anything shared by all sites (the registry is a
//! sharded map; the node's worker limit is an atomic, see [`capacity`]).
//!
//! - `actor.rs`: the per-site state machine.
//! - `capacity.rs`: the node's worker limit and eviction.
//! - `gate.rs`: the lock-free claim on a ready worker, and its protocol with the actor.
//! - `placement.rs`: whether a site is still this node's (else it is given back).
//! - `ticket.rs`: what a request holds; what readers outside an actor may see.

mod actor;
mod capacity;
mod gate;
mod placement;
#[cfg(test)]
mod tests;
mod ticket;

pub use ticket::{AcquireError, SiteStatus, StopReason, Ticket};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use roost_proto::{Informer, NodeInfo, SiteSpec};
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio::sync::oneshot;
use tracing::info;

use crate::config::Config;
use crate::launch::Launcher;
use crate::metrics::Metrics;
use actor::{Actor, Msg};
use capacity::Capacity;
use ticket::SiteShared;

const MIB: u64 = 1024 * 1024;
/// How long `/sites` waits for one site's actor to describe itself.
const STATUS_WAIT: Duration = Duration::from_secs(1);
/// How often a request follows a site's actor that ended by giving the site back.
const GIVE_BACK_RETRIES: usize = 3;

/// What every actor shares: settings, metrics, the launcher, the node's limit.
pub struct Ctx {
    /// Swapped whole on SIGHUP: limits and timeouts are read per use, never cached.
    cfg: Arc<ArcSwap<Config>>,
    pub metrics: Arc<Metrics>,
    pub launcher: Arc<dyn Launcher>,
    pub capacity: Capacity,
    /// Requests holding a ticket on this node.
    pub in_flight: AtomicU64,
    actors: DashMap<String, Handle>,
    started: tokio::time::Instant,
    shutting_down: AtomicBool,
    /// Kill workers over their memory limit from `/proc` (nodes without cgroups).
    rss_watchdog: bool,
    /// Where actors and their tasks run (the control runtime, never pingora's).
    runtime: tokio::runtime::Handle,
}

impl Ctx {
    pub fn cfg(&self) -> Arc<Config> {
        self.cfg.load_full()
    }

    /// Milliseconds since the agent started (for least-recently-used ordering).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The instant `ms` milliseconds after the agent started (the inverse of `now_ms`).
    pub fn instant_of(&self, ms: u64) -> tokio::time::Instant {
        self.started + Duration::from_millis(ms)
    }
}

/// How the registry reaches a site's actor (`shared.tx`) and its gate.
struct Handle {
    shared: Arc<SiteShared>,
    /// The spec last handed to the actor, to send only changes.
    spec_seen: ArcSwap<SiteSpec>,
}

/// All sites of this node.
pub struct Sites {
    ctx: Arc<Ctx>,
}

impl Sites {
    pub fn new(
        cfg: Arc<ArcSwap<Config>>,
        metrics: Arc<Metrics>,
        launcher: Arc<dyn Launcher>,
        rss_watchdog: bool,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        Arc::new(Self {
            ctx: Arc::new(Ctx {
                cfg,
                metrics,
                launcher,
                capacity: Capacity::default(),
                in_flight: AtomicU64::new(0),
                actors: DashMap::new(),
                started: tokio::time::Instant::now(),
                shutting_down: AtomicBool::new(false),
                rss_watchdog,
                runtime,
            }),
        })
    }

    /// Apply re-read settings (SIGHUP). Node identity, addresses and the state directory
    /// are fixed for the process's life; the caller keeps those from the running config.
    pub fn reconfigure(&self, cfg: Arc<Config>) {
        info!(max_workers = cfg.max_workers, memory_budget_mb = ?cfg.memory_budget_mb,
            start_timeout = ?cfg.start_timeout, "settings reloaded");
        self.ctx.cfg.store(cfg);
    }

    /// The actor of `host`, started if this is the site's first request here.
    fn actor(&self, host: &str, spec: &Arc<SiteSpec>) -> Arc<SiteShared> {
        if let Some(h) = self.ctx.actors.get(host) {
            return h.shared.clone();
        }
        let h = self.ctx.actors.entry(host.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let shared = Arc::new(SiteShared::new(host, tx, self.ctx.now_ms()));
            let actor = Actor::new(host, spec.clone(), self.ctx.clone(), shared.clone());
            self.ctx.runtime.spawn(actor.run(rx));
            Handle {
                shared,
                spec_seen: ArcSwap::new(spec.clone()),
            }
        });
        h.shared.clone()
    }

    /// Claim a worker for one request to `host`, starting one if none is current.
    pub async fn acquire(&self, host: &str, spec: &Arc<SiteSpec>) -> Result<Ticket, AcquireError> {
        if self.ctx.shutting_down.load(Ordering::Acquire) {
            return Err(AcquireError::ShuttingDown);
        }
        // The fast path: a ready worker is claimed without waking the site's actor.
        let claimed = self
            .ctx
            .actors
            .get(host)
            .and_then(|h| Ticket::claim(&h.shared, &self.ctx));
        if let Some(claimed) = claimed {
            return claimed;
        }
        let gone = || {
            if self.ctx.shutting_down.load(Ordering::Acquire) {
                AcquireError::ShuttingDown
            } else {
                AcquireError::Removed
            }
        };
        // An actor that just gave its site back (placed elsewhere) ends; the request then
        // goes to a fresh one. More than one such race in a row means something else.
        for _ in 0..GIVE_BACK_RETRIES {
            if self.ctx.shutting_down.load(Ordering::Acquire) {
                return Err(AcquireError::ShuttingDown);
            }
            let shared = self.actor(host, spec);
            let (reply, answer) = oneshot::channel();
            let answered = match shared.tx.send(Msg::Acquire { reply }) {
                Ok(()) => answer.await.ok(),
                Err(_) => None,
            };
            match answered {
                Some(result) => return result,
                None if shared.gave_back.load(Ordering::Acquire) => continue,
                None => return Err(gone()),
            }
        }
        Err(gone())
    }

    /// Worker slots held (starting, running or stopping workers) and the node's limit.
    pub fn capacity(&self) -> (usize, usize) {
        (self.ctx.capacity.live(), self.ctx.cfg().max_workers)
    }

    /// Requests in flight on this node.
    pub fn in_flight(&self) -> u64 {
        self.ctx.in_flight.load(Ordering::Acquire)
    }

    /// Bring the actors in line with the sites and nodes in etcd: removed sites stop, changed
    /// specs go to their actor, and sites that placement (over `nodes`) puts on another node
    /// are given back once idle. Visits only sites that have an actor on this node.
    pub fn reconcile(
        &self,
        snapshot: &roost_proto::Snapshot<SiteSpec>,
        nodes: &BTreeMap<String, NodeInfo>,
    ) {
        let me = self.ctx.cfg().node_id.clone();
        for h in self.ctx.actors.iter() {
            let Some(spec) = snapshot.items.get(h.key()) else {
                let _ = h.shared.tx.send(Msg::Removed);
                continue;
            };
            // Placement first: a site pinned elsewhere starts no new spec's worker here.
            let here = placement::placed_here(h.key(), spec.node.as_deref(), nodes, &me);
            // Only a change of decision is news to the actor.
            if here == h.shared.leaving.load(Ordering::Acquire) {
                let _ = h.shared.tx.send(Msg::Placement { here });
            }
            if !Arc::ptr_eq(spec, &h.spec_seen.load()) {
                h.spec_seen.store(spec.clone());
                let _ = h.shared.tx.send(Msg::SpecChanged(spec.clone()));
            }
        }
    }

    /// Every site's state that has an actor here, for `/sites`; cgroup reads run off the
    /// async threads.
    pub async fn status(&self) -> Vec<SiteStatus> {
        let all: Vec<_> = self
            .ctx
            .actors
            .iter()
            .map(|h| h.shared.tx.clone())
            .collect();
        self.status_of(all).await
    }

    /// The state of sites with a live worker only (at most `max_workers`), for `/metrics`:
    /// a scrape costs the same on a node that has served 100,000 sites.
    pub async fn status_running(&self) -> Vec<SiteStatus> {
        let running = self
            .ctx
            .capacity
            .running_sites()
            .into_iter()
            .map(|(_, r)| r.tx)
            .collect();
        self.status_of(running).await
    }

    async fn status_of(&self, actors: Vec<UnboundedSender<Msg>>) -> Vec<SiteStatus> {
        let asks: Vec<_> = actors
            .into_iter()
            .filter_map(|tx| {
                let (reply, answer) = oneshot::channel();
                tx.send(Msg::Status { reply }).ok().map(|_| answer)
            })
            .collect();
        let mut out = Vec::with_capacity(asks.len());
        for answer in asks {
            if let Ok(Ok(s)) = tokio::time::timeout(STATUS_WAIT, answer).await {
                out.push(s);
            }
        }
        for s in out.iter_mut().filter(|s| s.pid.is_some()) {
            s.memory_bytes = self.ctx.launcher.memory_bytes(&s.host).await;
            s.cpu_seconds = self.ctx.launcher.cpu_seconds(&s.host).await;
        }
        out.sort_by(|a, b| a.host.cmp(&b.host));
        out
    }

    /// Stop every worker (agent shutdown) and wait until they are gone or the grace ends.
    /// Requests arriving from now on are refused with 503, never 404.
    pub async fn shutdown(&self) {
        self.ctx.shutting_down.store(true, Ordering::Release);
        let dones: Vec<_> = self
            .ctx
            .actors
            .iter()
            .filter_map(|h| {
                let (done, finished) = oneshot::channel();
                h.shared
                    .tx
                    .send(Msg::Shutdown { done })
                    .ok()
                    .map(|_| finished)
            })
            .collect();
        let deadline =
            tokio::time::Instant::now() + self.ctx.cfg().stop_grace + Duration::from_secs(1);
        for finished in dones {
            let _ = tokio::time::timeout_at(deadline, finished).await;
        }
        self.ctx.launcher.shutdown().await;
    }

    /// Periodic work for sites with a worker (at most `max_workers` of them): OOM counters; the RSS watchdog where there are no cgroups.
    async fn housekeeping(&self) {
        let running = self.ctx.capacity.running_sites();
        for (_, site) in &running {
            let _ = site.tx.send(Msg::Tick);
        }
        if !self.ctx.rss_watchdog {
            return;
        }
        let limited: HashMap<i32, (u64, UnboundedSender<Msg>)> = running
            .into_iter()
            .filter_map(|(host, site)| {
                let limit = self
                    .ctx
                    .actors
                    .get(&host)?
                    .spec_seen
                    .load()
                    .memory_limit_mb?;
                let pid = site.shared.current_pid.load(Ordering::Acquire);
                (pid > 0).then_some((pid, (limit * MIB, site.tx)))
            })
            .collect();
        if limited.is_empty() {
            return;
        }
        let pids: Vec<i32> = limited.keys().copied().collect();
        let Ok(rss) =
            tokio::task::spawn_blocking(move || crate::launch::watchdog::group_rss(&pids)).await
        else {
            return;
        };
        for (pid, (limit, tx)) in limited {
            if rss.get(&pid).copied().unwrap_or(0) > limit {
                let _ = tx.send(Msg::MemoryLimit { pid });
            }
        }
    }
}

/// Drive the sites from the control runtime: reconcile on every change of the site or the
/// node snapshot; housekeeping every second.
pub async fn run(
    sites: Arc<Sites>,
    informer: Arc<Informer<SiteSpec>>,
    node_informer: Arc<Informer<NodeInfo>>,
) {
    let mut site_changes = informer.subscribe();
    let mut node_changes = node_informer.subscribe();
    let mut last_sites: Option<Arc<roost_proto::Snapshot<SiteSpec>>> = None;
    let mut last_nodes: Option<Arc<roost_proto::Snapshot<NodeInfo>>> = None;
    // Placement ranks over a plain map; rebuilt only when the node snapshot changes.
    let mut nodes = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = site_changes.changed() => {}
            _ = node_changes.changed() => {}
            _ = tick.tick() => {
                sites.housekeeping().await;
                continue;
            }
        }
        let (snap, node_snap) = (informer.snapshot(), node_informer.snapshot());
        let sites_same = last_sites.as_ref().is_some_and(|l| Arc::ptr_eq(l, &snap));
        let nodes_same = last_nodes
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(l, &node_snap));
        // Most wake-ups are progress notifications: nothing changed.
        if sites_same && nodes_same {
            continue;
        }
        if !nodes_same {
            nodes = if node_informer.is_synced() {
                node_snap
                    .items
                    .iter()
                    .map(|(id, n)| (id.clone(), (**n).clone()))
                    .collect()
            } else {
                // A partial list must not move sites away: placement sees no nodes, keeps all.
                BTreeMap::new()
            };
        }
        if informer.is_synced() {
            sites.reconcile(&snap, &nodes);
        }
        last_sites = Some(snap);
        last_nodes = Some(node_snap);
    }
}
