//! roost-warm-bench: the warm path against the incumbents (issue 12).
//!
//! Starts every server itself, all serving the same hello-world WSGI app, then loads each with
//! Debian's `wrk` (closed loop, `-t1`, at each `--conns`) and with an open-loop client at a
//! fixed rate below saturation (so queueing does not hide per-hop cost), rounds alternated so
//! every path sees the same machine. For each run it reads the CPU time (utime + stime from
//! `/proc/<pid>/stat`) of every process on the path, so each hop's CPU µs per request is
//! measured rather than guessed; that number is far less sensitive to neighbours than req/s.
//!
//! Paths: Roost (proxy -> agent -> zygote-forked worker), the same with the site started as
//! a fresh gunicorn (`spawn = direct`), roost-agent direct -> worker,
//! nginx -> gunicorn sync -w2 (keep-alive upstream), Apache mod_wsgi daemon mode, gunicorn
//! sync -w2 direct, gunicorn gthread -w2 x4 direct (the server Roost's worker runs).
//! Two floors for Roost's two hops: `pingora-gunicorn` (pingora with no Roost code,
//! `roost-bare-pingora`, in front of the same gunicorn as nginx) prices a pingora hop beside
//! an nginx one; `nginx-nginx-gunicorn` and `pingora-nginx-gunicorn` put a second hop,
//! nginx or bare pingora, in front of that nginx (a hop with a keep-alive upstream, as both
//! of Roost's are), to show what a second hop costs even when it is nginx.
//!
//! Run (as root: sites run as a real unix user): `bench/warm-path.sh [--smoke] [...]`.

use std::cell::Cell;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use roost_tests::ports::free_addr;
use roost_tests::process::Proc;
use roost_tests::procfs::{children, status_ids};
use roost_tests::{ensure_user, get, site_dir, wait_until, TempRoot};
use serde_json::json;

mod incumbents;
mod node;
use node::{worker_pid, NodeOptions, HELLO, PREFIX, USER};

const BODY: &str = "Hello, world\n";
const SITE: &str = "hello.bench";
const DIRECT_SITE: &str = "direct.bench";

/// The command line.
#[derive(clap::Parser)]
#[command(
    name = "roost-warm-bench",
    about = "Warm-path throughput, latency and CPU per request: Roost against nginx, Apache and gunicorn"
)]
struct Flags {
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// Rounds; each round runs every path once per concurrency, order rotated per round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrencies (wrk -c), comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![16, 64])]
    conns: Vec<usize>,
    /// Requests per second of the open-loop run (0: skip it).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Only these paths (names as printed), comma separated.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Worker processes of every WSGI server (gunicorn -w, mod_wsgi processes, Roost `workers`).
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Roost's site `threads`.
    #[arg(long, default_value_t = 4)]
    threads: u32,
    /// Seconds, not minutes: one round of 1 s runs at a low rate; fails on any error.
    #[arg(long)]
    smoke: bool,
    /// Keep the servers running after the tables, until Enter (to attach `perf record`).
    #[arg(long)]
    hold: bool,
    /// After the tables, profile Roost's proxy, agent and worker under `wrk -c16` with
    /// `perf record -g` (one run each) and write `perf report` summaries into this directory.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Extra TOML for the agent's config file (e.g. 'work_stealing = false'); `\n` separates lines.
    #[arg(long, default_value = "")]
    agent_toml: String,
    /// TOML for the proxy's config file.
    #[arg(long, default_value = "")]
    proxy_toml: String,
    /// RUST_LOG of proxy and agent ("info": one line per request at each, the default).
    #[arg(long, default_value = "info")]
    log_filter: String,
    /// Where roost-agent and roost-proxy are (default: this binary's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// An older build's roost-agent and roost-proxy: a second node runs them, and its path,
    /// `roost-baseline`, is alternated with the others, so a change is measured before and
    /// after in one run.
    #[arg(long)]
    baseline_bin_dir: Option<PathBuf>,
}

fn die(msg: &str) -> ! {
    eprintln!("roost-warm-bench: {msg}");
    std::process::exit(2)
}

/// One process group on a path whose CPU is accounted together ("proxy", "nginx", "worker").
struct Hop {
    label: &'static str,
    pids: Box<dyn Fn() -> Vec<u32>>,
}

fn hop(label: &'static str, pids: impl Fn() -> Vec<u32> + 'static) -> Hop {
    Hop {
        label,
        pids: Box::new(pids),
    }
}

/// A Roost node's hops: its proxy, its agent, and the site's worker processes (whose pid
/// `worker` holds once the worker has started).
fn node_hops(proxy_pid: u32, agent_pid: u32, worker: Rc<Cell<u32>>) -> Vec<Hop> {
    vec![
        hop("proxy", move || vec![proxy_pid]),
        hop("agent", move || vec![agent_pid]),
        hop("worker", move || tree(worker.get())),
    ]
}

/// One way of serving the app: where to send requests and which processes do the work.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// The `Host` every request names.
    host: &'static str,
    headers: Vec<(String, String)>,
    hops: Vec<Hop>,
}

impl Target {
    /// A path asked for the benchmark's site with no extra headers.
    fn plain(name: &'static str, addr: SocketAddr, hops: Vec<Hop>) -> Target {
        Target {
            name,
            addr,
            host: SITE,
            headers: vec![],
            hops,
        }
    }
}

/// A process and everything below it.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        all.extend(children(all[i]));
        i += 1;
    }
    all
}

/// utime + stime of `pid` (all its threads, live and reaped), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Context switches (voluntary and not) of every live thread of `pid`.
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// (CPU seconds, context switches) of each hop's processes now.
fn hop_cpu(path: &Target) -> Vec<(f64, f64)> {
    let tps = ticks_per_sec();
    path.hops
        .iter()
        .map(|h| {
            let pids = (h.pids)();
            let ticks: u64 = pids.iter().copied().map(cpu_ticks).sum();
            let switches: u64 = pids.iter().copied().map(context_switches).sum();
            (ticks as f64 / tps, switches as f64)
        })
        .collect()
}

struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
    /// CPU µs per request of each hop.
    cpu_us: Vec<f64>,
    /// Context switches per request of each hop.
    switches: Vec<f64>,
}

fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60_000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

/// Parse wrk's `--latency` report.
fn parse_wrk(out: &str) -> Option<(f64, f64, f64, u64, u64)> {
    let mut rps = None;
    let (mut p50, mut p99) = (None, None);
    let mut requests = None;
    let mut errors = 0;
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = t.strip_prefix("50%") {
            p50 = parse_duration_ms(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = parse_duration_ms(v);
        } else if t.contains(" requests in ") {
            requests = t.split_whitespace().next().and_then(|v| v.parse().ok());
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Some((rps?, p50?, p99?, requests?, errors))
}

fn wrk(path: &Target, conns: usize, seconds: u64) -> Run {
    let before = hop_cpu(path);
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "--latency", "-H"])
        .arg(format!("Host: {}", path.host))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{seconds}s"))
        .arg("--timeout")
        .arg("10s");
    for (k, v) in &path.headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    cmd.arg(format!("http://{}/", path.addr));
    let out = cmd
        .output()
        .unwrap_or_else(|e| die(&format!("run wrk (deploy/install-deps.sh --bench): {e}")));
    let after = hop_cpu(path);
    let text = String::from_utf8_lossy(&out.stdout);
    let Some((rps, p50_ms, p99_ms, requests, errors)) = parse_wrk(&text) else {
        die(&format!("{}: cannot read wrk's report:\n{text}", path.name))
    };
    Run {
        rps,
        p50_ms,
        p99_ms,
        requests,
        errors,
        cpu_us: per_request(&before, &after, requests, |c| c.0 * 1e6),
        switches: per_request(&before, &after, requests, |c| c.1),
    }
}

/// Per hop: how much of `what` the run cost per request.
fn per_request(
    before: &[(f64, f64)],
    after: &[(f64, f64)],
    requests: u64,
    what: impl Fn(&(f64, f64)) -> f64,
) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (what(a) - what(b)) / requests.max(1) as f64)
        .collect()
}

/// One keep-alive HTTP/1.1 client connection (reconnects when the server closes).
struct Conn {
    addr: SocketAddr,
    request: Vec<u8>,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    /// Send the request and read the whole response; `Ok(true)` for a 200 with the body.
    fn exchange(&mut self) -> std::io::Result<bool> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.stream = Some(s);
        }
        let s = self.stream.as_mut().expect("connected above");
        s.write_all(&self.request)?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                self.stream = None;
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while self.buf.len() < head_end + length {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        if head.contains("\r\nconnection: close") {
            self.stream = None;
        }
        Ok(head.starts_with("http/1.1 200") && self.buf[head_end..].ends_with(BODY.as_bytes()))
    }
}

fn request_bytes(path: &Target) -> Vec<u8> {
    let mut r = format!("GET / HTTP/1.1\r\nHost: {}\r\n", path.host);
    for (k, v) in &path.headers {
        r += &format!("{k}: {v}\r\n");
    }
    r += "\r\n";
    r.into_bytes()
}

/// Open loop: `rate` requests/s spread over `conns` connections for `seconds`. Each request
/// has a scheduled send time; its latency counts from then, so a slow answer that delays the
/// next send is charged to the requests behind it too (as wrk2 does).
fn fixed_rate(path: &Target, rate: u32, conns: usize, seconds: u64) -> Run {
    let before = hop_cpu(path);
    let start = Instant::now() + Duration::from_millis(20);
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let total_per_conn = (rate as u64 * seconds) / conns as u64;
    let results: Vec<(Vec<f64>, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..conns)
            .map(|j| {
                let mut conn = Conn {
                    addr: path.addr,
                    request: request_bytes(path),
                    stream: None,
                    buf: Vec::with_capacity(4096),
                };
                scope.spawn(move || {
                    // SAFETY: prctl with PR_SET_TIMERSLACK only changes this thread's sleeps.
                    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
                    let offset = interval.mul_f64(j as f64 / conns as f64);
                    let mut lat = Vec::with_capacity(total_per_conn as usize);
                    let mut errors = 0;
                    for i in 0..total_per_conn {
                        let due = start + offset + interval.mul_f64(i as f64);
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        match conn.exchange() {
                            Ok(true) => lat.push(due.elapsed().as_secs_f64() * 1000.0),
                            _ => {
                                errors += 1;
                                conn.stream = None;
                            }
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let after = hop_cpu(path);
    let mut lat: Vec<f64> = results.iter().flat_map(|r| r.0.iter().copied()).collect();
    let errors = results.iter().map(|r| r.1).sum();
    lat.sort_by(|a, b| a.total_cmp(b));
    let requests = lat.len() as u64 + errors;
    Run {
        rps: lat.len() as f64 / elapsed,
        p50_ms: pct(&lat, 50.0),
        p99_ms: pct(&lat, 99.0),
        requests,
        errors,
        cpu_us: per_request(&before, &after, requests, |c| c.0 * 1e6),
        switches: per_request(&before, &after, requests, |c| c.1),
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    pct(&v, 50.0)
}

/// Wait until `addr` answers the hello-world app through `path`'s headers.
fn wait_serving(path: &Target, log_hint: &Path) {
    let headers: Vec<(&str, &str)> = path
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let ok = wait_until(Duration::from_secs(60), || {
        get(path.addr, Some(path.host), "/", &headers)
            .is_ok_and(|r| r.status == 200 && r.text() == BODY)
    });
    if !ok {
        die(&format!(
            "{} at {} never served the app; logs in {}",
            path.name,
            path.addr,
            log_hint.display()
        ));
    }
}

/// `roost-bare-pingora` (built beside this benchmark) from `listen` to `upstream` (a unix
/// socket's path, or host:port).
fn bare_pingora(root: &Path, name: &str, listen: SocketAddr, upstream: impl AsRef<OsStr>) -> Proc {
    let mut cmd = Command::new(roost_tests::bins::current_exe_dir().join("roost-bare-pingora"));
    cmd.arg("--listen")
        .arg(listen.to_string())
        .arg("--upstream")
        .arg(upstream);
    Proc::spawn(
        name,
        cmd,
        &root.join(format!("{name}.log")),
        Signal::SIGTERM,
    )
}

/// nginx's `http {}` body for a proxy on `listen` to `server` (an nginx `server` address),
/// with the keep-alive upstream an operator tuning nginx would set.
fn nginx_proxy(listen: SocketAddr, server: &str) -> String {
    format!(
        "  upstream app {{ server {server}; keepalive 32; }}\n  server {{\n    listen {listen};\n\
         location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n\
         proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n    }}\n  }}\n"
    )
}

/// gunicorn from Debian's python3-gunicorn, as root's `gunicorn` would run it.
fn gunicorn(
    root: &Path,
    app_dir: &Path,
    name: &str,
    bind: &str,
    class: &str,
    workers: u32,
    threads: u32,
) -> Proc {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-m", "gunicorn", "--chdir"])
        .arg(app_dir)
        .args(["-k", class, "-w", &workers.to_string()])
        .args([
            "--threads",
            &threads.to_string(),
            "-b",
            bind,
            "app:application",
        ])
        .args(["--user", USER, "--group", USER]);
    Proc::spawn(
        name,
        cmd,
        &root.join(format!("{name}.log")),
        Signal::SIGTERM,
    )
}

fn apache_conf(root: &Path, listen: SocketAddr, app_dir: &Path, workers: u32) -> PathBuf {
    let r = root.display();
    let m = "/usr/lib/apache2/modules";
    let wsgi = app_dir.join("app.wsgi");
    std::fs::write(&wsgi, HELLO).unwrap();
    let conf = format!(
        "ServerRoot {r}\nServerName localhost\nListen {listen}\nPidFile {r}/apache.pid\nErrorLog {r}/apache-error.log\n\
         Mutex file:{r} default\n\
         LoadModule mpm_event_module {m}/mod_mpm_event.so\nLoadModule authz_core_module {m}/mod_authz_core.so\n\
         LoadModule wsgi_module {m}/mod_wsgi.so\n\
         User www-data\nGroup www-data\n\
         StartServers 2\nServerLimit 4\nThreadsPerChild 32\nMaxRequestWorkers 128\n\
         KeepAlive On\nMaxKeepAliveRequests 0\n\
         LogFormat \"%h %l %u %t \\\"%r\\\" %>s %b\" common\nCustomLog {r}/apache-access.log common\n\
         WSGISocketPrefix {r}/wsgi\n\
         WSGIDaemonProcess hello user={USER} group={USER} processes={workers} threads=4 display-name=wsgi-hello\n\
         WSGIScriptAlias / {wsgi} process-group=hello application-group=%{{GLOBAL}}\n\
         <Directory {dir}>\n  Require all granted\n</Directory>\n",
        dir = app_dir.display(),
        wsgi = wsgi.display()
    );
    let path = root.join("apache.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

/// `perf record -g` on one hop's processes while wrk loads the path, then the report's top
/// symbols (self time) into `dir/<hop>.txt`.
fn profile(path: &Target, hop: &Hop, dir: &Path, seconds: u64) {
    let pids: Vec<String> = (hop.pids)().iter().map(u32::to_string).collect();
    let data = dir.join(format!("{}.perf.data", hop.label));
    let mut perf = Command::new("perf");
    perf.args(["record", "-g", "-q", "-o"])
        .arg(&data)
        .arg("-p")
        .arg(pids.join(","))
        .args(["--", "sleep", &seconds.to_string()]);
    let Ok(mut child) = perf.spawn() else {
        die("perf is not installed; run deploy/install-deps.sh --bench");
    };
    std::thread::sleep(Duration::from_millis(300));
    let run = wrk(path, 16, seconds - 1);
    let _ = child.wait();
    let report = Command::new("perf")
        .args([
            "report",
            "--no-children",
            "--stdio",
            "--percent-limit",
            "0.7",
            "-g",
            "none",
            "-i",
        ])
        .arg(&data)
        .output();
    let text = report
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let out = dir.join(format!("{}.txt", hop.label));
    std::fs::write(
        &out,
        format!(
            "# {} under wrk -c16: {:.0} req/s (perf attached)\n{text}",
            hop.label, run.rps
        ),
    )
    .unwrap();
    println!("profile of {}: {}", hop.label, out.display());
}

fn main() {
    let f = <Flags as clap::Parser>::parse();
    let (seconds, rounds, rate) = if f.smoke {
        (1, 1, f.rate.min(200))
    } else {
        (f.seconds.max(1), f.rounds.max(1), f.rate)
    };
    let bin_dir = f
        .bin_dir
        .clone()
        .unwrap_or_else(roost_tests::bins::current_exe_dir);
    for tool in [
        "/usr/bin/wrk",
        "/usr/sbin/nginx",
        "/usr/sbin/apache2",
        "/usr/lib/apache2/modules/mod_wsgi.so",
    ] {
        if !std::path::Path::new(tool).exists() {
            die(&format!(
                "{tool} is not installed; run deploy/install-deps.sh --bench"
            ));
        }
    }
    let root = TempRoot::new("warm-bench");
    let user = ensure_user(USER);
    let sites_dir = root.subdir("sites");
    let app_dir = site_dir(&sites_dir, &user, SITE, HELLO);
    let r = root.path();

    // Roost: one node, default logging (one line per request at each hop, as operators run it).
    let proxy_toml = r.join("proxy.toml");
    std::fs::write(&proxy_toml, f.proxy_toml.replace("\\n", "\n")).unwrap();
    let node_options = NodeOptions {
        agent_config: format!("preload = []\n{}\n", f.agent_toml.replace("\\n", "\n")),
        agent_log_filter: f.log_filter.clone(),
        proxy_log_filter: f.log_filter.clone(),
        proxy_args: vec!["--config".into(), proxy_toml.display().to_string()],
    };
    let node = node::start(r, &bin_dir, &node_options);
    let record = json!({"user": USER, "app": "app:application", "dir": app_dir, "idle_timeout": 86400,
        "workers": f.workers, "threads": f.threads});
    node.etcd
        .put(&format!("{PREFIX}/sites/{SITE}"), &record.to_string());
    // The same site on a node of the older build (its own etcd, proxy and agent).
    let baseline = f.baseline_bin_dir.as_ref().map(|dir| {
        let b = node::start(&root.subdir("baseline"), dir, &node_options);
        b.etcd
            .put(&format!("{PREFIX}/sites/{SITE}"), &record.to_string());
        b
    });
    // The same app started by the agent as a fresh gunicorn (`spawn = direct`), not a zygote fork.
    let mut direct = record.clone();
    direct["spawn"] = json!("direct");
    node.etcd.put(
        &format!("{PREFIX}/sites/{DIRECT_SITE}"),
        &direct.to_string(),
    );

    // The incumbents.
    let nginx_upstream = r.join("gunicorn-behind-nginx.sock");
    let gunicorn_behind_nginx = gunicorn(
        r,
        &app_dir,
        "gunicorn-behind-nginx",
        &format!("unix:{}", nginx_upstream.display()),
        "sync",
        f.workers,
        1,
    );
    let nginx_addr = free_addr();
    // Keep-alive to gunicorn as an operator tuning nginx would set it (the sync worker closes
    // after each response anyway).
    let nginx = incumbents::nginx(
        r,
        &nginx_proxy(nginx_addr, &format!("unix:{}", nginx_upstream.display())),
    );
    // Two floors for Roost's two hops (see the module comment): pingora alone in front of the
    // same gunicorn, and two nginx hops where nginx -> gunicorn has one.
    let pingora_addr = free_addr();
    let pingora_only = bare_pingora(r, "bare-pingora", pingora_addr, &nginx_upstream);
    // The same in front of nginx: a hop with a keep-alive upstream, as both of Roost's are.
    let pingora_front_addr = free_addr();
    let pingora_front = bare_pingora(
        r,
        "bare-pingora-front",
        pingora_front_addr,
        nginx_addr.to_string(),
    );
    let front_addr = free_addr();
    let nginx_front = incumbents::nginx(
        &root.subdir("nginx-front"),
        &nginx_proxy(front_addr, &nginx_addr.to_string()),
    );
    let apache_addr = free_addr();
    let apache_conf = apache_conf(r, apache_addr, &app_dir, f.workers);
    let mut cmd = Command::new("/usr/sbin/apache2");
    cmd.arg("-f").arg(&apache_conf).arg("-DFOREGROUND");
    let apache = Proc::spawn("apache", cmd, &r.join("apache.log"), Signal::SIGTERM);
    let sync_addr = free_addr();
    let gunicorn_sync = gunicorn(
        r,
        &app_dir,
        "gunicorn-sync",
        &sync_addr.to_string(),
        "sync",
        f.workers,
        1,
    );
    let gthread_addr = free_addr();
    let gunicorn_gthread = gunicorn(
        r,
        &app_dir,
        "gunicorn-gthread",
        &gthread_addr.to_string(),
        "gthread",
        f.workers,
        f.threads,
    );

    let (proxy_pid, agent_pid) = (node.proxy_proc.pid(), node.agent_proc.pid());
    let nginx_pid = nginx.pid();
    let (bare_pingora_pid, front_pid) = (pingora_only.pid(), nginx_front.pid());
    let pingora_front_pid = pingora_front.pid();
    let behind_pid = gunicorn_behind_nginx.pid();
    let apache_pid = apache.pid();
    let (sync_pid, gthread_pid) = (gunicorn_sync.pid(), gunicorn_gthread.pid());
    // The worker's pid is known once it has started (the first request below starts it).
    let roost_worker = Rc::new(Cell::new(0u32));
    // mod_wsgi's daemons run as the site user, Apache's own processes as root and www-data.
    let site_uid = user.uid;
    let apache_procs = move |daemon: bool| {
        tree(apache_pid)
            .into_iter()
            .filter(|p| (status_ids(*p, "Uid").first() == Some(&site_uid)) == daemon)
            .collect::<Vec<u32>>()
    };
    let rw = roost_worker.clone();
    let rw2 = roost_worker.clone();
    let direct_worker = Rc::new(Cell::new(0u32));
    let dw = direct_worker.clone();
    let mut paths = vec![
        Target::plain("roost", node.proxy, node_hops(proxy_pid, agent_pid, rw)),
        Target {
            host: DIRECT_SITE,
            ..Target::plain(
                "roost-spawn-direct",
                node.proxy,
                node_hops(proxy_pid, agent_pid, dw),
            )
        },
        Target {
            headers: vec![
                ("x-roost-site".into(), SITE.into()),
                ("x-roost-auth".into(), node.secret.clone()),
            ],
            ..Target::plain(
                "agent-direct",
                node.agent,
                vec![
                    hop("agent", move || vec![agent_pid]),
                    hop("worker", move || tree(rw2.get())),
                ],
            )
        },
        Target::plain(
            "nginx-gunicorn",
            nginx_addr,
            vec![
                hop("nginx", move || tree(nginx_pid)),
                hop("worker", move || tree(behind_pid)),
            ],
        ),
        Target::plain(
            "pingora-gunicorn",
            pingora_addr,
            vec![
                hop("pingora", move || vec![bare_pingora_pid]),
                hop("worker", move || tree(behind_pid)),
            ],
        ),
        Target::plain(
            "nginx-nginx-gunicorn",
            front_addr,
            vec![
                hop("front nginx", move || tree(front_pid)),
                hop("nginx", move || tree(nginx_pid)),
                hop("worker", move || tree(behind_pid)),
            ],
        ),
        Target::plain(
            "pingora-nginx-gunicorn",
            pingora_front_addr,
            vec![
                hop("front pingora", move || vec![pingora_front_pid]),
                hop("nginx", move || tree(nginx_pid)),
                hop("worker", move || tree(behind_pid)),
            ],
        ),
        Target::plain(
            "apache-mod_wsgi",
            apache_addr,
            vec![
                hop("apache", move || apache_procs(false)),
                hop("worker", move || apache_procs(true)),
            ],
        ),
        Target::plain(
            "gunicorn-sync",
            sync_addr,
            vec![hop("worker", move || tree(sync_pid))],
        ),
        Target::plain(
            "gunicorn-gthread",
            gthread_addr,
            vec![hop("worker", move || tree(gthread_pid))],
        ),
    ];
    let baseline_worker = Rc::new(Cell::new(0u32));
    if let Some(b) = &baseline {
        let (bproxy_pid, bagent_pid) = (b.proxy_proc.pid(), b.agent_proc.pid());
        let bw = baseline_worker.clone();
        paths.insert(
            1,
            Target::plain(
                "roost-baseline",
                b.proxy,
                node_hops(bproxy_pid, bagent_pid, bw),
            ),
        );
    }
    if !f.only.is_empty() {
        // The baseline build is compared with whatever else runs.
        paths.retain(|p| p.name == "roost-baseline" || f.only.iter().any(|o| o == p.name));
        if paths.is_empty() {
            die("--only names no path");
        }
    }
    for p in &paths {
        wait_serving(p, r);
    }
    if paths
        .iter()
        .any(|p| p.name == "roost" || p.name == "agent-direct")
    {
        roost_worker.set(worker_pid(&node, SITE));
    }
    if let Some(b) = &baseline {
        baseline_worker.set(worker_pid(b, SITE));
    }
    if paths.iter().any(|p| p.name == "roost-spawn-direct") {
        direct_worker.set(worker_pid(&node, DIRECT_SITE));
    }
    // Warm every path (worker imports, connection pools) before anything is measured.
    for p in &paths {
        let _ = wrk(p, 16, 1);
    }

    println!(
        "roost warm-path benchmark: {} CPUs, kernel {}, wrk -t1, {seconds} s per run, {rounds} round(s), \
         medians; workers {} (Roost threads {}); binaries from {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        f.workers,
        f.threads,
        bin_dir.display()
    );
    if let Some(dir) = &f.baseline_bin_dir {
        println!("roost-baseline: binaries from {}", dir.display());
    }
    if !f.agent_toml.is_empty() || !f.proxy_toml.is_empty() || f.log_filter != "info" {
        println!(
            "agent config: {:?}; proxy config: {:?}; RUST_LOG={}",
            f.agent_toml, f.proxy_toml, f.log_filter
        );
    }
    let mut failed = false;
    let mut tables: Vec<(String, Vec<Vec<Run>>)> = Vec::new();
    let loads: Vec<(String, Option<usize>)> = f
        .conns
        .iter()
        .map(|c| (format!("wrk -c{c}"), Some(*c)))
        .chain((rate > 0).then(|| (format!("open loop, {rate} req/s over 16 connections"), None)))
        .collect();
    for (label, conns) in &loads {
        let mut runs: Vec<Vec<Run>> = paths.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            for k in 0..paths.len() {
                let i = (k + round) % paths.len();
                let run = match conns {
                    Some(c) => wrk(&paths[i], *c, seconds),
                    None => fixed_rate(&paths[i], rate, 16, seconds),
                };
                runs[i].push(run);
            }
        }
        tables.push((label.clone(), runs));
    }
    for (label, runs) in &tables {
        println!("\n### {label}\n");
        println!("| path | req/s | × nginx | p50 ms | p99 ms | p99 × nginx | per request and hop: CPU µs (context switches) | errors |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |");
        let base = paths.iter().position(|p| p.name == "nginx-gunicorn");
        let med = |i: usize, f: &dyn Fn(&Run) -> f64| median(runs[i].iter().map(f).collect());
        for (i, p) in paths.iter().enumerate() {
            let rps = med(i, &|r| r.rps);
            let p50 = med(i, &|r| r.p50_ms);
            let p99 = med(i, &|r| r.p99_ms);
            let errors: u64 = runs[i].iter().map(|r| r.errors).sum();
            let requests: u64 = runs[i].iter().map(|r| r.requests).sum();
            if errors > 0 || requests == 0 {
                failed = true;
            }
            let (x_rps, x_p99) = match base {
                Some(b) => (
                    format!("{:.2}", rps / med(b, &|r| r.rps)),
                    format!("{:.2}", p99 / med(b, &|r| r.p99_ms)),
                ),
                None => ("-".into(), "-".into()),
            };
            let hops: Vec<String> = p
                .hops
                .iter()
                .enumerate()
                .map(|(h, hop)| {
                    format!(
                        "{} {:.1} ({:.1} cs)",
                        hop.label,
                        med(i, &|r| r.cpu_us[h]),
                        med(i, &|r| r.switches[h])
                    )
                })
                .collect();
            println!(
                "| {} | {rps:.0} | {x_rps} | {p50:.2} | {p99:.2} | {x_p99} | {} | {errors} |",
                p.name,
                hops.join(", ")
            );
        }
    }
    if let Some(dir) = &f.profile {
        if let Some(roost) = paths.iter().find(|p| p.name == "roost") {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| die(&format!("{}: {e}", dir.display())));
            for hop in &roost.hops {
                profile(roost, hop, dir, seconds.max(3));
            }
        }
    }
    if f.hold {
        println!("\nservers still running (proxy {proxy_pid}, agent {agent_pid}, nginx {nginx_pid}); press Enter to stop");
        let _ = std::io::stdin().read_line(&mut String::new());
    }
    drop((
        nginx,
        apache,
        gunicorn_sync,
        gunicorn_gthread,
        gunicorn_behind_nginx,
    ));
    drop(node);
    drop(baseline);
    drop(root);
    if failed {
        eprintln!(
            "roost-warm-bench: some runs had errors or served nothing (see the errors column)"
        );
        // A smoke run is a check; a full run reports an incumbent's few socket errors and goes on.
        if f.smoke {
            std::process::exit(1);
        }
    }
}
