//! Issue 14 (a first hit at PHP-FPM's speed): the agent makes a socket directory, a log
//! file and, on cgroup v1, a cgroup ahead of any site (`agent/src/launch/ready.rs`), and a
//! never-started site's start renames them to the site's instead of making them on its
//! critical path.
//! Real etcd, agent, proxy and workers; the checks read the filesystem and `/proc` as an
//! operator would.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use roost_tests::{ensure_user, wait_until, Cluster, User};

const COLD_START: Duration = Duration::from_secs(60);
/// The agent keeps this many of each ready (`READY` in ready.rs).
const READY: usize = 4;

/// `(name, inode)` of the `.ready-*` entries of `dir`.
fn ready_entries(dir: &Path) -> Vec<(String, u64)> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let ino = e.metadata().ok()?.ino();
                    name.starts_with(".ready-").then_some((name, ino))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn inodes(entries: &[(String, u64)]) -> HashSet<u64> {
    entries.iter().map(|(_, ino)| *ino).collect()
}

fn ino(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .ino()
}

/// The v1 memory group of `pid` (`None` on cgroup v2).
fn v1_memory_group(pid: u32) -> Option<PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("worker's cgroup");
    let path = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    })?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    let mount = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup") && f.get(3)?.split(',').any(|o| o == "memory"))
            .then(|| f[1].to_string())
    })?;
    Some(PathBuf::from(format!("{mount}{path}")))
}

/// The base zygote's spare, once it waits in a `.ready-*` group under `groups_dir`.
fn wait_for_spare_in(groups_dir: &Path) -> Option<u32> {
    let mut found = None;
    wait_until(Duration::from_secs(10), || {
        found = roost_tests::procfs::all_pids().into_iter().find(|p| {
            roost_tests::procfs::comm(*p) == "roost-spare"
                && v1_memory_group(*p).is_some_and(|g| {
                    g.parent() == Some(groups_dir)
                        && g.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with(".ready-"))
                })
        });
        found.is_some()
    });
    found
}

/// The agent's output-pump threads: one per running worker, and those made ahead.
fn pump_threads(agent: u32) -> usize {
    std::fs::read_dir(format!("/proc/{agent}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "roost-sitelog")
                })
                .count()
        })
        .unwrap_or(0)
}

fn worker_pid(c: &Cluster, host: &str) -> u32 {
    let r = c
        .wait_for_status(host, 200, COLD_START)
        .unwrap_or_else(|last| panic!("{host} never 200: {last}\n{}", c.diagnostics()));
    r.json()["pid"].as_u64().expect("the echo app's pid") as u32
}

/// As `user` (a tenant's shell), try to connect to `socket`; the error's name, or "connected".
fn tenant_connects(user: &User, socket: &Path) -> String {
    let code = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as e:
    print(type(e).__name__)
"#;
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--clear-groups")
        .args(["/usr/bin/python3", "-c", code])
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv (util-linux)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_never_started_site_takes_a_socket_log_and_cgroup_made_ahead_with_its_own_limits_and_they_are_made_again(
) {
    let c = Cluster::start();
    let (gina, hal) = (ensure_user("roost-r-gina"), ensure_user("roost-r-hal"));
    let sites = c.state_dir.join("sites");
    let logs = c.state_dir.join("logs");

    // A first site shows where the sites' groups live.
    let plain_dir = c.echo_site_dir(&gina, "plain.example");
    c.add_site("plain.example", &gina, &plain_dir, &[]);
    let plain = worker_pid(&c, "plain.example");
    let groups_dir =
        v1_memory_group(plain).map(|g| g.parent().expect("the agent's group").to_path_buf());

    // Once starts are quiet the agent has its ready sockets, logs, output pumps (threads
    // waiting for a worker) and v1 groups again.
    let agent = c.agent_pid();
    let refilled = |workers: usize| {
        ready_entries(&sites).len() == READY
            && ready_entries(&logs).len() == READY
            && pump_threads(agent) == READY + workers
            && groups_dir
                .as_ref()
                .is_none_or(|d| ready_entries(d).len() > READY)
    };
    assert!(
        wait_until(Duration::from_secs(10), || refilled(1)),
        "ready sockets {:?}, groups {:?}, pump threads {}\n{}",
        ready_entries(&sites),
        groups_dir.as_ref().map(|d| ready_entries(d)),
        pump_threads(agent),
        c.diagnostics()
    );
    let ready_sockets = ready_entries(&sites);
    let ready_logs = ready_entries(&logs);
    let ready_groups = groups_dir
        .as_ref()
        .map(|d| ready_entries(d))
        .unwrap_or_default();
    // On v1 the base zygote's spare waits in one of them (one more than the pool's), joined
    // ahead: the worker it becomes has no group to join, and that group becomes the site's.
    let spare_in_group = groups_dir.as_ref().map(|d| {
        let spare = wait_for_spare_in(d).unwrap_or_else(|| {
            panic!(
                "no spare in a ready group under {}\n{}",
                d.display(),
                c.diagnostics()
            )
        });
        (spare, ino(&v1_memory_group(spare).unwrap()))
    });

    // Each is root's alone: a tenant can't get into a ready directory, which will hold a
    // site's socket.
    for (name, _) in &ready_sockets {
        let dir = sites.join(name);
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!(
            (meta.uid(), meta.mode() & 0o7777),
            (0, 0o700),
            "{}",
            dir.display()
        );
        assert_eq!(
            tenant_connects(&hal, &dir.join("sock")),
            "PermissionError",
            "a tenant got into the ready directory {}",
            dir.display()
        );
    }

    // A never-started site with a memory limit of its own: its socket directory and its
    // group are ready-made ones, renamed, and the limit is the site's.
    let capped_dir = c.echo_site_dir(&hal, "capped.example");
    c.add_site(
        "capped.example",
        &hal,
        &capped_dir,
        &["--memory-limit-mb", "96"],
    );
    let capped = worker_pid(&c, "capped.example");
    assert!(
        inodes(&ready_sockets).contains(&ino(&c.site_state_dir("capped.example"))),
        "capped.example's socket directory was not a ready one\n{}",
        c.diagnostics()
    );
    // ... with its socket, bound ahead under the placeholder: the kernel still gives that
    // path as its address (it does not follow renames). The agent's connection pool checks
    // a worker connection's peer address before reusing it, so the agent's peer carries
    // that address while it connects to `sites/<host>/sock`: connections are reused
    // (pingora logs an "FD mismatch" for each one it refuses).
    let placeholder = ready_sockets
        .iter()
        .find(|(_, i)| *i == ino(&c.site_state_dir("capped.example")))
        .map(|(name, _)| name.clone())
        .unwrap();
    let bound_at = sites.join(&placeholder).join("sock");
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap();
    assert!(
        unix.lines()
            .any(|l| l.ends_with(&format!(" {}", bound_at.display()))),
        "no socket bound at {}:\n{unix}",
        bound_at.display()
    );
    for _ in 0..5 {
        assert_eq!(c.get("capped.example", "/").unwrap().status, 200);
    }
    assert!(
        !c.agent_log().contains("FD mismatch"),
        "the agent did not reuse its connections to a socket bound ahead\n{}",
        c.diagnostics()
    );
    let log = logs.join("capped.example.log");
    assert!(
        inodes(&ready_logs).contains(&ino(&log)),
        "capped.example's log was not a ready one\n{}",
        c.diagnostics()
    );
    let meta = std::fs::metadata(&log).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (0, 0o640),
        "{}",
        log.display()
    );
    // A pump made ahead carries the worker's output to the site's log: its boot line.
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("first response"))),
        "capped.example's output never reached {}\n{}",
        log.display(),
        c.diagnostics()
    );
    if let Some(groups_dir) = &groups_dir {
        let group = v1_memory_group(capped).expect("a v1 memory group");
        assert_eq!(group, groups_dir.join("capped.example"));
        let (spare, spare_group) = spare_in_group.expect("a spare in a ready group");
        assert_eq!(
            capped, spare,
            "the waiting spare became capped.example's worker"
        );
        assert_eq!(
            ino(&group),
            spare_group,
            "its group, renamed, is the site's"
        );
        assert!(
            inodes(&ready_groups).contains(&ino(&group)),
            "capped.example's cgroup was not a ready one\n{}",
            c.diagnostics()
        );
        let limit = std::fs::read_to_string(group.join("memory.limit_in_bytes")).unwrap();
        assert_eq!(
            limit.trim(),
            (96u64 << 20).to_string(),
            "the site's own memory limit"
        );
        // The first site, made from a ready group too, kept the node's default: none.
        let plain_limit =
            std::fs::read_to_string(groups_dir.join("plain.example/memory.limit_in_bytes"))
                .unwrap();
        assert!(
            plain_limit.trim().parse::<u64>().unwrap() > 1 << 60,
            "{plain_limit}"
        );
    } else {
        // cgroup v2 refuses renames: no ready groups, the site's made at its start.
        let own = std::fs::read_to_string(format!("/proc/{capped}/cgroup")).unwrap();
        assert!(own.trim().ends_with("/capped.example"), "{own}");
    }

    // And they are made again, new ones, for the next site.
    assert!(
        wait_until(Duration::from_secs(10), || refilled(2)),
        "not made again: sockets {:?}, pump threads {}\n{}",
        ready_entries(&sites),
        pump_threads(agent),
        c.diagnostics()
    );
    let again = inodes(&ready_entries(&sites));
    assert!(
        !again.contains(&ino(&c.site_state_dir("capped.example"))),
        "a site's socket directory is still counted as ready"
    );
    assert_eq!(c.get("capped.example", "/").unwrap().status, 200);
    assert_eq!(c.get("plain.example", "/").unwrap().status, 200);
}
