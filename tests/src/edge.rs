//! Harness for the edge tests (`tests/tests/edge.rs`): an etcd that can be stopped and
//! started again on the same ports and data, a TCP relay that can cut a proxy off from etcd
//! while etcd stays up, any number of agents, and proxies with any config. All real
//! binaries; everything is stopped on drop, and on a panic the log tails are printed.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::bins::{bin, AGENT, PROXY};
use crate::etcd::ETCDCTL;
use crate::http::{get, Response};
use crate::ports::free_addr;
use crate::process::{tail, Proc};
use crate::temp::TempRoot;
use crate::users::{site_dir, User};
use crate::wait::{wait_for, wait_until};

/// The `command` site of the edge tests (`tests/apps/edge/server.py`).
pub const EDGE_APP: &str = include_str!("../apps/edge/server.py");
pub const PREFIX: &str = "/roost";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const TAIL_LINES: usize = 40;

// ---------------------------------------------------------------------------------------
// etcd that survives a stop

/// A single-member etcd on fixed loopback ports with a data dir that outlives restarts.
pub struct EtcdServer {
    dir: PathBuf,
    client: SocketAddr,
    peer: SocketAddr,
    proc: Option<Proc>,
    starts: u32,
}

impl EtcdServer {
    /// Start etcd with its data dir and log under `dir`; wait until it answers.
    pub fn start_in(dir: &Path) -> EtcdServer {
        let mut e = EtcdServer {
            dir: dir.to_path_buf(),
            client: free_addr(),
            peer: free_addr(),
            proc: None,
            starts: 0,
        };
        e.start();
        e
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.exited().is_none())
    }

    /// Start (again, on the same ports and data); wait until healthy.
    pub fn start(&mut self) {
        assert!(!self.is_running(), "etcd is already running");
        let url = self.url();
        let peer_url = format!("http://{}", self.peer);
        let state = if self.starts == 0 { "new" } else { "existing" };
        let cmd =
            crate::etcd::etcd_command("edge", &self.dir.join("etcd-data"), &url, &peer_url, state);
        let mut proc = Proc::spawn("etcd", cmd, &self.dir.join("etcd.log"), Signal::SIGKILL);
        self.starts += 1;
        let mut healthy = false;
        wait_until(START_TIMEOUT, || {
            if proc.exited().is_some() {
                return true;
            }
            healthy = self.etcdctl(&["endpoint", "health"]).status.success();
            healthy
        });
        if !healthy {
            panic!(
                "etcd at {url} did not become healthy (exit: {:?}); log tail:\n{}",
                proc.exited(),
                tail(&proc.log(), 30)
            );
        }
        self.proc = Some(proc);
    }

    /// Kill etcd at once (an outage, not a shutdown).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = kill(Pid::from_raw(p.pid() as i32), Signal::SIGKILL);
            wait_until(Duration::from_secs(10), || p.exited().is_some());
        }
    }

    pub fn etcdctl(&self, args: &[&str]) -> Output {
        Command::new(ETCDCTL)
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.url())
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=5s")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {ETCDCTL}: {e}"))
    }

    fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn put(&self, key: &str, value: &str) {
        self.etcdctl_ok(&["put", key, value]);
    }

    pub fn del(&self, key: &str) {
        self.etcdctl_ok(&["del", key]);
    }

    /// Keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.etcdctl_ok(&["get", prefix, "--prefix", "--keys-only"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl_ok(&[
            "get",
            "/",
            "--prefix",
            "--keys-only",
            "--limit=1",
            "-w",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl -w json");
        v["header"]["revision"]
            .as_i64()
            .expect("revision in header")
    }

    /// Compact the history up to the current revision.
    pub fn compact(&self) -> i64 {
        let rev = self.revision();
        self.etcdctl_ok(&["compact", &rev.to_string(), "--physical"]);
        rev
    }

    pub fn log(&self) -> String {
        crate::process::read_log(&self.dir.join("etcd.log"))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// A relay that can cut a proxy off from etcd

struct RelayState {
    cut: AtomicBool,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

/// Forwards TCP to `target`; `cut()` closes every connection and refuses new ones until
/// `restore()`: etcd looks down to whoever uses the relay, and stays up for everyone else.
pub struct Relay {
    pub addr: SocketAddr,
    state: Arc<RelayState>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        listener.set_nonblocking(true).expect("nonblocking relay");
        let addr = listener.local_addr().expect("relay addr");
        let state = Arc::new(RelayState {
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if st.cut.load(Ordering::Acquire) {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        }
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(target) else {
                            continue;
                        };
                        let mut conns = st.conns.lock().unwrap_or_else(|e| e.into_inner());
                        for s in [&client, &server] {
                            if let Ok(c) = s.try_clone() {
                                conns.push(c);
                            }
                        }
                        drop(conns);
                        pump(&client, &server);
                        pump(&server, &client);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Relay { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::Release);
        let mut conns = self.state.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in conns.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::Release);
    }
}

fn pump(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        self.cut();
    }
}

// ---------------------------------------------------------------------------------------
// Agents and proxies

pub struct Agent {
    pub id: String,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub state_dir: PathBuf,
    proc: Proc,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// SIGKILL: the node dies without a drain (its lease lingers until it expires).
    pub fn kill(&mut self) {
        let _ = kill(Pid::from_raw(self.proc.pid() as i32), Signal::SIGKILL);
        wait_until(Duration::from_secs(10), || self.proc.exited().is_some());
    }
}

/// How to start a proxy.
#[derive(Default, Clone)]
pub struct ProxyOpts {
    /// Extra lines for its TOML config (the harness writes listen/admin/etcd/secret itself).
    pub toml: String,
    /// Also listen for TLS.
    pub tls: bool,
    /// A directory of `<host>.crt`/`.key` pairs.
    pub cert_dir: Option<PathBuf>,
    /// Reach etcd through the harness's relay.
    pub via_relay: bool,
    /// Take over the listeners of proxy `n` (`--upgrade`); same addresses, same upgrade sock.
    pub upgrade_from: Option<usize>,
    /// Return at once instead of waiting for /readyz 200.
    pub no_wait: bool,
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub config: PathBuf,
    proc: Proc,
}

impl Proxy {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// `GET path` with `Host: host` (one connection, `Connection: close`).
    pub fn get(&self, host: &str, path: &str) -> std::io::Result<Response> {
        get(self.addr, Some(host), path, &[])
    }

    pub fn get_with(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Response> {
        get(self.addr, Some(host), path, headers)
    }

    /// Status of `/readyz`; `None` when the admin port does not answer.
    pub fn readyz(&self) -> Option<u16> {
        get(self.admin, Some("localhost"), "/readyz", &[])
            .ok()
            .map(|r| r.status)
    }

    /// The value of metric `name` (a series without labels), if the proxy answers.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let r = get(self.admin, Some("localhost"), "/metrics", &[]).ok()?;
        metric_value(&r.text(), name)
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.proc.pid() as i32), sig).expect("signal the proxy");
    }

    /// Wait up to `timeout` for the proxy to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for(timeout, || self.proc.exited())
    }

    /// Poll until `GET path` for `host` answers `status`.
    pub fn wait_status(
        &self,
        host: &str,
        path: &str,
        status: u16,
        timeout: Duration,
    ) -> Result<Response, String> {
        let mut last = String::from("no attempt");
        wait_for(timeout, || match self.get(host, path) {
            Ok(r) if r.status == status => Some(r),
            Ok(r) => {
                last = format!(
                    "status {}: {}",
                    r.status,
                    r.text().chars().take(300).collect::<String>()
                );
                None
            }
            Err(e) => {
                last = format!("error: {e}");
                None
            }
        })
        .ok_or(last)
    }
}

/// The sum of every series of metric `name` (any labels) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// The value of an unlabelled series in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        // The value is the last field: a label value may hold spaces.
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// etcd + any number of agents + any number of proxies, in one temp dir.
pub struct Edge {
    pub proxies: Vec<Proxy>,
    pub agents: Vec<Agent>,
    pub relay: Option<Relay>,
    pub etcd: EtcdServer,
    pub secret: String,
    secret_file: PathBuf,
    root: TempRoot,
}

impl Edge {
    /// Start etcd (and a relay in front of it); no agent, no proxy yet.
    pub fn new(tag: &str) -> Edge {
        let root = TempRoot::new(tag);
        let etcd = EtcdServer::start_in(root.path());
        let relay = Relay::start(etcd.client_addr());
        let secret = random_hex(24);
        let secret_file = root.path().join("secret");
        std::fs::write(&secret_file, &secret).expect("write secret");
        Edge {
            proxies: Vec::new(),
            agents: Vec::new(),
            relay: Some(relay),
            etcd,
            secret,
            secret_file,
            root,
        }
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Start agent `id` (extra TOML lines in its config file); wait until its node key is in
    /// etcd. Returns its index.
    pub fn start_agent(&mut self, id: &str, toml: &str) -> usize {
        let state_dir = self.root.subdir(&format!("state-{id}"));
        let (addr, admin) = (free_addr(), free_addr());
        let config = self.root.path().join(format!("agent-{id}.toml"));
        std::fs::write(&config, toml).expect("write agent config");
        let mut cmd = Command::new(bin(AGENT));
        cmd.arg("--etcd")
            .arg(self.etcd.url())
            .args(["--node-id", id])
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--secret-file")
            .arg(&self.secret_file)
            .arg("--config")
            .arg(&config);
        log_env(&mut cmd);
        let mut proc = Proc::spawn(
            &format!("agent {id}"),
            cmd,
            &self.root.path().join(format!("agent-{id}.log")),
            Signal::SIGTERM,
        );
        let key = format!("{PREFIX}/nodes/{id}");
        let up = wait_until(START_TIMEOUT, || {
            proc.exited().is_some() || self.etcd.keys(&key).contains(&key)
        });
        if !up || proc.exited().is_some() {
            panic!(
                "agent {id} did not register ({:?}):\n{}",
                proc.exited(),
                tail(&proc.log(), TAIL_LINES)
            );
        }
        self.agents.push(Agent {
            id: id.to_string(),
            addr,
            admin,
            state_dir,
            proc,
        });
        self.agents.len() - 1
    }

    /// Start a proxy; unless `opts.no_wait`, wait until /readyz answers 200.
    pub fn start_proxy(&mut self, opts: ProxyOpts) -> usize {
        let n = self.proxies.len();
        let (addr, tls_addr, admin, config) = match opts.upgrade_from {
            Some(old) => {
                let p = &self.proxies[old];
                (p.addr, p.tls_addr, p.admin, p.config.clone())
            }
            None => {
                let tls_addr = opts.tls.then(free_addr);
                let (addr, admin) = (free_addr(), free_addr());
                let config = self.root.path().join(format!("proxy-{n}.toml"));
                let etcd = if opts.via_relay {
                    self.relay.as_ref().expect("relay").url()
                } else {
                    self.etcd.url()
                };
                let mut toml = format!(
                    "etcd = {etcd:?}\nlisten = \"{addr}\"\nadmin = \"{admin}\"\nsecret_file = {:?}\n\
                     threads = 2\nupgrade_sock = {:?}\npid_file = {:?}\n",
                    self.secret_file,
                    self.root.path().join(format!("proxy-{n}-upgrade.sock")),
                    self.root.path().join(format!("proxy-{n}.pid")),
                );
                if let Some(t) = tls_addr {
                    toml += &format!("listen_tls = \"{t}\"\n");
                }
                if let Some(dir) = &opts.cert_dir {
                    toml += &format!("tls_cert_dir = {dir:?}\ntls_dir_poll_secs = 1\n");
                }
                // Top-level keys first: a `[table]` in `opts.toml` would swallow them.
                toml += &opts.toml;
                std::fs::write(&config, toml).expect("write proxy config");
                (addr, tls_addr, admin, config)
            }
        };
        let mut cmd = Command::new(bin(PROXY));
        cmd.arg("--config").arg(&config);
        if opts.upgrade_from.is_some() {
            cmd.arg("--upgrade");
        }
        log_env(&mut cmd);
        let mut proc = Proc::spawn(
            &format!("proxy {n}"),
            cmd,
            &self.root.path().join(format!("proxy-{n}.log")),
            Signal::SIGTERM,
        );
        if !opts.no_wait {
            let ready = wait_until(START_TIMEOUT, || {
                proc.exited().is_some()
                    || get(admin, Some("localhost"), "/readyz", &[]).is_ok_and(|r| r.status == 200)
            });
            if !ready || proc.exited().is_some() {
                panic!(
                    "proxy {n} not ready ({:?}):\n{}",
                    proc.exited(),
                    tail(&proc.log(), TAIL_LINES)
                );
            }
        }
        self.proxies.push(Proxy {
            addr,
            tls_addr,
            admin,
            config,
            proc,
        });
        n
    }

    /// Write a site record straight into etcd, as an operator with etcdctl would.
    pub fn put_site(&self, host: &str, spec: &serde_json::Value) {
        self.etcd
            .put(&format!("{PREFIX}/sites/{host}"), &spec.to_string());
    }

    /// A directory owned by `user` with `app.py` = `source`.
    pub fn site_dir(&self, user: &User, tag: &str, source: &str) -> PathBuf {
        site_dir(&self.root.subdir("sites"), user, tag, source)
    }

    /// Register `host` as a `command` site running the edge app as `user`.
    pub fn put_edge_site(&self, host: &str, user: &User, extra: serde_json::Value) {
        let dir = self.site_dir(user, host, EDGE_APP);
        let app = dir.join("app.py");
        let mut spec = serde_json::json!({
            "user": user.name,
            "command": ["/usr/bin/python3", app.to_str().expect("UTF-8 path")],
            "dir": dir.to_str().expect("UTF-8 path"),
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        self.put_site(host, &spec);
    }

    /// Register `host` as a WSGI site running the harness's echo app as `user`.
    pub fn put_echo_site(&self, host: &str, user: &User, extra: serde_json::Value) {
        let dir = self.site_dir(user, host, crate::ECHO_APP);
        let mut spec = serde_json::json!({
            "user": user.name,
            "app": crate::ECHO_ENTRY,
            "dir": dir.to_str().expect("UTF-8 path"),
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        self.put_site(host, &spec);
    }

    /// Which agent logged request id `id` (the node that served it).
    /// The node whose agent logged request `id`. The agent writes its log line once the
    /// response is sent, so the client may see the response first: poll for a moment.
    pub fn served_by(&self, id: &str) -> Option<String> {
        let needle = format!("request_id={id}");
        crate::wait::wait_for(Duration::from_secs(3), || {
            self.agents
                .iter()
                .find(|a| a.log().contains(&needle))
                .map(|a| a.id.clone())
        })
    }

    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        for p in &self.proxies {
            s += &format!(
                "--- proxy (pid {}) ---\n{}\n",
                p.pid(),
                tail(&p.log(), TAIL_LINES)
            );
        }
        for a in &self.agents {
            s += &format!(
                "--- agent {} (pid {}) ---\n{}\n",
                a.id,
                a.pid(),
                tail(&a.log(), TAIL_LINES)
            );
            if let Ok(entries) = std::fs::read_dir(a.state_dir.join("logs")) {
                for e in entries.flatten() {
                    s += &format!(
                        "--- worker log {} ---\n{}\n",
                        e.path().display(),
                        tail(&crate::process::read_log(&e.path()), TAIL_LINES / 2)
                    );
                }
            }
        }
        s += &format!("--- etcd ---\n{}\n", tail(&self.etcd.log(), 10));
        s
    }

    /// SIGKILL processes left running whose cwd is in this temp dir (site workers).
    fn kill_strays(&self) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) {
                if cwd.starts_with(self.root.path()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("[edge] test failed; state:\n{}", self.diagnostics());
        }
        for p in &mut self.proxies {
            p.proc.stop();
        }
        for a in &mut self.agents {
            a.proc.stop();
        }
        self.kill_strays();
        self.relay.take();
    }
}

fn log_env(cmd: &mut Command) {
    let level = std::env::var("ROOST_TEST_LOG").unwrap_or_else(|_| "info".to_string());
    cmd.env("RUST_LOG", level).env("NO_COLOR", "1");
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// Clients

/// Send a request head, then `body_len` bytes of a fixed pattern in pieces (as Content-Length
/// or, with `chunked`, as chunks), then read the response.
pub fn post_stream(
    addr: SocketAddr,
    host: &str,
    path: &str,
    body_len: u64,
    chunked: bool,
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.set_write_timeout(Some(Duration::from_secs(120)))?;
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {body_len}")
    };
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\n{framing}\r\nConnection: close\r\n\r\n"
    )?;
    let piece = pattern_piece();
    let mut left = body_len;
    while left > 0 {
        let n = left.min(piece.len() as u64) as usize;
        if chunked {
            write!(s, "{n:x}\r\n")?;
            s.write_all(&piece[..n])?;
            s.write_all(b"\r\n")?;
        } else {
            s.write_all(&piece[..n])?;
        }
        left -= n as u64;
    }
    if chunked {
        s.write_all(b"0\r\n\r\n")?;
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    crate::http::parse(&raw)
}

/// 64 KiB of the edge app's download pattern (bytes 0..=255 repeated).
pub fn pattern_piece() -> Vec<u8> {
    (0..65536u32).map(|i| (i % 256) as u8).collect()
}

/// `GET path` and read the body without keeping it: (status, body bytes, every byte matched
/// the pattern).
pub fn get_counting(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, u64, bool)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "no response head",
            ));
        }
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut buf = vec![0u8; 65536];
    let (mut n, mut ok) = (0u64, true);
    loop {
        let got = s.read(&mut buf)?;
        if got == 0 {
            break;
        }
        for (i, b) in buf[..got].iter().enumerate() {
            if *b != ((n + i as u64) % 256) as u8 {
                ok = false;
            }
        }
        n += got as u64;
    }
    Ok((status, n, ok))
}

/// Peak resident memory (VmHWM) of `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Make a self-signed certificate for `names` (first one is the CN) in `dir`; returns
/// (cert PEM, key PEM). Uses the `openssl` command.
pub fn make_cert(dir: &Path, tag: &str, names: &[&str]) -> (String, String) {
    let crt = dir.join(format!("{tag}.crt.pem"));
    let key = dir.join(format!("{tag}.key.pem"));
    let san = names
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .arg("-subj")
        .arg(format!("/CN={}", names[0]))
        .arg("-addext")
        .arg(format!("subjectAltName={san}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("run openssl (deploy/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        std::fs::read_to_string(&crt).expect("read cert"),
        std::fs::read_to_string(&key).expect("read key"),
    )
}

/// The certificate (PEM) a TLS server at `addr` presents for SNI name `sni`, read with
/// `openssl s_client`; `None` when the handshake fails.
pub fn served_cert(addr: SocketAddr, sni: &str) -> Option<String> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            sni,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end = text[start..].find("-----END CERTIFICATE-----")?
        + start
        + "-----END CERTIFICATE-----".len();
    Some(text[start..end].to_string())
}

/// The first certificate in a PEM text.
pub fn first_cert(pem: &str) -> String {
    let start = pem
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = pem[start..].find("-----END CERTIFICATE-----").expect("end")
        + start
        + "-----END CERTIFICATE-----".len();
    pem[start..end].to_string()
}
