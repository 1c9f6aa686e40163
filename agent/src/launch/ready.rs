//! Ready-made start resources: a socket directory, a log file and (cgroup v1) a site
//! group, made while the agent is idle and renamed into a site's name when a never-started
//! site starts.
//!
//! A cold start's preparation runs between the fork request and the child's first step, on
//! the same two CPUs as the zygote's handover and the child's boot (`perf sched` of
//! `bench/cold-start.sh`: the child waits for it). Two parts of it are filesystem work that
//! does not depend on the site:
//! - the socket's directory, the socket and the site's log file: three new inodes, ~130 µs
//!   each on this ext4 (two of them made ahead here);
//! - on cgroup v1, five `mkdir`s and eight limit writes, 0.5–0.6 ms under a start's load.
//!
//! Made ahead, each is a rename at the start (~25 µs for a directory or file, a few µs per
//! cgroup hierarchy):
//! - a socket: `sites/.ready-<n>/sock`, in a directory root-only like a site's, which is
//!   renamed (`RENAME_NOREPLACE`) to `sites/<host>` when the site has no directory. Binding
//!   was 130–450 µs on this ext4 (a new inode). A unix socket keeps the path it was bound at
//!   as its address, and the agent's connection pool (pingora) reuses a connection only if
//!   its peer's address is the peer's it was asked for, so the agent's peer for such a
//!   socket carries the placeholder path as its address, and a connector that connects to
//!   `sites/<host>/sock` ([`super::Listener::address`], `preconnect::ConnectAt`).
//! - a log: `logs/.ready-<n>.log`, empty, root's, 0640 like a site's, kept open; renamed
//!   to `logs/<host>.log` when the site has no log yet.
//! - an output pump (`sitelog::ReadyPump`): the pipe for a worker's stdout and stderr and
//!   the thread that drains it, which waits on its pipe. Spawning that thread was ~150 µs
//!   of the launcher's part of a start; taking a ready one is ~30 µs.
//! - a group (v1 only: v2 refuses renames) named `.ready-<n>` beside the sites' groups, with
//!   the limits a site with the node's defaults starts under; renamed to `<host>`, then only
//!   a site whose limits differ has them written.
//!
//! Host names never start with a dot, so a placeholder can never meet a site's name. A few
//! of each are kept; one low-priority thread tops them up once starts have been quiet for
//! [`QUIET`], so the refill never competes with the boot that just took one. Only the first
//! take after a refill wakes that thread (a start takes several things). The agent's
//! start removes what a previous run left (`sites/.ready-*` and `logs/.ready-*` here, the
//! groups with every other group in its own).

use std::fs;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tracing::{debug, warn};

use super::cgroup::{Cgroups, Limits, SiteCgroup};
use super::socket;
use super::Listener;
use crate::config::Config;
use crate::sitelog::{self, ReadyPump, SiteLog};

/// How many of each are kept ready: a burst of this many first hits finds them.
const READY: usize = 4;
/// Starts must have been quiet this long before the refill runs.
const QUIET: Duration = Duration::from_millis(50);
const PLACEHOLDER_PREFIX: &str = ".ready-";

/// A group made ahead for no site yet (empty, or holding a zygote's spare), the limits
/// written to it, and its placeholder name.
pub struct ReadyGroup {
    placeholder: String,
    pub(super) cgroup: Box<SiteCgroup>,
    limits: Limits,
}

impl ReadyGroup {
    pub fn name(&self) -> &str {
        &self.placeholder
    }

    /// The group under `host`'s name, and the limits it has; the group back when `host`
    /// has a group already.
    pub fn claim(self, host: &str) -> Result<(SiteCgroup, Limits), ReadyGroup> {
        match self.cgroup.rename_to(host) {
            Ok(cgroup) => Ok((cgroup, self.limits)),
            Err(e) => {
                debug!(site = %host, error = %e, "cannot rename a ready cgroup to the site's");
                Err(self)
            }
        }
    }
}

#[derive(Default)]
struct Pool {
    /// Placeholders of socket directories, with the socket bound in each.
    sockets: Vec<(String, UnixListener, PathBuf)>,
    /// Groups a spare was offered but did not become the site's: removed once empty.
    orphans: Vec<SiteCgroup>,
    /// Placeholders of empty log files, open.
    logs: Vec<(String, fs::File)>,
    /// Output pumps whose thread waits for a worker already.
    pumps: Vec<ReadyPump>,
    groups: Vec<ReadyGroup>,
}

pub struct Ready {
    cfg: Arc<ArcSwap<Config>>,
    cgroups: Cgroups,
    /// The limits a site with the node's defaults starts under.
    starting_limits: fn(&Config) -> Limits,
    pool: Mutex<Pool>,
    refill: Mutex<mpsc::Sender<()>>,
    /// Whether the refill thread was told already: a start takes several things, and only
    /// the first wakes it (a wake-up is a context switch on the start's path).
    refill_asked: AtomicBool,
    /// When something was last taken (ns since `epoch`): the refill waits for quiet after it.
    last_take_ns: AtomicU64,
    epoch: Instant,
    next: AtomicU64,
}

impl Ready {
    /// Remove what a previous agent left and start the refill thread, which fills the pool
    /// at once.
    pub fn start(
        cfg: Arc<ArcSwap<Config>>,
        cgroups: Cgroups,
        starting_limits: fn(&Config) -> Limits,
    ) -> std::io::Result<Arc<Self>> {
        remove_leftovers(&cfg.load().state_dir);
        let (tx, rx) = mpsc::channel();
        let ready = Arc::new(Self {
            cfg,
            cgroups,
            starting_limits,
            pool: Mutex::new(Pool::default()),
            refill: Mutex::new(tx),
            refill_asked: AtomicBool::new(false),
            last_take_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            next: AtomicU64::new(0),
        });
        let filler = ready.clone();
        std::thread::Builder::new()
            .name("roost-ready".into())
            .spawn(move || filler.refill_loop(rx))?;
        ready.refill_soon();
        Ok(ready)
    }

    /// A listening socket bound ahead, reached at `sites/<host>/sock` from now on, if one
    /// was ready and `host` has no socket directory; `None`: bind one the usual way.
    pub fn take_socket(&self, host: &str) -> Option<Listener> {
        let (placeholder, socket, address) = self.lock().sockets.pop()?;
        self.refill_soon();
        let state_dir = self.cfg.load().state_dir.clone();
        match socket::claim_ready_socket(&state_dir, &placeholder, host) {
            Ok(path) => Some(Listener {
                socket,
                path,
                address,
            }),
            Err(e) => {
                debug!(site = %host, error = %e, "no ready socket for this site");
                // The site has its directory.
                self.lock().sockets.push((placeholder, socket, address));
                None
            }
        }
    }

    /// A ready log made `host`'s, if one was ready and `host` has no log yet; `None`: open
    /// the site's log the usual way.
    pub fn take_log(&self, host: &str, max_bytes: u64) -> Option<SiteLog> {
        let (placeholder, file) = self.lock().logs.pop()?;
        self.refill_soon();
        let state_dir = self.cfg.load().state_dir.clone();
        match sitelog::claim_ready(&state_dir, &placeholder, host) {
            Ok(()) => Some(SiteLog::ready_made(&state_dir, host, file, max_bytes)),
            Err(_) => {
                // The site has its log from an earlier run.
                self.lock().logs.push((placeholder, file));
                None
            }
        }
    }

    /// An output pump whose thread is running already, if one is ready.
    pub fn take_pump(&self) -> Option<ReadyPump> {
        let pump = self.lock().pumps.pop()?;
        self.refill_soon();
        Some(pump)
    }

    /// An empty group named for `host` and the limits already written to it, if one was
    /// ready and `host` has no group; `None`: make one the usual way.
    pub fn take_group(&self, host: &str) -> Option<(SiteCgroup, Limits)> {
        let ready = self.lock().groups.pop()?;
        self.refill_soon();
        match ready.claim(host) {
            Ok(claimed) => Some(claimed),
            Err(ready) => {
                self.lock().groups.push(ready);
                None
            }
        }
    }

    /// A group a spare was offered and that did not become a site's: removed once the
    /// process that may still be in it has moved to its site's group.
    pub fn orphan(&self, group: ReadyGroup) {
        self.lock().orphans.push(*group.cgroup);
        self.refill_soon();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refill_soon(&self) {
        self.last_take_ns
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if self.refill_asked.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self
            .refill
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(());
    }

    fn refill_loop(&self, rx: mpsc::Receiver<()>) {
        if let Err(e) = super::priority::lower_this_thread() {
            warn!(error = %e, "the ready-made start resources are made at normal CPU priority");
        }
        while rx.recv().is_ok() {
            // Until nothing was taken for `QUIET`.
            loop {
                let last = Duration::from_nanos(self.last_take_ns.load(Ordering::Relaxed));
                let quiet_at = last + QUIET;
                let now = self.epoch.elapsed();
                if now >= quiet_at {
                    break;
                }
                std::thread::sleep(quiet_at - now);
            }
            // Takes from here on ask again, so what they take is made up for too.
            self.refill_asked.store(false, Ordering::Release);
            self.top_up();
        }
    }

    fn top_up(&self) {
        let cfg = self.cfg.load_full();
        while self.lock().sockets.len() < READY {
            let placeholder = self.placeholder();
            match socket::make_ready_socket(&cfg.state_dir, &placeholder) {
                Ok((socket, address)) => self.lock().sockets.push((placeholder, socket, address)),
                Err(e) => {
                    warn!(error = %e, "cannot bind a socket ready for the next start");
                    break;
                }
            }
        }
        while self.lock().logs.len() < READY {
            let placeholder = self.placeholder();
            match sitelog::create_ready(&cfg.state_dir, &placeholder) {
                Ok(file) => self.lock().logs.push((placeholder, file)),
                Err(e) => {
                    warn!(error = %e, "cannot make a log ready for the next start");
                    break;
                }
            }
        }
        while self.lock().pumps.len() < READY {
            match ReadyPump::start() {
                Ok(pump) => self.lock().pumps.push(pump),
                Err(e) => {
                    warn!(error = %e, "cannot start an output pump for the next start");
                    break;
                }
            }
        }
        if !self.cgroups.renames_groups() {
            return;
        }
        let limits = (self.starting_limits)(&cfg);
        while self.lock().groups.len() < READY {
            let placeholder = self.placeholder();
            let cgroup = match self.cgroups.site(&placeholder) {
                Ok(Some(cgroup)) => cgroup,
                Ok(None) => return,
                Err(e) => {
                    warn!(error = %e, "cannot make a cgroup ready for the next start");
                    return;
                }
            };
            if let Err(e) = cgroup.set_limits(&limits) {
                warn!(error = %e, "cannot set the limits of a cgroup made ready for the next start");
                cgroup.remove();
                return;
            }
            self.lock().groups.push(ReadyGroup {
                placeholder,
                cgroup: Box::new(cgroup),
                limits,
            });
        }
        self.grant_spare_groups();
        let orphans = std::mem::take(&mut self.lock().orphans);
        let left: Vec<SiteCgroup> = orphans
            .into_iter()
            .filter(|g| !g.remove_if_empty())
            .collect();
        self.lock().orphans.extend(left);
    }

    /// Each base zygote's spares get a group to join while they wait (so the worker a spare
    /// becomes has none to join), taken from the pool, which is then topped up again.
    fn grant_spare_groups(&self) {
        let Some(zygotes) = super::zygote::global() else {
            return;
        };
        for zygote in zygotes.base_zygotes() {
            if !zygote.wants_spare_group() {
                continue;
            }
            let Some(group) = self.lock().groups.pop() else {
                return;
            };
            if let Err(group) = zygote.grant_spare_group(group) {
                self.lock().groups.push(group);
            } else {
                self.refill_soon();
            }
        }
    }

    fn placeholder(&self) -> String {
        format!(
            "{PLACEHOLDER_PREFIX}{}",
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// A previous agent's ready socket directories and logs.
fn remove_leftovers(state_dir: &Path) {
    for dir in ["sites", "logs"] {
        let Ok(entries) = fs::read_dir(state_dir.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with(PLACEHOLDER_PREFIX)
            {
                continue;
            }
            let path = entry.path();
            let _ = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
    }
}
