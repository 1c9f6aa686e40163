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

use std::io;

/// How far below normal priority the work of a start runs.
pub const START_NICE: libc::c_int = 10;

/// The calling thread runs at [`START_NICE`] from now on (Linux applies nice per thread).
pub fn lower_this_thread() -> io::Result<()> {
    // SAFETY: a plain system call on the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, START_NICE) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread runs at normal priority: for a thread a launcher thread spawns that
/// serves running workers (their output), which it would otherwise inherit [`START_NICE`] from.
pub fn normal_this_thread() -> io::Result<()> {
    // SAFETY: a plain system call on the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 0) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In a forked child before exec (async-signal-safe: no allocation): run at [`START_NICE`],
/// and so does the session's autogroup where the kernel has them. Call after `setsid`.
pub fn lower_in_child() -> io::Result<()> {
    // SAFETY: plain system calls on static data.
    unsafe {
        if libc::setpriority(libc::PRIO_PROCESS, 0, START_NICE) == -1 {
            return Err(io::Error::last_os_error());
        }
        // Absent (no CONFIG_SCHED_AUTOGROUP) or refused: the nice above still holds.
        let fd = libc::open(
            c"/proc/self/autogroup".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            let nice = b"10";
            const _: () = assert!(START_NICE == 10, "the autogroup nice is written as text");
            libc::write(fd, nice.as_ptr().cast(), nice.len());
            libc::close(fd);
        }
    }
    Ok(())
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

/// In a forked child before exec, still root: back to normal priority, which the worker
/// could not restore itself once it has dropped privileges.
pub fn reset_in_child() -> io::Result<()> {
    // SAFETY: a plain system call.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 0) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
