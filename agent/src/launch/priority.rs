//! The CPU priority of starting workers (issue 11): the work of a start (launcher threads,
//! the zygote's forks) yields to requests for sites that already run.
//!
//! Two schedulers decide who runs, and each needs its own knob:
//! - Under cgroups (systemd puts the agent in its own group) threads of one group compete
//!   by nice value: launcher threads and the zygote run at [`START_NICE`], so the agent's
//!   request threads win.
//! - A process in the root cgroup of a kernel with autogroups (an agent started from a
//!   shell, or a host without systemd) competes as its session: the zygote runs
//!   `setsid`, so its session would weigh as much as the whole agent or proxy. Its
//!   autogroup gets the same nice (`/proc/self/autogroup`), so a storm of forks takes what
//!   the serving processes leave.
//!
//! A worker goes back to nice 0 as root, before it drops privileges (it could not lower
//! its nice after): once in its site's cgroup, the boot weight (`BootWeight`) governs it.
//! Raising a priority needs CAP_SYS_NICE; without it (a unit that bounds the agent's
//! capabilities without it) the worker keeps the start's nice, and the agent says so once.

use std::io;

use rustix::fs::{Mode, OFlags};
use rustix::process::setpriority_process;

/// How far below normal priority the work of a start runs.
pub const START_NICE: i32 = 10;

/// The calling thread runs at [`START_NICE`] from now on (Linux applies nice per thread:
/// `setpriority(PRIO_PROCESS, 0)` is the caller).
pub fn lower_this_thread() -> io::Result<()> {
    Ok(setpriority_process(None, START_NICE)?)
}

/// The calling thread runs at normal priority: for a thread a launcher thread spawns that
/// serves running workers (their output), which it would otherwise inherit [`START_NICE`] from.
pub fn normal_this_thread() -> io::Result<()> {
    Ok(setpriority_process(None, 0)?)
}

/// Whether this process may raise a priority again (CAP_SYS_NICE in its effective set), as
/// a worker's return to nice 0 needs. A unit that bounds the agent's capabilities without it
/// leaves workers at [`START_NICE`]: harmless where each site has its own cpu cgroup (nice
/// only orders a site's own processes there), a handicap against the agent's threads where
/// there is none.
pub fn can_restore_normal() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|eff| eff & (1 << CAP_SYS_NICE) != 0)
}

/// In a forked child before exec (async-signal-safe: plain system calls, no allocation): run
/// at [`START_NICE`], and so does the session's autogroup where the kernel has them. Call
/// after `setsid`.
pub fn lower_in_child() -> io::Result<()> {
    setpriority_process(None, START_NICE)?;
    // Absent (no CONFIG_SCHED_AUTOGROUP) or refused: the nice above still holds.
    const _: () = assert!(START_NICE == 10, "the autogroup nice is written as text");
    if let Ok(fd) = rustix::fs::open(
        c"/proc/self/autogroup",
        OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        let _ = rustix::io::write(&fd, b"10");
    }
    Ok(())
}

/// In a forked child before exec, still root: back to normal priority, which the worker
/// could not restore itself once it has dropped privileges.
pub fn reset_in_child() -> io::Result<()> {
    Ok(setpriority_process(None, 0)?)
}
