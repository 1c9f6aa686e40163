//! Starting, probing and stopping workers: everything the per-site actors (`site/`) need
//! from the operating system, behind one trait, so the actors' state machine can be tested
//! with a fake and the real work (NSS lookups, mkdir/bind, cgroup writes, log files, zygote
//! round trips, forks) never runs on a request thread.
//!
//! - [`Launcher`]: the trait.
//! - [`system::SystemLauncher`]: the real one, on dedicated launcher threads: the site's
//!   socket (`socket.rs`), user (`users.rs`) and cgroup (`cgroup.rs`), then a worker forked
//!   from its interpreter's zygote (`zygote.rs`, with `fdpass.rs`; the Python side is
//!   `agent/python/roost_zygote.py`) or started directly (`direct.rs`).
//! - `frameworks.rs` (which frameworks sites share) and `framework_zygotes.rs` (the zygotes
//!   that preload them): the second level of the zygote tree.
//! - `watchdog.rs`: the RSS fallback for nodes without cgroups.
//! - `priority.rs`: the work of a start runs below normal CPU priority.
//! - `ready.rs`: a socket and a cgroup made ahead, renamed to a never-started site's.

pub mod cgroup;
pub mod direct;
pub mod fdpass;
pub mod framework_zygotes;
pub mod frameworks;
pub mod interpreters;
mod jobs;
pub mod priority;
pub mod ready;
pub mod rlimit;
pub mod socket;
mod spare;
pub mod system;
pub mod users;
pub mod watchdog;
pub mod zygote;

use std::future::Future;
use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use roost_proto::SiteSpec;

pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A listening socket the agent owns for a site's workers, and where it can be reached.
pub struct Listener {
    pub socket: UnixListener,
    /// Where it is reached now.
    pub path: PathBuf,
    /// Where it was bound: its address as connections to it report it (`getpeername`),
    /// which the agent's connection pool checks. Differs from `path` only for a socket
    /// bound in a directory made ahead and renamed since (`ready.rs`).
    pub address: PathBuf,
}

/// Which of a site's sockets: the one requests go to, or a fresh one for a worker of a new
/// spec that must answer before it takes any request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketRole {
    Serving,
    Candidate,
}

/// How much CPU a worker may take while it boots (issue 11: warm sites keep their latency
/// during a storm of cold starts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootWeight {
    /// No other worker of the site runs: its group boots at the lowest CPU weight, and gets
    /// the site's own once the worker answers ([`Launcher::answered`]).
    Lowest,
    /// Another worker of the site serves from the same group (a new spec's candidate, a
    /// replacement): the group keeps the site's weight.
    Site,
}

/// A running worker process (the leader of its process group).
pub trait Worker: Send + Sync {
    fn pid(&self) -> i32;
    /// Ask it to finish what it accepted and exit (SIGTERM to the leader).
    fn terminate(&self);
    /// End the whole worker tree now (SIGKILL to its process group).
    fn kill(&self);
}

/// How a worker ended.
#[derive(Clone, Debug)]
pub struct Exit {
    /// "exit status: 3", "signal: 9".
    pub status: String,
    /// The most telling line of its output (a Python exception, else the last line).
    pub last_line: String,
}

/// How a worker process was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LauncherKind {
    /// Forked from its interpreter's preloaded zygote.
    Zygote,
    /// Fork and exec (a `command` site, a site that opted out, or no zygote available).
    Direct,
}

impl LauncherKind {
    pub const ALL: [LauncherKind; 2] = [LauncherKind::Zygote, LauncherKind::Direct];

    pub fn as_str(self) -> &'static str {
        match self {
            LauncherKind::Zygote => "zygote",
            LauncherKind::Direct => "direct",
        }
    }
}

pub struct Started {
    pub worker: Arc<dyn Worker>,
    pub launcher: LauncherKind,
    /// Resolves once the worker and everything in its process group are gone.
    pub exited: BoxFut<Exit>,
}

/// Why a start could not happen (a message for the log and the 503 page).
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct LaunchError(pub String);

impl From<io::Error> for LaunchError {
    fn from(e: io::Error) -> Self {
        LaunchError(e.to_string())
    }
}

pub trait Launcher: Send + Sync + 'static {
    /// Create (or re-create) a listening socket for `host`'s workers.
    fn socket(
        &self,
        host: &str,
        spec: &Arc<SiteSpec>,
        role: SocketRole,
    ) -> BoxFut<Result<Arc<Listener>, LaunchError>>;

    /// Start a worker for `spec` serving on `listener`.
    fn start(
        &self,
        host: &str,
        spec: &Arc<SiteSpec>,
        listener: &Arc<Listener>,
        weight: BootWeight,
    ) -> BoxFut<Result<Started, LaunchError>>;

    /// A new socket and a worker on it: what a cold start needs. The system launcher makes
    /// both in one trip to a launcher thread, with one user lookup (issue 14: each is about
    /// a third of a millisecond of a first request).
    fn bind_and_start(
        self: Arc<Self>,
        host: &str,
        spec: &Arc<SiteSpec>,
        role: SocketRole,
        weight: BootWeight,
    ) -> BoxFut<Result<(Arc<Listener>, Started), LaunchError>> {
        let (host, spec) = (host.to_string(), spec.clone());
        Box::pin(async move {
            let listener = self.socket(&host, &spec, role).await?;
            let started = self.start(&host, &spec, &listener, weight).await?;
            Ok((listener, started))
        })
    }

    /// `host`'s worker answered its first request: give its group the site's CPU weight
    /// again (after a start at [`BootWeight::Lowest`]).
    fn answered(&self, host: &str) -> BoxFut<()>;

    /// Send one request to whatever serves `listener`; `Ok` once it answered anything.
    fn probe(&self, host: &str, listener: &Arc<Listener>) -> BoxFut<Result<(), String>>;

    /// Make a candidate's socket the site's serving one; returns the path requests reach it
    /// at. Cheap and synchronous, so the actor does it itself: nothing can come between its
    /// decision and the switch.
    fn promote(&self, host: &str, listener: &Listener) -> Result<PathBuf, String>;

    /// The site is gone from this node: remove its socket directory and cgroup.
    fn forget(&self, host: &str) -> BoxFut<()>;

    /// The kernel's count of processes of `host` killed for memory (0 without cgroups).
    fn oom_kills(&self, host: &str) -> BoxFut<u64>;

    /// Memory charged to `host`'s cgroup now.
    fn memory_bytes(&self, host: &str) -> BoxFut<Option<u64>>;

    /// CPU time used by `host`'s workers, in seconds (None where it can't be read).
    fn cpu_seconds(&self, _host: &str) -> BoxFut<Option<f64>> {
        Box::pin(async { None })
    }

    /// The agent stops: remove what it created for limits.
    fn shutdown(&self) -> BoxFut<()>;
}
