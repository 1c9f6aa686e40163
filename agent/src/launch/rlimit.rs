//! The open-file limit (RLIMIT_NOFILE) every worker starts with, apart from the agent's own:
//! the agent holds a socket and connections for every site and needs a large limit
//! (`LimitNOFILE=` in its unit), while one tenant's worker should not get that share of the
//! kernel's file table. Set once at start-up (`worker_nofile` in agent.toml); applied in the
//! forked child before it drops to the site's user, so the worker cannot raise it again.
//! Zygotes get it too, and their forks inherit it.

use std::io;
use std::sync::OnceLock;

static WORKER_NOFILE: OnceLock<u64> = OnceLock::new();

/// Record the workers' limit (the first call wins; later ones change nothing).
pub fn set_worker_nofile(limit: u64) {
    let _ = WORKER_NOFILE.set(limit);
}

/// The limit to give a worker, soft = hard; `None` before [`set_worker_nofile`] (unit tests):
/// then workers inherit the agent's.
pub fn worker_nofile() -> Option<libc::rlimit> {
    WORKER_NOFILE.get().map(|&n| libc::rlimit {
        rlim_cur: n as libc::rlim_t,
        rlim_max: n as libc::rlim_t,
    })
}

/// Apply `limit` to the calling process. Async-signal-safe: for a `pre_exec` closure.
pub fn apply_in_child(limit: Option<libc::rlimit>) -> io::Result<()> {
    if let Some(l) = limit {
        // SAFETY: setrlimit reads a struct on the stack; no allocation.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
