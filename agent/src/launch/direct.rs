//! Starting a site's worker process: the socket handover and the drop to the site's user.
//!
//! `app` sites are forked from a preloaded zygote (see `zygote.rs` and
//! `agent/python/roost_zygote.py`, which drops privileges in the same order as below).
//! `command` sites, and sites with `"spawn": "direct"`, are started directly:
//!
//! The child, between fork and exec, in an order that leaves nothing behind: its cgroup,
//! new session (so the agent can signal the whole worker tree), the listening socket moved
//! to fd 3, every other fd marked close-on-exec, supplementary groups, gid, uid,
//! parent-death signal (after the uid change, which clears it), no-new-privs, umask, and
//! finally `chdir` into the site's directory *as the user*, so a directory the user can't
//! enter fails the start instead of being entered with root's rights. Everything it needs is prepared before fork: the child only makes
//! system calls.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::Stdio;

use roost_proto::SiteSpec;
use tokio::process::{Child, Command};
use tracing::warn;

use super::users::SiteUser;
use super::zygote::{self, ForkedWorker};

/// The fd a socket-activated worker finds its listening socket on (`SD_LISTEN_FDS_START`).
const LISTEN_FD: i32 = 3;

/// `LISTEN_PID` must be the worker's own pid, known only after fork: a shell sets it and
/// execs the real program, which keeps the pid.
const SET_LISTEN_PID: &str = r#"LISTEN_PID=$$; export LISTEN_PID; exec "$@""#;

/// The program and arguments that serve `spec` on the inherited socket.
pub fn worker_argv(spec: &SiteSpec, grace_secs: u64) -> Vec<String> {
    if let Some(cmd) = &spec.command {
        return cmd.clone();
    }
    let app = spec.app.clone().unwrap_or_default();
    vec![
        spec.interpreter(),
        "-m".into(),
        "gunicorn".into(),
        "--worker-class".into(),
        "gthread".into(),
        "--workers".into(),
        spec.workers.to_string(),
        "--threads".into(),
        spec.threads.to_string(),
        "--graceful-timeout".into(),
        grace_secs.to_string(),
        // gunicorn's own watchdog; Roost's request timeout is enforced by the agent.
        "--timeout".into(),
        spec.request_timeout.max(30).to_string(),
        "--error-logfile".into(),
        "-".into(),
        app,
    ]
}

/// The worker's whole environment: a small clean base, then the site's own variables.
pub fn worker_env(spec: &SiteSpec, host: &str, user: &SiteUser) -> Vec<(String, String)> {
    let mut path = "/usr/local/bin:/usr/bin:/bin".to_string();
    let mut env = vec![];
    if let Some(venv) = &spec.virtualenv {
        path = format!("{}/bin:{path}", venv.trim_end_matches('/'));
        env.push(("VIRTUAL_ENV".to_string(), venv.clone()));
    }
    env.extend([
        ("PATH".to_string(), path),
        ("HOME".to_string(), user.home.clone()),
        ("USER".to_string(), user.name.clone()),
        ("LOGNAME".to_string(), user.name.clone()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ("ROOST_SITE".to_string(), host.to_string()),
        ("LISTEN_FDS".to_string(), "1".to_string()),
    ]);
    for (k, v) in &spec.env {
        env.retain(|(name, _)| name != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// A running worker, however it was started. The supervisor only needs its pid (the leader
/// of the worker's process group) and to learn when it exits.
pub struct WorkerProc {
    pid: i32,
    how: How,
}

enum How {
    /// fork + exec by the agent: our child.
    Direct(Child),
    /// Forked by a zygote: not our child; watched through its pidfd.
    Forked(ForkedWorker),
}

impl WorkerProc {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn launcher(&self) -> super::LauncherKind {
        match self.how {
            How::Direct(_) => super::LauncherKind::Direct,
            How::Forked(_) => super::LauncherKind::Zygote,
        }
    }

    /// Wait for the worker to exit; the text describes how ("exit status: 3", "signal: 9").
    pub async fn wait(self) -> String {
        match self.how {
            How::Direct(mut child) => match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("unknown ({e})"),
            },
            How::Forked(worker) => worker.wait().await,
        }
    }
}

/// Everything one worker start needs, resolved by the supervisor beforehand (the child of a
/// fork may not allocate or look anything up).
pub struct Launch<'a> {
    pub spec: &'a SiteSpec,
    pub host: &'a str,
    pub user: &'a SiteUser,
    /// The site's listening socket, which becomes the worker's fd 3.
    pub listener: &'a std::os::unix::net::UnixListener,
    /// The site's log, for the worker's stdout and stderr.
    pub log: File,
    pub grace_secs: u64,
    /// The `cgroup.procs` files of the site's cgroup(s); the worker joins them first.
    pub cgroup_procs: &'a [PathBuf],
}

/// Start a worker: an `app` site's is the child a zygote was asked for
/// ([`zygote::Zygotes::begin_fork`], unless the site opted out with `"spawn": "direct"`); a
/// `command` site's, or one whose zygote is unavailable, is started directly. The worker
/// leads its own process group.
pub fn spawn(launch: &Launch, fork: Option<zygote::PendingFork>) -> io::Result<WorkerProc> {
    if let (Some(fork), Some(zygotes)) = (fork, zygote::global()) {
        match zygotes.finish_fork(fork, launch) {
            Ok(worker) => {
                return Ok(WorkerProc {
                    pid: worker.pid,
                    how: How::Forked(worker),
                })
            }
            Err(e) => {
                warn!(site = %launch.host, error = %e, "cannot fork the worker from a zygote; starting it directly")
            }
        }
    }
    spawn_direct(launch)
}

/// Ask the zygote of `host`'s interpreter for its worker ahead of the rest of the start
/// (see [`spawn`]); `None` when the site is not forked, or the zygote can't be asked (the
/// worker is then started directly).
pub fn ask_zygote(
    host: &str,
    spec: &SiteSpec,
    interpreter: Option<&std::path::Path>,
) -> Option<zygote::PendingFork> {
    let interpreter = interpreter.filter(|_| spec.uses_zygote())?;
    let zygotes = zygote::global()?;
    zygotes
        .begin_fork(host, interpreter)
        .inspect_err(|e| warn!(site = %host, error = %e, "cannot fork the worker from a zygote; starting it directly"))
        .ok()
}

/// Start the worker of `host` directly (fork + exec). The worker leads its own process group.
pub fn spawn_direct(launch: &Launch) -> io::Result<WorkerProc> {
    let Launch {
        spec,
        host,
        user,
        listener,
        grace_secs,
        cgroup_procs,
        ..
    } = *launch;
    let log = launch.log.try_clone()?;
    let argv = worker_argv(spec, grace_secs);
    // The cgroup files are opened here, by the agent; the child only writes "0" (itself) to
    // them, before it drops privileges and before it can fork anything that would escape.
    let cgroup_files: Vec<File> = cgroup_procs
        .iter()
        .map(|p| OpenOptions::new().write(true).open(cheapest_join_file(p)))
        .collect::<io::Result<_>>()?;
    let cgroup_fds: Vec<i32> = cgroup_files.iter().map(|f| f.as_raw_fd()).collect();
    let dir = CString::new(std::path::Path::new(&spec.dir).as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "site dir contains NUL"))?;
    let groups: Vec<libc::gid_t> = user.groups.iter().map(|g| g.as_raw()).collect();
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    let listen_fd = listener.as_raw_fd();
    let parent = std::process::id() as libc::pid_t;
    let log_err = log.try_clone()?;
    let nofile = super::rlimit::worker_nofile();

    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(SET_LISTEN_PID)
        .arg("roost-worker")
        .args(&argv)
        .env_clear()
        .envs(worker_env(spec, host, user))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .kill_on_drop(false);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on data prepared above; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &cgroup_fds {
                join_cgroup(*fd)?;
            }
            check(libc::setsid())?;
            if listen_fd == LISTEN_FD {
                let flags = check(libc::fcntl(LISTEN_FD, libc::F_GETFD))?;
                check(libc::fcntl(
                    LISTEN_FD,
                    libc::F_SETFD,
                    flags & !libc::FD_CLOEXEC,
                ))?;
            } else {
                check(libc::dup2(listen_fd, LISTEN_FD))?;
            }
            // Whatever else is open in the agent stays behind at exec.
            check(libc::syscall(
                libc::SYS_close_range,
                (LISTEN_FD + 1) as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) as libc::c_int)?;
            // As root, before the uid change: the worker cannot raise it back.
            super::rlimit::apply_in_child(nofile)?;
            // Forked by a launcher thread, it inherited START_NICE. Without CAP_SYS_NICE it
            // keeps it (the agent warned at its start).
            let _ = super::priority::reset_in_child();
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
            // If the agent dies, the worker tree is told to stop instead of living on. Set
            // after the uid change, which would clear it.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0))?;
            if libc::getppid() != parent {
                return Err(io::Error::other("agent exited during spawn"));
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            libc::umask(0o027);
            check(libc::chdir(dir.as_ptr()))?;
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    Ok(WorkerProc {
        pid,
        how: How::Direct(child),
    })
}

/// Move the calling process into the cgroup whose file `fd` is open, without allocating
/// (runs after fork). "0" means "the writer"; the forked child has a single thread, so on
/// v1, where the file is `tasks`, moving the thread moves the process.
fn join_cgroup(fd: i32) -> io::Result<()> {
    // SAFETY: writes one byte from a static buffer to an fd the parent opened.
    let rc = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// On cgroup v1, `tasks` rather than `cgroup.procs`: a write to `cgroup.procs` takes the
/// kernel's global threadgroup lock and waits out an RCU grace period (7-12 ms measured here,
/// the largest piece of a cold start); a write to `tasks` does not.
fn cheapest_join_file(procs: &std::path::Path) -> PathBuf {
    let tasks = procs.with_file_name("tasks");
    if procs.file_name().is_some_and(|n| n == "cgroup.procs") && tasks.exists() {
        tasks
    } else {
        procs.to_path_buf()
    }
}

/// A libc return code as a `Result` (negative: the thread's errno).
pub(crate) fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> SiteUser {
        SiteUser {
            name: "alice".into(),
            uid: nix::unistd::Uid::from_raw(1000),
            gid: nix::unistd::Gid::from_raw(1000),
            groups: vec![],
            home: "/home/alice".into(),
        }
    }

    #[test]
    fn app_sites_run_gunicorn_under_the_sites_interpreter() {
        let mut spec = SiteSpec::new_app("alice", "app:application", "/srv/a");
        spec.threads = 8;
        let argv = worker_argv(&spec, 10);
        assert_eq!(argv[0], "/usr/bin/python3");
        assert_eq!(&argv[1..3], &["-m", "gunicorn"]);
        assert!(argv.windows(2).any(|w| w == ["--threads", "8"]));
        assert_eq!(argv.last().unwrap(), "app:application");
    }

    #[test]
    fn command_sites_run_their_command() {
        let mut spec = SiteSpec::new_app("alice", "a:b", "/srv/a");
        spec.app = None;
        spec.command = Some(vec!["node".into(), "server.js".into()]);
        assert_eq!(worker_argv(&spec, 10), vec!["node", "server.js"]);
    }

    #[test]
    fn the_environment_is_clean_and_the_site_may_extend_it() {
        let mut spec = SiteSpec::new_app("alice", "a:b", "/srv/a");
        spec.env
            .insert("DJANGO_SETTINGS_MODULE".into(), "x.settings".into());
        spec.env.insert("LANG".into(), "de_DE.UTF-8".into());
        spec.virtualenv = Some("/srv/venv".into());
        let env: std::collections::BTreeMap<_, _> = worker_env(&spec, "a.example", &user())
            .into_iter()
            .collect();
        assert_eq!(env["LISTEN_FDS"], "1");
        assert_eq!(env["ROOST_SITE"], "a.example");
        assert_eq!(env["LANG"], "de_DE.UTF-8");
        assert_eq!(env["DJANGO_SETTINGS_MODULE"], "x.settings");
        assert!(env["PATH"].starts_with("/srv/venv/bin:"));
        assert!(!env.contains_key("RUST_LOG"));
    }
}
