//! One Roost node for a benchmark: a real etcd, `roost-agent` and `roost-proxy` from
//! `bin_dir`, started in `root` and stopped on drop. Shared by the cold-start and the
//! warm-path benchmarks so both measure the same setup. Also what every benchmark's sites share:
//! the hello-world app, the user its sites run as, and how a process's PSS is read.

// Each benchmark binary includes this module and uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use roost_tests::ports::free_addr;
use roost_tests::process::Proc;
use roost_tests::{get, wait_until, Etcd};

pub const PREFIX: &str = "/roost";

/// The hello-world WSGI app every benchmark's sites serve (13-byte body).
pub const HELLO: &str = "def application(environ, start_response):\n    body = b'Hello, world\\n'\n    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n    return [body]\n";
/// The unix user benchmark sites run as.
pub const USER: &str = "roost-bench";

/// A process's proportional set size, kB (`/proc/<pid>/smaps_rollup`); 0 if it is gone.
pub fn pss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// How the node runs; the defaults are what an operator gets without a config file.
pub struct NodeOptions {
    /// Extra lines for the agent's TOML config.
    pub agent_config: String,
    /// `RUST_LOG` of the agent and of the proxy.
    pub agent_log_filter: String,
    pub proxy_log_filter: String,
    /// Extra proxy flags.
    pub proxy_args: Vec<String>,
}

/// Each benchmark reads the fields it needs; the processes stop when it drops the node.
pub struct Node {
    pub proxy: SocketAddr,
    pub agent: SocketAddr,
    pub agent_admin: SocketAddr,
    pub state_dir: PathBuf,
    pub agent_log: PathBuf,
    pub secret: String,
    pub proxy_proc: Proc,
    pub agent_proc: Proc,
    pub etcd: Etcd,
}

fn die(msg: &str) -> ! {
    eprintln!("roost bench: {msg}");
    std::process::exit(2)
}

pub fn start(root: &Path, bin_dir: &Path, opts: &NodeOptions) -> Node {
    for b in ["roost-agent", "roost-proxy"] {
        if !bin_dir.join(b).is_file() {
            die(&format!(
                "{} not found; build it first (the bench/*.sh scripts do)",
                bin_dir.join(b).display()
            ));
        }
    }
    let etcd = Etcd::start_in(root);
    let secret = format!(
        "{:032x}",
        std::process::id() as u128 * 0x9e37_79b9_7f4a_7c15
    );
    let secret_file = root.join("secret");
    std::fs::write(&secret_file, &secret).unwrap();
    let state_dir = root.join("state");
    let config = root.join("agent.toml");
    std::fs::write(&config, &opts.agent_config).unwrap();
    let (agent_addr, agent_admin, proxy, proxy_admin) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let mut cmd = Command::new(bin_dir.join("roost-agent"));
    cmd.args([
        "--etcd",
        etcd.url(),
        "--node-id",
        &format!("bench-{}", std::process::id()),
    ])
    .arg("--listen")
    .arg(agent_addr.to_string())
    .arg("--admin")
    .arg(agent_admin.to_string())
    .arg("--state-dir")
    .arg(&state_dir)
    .arg("--config")
    .arg(&config)
    .arg("--secret-file")
    .arg(&secret_file)
    .env("RUST_LOG", &opts.agent_log_filter)
    .env("NO_COLOR", "1");
    let agent_log = root.join("agent.log");
    let agent_proc = Proc::spawn("agent", cmd, &agent_log, Signal::SIGTERM);
    let mut cmd = Command::new(bin_dir.join("roost-proxy"));
    cmd.args(["--etcd", etcd.url()])
        .arg("--listen")
        .arg(proxy.to_string())
        .arg("--admin")
        .arg(proxy_admin.to_string())
        .arg("--secret-file")
        .arg(&secret_file)
        .args(&opts.proxy_args)
        .env("RUST_LOG", &opts.proxy_log_filter)
        .env("NO_COLOR", "1");
    let proxy_proc = Proc::spawn("proxy", cmd, &root.join("proxy.log"), Signal::SIGTERM);
    let ready = wait_until(Duration::from_secs(60), || {
        [proxy_admin, agent_admin]
            .iter()
            .all(|a| get(*a, Some("localhost"), "/readyz", &[]).is_ok_and(|r| r.status == 200))
    });
    if !ready {
        die(&format!(
            "proxy or agent not ready; logs in {}",
            root.display()
        ));
    }
    Node {
        proxy,
        agent: agent_addr,
        agent_admin,
        state_dir,
        agent_log,
        secret,
        proxy_proc,
        agent_proc,
        etcd,
    }
}

/// The pid the agent reports for `host`'s current worker.
pub fn worker_pid(node: &Node, host: &str) -> u32 {
    // `/sites` names users and pids, so the agent wants its secret.
    let auth = [("x-roost-auth", node.secret.as_str())];
    let r = get(node.agent_admin, Some("localhost"), "/sites", &auth)
        .unwrap_or_else(|e| die(&format!("/sites: {e}")));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    let sites = v
        .as_array()
        .cloned()
        .or_else(|| v["sites"].as_array().cloned())
        .unwrap_or_default();
    sites
        .iter()
        .find(|s| s["host"] == host)
        .and_then(|s| s["pid"].as_u64())
        .map(|p| p as u32)
        .unwrap_or_else(|| die(&format!("no worker pid for {host} in /sites: {}", r.text())))
}
