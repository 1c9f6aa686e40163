//! The real [`Launcher`]: sockets under the state directory, the site's cgroup and log, and
//! a worker forked from its interpreter's zygote or started directly.
//!
//! Starts run on a few dedicated launcher threads that live as long as the agent: a direct
//! worker's parent-death signal follows the *thread* that forked it, so it must never be a
//! pooled thread that exits when idle; and a zygote round trip (up to seconds while a zygote
//! starts) must never hold a request thread.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use roost_proto::SiteSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::cgroup::{Cgroups, Limits, SiteCgroup, STARTING_CPU_WEIGHT};
use super::direct as worker;
use super::interpreters;
use super::jobs::JobQueue;
use super::ready::{Ready, ReadyGroup};
use super::socket;
use super::users::{SiteUser, UserCache};
use super::zygote::{PendingFork, SpareGroup};
use super::{
    BootWeight, BoxFut, Exit, LaunchError, Launcher, Listener, SocketRole, Started, Worker,
};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::sitelog::{self, SiteLog};

const MIB: u64 = 1024 * 1024;
/// Launcher threads: starts of different sites proceed side by side, a slow zygote start
/// holds one of them, never a request thread.
const LAUNCH_THREADS: usize = 4;
/// How long a worker's leftover processes may take to vanish after SIGKILL.
const GROUP_GONE_WAIT: Duration = Duration::from_secs(2);
/// How long an exited worker's output may take to reach its log before the exit is reported.
const OUTPUT_DRAIN_WAIT: Duration = Duration::from_secs(1);

pub struct SystemLauncher {
    cfg: Arc<ArcSwap<Config>>,
    cgroups: Cgroups,
    /// Each site's cgroup, once a worker of it started.
    site_cgroups: Arc<DashMap<String, SiteCgroup>>,
    /// Each site's log writer, shared by its workers' output pumps.
    logs: Arc<DashMap<String, Arc<Mutex<SiteLog>>>>,
    /// Site users looked up before, while the user files stay as they were.
    users: Arc<UserCache>,
    /// Sockets and cgroups made ahead for the next never-started sites.
    ready: Arc<Ready>,
    /// Which of a site's two socket names its serving worker was bound at.
    serving_names: Arc<DashMap<String, &'static str>>,
    jobs: Arc<JobQueue>,
    metrics: Arc<Metrics>,
}

impl SystemLauncher {
    /// Prepare cgroups (killing what a previous agent left) and start the launcher threads.
    /// `runtime` is where workers' exits are watched.
    pub fn new(
        cfg: Arc<ArcSwap<Config>>,
        metrics: Arc<Metrics>,
        runtime: Handle,
    ) -> std::io::Result<Arc<Self>> {
        let c = cfg.load_full();
        socket::ensure_dir(&c.state_dir, 0o755)?;
        socket::ensure_dir(&c.state_dir.join("sites"), 0o711)?;
        socket::ensure_dir(&c.state_dir.join("logs"), 0o750)?;
        let cgroups = if c.cgroups {
            Cgroups::detect(&c.cgroup_name())
        } else {
            Cgroups::Unavailable
        };
        let leftovers = cgroups.clean_leftovers();
        if leftovers > 0 {
            warn!(
                killed = leftovers,
                "killed workers left behind by a previous agent"
            );
        }
        let ready = Ready::start(cfg.clone(), cgroups.clone(), starting_limits)?;
        info!(limits = cgroups.describe(), max_workers = c.max_workers, memory_budget_mb = ?c.memory_budget_mb,
            "launcher ready");
        if !super::priority::can_restore_normal() {
            warn!(
                nice = super::priority::START_NICE,
                "no CAP_SYS_NICE: workers keep the nice their start ran at (see deploy/systemd/roost-agent.service)"
            );
        }
        let jobs = Arc::new(JobQueue::default());
        for i in 0..LAUNCH_THREADS {
            let queue = jobs.clone();
            let runtime = runtime.clone();
            std::thread::Builder::new()
                .name(format!("roost-launch-{i}"))
                .spawn(move || {
                    // tokio's child reaper must be registered with the control runtime.
                    let _enter = runtime.enter();
                    if let Err(e) = super::priority::lower_this_thread() {
                        warn!(error = %e, "launcher thread keeps normal CPU priority");
                    }
                    while let Some(job) = queue.pop() {
                        job();
                    }
                })?;
        }
        Ok(Arc::new(Self {
            cfg,
            cgroups,
            site_cgroups: Arc::new(DashMap::new()),
            logs: Arc::new(DashMap::new()),
            users: Arc::new(UserCache::default()),
            ready,
            serving_names: Arc::new(DashMap::new()),
            jobs,
            metrics,
        }))
    }

    pub fn uses_cgroups(&self) -> bool {
        !matches!(self.cgroups, Cgroups::Unavailable)
    }

    /// Run `f` on a launcher thread; its result comes back as a future.
    fn on_launcher<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, LaunchError> + Send + 'static,
    ) -> BoxFut<Result<T, LaunchError>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.jobs.push(Box::new(move || {
            let _ = tx.send(f());
        }));
        Box::pin(async move {
            if sent.is_err() {
                return Err(LaunchError("the launcher threads are gone".into()));
            }
            rx.await
                .unwrap_or_else(|_| Err(LaunchError("the launcher thread panicked".into())))
        })
    }

    fn cgroup(&self, host: &str) -> Option<SiteCgroup> {
        self.site_cgroups.get(host).map(|c| c.clone())
    }
}

impl Drop for SystemLauncher {
    fn drop(&mut self) {
        self.jobs.close(); // the launcher threads end
    }
}

/// What a start needs to set up the site's cgroup, movable to a launcher thread.
#[derive(Clone)]
struct CgroupSetup {
    cgroups: Cgroups,
    ready: Arc<Ready>,
    site_cgroups: Arc<DashMap<String, SiteCgroup>>,
    metrics: Arc<Metrics>,
}

impl CgroupSetup {
    /// The site's cgroup with the spec's limits applied; the files a new worker joins.
    /// A cgroup that can't be set up is logged and the worker runs without it.
    /// `joined`: a group made ahead that the child is in already; it becomes the site's
    /// (then the second value is true: the child has nothing to join).
    fn prepare(
        &self,
        host: &str,
        spec: &SiteSpec,
        cfg: &Config,
        weight: BootWeight,
        joined: Option<ReadyGroup>,
    ) -> (Vec<PathBuf>, bool) {
        let mut in_place = false;
        let claimed = match joined.map(|g| g.claim(host)) {
            Some(Ok(claimed)) => {
                in_place = true;
                Some(claimed)
            }
            Some(Err(g)) => {
                self.ready.orphan(g);
                None
            }
            None => None,
        };
        // The child's group made ahead, a ready-made group renamed to the site's, or the
        // site's created (again) at every start: that heals a group someone removed.
        let (cg, written) = match claimed.or_else(|| self.ready.take_group(host)) {
            Some((cg, written)) => (cg, Some(written)),
            None => match self.cgroups.site(host) {
                Ok(Some(cg)) => (cg, None),
                Ok(None) => return (Vec::new(), false),
                Err(e) => {
                    self.metrics.limit_failures.inc();
                    tracing::error!(site = %host, error = %e, "cannot create the site's cgroup; starting without kernel limits");
                    return (Vec::new(), false);
                }
            },
        };
        let mut limits = site_limits(spec, cfg);
        if weight == BootWeight::Lowest {
            limits.cpu_weight = STARTING_CPU_WEIGHT;
        }
        if limits.cpu_cores.is_some() && !self.cgroups.has_cpu() {
            warn!(site = %host, "no cpu cgroup controller on this node: the site's cpu_limit is not applied");
        }
        if spec.io_weight.is_some() && !self.cgroups.has_io() {
            info!(site = %host, "no io/blkio cgroup controller on this node: the site's io_weight is not applied");
        }
        if written == Some(limits) {
            // The ready-made group has them already.
        } else if let Err(e) = cg.set_limits(&limits) {
            self.metrics.limit_failures.inc();
            tracing::error!(site = %host, error = %e, "cannot set the site's limits; starting without kernel limits");
            // A child already in the group stays there, under the limits it had ahead.
            return (Vec::new(), false);
        }
        let files = cg.procs_files();
        self.site_cgroups.insert(host.to_string(), cg);
        (files, in_place)
    }
}

/// Tell the zygote's child its cgroups. A child that is gone (its zygote died with the
/// request) is found out when the answer is read, and the base zygote asked instead
/// (`finish_fork`).
fn tell_cgroups(host: &str, fork: Option<&mut PendingFork>, procs: &[PathBuf], joined: bool) {
    if let Some(pending) = fork {
        if let Err(e) = pending.send_cgroups(procs, joined) {
            debug!(site = %host, error = %e, "cannot tell the zygote's child its cgroups yet");
        }
    }
}

/// Microseconds, for the start timings' debug lines.
fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// The limits a site with none of its own starts under: what a ready-made group gets.
fn starting_limits(cfg: &Config) -> Limits {
    let d = &cfg.site_limits;
    Limits {
        memory_bytes: None,
        pids_max: Some(cfg.pids_max),
        cpu_cores: d.cpu_limit,
        cpu_weight: STARTING_CPU_WEIGHT,
        io_weight: d.io_weight,
    }
}

/// The site's kernel limits: its record's, else the node's defaults.
fn site_limits(spec: &SiteSpec, cfg: &Config) -> Limits {
    let d = &cfg.site_limits;
    Limits {
        memory_bytes: spec.memory_limit_mb.map(|mb| mb * MIB),
        pids_max: Some(cfg.pids_max),
        cpu_cores: spec.cpu_limit.map(|c| c.0).or(d.cpu_limit),
        cpu_weight: d.cpu_weight,
        io_weight: spec.io_weight.unwrap_or(d.io_weight),
    }
}

/// The site's user, if the operator's policy lends it to sites; a refusal is counted and
/// logged here, and its reason reaches the client's 503 page.
fn site_user(
    users: &UserCache,
    host: &str,
    name: &str,
    cfg: &Config,
    metrics: &Metrics,
) -> Result<SiteUser, LaunchError> {
    users.lookup_allowed(name, &cfg.site_users).map_err(|e| {
        if e.is_refusal() {
            metrics.refused_site_users.inc();
            warn!(site = %host, user = %name, error = %e, "site refused: its user is not one sites may run as");
        }
        LaunchError(e.to_string())
    })
}

/// The site's log writer, opened on its first worker's start.
fn site_log(
    logs: &DashMap<String, Arc<Mutex<SiteLog>>>,
    ready: &Ready,
    cfg: &Config,
    host: &str,
) -> std::io::Result<Arc<Mutex<SiteLog>>> {
    if let Some(log) = logs.get(host) {
        return Ok(log.clone());
    }
    let log = match ready.take_log(host, cfg.log_max_bytes) {
        Some(log) => log,
        None => SiteLog::open(&cfg.state_dir, host, cfg.log_max_bytes)?,
    };
    let log = Arc::new(Mutex::new(log));
    Ok(logs.entry(host.to_string()).or_insert(log).clone())
}

struct SystemWorker {
    pid: i32,
}

impl Worker for SystemWorker {
    fn pid(&self) -> i32 {
        self.pid
    }
    fn terminate(&self) {
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
    }
    fn kill(&self) {
        let _ = kill(Pid::from_raw(-self.pid), Signal::SIGKILL);
    }
}

/// Whether any process of group `pgid` is left (signal 0 reaches none once it is empty).
fn group_alive(pgid: i32) -> bool {
    kill(Pid::from_raw(-pgid), None).is_ok()
}

/// A start's work on a launcher thread, with what it needs cloned out of the launcher.
struct StartJob {
    setup: CgroupSetup,
    cfg: Arc<Config>,
    logs: Arc<DashMap<String, Arc<Mutex<SiteLog>>>>,
    users: Arc<UserCache>,
    metrics: Arc<Metrics>,
    serving_names: Arc<DashMap<String, &'static str>>,
    /// When the start was asked for (the launcher queue's wait is in the timings).
    queued: Instant,
}

/// What a start prepares besides the cgroup, and when each piece was ready (the timings).
struct Prepared {
    user: SiteUser,
    listener: Arc<Listener>,
    log: std::fs::File,
    output_drained: oneshot::Receiver<()>,
    looked_up: Instant,
    bound: Instant,
    log_ready: Instant,
}

/// A worker just started, before its exit is watched.
struct Spawned {
    proc: worker::WorkerProc,
    state_dir: PathBuf,
    output_drained: oneshot::Receiver<()>,
}

impl SystemLauncher {
    fn start_job(&self) -> StartJob {
        StartJob {
            setup: CgroupSetup {
                cgroups: self.cgroups.clone(),
                ready: self.ready.clone(),
                site_cgroups: self.site_cgroups.clone(),
                metrics: self.metrics.clone(),
            },
            cfg: self.cfg.load_full(),
            logs: self.logs.clone(),
            users: self.users.clone(),
            metrics: self.metrics.clone(),
            serving_names: self.serving_names.clone(),
            queued: Instant::now(),
        }
    }
}

impl StartJob {
    /// The site's user, if the operator lends it to sites (looked up once per trip).
    fn user(&self, host: &str, spec: &SiteSpec) -> Result<SiteUser, LaunchError> {
        site_user(&self.users, host, &spec.user, &self.cfg, &self.metrics)
    }

    /// Bind the site's socket.
    fn bind(&self, host: &str, role: SocketRole) -> Result<Arc<Listener>, LaunchError> {
        let began = Instant::now();
        // A candidate takes whichever of the two names the serving worker was not bound at:
        // a promotion renames nothing (see `promote`). A serving socket may go in a
        // directory made ahead.
        let (name, ready) = match role {
            SocketRole::Serving => {
                self.serving_names.insert(host.to_string(), socket::SERVING);
                (socket::SERVING, self.setup.ready.take_socket(host))
            }
            SocketRole::Candidate => match self.serving_names.get(host).map(|n| *n) {
                Some(socket::CANDIDATE) => (socket::SERVING, None),
                _ => (socket::CANDIDATE, None),
            },
        };
        let listener = match ready {
            Some(taken) => taken,
            None => {
                let (socket, path) = socket::bind(&self.cfg.state_dir, host, name)
                    .map_err(|e| LaunchError(format!("cannot create the site's socket: {e}")))?;
                Listener {
                    socket,
                    address: path.clone(),
                    path,
                }
            }
        };
        debug!(site = %host, bind_us = us(began.elapsed()), "socket bound");
        Ok(Arc::new(listener))
    }

    /// The user, the socket and the log of a start.
    fn prepare_rest(
        &self,
        host: &str,
        spec: &SiteSpec,
        socket: Result<Arc<Listener>, SocketRole>,
    ) -> Result<Prepared, LaunchError> {
        // The user must exist and be one sites may run as before its socket, log or spec is
        // made (a refused site's start leaves at most its empty cgroup, removed with the site).
        let user = self.user(host, spec)?;
        let looked_up = Instant::now();
        let listener = match socket {
            Ok(listener) => listener,
            Err(role) => self.bind(host, role)?,
        };
        let bound = Instant::now();
        let (log, output_drained) = site_log(&self.logs, &self.setup.ready, &self.cfg, host)
            .and_then(|log| match self.setup.ready.take_pump() {
                Some(pump) => Ok(pump.assign(host, log)),
                None => sitelog::pump(host, log),
            })
            .map_err(|e| LaunchError(format!("cannot open the site's log: {e}")))?;
        Ok(Prepared {
            user,
            listener,
            log,
            output_drained,
            looked_up,
            bound,
            log_ready: Instant::now(),
        })
    }

    /// Everything up to the worker's pid, on `socket` (or a new socket of that role). The
    /// zygote is asked for the child first, so its answer and the child's wake-up overlap
    /// the user lookup, the socket, the cgroup and the log (issue 14).
    fn run(
        &self,
        host: &str,
        spec: &SiteSpec,
        socket: Result<Arc<Listener>, SocketRole>,
        weight: BootWeight,
    ) -> Result<(Arc<Listener>, Spawned), LaunchError> {
        let (cfg, metrics) = (&self.cfg, &self.metrics);
        let began = Instant::now();
        // The zygote runs as root: its interpreter is the operator's choice, and a site
        // asking for another is refused, not started some other way.
        let zygote_interpreter = if spec.uses_zygote() {
            let chosen = interpreters::for_site(spec, &cfg.interpreters).map_err(|e| {
                metrics.refused_interpreters.inc();
                warn!(site = %host, error = %e, "site refused: its interpreter is not one this node allows");
                LaunchError(e)
            })?;
            Some(chosen)
        } else {
            None
        };
        let interpreter_checked = Instant::now();
        // An unspecialised child: if the start goes no further, it reads EOF and exits.
        let mut fork = worker::ask_zygote(host, spec, zygote_interpreter.as_deref());
        let asked = Instant::now();
        // A spare that joined a group made ahead (cgroup v1, `ready.rs`) has that group
        // become the site's once its answer says so, after the user, socket and log; its
        // worker then joins nothing. Otherwise the cgroup first: the child joins it while the
        // rest is prepared.
        let late = fork.as_ref().is_some_and(|f| f.expects_spare_group());
        let mut procs = Vec::new();
        if !late {
            procs = self.setup.prepare(host, spec, cfg, weight, None).0;
            tell_cgroups(host, fork.as_mut(), &procs, false);
        }
        let cgroup_ready = Instant::now();
        let prepared = self.prepare_rest(host, spec, socket);
        // The answer now: what it says of a group made ahead decides the cgroup step (late)
        // or frees that group (a child that got the site's group already, or a start that
        // stops here).
        let joined = match fork.as_mut().map(|f| f.read_answer()) {
            Some(SpareGroup::Joined(g)) if late && prepared.is_ok() => Some(g),
            Some(SpareGroup::Joined(g) | SpareGroup::Unused(g)) => {
                self.setup.ready.orphan(g);
                None
            }
            _ => None,
        };
        let Prepared {
            user,
            listener,
            log,
            output_drained,
            looked_up,
            bound,
            log_ready,
        } = prepared?;
        if late {
            let in_place;
            (procs, in_place) = self.setup.prepare(host, spec, cfg, weight, joined);
            tell_cgroups(host, fork.as_mut(), &procs, in_place);
        }
        let launch = worker::Launch {
            spec,
            host,
            user: &user,
            listener: &listener.socket,
            log,
            grace_secs: cfg.stop_grace.as_secs().max(1),
            cgroup_procs: &procs,
        };
        let proc = worker::spawn(&launch, fork)
            .map_err(|e| LaunchError(format!("cannot start the site's worker: {e}")))?;
        metrics
            .spawn_duration
            .with_label_values(&[proc.launcher().as_str()])
            .observe(began.elapsed().as_secs_f64());
        // Where the launcher's part of a cold start went (docs/first-hit.md, profile).
        debug!(site = %host, queued_us = us(began - self.queued), interpreter_us = us(interpreter_checked - began),
            request_us = us(asked - interpreter_checked),
            cgroup_us = us(cgroup_ready - asked), user_us = us(looked_up - cgroup_ready), bind_us = us(bound - looked_up),
            log_us = us(log_ready - bound), spawn_us = us(log_ready.elapsed()), "start timings");
        info!(site = %host, pid = proc.pid(), user = %user.name, uid = user.uid.as_raw(), "worker started");
        let spawned = Spawned {
            proc,
            state_dir: cfg.state_dir.clone(),
            output_drained,
        };
        Ok((listener, spawned))
    }
}

impl Spawned {
    /// The started worker, with the future of its exit: its group reaped, its last words
    /// logged and picked for the error page.
    fn started(self, host: String) -> Started {
        let Spawned {
            proc,
            state_dir,
            output_drained,
        } = self;
        let pid = proc.pid();
        let launcher = proc.launcher();
        let exited: BoxFut<Exit> = Box::pin(async move {
            let status = proc.wait().await;
            // Reap whatever the worker left in its process group (gunicorn's children).
            let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            let deadline = tokio::time::Instant::now() + GROUP_GONE_WAIT;
            while group_alive(pid) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // The worker's last words (an import error) may still be in the pipe: let them
            // reach the log before it is read. Bounded: a daemon it left may hold the pipe.
            let _ = tokio::time::timeout(OUTPUT_DRAIN_WAIT, output_drained).await;
            let log = sitelog::path(&state_dir, &host);
            let last_line = tokio::task::spawn_blocking(move || {
                let tail = sitelog::tail(&log, 20).unwrap_or_default();
                // The Python exception says more than gunicorn's closing "failed to boot".
                tail.lines()
                    .rev()
                    .find(|l| l.contains("Error:") || l.contains("Exception:"))
                    .or_else(|| tail.lines().last())
                    .unwrap_or("no output")
                    .trim()
                    .to_string()
            })
            .await
            .unwrap_or_default();
            Exit { status, last_line }
        });
        Started {
            worker: Arc::new(SystemWorker { pid }) as Arc<dyn Worker>,
            launcher,
            exited,
        }
    }
}

impl Launcher for SystemLauncher {
    fn socket(
        &self,
        host: &str,
        spec: &Arc<SiteSpec>,
        role: SocketRole,
    ) -> BoxFut<Result<Arc<Listener>, LaunchError>> {
        let job = self.start_job();
        let (host, spec) = (host.to_string(), spec.clone());
        self.on_launcher(move || {
            // The user must exist and be one sites may run as before anything is made.
            job.user(&host, &spec)?;
            job.bind(&host, role)
        })
    }

    fn start(
        &self,
        host: &str,
        spec: &Arc<SiteSpec>,
        listener: &Arc<Listener>,
        weight: BootWeight,
    ) -> BoxFut<Result<Started, LaunchError>> {
        let job = self.start_job();
        let (host, spec, listener) = (host.to_string(), spec.clone(), listener.clone());
        let spawning = {
            let host = host.clone();
            self.on_launcher(move || job.run(&host, &spec, Ok(listener), weight))
        };
        Box::pin(async move { Ok(spawning.await?.1.started(host)) })
    }

    fn bind_and_start(
        self: Arc<Self>,
        host: &str,
        spec: &Arc<SiteSpec>,
        role: SocketRole,
        weight: BootWeight,
    ) -> BoxFut<Result<(Arc<Listener>, Started), LaunchError>> {
        let job = self.start_job();
        let (host, spec) = (host.to_string(), spec.clone());
        let spawning = {
            let host = host.clone();
            self.on_launcher(move || job.run(&host, &spec, Err(role), weight))
        };
        Box::pin(async move {
            let (listener, spawned) = spawning.await?;
            Ok((listener, spawned.started(host)))
        })
    }

    fn probe(&self, host: &str, listener: &Arc<Listener>) -> BoxFut<Result<(), String>> {
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: roost-agent-probe\r\nConnection: close\r\n\r\n"
        );
        let path = listener.path.clone();
        Box::pin(async move {
            let mut stream = tokio::net::UnixStream::connect(&path)
                .await
                .map_err(|e| format!("cannot connect to the new worker: {e}"))?;
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("cannot send the new worker a request: {e}"))?;
            let mut head = [0u8; 16];
            let mut got = 0;
            while got < 12 {
                let n = stream
                    .read(&mut head[got..])
                    .await
                    .map_err(|e| format!("the new worker failed its first request: {e}"))?;
                if n == 0 {
                    return Err("the new worker closed its first request without an answer".into());
                }
                got += n;
            }
            if head.starts_with(b"HTTP/1.") {
                Ok(())
            } else {
                Err("the new worker's first answer is not HTTP".into())
            }
        })
    }

    fn answered(&self, host: &str) -> BoxFut<()> {
        let (cg, weight) = (self.cgroup(host), self.cfg.load().site_limits.cpu_weight);
        let host = host.to_string();
        Box::pin(async move {
            let Some(cg) = cg else { return };
            let raised = tokio::task::spawn_blocking(move || cg.set_cpu_weight(weight)).await;
            if let Ok(Err(e)) = raised {
                warn!(site = %host, error = %e, "cannot give the site's cgroup its CPU weight back after its start");
            }
        })
    }

    fn promote(&self, host: &str, listener: &Listener) -> Result<PathBuf, String> {
        // No rename: a unix socket keeps the path it was bound at as its address, and the
        // agent's connection pool (pingora) reuses a connection only to a socket whose
        // address is the path it connects to; a renamed socket cost every request a new
        // connection and an error line. The candidate serves where it was bound; the old
        // name stays until the next candidate is bound over it, so a ticket taken just
        // before the switch still reaches the old worker, which drains it.
        let name = match listener.path.file_name().and_then(|n| n.to_str()) {
            Some(socket::CANDIDATE) => socket::CANDIDATE,
            Some(socket::SERVING) => socket::SERVING,
            _ => return Err(format!("not a site socket: {}", listener.path.display())),
        };
        self.serving_names.insert(host.to_string(), name);
        Ok(listener.path.clone())
    }

    fn forget(&self, host: &str) -> BoxFut<()> {
        let state_dir = self.cfg.load().state_dir.clone();
        self.serving_names.remove(host);
        let cgroup = self.site_cgroups.remove(host).map(|(_, c)| c);
        self.logs.remove(host);
        let host = host.to_string();
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || {
                socket::remove(&state_dir, &host);
                if let Some(cg) = cgroup {
                    cg.remove();
                }
            })
            .await;
        })
    }

    fn oom_kills(&self, host: &str) -> BoxFut<u64> {
        let cg = self.cgroup(host);
        Box::pin(async move {
            match cg {
                Some(cg) => tokio::task::spawn_blocking(move || cg.oom_kills())
                    .await
                    .unwrap_or(0),
                None => 0,
            }
        })
    }

    fn memory_bytes(&self, host: &str) -> BoxFut<Option<u64>> {
        let cg = self.cgroup(host);
        Box::pin(async move {
            match cg {
                Some(cg) => tokio::task::spawn_blocking(move || cg.memory_bytes())
                    .await
                    .ok()
                    .flatten(),
                None => None,
            }
        })
    }

    fn cpu_seconds(&self, host: &str) -> BoxFut<Option<f64>> {
        let cg = self.cgroup(host);
        Box::pin(async move {
            let cg = cg?;
            tokio::task::spawn_blocking(move || cg.cpu_seconds())
                .await
                .ok()
                .flatten()
        })
    }

    fn shutdown(&self) -> BoxFut<()> {
        let cgroups = self.cgroups.clone();
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || cgroups.remove_all()).await;
        })
    }
}
