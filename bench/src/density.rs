//! Density (issue 12): what a node holds for many sites, few of them warm. One node (etcd,
//! proxy, agent from `--bin-dir`) gets `--sites` registered hello-world sites; `--warm` of them
//! get a request each (a zygote-forked worker), and as many more sites run `spawn = "direct"`
//! (a fresh gunicorn each, what a host without Roost runs per site). Reported, from
//! `/proc/<pid>/smaps_rollup` and `/proc/<pid>/fd`:
//! - the agent's PSS and fds before any site, with every site registered and idle, and with
//!   the warm ones running: the cost of an idle and of a warm site to the agent;
//! - the zygote (and its spare) and the forked workers: the PSS of a warm site;
//! - the fresh gunicorns (arbiter and worker) of the direct sites, for comparison.

use std::path::PathBuf;
use std::time::Duration;

use roost_tests::procfs::{all_pids, children, comm, fds};
use roost_tests::{ensure_user, get, site_dir, wait_until, TempRoot};
use serde_json::json;

mod node;
use node::{pss_kb, NodeOptions, HELLO, PREFIX, USER};

#[derive(clap::Parser)]
#[command(
    name = "roost-density-bench",
    about = "Memory and fds of a node with many registered sites, few of them warm"
)]
struct Args {
    /// Registered sites (served by the zygote).
    #[arg(long, default_value_t = 1000)]
    sites: usize,
    /// How many of them get a request (and so a worker); as many direct sites run beside them.
    #[arg(long, default_value_t = 100)]
    warm: usize,
    /// Where roost-agent and roost-proxy are (default: this binary's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// The agent's PSS (kB) and open fds.
fn agent_footprint(pid: u32) -> (u64, usize) {
    (pss_kb(pid), fds(pid).len())
}

fn agent_metric(node: &node::Node, series: &str) -> f64 {
    let text = get(node.agent_admin, Some("localhost"), "/metrics", &[])
        .map(|r| r.text())
        .unwrap_or_default();
    roost_tests::edge::metric_value(&text, series).unwrap_or(0.0)
}

fn request(node: &node::Node, host: &str) {
    let r = get(node.proxy, Some(host), "/", &[]).unwrap_or_else(|e| panic!("GET {host}: {e}"));
    assert_eq!(r.status, 200, "GET {host}: {}", r.text());
}

fn per_site(total_kb: i64, n: usize) -> String {
    format!("{:.1} kB", total_kb as f64 / n.max(1) as f64)
}

fn main() {
    let a = <Args as clap::Parser>::parse();
    let bin_dir = a.bin_dir.unwrap_or_else(roost_tests::bins::current_exe_dir);
    let root = TempRoot::new("density");
    let user = ensure_user(USER);
    let sites_dir = root.subdir("sites");
    let options = NodeOptions {
        agent_config: format!("max_workers = {}\nstop_grace_secs = 2\n", 2 * a.warm + 16),
        agent_log_filter: "warn".into(),
        proxy_log_filter: "warn".into(),
        proxy_args: vec![],
    };
    let node = node::start(root.path(), &bin_dir, &options);
    let agent = node.agent_proc.pid();
    std::thread::sleep(Duration::from_secs(2)); // the zygote and its spare settle
    let (pss_empty, fds_empty) = agent_footprint(agent);

    // Every site, registered in batches; the direct ones are extra, for the comparison.
    let record = |host: &str, spawn: &str| {
        let dir = site_dir(&sites_dir, &user, host, HELLO);
        let v = json!({"user": USER, "app": "app:application", "dir": dir, "idle_timeout": 86400, "spawn": spawn});
        (format!("{PREFIX}/sites/{host}"), v.to_string())
    };
    let zygote_hosts: Vec<String> = (0..a.sites).map(|i| format!("z{i}.density")).collect();
    let direct_hosts: Vec<String> = (0..a.warm).map(|i| format!("d{i}.density")).collect();
    let mut records: Vec<_> = zygote_hosts.iter().map(|h| record(h, "zygote")).collect();
    records.extend(direct_hosts.iter().map(|h| record(h, "direct")));
    roost_tests::bulk::put_all(node.etcd.url(), records);
    let all = (a.sites + a.warm) as f64;
    assert!(
        wait_until(Duration::from_secs(60), || agent_metric(
            &node,
            "roost_agent_sites"
        ) >= all),
        "the agent never knew all {all} sites"
    );
    std::thread::sleep(Duration::from_secs(1));
    let (pss_idle, fds_idle) = agent_footprint(agent);

    for host in &zygote_hosts[..a.warm] {
        request(&node, host);
    }
    std::thread::sleep(Duration::from_secs(1));
    let (pss_warm, fds_warm) = agent_footprint(agent);
    let zygotes: Vec<u32> = all_pids()
        .into_iter()
        .filter(|p| comm(*p) == "roost-zygote")
        .collect();
    let (mut zygote_kb, mut workers_kb, mut workers) = (0u64, 0u64, 0usize);
    for z in &zygotes {
        zygote_kb += pss_kb(*z);
        for child in children(*z) {
            if comm(child).starts_with("roost:") {
                workers_kb += pss_kb(child);
                workers += 1;
            } else {
                zygote_kb += pss_kb(child); // the spare
            }
        }
    }

    for host in &direct_hosts {
        request(&node, host);
    }
    // A direct site is an arbiter (the agent's child) and its worker.
    let direct_kb: u64 = children(agent)
        .into_iter()
        .filter(|p| !zygotes.contains(p))
        .map(|arbiter| pss_kb(arbiter) + children(arbiter).iter().map(|w| pss_kb(*w)).sum::<u64>())
        .sum();

    let (n, w) = (a.sites, a.warm);
    println!(
        "roost density benchmark: {n} registered sites, {w} of them warm, {w} direct sites beside them; {} CPUs, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
    println!("\n| what | PSS | fds |");
    println!("| --- | ---: | ---: |");
    println!("| agent, no site | {pss_empty} kB | {fds_empty} |");
    println!("| agent, {n} idle sites | {pss_idle} kB | {fds_idle} |");
    println!("| agent, {w} of them warm | {pss_warm} kB | {fds_warm} |");
    println!(
        "| zygotes and spare ({} zygote) | {zygote_kb} kB | |",
        zygotes.len()
    );
    println!("| {workers} forked workers | {workers_kb} kB | |");
    println!(
        "| **agent + zygotes + workers** | **{} kB** | |",
        pss_warm + zygote_kb + workers_kb
    );
    println!("| {w} fresh gunicorns (arbiter + worker, `spawn = \"direct\"`) | {direct_kb} kB | |");
    println!("\nper site:");
    println!(
        "  idle (registered, no process): agent {:.0} B, {:.2} fds",
        (pss_idle as f64 - pss_empty as f64) * 1024.0 / n as f64,
        (fds_idle as f64 - fds_empty as f64) / n as f64
    );
    println!(
        "  warm, to the agent: {}, {:.2} fds",
        per_site(pss_warm as i64 - pss_idle as i64, w),
        (fds_warm as f64 - fds_idle as f64) / w as f64
    );
    let roost_warm = workers_kb + zygote_kb + pss_warm.saturating_sub(pss_idle);
    println!(
        "  warm, all of it (worker + zygote share + agent): {}; a fresh gunicorn: {}; ratio {:.2}",
        per_site(roost_warm as i64, w),
        per_site(direct_kb as i64, w),
        roost_warm as f64 / direct_kb.max(1) as f64
    );
}
