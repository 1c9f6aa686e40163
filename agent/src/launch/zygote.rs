//! Zygotes: one preloaded fork server per base Python interpreter (DESIGN.md, decision 4).
//!
//! A zygote is `python -I roost_zygote.py` (the script, and the worker's server module
//! `roost_worker.py` beside it, are embedded in this binary and written to
//! `<state-dir>/zygote/`), run as root with no site's code, data or privilege.
//! It gets three fds: 3, a control socket (SOCK_SEQPACKET) on which the agent asks for a
//! fork, sending the child's channel, on which the zygote answers with the child's pid and
//! a pidfd; 4, an events socket on which it reports
//! each child's exit status; 5, the lifeline: the read end of a pipe whose write end only
//! the agent holds, so EOF there means the agent is gone, even when SIGKILLed.
//!
//! A fork request carries one fd: a fresh socket whose other end the agent keeps. The
//! request goes first in a start, and the launcher prepares the site's socket, cgroup and
//! log while the zygote answers; then the agent sends the site's spec, listening socket and
//! log file on the channel, straight to the child, which drops to the site's user and
//! serves (see the script). The zygote's memory, which every later worker inherits, never holds a
//! site's environment. If the agent gives up on a fork (timeout), it closes its end
//! unsent and the child exits.
//!
//! The zygote keeps one *spare*: a child forked ahead of time, unspecialised, that waits for
//! a request to hand it the channel; a fork request then costs a message, not a fork, and
//! the next spare is forked once the zygote has been idle for a moment.
//!
//! Below the base zygotes are *framework zygotes* (`framework_zygotes.rs`): forks of a base
//! zygote that have imported a framework several sites share, learnt from what workers
//! report after their first response on their spec channel (which the agent keeps open for
//! that). A site whose last run used a framework forks from its framework zygote; when
//! there is none, or it fails the fork, from the base zygote.
//!
//! Workers are not the agent's children: their exit is learnt from the pidfd (readable when
//! the process ends, whoever its parent is) and their status from the zygote's report.
//! Workers outlive their zygote; a zygote that dies is restarted by the manager thread,
//! with backoff when it keeps dying. The manager thread spawns every zygote and never
//! exits, so `PR_SET_PDEATHSIG` (which follows the forking *thread*) fires only when the
//! agent process dies.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use serde_json::json;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::direct::{check, worker_env, Launch};
use super::fdpass::{pidfd_open, poll_now, recv_with_fds, send_with_fds, set_timeouts};
use super::framework_zygotes::{FrameworkZygote, Frameworks};
use super::ready::ReadyGroup;
use super::socket::ensure_dir;
use super::spare::Spare;
use crate::config::FrameworkSettings;

/// The zygote's Python source, installed at start so the binary is self-contained.
pub const SCRIPT: &str = include_str!("../../python/roost_zygote.py");
/// The server a worker runs, a module the zygote imports from its own directory.
const WORKER_MODULE: &str = include_str!("../../python/roost_worker.py");
const PREWARM_APP: &str = include_str!("../../python/prewarm/roost_prewarm_app.py");

/// fds the zygote finds its channels on (see the script).
const CONTROL_FD: RawFd = 3;
const EVENTS_FD: RawFd = 4;
const LIFELINE_FD: RawFd = 5;
/// How long a fork request may take, including a fresh zygote's preloading.
pub(super) const FORK_TIMEOUT: Duration = Duration::from_secs(10);
/// A zygote that dies sooner than this after its start counts as failing to start.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a worker's exit waits for the zygote's report of its status.
const STATUS_WAIT: Duration = Duration::from_millis(500);

static GLOBAL: OnceLock<Arc<Zygotes>> = OnceLock::new();

/// The agent's zygotes, once [`init`] has run.
pub fn global() -> Option<&'static Arc<Zygotes>> {
    GLOBAL.get()
}

/// Install the script, create the lifeline, start the manager and the system
/// interpreter's zygote (so the first cold start finds it warm).
/// Then the framework zygotes of the state file (`framework_zygotes.rs`).
pub fn init(
    state_dir: &Path,
    preload: &[String],
    frameworks: &FrameworkSettings,
) -> io::Result<Arc<Zygotes>> {
    let zygotes = Zygotes::start(state_dir, preload)?;
    let fw = Frameworks::start(frameworks.clone(), state_dir, Arc::downgrade(&zygotes))?;
    let _ = zygotes.frameworks.set(fw);
    let _ = GLOBAL.set(zygotes.clone());
    Ok(zygotes)
}

/// All zygotes of this agent.
pub struct Zygotes {
    live: Mutex<HashMap<PathBuf, Arc<Zygote>>>,
    manager: Mutex<mpsc::Sender<Start>>,
    exits: Arc<ExitBoard>,
    frameworks: OnceLock<Arc<Frameworks>>,
    /// The lifeline's write end: held, never written, never inherited; closed only by the
    /// kernel when the agent exits.
    _lifeline: OwnedFd,
}

/// One running zygote.
pub struct Zygote {
    interpreter: PathBuf,
    pid: i32,
    control: Mutex<OwnedFd>,
    next_id: AtomicU64,
    dead: AtomicBool,
    /// The cgroup made ahead that this zygote's current or next spare joins while it waits
    /// (cgroup v1; `launch/ready.rs`), until a spare's answer names it.
    spare_group: Mutex<Option<ReadyGroup>>,
    /// This zygote's spare, when the zygote gave the agent its socket: a worker's fork
    /// request goes to it, answered already (`spare.rs`).
    spare: Mutex<Option<Spare>>,
    /// To tell, before using its spare, that the zygote is still there: a spare whose
    /// zygote died is not used (the start falls back as it would without a spare).
    pidfd: Option<OwnedFd>,
}

struct Start {
    interpreter: PathBuf,
    reply: mpsc::Sender<Result<Arc<Zygote>, String>>,
}

impl Zygotes {
    fn start(state_dir: &Path, preload: &[String]) -> io::Result<Arc<Self>> {
        let script = install_script(state_dir)?;
        let (lifeline_read, lifeline_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (tx, rx) = mpsc::channel();
        let zygotes = Arc::new(Self {
            live: Mutex::new(HashMap::new()),
            manager: Mutex::new(tx),
            exits: Arc::new(ExitBoard::default()),
            frameworks: OnceLock::new(),
            _lifeline: lifeline_write,
        });
        let manager = Manager {
            zygotes: Arc::downgrade(&zygotes),
            script,
            preload: serde_json::to_string(preload).unwrap_or_else(|_| "[]".into()),
            lifeline: lifeline_read,
            children: HashMap::new(),
            wanted: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("roost-zygotes".into())
            .spawn(move || manager.run(rx))?;
        // Warm the system interpreter's zygote now; failure here is not fatal (the first
        // request retries, and falls back to a direct spawn).
        if let Ok(default) = trusted_interpreter(Path::new(roost_proto::site::DEFAULT_PYTHON)) {
            if let Err(e) = zygotes.get(&default) {
                warn!(error = %e, "cannot start the system interpreter's zygote");
            }
        }
        Ok(zygotes)
    }

    /// The framework zygotes and what the agent learnt of them.
    pub fn frameworks(&self) -> Option<&Arc<Frameworks>> {
        self.frameworks.get()
    }

    pub(super) fn exit_board(&self) -> Arc<ExitBoard> {
        self.exits.clone()
    }

    /// The base zygote of `interpreter`, started if needed.
    pub(super) fn base(&self, interpreter: &Path) -> Result<Arc<Zygote>, String> {
        self.get(interpreter)
    }

    /// The live zygote for `interpreter`, started (by the manager thread) if needed.
    fn get(&self, interpreter: &Path) -> Result<Arc<Zygote>, String> {
        if let Some(z) = self.lock_live().get(interpreter) {
            if !z.dead.load(Ordering::Acquire) {
                return Ok(z.clone());
            }
        }
        let (reply, answer) = mpsc::channel();
        self.manager
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Start {
                interpreter: interpreter.to_path_buf(),
                reply,
            })
            .map_err(|_| "the zygote manager is gone".to_string())?;
        answer
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| "the zygote manager did not answer".to_string())?
    }

    /// The base zygotes running now.
    pub(super) fn base_zygotes(&self) -> Vec<Arc<Zygote>> {
        self.lock_live().values().cloned().collect()
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Arc<Zygote>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ask for the worker of `host`: from its framework zygote if it has one, else from the
    /// base zygote of `interpreter`. Returns at once; the zygote answers on the child's
    /// channel while the launcher prepares the site's cgroup and log ([`Self::finish_fork`]).
    pub fn begin_fork(&self, host: &str, interpreter: &Path) -> io::Result<PendingFork> {
        let pending = self.ask_for(host, interpreter);
        if pending.as_ref().is_ok_and(|p| p.asked.to_spare) {
            return pending; // the zygote was not woken (the spare's own wake-up: see `request`)
        }
        // The scheduler tends to queue the zygote, just woken, on this thread's CPU, where it
        // would wait out the whole preparation (about a millisecond: measured with `perf
        // sched`) before handing the spare over. Let it go first; when it landed on another
        // CPU this returns at once.
        yield_cpu();
        pending
    }

    fn ask_for(&self, host: &str, interpreter: &Path) -> io::Result<PendingFork> {
        let t0 = Instant::now();
        let framework = self
            .frameworks
            .get()
            .and_then(|fw| fw.zygote_for(host, interpreter));
        let lookup = t0.elapsed();
        if let Some(fz) = framework {
            match Asked::new(&fz.zygote, "worker") {
                Ok(asked) => {
                    return Ok(PendingFork {
                        asked,
                        framework: Some(fz),
                        interpreter: interpreter.to_path_buf(),
                        t0,
                        lookup,
                        cgroups_sent: false,
                        answer: None,
                    })
                }
                Err(e) => self.framework_failed(host, &fz, &e),
            }
        }
        Ok(PendingFork {
            asked: self.ask_base(interpreter)?,
            framework: None,
            interpreter: interpreter.to_path_buf(),
            t0,
            lookup,
            cgroups_sent: false,
            answer: None,
        })
    }

    /// Wait for the answer to `pending` and send the child the site's spec, socket and log:
    /// the worker. A framework zygote that fails is replaced by the base zygote here. An
    /// `Err` means no worker was started (the caller may start one directly).
    pub fn finish_fork(&self, pending: PendingFork, launch: &Launch) -> io::Result<ForkedWorker> {
        let PendingFork {
            asked,
            framework,
            interpreter,
            t0,
            lookup,
            mut cgroups_sent,
            answer,
        } = pending;
        let host = launch.host;
        let t1 = Instant::now();
        let answer = answer
            .unwrap_or_else(|| asked.answer())
            .map(|a| (a.pid, a.pidfd));
        let (asked, answer, from) = match (answer, framework) {
            (Ok(answer), Some(fz)) => {
                if let Some(fw) = self.frameworks.get() {
                    fw.forks_framework.fetch_add(1, Ordering::Relaxed);
                }
                (asked, answer, Some(fz))
            }
            (Err(e), Some(fz)) => {
                self.framework_failed(host, &fz, &e);
                let asked = self.ask_base(&interpreter)?;
                cgroups_sent = false; // a new child
                let answer = asked.answer().map(|a| (a.pid, a.pidfd))?;
                self.count_base_fork();
                (asked, answer, None)
            }
            (answer, None) => {
                let answer = answer?;
                self.count_base_fork();
                (asked, answer, None)
            }
        };
        let (pid, pidfd) = answer;
        let pidfd = match pidfd {
            Some(fd) => fd,
            None => pidfd_open(pid)?,
        };
        let ours = asked.ours;
        let t2 = Instant::now();
        if !cgroups_sent {
            send_cgroups(&ours, launch.cgroup_procs, false)?;
        }
        send_spec(&ours, launch)?;
        let zygote_name = from
            .as_ref()
            .map_or("base", |z: &Arc<FrameworkZygote>| z.name.as_str());
        debug!(site = %host, pid, zygote = zygote_name, lookup_us = lookup.as_micros() as u64,
            asked_us = (t1 - t0).as_micros() as u64, fork_us = (t2 - t1).as_micros() as u64,
            send_us = t2.elapsed().as_micros() as u64, "worker forked");
        // The channel stays open: the worker reports its modules on it after its first response.
        let report = self
            .frameworks
            .get()
            .map(|fw| (fw.clone(), ours, host.to_string(), interpreter));
        Ok(ForkedWorker {
            pid,
            pidfd,
            exits: self.exits.clone(),
            report,
        })
    }

    /// A fork request to the base zygote of `interpreter` (started if needed).
    fn ask_base(&self, interpreter: &Path) -> io::Result<Asked> {
        let zygote = self.get(interpreter).map_err(io::Error::other)?;
        Asked::new(&zygote, "worker")
    }

    /// `fz` failed a fork: it is dropped (and rebuilt later); the base zygote forks instead.
    fn framework_failed(&self, host: &str, fz: &Arc<FrameworkZygote>, e: &io::Error) {
        warn!(site = %host, set = %fz.name, error = %e,
            "the framework zygote failed the fork; forking from the base zygote");
        if let Some(fw) = self.frameworks.get() {
            fw.failed(fz);
        }
    }

    fn count_base_fork(&self) {
        if let Some(fw) = self.frameworks.get() {
            fw.forks_base.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A fork asked of a zygote, not yet answered (see [`Zygotes::begin_fork`]).
pub struct PendingFork {
    asked: Asked,
    framework: Option<Arc<FrameworkZygote>>,
    interpreter: PathBuf,
    t0: Instant,
    /// How long choosing the zygote (a framework zygote, or the base one) took.
    lookup: Duration,
    /// Whether the child has been told its cgroups (the first of its two messages).
    cgroups_sent: bool,
    /// The answer, when the launcher read it before the cgroup step ([`Self::read_answer`]).
    answer: Option<io::Result<Answer>>,
}

/// What a spare's answer says of the group made ahead for it.
pub enum SpareGroup {
    /// The child is in this group (under its placeholder name) in every hierarchy.
    Joined(ReadyGroup),
    /// The child was offered this group but is not wholly in it: the group is to be removed
    /// once the child has moved to its site's.
    Unused(ReadyGroup),
    /// No group was offered to this child.
    None,
}

impl PendingFork {
    /// Tell the child its site's cgroups as soon as they exist: it joins them while the
    /// launcher prepares the rest (user, socket, log), which the spec then carries. On an
    /// error the child is lost; [`Zygotes::finish_fork`] finds that out from the answer and
    /// asks again.
    pub fn send_cgroups(&mut self, cgroup_procs: &[PathBuf], joined: bool) -> io::Result<()> {
        send_cgroups(&self.asked.ours, cgroup_procs, joined)?;
        self.cgroups_sent = true;
        Ok(())
    }

    /// Whether the child is likely a spare that joined a group made ahead: the base zygote
    /// was asked and holds one for its spares. The launcher then reads the answer before the
    /// cgroup step, so that group can become the site's.
    pub fn expects_spare_group(&self) -> bool {
        self.framework.is_none() && self.asked.zygote.lock_spare_group().is_some()
    }

    /// Read the answer now (kept for [`Zygotes::finish_fork`]) and take the zygote's group
    /// made ahead if the answer names it.
    pub fn read_answer(&mut self) -> SpareGroup {
        let answer = self.asked.answer();
        let group = match &answer {
            Ok(a) => {
                let mut held = self.asked.zygote.lock_spare_group();
                let offered = held
                    .as_ref()
                    .is_some_and(|g| Some(g.name()) == a.cgroup_offered.as_deref());
                match held.take_if(|_| offered) {
                    Some(g) if a.cgroup.as_deref() == Some(g.name()) => SpareGroup::Joined(g),
                    Some(g) => SpareGroup::Unused(g),
                    None => SpareGroup::None,
                }
            }
            Err(_) => SpareGroup::None,
        };
        self.answer = Some(answer);
        group
    }
}

/// The child's first message: the `cgroup.procs` files it joins before anything else, or,
/// `joined`, those it is in already (a spare's group made ahead, renamed to the site's).
fn send_cgroups(ours: &OwnedFd, cgroup_procs: &[PathBuf], joined: bool) -> io::Result<()> {
    let message = json!({
        "joined": joined,
        "cgroup_procs": cgroup_procs.iter().map(|p| p.to_string_lossy()).collect::<Vec<_>>(),
    })
    .to_string();
    send_with_fds(ours.as_raw_fd(), message.as_bytes(), &[])
}

/// Give this thread's CPU to whatever else is runnable on it, for one turn.
fn yield_cpu() {
    // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
    unsafe {
        libc::sched_yield();
    }
}

/// A fork request's answer: the child, and (from a spare) the group made ahead it was
/// offered and whether it joined it.
pub(super) struct Answer {
    pub(super) pid: i32,
    pub(super) pidfd: Option<OwnedFd>,
    pub(super) cgroup: Option<String>,
    pub(super) cgroup_offered: Option<String>,
}

/// One fork request sent: the agent's end of the new child's channel, on which the zygote
/// answers (so nothing is held between request and answer, and no answer can be another's).
pub(super) struct Asked {
    zygote: Arc<Zygote>,
    id: u64,
    /// Sent to the zygote's spare directly, not to the zygote.
    pub(super) to_spare: bool,
    /// The answer, known when the request went to the spare ([`Zygote::request`]).
    answered: Mutex<Option<Answer>>,
    pub(super) ours: OwnedFd,
}

impl Asked {
    /// Send a request to `zygote` for a child that becomes a `role` ("worker", "probe" or
    /// "framework": see the script).
    pub(super) fn new(zygote: &Arc<Zygote>, role: &str) -> io::Result<Self> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        set_timeouts(ours.as_raw_fd(), FORK_TIMEOUT)?;
        let (id, answered) = zygote.request(theirs, role)?;
        Ok(Self {
            zygote: zygote.clone(),
            id,
            to_spare: answered.is_some(),
            answered: Mutex::new(answered),
            ours,
        })
    }

    /// The child's pid and, when one could be opened, its pidfd. A zygote that does not
    /// answer in time (or answers garbage) is killed; the manager restarts it.
    pub(super) fn answer(&self) -> io::Result<Answer> {
        if let Some(answer) = self
            .answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Ok(answer);
        }
        let read = || -> io::Result<Result<Answer, String>> {
            // Bounded by the channel's receive timeout (set in `new`).
            let (bytes, mut fds) = recv_with_fds(self.ours.as_raw_fd(), 1)?;
            if bytes.is_empty() {
                return Err(io::Error::other(
                    "the zygote closed the child's channel unanswered",
                ));
            }
            let reply: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::other(format!("bad reply from the zygote: {e}")))?;
            if reply["id"].as_u64() != Some(self.id) {
                return Err(io::Error::other("the zygote answered another request"));
            }
            if let Some(err) = reply["error"].as_str() {
                return Ok(Err(format!("zygote: {err}")));
            }
            let pid = reply["pid"]
                .as_i64()
                .filter(|p| *p > 0)
                .ok_or_else(|| io::Error::other("zygote reply without a pid"))?;
            let name = |key: &str| reply[key].as_str().map(str::to_string);
            Ok(Ok(Answer {
                pid: pid as i32,
                pidfd: fds.pop(),
                cgroup: name("cgroup"),
                cgroup_offered: name("cgroup_offered"),
            }))
        };
        match read() {
            Ok(answer) => answer.map_err(io::Error::other),
            Err(e) => {
                self.zygote.failed(&e);
                Err(e)
            }
        }
    }
}

/// The child's second message: the site's spec, socket and log, straight to the child (the
/// zygote never sees them). On failure, dropping the channel closes it and the child exits.
fn send_spec(ours: &OwnedFd, launch: &Launch) -> io::Result<()> {
    let Launch {
        spec,
        host,
        user,
        listener,
        grace_secs,
        ..
    } = *launch;
    let app = spec.app.clone().unwrap_or_default();
    let message = json!({
        "host": host,
        "app": app,
        "dir": spec.dir,
        "virtualenv": spec.virtualenv,
        "uid": user.uid.as_raw(),
        "gid": user.gid.as_raw(),
        "groups": user.groups.iter().map(|g| g.as_raw()).collect::<Vec<_>>(),
        "env": worker_env(spec, host, user),
        "workers": spec.workers,
        "threads": spec.threads,
        "grace": grace_secs,
        "timeout": spec.request_timeout.max(30),
    })
    .to_string();
    send_with_fds(
        ours.as_raw_fd(),
        message.as_bytes(),
        &[listener.as_raw_fd(), launch.log.as_raw_fd()],
    )
}

impl Zygote {
    /// A zygote the agent talks to on `control` (a framework zygote: `framework_zygotes.rs`).
    pub(super) fn new(interpreter: PathBuf, pid: i32, control: OwnedFd) -> Self {
        Self {
            interpreter,
            pid,
            control: Mutex::new(control),
            next_id: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            spare_group: Mutex::new(None),
            spare: Mutex::new(None),
            // Opened while the zygote is known to run (just spawned, or just answered).
            pidfd: pidfd_open(pid).ok(),
        }
    }

    /// Whether the zygote process has ended, before the agent noticed (a pidfd turns
    /// readable at the exit, before the process is reaped).
    fn has_exited(&self) -> bool {
        self.pidfd
            .as_ref()
            .is_some_and(|fd| poll_now(fd.as_raw_fd(), libc::POLLIN) != 0)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub(super) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    pub(super) fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
        // A spare waits until every copy of its socket is closed: this one too.
        self.lock_spare().take();
    }

    pub(super) fn kill(&self) {
        self.mark_dead();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// Send a fork request whose child reads its request from `channel` and becomes a
    /// `role`; the zygote answers on `channel` itself (see [`Asked`]). Returns the
    /// request's id, and the answer when the request went to the spare directly.
    fn request(&self, channel: OwnedFd, role: &str) -> io::Result<(u64, Option<Answer>)> {
        if self.dead.load(Ordering::Acquire) {
            return Err(io::Error::other("the zygote has exited"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = json!({"op": "fork", "id": id, "role": role}).to_string();
        // A worker from the spare the zygote gave us, answered already, if it is settled;
        // else the zygote is asked, and forks.
        if role == "worker" && self.has_exited() {
            self.lock_spare().take();
        } else if role == "worker" {
            let mut held = self.lock_spare();
            if let Some(spare) = held.take() {
                match spare.take_for(id, &channel) {
                    Ok(Some(answer)) => return Ok((id, Some(answer))),
                    Ok(None) => {}
                    Err(unsettled) => *held = Some(*unsettled),
                }
            }
        }
        let control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        send_with_fds(
            control.as_raw_fd(),
            request.as_bytes(),
            &[channel.as_raw_fd()],
        )
        .inspect_err(|e| self.failed(e))?;
        Ok((id, None))
    }

    /// Whether this zygote's spares have no group made ahead yet (it is live).
    pub(super) fn wants_spare_group(&self) -> bool {
        !self.is_dead() && self.lock_spare_group().is_none()
    }

    /// Give this zygote's current or next spare `group` to join while it waits. The group
    /// is this zygote's until a spare's answer names it ([`PendingFork::read_answer`]).
    pub(super) fn grant_spare_group(&self, group: ReadyGroup) -> Result<(), ReadyGroup> {
        let control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let message = json!({
            "op": "spare-cgroup",
            "name": group.name(),
            "cgroup_procs": group.cgroup.procs_files().iter().map(|p| p.to_string_lossy()).collect::<Vec<_>>(),
        })
        .to_string();
        if self.is_dead() || send_with_fds(control.as_raw_fd(), message.as_bytes(), &[]).is_err() {
            return Err(group);
        }
        *self.lock_spare_group() = Some(group);
        Ok(())
    }

    /// The zygote's new spare (its socket and pid, from the events channel): the next
    /// worker's request goes to it.
    fn offer_spare(&self, sock: OwnedFd, pid: i32) {
        if self.is_dead() {
            return;
        }
        *self.lock_spare() = Spare::offer(sock, pid);
    }

    fn lock_spare(&self) -> std::sync::MutexGuard<'_, Option<Spare>> {
        self.spare.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_spare_group(&self) -> std::sync::MutexGuard<'_, Option<ReadyGroup>> {
        self.spare_group.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A zygote that fails a request (timeout, closed socket, garbage) is replaced: kill it;
    /// the manager restarts it.
    fn failed(&self, e: &io::Error) {
        warn!(pid = self.pid, interpreter = %self.interpreter.display(), error = %e,
            "zygote failed a fork request; killing it");
        self.kill();
    }
}

/// A worker forked from a zygote: not our child, watched through its pidfd.
pub struct ForkedWorker {
    pub pid: i32,
    pidfd: OwnedFd,
    exits: Arc<ExitBoard>,
    /// Its channel, for the module report, and what the report is about.
    report: Option<(Arc<Frameworks>, OwnedFd, String, PathBuf)>,
}

impl ForkedWorker {
    /// Wait until the process has exited; describe how (as the zygote saw it, when it did).
    /// Meanwhile its module report is read, on a task of its own.
    pub async fn wait(mut self) -> String {
        if let Some((fw, channel, host, interpreter)) = self.report.take() {
            tokio::spawn(fw.read_report(channel, host, interpreter));
        }
        let pid = self.pid;
        // SAFETY: the OwnedFd stays open, and the same fd, for as long as the AsyncFd lives.
        match unsafe { AsyncFd::register_with_interest(self.pidfd, Interest::READABLE) } {
            // A pidfd turns readable once, when the process exits, and stays so.
            Ok(fd) => {
                if let Err(e) = fd.readable().await {
                    warn!(pid, error = %e, "waiting on a worker's pidfd failed; polling instead");
                    poll_until_exit(fd.as_raw_fd()).await;
                }
            }
            Err(e) => {
                let (fd, _) = e.into_parts();
                poll_until_exit(fd.as_raw_fd()).await;
            }
        }
        match self.exits.take(pid, STATUS_WAIT).await {
            Some(status) => status,
            None => "exited (status unknown: its zygote is gone)".to_string(),
        }
    }
}

async fn poll_until_exit(fd: RawFd) {
    while poll_now(fd, libc::POLLIN) == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Exit statuses the zygotes reported, until the worker's waiter takes them.
#[derive(Default)]
pub(super) struct ExitBoard {
    statuses: Mutex<HashMap<i32, String>>,
    changed: Notify,
}

impl ExitBoard {
    fn put(&self, pid: i32, status: String) {
        let mut map = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 4096 {
            map.clear(); // reports nobody waited for; bounded
        }
        map.insert(pid, status);
        drop(map);
        self.changed.notify_waiters();
    }

    async fn take(&self, pid: i32, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(s) = self
                .statuses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&pid)
            {
                return Some(s);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// The manager thread: starts zygotes on request and restarts those that die.
struct Manager {
    zygotes: std::sync::Weak<Zygotes>,
    script: PathBuf,
    preload: String,
    lifeline: OwnedFd,
    children: HashMap<PathBuf, (Child, Instant)>,
    /// Interpreters that should have a zygote: failures in a row, and no restart before.
    wanted: HashMap<PathBuf, (u32, Instant)>,
}

impl Manager {
    fn run(mut self, requests: mpsc::Receiver<Start>) {
        loop {
            match requests.recv_timeout(Duration::from_millis(100)) {
                Ok(start) => {
                    let result = self.ensure(&start.interpreter, true);
                    let _ = start.reply.send(result);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            self.supervise();
        }
    }

    fn supervise(&mut self) {
        let Some(zygotes) = self.zygotes.upgrade() else {
            return;
        };
        let mut exited = Vec::new();
        for (interp, (child, started)) in self.children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                exited.push((interp.clone(), status, started.elapsed()));
            }
        }
        for (interp, status, lived) in exited {
            self.children.remove(&interp);
            if let Some(z) = zygotes.lock_live().remove(&interp) {
                z.mark_dead();
            }
            let entry = self
                .wanted
                .entry(interp.clone())
                .or_insert((0, Instant::now()));
            entry.0 = if lived < STABLE_AFTER { entry.0 + 1 } else { 0 };
            let backoff = if entry.0 == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs(1 << (entry.0 - 1).min(5)).min(MAX_BACKOFF)
            };
            entry.1 = Instant::now() + backoff;
            warn!(interpreter = %interp.display(), %status, lived_ms = lived.as_millis() as u64,
                restart_in_ms = backoff.as_millis() as u64, "zygote exited; restarting it");
        }
        let due: Vec<PathBuf> = self
            .wanted
            .iter()
            .filter(|(interp, (_, at))| {
                *at <= Instant::now() && !self.children.contains_key(*interp)
            })
            .map(|(i, _)| i.clone())
            .collect();
        for interp in due {
            if let Err(e) = self.ensure(&interp, false) {
                warn!(interpreter = %interp.display(), error = %e, "cannot restart zygote");
            }
        }
    }

    /// The live zygote of `interp`, starting it unless it is backing off (when `asked`,
    /// a request is waiting: it gets an error and starts its worker directly).
    fn ensure(&mut self, interp: &Path, asked: bool) -> Result<Arc<Zygote>, String> {
        let zygotes = self.zygotes.upgrade().ok_or("the agent is stopping")?;
        if let Some(z) = zygotes.lock_live().get(interp) {
            if !z.dead.load(Ordering::Acquire) {
                return Ok(z.clone());
            }
        }
        let (failures, not_before) = *self
            .wanted
            .entry(interp.to_path_buf())
            .or_insert((0, Instant::now()));
        if asked && not_before > Instant::now() {
            return Err(format!(
                "the zygote of {} keeps exiting ({failures} times in a row); next start in {} s",
                interp.display(),
                not_before
                    .saturating_duration_since(Instant::now())
                    .as_secs()
                    + 1
            ));
        }
        let (zygote, child) = self.spawn(interp, zygotes.exits.clone()).map_err(|e| {
            // Count it like an early exit, so a broken interpreter is not retried in a loop.
            let entry = self
                .wanted
                .entry(interp.to_path_buf())
                .or_insert((0, Instant::now()));
            entry.0 += 1;
            entry.1 =
                Instant::now() + Duration::from_secs(1 << (entry.0 - 1).min(5)).min(MAX_BACKOFF);
            format!("starting the zygote of {}: {e}", interp.display())
        })?;
        self.children
            .insert(interp.to_path_buf(), (child, Instant::now()));
        zygotes
            .lock_live()
            .insert(interp.to_path_buf(), zygote.clone());
        Ok(zygote)
    }

    fn spawn(&self, interp: &Path, exits: Arc<ExitBoard>) -> io::Result<(Arc<Zygote>, Child)> {
        let (control, control_theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let (events, events_theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        set_timeouts(control.as_raw_fd(), FORK_TIMEOUT)?;
        let fds = [
            (control_theirs.as_raw_fd(), CONTROL_FD),
            (events_theirs.as_raw_fd(), EVENTS_FD),
            (self.lifeline.as_raw_fd(), LIFELINE_FD),
        ];
        let parent = std::process::id() as libc::pid_t;
        // The workers' open-file limit: every fork of this zygote inherits it.
        let nofile = super::rlimit::worker_nofile();
        let mut cmd = Command::new(interp);
        cmd.arg("-I")
            .arg(&self.script)
            .arg(&self.preload)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        // SAFETY: only async-signal-safe system calls on data prepared above.
        unsafe {
            cmd.pre_exec(move || {
                // Its own session: a terminal's Ctrl-C reaches the agent, which stops it.
                check(libc::setsid())?;
                // Its forks yield to serving processes; each child resets it (priority.rs).
                super::priority::lower_in_child()?;
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
                if libc::getppid() != parent {
                    return Err(io::Error::other("agent exited during spawn"));
                }
                super::rlimit::apply_in_child(nofile)?;
                // Out of the way first, then into place (dup2 clears close-on-exec).
                let mut high = [0; 3];
                for (i, (src, _)) in fds.iter().enumerate() {
                    high[i] = check(libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 64))?;
                }
                for (i, (_, dst)) in fds.iter().enumerate() {
                    check(libc::dup2(high[i], *dst))?;
                }
                check(libc::syscall(
                    libc::SYS_close_range,
                    (LIFELINE_FD + 1) as libc::c_uint,
                    libc::c_uint::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) as libc::c_int)?;
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(control_theirs);
        drop(events_theirs);
        let pid = child.id() as i32;
        info!(pid, interpreter = %interp.display(), "zygote started");
        let zygote = Arc::new(Zygote::new(interp.to_path_buf(), pid, control));
        let weak = Arc::downgrade(&zygote);
        std::thread::Builder::new()
            .name("roost-zygote-ev".into())
            .spawn(move || read_events(events, exits, weak))?;
        Ok((zygote, child))
    }
}

/// Exit reports and new spares' sockets from one zygote, until it closes its end.
pub(super) fn read_events(events: OwnedFd, exits: Arc<ExitBoard>, zygote: Weak<Zygote>) {
    loop {
        match recv_with_fds(events.as_raw_fd(), 1) {
            Ok((bytes, _)) if bytes.is_empty() => return,
            Ok((bytes, mut fds)) => {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                    continue;
                };
                if let (Some(pid), Some(status)) = (v["pid"].as_i64(), v["status"].as_str()) {
                    exits.put(pid as i32, status.to_string());
                } else if let (Some(pid), 1) = (v["spare"].as_i64(), fds.len()) {
                    if let Some(zygote) = zygote.upgrade() {
                        zygote.offer_spare(fds.remove(0), pid as i32);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The real path of `interpreter`, if root may run it: the zygote runs it as root, so the
/// file and every directory above it must be root's and writable by no one else. Only for
/// the operator's paths (the `interpreters` allowlist): a site's paths are never resolved
/// by root (`interpreters.rs`).
pub fn trusted_interpreter(interpreter: &Path) -> Result<PathBuf, String> {
    let real = fs::canonicalize(interpreter)
        .map_err(|e| format!("interpreter {}: {e}", interpreter.display()))?;
    let meta = fs::metadata(&real).map_err(|e| format!("interpreter {}: {e}", real.display()))?;
    if !meta.is_file() || meta.mode() & 0o111 == 0 {
        return Err(format!(
            "interpreter {} is not an executable file",
            real.display()
        ));
    }
    for p in real.ancestors() {
        let m = fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if m.uid() != 0 || m.mode() & 0o022 != 0 {
            return Err(format!(
                "interpreter {} is not root's alone ({} is owned by uid {} with mode {:o}); no zygote runs it as root",
                real.display(),
                p.display(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    Ok(real)
}

fn install_script(state_dir: &Path) -> io::Result<PathBuf> {
    let dir = state_dir.join("zygote");
    ensure_dir(&dir, 0o755)?;
    // The module first: a zygote that starts between the two renames finds the new one.
    install_file(&dir, "roost_worker.py", WORKER_MODULE)?;
    // What a spare imports while it waits, the way a never-started site's app is imported.
    let prewarm = dir.join("prewarm");
    ensure_dir(&prewarm, 0o755)?;
    install_file(&prewarm, "roost_prewarm_app.py", PREWARM_APP)?;
    install_file(&dir, "roost_zygote.py", SCRIPT)
}

/// Writes `contents` to `dir/name`, root's and world-readable, replacing it atomically.
fn install_file(dir: &Path, name: &str, contents: &str) -> io::Result<PathBuf> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    fs::write(&tmp, contents)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    nix::unistd::chown(
        &tmp,
        Some(nix::unistd::Uid::from_raw(0)),
        Some(nix::unistd::Gid::from_raw(0)),
    )?;
    fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_interpreter_is_trusted_and_a_user_owned_one_is_not() {
        let real =
            trusted_interpreter(Path::new("/usr/bin/python3")).expect("system python is root's");
        assert!(real.is_absolute());
        let dir = std::env::temp_dir().join(format!("roost-zygote-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("python");
        fs::write(&fake, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o777)).unwrap();
        let err = trusted_interpreter(&fake).unwrap_err();
        assert!(err.contains("not root's alone"), "{err}");
        // A symlink into root's tree resolves to its target, which is what would run.
        let link = dir.join("python-link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(trusted_interpreter(&link).unwrap(), real);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_embedded_script_is_the_repo_file() {
        assert!(SCRIPT.contains("def worker_main"));
        assert!(SCRIPT.contains("PR_SET_NO_NEW_PRIVS"));
        assert!(SCRIPT.contains("import roost_worker"));
        assert!(WORKER_MODULE.contains("def serve(app, spec)"));
    }
}
