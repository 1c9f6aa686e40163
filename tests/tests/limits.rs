//! Issue 10, "Per-site CPU and I/O limits" (must-show 5) and `max_concurrent_requests`
//! (CloudLinux's EP). Real etcd, agent, proxy and workers; CPU use is read from the site's
//! own cgroup accounting (v1 `cpuacct.usage`, v2 `cpu.stat` `usage_usec`), as an operator
//! would check it. These run on the (v1) host here and on cgroup v2 in deploy/vm-test.sh.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roost_tests::{ensure_user, get, site_dir, Cluster};

const COLD_START: Duration = Duration::from_secs(60);

/// A WSGI app: `/spin?procs=N&secs=S` forks N processes that busy-loop for S seconds (in the
/// worker's cgroup, like any process a site starts) and answers at once; `/sleep?secs=S`
/// answers after S seconds; `/` answers the worker's pid.
const SPIN_APP: &str = r#"
import json, os, threading, time
from urllib.parse import parse_qs


def _spin(secs):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        pass


def application(environ, start_response):
    q = parse_qs(environ.get("QUERY_STRING", ""))
    path = environ.get("PATH_INFO", "/")
    out = {"pid": os.getpid()}
    if path == "/spin":
        secs = float(q.get("secs", ["5"])[0])
        pids = []
        for _ in range(int(q.get("procs", ["8"])[0])):
            pid = os.fork()
            if pid == 0:
                _spin(secs)
                os._exit(0)
            pids.append(pid)
        threading.Thread(target=lambda: [os.waitpid(p, 0) for p in pids], daemon=True).start()
        out["spinners"] = pids
    elif path == "/sleep":
        time.sleep(float(q.get("secs", ["1"])[0]))
    body = json.dumps(out).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
"#;

fn spin_site(c: &Cluster, host: &str, user: &roost_tests::User, extra: &[&str]) {
    let dir = site_dir(&c.root().join("sites"), user, host, SPIN_APP);
    c.add_site(host, user, &dir, extra);
}

/// Where a controller's v1 hierarchy is mounted (`/sys/fs/cgroup/cpu,cpuacct`), or v2's root.
fn mount_of(controller: Option<&str>) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (dir, fstype, opts) = (*f.get(1)?, *f.get(2)?, *f.get(3)?);
        let hit = match controller {
            Some(c) => fstype == "cgroup" && opts.split(',').any(|o| o == c),
            None => fstype == "cgroup2",
        };
        hit.then(|| dir.to_string())
    })
}

/// The cgroup directory of `pid` for `controller` (v1), else its v2 group.
fn cgroup_dir(pid: u64, controller: &str) -> String {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("worker's cgroup");
    let v1 = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    });
    match (v1, mount_of(Some(controller))) {
        (Some(path), Some(mount)) => format!("{mount}{path}"),
        _ => {
            let path = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .expect("a v2 group");
            format!("{}{path}", mount_of(None).expect("cgroup2 mount"))
        }
    }
}

/// CPU time used by the group of `pid`, in microseconds, from the kernel's own accounting.
fn cpu_usage_usec(pid: u64) -> u64 {
    let acct = cgroup_dir(pid, "cpuacct");
    if let Ok(ns) = std::fs::read_to_string(format!("{acct}/cpuacct.usage")) {
        return ns.trim().parse::<u64>().expect("cpuacct.usage") / 1000;
    }
    let stat = std::fs::read_to_string(format!("{acct}/cpu.stat")).expect("cpu.stat");
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .expect("usage_usec in cpu.stat")
}

/// The group's CPU cap as the kernel holds it: (quota, period) in microseconds.
fn cpu_cap(pid: u64) -> (String, String) {
    let cpu = cgroup_dir(pid, "cpu");
    match std::fs::read_to_string(format!("{cpu}/cpu.cfs_quota_us")) {
        Ok(quota) => (
            quota.trim().to_string(),
            std::fs::read_to_string(format!("{cpu}/cpu.cfs_period_us"))
                .unwrap()
                .trim()
                .to_string(),
        ),
        Err(_) => {
            let max = std::fs::read_to_string(format!("{cpu}/cpu.max")).expect("cpu.max");
            let (q, p) = max
                .trim()
                .split_once(' ')
                .expect("cpu.max is `quota period`");
            (q.to_string(), p.to_string())
        }
    }
}

/// The group's CPU weight as the kernel holds it: v1 `cpu.shares`, v2 `cpu.weight`.
fn cpu_weight(pid: u64) -> String {
    let cpu = cgroup_dir(pid, "cpu");
    std::fs::read_to_string(format!("{cpu}/cpu.shares"))
        .or_else(|_| std::fs::read_to_string(format!("{cpu}/cpu.weight")))
        .expect("cpu.shares or cpu.weight")
        .trim()
        .to_string()
}

#[test]
fn a_site_capped_at_half_a_core_spinning_8_processes_uses_about_half_a_core() {
    let c = Cluster::start();
    let (carol, dave) = (ensure_user("roost-l-carol"), ensure_user("roost-l-dave"));
    spin_site(&c, "spin.example", &carol, &["--cpu-limit", "0.5"]);
    spin_site(&c, "calm.example", &dave, &[]);
    let worker = c
        .wait_for_status("spin.example", 200, COLD_START)
        .unwrap_or_else(|last| panic!("spin.example never 200: {last}\n{}", c.diagnostics()))
        .json()["pid"]
        .as_u64()
        .unwrap();
    c.wait_for_status("calm.example", 200, COLD_START)
        .unwrap_or_else(|last| panic!("calm.example never 200: {last}\n{}", c.diagnostics()));
    assert!(
        cgroup_dir(worker, "cpu").ends_with("/spin.example"),
        "the worker is not in the site's cpu group: {}",
        cgroup_dir(worker, "cpu")
    );
    assert_eq!(
        cpu_cap(worker),
        ("50000".to_string(), "100000".to_string()),
        "the kernel's cap for 0.5 core"
    );
    // It booted at the lowest weight; once it answered it has every site's equal weight
    // (the agent's default, 100: v1 shares 1024).
    let raised = roost_tests::wait_until(Duration::from_secs(5), || {
        matches!(cpu_weight(worker).as_str(), "1024" | "100")
    });
    assert!(raised, "the site's CPU weight is {}", cpu_weight(worker));
    // The neighbour has no cap.
    let calm = c.get("calm.example", "/").unwrap().json()["pid"]
        .as_u64()
        .unwrap();
    assert!(matches!(cpu_cap(calm).0.as_str(), "-1" | "max"));

    // The neighbour is asked the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let hammer = {
        let (stop, ok, bad, addr) = (stop.clone(), ok.clone(), bad.clone(), c.proxy_addr);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match get(addr, Some("calm.example"), "/", &[]) {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let spin = c.get("spin.example", "/spin?procs=8&secs=8").unwrap();
    assert_eq!(spin.status, 200, "{}", spin.text());
    assert_eq!(spin.json()["spinners"].as_array().map(Vec::len), Some(8));
    // Let the spinners get going, then measure over 4 s.
    std::thread::sleep(Duration::from_millis(1000));
    let (u0, t0) = (cpu_usage_usec(worker), Instant::now());
    std::thread::sleep(Duration::from_secs(4));
    let (u1, t1) = (cpu_usage_usec(worker), Instant::now());
    stop.store(true, Ordering::Relaxed);
    hammer.join().unwrap();

    let cores = (u1 - u0) as f64 / (t1 - t0).as_micros() as f64;
    println!(
        "spin.example (cpu_limit 0.5, 8 spinning processes): {cores:.3} cores over {:?}; \
         neighbour: {} ok, {} failed",
        t1 - t0,
        ok.load(Ordering::Relaxed),
        bad.load(Ordering::Relaxed)
    );
    assert!(
        cores <= 0.65,
        "the site used {cores:.3} cores, over its 0.5 limit\n{}",
        c.diagnostics()
    );
    // It did spin: the measurement is of a site that wants far more than it gets.
    assert!(
        cores >= 0.15,
        "the site used only {cores:.3} cores: did the spinners run?"
    );
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "the neighbour failed while the capped site spun"
    );
    assert!(
        ok.load(Ordering::Relaxed) >= 5,
        "the neighbour was barely asked"
    );
}

#[test]
fn requests_past_max_concurrent_requests_get_503_with_retry_after_and_are_counted() {
    let c = Cluster::start();
    let erin = ensure_user("roost-l-erin");
    spin_site(
        &c,
        "ep.example",
        &erin,
        &["--max-concurrent-requests", "2", "--threads", "4"],
    );
    c.wait_for_status("ep.example", 200, COLD_START)
        .unwrap_or_else(|last| panic!("ep.example never 200: {last}\n{}", c.diagnostics()));
    let series = "roost_agent_rejected_total{reason=\"too_many_requests\"}";
    let before = c.agent_metric(series);

    // Three at once, each taking 2 s: two are served, the third is refused at once.
    let started = Instant::now();
    let answers: Vec<_> = (0..3)
        .map(|_| {
            let addr = c.proxy_addr;
            std::thread::spawn(move || {
                let r = get(addr, Some("ep.example"), "/sleep?secs=2", &[]).expect("request");
                (r, started.elapsed())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let served = answers.iter().filter(|(r, _)| r.status == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(r, _)| r.status == 503).collect();
    assert_eq!(
        (served, refused.len()),
        (2, 1),
        "statuses: {:?}\n{}",
        answers.iter().map(|(r, _)| r.status).collect::<Vec<_>>(),
        c.diagnostics()
    );
    let (r, after) = refused[0];
    assert!(
        r.header("retry-after").is_some(),
        "no Retry-After on the 503: {:?}",
        r.headers
    );
    assert!(
        r.text().contains("limit of concurrent requests"),
        "the 503 does not say why: {}",
        r.text()
    );
    assert!(
        *after < Duration::from_millis(1500),
        "the refusal waited for a worker ({after:?})"
    );
    assert_eq!(c.agent_metric(series), before + 1.0);

    // Room again once they finished.
    let r = c.get("ep.example", "/").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}
