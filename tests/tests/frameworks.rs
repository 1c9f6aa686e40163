//! Issue 14, must-shows 2 and 3: zero-config framework zygotes. Two Django sites
//! (`django-admin startproject`, a view rendering a CSRF token) and two Flask sites on a
//! default agent config: after their first starts the agent holds a framework zygote per
//! framework, later starts fork from it, killing it falls back to the base zygote without a
//! failed request, and the zygotes come back after an agent restart before any site
//! starts. Plus: a module with a side effect is left out and reported.
//! Real etcd, real binaries, real users, Debian's python3-django and python3-flask.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use roost_tests::cluster::PREFIX;
use roost_tests::frameworks::{self, DJANGO_ENTRY, FLASK_ENTRY};
use roost_tests::process::pid_exists;
use roost_tests::procfs::{agent_pid, comm, ppid, status_field, zygote_pids};
use roost_tests::{ensure_user, get, site_dir, wait_for, wait_until, Cluster, Options, User};
use serde_json::json;

const ALICE: &str = "roost-t-alice";
const BOB: &str = "roost-t-bob";
/// A cold start from the base zygote imports Django in the worker: allow for a loaded machine.
const FIRST_ANSWER: Duration = Duration::from_secs(30);
/// Probing a framework's modules and starting its zygote.
const FRAMEWORK_READY: Duration = Duration::from_secs(60);
const EXIT: Duration = Duration::from_secs(20);

/// The tests here change what the interpreter's package directories hold (the side-effect
/// package) and check a fingerprint of them: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    roost_tests::one_at_a_time(&ONE_AT_A_TIME)
}

/// `django-admin startproject` with a CSRF view (`roost_tests::frameworks`).
fn django_site(c: &Cluster, user: &User, tag: &str) -> PathBuf {
    frameworks::django_site(c.root(), user, tag)
}

fn flask_site(c: &Cluster, user: &User, tag: &str) -> PathBuf {
    frameworks::flask_site(c.root(), user, tag)
}

fn put_site(c: &Cluster, host: &str, user: &User, dir: &Path, app: &str) {
    // A short idle timeout: each test step waits for the worker to stop, then starts it cold.
    let record = json!({"user": user.name, "app": app, "dir": dir, "idle_timeout": 1});
    c.etcd
        .put(&format!("{PREFIX}/sites/{host}"), &record.to_string());
}

/// A served page: its body, and the worker's pid and parent pid it states.
struct Page {
    body: String,
    pid: u32,
    ppid: u32,
}

fn number_after(body: &str, key: &str) -> u32 {
    body.split(key)
        .nth(1)
        .and_then(|rest| {
            rest.split(|ch: char| !ch.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {key} in {body:?}"))
}

/// A request that must succeed: 200 at the first try (a failed request fails the test).
fn fetch(c: &Cluster, host: &str) -> Page {
    let r = c
        .get(host, "/")
        .unwrap_or_else(|e| panic!("GET {host}: {e}\n{}", c.diagnostics()));
    assert_eq!(r.status, 200, "{host}: {}\n{}", r.text(), c.diagnostics());
    let body = r.text();
    Page {
        pid: number_after(&body, "pid="),
        ppid: number_after(&body, "ppid="),
        body,
    }
}

/// The first answer of a just-registered site (waits for etcd to reach the agent).
fn first_fetch(c: &Cluster, host: &str) -> Page {
    c.wait_for_status(host, 200, FIRST_ANSWER)
        .unwrap_or_else(|last| {
            panic!(
                "{host} never answered 200; last: {last}\n{}",
                c.diagnostics()
            )
        });
    fetch(c, host)
}

fn assert_django_page(p: &Page) {
    let token =
        frameworks::csrf_token(&p.body).unwrap_or_else(|| panic!("no CSRF token in {:?}", p.body));
    assert_eq!(token.len(), 64, "a CSRF token: {token:?}");
    assert!(
        token.chars().all(|ch| ch.is_ascii_alphanumeric()),
        "{token:?}"
    );
}

fn assert_flask_page(p: &Page) {
    assert!(frameworks::is_flask_page(&p.body), "{:?}", p.body);
}

/// The framework zygotes the agent reports: (its packages, pid), from its metrics.
fn framework_zygotes(c: &Cluster) -> Vec<(String, u32)> {
    let text = get(c.agent_admin, Some("localhost"), "/metrics", &[])
        .map(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("roost_agent_framework_zygote_pid{framework=\"")?;
            let (name, value) = rest.split_once("\"} ")?;
            Some((name.to_string(), value.trim().parse::<f64>().ok()? as u32))
        })
        .collect()
}

/// The pid of the framework zygote whose packages include `package`, once there is one
/// other than `not`.
fn framework_pid(c: &Cluster, package: &str, not: Option<u32>) -> u32 {
    wait_for(FRAMEWORK_READY, || {
        framework_zygotes(c)
            .into_iter()
            .find(|(name, pid)| name.split(',').any(|p| p == package) && Some(*pid) != not)
            .map(|(_, pid)| pid)
    })
    .unwrap_or_else(|| {
        panic!(
            "no framework zygote for {package} (other than {not:?}); the agent reports {:?}\n{}",
            framework_zygotes(c),
            c.diagnostics()
        )
    })
}

fn base_zygote(c: &Cluster) -> u32 {
    let agent = agent_pid(c).expect("the agent's process");
    wait_for(EXIT, || zygote_pids(agent).first().copied())
        .unwrap_or_else(|| panic!("no base zygote\n{}", c.diagnostics()))
}

/// A framework zygote is a root process forked from the base zygote, with one thread.
fn assert_framework_process(pid: u32, base: u32) {
    assert_eq!(comm(pid), "roost-zygote-fw", "process {pid}");
    assert_eq!(
        ppid(pid),
        Some(base),
        "framework zygote {pid} is the base zygote's child"
    );
    assert_eq!(
        status_field(pid, "Uid")
            .as_deref()
            .map(|u| u.split_whitespace().next()),
        Some(Some("0"))
    );
    assert_eq!(
        status_field(pid, "Threads").as_deref(),
        Some("1"),
        "zygote {pid}"
    );
}

/// `promtool check metrics` passes on the agent's metrics with framework series in them.
fn promtool_accepts(c: &Cluster) {
    use std::io::Write;
    let text = get(c.agent_admin, Some("localhost"), "/metrics", &[])
        .expect("scrape the agent")
        .text();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (deploy/install-deps.sh installs the prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_gone(c: &Cluster, pid: u32) {
    assert!(
        wait_until(EXIT, || !pid_exists(pid)),
        "worker {pid} did not stop when idle\n{}",
        c.diagnostics()
    );
}

#[test]
fn django_and_flask_sites_fork_from_framework_zygotes_learnt_with_no_configuration() {
    let _serial = serial();
    let mut c = Cluster::start();
    let (alice, bob) = (ensure_user(ALICE), ensure_user(BOB));
    let sites = [
        (
            "d1.example",
            django_site(&c, &alice, "d1"),
            DJANGO_ENTRY,
            "django",
        ),
        (
            "d2.example",
            django_site(&c, &bob, "d2"),
            DJANGO_ENTRY,
            "django",
        ),
        (
            "f1.example",
            flask_site(&c, &alice, "f1"),
            FLASK_ENTRY,
            "flask",
        ),
        (
            "f2.example",
            flask_site(&c, &bob, "f2"),
            FLASK_ENTRY,
            "flask",
        ),
    ];
    let users = [&alice, &bob, &alice, &bob];
    for ((host, dir, app, _), user) in sites.iter().zip(users) {
        put_site(&c, host, user, dir, app);
    }
    let base = base_zygote(&c);
    assert!(framework_zygotes(&c).is_empty(), "nothing learnt yet");

    // 1. First cold starts, from the base zygote; each worker reports what it imported.
    let mut last_pid = Vec::new();
    for (host, _, _, framework) in &sites {
        let page = first_fetch(&c, host);
        assert_eq!(
            page.ppid, base,
            "{host}'s first start forks from the base zygote"
        );
        match *framework {
            "django" => assert_django_page(&page),
            _ => assert_flask_page(&page),
        }
        last_pid.push(page.pid);
    }

    // 2. The agent holds a framework zygote per framework.
    let django = framework_pid(&c, "django", None);
    let flask = framework_pid(&c, "flask", None);
    assert_ne!(django, flask);
    let reported = framework_zygotes(&c);
    assert_eq!(reported.len(), 2, "{reported:?}");
    let flask_set = reported
        .iter()
        .find(|(_, p)| *p == flask)
        .unwrap()
        .0
        .clone();
    for package in ["flask", "werkzeug", "jinja2"] {
        assert!(flask_set.split(',').any(|p| p == package), "{flask_set}");
    }
    for pid in [django, flask] {
        assert_framework_process(pid, base);
    }
    assert_eq!(c.agent_metric("roost_agent_framework_zygotes"), 2.0);
    for (name, _) in &reported {
        let modules = c.agent_metric(&format!(
            "roost_agent_framework_zygote_modules{{framework=\"{name}\"}}"
        ));
        assert!(modules >= 20.0, "{name} preloads {modules} modules");
        let rss = c.agent_metric(&format!(
            "roost_agent_framework_zygote_rss_bytes{{framework=\"{name}\"}}"
        ));
        assert!(rss > 10e6, "{name}: RSS {rss}");
    }

    promtool_accepts(&c);

    // 3. The next cold starts fork from them and are served correctly.
    for (i, (host, _, _, framework)) in sites.iter().enumerate() {
        wait_gone(&c, last_pid[i]);
        let page = fetch(&c, host);
        let (want, check): (u32, fn(&Page)) = match *framework {
            "django" => (django, assert_django_page),
            _ => (flask, assert_flask_page),
        };
        assert_eq!(page.ppid, want, "{host} forks from its framework zygote");
        check(&page);
        last_pid[i] = page.pid;
    }
    assert!(c.agent_metric("roost_agent_zygote_forks_total{zygote=\"framework\"}") >= 4.0);

    // 4. Killing the Django zygote: the next start falls back to the base zygote, served
    // at the first request; the zygote is started again later.
    wait_gone(&c, last_pid[0]);
    kill(Pid::from_raw(django as i32), Signal::SIGKILL).unwrap();
    // Gone, not only killed: while its memory is torn down (milliseconds for a Django
    // zygote) the agent can't tell, and its spare, which the agent holds, can still take
    // a start (it serves it as well; agent/src/launch/spare.rs).
    wait_gone(&c, django);
    let page = fetch(&c, "d1.example");
    assert_django_page(&page);
    assert_eq!(page.ppid, base, "fallback to the base zygote");
    last_pid[0] = page.pid;
    let django_again = framework_pid(&c, "django", Some(django));
    assert_framework_process(django_again, base);
    wait_gone(&c, last_pid[0]);
    let page = fetch(&c, "d1.example");
    assert_eq!(
        page.ppid, django_again,
        "back on the restarted framework zygote"
    );
    assert_django_page(&page);
    last_pid[0] = page.pid;

    // 5. Across an agent restart the framework zygotes come back before any site starts,
    // and a site's next start forks from its framework zygote at once.
    for pid in &last_pid {
        wait_gone(&c, *pid);
    }
    c.signal_agent(Signal::SIGTERM);
    assert!(c.wait_agent_exit(EXIT).is_some(), "agent did not stop");
    assert!(
        wait_until(EXIT, || !pid_exists(django_again) && !pid_exists(flask)),
        "framework zygotes outlived their agent"
    );
    c.restart_agent();
    let base = base_zygote(&c);
    let django = framework_pid(&c, "django", None);
    let flask = framework_pid(&c, "flask", None);
    for pid in [django, flask] {
        assert_framework_process(pid, base);
    }
    assert_eq!(
        c.agent_metric_sum("roost_agent_worker_spawns_total"),
        0.0,
        "no site was started"
    );
    let page = fetch(&c, "f2.example");
    assert_eq!(
        page.ppid, flask,
        "f2 forks from the Flask zygote after the restart"
    );
    assert_flask_page(&page);
    let page = fetch(&c, "d2.example");
    assert_eq!(
        page.ppid, django,
        "d2 forks from the Django zygote after the restart"
    );
    assert_django_page(&page);
}

/// A package in the interpreter's own (root-owned) dist-packages, removed on drop.
struct SystemPackage(PathBuf);

impl SystemPackage {
    fn install(name: &str, modules: &[(&str, &str)]) -> Self {
        let dir = Path::new("/usr/lib/python3/dist-packages").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (module, source) in modules {
            std::fs::write(dir.join(format!("{module}.py")), source).unwrap();
        }
        SystemPackage(dir)
    }
}

impl Drop for SystemPackage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_module_with_a_side_effect_is_left_out_of_the_framework_zygote_and_reported() {
    let _serial = serial();
    let pkg = format!("roost_fx_{}", std::process::id());
    let _installed = SystemPackage::install(
        &pkg,
        &[
            ("__init__", ""),
            ("clean", "def helper():\n    return 1\n"),
            (
                "threads",
                "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n",
            ),
            ("sock", "import socket\nKEPT = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"),
            ("settings", "import os\nNAME = os.environ.get('ROOST_FX_SETTINGS_MODULE', 'none')\n"),
            ("logfile", "LOG = open('/dev/null', 'w')\n"),
            ("forbidden", "X = 1\n"),
        ],
    );
    let c = Cluster::start_with(Options {
        agent_config: Some(format!("frameworks_forbid = [\"{pkg}.forbidden\"]\n")),
    });
    let alice = ensure_user(ALICE);
    let app = format!(
        "import os\nimport {pkg}.clean, {pkg}.threads, {pkg}.sock, {pkg}.settings, {pkg}.logfile, {pkg}.forbidden\n\n\
         def application(environ, start_response):\n    \
         start_response('200 OK', [('Content-Type', 'text/plain')])\n    \
         return [('fx pid=%d ppid=%d' % (os.getpid(), os.getppid())).encode()]\n"
    );
    for tag in ["fx1", "fx2"] {
        let dir = site_dir(c.root(), &alice, tag, &app);
        put_site(
            &c,
            &format!("{tag}.example"),
            &alice,
            &dir,
            "app:application",
        );
    }
    let base = base_zygote(&c);
    for tag in ["fx1", "fx2"] {
        let page = first_fetch(&c, &format!("{tag}.example"));
        assert_eq!(page.ppid, base);
    }
    let fw = framework_pid(&c, &pkg, None);
    assert_framework_process(fw, base);
    for reason in [
        "starts_thread",
        "opens_socket",
        "reads_settings",
        "opens_fd",
        "forbidden",
    ] {
        let n = c.agent_metric(&format!(
            "roost_agent_framework_modules_left_out_total{{reason=\"{reason}\"}}"
        ));
        assert!(n >= 1.0, "left out for {reason}: {n}\n{}", c.diagnostics());
    }
    let log = c.agent_log();
    for (module, reason) in [
        ("threads", "starts_thread"),
        ("sock", "opens_socket"),
        ("settings", "reads_settings"),
        ("logfile", "opens_fd"),
        ("forbidden", "forbidden"),
    ] {
        let name = format!("{pkg}.{module}");
        assert!(
            log.lines()
                .any(|l| l.contains("left out") && l.contains(&name) && l.contains(reason)),
            "no log line for {name} ({reason})\n{}",
            c.diagnostics()
        );
    }
    // The zygote holds what passed, and nothing the others would have brought.
    assert_eq!(
        c.agent_metric(&format!(
            "roost_agent_framework_zygote_modules{{framework=\"{pkg}\"}}"
        )),
        2.0,
        "{pkg} and {pkg}.clean"
    );
    let fds = std::fs::read_dir(format!("/proc/{fw}/fd")).unwrap().count();
    assert!(fds <= 8, "the framework zygote holds {fds} fds");
}
