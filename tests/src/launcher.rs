//! A cluster started by the operator's launcher, `deploy/cluster.sh`: etcd, N agents (each in
//! its own network namespace when root), M proxies and K sample sites `site-NNN.localhost`.
//! The test reads what was started from the launcher's `--state-file` JSON, signals agents
//! like an operator would (`kill -KILL`/`-TERM`), adds nodes with `kill -USR1 <launcher>`,
//! and stops the launcher with SIGTERM on drop (SIGINT when a test asks), which removes
//! everything it made.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::bins::{bin, workspace_root, CTL};
use crate::http::{get, Response};
use crate::process::{read_log, tail, Proc};
use crate::temp::TempRoot;
use crate::wait::{wait_for, wait_until};

/// Starting 3 agents and 2 proxies, and registering 100 sites with roostctl, takes ~10 s here.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// The launcher's stop: proxies drain, agents drain their workers (stop_grace_secs 5), etcd.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const TAIL_LINES: usize = 30;

/// What to ask `deploy/cluster.sh` for.
#[derive(Clone, Debug)]
pub struct LaunchOpts {
    pub agents: usize,
    pub proxies: usize,
    pub sites: usize,
    pub lease_ttl_secs: u32,
    /// Agents in network namespaces (the launcher's default as root); false: 127.0.0.x.
    pub netns: bool,
    /// Let the launcher make (and remove) its own temp dir instead of one inside the test's
    /// temp root; the test of "nothing left behind" needs this.
    pub own_run_dir: bool,
}

impl Default for LaunchOpts {
    fn default() -> Self {
        LaunchOpts {
            agents: 3,
            proxies: 2,
            sites: 100,
            lease_ttl_secs: 5,
            netns: true,
            own_run_dir: false,
        }
    }
}

/// One agent as the state file describes it.
#[derive(Clone, Debug)]
pub struct NodeState {
    pub id: String,
    pub pid: u32,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub netns: Option<String>,
    pub veth: Option<String>,
    pub log: PathBuf,
}

pub struct Launched {
    launcher: Option<Proc>,
    state_file: PathBuf,
    /// The state as last read.
    pub state: Value,
    pub opts: LaunchOpts,
    // Last: removed after the launcher is gone (and kept when a test fails).
    root: TempRoot,
}

impl Launched {
    /// Run `deploy/cluster.sh` and wait until its state file says `"ready": true`.
    pub fn start(opts: LaunchOpts) -> Launched {
        // The binaries the launcher runs are the ones the harness checked (built if missing).
        let bin_dir = bin(CTL)
            .parent()
            .expect("binary has a directory")
            .to_path_buf();
        let root = TempRoot::new("launcher");
        let state_file = root.path().join("state.json");
        let mut cmd = Command::new(workspace_root().join("deploy/cluster.sh"));
        cmd.arg("--no-build")
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--agents")
            .arg(opts.agents.to_string())
            .arg("--proxies")
            .arg(opts.proxies.to_string())
            .arg("--sites")
            .arg(opts.sites.to_string())
            .arg("--lease-ttl")
            .arg(opts.lease_ttl_secs.to_string())
            .arg("--port-base")
            .arg(free_port_block(10 + 2 * opts.proxies as u16).to_string())
            .arg("--state-file")
            .arg(&state_file);
        if !opts.netns {
            cmd.arg("--no-netns");
        }
        if !opts.own_run_dir {
            cmd.arg("--run-dir").arg(root.subdir("run"));
        }
        let level = std::env::var("ROOST_TEST_LOG").unwrap_or_else(|_| "info".to_string());
        cmd.env("RUST_LOG", level);
        // If the test process dies, the launcher gets SIGTERM and cleans up after itself.
        let launcher = Proc::spawn(
            "cluster.sh",
            cmd,
            &root.path().join("launcher.log"),
            Signal::SIGTERM,
        );
        let mut l = Launched {
            launcher: Some(launcher),
            state_file,
            state: Value::Null,
            opts,
            root,
        };
        let ready = wait_until(START_TIMEOUT, || {
            l.launcher_exited().is_some() || l.reload() && l.state["ready"] == true
        });
        if !ready || l.launcher_exited().is_some() {
            panic!(
                "deploy/cluster.sh did not get ready (exit {:?})\n{}",
                l.launcher_exited(),
                l.diagnostics()
            );
        }
        l
    }

    /// Re-read the state file; false when it is absent or half-written.
    pub fn reload(&mut self) -> bool {
        match std::fs::read(&self.state_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        {
            Some(v) => {
                self.state = v;
                true
            }
            None => false,
        }
    }

    pub fn launcher_pid(&self) -> u32 {
        self.launcher.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    fn launcher_exited(&mut self) -> Option<ExitStatus> {
        self.launcher.as_mut().and_then(|p| p.exited())
    }

    pub fn etcd_url(&self) -> String {
        self.state["etcd"]
            .as_str()
            .expect("etcd in state")
            .to_string()
    }

    /// The launcher's run dir (logs, agent state dirs, sites).
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from(self.state["run_dir"].as_str().expect("run_dir in state"))
    }

    /// Each proxy's (listen, admin) address.
    pub fn proxies(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.state["proxies"]
            .as_array()
            .expect("proxies in state")
            .iter()
            .map(|p| (addr(&p["listen"]), addr(&p["admin"])))
            .collect()
    }

    /// Each proxy's pid.
    pub fn proxy_pids(&self) -> Vec<u32> {
        self.state["proxies"]
            .as_array()
            .expect("proxies in state")
            .iter()
            .map(|p| p["pid"].as_u64().expect("proxy pid") as u32)
            .collect()
    }

    pub fn etcd_pid(&self) -> u32 {
        self.state["etcd_pid"].as_u64().expect("etcd_pid") as u32
    }

    pub fn nodes(&self) -> Vec<NodeState> {
        self.state["agents"]
            .as_array()
            .expect("agents in state")
            .iter()
            .map(|a| NodeState {
                id: a["id"].as_str().expect("agent id").to_string(),
                pid: a["pid"].as_u64().expect("agent pid") as u32,
                listen: addr(&a["listen"]),
                admin: addr(&a["admin"]),
                netns: a["netns"].as_str().map(str::to_string),
                veth: a["veth"].as_str().map(str::to_string),
                log: PathBuf::from(a["log"].as_str().expect("agent log")),
            })
            .collect()
    }

    pub fn node(&self, id: &str) -> NodeState {
        self.nodes()
            .into_iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id} in the launcher's state"))
    }

    /// The sample sites the launcher registered.
    pub fn hosts(&self) -> Vec<String> {
        (1..=self.opts.sites)
            .map(|s| format!("site-{s:03}.localhost"))
            .collect()
    }

    /// `GET path` for `host` through proxy `i`.
    pub fn get(&self, proxy: usize, host: &str, path: &str) -> std::io::Result<Response> {
        get(self.proxies()[proxy].0, Some(host), path, &[])
    }

    /// Ask the launcher for one more node (SIGUSR1), as an operator would; wait until the
    /// state file lists it and is ready again. Returns the new node.
    pub fn add_node(&mut self) -> NodeState {
        let before = self.nodes().len();
        kill(Pid::from_raw(self.launcher_pid() as i32), Signal::SIGUSR1)
            .expect("signal the launcher");
        let added = wait_until(START_TIMEOUT, || {
            self.reload()
                && self.state["ready"] == true
                && self.state["agents"].as_array().map_or(0, Vec::len) > before
        });
        assert!(
            added,
            "the launcher did not add a node\n{}",
            self.diagnostics()
        );
        self.nodes().pop().expect("the new node")
    }

    /// Send `sig` to node `id`'s agent.
    pub fn signal_node(&self, id: &str, sig: Signal) {
        let pid = self.node(id).pid;
        kill(Pid::from_raw(pid as i32), sig).unwrap_or_else(|e| panic!("{sig} to {id}: {e}"));
    }

    /// Run `roostctl --etcd <the cluster's etcd> ARGS`.
    pub fn roostctl(&self, args: &[&str]) -> Output {
        Command::new(bin(CTL))
            .arg("--etcd")
            .arg(self.etcd_url())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run roostctl: {e}"))
    }

    /// The node `roostctl where HOST` names first (the one proxies send `host` to now).
    pub fn placed_on(&self, host: &str) -> String {
        let out = self.roostctl(&["--json", "where", host]);
        assert!(
            out.status.success(),
            "roostctl where {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("roostctl where --json");
        v["nodes"][0]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no node in {v}"))
            .to_string()
    }

    /// `roostctl where` for every sample site, two roostctl processes at a time.
    pub fn placements(&self) -> Vec<(String, String)> {
        let hosts = self.hosts();
        let (a, b) = hosts.split_at(hosts.len() / 2);
        std::thread::scope(|s| {
            let first = s.spawn(|| a.iter().map(|h| (h.clone(), self.placed_on(h))).collect());
            let mut all: Vec<(String, String)> =
                b.iter().map(|h| (h.clone(), self.placed_on(h))).collect();
            let mut first: Vec<(String, String)> = first.join().expect("where thread");
            first.append(&mut all);
            first
        })
    }

    /// Stop the launcher with `sig` (as Ctrl-C does with SIGINT) and wait for it to exit.
    pub fn stop_with(&mut self, sig: Signal) -> Option<ExitStatus> {
        let mut p = self.launcher.take()?;
        let _ = kill(Pid::from_raw(p.pid() as i32), sig);
        let status = wait_for(STOP_TIMEOUT, || p.exited());
        if status.is_none() {
            eprintln!("[launcher] cluster.sh did not exit {STOP_TIMEOUT:?} after {sig}");
        }
        // Proc's drop SIGKILLs it if it is still running.
        drop(p);
        status
    }

    /// The launcher's output, then the tail of every log in its run dir.
    pub fn diagnostics(&self) -> String {
        let mut s = format!(
            "--- cluster.sh ---\n{}\n",
            tail(
                &read_log(&self.root.path().join("launcher.log")),
                TAIL_LINES
            )
        );
        let run = self
            .state
            .get("run_dir")
            .and_then(Value::as_str)
            .map(PathBuf::from);
        if let Some(Ok(entries)) = run.as_deref().map(std::fs::read_dir) {
            let mut logs: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .collect();
            logs.sort();
            for p in logs {
                s += &format!(
                    "--- {} ---\n{}\n",
                    p.display(),
                    tail(&read_log(&p), TAIL_LINES)
                );
            }
        }
        s
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "[launcher] test failed; cluster state:\n{}",
                self.diagnostics()
            );
        }
        if self.launcher.is_some() {
            self.stop_with(Signal::SIGTERM);
        }
    }
}

fn addr(v: &Value) -> SocketAddr {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an address: {v}"))
}

/// A base port P such that P..P+span are all free on 127.0.0.1 now, picked below the
/// kernel's ephemeral range (where `free_addr` ports come from) so the two never meet.
pub fn free_port_block(span: u16) -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    for attempt in 0..200u64 {
        let slot = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(attempt * 7919)
            % 500;
        let base = 20000 + slot as u16 * 20;
        if handed_out.contains(&base) {
            continue;
        }
        let all_free = (base..base + span).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            handed_out.push(base);
            return base;
        }
    }
    panic!("no block of {span} free ports in 20000..30000");
}
