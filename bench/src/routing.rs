//! roost-routing-bench: routing at scale (issue 9).
//!
//! With a real etcd and the release `roost-proxy` / `roost-agent` (from `--bin-dir`, by
//! default this binary's directory), it measures, in one run:
//! - propagation of single changes (etcd put → the proxy stops answering 404 for the new
//!   host) on an empty cluster, then again with `--sites` N (100,000) sites loaded;
//! - the sync floor: one paginated read of the sites prefix by a plain etcd client (pages
//!   of 1,000 keys at one revision, no decoding), best of three;
//! - proxy sync: start to `/readyz` 200 for a fresh proxy on the N sites (and the time its
//!   own log gives for the list), and its RSS once synced;
//! - agent sync and RSS the same way.
//!
//! The proxy runs with no agent while propagation is measured: a routed site then answers
//! 503 "no node" at once, so the time is the proxy's alone (no worker start in it).
//! Route lookups are timed by the criterion bench `route_lookup` (`bench/routing-scale.sh`
//! runs both).

use roost_tests::bulk::bench_site_record;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use nix::sys::signal::Signal;
use roost_tests::ports::free_addr;
use roost_tests::process::Proc;
use roost_tests::{get, wait_until, Etcd, TempRoot};

const SITES_PREFIX: &str = "/roost/sites/";
const READY_TIMEOUT: Duration = Duration::from_secs(300);

struct Args {
    sites: usize,
    probes: usize,
    bin_dir: PathBuf,
}

/// The command line; `Args` is what the benchmark uses, defaults resolved.
#[derive(clap::Parser)]
#[command(
    name = "roost-routing-bench",
    about = "Sync, memory and propagation of proxy and agent at N sites"
)]
struct Flags {
    /// Site records to load into etcd.
    #[arg(long, default_value_t = 100_000)]
    sites: usize,
    /// Single changes timed for propagation, per cluster size (at least 2).
    #[arg(long, default_value_t = 100)]
    probes: usize,
    /// Where roost-agent and roost-proxy are (default: this binary's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn args() -> Args {
    let f = <Flags as clap::Parser>::parse();
    Args {
        sites: f.sites,
        probes: f.probes.max(2),
        bin_dir: f.bin_dir.unwrap_or_else(roost_tests::bins::current_exe_dir),
    }
}

fn die(msg: &str) -> ! {
    eprintln!("roost-routing-bench: {msg}");
    std::process::exit(2)
}

struct Running {
    proc: Proc,
    admin: SocketAddr,
    listen: SocketAddr,
}

fn spawn(root: &Path, bin_dir: &Path, etcd: &str, what: &str, tag: &str) -> Running {
    let (listen, admin) = (free_addr(), free_addr());
    let mut cmd = Command::new(bin_dir.join(format!("roost-{what}")));
    cmd.arg("--etcd")
        .arg(etcd)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--admin")
        .arg(admin.to_string())
        .arg("--secret-file")
        .arg(root.join("secret"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    if what == "agent" {
        let state = root.join(format!("state-{tag}"));
        std::fs::create_dir_all(&state).unwrap_or_else(|e| die(&format!("state dir: {e}")));
        let config = root.join("agent.toml");
        std::fs::write(&config, "preload = []\ncgroups = false\n")
            .unwrap_or_else(|e| die(&format!("agent config: {e}")));
        cmd.args(["--node-id", "bench-node"])
            .arg("--state-dir")
            .arg(state)
            .arg("--config")
            .arg(config);
    }
    let log = root.join(format!("{tag}.log"));
    Running {
        proc: Proc::spawn(tag, cmd, &log, Signal::SIGTERM),
        admin,
        listen,
    }
}

/// Start to `/readyz` 200.
fn wait_ready(r: &mut Running) -> Duration {
    let t0 = Instant::now();
    let ok = wait_until(READY_TIMEOUT, || {
        r.proc.exited().is_some()
            || get(r.admin, Some("localhost"), "/readyz", &[]).is_ok_and(|x| x.status == 200)
    });
    if !ok || r.proc.exited().is_some() {
        die(&format!(
            "{} not ready: {}",
            r.proc.name(),
            roost_tests::process::tail(&r.proc.log(), 20)
        ));
    }
    t0.elapsed()
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// `took_ms` of the informer's "first sync complete" line for the sites prefix.
fn logged_sync_ms(log: &str) -> Option<u64> {
    let line = log
        .lines()
        .find(|l| l.contains("first sync complete") && l.contains(SITES_PREFIX))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("took_ms="))?
        .parse()
        .ok()
}

/// Put one new site at a time and time until the proxy routes it (404 → anything else).
fn propagation(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    proxy: SocketAddr,
    tag: &str,
    n: usize,
) -> Vec<f64> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let host = format!("probe-{tag}-{i}.bench.example");
        let key = format!("{SITES_PREFIX}{host}");
        let mut kv = client.kv_client();
        let t0 = Instant::now();
        rt.block_on(kv.put(key.as_str(), bench_site_record(i), None))
            .unwrap_or_else(|e| die(&format!("put {key}: {e}")));
        loop {
            match get(proxy, Some(&host), "/", &[]) {
                Ok(r) if r.status != 404 => break,
                _ if t0.elapsed() > Duration::from_secs(10) => die(&format!("{host} never routed")),
                _ => {}
            }
        }
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
        rt.block_on(kv.delete(key.as_str(), None))
            .unwrap_or_else(|e| die(&format!("delete {key}: {e}")));
    }
    samples.sort_by(f64::total_cmp);
    samples
}

/// One paginated read of the sites prefix at one revision by a plain etcd client.
async fn floor_read(client: &Client) -> (Duration, usize) {
    let end = roost_proto::paging::prefix_end(SITES_PREFIX.as_bytes());
    let mut kv = client
        .kv_client()
        .max_decoding_message_size(roost_proto::paging::MAX_MESSAGE_BYTES);
    let t0 = Instant::now();
    let mut key = SITES_PREFIX.as_bytes().to_vec();
    let mut revision = 0;
    let mut count = 0;
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(1000);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = kv
            .get(key.clone(), Some(opts))
            .await
            .unwrap_or_else(|e| die(&format!("floor read: {e}")));
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        count += resp.kvs().len();
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                key = last.key().to_vec();
                key.push(0);
            }
            _ => break,
        }
    }
    (t0.elapsed(), count)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let a = args();
    let root = TempRoot::new("routing-bench");
    let etcd = Etcd::start_in(root.path());
    std::fs::write(
        root.path().join("secret"),
        "0123456789abcdef0123456789abcdef",
    )
    .unwrap_or_else(|e| die(&format!("secret: {e}")));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(&format!("tokio: {e}")));
    let client = rt
        .block_on(Client::connect([etcd.url()], None))
        .unwrap_or_else(|e| die(&format!("etcd: {e}")));

    eprintln!("[bench] empty cluster: proxy, {} single changes", a.probes);
    let mut empty = spawn(root.path(), &a.bin_dir, etcd.url(), "proxy", "proxy-empty");
    wait_ready(&mut empty);
    let empty_prop = propagation(&rt, &client, empty.listen, "empty", a.probes);
    let empty_rss = rss_mb(empty.proc.pid());
    drop(empty);

    eprintln!("[bench] loading {} sites", a.sites);
    let t0 = Instant::now();
    let records = (0..a.sites)
        .map(|i| {
            (
                format!("{SITES_PREFIX}site-{i:07}.bench.example"),
                bench_site_record(i),
            )
        })
        .collect();
    roost_tests::bulk::put_all(etcd.url(), records);
    let load = t0.elapsed();

    eprintln!("[bench] sync floor");
    let mut floor = Duration::MAX;
    for _ in 0..3 {
        let (took, count) = rt.block_on(floor_read(&client));
        if count != a.sites {
            die(&format!(
                "the floor read saw {count} sites, not {}",
                a.sites
            ));
        }
        floor = floor.min(took);
    }

    eprintln!("[bench] proxy on {} sites", a.sites);
    let mut proxy = spawn(root.path(), &a.bin_dir, etcd.url(), "proxy", "proxy-full");
    let proxy_ready = wait_ready(&mut proxy);
    let proxy_listed = logged_sync_ms(&proxy.proc.log());
    let proxy_rss = rss_mb(proxy.proc.pid());
    let full_prop = propagation(&rt, &client, proxy.listen, "full", a.probes);
    let proxy_rss_after = rss_mb(proxy.proc.pid());
    drop(proxy);

    eprintln!("[bench] agent on {} sites", a.sites);
    let mut agent = spawn(root.path(), &a.bin_dir, etcd.url(), "agent", "agent-full");
    let agent_ready = wait_ready(&mut agent);
    let agent_listed = logged_sync_ms(&agent.proc.log());
    std::thread::sleep(Duration::from_secs(1));
    let agent_rss = rss_mb(agent.proc.pid());
    drop(agent);

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let floor_ms = ms(floor);
    let listed = |l: Option<u64>| l.map_or("-".to_string(), |v| v.to_string());
    println!(
        "\nrouting at scale: {} sites (records ~170 B, one alias each), loaded in {:.1} s\n",
        a.sites,
        load.as_secs_f64()
    );
    println!("{:<46} {:>10} {:>14}", "measure", "value", "target");
    println!(
        "{:<46} {:>7.0} ms {:>14}",
        "sync floor (plain paged read, best of 3)", floor_ms, "baseline"
    );
    println!(
        "{:<46} {:>7.0} ms {:>14}",
        format!(
            "proxy: start → ready (list took {} ms)",
            listed(proxy_listed)
        ),
        ms(proxy_ready),
        format!("≤ {:.0} ms (3×)", 3.0 * floor_ms)
    );
    println!(
        "{:<46} {:>7.0} ms {:>14}",
        format!(
            "agent: start → ready (list took {} ms)",
            listed(agent_listed)
        ),
        ms(agent_ready),
        format!("≤ {:.0} ms (3×)", 3.0 * floor_ms)
    );
    println!(
        "{:<46} {:>7.1} MB {:>14}",
        "proxy RSS, empty cluster", empty_rss, "baseline"
    );
    println!(
        "{:<46} {:>7.1} MB {:>14}",
        "proxy RSS synced", proxy_rss, "< 150 MB"
    );
    println!(
        "{:<46} {:>7.1} MB {:>14}",
        "  after the propagation probes", proxy_rss_after, "< 150 MB"
    );
    println!(
        "{:<46} {:>7.1} MB {:>14}",
        "agent RSS synced", agent_rss, "< 150 MB"
    );
    for (label, s) in [
        ("empty cluster", &empty_prop),
        (&*format!("{} sites", a.sites), &full_prop),
    ] {
        println!(
            "{:<46} {:>7.2} ms {:>14}",
            format!("propagation p50, {label}"),
            pct(s, 50.0),
            ""
        );
        println!(
            "{:<46} {:>7.2} ms {:>14}",
            format!("propagation p99, {label}"),
            pct(s, 99.0),
            ""
        );
    }
    println!(
        "{:<46} {:>10.2} {:>14}",
        "propagation p50 ratio full / empty",
        pct(&full_prop, 50.0) / pct(&empty_prop, 50.0),
        "≤ 2"
    );
    println!(
        "{:<46} {:>10.2} {:>14}",
        "propagation p99 ratio full / empty",
        pct(&full_prop, 99.0) / pct(&empty_prop, 99.0),
        "≤ 2"
    );
    println!("\nroute lookups: `cargo bench -p roost-bench --bench route_lookup` (run by bench/routing-scale.sh)");
}
