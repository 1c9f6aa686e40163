//! The node's worker limit, held atomically: a start first takes a [`Reservation`], which
//! the worker keeps until its whole process tree is gone (so stopping workers count), and
//! which is taken by one compare-and-swap, so concurrent starts can never overshoot. When
//! the node is full, the least recently used idle worker of another site is asked to stop
//! and the start waits for its slot.
//!
//! Only sites with a live worker are listed here (at most `max_workers`), so finding a
//! victim never walks every site of the node.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc::UnboundedSender, oneshot, Notify};
use tracing::warn;

use super::actor::Msg;
use super::ticket::SiteShared;
use super::{AcquireError, Ctx};

const MIB: u64 = 1024 * 1024;

#[derive(Default)]
pub struct Capacity {
    /// Reservations held: workers starting, running or stopping.
    live: AtomicUsize,
    freed: Notify,
    running: Mutex<HashMap<String, Running>>,
}

/// A site with at least one live worker.
#[derive(Clone)]
pub struct Running {
    pub shared: Arc<SiteShared>,
    pub tx: UnboundedSender<Msg>,
}

/// One slot of the node's worker limit; given back on drop.
pub struct Reservation {
    ctx: Arc<Ctx>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ctx.capacity.live.fetch_sub(1, Ordering::AcqRel);
        self.ctx.capacity.freed.notify_waiters();
    }
}

impl Capacity {
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_running(&self, host: &str, site: Running) {
        self.running().insert(host.to_string(), site);
    }

    pub fn remove_running(&self, host: &str) {
        self.running().remove(host);
    }

    /// Sites with a live worker (bounded by `max_workers`).
    pub fn running_sites(&self) -> Vec<(String, Running)> {
        self.running()
            .iter()
            .map(|(h, r)| (h.clone(), r.clone()))
            .collect()
    }

    fn try_take(&self, max: usize) -> bool {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Take a slot for a worker of `host`, evicting idle workers of other sites when the
    /// node is full or over its memory budget. Fails at once when nothing can be evicted.
    pub async fn reserve(ctx: &Arc<Ctx>, host: &str) -> Result<Reservation, AcquireError> {
        let cfg = ctx.cfg();
        let this = &ctx.capacity;
        let mut asked: HashSet<String> = HashSet::new();
        let mut memory_checked = false;
        // Whether a worker this start asked to stop may still free a slot.
        let mut outstanding = false;
        let deadline = tokio::time::Instant::now() + cfg.stop_grace + Duration::from_secs(2);
        loop {
            let freed = this.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            // Memory comes back only once a victim has exited: one eviction per start.
            let over_memory = !memory_checked
                && match cfg.memory_budget_mb {
                    Some(budget) => this.memory_in_use(ctx).await >= budget * MIB,
                    None => false,
                };
            memory_checked = true;
            if !over_memory && this.try_take(cfg.max_workers) {
                return Ok(Reservation { ctx: ctx.clone() });
            }
            let evicted = this.evict_one(host, &mut asked).await;
            if over_memory {
                continue;
            }
            outstanding |= evicted;
            if !outstanding {
                // Counted once, by the request path that refuses (rejected{reason}).
                warn!(site = %host, live = this.live(), "node full: no idle worker to stop");
                return Err(AcquireError::AtCapacity);
            }
            // A slot comes back when an evicted worker's process tree is gone.
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                warn!(site = %host, live = this.live(), "node full: evicted workers did not exit in time");
                return Err(AcquireError::AtCapacity);
            }
        }
    }

    /// Ask the least recently used idle worker of another site to stop; true if one agreed.
    async fn evict_one(&self, except: &str, asked: &mut HashSet<String>) -> bool {
        loop {
            let victim = self
                .running()
                .iter()
                .filter(|(h, r)| {
                    h.as_str() != except
                        && !asked.contains(h.as_str())
                        && r.shared.gate.in_flight() == 0
                })
                .min_by_key(|(_, r)| r.shared.last_active_ms.load(Ordering::Acquire))
                .map(|(h, r)| (h.clone(), r.tx.clone()));
            let Some((host, tx)) = victim else {
                return false;
            };
            asked.insert(host);
            let (reply, agreed) = oneshot::channel();
            if tx.send(Msg::Evict { reply }).is_ok() && agreed.await.unwrap_or(false) {
                return true;
            }
        }
    }

    /// Bytes charged to the cgroups of sites with a worker.
    async fn memory_in_use(&self, ctx: &Ctx) -> u64 {
        let mut total = 0;
        for (host, _) in self.running_sites() {
            total += ctx.launcher.memory_bytes(&host).await.unwrap_or(0);
        }
        total
    }
}
