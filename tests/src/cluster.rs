//! One etcd + one `roost-agent` (node `node-1`) + one `roost-proxy`, on free loopback
//! ports, in a temp dir of their own. Stopped on drop; on a panic the log tails are printed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::bins::{bin, AGENT, CTL, PROXY};
use crate::etcd::Etcd;
use crate::http::{get, Response};
use crate::ports::free_addr;
use crate::process::{pid_alive, read_log, tail, Proc};
use crate::secure_etcd::{agent_user, Pki, OPERATOR_USER, PROXY_USER};
use crate::temp::TempRoot;
use crate::users::{site_dir, User};
use crate::wait::{wait_for, wait_until};
use crate::ECHO_APP;

pub const NODE_ID: &str = "node-1";
pub const PREFIX: &str = "/roost";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const TAIL_LINES: usize = 40;

pub struct Cluster {
    pub proxy_addr: SocketAddr,
    pub proxy_admin: SocketAddr,
    pub agent_addr: SocketAddr,
    pub agent_admin: SocketAddr,
    /// The shared secret both proxy and agent were given with `--secret-file`.
    pub secret: String,
    pub state_dir: PathBuf,
    proxy: Proc,
    agent: Proc,
    pub etcd: Etcd,
    opts: Options,
    // Declared last so it is removed after every process is gone.
    root: TempRoot,
}

/// What a test may change about its cluster.
#[derive(Default, Clone)]
pub struct Options {
    /// TOML for the agent's `--config` file (see deploy/examples/agent.toml).
    pub agent_config: Option<String>,
}

impl Cluster {
    /// Start etcd, an agent and a proxy; return once both `/readyz` answer 200 and the
    /// agent's node key is in etcd.
    pub fn start() -> Cluster {
        Self::start_with(Options::default())
    }

    /// [`Cluster::start`] with options.
    pub fn start_with(opts: Options) -> Cluster {
        Self::launch(opts, false)
    }

    /// [`Cluster::start_with`] secured as production runs it: etcd with TLS, client
    /// certificates and auth with `deploy/etcd/roles.sh`'s roles (the proxy as `roost-proxy`,
    /// the agent as `roost-agent-node-1`, roostctl as `roost-operator`), and proxy → agent
    /// over mutual TLS with a CA of its own ([`MESH_CA`]).
    pub fn start_secured(opts: Options) -> Cluster {
        Self::launch(opts, true)
    }

    fn launch(opts: Options, secured: bool) -> Cluster {
        let proxy_bin = bin(PROXY);
        let agent_bin = bin(AGENT);
        let root = TempRoot::new("cluster");
        let etcd = if secured {
            Etcd::start_secured_in(root.path(), &[NODE_ID])
        } else {
            Etcd::start_in(root.path())
        };
        let secret = random_hex(32);
        let secret_file = root.path().join("secret");
        std::fs::write(&secret_file, &secret).expect("write secret file");
        let state_dir = root.subdir("state");
        if secured {
            make_mesh_certs(root.path());
        }
        let (agent_addr, agent_admin) = (free_addr(), free_addr());
        let (proxy_addr, proxy_admin) = (free_addr(), free_addr());

        let cmd = agent_command(
            &agent_bin,
            &etcd,
            agent_addr,
            agent_admin,
            &state_dir,
            root.path(),
            &opts,
        );
        let mut agent = Proc::spawn(
            "agent",
            cmd,
            &root.path().join("agent.log"),
            Signal::SIGTERM,
        );

        let mut cmd = Command::new(&proxy_bin);
        cmd.arg("--etcd")
            .arg(etcd.url())
            .arg("--listen")
            .arg(proxy_addr.to_string())
            .arg("--admin")
            .arg(proxy_admin.to_string())
            .arg("--secret-file")
            .arg(&secret_file)
            .args(etcd_client_args(&etcd, PROXY_USER))
            .args(mesh_args(root.path(), PROXY));
        log_env(&mut cmd);
        let mut proxy = Proc::spawn(
            "proxy",
            cmd,
            &root.path().join("proxy.log"),
            Signal::SIGTERM,
        );

        let node_key = format!("{PREFIX}/nodes/{NODE_ID}");
        let mut waiting_for = String::new();
        let ready = wait_until(START_TIMEOUT, || {
            if agent.exited().is_some() || proxy.exited().is_some() {
                return true;
            }
            waiting_for = if status_of(proxy_admin, "/readyz") != Some(200) {
                format!("proxy {proxy_admin}/readyz")
            } else if status_of(agent_admin, "/readyz") != Some(200) {
                format!("agent {agent_admin}/readyz")
            } else if etcd.get(&node_key).is_none() {
                format!("etcd key {node_key}")
            } else {
                return true;
            };
            false
        });
        let died = [&mut agent, &mut proxy]
            .into_iter()
            .filter_map(|p| p.exited().map(|s| format!("{} exited: {s}", p.name())))
            .collect::<Vec<_>>();
        if !ready || !died.is_empty() {
            panic!(
                "cluster failed to start: {} (last waited for {waiting_for})\n\
                 --- agent log ---\n{}\n--- proxy log ---\n{}",
                if died.is_empty() {
                    format!("not ready within {START_TIMEOUT:?}")
                } else {
                    died.join(", ")
                },
                tail(&agent.log(), TAIL_LINES),
                tail(&proxy.log(), TAIL_LINES)
            );
        }
        Cluster {
            proxy_addr,
            proxy_admin,
            agent_addr,
            agent_admin,
            secret,
            state_dir,
            proxy,
            agent,
            etcd,
            opts,
            root,
        }
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `GET path` through the proxy with `Host: host`.
    pub fn get(&self, host: &str, path: &str) -> std::io::Result<Response> {
        get(self.proxy_addr, Some(host), path, &[])
    }

    /// Poll the proxy until `host` answers `status` (or `timeout` passes). Returns the
    /// matching response, or an `Err` describing the last thing that came back.
    pub fn wait_for_status(
        &self,
        host: &str,
        status: u16,
        timeout: Duration,
    ) -> Result<Response, String> {
        let mut last = String::from("no attempt");
        wait_for(timeout, || match self.get(host, "/") {
            Ok(r) if r.status == status => Some(r),
            Ok(r) => {
                last = format!("status {}: {}", r.status, truncate(&r.text(), 300));
                None
            }
            Err(e) => {
                last = format!("error: {e}");
                None
            }
        })
        .ok_or(last)
    }

    /// Run `roostctl --etcd <this etcd> ARGS`.
    pub fn roostctl(&self, args: &[&str]) -> Output {
        Command::new(bin(CTL))
            .arg("--etcd")
            .arg(self.etcd.url())
            .args(etcd_client_args(&self.etcd, OPERATOR_USER))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run roostctl: {e}"))
    }

    /// Run roostctl and panic (with its output) unless it succeeds; returns stdout.
    pub fn roostctl_ok(&self, args: &[&str]) -> String {
        let out = self.roostctl(args);
        assert!(
            out.status.success(),
            "roostctl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `roostctl site add HOST --user U --app app:application --dir DIR EXTRA...`.
    pub fn add_site(&self, host: &str, user: &User, dir: &Path, extra: &[&str]) {
        let dir = dir.to_str().expect("UTF-8 site dir");
        let mut args = vec![
            "site",
            "add",
            host,
            "--user",
            &user.name,
            "--app",
            crate::ECHO_ENTRY,
            "--dir",
            dir,
        ];
        args.extend_from_slice(extra);
        self.roostctl_ok(&args);
    }

    /// A directory owned by `user` holding the echo app, unique per `tag`.
    pub fn echo_site_dir(&self, user: &User, tag: &str) -> PathBuf {
        site_dir(&self.root.subdir("sites"), user, tag, ECHO_APP)
    }

    /// Panic unless proxy and agent are both still running (nothing was restarted).
    pub fn assert_running(&self) {
        for p in [&self.proxy, &self.agent] {
            assert!(
                pid_alive(p.pid()),
                "{} (pid {}) is no longer running\n{}",
                p.name(),
                p.pid(),
                self.diagnostics()
            );
        }
    }

    /// A sample of the agent's Prometheus metrics, e.g.
    /// `agent_metric("roost_agent_worker_stops_total{reason=\"idle\"}")`; 0 when absent.
    pub fn agent_metric(&self, series: &str) -> f64 {
        let text = get(self.agent_admin, Some("localhost"), "/metrics", &[])
            .map(|r| r.text())
            .unwrap_or_default();
        crate::edge::metric_value(&text, series).unwrap_or(0.0)
    }

    /// The sum of every series of the agent's metric `name` (all label values).
    pub fn agent_metric_sum(&self, name: &str) -> f64 {
        let text = get(self.agent_admin, Some("localhost"), "/metrics", &[])
            .map(|r| r.text())
            .unwrap_or_default();
        crate::edge::metric_sum(&text, name)
    }

    /// The header that opens the agent's `/sites` and logs: the secret (a test trusts the
    /// address it started the agent on).
    pub fn admin_auth(&self) -> [(&str, &str); 1] {
        [("x-roost-auth", self.secret.as_str())]
    }

    /// The agent's `/sites` table.
    pub fn agent_sites(&self) -> serde_json::Value {
        get(
            self.agent_admin,
            Some("localhost"),
            "/sites",
            &self.admin_auth(),
        )
        .map(|r| r.json())
        .unwrap_or(serde_json::Value::Null)
    }

    /// Start the agent again on the same state directory, addresses and node id (after the
    /// test stopped or killed it); waits until its `/readyz` is 200.
    pub fn restart_agent(&mut self) {
        let cmd = agent_command(
            &bin(AGENT),
            &self.etcd,
            self.agent_addr,
            self.agent_admin,
            &self.state_dir,
            self.root.path(),
            &self.opts,
        );
        self.agent = Proc::spawn(
            "agent",
            cmd,
            &self.root.path().join("agent-restarted.log"),
            Signal::SIGTERM,
        );
        let ready = wait_until(START_TIMEOUT, || {
            status_of(self.agent_admin, "/readyz") == Some(200)
        });
        assert!(ready, "restarted agent not ready\n{}", self.diagnostics());
    }

    /// Send `sig` to the agent.
    pub fn signal_agent(&self, sig: Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.agent.pid() as i32), sig)
            .unwrap_or_else(|e| panic!("signal the agent: {e}"));
    }

    /// The agent's pid (to signal it).
    pub fn agent_pid(&self) -> u32 {
        self.agent.pid()
    }

    /// Wait for the agent to exit (after a signal the test sent); its exit status.
    pub fn wait_agent_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_for(timeout, || self.agent.exited())
    }

    /// The agent's per-site directory holding the socket (`<state-dir>/sites/<host>`).
    pub fn site_state_dir(&self, host: &str) -> PathBuf {
        self.state_dir.join("sites").join(host)
    }

    pub fn proxy_log(&self) -> String {
        self.proxy.log()
    }

    pub fn agent_log(&self) -> String {
        self.agent.log()
    }

    /// The worker log the agent writes for `host` (`<state-dir>/logs/<host>.log`).
    pub fn worker_log(&self, host: &str) -> String {
        read_log(&self.state_dir.join("logs").join(format!("{host}.log")))
    }

    /// Everything worth reading after a failure: log tails and the agent's site table.
    pub fn diagnostics(&self) -> String {
        let mut s = format!(
            "--- agent log ({}) ---\n{}\n--- proxy log ({}) ---\n{}\n",
            self.agent.log_path().display(),
            tail(&self.agent.log(), TAIL_LINES),
            self.proxy.log_path().display(),
            tail(&self.proxy.log(), TAIL_LINES)
        );
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("logs")) {
            for e in entries.flatten() {
                s += &format!(
                    "--- worker log {} ---\n{}\n",
                    e.path().display(),
                    tail(&read_log(&e.path()), TAIL_LINES / 2)
                );
            }
        }
        if let Ok(r) = get(
            self.agent_admin,
            Some("localhost"),
            "/sites",
            &self.admin_auth(),
        ) {
            s += &format!("--- agent /sites ({}) ---\n{}\n", r.status, r.text());
        }
        s += &format!("--- etcd log ---\n{}\n", tail(&self.etcd.log(), 10));
        s
    }

    /// SIGKILL processes left running whose cwd is in this cluster's temp dir (site
    /// workers the agent did not stop); returns their pids.
    fn kill_strays(&self) -> Vec<u32> {
        let mut killed = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return killed;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) else {
                continue;
            };
            if cwd.starts_with(self.root.path()) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
                killed.push(pid);
            }
        }
        killed
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!(
                "[harness] test failed; cluster state:\n{}",
                self.diagnostics()
            );
        }
        // Both at once: each takes a moment to drain.
        self.proxy.terminate();
        self.agent.terminate();
        self.proxy.stop();
        let agent_exit = self.agent.stop();
        let strays = self.kill_strays();
        if !strays.is_empty() {
            eprintln!(
                "[harness] agent ({agent_exit:?}) left workers running after SIGTERM; killed pids {strays:?}"
            );
        }
    }
}

fn log_env(cmd: &mut Command) {
    let level = std::env::var("ROOST_TEST_LOG").unwrap_or_else(|_| "info".to_string());
    cmd.env("RUST_LOG", level).env("NO_COLOR", "1");
}

/// Status of `GET path` on an admin address, `None` if it did not answer.
pub fn status_of(addr: SocketAddr, path: &str) -> Option<u16> {
    get(addr, Some("localhost"), path, &[])
        .ok()
        .map(|r| r.status)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The agent's command line; also used to restart it on the same state.
/// The proxy ↔ agent CA of a secured cluster, under `<root>/mesh/`.
pub const MESH_CA: &str = "mesh/mesh-ca.crt";

/// A CA for proxy ↔ agent TLS, the agent's certificate (naming the node id, as proxies
/// check) and the proxy's client certificate.
fn make_mesh_certs(root: &Path) {
    let pki = Pki::new(&root.join("mesh"), "mesh");
    pki.issue_with_names(NODE_ID, &format!("DNS:{NODE_ID},IP:127.0.0.1"));
    pki.issue("roost-proxy");
}

/// `component`'s proxy ↔ agent TLS flags when [`make_mesh_certs`] ran under `root`.
fn mesh_args(root: &Path, component: &str) -> Vec<String> {
    let ca = root.join(MESH_CA);
    if !ca.is_file() {
        return Vec::new();
    }
    let file = |name: &str| root.join("mesh").join(name).to_string_lossy().into_owned();
    let ca = ca.to_string_lossy().into_owned();
    if component == PROXY {
        vec![
            "--agent-ca".into(),
            ca,
            "--agent-client-cert".into(),
            file("mesh-roost-proxy.crt"),
            "--agent-client-key".into(),
            file("mesh-roost-proxy.key"),
        ]
    } else {
        vec![
            "--tls-cert".into(),
            file(&format!("mesh-{NODE_ID}.crt")),
            "--tls-key".into(),
            file(&format!("mesh-{NODE_ID}.key")),
            "--client-ca".into(),
            ca,
        ]
    }
}

/// The `--etcd-*` flags to act as `user` on `etcd`; none for a plain etcd.
pub fn etcd_client_args(etcd: &Etcd, user: &str) -> Vec<String> {
    etcd.tls().map(|t| t.client_args(user)).unwrap_or_default()
}

fn agent_command(
    bin: &Path,
    etcd: &Etcd,
    addr: SocketAddr,
    admin: SocketAddr,
    state_dir: &Path,
    root: &Path,
    opts: &Options,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--etcd")
        .arg(etcd.url())
        .args(etcd_client_args(etcd, &agent_user(NODE_ID)))
        .args(mesh_args(root, AGENT))
        .args(["--node-id", NODE_ID])
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--admin")
        .arg(admin.to_string())
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--secret-file")
        .arg(root.join("secret"));
    // ROOST_TEST_AGENT_CONFIG: TOML for every agent of the run (deploy/vm-test.sh lengthens the
    // lease there: under TCG a 5 s lease expires between keep-alives). Keys must not repeat
    // ones a test sets itself.
    let for_the_run = std::env::var("ROOST_TEST_AGENT_CONFIG").unwrap_or_default();
    if opts.agent_config.is_some() || !for_the_run.is_empty() {
        let toml = format!(
            "{for_the_run}\n{}",
            opts.agent_config.as_deref().unwrap_or("")
        );
        let path = root.join("agent.toml");
        std::fs::write(&path, toml).expect("write agent config");
        cmd.arg("--config").arg(path);
    }
    log_env(&mut cmd);
    cmd
}
