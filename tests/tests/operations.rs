//! What an operator does to a running cluster, on clusters started by the operator's own
//! launcher (`deploy/cluster.sh`: etcd, 3 agents each in its own network namespace, 2
//! proxies, 100 sites of two users), under bounded client loops over the 100 sites:
//! a node joins, a node dies, a node drains; the proxies agree on placement; and the
//! launcher leaves nothing behind. Each scenario prints its figures (eprintln).
//! Also what deploy/systemd promises: the agent serves with only the capabilities its unit
//! leaves it, and workers get their own open-file limit.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use roost_tests::edge::metric_value;
use roost_tests::launcher::{LaunchOpts, Launched};
use roost_tests::load::Load;
use roost_tests::process::{pid_alive, pid_exists};
use roost_tests::prometheus::{concrete, panel_queries, Prometheus};
use roost_tests::{get, wait_until};
use serde_json::Value;

/// Client threads of the load; each sends one request at a time.
const CLIENTS: usize = 4;
/// Every site's first request is a cold start on a busy 2-core machine.
const WARM_TIMEOUT: Duration = Duration::from_secs(60);

/// Send every site one request through each proxy until it answers 200 (its worker starts).
fn warm_up(c: &Launched) {
    for host in c.hosts() {
        for p in 0..c.proxies().len() {
            let mut last = String::new();
            let ok = wait_until(WARM_TIMEOUT, || match c.get(p, &host, "/") {
                Ok(r) if r.status == 200 => true,
                Ok(r) => {
                    last = format!("{}: {}", r.status, r.text());
                    false
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            });
            assert!(ok, "{host} never answered 200 via proxy {p}; last: {last}");
        }
    }
}

/// The worker pid in the demo app's answer ("running as USER (uid N), pid P").
fn worker_pid(body: &str) -> Option<u32> {
    body.split(", pid ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// host -> (node, worker pid) from every live agent's `/sites`.
fn workers_by_host(c: &Launched) -> HashMap<String, Vec<(String, u32)>> {
    let mut by_host: HashMap<String, Vec<(String, u32)>> = HashMap::new();
    // `/sites` names users and pids, so it needs the cluster secret.
    let secret_file = c.state["secret_file"]
        .as_str()
        .expect("launcher state: secret_file");
    let secret = std::fs::read_to_string(secret_file).expect("read the cluster secret");
    let auth = [("x-roost-auth", secret.trim())];
    for n in c.nodes() {
        if !pid_alive(n.pid) {
            continue;
        }
        let sites = get(n.admin, Some("localhost"), "/sites", &auth)
            .map(|r| r.json())
            .unwrap_or(Value::Null);
        for s in sites.as_array().into_iter().flatten() {
            if let (Some(host), Some(pid)) = (s["host"].as_str(), s["pid"].as_u64()) {
                by_host
                    .entry(host.to_string())
                    .or_default()
                    .push((n.id.clone(), pid as u32));
            }
        }
    }
    by_host
}

/// Scenario 4: through each proxy every site is served by the same worker, on the node
/// `roostctl where` names. Returns the placement (host -> node).
fn assert_proxies_agree(c: &Launched) -> BTreeMap<String, String> {
    let placed: BTreeMap<String, String> = c.placements().into_iter().collect();
    let workers = workers_by_host(c);
    let proxies = c.proxies().len();
    assert!(proxies >= 2, "scenario 4 needs two proxies");
    for (host, node) in &placed {
        let pids: Vec<u32> = (0..proxies)
            .map(|p| {
                let r = c
                    .get(p, host, "/")
                    .unwrap_or_else(|e| panic!("{host} via proxy {p}: {e}"));
                assert_eq!(r.status, 200, "{host} via proxy {p}: {}", r.text());
                worker_pid(&r.text())
                    .unwrap_or_else(|| panic!("no pid in {host}'s answer: {}", r.text()))
            })
            .collect();
        assert!(
            pids.windows(2).all(|w| w[0] == w[1]),
            "the proxies sent {host} to different workers: pids {pids:?}"
        );
        let on = workers.get(host).cloned().unwrap_or_default();
        assert!(
            on.iter().any(|(n, pid)| n == node && *pid == pids[0]),
            "{host}: roostctl where says {node}, the proxies reached worker {}, the agents \
             report workers {on:?}",
            pids[0]
        );
    }
    placed
}

/// Each proxy's `roost_proxy_nodes` (live nodes in its snapshot).
fn proxy_node_counts(c: &Launched) -> Vec<Option<f64>> {
    c.proxies()
        .iter()
        .map(|(_, admin)| {
            get(*admin, Some("localhost"), "/metrics", &[])
                .ok()
                .and_then(|r| metric_value(&r.text(), "roost_proxy_nodes"))
        })
        .collect()
}

/// The sum of every series of `name` (all label values) in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

fn wait_proxies_see_nodes(c: &Launched, n: usize) {
    let seen = wait_until(Duration::from_secs(20), || {
        proxy_node_counts(c).iter().all(|v| *v == Some(n as f64))
    });
    assert!(
        seen,
        "proxies never saw {n} live nodes: {:?}",
        proxy_node_counts(c)
    );
}

fn node_ids_in_etcd(c: &Launched) -> Vec<String> {
    let out = c.roostctl(&["--json", "node", "ls"]);
    assert!(out.status.success(), "roostctl node ls failed");
    let v: Value = serde_json::from_slice(&out.stdout).expect("node ls --json");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn proxies_agree_on_placement_and_a_fourth_node_takes_a_quarter_without_a_failure() {
    let mut c = Launched::start(LaunchOpts::default());
    warm_up(&c);
    let before = assert_proxies_agree(&c);

    let proxies: Vec<SocketAddr> = c.proxies().iter().map(|p| p.0).collect();
    let load = Load::start(&proxies, &c.hosts(), CLIENTS);
    std::thread::sleep(Duration::from_secs(1));
    let joined_at = Instant::now();
    let new = c.add_node();
    wait_proxies_see_nodes(&c, 4);
    let seen_after = joined_at.elapsed();
    // Long enough for the load to walk every site at least once more (a cold start each on
    // the new node for the sites that moved).
    std::thread::sleep(Duration::from_secs(4));
    let report = load.stop();

    let after = assert_proxies_agree(&c);
    let moved: Vec<(&String, &String, &String)> = before
        .iter()
        .filter_map(|(h, old)| {
            let new_node = &after[h];
            (new_node != old).then_some((h, old, new_node))
        })
        .collect();
    let to_new = moved.iter().filter(|(_, _, n)| **n == new.id).count();
    let hits_on_new = workers_by_host(&c)
        .values()
        .filter(|w| w.iter().any(|(n, _)| *n == new.id))
        .count();
    // The new node's own metrics agree: one spawn and one cold start per worker it has.
    let metrics = get(new.admin, Some("localhost"), "/metrics", &[])
        .map(|r| r.text())
        .unwrap_or_default();
    let spawns = metric_sum(&metrics, "roost_agent_worker_spawns_total");
    let cold_starts = metric_sum(&metrics, "roost_agent_cold_start_duration_seconds_count");
    eprintln!(
        "[scenario 1: rolling addition] {} requests over {:.1}s through 2 proxies, {} failed; \
         {} joined and both proxies routed to it {:.2}s after the launcher was asked; \
         {}/{} sites moved ({} to {}), {} sites now have a worker there; its metrics: {spawns} \
         spawns, {cold_starts} cold starts",
        report.requests(),
        report.outcomes.last().map_or(0.0, |o| o.at.as_secs_f64()),
        report.failures().len(),
        new.id,
        seen_after.as_secs_f64(),
        moved.len(),
        before.len(),
        to_new,
        new.id,
        hits_on_new
    );
    assert!(
        report.failures().is_empty(),
        "{} of {} requests failed while a node joined:\n{}",
        report.failures().len(),
        report.requests(),
        report.describe_failures(20)
    );
    assert_eq!(
        to_new,
        moved.len(),
        "rendezvous hashing moves sites only to the new node: {moved:?}"
    );
    assert!(
        (12..=40).contains(&moved.len()),
        "about a quarter of 100 sites should move to the 4th node, {} did",
        moved.len()
    );
    assert_eq!(
        (spawns, cold_starts),
        (hits_on_new as f64, hits_on_new as f64),
        "{}'s spawns and cold-start histogram count should each equal its workers",
        new.id
    );
    assert!(
        hits_on_new >= moved.len(),
        "the load reached only {hits_on_new} of the {} moved sites on {}",
        moved.len(),
        new.id
    );
}

#[test]
fn a_drained_node_fails_no_request() {
    let c = Launched::start(LaunchOpts::default());
    warm_up(&c);
    let placed: BTreeMap<String, String> = c.placements().into_iter().collect();
    let victim = c.node("node-2");
    let its_sites: Vec<&String> = placed
        .iter()
        .filter(|(_, n)| **n == victim.id)
        .map(|(h, _)| h)
        .collect();

    let proxies: Vec<SocketAddr> = c.proxies().iter().map(|p| p.0).collect();
    let load = Load::start(&proxies, &c.hosts(), CLIENTS);
    std::thread::sleep(Duration::from_secs(1));
    let sent = Instant::now();
    c.signal_node(&victim.id, Signal::SIGTERM);
    let exited = wait_until(Duration::from_secs(45), || !pid_alive(victim.pid));
    let drain_took = sent.elapsed();
    assert!(exited, "{} did not exit within 45 s of SIGTERM", victim.id);
    wait_proxies_see_nodes(&c, 2);
    // The load walks every site again, the drained node's ones on their new nodes.
    std::thread::sleep(Duration::from_secs(3));
    let report = load.stop();

    assert!(
        !node_ids_in_etcd(&c).contains(&victim.id),
        "{} still registered after its drain",
        victim.id
    );
    let moved_ok = its_sites
        .iter()
        .filter(|h| {
            report
                .first_ok_after(h, report.offset(sent) + drain_took)
                .is_some()
        })
        .count();
    eprintln!(
        "[scenario 3: drain] {} requests through 2 proxies, {} failed; {} had {} sites, exited \
         {:.2}s after SIGTERM; {} of them answered from their new node afterwards",
        report.requests(),
        report.failures().len(),
        victim.id,
        its_sites.len(),
        drain_took.as_secs_f64(),
        moved_ok
    );
    assert!(
        report.failures().is_empty(),
        "{} of {} requests failed while {} drained:\n{}",
        report.failures().len(),
        report.requests(),
        victim.id,
        report.describe_failures(20)
    );
    assert_eq!(
        moved_ok,
        its_sites.len(),
        "some of the drained node's sites were not served after it left"
    );
}

/// The dashboards' panels an operator reads when a node dies.
const NODE_LOSS_PANELS: &[&str] = &["Live nodes", "Failovers/s", "Suspect nodes"];

#[test]
fn a_killed_node_s_sites_answer_again_within_the_lease_ttl() {
    let c = Launched::start(LaunchOpts::default());
    let ttl = Duration::from_secs(c.opts.lease_ttl_secs as u64);
    let admins: (Vec<SocketAddr>, Vec<SocketAddr>) = (
        c.proxies().iter().map(|p| p.1).collect(),
        c.nodes().iter().map(|n| n.admin).collect(),
    );
    let prom_dir = c.root().join("prometheus");
    std::fs::create_dir_all(&prom_dir).expect("mkdir prometheus");
    let prom = Prometheus::start(&prom_dir, &admins.0, &admins.1);
    warm_up(&c);
    let targets = admins.0.len() + admins.1.len();
    assert!(
        wait_until(Duration::from_secs(15), || prom.all_targets_up(targets)),
        "prometheus never scraped all {targets} targets:\n{}",
        prom.log()
    );
    let placed: BTreeMap<String, String> = c.placements().into_iter().collect();
    let victim = c.node("node-1");
    let its_sites: Vec<String> = placed
        .iter()
        .filter(|(_, n)| **n == victim.id)
        .map(|(h, _)| h.clone())
        .collect();

    let window_start = unix_now();
    let proxies: Vec<SocketAddr> = c.proxies().iter().map(|p| p.0).collect();
    let load = Load::start(&proxies, &c.hosts(), CLIENTS);
    // A few scrapes of the healthy cluster first.
    std::thread::sleep(Duration::from_secs(3));
    let killed = Instant::now();
    c.signal_node(&victim.id, Signal::SIGKILL);
    let gone = wait_until(ttl + Duration::from_secs(10), || {
        !node_ids_in_etcd(&c).contains(&victim.id)
    });
    let lease_gone_after = killed.elapsed();
    assert!(gone, "{}'s node key outlived its lease", victim.id);
    wait_proxies_see_nodes(&c, 2);
    std::thread::sleep(Duration::from_secs(3));
    let report = load.stop();
    // Two more scrapes after the load, so the last samples are in.
    std::thread::sleep(Duration::from_secs(2));
    let window_end = unix_now();

    let at_kill = report.offset(killed);
    let in_window: Vec<_> = report
        .failures()
        .into_iter()
        .filter(|o| o.at + o.took >= at_kill)
        .collect();
    // "Within the lease TTL plus one retry": each of the dead node's sites answered a request
    // sent no later than TTL + 1 s after the kill.
    let bound = ttl + Duration::from_secs(1);
    let mut recovery: Vec<(String, Option<Duration>)> = its_sites
        .iter()
        .map(|h| {
            let ok = report
                .first_ok_after(h, at_kill)
                .map(|o| o.at.saturating_sub(at_kill));
            (h.clone(), ok)
        })
        .collect();
    recovery.sort_by_key(|(_, d)| d.unwrap_or(Duration::MAX));
    let slowest = recovery.last().and_then(|(_, d)| *d);
    eprintln!(
        "[scenario 2: node loss] {} requests through 2 proxies; {} SIGKILLed with {} sites; \
         its key left etcd {:.2}s later (lease TTL {}s); failures after the kill: {} (of {} \
         requests sent after it); slowest of its sites answered again {:.2}s after the kill",
        report.requests(),
        victim.id,
        its_sites.len(),
        lease_gone_after.as_secs_f64(),
        ttl.as_secs(),
        in_window.len(),
        report.outcomes.iter().filter(|o| o.at >= at_kill).count(),
        slowest.map_or(f64::NAN, |d| d.as_secs_f64()),
    );
    if !in_window.is_empty() {
        eprintln!("{}", report.describe_failures(20));
    }
    let late: Vec<_> = recovery
        .iter()
        .filter(|(_, d)| d.is_none_or(|d| d > bound))
        .collect();
    assert!(
        late.is_empty(),
        "sites of the killed node not answering within {bound:?}: {late:?}"
    );

    // What the dashboards' node-loss panels show for this window, from the real scrapes.
    let mut shown: HashMap<&str, Vec<(String, Vec<f64>)>> = HashMap::new();
    for title in NODE_LOSS_PANELS {
        let queries = panel_queries(title);
        assert!(!queries.is_empty(), "no dashboard panel titled {title:?}");
        for q in queries {
            let q = concrete(&q, "5s");
            let v = prom
                .query_range(&q, window_start, window_end, 1.0)
                .unwrap_or_else(|e| panic!("panel {title:?} query {q}: {e}"));
            let series = series_values(&v);
            eprintln!("[scenario 2: panel {title:?}] {q}");
            for (labels, values) in &series {
                eprintln!("    {labels}: {}", summarize(values));
            }
            shown.entry(title).or_default().extend(series);
        }
    }
    let live = &shown["Live nodes"];
    assert!(
        live.iter()
            .any(|(_, v)| v.contains(&3.0) && v.last() == Some(&2.0)),
        "the live-node panel should go from 3 to 2: {live:?}"
    );
    let failovers = &shown["Failovers/s"];
    assert!(
        failovers.iter().any(|(_, v)| v.iter().any(|x| *x > 0.0)),
        "the failover panel should show the proxies trying the next node: {failovers:?}"
    );
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// (labels, values) of each series in a `query_range` answer.
fn series_values(v: &Value) -> Vec<(String, Vec<f64>)> {
    v["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let values = s["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p[1].as_str()?.parse::<f64>().ok())
                .collect();
            (s["metric"].to_string(), values)
        })
        .collect()
}

/// A series as "first .. min/max .. last (n samples)", and its changes in order.
fn summarize(values: &[f64]) -> String {
    let mut changes: Vec<String> = Vec::new();
    for v in values {
        let s = format!("{v:.3}");
        if changes.last() != Some(&s) {
            changes.push(s);
        }
    }
    if changes.len() > 12 {
        changes.drain(6..changes.len() - 6);
        changes.insert(6, "...".into());
    }
    format!("{} samples: {}", values.len(), changes.join(" -> "))
}

#[test]
fn the_launcher_starts_three_nodes_with_one_command_and_sigint_leaves_nothing() {
    let mut c = Launched::start(LaunchOpts {
        proxies: 1,
        sites: 2,
        own_run_dir: true,
        ..LaunchOpts::default()
    });
    let nodes = c.nodes();
    assert_eq!(nodes.len(), 3, "{:?}", c.state);
    let mut ids = node_ids_in_etcd(&c);
    ids.sort();
    assert_eq!(ids, ["node-1", "node-2", "node-3"]);
    let netns_list = command_stdout("ip", &["netns", "list"]);
    for n in &nodes {
        let ns = n
            .netns
            .as_deref()
            .expect("root: every agent in a namespace");
        assert!(netns_list.contains(ns), "{ns} not in `ip netns list`");
        let veth = n.veth.as_deref().expect("a veth per namespace");
        assert!(
            Command::new("ip")
                .args(["link", "show", "dev", veth])
                .output()
                .expect("ip link")
                .status
                .success(),
            "no veth {veth}"
        );
        // The agent's own address is inside its namespace, not on the host.
        assert!(
            command_stdout("ip", &["-n", ns, "-4", "addr"]).contains(&n.listen.ip().to_string()),
            "{} not inside {ns}",
            n.listen.ip()
        );
    }
    let bridge = c.state["bridge"].as_str().expect("bridge").to_string();
    let run_dir = c.run_dir();
    // A site answers: the cluster works, and its worker is one more process to see gone.
    let mut workers = Vec::new();
    for host in c.hosts() {
        let ok = wait_until(WARM_TIMEOUT, || {
            c.get(0, &host, "/").is_ok_and(|r| {
                r.status == 200 && {
                    workers.extend(worker_pid(&r.text()));
                    true
                }
            })
        });
        assert!(ok, "{host} never answered");
    }
    let mut pids = vec![c.launcher_pid(), c.etcd_pid()];
    pids.extend(c.proxy_pids());
    pids.extend(nodes.iter().map(|n| n.pid));
    pids.extend(&workers);
    assert!(pids.iter().all(|p| pid_alive(*p)), "{pids:?}");

    let status = c.stop_with(Signal::SIGINT);
    assert!(
        status.is_some_and(|s| s.success()),
        "launcher after SIGINT: {status:?}"
    );
    let left: Vec<u32> = pids.iter().copied().filter(|p| pid_exists(*p)).collect();
    assert!(left.is_empty(), "processes left after SIGINT: {left:?}");
    let netns_list = command_stdout("ip", &["netns", "list"]);
    let links = command_stdout("ip", &["-o", "link"]);
    for n in &nodes {
        let (ns, veth) = (n.netns.as_deref().unwrap(), n.veth.as_deref().unwrap());
        assert!(!netns_list.contains(ns), "namespace {ns} left behind");
        assert!(
            !links.contains(&format!(" {veth}@")),
            "veth {veth} left behind"
        );
        assert!(
            !std::path::Path::new("/run/netns").join(ns).exists(),
            "/run/netns/{ns} left behind"
        );
    }
    assert!(
        !links.contains(&format!(" {bridge}:")),
        "bridge {bridge} left behind"
    );
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    eprintln!(
        "[scenario 6: launcher] 3 nodes in namespaces {:?}; after SIGINT: no process of {} \
         pids, no namespace, veth, bridge or run dir left",
        nodes
            .iter()
            .map(|n| n.netns.clone().unwrap())
            .collect::<Vec<_>>(),
        pids.len()
    );
}

fn command_stdout(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `Max open files` (soft, hard) from `/proc/<pid>/limits`.
fn open_file_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/limits: {e}"));
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut f = line["Max open files".len()..].split_whitespace();
    (
        f.next().unwrap_or_default().to_string(),
        f.next().unwrap_or_default().to_string(),
    )
}

/// deploy/systemd gives the agent a large LimitNOFILE; its workers get `worker_nofile`
/// instead, whether forked from a zygote or started directly, and cannot raise it.
#[test]
fn workers_get_their_own_open_file_limit_apart_from_the_agent() {
    use roost_tests::cluster::PREFIX;
    use roost_tests::{ensure_user, Cluster, Options};
    let alice = ensure_user("roost-t-alice");
    let c = Cluster::start_with(Options {
        agent_config: Some("worker_nofile = 1536\n".into()),
    });
    let agent = open_file_limit(c.agent_pid());
    for (host, spawn) in [("zygote.example", "zygote"), ("direct.example", "direct")] {
        let dir = c.echo_site_dir(&alice, host);
        let record = serde_json::json!({
            "user": alice.name, "app": roost_tests::ECHO_ENTRY, "dir": dir, "spawn": spawn,
        });
        c.etcd
            .put(&format!("{PREFIX}/sites/{host}"), &record.to_string());
        let r = c
            .wait_for_status(host, 200, WARM_TIMEOUT)
            .unwrap_or_else(|last| panic!("{host} never 200: {last}\n{}", c.diagnostics()));
        let pid = r.json()["pid"].as_u64().expect("pid in the echo answer") as u32;
        let worker = open_file_limit(pid);
        eprintln!("[worker_nofile] agent {agent:?}, {spawn} worker {pid}: {worker:?}");
        assert_eq!(
            worker,
            ("1536".into(), "1536".into()),
            "{spawn} worker {pid}"
        );
    }
    assert_ne!(agent.1, "1536", "the agent's own limit must be its own");
}

/// The capabilities `CapabilityBoundingSet=` in deploy/systemd/roost-agent.service leaves.
fn agent_unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(
        roost_tests::bins::workspace_root().join("deploy/systemd/roost-agent.service"),
    )
    .expect("read deploy/systemd/roost-agent.service");
    unit.lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the agent unit sets CapabilityBoundingSet=")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

/// Bit numbers (linux/capability.h) of the capabilities the agent unit may name.
fn capability_bit(name: &str) -> u32 {
    match name {
        "chown" => 0,
        "dac_override" => 1,
        "dac_read_search" => 2,
        "fowner" => 3,
        "kill" => 5,
        "setgid" => 6,
        "setuid" => 7,
        "net_bind_service" => 10,
        "sys_ptrace" => 19,
        "sys_admin" => 21,
        "sys_nice" => 23,
        "sys_resource" => 24,
        other => panic!("capability_bit: add {other} to the table"),
    }
}

fn own_bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("read /proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .expect("CapBnd in /proc/self/status")
}

/// The agent unit's capability bounding set is enough: the agent, started as root with only
/// those capabilities (setpriv, as systemd would bound it), starts a zygote-forked and a
/// direct worker as the site's user, each in its site cgroup, and serves them.
#[test]
fn the_agent_serves_with_only_the_capabilities_its_unit_leaves_it() {
    use roost_tests::bins::{bin, AGENT};
    use roost_tests::edge::{Edge, ProxyOpts, PREFIX};
    use roost_tests::ensure_user;
    use roost_tests::ports::free_addr;
    use roost_tests::process::Proc;

    let caps = agent_unit_capabilities();
    let alice = ensure_user("roost-t-alice");
    let mut edge = Edge::new("caps");
    let (listen, admin) = (free_addr(), free_addr());
    let state_dir = edge.root().join("state-caps");
    let secret_file = edge.root().join("secret");
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set={bounding}"))
        .arg("--")
        .arg(bin(AGENT))
        .arg("--etcd")
        .arg(edge.etcd.url())
        .args(["--node-id", "caps"])
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--admin")
        .arg(admin.to_string())
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--secret-file")
        .arg(&secret_file)
        .env("RUST_LOG", "info");
    let mut agent = Proc::spawn(
        "agent (bounded)",
        cmd,
        &edge.root().join("agent-caps.log"),
        Signal::SIGTERM,
    );
    let registered = wait_until(Duration::from_secs(30), || {
        agent.exited().is_some() || !edge.etcd.keys(&format!("{PREFIX}/nodes/caps")).is_empty()
    });
    assert!(
        registered && agent.exited().is_none(),
        "bounded agent did not register ({:?}):\n{}",
        agent.exited(),
        agent.log()
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("status");
    let cap_bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|s| u64::from_str_radix(s.trim(), 16).expect("hex CapBnd"))
        .expect("CapBnd");
    // What the unit allows, within what this machine grants at all (a container may lack
    // some, e.g. CAP_SYS_RESOURCE).
    let own = own_bounding_set();
    let unit_mask = caps.iter().fold(0u64, |m, c| m | 1 << capability_bit(c));
    assert_eq!(
        cap_bnd,
        unit_mask & own,
        "the agent runs with {cap_bnd:#x}, not just {caps:?} ({unit_mask:#x}) within this \
         machine's {own:#x}"
    );
    edge.start_proxy(ProxyOpts::default());
    for (host, spawn) in [("zygote.caps", "zygote"), ("direct.caps", "direct")] {
        // A short idle timeout: the agent must also be able to stop the worker (a signal
        // to another uid).
        edge.put_echo_site(
            host,
            &alice,
            serde_json::json!({ "spawn": spawn, "idle_timeout": 2 }),
        );
        let r = edge.proxies[0]
            .wait_status(host, "/", 200, WARM_TIMEOUT)
            .unwrap_or_else(|last| panic!("{host} never 200: {last}\n{}", agent.log()));
        let v = r.json();
        assert_eq!(v["uid"].as_u64(), Some(alice.uid as u64), "{spawn}: {v}");
        let pid = v["pid"].as_u64().expect("pid") as u32;
        // The start ran at nice 10; the worker is back at 0, which needs CAP_SYS_NICE.
        assert_eq!(
            roost_tests::procfs::nice(pid),
            Some(0),
            "{spawn} worker {pid} kept the start's nice"
        );
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(
            cgroups.contains("/roost-caps-"),
            "{spawn} worker {pid} is not in a site cgroup of the bounded agent:\n{cgroups}\n{}",
            agent.log()
        );
        let stopped = wait_until(Duration::from_secs(15), || !pid_exists(pid));
        assert!(
            stopped && agent.exited().is_none(),
            "the bounded agent did not stop idle {spawn} worker {pid}:\n{}",
            agent.log()
        );
        eprintln!(
            "[capabilities] {spawn} worker {pid} ran as uid {} in its site cgroup and was \
             stopped when idle; agent CapBnd {cap_bnd:#x} ({})",
            alice.uid,
            caps.join(" ")
        );
    }
    agent.stop();
}

/// What deploy/systemd/roost-proxy.service gives the proxy is enough: no root, a uid of its
/// own, and CAP_NET_BIND_SERVICE as its only (ambient) capability, to listen on a port below
/// 1024 and proxy a site. (setpriv stands in for DynamicUser= and AmbientCapabilities=.)
#[test]
fn the_proxy_serves_a_low_port_as_an_unprivileged_user_with_only_cap_net_bind_service() {
    use roost_tests::bins::{bin, PROXY};
    use roost_tests::edge::Edge;
    use roost_tests::ensure_user;
    use roost_tests::ports::free_addr;
    use roost_tests::process::Proc;
    use std::os::unix::fs::PermissionsExt;

    let alice = ensure_user("roost-t-alice");
    let mut edge = Edge::new("proxy-caps");
    edge.start_agent("n1", "");
    let host = "lowport.example";
    edge.put_echo_site(host, &alice, serde_json::json!({}));
    // A free privileged port (below 1024).
    let port = (700..1000u16)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024");
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let admin = free_addr();
    // The unit hands the proxy a copy of the secret readable by its user only.
    let nobody = 65534u32;
    let secret = edge.root().join("proxy-secret");
    std::fs::write(&secret, &edge.secret).expect("write secret");
    nix::unistd::chown(&secret, Some(nobody.into()), Some(nobody.into())).expect("chown");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o400)).expect("chmod");

    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--bounding-set=-all,+net_bind_service",
        "--inh-caps=-all,+net_bind_service",
        "--ambient-caps=-all,+net_bind_service",
        "--no-new-privs",
        "--",
    ])
    .arg(bin(PROXY))
    .arg("--etcd")
    .arg(edge.etcd.url())
    .arg("--listen")
    .arg(listen.to_string())
    .arg("--admin")
    .arg(admin.to_string())
    .arg("--secret-file")
    .arg(&secret)
    .current_dir("/")
    .env("RUST_LOG", "info");
    let mut proxy = Proc::spawn(
        "proxy (unprivileged)",
        cmd,
        &edge.root().join("proxy-unprivileged.log"),
        Signal::SIGTERM,
    );
    let ready = wait_until(Duration::from_secs(30), || {
        proxy.exited().is_some()
            || get(admin, Some("localhost"), "/readyz", &[]).is_ok_and(|r| r.status == 200)
    });
    assert!(
        ready && proxy.exited().is_none(),
        "unprivileged proxy not ready ({:?}):\n{}",
        proxy.exited(),
        proxy.log()
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    // CAP_NET_BIND_SERVICE is bit 10: 0x400.
    assert_eq!(
        (field("Uid:"), field("CapEff:"), field("CapBnd:")),
        (
            "65534".into(),
            "0000000000000400".into(),
            "0000000000000400".into()
        ),
        "the proxy should run as uid 65534 with CAP_NET_BIND_SERVICE alone"
    );
    let mut last = String::new();
    let served = wait_until(WARM_TIMEOUT, || match get(listen, Some(host), "/", &[]) {
        Ok(r) if r.status == 200 => true,
        Ok(r) => {
            last = format!("{}: {}", r.status, r.text());
            false
        }
        Err(e) => {
            last = e.to_string();
            false
        }
    });
    assert!(served, "{host} via port {port}: {last}\n{}", proxy.log());
    eprintln!("[proxy capabilities] uid 65534, CapEff 0x400 (net_bind_service), served {host} on port {port}");
    proxy.stop();
}
