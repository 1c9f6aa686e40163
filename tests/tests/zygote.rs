//! Issue 4, "What it must show": workers forked from a preloaded zygote are exactly their
//! site's user and hold nothing of the agent's; virtualenvs, `command` sites and the direct
//! opt-out work; a zygote's death spares running sites; an agent's death ends its workers.
//! Real etcd, real binaries, real users, real Python.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use roost_tests::cluster::PREFIX;
use roost_tests::process::{pid_alive, pid_exists};
use roost_tests::procfs::{
    agent_pid, cmdline, environ, fds, inode_of, nice, ppid, status_field, status_ids, thread_nices,
    unix_sockets, zygote_pids,
};
use roost_tests::{ensure_user, site_dir, wait_for, wait_until, Cluster, Response, User};
use serde_json::{json, Value};

const ALICE: &str = "roost-t-alice";
const BOB: &str = "roost-t-bob";
/// Deadline for a new site to answer (includes etcd propagation and a zygote's start).
const FIRST_ANSWER: Duration = Duration::from_secs(15);
/// Deadline for a process to go away once it should.
const EXIT: Duration = Duration::from_secs(20);

/// The variables a worker's environment may hold (`worker_env`), besides the site's own.
const WORKER_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "PYTHONUNBUFFERED",
    "ROOST_SITE",
    "LISTEN_FDS",
    "LISTEN_PID",
    "VIRTUAL_ENV",
];

fn put_site(c: &Cluster, host: &str, record: Value) {
    c.etcd
        .put(&format!("{PREFIX}/sites/{host}"), &record.to_string());
}

fn echo_record(user: &User, dir: &Path) -> Value {
    json!({"user": user.name, "app": "app:application", "dir": dir, "idle_timeout": 600})
}

fn first_answer(c: &Cluster, host: &str) -> Response {
    c.wait_for_status(host, 200, FIRST_ANSWER)
        .unwrap_or_else(|last| {
            panic!(
                "{host} never answered 200; last: {last}\n{}",
                c.diagnostics()
            )
        })
}

/// The session id of `pid` (field 6 of its stat).
fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].split(' ').nth(3)?.parse().ok()
}

fn report_pid(v: &Value) -> u32 {
    v["pid"].as_u64().expect("pid in the echo report") as u32
}

/// The agent's pid and its one live zygote (waiting for it to be up).
fn agent_and_zygote(c: &Cluster) -> (u32, u32) {
    let agent =
        agent_pid(c).unwrap_or_else(|| panic!("agent process not found\n{}", c.diagnostics()));
    let zygote = wait_for(EXIT, || zygote_pids(agent).first().copied()).unwrap_or_else(|| {
        panic!(
            "no roost-zygote child of agent {agent}\n{}",
            c.diagnostics()
        )
    });
    (agent, zygote)
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v.dedup();
    v
}

/// The groups `id -G` gives the user (what the worker must have, root's group aside).
fn user_groups(user: &User) -> Vec<u32> {
    let out = Command::new("id")
        .arg("-G")
        .arg(&user.name)
        .output()
        .expect("run id -G");
    let groups = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .filter(|g| *g != 0)
        .collect();
    sorted(groups)
}

#[test]
fn a_forked_worker_is_exactly_its_site_user_and_holds_nothing_of_the_agent() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    let host = "forked.example";
    let dir = c.echo_site_dir(&alice, host);
    let mut record = echo_record(&alice, &dir);
    record["env"] = json!({"SITE_MARK": "m1"});
    put_site(&c, host, record);
    let v = first_answer(&c, host).json();
    let pid = report_pid(&v);
    let (agent, zygote) = agent_and_zygote(&c);
    assert_eq!(
        ppid(pid),
        Some(zygote),
        "worker {pid} was not forked by the zygote {zygote}\n{}",
        c.diagnostics()
    );

    // The zygote runs the script the agent installed from its own binary, root's alone.
    let script = c.state_dir.join("zygote/roost_zygote.py");
    let meta = std::fs::metadata(&script).expect("the zygote's script in the state dir");
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (0, 0o644),
        "{}",
        script.display()
    );
    assert!(
        cmdline(zygote).iter().any(|a| Path::new(a) == script),
        "{:?}",
        cmdline(zygote)
    );

    // Exactly the site's ids, groups and flags.
    assert_eq!(
        status_ids(pid, "Uid"),
        vec![alice.uid; 4],
        "real, effective, saved, fs uid"
    );
    assert_eq!(
        status_ids(pid, "Gid"),
        vec![alice.gid; 4],
        "real, effective, saved, fs gid"
    );
    assert_eq!(
        sorted(status_ids(pid, "Groups")),
        user_groups(&alice),
        "supplementary groups"
    );
    assert_eq!(status_field(pid, "NoNewPrivs").as_deref(), Some("1"));
    assert_eq!(status_field(pid, "Umask").as_deref(), Some("0027"));
    assert_eq!(
        status_field(pid, "CapEff").as_deref(),
        Some("0000000000000000")
    );
    assert_eq!(v["cwd"], dir.to_str().unwrap());
    // Its own session: the agent stops the worker's whole tree as -pid.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    assert_eq!(
        fields[3],
        pid.to_string(),
        "the worker leads its session: {stat}"
    );
    // The work of a start yields to serving processes (issue 11): the zygote, the agent's
    // launcher threads and the one that makes sockets and cgroups ahead run at nice 10, the
    // agent's other threads and the worker (which could not undo it after dropping root) at 0.
    assert_eq!(nice(zygote), Some(10), "the zygote's nice");
    assert_eq!(nice(pid), Some(0), "the worker's nice");
    let threads = thread_nices(agent);
    assert!(
        threads.iter().all(|(name, n)| *n
            == if name.starts_with("roost-launch") || name == "roost-ready" {
                10
            } else {
                0
            })
            && threads
                .iter()
                .any(|(name, _)| name.starts_with("roost-launch")),
        "the agent's threads and their nice values: {threads:?}"
    );

    // fds: 0 /dev/null, 1-2 a pipe to the agent, which writes the site's log, 3 the site's
    // listening socket, 4 the lifeline (the pipe the zygote got from the agent); beyond
    // those only what the server opened itself after the drop: its one epoll instance and
    // connections accepted on 3. (Until its first response is out, fd 5 is also the channel
    // it got its spec on, for the report of the modules it imported (issue 14): it closes
    // that at the first quiet moment after its first response.)
    let sock_path = c.site_state_dir(host).join("sock");
    // Where the kernel says fd 3 was bound (/proc/net/unix does not follow renames, as of a
    // promoted `sock.next`); connections accepted on it show the same.
    let bound = fds(pid)
        .get(&3)
        .and_then(|t| inode_of(t))
        .and_then(|i| unix_sockets().get(&i).cloned())
        .and_then(|s| s.path);
    let on_site_socket = |target: &String| {
        let socks = unix_sockets();
        inode_of(target)
            .and_then(|i| socks.get(&i))
            .is_some_and(|s| s.state == 3 && s.path.is_some() && s.path == bound)
    };
    assert!(
        wait_until(EXIT, || fds(pid)
            .get(&5)
            .is_none_or(|t| t == "anon_inode:[eventpoll]" || on_site_socket(t))),
        "the worker kept its spec channel after its first response: {:?}",
        fds(pid)
    );
    let held = fds(pid);
    assert_eq!(
        held.get(&0).map(String::as_str),
        Some("/dev/null"),
        "{held:?}"
    );
    let output = held.get(&1).cloned().unwrap_or_default();
    assert!(output.starts_with("pipe:"), "fd 1: {held:?}");
    assert_eq!(held.get(&2), Some(&output), "fd 2 is fd 1's pipe: {held:?}");
    assert!(
        fds(agent).values().any(|t| *t == output),
        "the agent holds the other end of the worker's output pipe"
    );
    let socks = unix_sockets();
    let listen = held
        .get(&3)
        .and_then(|t| inode_of(t))
        .and_then(|i| socks.get(&i))
        .cloned();
    assert_eq!(
        listen.as_ref().map(|s| s.state),
        Some(1),
        "fd 3 must be a listening socket: {held:?}"
    );
    // ... and the one the site's socket path leads to: a request there reaches this worker.
    let mut direct = UnixStream::connect(&sock_path).expect("connect to the site's socket");
    write!(
        direct,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    direct.read_to_string(&mut answer).unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert_eq!(
        serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["pid"].as_u64()),
        Some(pid as u64),
        "fd 3 must be the site's socket: {answer}"
    );
    let zygote_lifeline = fds(zygote).get(&5).cloned();
    assert!(
        held.get(&4).is_some_and(|t| t.starts_with("pipe:")),
        "fd 4 must be the lifeline: {held:?}"
    );
    assert_eq!(
        held.get(&4),
        zygote_lifeline.as_ref(),
        "fd 4 is the agent's lifeline pipe"
    );
    let epolls = held
        .values()
        .filter(|t| *t == "anon_inode:[eventpoll]")
        .count();
    assert!(epolls <= 1, "more than the server's own epoll fd: {held:?}");
    for (fd, target) in held
        .iter()
        .filter(|(fd, t)| **fd > 4 && *t != "anon_inode:[eventpoll]")
    {
        let accepted = inode_of(target)
            .and_then(|i| socks.get(&i))
            .is_some_and(|s| s.state == 3 && s.path.is_some() && s.path == bound);
        assert!(accepted, "fd {fd} ({target}) is neither stdio, the socket, the lifeline nor a connection on it: {held:?}");
    }

    // No variable of the agent's environment: not in the exec-time block, not in Python's.
    let agent_env = environ(agent);
    assert!(
        agent_env.contains_key("RUST_LOG"),
        "the harness gives the agent RUST_LOG"
    );
    let os_environ: BTreeSet<String> = v["os_environ"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for name in &os_environ {
        assert!(
            WORKER_ENV.contains(&name.as_str()) || name == "SITE_MARK",
            "worker environment has {name}, which Roost does not set: {os_environ:?}"
        );
    }
    assert_eq!(v["os_environ"]["SITE_MARK"], "m1");
    assert_eq!(v["os_environ"]["LISTEN_PID"], pid.to_string());
    assert_eq!(v["os_environ"]["ROOST_SITE"], host);
    for name in environ(pid).keys() {
        assert!(
            !agent_env.contains_key(name) || WORKER_ENV.contains(&name.as_str()),
            "exec-time environment of the worker holds the agent's {name}"
        );
    }

    // The site's cgroup (issue 3), where the node has them.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let kind = c
        .agent_log()
        .lines()
        .find(|l| l.contains("per-site limits"))
        .unwrap_or_default()
        .to_string();
    let controller = if kind.contains("V1") {
        Some(":memory:")
    } else if kind.contains("V2") {
        Some("0::")
    } else {
        None
    };
    if let Some(controller) = controller {
        let line = cgroup
            .lines()
            .find(|l| l.contains(controller))
            .unwrap_or_default();
        assert!(
            line.ends_with(&format!("/{host}")),
            "worker {pid} is not in the site's cgroup ({kind}):\n{cgroup}"
        );
    }
    c.assert_running();
}

#[test]
fn a_site_with_two_workers_gets_two_forked_processes_that_stop_together() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    let host = "two.example";
    let mut record = echo_record(&alice, &c.echo_site_dir(&alice, host));
    record["workers"] = json!(2);
    put_site(&c, host, record);
    let answered = report_pid(&first_answer(&c, host).json());
    let (_, zygote) = agent_and_zygote(&c);
    // The leader is the zygote's child; the second process is the leader's.
    let leader = if ppid(answered) == Some(zygote) {
        answered
    } else {
        ppid(answered).unwrap()
    };
    assert_eq!(
        ppid(leader),
        Some(zygote),
        "the site's leader was not forked by the zygote"
    );
    let others = roost_tests::procfs::children(leader);
    assert_eq!(
        others.len(),
        1,
        "workers=2: one more process under the leader: {others:?}"
    );
    let other = others[0];
    assert_eq!(status_ids(other, "Uid"), vec![alice.uid; 4]);
    assert_eq!(status_field(other, "NoNewPrivs").as_deref(), Some("1"));
    assert_eq!(
        fds(other).get(&3),
        fds(leader).get(&3),
        "both serve the site's socket"
    );
    c.etcd.etcdctl(&["del", &format!("{PREFIX}/sites/{host}")]);
    for pid in [leader, other] {
        assert!(
            wait_until(EXIT, || !pid_exists(pid)),
            "worker process {pid} outlived its removed site\n{}",
            c.diagnostics()
        );
    }
    c.assert_running();
}

#[test]
fn a_virtualenv_site_imports_a_package_that_only_its_virtualenv_has() {
    let c = Cluster::start();
    let bob = ensure_user(BOB);
    let host = "venv.example";
    let app = "import roost_venv_only\n\ndef application(environ, start_response):\n    body = roost_venv_only.MARK.encode()\n    start_response('200 OK', [('Content-Length', str(len(body)))])\n    return [body]\n";
    let dir = site_dir(&c.root().join("sites"), &bob, host, app);
    let venv = dir.join("venv");
    let out = Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .output()
        .expect("python3 -m venv");
    assert!(
        out.status.success(),
        "venv: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = Command::new("/usr/bin/python3")
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .expect("python3 version");
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let pkg = venv.join(format!("lib/python{version}/site-packages/roost_venv_only"));
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::write(pkg.join("__init__.py"), "MARK = 'only-in-the-venv'\n").unwrap();
    let system = Command::new("/usr/bin/python3")
        .args(["-c", "import roost_venv_only"])
        .output()
        .unwrap();
    assert!(
        !system.status.success(),
        "the package must not exist outside the virtualenv"
    );

    let mut record =
        json!({"user": bob.name, "app": "app:application", "dir": dir, "idle_timeout": 600});
    record["virtualenv"] = json!(venv);
    put_site(&c, host, record);
    let resp = first_answer(&c, host);
    assert_eq!(resp.text(), "only-in-the-venv");
    // Forked from the system interpreter's zygote (the virtualenv's python is a link to it).
    let (_, zygote) = agent_and_zygote(&c);
    let worker = c.agent_log();
    let pid = worker
        .lines()
        .rev()
        .find(|l| l.contains("worker started") && l.contains(host))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no 'worker started' line for {host}\n{}", c.diagnostics()));
    assert_eq!(
        ppid(pid),
        Some(zygote),
        "the virtualenv site's worker was not forked by the zygote"
    );
    c.assert_running();
}

/// A `command` site's program: serves HTTP on the socket passed as fd 3 (LISTEN_FDS).
const COMMAND_SERVER: &str = r#"
import os, socket
assert os.environ["LISTEN_FDS"] == "1", os.environ
assert int(os.environ["LISTEN_PID"]) == os.getpid()
s = socket.socket(fileno=3)
while True:
    conn, _ = s.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    body = ("command site pid %d uid %d" % (os.getpid(), os.getuid())).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    conn.close()
"#;

#[test]
fn a_command_site_and_a_direct_site_answer_without_the_zygote() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    let host = "command.example";
    let dir = site_dir(&c.root().join("sites"), &alice, host, COMMAND_SERVER);
    put_site(
        &c,
        host,
        json!({"user": alice.name, "command": ["/usr/bin/python3", "app.py"], "dir": dir}),
    );
    let resp = first_answer(&c, host);
    let text = resp.text();
    assert!(text.starts_with("command site pid "), "{text}");
    assert!(text.ends_with(&format!("uid {}", alice.uid)), "{text}");
    let (agent, _) = agent_and_zygote(&c);
    let pid: u32 = text.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(
        ppid(pid),
        Some(agent),
        "a command site is the agent's own child"
    );

    let direct = "direct.example";
    let mut record = echo_record(&alice, &c.echo_site_dir(&alice, direct));
    record["spawn"] = json!("direct");
    put_site(&c, direct, record);
    let v = first_answer(&c, direct).json();
    // gunicorn's arbiter is the agent's child; the worker that answered is its child.
    let arbiter = ppid(report_pid(&v)).unwrap();
    assert_eq!(
        ppid(arbiter),
        Some(agent),
        "an opted-out site runs a fresh gunicorn under the agent"
    );
    // Forked by a launcher thread at nice 10, it is back to 0 before it drops root.
    assert_eq!(nice(arbiter), Some(0), "a direct worker's nice");
    assert!(
        cmdline(arbiter).iter().any(|a| a == "gunicorn"),
        "{:?}",
        cmdline(arbiter)
    );
    c.assert_running();
}

#[test]
fn killing_the_zygote_spares_running_workers_and_the_next_cold_start_works() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    let first = "before.example";
    put_site(
        &c,
        first,
        echo_record(&alice, &c.echo_site_dir(&alice, first)),
    );
    let pid = report_pid(&first_answer(&c, first).json());
    let (agent, zygote) = agent_and_zygote(&c);
    assert_eq!(ppid(pid), Some(zygote));

    kill(Pid::from_raw(zygote as i32), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(EXIT, || !pid_alive(zygote)),
        "zygote {zygote} survived SIGKILL"
    );
    // The running worker does not notice: same process, still answering.
    for _ in 0..5 {
        let v = c
            .get(first, "/")
            .expect("request after the zygote died")
            .json();
        assert_eq!(
            report_pid(&v),
            pid,
            "the worker was replaced after its zygote died"
        );
    }
    assert!(pid_alive(pid));
    // A new zygote comes up, and the next cold start is forked from it.
    let new_zygote = wait_for(EXIT, || {
        zygote_pids(agent).into_iter().find(|z| *z != zygote)
    })
    .unwrap_or_else(|| {
        panic!(
            "no new zygote after the first was killed\n{}",
            c.diagnostics()
        )
    });
    let second = "after.example";
    put_site(
        &c,
        second,
        echo_record(&alice, &c.echo_site_dir(&alice, second)),
    );
    let pid2 = report_pid(&first_answer(&c, second).json());
    assert_eq!(
        ppid(pid2),
        Some(new_zygote),
        "the next cold start was not forked by the new zygote"
    );
    // The orphaned worker still stops cleanly when its site goes (the agent watches its pidfd).
    c.etcd.etcdctl(&["del", &format!("{PREFIX}/sites/{first}")]);
    assert!(
        wait_until(EXIT, || !pid_exists(pid)),
        "orphaned worker {pid} did not stop when its site was removed\n{}",
        c.diagnostics()
    );
    assert!(
        wait_until(EXIT, || c.agent_log().lines().any(|l| l
            .contains("worker stopped")
            && l.contains(&format!("pid={pid}")))),
        "the agent never saw worker {pid} exit\n{}",
        c.diagnostics()
    );
    c.assert_running();
}

#[test]
fn workers_exit_when_the_agent_is_sigkilled() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    let host = "orphan.example";
    put_site(
        &c,
        host,
        echo_record(&alice, &c.echo_site_dir(&alice, host)),
    );
    let pid = report_pid(&first_answer(&c, host).json());
    let (agent, zygote) = agent_and_zygote(&c);
    assert_eq!(ppid(pid), Some(zygote));
    kill(Pid::from_raw(agent as i32), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(EXIT, || !pid_alive(pid)),
        "worker {pid} outlived the SIGKILLed agent\n{}",
        c.diagnostics()
    );
    assert!(
        wait_until(EXIT, || !pid_alive(zygote)),
        "zygote {zygote} outlived the SIGKILLed agent"
    );
    // What the worker says on its way out ("the agent is gone") is not in its log any more:
    // its output goes through a pipe whose reader was the SIGKILLed agent.
}

#[test]
fn the_cold_start_benchmark_runs() {
    let bench = roost_tests::bins::target_dir()
        .join("debug")
        .join("roost-bench");
    if !bench.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args([
                "build",
                "-p",
                "roost-bench",
                "-p",
                "roost-agent",
                "-p",
                "roost-proxy",
            ])
            .current_dir(roost_tests::bins::workspace_root())
            .status()
            .expect("cargo build -p roost-bench");
        assert!(st.success(), "building roost-bench failed");
    }
    let bin_dir = roost_tests::bins::target_dir().join("debug");
    let out = Command::new(&bench)
        .args(["--sites", "3", "--bin-dir"])
        .arg(&bin_dir)
        .output()
        .expect("run roost-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "roost-bench failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in ["zygote", "direct", "p50", "p99", "PSS"] {
        assert!(
            stdout.contains(needle),
            "no {needle:?} in the benchmark's report:\n{stdout}"
        );
    }
}

/// A spare (issue 14) walks the request path while it waits (`roost_worker.prewarm`) and must
/// come out of that as it went in: root's, one thread (a worker joins its cgroups through the
/// `tasks` file, which moves only the calling thread), and no fd beyond what it inherited,
/// so nothing of the walk reaches the site that gets it.
#[test]
fn a_spare_waits_as_one_unspecialised_thread_with_nothing_left_of_its_prewarm() {
    let c = Cluster::start();
    let (_agent, zygote) = agent_and_zygote(&c);
    let spare = wait_for(EXIT, || {
        roost_tests::procfs::children(zygote)
            .into_iter()
            .find(|p| roost_tests::procfs::comm(*p) == "roost-spare")
    })
    .unwrap_or_else(|| panic!("no spare under zygote {zygote}\n{}", c.diagnostics()));
    // The walk is done once the spare sleeps in its wait for a channel.
    assert!(
        wait_until(EXIT, || status_field(spare, "State")
            .is_some_and(|s| s.starts_with('S'))),
        "spare {spare} never went to sleep"
    );
    assert_eq!(status_field(spare, "Threads").as_deref(), Some("1"));
    assert_eq!(
        status_ids(spare, "Uid"),
        vec![0; 4],
        "a spare is still root's"
    );
    // What every worker does first it did while it waited (`_prepare_ahead`): its own
    // session, and the nice a worker runs at (the zygote's is 10).
    assert_eq!(
        session_of(spare),
        Some(spare),
        "a spare leads its own session"
    );
    assert_eq!(nice(spare), Some(0), "a spare waits at a worker's nice");
    // Every fd is one the zygote holds too (stdio, the lifeline, ...), but for the spare's own
    // socket to the zygote: a socket left from the walk would be a second one.
    let held = fds(spare);
    let zygote_targets: BTreeSet<String> = fds(zygote).into_values().collect();
    let own: Vec<(&u32, &String)> = held
        .iter()
        .filter(|(_, t)| !zygote_targets.contains(*t))
        .collect();
    assert!(
        own.len() == 1 && own[0].1.starts_with("socket:"),
        "a spare holds only the zygote's fds and its socket to the zygote: {held:?}"
    );
    assert_eq!(held.get(&5), fds(zygote).get(&5), "fd 5 is the lifeline");

    // The zygote gave the agent its end of the spare's socket (a copy, the same socket):
    // the only socket the agent and the zygote share. A worker's fork request then goes to
    // the spare without waking the zygote, and the spare becomes the site's worker.
    let (agent, _) = agent_and_zygote(&c);
    let sockets = |pid: u32| -> BTreeSet<String> {
        fds(pid)
            .into_values()
            .filter(|t| t.starts_with("socket:"))
            .collect()
    };
    assert!(
        wait_until(EXIT, || sockets(agent).intersection(&sockets(zygote)).count() == 1),
        "the agent holds no copy of the zygote's end of spare {spare}'s socket: agent {:?}, zygote {:?}",
        sockets(agent),
        sockets(zygote)
    );
    let alice = ensure_user(ALICE);
    let host = "spare.example";
    put_site(
        &c,
        host,
        echo_record(&alice, &c.echo_site_dir(&alice, host)),
    );
    let worker = report_pid(&first_answer(&c, host).json());
    assert_eq!(worker, spare, "the waiting spare became the site's worker");
    c.assert_running();
}

/// A worker loads its site's top-level module straight from the site's directory
/// (roost_zygote.py, `_import_from_site_dir`) only where `import` would find that file
/// first: a package of the same name beside it is what `import` takes, and so does the
/// worker.
#[test]
fn a_package_beside_a_module_of_the_same_name_is_what_the_worker_imports() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    // A plain module: loaded from its file.
    let plain = "module.example";
    put_site(
        &c,
        plain,
        echo_record(&alice, &c.echo_site_dir(&alice, plain)),
    );
    let v = first_answer(&c, plain).json();
    assert_eq!(v["uid"].as_u64(), Some(alice.uid as u64), "{v}");
    // `app.py`, which fails if imported, beside the package `app`, which serves.
    let shadowed = "package.example";
    let dir = site_dir(
        &c.root().join("sites"),
        &alice,
        shadowed,
        "raise RuntimeError('app.py was imported instead of the package app')\n",
    );
    let package = dir.join("app");
    std::fs::create_dir(&package).unwrap();
    let init = package.join("__init__.py");
    std::fs::write(
        &init,
        "def application(environ, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [b'the package app']\n",
    )
    .unwrap();
    for (p, mode) in [(&package, 0o755), (&init, 0o644)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    put_site(&c, shadowed, echo_record(&alice, &dir));
    let r = first_answer(&c, shadowed);
    assert_eq!(r.text(), "the package app");
    c.assert_running();
}

/// A never-started site's first import writes its bytecode after the first response, not
/// before it (roost_zygote.py, `_defer_bytecode_writes`): the files are there, the site
/// user's, as if written during the import.
#[test]
fn a_fresh_sites_bytecode_is_written_after_its_first_response() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    let host = "bytecode.example";
    let dir = c.echo_site_dir(&alice, host);
    let cache = dir.join("__pycache__");
    assert!(!cache.exists(), "a fresh site has no bytecode yet");
    put_site(&c, host, echo_record(&alice, &dir));
    let v = first_answer(&c, host).json();
    assert_eq!(v["uid"].as_u64(), Some(alice.uid as u64), "{v}");
    let pyc = || -> Option<std::path::PathBuf> {
        std::fs::read_dir(&cache)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                name.starts_with("app.") && name.ends_with(".pyc")
            })
    };
    assert!(
        wait_until(EXIT, || pyc().is_some()),
        "no app bytecode in {} after the first response\n{}",
        cache.display(),
        c.diagnostics()
    );
    let written = pyc().unwrap();
    let meta = std::fs::metadata(&written).unwrap();
    assert_eq!(
        meta.uid(),
        alice.uid,
        "{} is not the site user's",
        written.display()
    );
    assert!(meta.len() > 16, "{} is empty", written.display());
    // The worker goes on serving after writing it.
    assert_eq!(c.get(host, "/").unwrap().status, 200);
}
