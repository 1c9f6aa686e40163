//! roost-framework-bench: first response of a Django and a Flask site (issue 14), cold from
//! the base zygote, cold from a framework zygote, and a fresh gunicorn, in one run.
//!
//! A real etcd, `roost-agent` (default framework settings) and `roost-proxy` from
//! `--bin-dir`; `--rounds` sites per framework and mode, Debian's python3-django and
//! python3-flask (`roost_tests::frameworks`: `django-admin startproject` with a CSRF view, a
//! Flask route). Before timing, a set of sites runs once each, so the agent learns the
//! framework and starts its zygote; each round then times, one TCP connection each, client
//! -> proxy -> agent -> new worker -> response:
//! - **base zygote**: a never-started site (no run yet, so it forks from the base zygote
//!   and imports the framework itself);
//! - **framework zygote**: a site of the learning set, its worker stopped (idle), so it
//!   forks from the framework zygote;
//! - **fresh gunicorn**: a site with `"spawn": "direct"` (gunicorn's arbiter and a worker
//!   exec'd by the agent, the app imported from scratch), never started.
//!
//! The three alternate in each round, so they share the machine's state. The run checks
//! that every framework-zygote sample was forked from it (the agent's fork counter).
//!
//! Run (as root): `bench/framework-cold-start.sh [--rounds N]`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use roost_tests::frameworks::{
    csrf_token, django_site, flask_site, is_flask_page, DJANGO_ENTRY, FLASK_ENTRY,
};
use roost_tests::{ensure_user, get, wait_until, TempRoot, User};
use serde_json::json;

mod node;
use node::{NodeOptions, PREFIX, USER};

/// Workers stop after a second idle; each framework-zygote sample waits for that.
const IDLE_SECS: u64 = 1;

#[derive(clap::Parser)]
#[command(
    name = "roost-framework-bench",
    about = "First response of Django and Flask sites: base zygote, framework zygote, fresh gunicorn"
)]
struct Flags {
    /// Samples per framework and mode.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Where roost-agent and roost-proxy are (default: this binary's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn die(msg: &str) -> ! {
    eprintln!("roost framework bench: {msg}");
    std::process::exit(2)
}

#[derive(Clone, Copy, PartialEq)]
enum Framework {
    Django,
    Flask,
}

impl Framework {
    fn name(self) -> &'static str {
        match self {
            Framework::Django => "django",
            Framework::Flask => "flask",
        }
    }

    fn site(self, base: &std::path::Path, user: &User, tag: &str) -> (PathBuf, &'static str) {
        match self {
            Framework::Django => (django_site(base, user, tag), DJANGO_ENTRY),
            Framework::Flask => (flask_site(base, user, tag), FLASK_ENTRY),
        }
    }

    fn served(self, body: &str) -> bool {
        match self {
            Framework::Django => csrf_token(body).is_some_and(|t| t.len() == 64),
            Framework::Flask => is_flask_page(body),
        }
    }
}

struct Bench {
    node: node::Node,
}

impl Bench {
    fn timed(&self, host: &str, fw: Framework) -> f64 {
        let t0 = Instant::now();
        let r = get(self.node.proxy, Some(host), "/", &[])
            .unwrap_or_else(|e| die(&format!("{host}: {e}")));
        let took = t0.elapsed().as_secs_f64() * 1000.0;
        let body = r.text();
        if r.status != 200 || !fw.served(&body) {
            die(&format!("{host}: {} {body}", r.status));
        }
        took
    }

    fn metric(&self, series: &str) -> f64 {
        let text = get(self.node.agent_admin, Some("localhost"), "/metrics", &[])
            .map(|r| r.text())
            .unwrap_or_default();
        roost_tests::edge::metric_value(&text, series).unwrap_or(0.0)
    }

    fn framework_zygotes(&self) -> String {
        get(self.node.agent_admin, Some("localhost"), "/metrics", &[])
            .map(|r| r.text())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("roost_agent_framework_zygote_"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Wait until no worker runs (every site idle-stopped).
    fn wait_all_stopped(&self) {
        let stopped = wait_until(Duration::from_secs(60), || {
            self.metric("roost_agent_workers{state=\"ready\"}") == 0.0
                && self.metric("roost_agent_workers{state=\"starting\"}") == 0.0
                && self.metric("roost_agent_workers{state=\"draining\"}") == 0.0
        });
        if !stopped {
            die("workers did not stop when idle");
        }
        // The stopped workers' processes finish exiting.
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    pct(v, 50.0)
}

fn row(label: &str, v: &mut [f64]) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "{label:<34} {:>4} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
        v.len(),
        pct(v, 50.0),
        pct(v, 90.0),
        v[0],
        v[v.len() - 1]
    )
}

fn main() {
    let flags = <Flags as clap::Parser>::parse();
    let rounds = flags.rounds.max(1);
    let bin_dir = flags.bin_dir.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.to_path_buf()))
            .unwrap_or_default()
    });
    let root = TempRoot::new("framework-bench");
    let user = ensure_user(USER);
    let sites_dir = root.subdir("sites");
    let node = node::start(
        root.path(),
        &bin_dir,
        &NodeOptions {
            agent_config: "stop_grace_secs = 2\nmax_workers = 1000\n".into(),
            agent_log_filter: "info".into(),
            proxy_log_filter: "warn".into(),
            proxy_args: vec![],
        },
    );
    let bench = Bench { node };
    println!(
        "roost framework cold-start benchmark: {rounds} rounds, binaries from {}, {} CPUs, load average {}",
        bin_dir.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').next().unwrap_or("?")
    );

    let frameworks = [Framework::Django, Framework::Flask];
    // Per framework: `rounds` learning sites (timed later from the framework zygote),
    // `rounds` never-started sites (base zygote), `rounds` direct sites (fresh gunicorn).
    for fw in frameworks {
        for (kind, spawn) in [
            ("learn", "zygote"),
            ("new", "zygote"),
            ("gunicorn", "direct"),
        ] {
            for i in 0..rounds {
                let host = format!("{kind}{i}.{}.bench", fw.name());
                let (dir, app) = fw.site(&sites_dir, &user, &host);
                let record = json!({"user": USER, "app": app, "dir": dir, "idle_timeout": IDLE_SECS, "spawn": spawn});
                bench
                    .node
                    .etcd
                    .put(&format!("{PREFIX}/sites/{host}"), &record.to_string());
            }
        }
    }
    // The learning runs: each learning site once, from the base zygote.
    for fw in frameworks {
        for i in 0..rounds {
            let host = format!("learn{i}.{}.bench", fw.name());
            let ok = wait_until(Duration::from_secs(60), || {
                get(bench.node.proxy, Some(&host), "/", &[]).is_ok_and(|r| r.status == 200)
            });
            if !ok {
                die(&format!(
                    "{host} never answered; logs in {}",
                    root.path().display()
                ));
            }
        }
    }
    let ready = wait_until(Duration::from_secs(120), || {
        bench.metric("roost_agent_framework_zygotes") >= 2.0
    });
    if !ready {
        die(&format!(
            "the agent did not start both framework zygotes; logs in {}",
            root.path().display()
        ));
    }
    println!("framework zygotes:\n{}", bench.framework_zygotes());
    bench.wait_all_stopped();

    let forks_before = bench.metric("roost_agent_zygote_forks_total{zygote=\"framework\"}");
    let mut results = Vec::new();
    for fw in frameworks {
        let (mut base, mut framework, mut gunicorn) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..rounds {
            framework.push(bench.timed(&format!("learn{i}.{}.bench", fw.name()), fw));
            base.push(bench.timed(&format!("new{i}.{}.bench", fw.name()), fw));
            gunicorn.push(bench.timed(&format!("gunicorn{i}.{}.bench", fw.name()), fw));
            bench.wait_all_stopped();
            print!(".");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
        results.push((fw, base, framework, gunicorn));
    }
    println!();
    let forked =
        bench.metric("roost_agent_zygote_forks_total{zygote=\"framework\"}") - forks_before;
    if forked < (rounds * frameworks.len()) as f64 {
        die(&format!(
            "only {forked} of {} framework-zygote samples forked from a framework zygote",
            rounds * frameworks.len()
        ));
    }

    println!("\nfirst response, client -> proxy -> agent -> new worker -> client (ms)");
    println!(
        "{:<34} {:>4} {:>8} {:>8} {:>8} {:>8}",
        "", "n", "p50", "p90", "min", "max"
    );
    for (fw, mut base, mut framework, mut gunicorn) in results {
        println!("{}", row(&format!("{}: base zygote", fw.name()), &mut base));
        println!(
            "{}",
            row(&format!("{}: framework zygote", fw.name()), &mut framework)
        );
        println!(
            "{}",
            row(&format!("{}: fresh gunicorn", fw.name()), &mut gunicorn)
        );
        let (b, f, g) = (
            median(&mut base),
            median(&mut framework),
            median(&mut gunicorn),
        );
        println!(
            "{:<34} framework zygote is {:.1}x faster than fresh gunicorn, {:.1}x than the base zygote",
            "",
            g / f,
            b / f
        );
    }
}
