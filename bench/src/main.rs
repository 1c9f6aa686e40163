//! roost-bench: the cold-start benchmark (issue 4).
//!
//! Starts a real etcd, `roost-agent` and `roost-proxy` (from `--bin-dir`, by default the
//! directory of this binary: build them in the same profile), registers `--sites` hello-world
//! sites per mode, then times the first request to each never-started site end to end
//! (client -> proxy -> agent -> worker start -> response, one TCP connection per request),
//! alternating a zygote site and a direct (`"spawn": "direct"`, fresh gunicorn) site so both
//! modes see the same machine, and a third incumbent in the same rotation: PHP-FPM
//! `pm = ondemand` behind nginx, one pool per site, each from zero children (what shared hosts
//! run for PHP today). Then: warm requests for the path's own cost, the PSS of one
//! warm worker of each mode, and the median boot timeline the zygote-forked workers logged.
//!
//! Run (as root: sites run as a real unix user): `bench/cold-start.sh [--sites N]`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use roost_tests::ports::free_addr;
use roost_tests::process::Proc;
use roost_tests::{ensure_user, get, site_dir, wait_until, TempRoot};
use serde_json::json;

mod incumbents;
mod node;
use node::{pss_kb, worker_pid, NodeOptions, HELLO, PREFIX, USER};

struct Args {
    sites: usize,
    bin_dir: PathBuf,
    warm: usize,
    cgroups: bool,
    php_fpm: bool,
    baseline_bin_dir: Option<PathBuf>,
}

/// The command line; `Args` is what the benchmark uses, defaults resolved.
#[derive(clap::Parser)]
#[command(
    name = "roost-bench",
    about = "Time first requests to never-started sites, zygote against direct"
)]
struct Flags {
    /// Sites per spawn mode.
    #[arg(long, default_value_t = 50)]
    sites: usize,
    /// Warm requests to time after the cold ones.
    #[arg(long, default_value_t = 200)]
    warm: usize,
    /// Run the agent without per-site cgroups.
    #[arg(long)]
    no_cgroups: bool,
    /// Add PHP-FPM `pm = ondemand` behind nginx to the rotation (bench/cold-start.sh does;
    /// needs `deploy/install-deps.sh --bench`).
    #[arg(long)]
    php_fpm: bool,
    /// Where roost-agent and roost-proxy are (default: this binary's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Also run a second node from the roost-agent and roost-proxy in this directory (an
    /// older build) and add its zygote starts to the rotation: before and after a change,
    /// measured in the same run.
    #[arg(long)]
    baseline_bin_dir: Option<PathBuf>,
}

fn args() -> Args {
    let f = <Flags as clap::Parser>::parse();
    Args {
        sites: f.sites.max(1),
        bin_dir: f.bin_dir.unwrap_or_else(roost_tests::bins::current_exe_dir),
        warm: f.warm,
        cgroups: !f.no_cgroups,
        php_fpm: f.php_fpm,
        baseline_bin_dir: f.baseline_bin_dir,
    }
}

fn die(msg: &str) -> ! {
    eprintln!("roost-bench: {msg}");
    std::process::exit(2)
}

/// One request on a new connection to `addr`; the time to the end of the response.
fn timed_get(addr: SocketAddr, host: &str) -> Duration {
    let t0 = Instant::now();
    let r = get(addr, Some(host), "/", &[]).unwrap_or_else(|e| die(&format!("{host}: {e}")));
    let took = t0.elapsed();
    if r.status != 200 || r.text() != "Hello, world\n" {
        die(&format!("{host}: {} {}", r.status, r.text()));
    }
    took
}

/// nginx -> PHP-FPM with one `ondemand` pool per site, none started; where to send requests.
/// The processes stop when the returned guard drops.
fn php_fpm_baseline(
    root: &TempRoot,
    sites_dir: &std::path::Path,
    n: usize,
) -> (SocketAddr, Vec<Proc>) {
    let php_hosts: Vec<String> = (0..=n)
        .map(|i| {
            if i == n {
                "warmup-p.bench".to_string()
            } else {
                format!("p{i}.bench")
            }
        })
        .collect();
    let php_dir = sites_dir.join("php");
    std::fs::create_dir_all(&php_dir).unwrap();
    let php_script = php_dir.join("index.php");
    std::fs::write(
        &php_script,
        "<?php\nheader('Content-Type: text/plain');\necho \"Hello, world\\n\";\n",
    )
    .unwrap();
    let php_sockets = root.subdir("php-sockets");
    let php_fpm = incumbents::php_fpm(root.path(), USER, &php_hosts, &php_sockets);
    let nginx_addr = free_addr();
    let nginx = incumbents::nginx(
        root.path(),
        &incumbents::nginx_php_servers(nginx_addr, &php_hosts, &php_sockets, &php_script),
    );
    let php_ok = wait_until(Duration::from_secs(30), || {
        get(nginx_addr, Some("warmup-p.bench"), "/", &[])
            .is_ok_and(|r| r.status == 200 && r.text() == "Hello, world\n")
    });
    if !php_ok {
        die(&format!(
            "nginx -> PHP-FPM never answered; logs in {}",
            root.path().display()
        ));
    }
    (nginx_addr, vec![php_fpm, nginx])
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(label: &str, samples: &mut [f64]) -> String {
    samples.sort_by(|a, b| a.total_cmp(b));
    format!(
        "{label:<28} {:>4} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        samples.len(),
        pct(samples, 50.0),
        pct(samples, 90.0),
        pct(samples, 99.0),
        samples[0],
        samples[samples.len() - 1]
    )
}

fn children(parent: u32) -> Vec<u32> {
    roost_tests::procfs::children(parent)
}

fn main() {
    let a = args();
    let root = TempRoot::new("bench");
    let user = ensure_user(USER);
    let sites_dir = root.subdir("sites");
    // Long idle timeouts keep every started worker for the PSS reading; a short grace ends the run fast.
    let options = NodeOptions {
        agent_config: format!(
            "stop_grace_secs = 2\nmax_workers = 1000\npreload = []\ncgroups = {}\n",
            a.cgroups
        ),
        agent_log_filter: "info,roost_agent::launch=debug".into(),
        proxy_log_filter: "warn".into(),
        proxy_args: vec![],
    };
    let node = node::start(root.path(), &a.bin_dir, &options);
    // Its own state dir, so its own cgroup name: the two agents never touch each other's workers.
    let baseline = a
        .baseline_bin_dir
        .as_ref()
        .map(|dir| node::start(&root.subdir("baseline"), dir, &options));
    let n = a.sites;
    println!(
        "roost cold-start benchmark: {n} sites per mode, cgroups {}, binaries from {}, {} CPUs, kernel {}",
        if a.cgroups { "on" } else { "off" },
        a.bin_dir.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );

    // Register every site (plus a warm-up site per mode, not counted), wait until the last
    // one answers: by then proxy and agent know them all.
    let mut hosts = Vec::new();
    for i in 0..=n {
        for (mode, spawn) in [("z", "zygote"), ("d", "direct")] {
            let host = if i == n {
                format!("warmup-{mode}.bench")
            } else {
                format!("{mode}{i}.bench")
            };
            let dir = site_dir(&sites_dir, &user, &host, HELLO);
            let record = json!({"user": USER, "app": "app:application", "dir": dir, "idle_timeout": 86400, "spawn": spawn});
            node.etcd
                .put(&format!("{PREFIX}/sites/{host}"), &record.to_string());
            hosts.push(host);
        }
    }
    if let Some(b) = &baseline {
        for i in 0..=n {
            let host = if i == n {
                "warmup-b.bench".to_string()
            } else {
                format!("b{i}.bench")
            };
            let dir = site_dir(&sites_dir, &user, &host, HELLO);
            let record =
                json!({"user": USER, "app": "app:application", "dir": dir, "idle_timeout": 86400});
            b.etcd
                .put(&format!("{PREFIX}/sites/{host}"), &record.to_string());
        }
    }
    let mut warmups = vec![
        ("warmup-z.bench", node.proxy),
        ("warmup-d.bench", node.proxy),
    ];
    if let Some(b) = &baseline {
        warmups.push(("warmup-b.bench", b.proxy));
    }
    for (host, proxy) in warmups {
        let ok = wait_until(Duration::from_secs(30), || {
            get(proxy, Some(host), "/", &[]).is_ok_and(|r| r.status == 200)
        });
        if !ok {
            die(&format!(
                "{host} never answered; logs in {}",
                root.path().display()
            ));
        }
    }

    // PHP-FPM: a pool per site (plus a warm-up pool), no child in any until its first request.
    let php = a.php_fpm.then(|| php_fpm_baseline(&root, &sites_dir, n));
    let (mut zygote, mut direct, mut php_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut base_ms = Vec::new();
    for i in 0..n {
        // This build's and the baseline's zygote starts, in turns first.
        let mut zygotes = vec![(node.proxy, format!("z{i}.bench"), &mut zygote)];
        if let Some(b) = &baseline {
            zygotes.push((b.proxy, format!("b{i}.bench"), &mut base_ms));
            if i % 2 == 1 {
                zygotes.reverse();
            }
        }
        for (proxy, host, samples) in zygotes {
            samples.push(ms(timed_get(proxy, &host)));
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some((nginx_addr, _)) = &php {
            php_ms.push(ms(timed_get(*nginx_addr, &format!("p{i}.bench"))));
            std::thread::sleep(Duration::from_millis(50));
        }
        direct.push(ms(timed_get(node.proxy, &format!("d{i}.bench"))));
        // Let the fresh gunicorn finish booting in the background before the next sample.
        std::thread::sleep(Duration::from_millis(150));
        print!(".");
        let _ = std::io::stdout().flush();
    }
    println!();
    let mut warm_z: Vec<f64> = (0..a.warm)
        .map(|_| ms(timed_get(node.proxy, "z0.bench")))
        .collect();
    let mut warm_d: Vec<f64> = (0..a.warm)
        .map(|_| ms(timed_get(node.proxy, "d0.bench")))
        .collect();

    println!("\nfirst request to a never-started site, client -> proxy -> agent -> new worker -> client (ms)");
    println!(
        "{:<28} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "", "n", "p50", "p90", "p99", "min", "max"
    );
    println!("{}", summary("zygote (forked worker)", &mut zygote));
    if !base_ms.is_empty() {
        println!("{}", summary("zygote, baseline binaries", &mut base_ms));
    }
    println!("{}", summary("direct (fresh gunicorn)", &mut direct));
    if !php_ms.is_empty() {
        println!("{}", summary("nginx -> PHP-FPM ondemand", &mut php_ms));
    }
    println!("{}", summary("warm, zygote worker", &mut warm_z));
    println!("{}", summary("warm, direct worker", &mut warm_d));

    worker_boot_report(&node, "z", n, "this build");
    agent_report(&node, "z", "this build");
    if let Some(b) = &baseline {
        worker_boot_report(b, "b", n, "baseline");
        agent_report(b, "b", "baseline");
    }

    // PSS of one warm hello-world worker per mode (all sites' workers still running).
    let zpid = worker_pid(&node, "z0.bench");
    let dpid = worker_pid(&node, "d0.bench");
    let z_pss = pss_kb(zpid) + children(zpid).iter().map(|p| pss_kb(*p)).sum::<u64>();
    let d_kids = children(dpid);
    let d_worker: u64 = d_kids.iter().map(|p| pss_kb(*p)).sum();
    let d_pss = pss_kb(dpid) + d_worker;
    let zygote_pss: u64 = roost_tests::procfs::all_pids()
        .into_iter()
        .filter(|p| {
            roost_tests::procfs::comm(*p) == "roost-zygote"
                && roost_tests::procfs::ppid(*p)
                    .is_some_and(|pp| roost_tests::procfs::comm(pp) == "roost-agent")
        })
        .filter(|p| roost_tests::procfs::children(*p).contains(&zpid))
        .map(pss_kb)
        .sum();
    println!(
        "\nPSS of one warm hello-world site's worker processes, {} workers of each mode running (kB):",
        n + 1
    );
    println!("  zygote: forked worker {z_pss} kB (pid {zpid}; its zygote {zygote_pss} kB, shared by all forks)");
    println!(
        "  direct: gunicorn arbiter + worker {d_pss} kB (pid {dpid}: arbiter {} kB, worker {d_worker} kB)",
        pss_kb(dpid)
    );
    if d_pss > 0 {
        println!("  ratio zygote/direct: {:.2}", z_pss as f64 / d_pss as f64);
    }
    let _ = std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755));
}

/// Where a zygote cold start went inside the workers of sites `<prefix><i>.bench`, as they
/// logged it with their first response (median per phase).
fn worker_boot_report(node: &node::Node, prefix: &str, n: usize, label: &str) {
    let mut phases: Vec<(String, Vec<f64>)> = Vec::new();
    let mut totals = Vec::new();
    for i in 0..n {
        let log = std::fs::read_to_string(
            node.state_dir
                .join("logs")
                .join(format!("{prefix}{i}.bench.log")),
        )
        .unwrap_or_default();
        let Some(line) = log.lines().find(|l| l.contains("first response")) else {
            continue;
        };
        if let Some(total) = line
            .split("first response ")
            .nth(1)
            .and_then(|s| s.split(' ').next()?.parse::<f64>().ok())
        {
            totals.push(total);
        }
        let Some(inner) = line
            .rsplit_once('(')
            .map(|(_, r)| r.trim_end_matches(" ms)"))
        else {
            continue;
        };
        for part in inner.split(", ") {
            if let Some((name, v)) = part.rsplit_once(' ') {
                if let Ok(v) = v.parse::<f64>() {
                    match phases.iter_mut().find(|(n, _)| n == name) {
                        Some((_, vs)) => vs.push(v),
                        None => phases.push((name.to_string(), vec![v])),
                    }
                }
            }
        }
    }
    if !totals.is_empty() {
        totals.sort_by(|a, b| a.total_cmp(b));
        let mut line = format!(
            "\nzygote worker boot ({label}), as logged by the workers (median ms): fork -> first response {:.2} =",
            pct(&totals, 50.0)
        );
        for (name, vs) in phases.iter_mut() {
            vs.sort_by(|a, b| a.total_cmp(b));
            line += &format!(" {name} {:.2}", pct(vs, 50.0));
        }
        println!("{line}");
    }
}

/// The agent's part of the zygote starts of sites `<prefix>…`, from its debug lines.
fn agent_report(node: &node::Node, prefix: &str, label: &str) {
    // The agent's part of a zygote start, from its debug lines (median µs; zygote sites only).
    let agent_log = std::fs::read_to_string(&node.agent_log).unwrap_or_default();
    let agent_steps: [(&str, &[(&str, &str)]); 3] = [
        (
            "socket bound",
            &[
                ("queued_us", "queued"),
                ("user_us", "user"),
                ("bind_us", "bind"),
            ],
        ),
        (
            "start timings",
            &[
                ("queued_us", "queued"),
                ("request_us", "fork asked"),
                ("user_us", "user"),
                ("interpreter_us", "interpreter"),
                ("bind_us", "bind"),
                ("cgroup_us", "cgroup"),
                ("log_us", "log pipe"),
                ("spawn_us", "fork from the zygote"),
            ],
        ),
        (
            "worker forked",
            &[
                ("lookup_us", "zygote lookup"),
                ("asked_us", "asked, start prepared meanwhile"),
                ("fork_us", "fork answer awaited"),
                ("send_us", "spec and fds sent to the child"),
            ],
        ),
    ];
    for (marker, keys) in agent_steps {
        let lines: Vec<&str> = agent_log
            .lines()
            .filter(|l| l.contains(marker) && l.contains(&format!("site={prefix}")))
            .collect();
        if lines.is_empty() {
            continue;
        }
        let parts: Vec<String> = keys
            .iter()
            .map(|(key, label)| {
                let mut vs: Vec<f64> = lines
                    .iter()
                    .filter_map(|l| {
                        l.split(&format!("{key}="))
                            .nth(1)?
                            .split_whitespace()
                            .next()?
                            .parse()
                            .ok()
                    })
                    .collect();
                vs.sort_by(|a, b| a.total_cmp(b));
                match vs.is_empty() {
                    true => format!("{label} -"),
                    false => format!("{label} {:.0}", pct(&vs, 50.0)),
                }
            })
            .collect();
        println!(
            "agent ({label}), {marker} (median µs): {}",
            parts.join(", ")
        );
    }
}
