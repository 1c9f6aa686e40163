//! Issue 11: the agent's per-site actors under real etcd, real binaries and real workers.
//! A broken deploy never takes a site down; cold starts don't stall warm sites; SIGTERM
//! never answers 404; `max_workers` holds under a stampede of cold starts.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use roost_tests::process::proc_state;
use roost_tests::{ensure_user, get, site_dir, wait_until, Cluster, Options, User, MISBEHAVE_APP};

const USER: &str = "roost-t-sup";

/// The tests of this file run one at a time: one of them measures latency as a ratio within
/// its own run, and the others' load (50 cold starts, a client loop) would be in it.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    roost_tests::one_at_a_time(&SERIAL)
}

fn misbehaving_site(c: &Cluster, host: &str, user: &User, extra: &[&str]) {
    let dir = site_dir(&c.root().join("sites"), user, host, MISBEHAVE_APP);
    c.add_site(host, user, &dir, extra);
}

fn site_row(c: &Cluster, host: &str) -> serde_json::Value {
    c.agent_sites()
        .as_array()
        .and_then(|sites| sites.iter().find(|s| s["host"] == host).cloned())
        .unwrap_or(serde_json::Value::Null)
}

/// Clients that GET one site in a loop until stopped; every answer is kept.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    results: Arc<Mutex<Vec<Outcome>>>,
}

#[derive(Clone, Debug)]
struct Outcome {
    status: u16,
    /// `env.ROOST_TEST_VERSION` of a 200 answer, or the body of any other.
    detail: String,
    took: Duration,
    at: Instant,
}

impl ClientLoop {
    fn start(addr: SocketAddr, host: &str, clients: usize, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, results, host) = (stop.clone(), results.clone(), host.to_string());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let outcome = match get(addr, Some(&host), "/", &[]) {
                            Ok(r) if r.status == 200 => Outcome {
                                status: 200,
                                detail: r.json()["env"]["ROOST_TEST_VERSION"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_string(),
                                took: t.elapsed(),
                                at: t,
                            },
                            Ok(r) => Outcome {
                                status: r.status,
                                detail: r.text(),
                                took: t.elapsed(),
                                at: t,
                            },
                            Err(e) => Outcome {
                                status: 0,
                                detail: format!("io: {e}"),
                                took: t.elapsed(),
                                at: t,
                            },
                        };
                        results.lock().unwrap().push(outcome);
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        Self {
            stop,
            threads,
            results,
        }
    }

    fn seen(&self) -> Vec<Outcome> {
        self.results.lock().unwrap().clone()
    }

    fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.results)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_default()
    }
}

fn failures(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes.iter().filter(|o| o.status != 200).collect()
}

fn versions(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut v = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.status == 200) {
        *v.entry(o.detail.clone()).or_default() += 1;
    }
    v
}

fn p99(mut took: Vec<Duration>) -> Duration {
    assert!(!took.is_empty(), "no samples");
    took.sort();
    took[(took.len() * 99 / 100).min(took.len() - 1)]
}

#[test]
fn a_spec_that_fails_to_import_leaves_the_previous_worker_serving() {
    let _serial = serial();
    let c = Cluster::start();
    let user = ensure_user(USER);
    misbehaving_site(
        &c,
        "deploy.example",
        &user,
        &["--env", "ROOST_TEST_VERSION=1"],
    );
    c.wait_for_status("deploy.example", 200, Duration::from_secs(10))
        .unwrap();
    let old = site_row(&c, "deploy.example")["pid"].as_u64().unwrap();

    // A deploy whose app cannot be imported, under load.
    let clients = ClientLoop::start(c.proxy_addr, "deploy.example", 4, Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(300));
    c.roostctl_ok(&[
        "site",
        "set",
        "deploy.example",
        "--app",
        "roost_no_such_module:application",
    ]);
    let noted = wait_until(Duration::from_secs(15), || {
        site_row(&c, "deploy.example")["note"]
            .as_str()
            .is_some_and(|n| n.starts_with("serving the previous spec: "))
    });
    std::thread::sleep(Duration::from_millis(500));
    let during = clients.stop();
    assert!(noted, "no note in /sites\n{}", c.diagnostics());
    assert!(
        failures(&during).is_empty(),
        "failed: {:?}\n{}",
        failures(&during),
        c.diagnostics()
    );
    assert!(during.len() > 50, "only {} requests", during.len());
    assert_eq!(
        versions(&during).keys().collect::<Vec<_>>(),
        vec!["1"],
        "only the old worker served"
    );
    let row = site_row(&c, "deploy.example");
    assert_eq!(row["pid"].as_u64(), Some(old), "{row}");
    assert_eq!(row["state"], "ready", "{row}");
    assert!(
        row["note"]
            .as_str()
            .unwrap()
            .contains("roost_no_such_module"),
        "the reason names the failed import: {row}"
    );
    assert_eq!(
        c.agent_metric("roost_agent_spec_change_failures_total"),
        1.0
    );
    assert!(c
        .agent_log()
        .contains("the changed spec's worker failed; the previous spec's worker keeps serving"));

    // A valid spec then takes over, again without a failed request.
    let clients = ClientLoop::start(c.proxy_addr, "deploy.example", 4, Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(300));
    c.roostctl_ok(&[
        "site",
        "set",
        "deploy.example",
        "--app",
        roost_tests::ECHO_ENTRY,
        "--env",
        "ROOST_TEST_VERSION=2",
    ]);
    let switched = wait_until(Duration::from_secs(15), || {
        clients
            .seen()
            .iter()
            .any(|o| o.status == 200 && o.detail == "2")
    });
    std::thread::sleep(Duration::from_millis(500));
    let after = clients.stop();
    assert!(switched, "the valid spec never served\n{}", c.diagnostics());
    assert!(
        failures(&after).is_empty(),
        "failed: {:?}\n{}",
        failures(&after),
        c.diagnostics()
    );
    let row = site_row(&c, "deploy.example");
    assert!(row.get("note").is_none(), "{row}");
    assert_ne!(row["pid"].as_u64(), Some(old));
    assert!(
        wait_until(Duration::from_secs(15), || proc_state(old as u32)
            .is_none_or(|s| s == 'Z')),
        "the old worker drained and exited"
    );
}

/// How long each cold site's import takes in `cold_starts_of_many_sites_do_not_stall_a_warm_one`.
const IMPORT_SLEEP_SECS: f64 = 0.8;

#[test]
fn cold_starts_of_many_sites_do_not_stall_a_warm_one() {
    let _serial = serial();
    /// Concurrent cold starts in one burst (issue 11, must-show 2).
    const COLD: usize = 30;
    /// Bursts, each after a spell of the warm site alone. One burst's p99 is its 5th
    /// slowest request of about 500, so the ratio is taken over all three, pooled.
    const ROUNDS: usize = 3;
    const ALONE: Duration = Duration::from_secs(2);
    let c = Cluster::start();
    let user = ensure_user(USER);
    misbehaving_site(&c, "warm.example", &user, &[]);
    let import_sleep = format!("ROOST_TEST_IMPORT_SLEEP={IMPORT_SLEEP_SECS}");
    for i in 0..COLD * ROUNDS {
        misbehaving_site(
            &c,
            &format!("cold{i}.example"),
            &user,
            &["--env", &import_sleep],
        );
    }
    c.wait_for_status("warm.example", 200, Duration::from_secs(10))
        .unwrap();

    let warm = ClientLoop::start(c.proxy_addr, "warm.example", 3, Duration::from_millis(2));
    std::thread::sleep(Duration::from_secs(1)); // the loop's own start is in neither window
    let addr = c.proxy_addr;
    // Per round: (start of the warm site alone, start of the burst, end of the burst).
    let mut windows = Vec::new();
    for round in 0..ROUNDS {
        let alone_from = Instant::now();
        std::thread::sleep(ALONE);
        let burst_from = Instant::now();
        let cold: Vec<_> = (round * COLD..(round + 1) * COLD)
            .map(|i| {
                std::thread::spawn(move || {
                    get(addr, Some(&format!("cold{i}.example")), "/", &[]).map(|r| r.status)
                })
            })
            .collect();
        let cold: Vec<_> = cold.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(
            cold.iter().all(|s| matches!(s, Ok(200))),
            "cold starts of round {round}: {cold:?}\n{}",
            c.diagnostics()
        );
        windows.push((alone_from, burst_from, Instant::now()));
    }
    let outcomes = warm.stop();
    assert!(failures(&outcomes).is_empty(), "{:?}", failures(&outcomes));

    let took_within = |from: Instant, until: Instant| -> Vec<Duration> {
        outcomes
            .iter()
            .filter(|o| o.at >= from && o.at < until)
            .map(|o| o.took)
            .collect()
    };
    let (mut alone, mut during) = (Vec::new(), Vec::new());
    for (round, &(alone_from, burst_from, burst_until)) in windows.iter().enumerate() {
        let (a, d) = (
            took_within(alone_from, burst_from),
            took_within(burst_from, burst_until),
        );
        eprintln!(
            "round {round}: warm p99 alone {:?} ({} requests), during {COLD} cold starts {:?} \
             ({} requests); the starts took {:?}",
            p99(a.clone()),
            a.len(),
            p99(d.clone()),
            d.len(),
            burst_until - burst_from
        );
        alone.extend(a);
        during.extend(d);
    }
    let (n_alone, n_during) = (alone.len(), during.len());
    let (p_alone, p_during) = (p99(alone), p99(during));
    let ratio = p_during.as_secs_f64() / p_alone.as_secs_f64();
    eprintln!(
        "warm site p99 over {ROUNDS} rounds: alone {p_alone:?} ({n_alone} requests), during \
         {COLD} cold starts {p_during:?} ({n_during} requests), ratio {ratio:.2}"
    );
    assert!(
        n_during >= 20 * ROUNDS,
        "too few requests during the cold starts"
    );
    // What keeps it low on a 2-core machine: the work of a start runs below normal CPU
    // priority (launcher threads, the zygote and its session's autogroup; agent/src/launch/
    // priority.rs), booting workers at the lowest CPU weight until they answer, and warm
    // requests claim their worker through the site's gate, never waiting behind an actor.
    assert!(
        ratio <= 3.0,
        "warm p99 during cold starts {p_during:?} is {ratio:.2}x its p99 alone {p_alone:?}"
    );
}

#[test]
fn sigterm_under_load_never_answers_404_and_finishes_what_is_in_flight() {
    let _serial = serial();
    let mut c = Cluster::start();
    let user = ensure_user(USER);
    misbehaving_site(&c, "busy.example", &user, &[]);
    c.wait_for_status("busy.example", 200, Duration::from_secs(10))
        .unwrap();
    let clients = ClientLoop::start(c.proxy_addr, "busy.example", 4, Duration::from_millis(5));
    let addr = c.proxy_addr;
    let in_flight = std::thread::spawn(move || {
        get(addr, Some("busy.example"), "/sleep?secs=2", &[]).map(|r| r.status)
    });
    std::thread::sleep(Duration::from_millis(500));
    c.signal_agent(Signal::SIGTERM);
    let exited = c.wait_agent_exit(Duration::from_secs(40));
    std::thread::sleep(Duration::from_millis(200));
    let outcomes = clients.stop();
    assert!(
        exited.is_some_and(|s| s.success()),
        "agent exit: {exited:?}"
    );
    assert_eq!(
        in_flight.join().unwrap().unwrap(),
        200,
        "the request in flight finished"
    );
    let not_found: Vec<_> = outcomes.iter().filter(|o| o.status == 404).collect();
    eprintln!(
        "SIGTERM under load: {} answers, by status {:?}",
        outcomes.len(),
        outcomes.iter().fold(BTreeMap::new(), |mut m, o| {
            *m.entry(o.status).or_insert(0) += 1;
            m
        })
    );
    assert!(not_found.is_empty(), "404s: {not_found:?}");
    assert!(
        outcomes.iter().filter(|o| o.status == 200).count() > 20,
        "the load reached the agent"
    );
}

/// Process groups of live (not zombie) processes whose working directory is under `dir`:
/// one per worker, however many processes it has.
fn worker_groups(dir: &std::path::Path) -> HashSet<i32> {
    let mut groups = HashSet::new();
    for pid in roost_tests::procfs::all_pids() {
        let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else {
            continue;
        };
        if !cwd.starts_with(dir) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split(' ').collect();
        if fields.first() == Some(&"Z") {
            continue;
        }
        if let Some(pgrp) = fields.get(2).and_then(|p| p.parse().ok()) {
            groups.insert(pgrp);
        }
    }
    groups
}

#[test]
fn max_workers_holds_under_fifty_concurrent_cold_starts() {
    let _serial = serial();
    const SITES: usize = 50;
    const MAX: usize = 5;
    let c = Cluster::start_with(Options {
        agent_config: Some(format!("max_workers = {MAX}\n")),
    });
    let user = ensure_user(USER);
    for i in 0..SITES {
        misbehaving_site(&c, &format!("m{i}.example"), &user, &[]);
    }
    let sites_dir = c.root().join("sites");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, dir) = (stop.clone(), sites_dir.clone());
        std::thread::spawn(move || {
            let (mut peak, mut samples) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(worker_groups(&dir).len());
                samples += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (peak, samples)
        })
    };
    let addr = c.proxy_addr;
    let until = Instant::now() + Duration::from_secs(4);
    let clients: Vec<_> = (0..SITES)
        .map(|i| {
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                while Instant::now() < until {
                    let r = get(addr, Some(&format!("m{i}.example")), "/", &[]);
                    statuses.push(r.map(|r| (r.status, r.text())).map_err(|e| e.to_string()));
                    std::thread::sleep(Duration::from_millis(50));
                }
                statuses
            })
        })
        .collect();
    let statuses: Vec<_> = clients
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    stop.store(true, Ordering::Relaxed);
    let (peak, samples) = sampler.join().unwrap();
    let ok = statuses
        .iter()
        .filter(|s| matches!(s, Ok((200, _))))
        .count();
    let refused: Vec<_> = statuses
        .iter()
        .filter(|s| !matches!(s, Ok((200, _))))
        .collect();
    eprintln!(
        "{SITES} sites, max_workers {MAX}: {ok} answered, {} refused; peak {peak} live workers in {samples} samples; {} starts",
        refused.len(),
        c.agent_metric_sum("roost_agent_worker_spawns_total")
    );
    assert!(samples > 100, "the sampler ran");
    assert!(peak <= MAX, "{peak} workers alive at once, limit {MAX}");
    assert!(peak >= 2, "the test never filled the node (peak {peak})");
    assert!(ok >= MAX, "only {ok} requests answered");
    // What is refused is refused precisely: 503 for capacity, never a hang or a reset.
    for r in &refused {
        match r {
            Ok((503, text)) if text.contains("capacity") || text.contains("starting") => {}
            other => panic!("unexpected answer {other:?}\n{}", c.diagnostics()),
        }
    }
}
