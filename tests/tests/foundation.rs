//! Issue 2, "What it must show": a site registered in etcd answers through proxy and
//! agent, as its owner's uid, with no restart. Real etcd, real binaries, real workers.

use std::time::{Duration, Instant};

use roost_tests::process::{pid_exists, proc_state};
use roost_tests::{ensure_user, get, wait_until, Cluster, Response, User};
use serde_json::Value;

const ALICE: &str = "roost-t-alice";
const BOB: &str = "roost-t-bob";
/// Deadline for a change made in etcd to show at the proxy (the goal is under a second).
const PROPAGATION: Duration = Duration::from_secs(5);
/// Deadline for a worker process to go away once it should.
const EXIT: Duration = Duration::from_secs(15);

/// Check from the worker's own report that `resp` came from `host`'s worker running as
/// `user`, and return that report.
fn assert_served_by(resp: &Response, host: &str, user: &User) -> Value {
    assert_eq!(resp.status, 200, "{host}: {}", resp.text());
    let v = resp.json();
    assert_eq!(
        v["os_environ"]["ROOST_SITE"], host,
        "served by the wrong site: {v}"
    );
    assert_eq!(v["uid"], user.uid, "{host} worker uid: {v}");
    assert_eq!(v["euid"], user.uid, "{host} worker euid: {v}");
    assert_eq!(v["gid"], user.gid, "{host} worker gid: {v}");
    assert_ne!(v["uid"], 0, "{host} worker runs as root");
    let groups = v["groups"].as_array().expect("groups is a list");
    assert!(
        !groups.contains(&0.into()),
        "{host} worker kept root's group: {v}"
    );
    v
}

fn worker_pid(report: &Value) -> u32 {
    report["pid"].as_u64().expect("pid in report") as u32
}

/// Wait until `/proc/<pid>` is gone; on timeout say whether it is a zombie.
fn assert_pid_gone(c: &Cluster, pid: u32, what: &str) {
    if !wait_until(EXIT, || !pid_exists(pid)) {
        panic!(
            "{what}: worker pid {pid} still exists after {EXIT:?} (state {:?}{})\n{}",
            proc_state(pid),
            if proc_state(pid) == Some('Z') {
                ", a zombie: its parent did not reap it"
            } else {
                ""
            },
            c.diagnostics()
        );
    }
}

#[test]
fn site_added_while_running_answers_as_its_owner() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    let bob = ensure_user(BOB);
    let mut uids = Vec::new();
    for (host, user) in [("alice.example", &alice), ("bob.example", &bob)] {
        let dir = c.echo_site_dir(user, host);
        let t0 = Instant::now();
        c.add_site(host, user, &dir, &[]);
        let resp = c
            .wait_for_status(host, 200, PROPAGATION)
            .unwrap_or_else(|last| {
                panic!(
                    "{host} not 200 within {PROPAGATION:?}; last: {last}\n{}",
                    c.diagnostics()
                )
            });
        eprintln!(
            "{host}: roostctl site add -> first 200 through the proxy in {:?}",
            t0.elapsed()
        );
        let v = assert_served_by(&resp, host, user);
        assert_eq!(v["cwd"], dir.to_str().unwrap(), "{host} worker cwd");
        uids.push(v["uid"].clone());
    }
    assert_ne!(uids[0], uids[1], "two users' sites run as one uid");
    c.assert_running();
}

#[test]
fn removed_site_answers_404_and_its_worker_stops() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    let host = "gone.example";
    c.add_site(host, &alice, &c.echo_site_dir(&alice, host), &[]);
    let resp = c
        .wait_for_status(host, 200, PROPAGATION)
        .unwrap_or_else(|last| panic!("{host} never 200; last: {last}\n{}", c.diagnostics()));
    let pid = worker_pid(&assert_served_by(&resp, host, &alice));
    assert!(pid_exists(pid));

    c.roostctl_ok(&["site", "rm", host]);
    if let Err(last) = c.wait_for_status(host, 404, PROPAGATION) {
        panic!(
            "{host} still served {PROPAGATION:?} after site rm; last: {last}\n{}",
            c.diagnostics()
        );
    }
    assert_pid_gone(&c, pid, "after site rm");
    let sock_dir = c.site_state_dir(host);
    assert!(
        wait_until(EXIT, || !sock_dir.exists()),
        "{} still exists after site rm\n{}",
        sock_dir.display(),
        c.diagnostics()
    );
    c.assert_running();
}

#[test]
fn idle_worker_stops_and_next_request_starts_a_new_one() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    let host = "idle.example";
    c.add_site(
        host,
        &alice,
        &c.echo_site_dir(&alice, host),
        &["--idle-timeout", "1"],
    );
    let resp = c
        .wait_for_status(host, 200, PROPAGATION)
        .unwrap_or_else(|last| panic!("{host} never 200; last: {last}\n{}", c.diagnostics()));
    let first = worker_pid(&assert_served_by(&resp, host, &alice));

    // No request now: after the idle timeout the worker goes away.
    assert_pid_gone(&c, first, "after idle_timeout 1");

    // The next request starts a new worker and succeeds at the first attempt.
    let resp = c.get(host, "/").expect("request after idle stop");
    let second = worker_pid(&assert_served_by(&resp, host, &alice));
    assert_ne!(first, second, "same worker pid after the idle stop");

    // Requests with gaps around the idle timeout race the worker's stop: none may fail.
    let gaps_ms = [200, 900, 1000, 1100, 1300, 1700, 2500, 500, 1050, 1200, 950];
    let mut pids = vec![second];
    for (i, gap) in gaps_ms.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(*gap));
        let t = Instant::now();
        match c.get(host, "/") {
            Ok(r) if r.status == 200 => pids.push(worker_pid(&r.json())),
            Ok(r) => panic!(
                "request {i} after a {gap} ms gap: status {} after {:?}: {}\n{}",
                r.status,
                t.elapsed(),
                r.text(),
                c.diagnostics()
            ),
            Err(e) => panic!(
                "request {i} after a {gap} ms gap failed after {:?}: {e}\n{}",
                t.elapsed(),
                c.diagnostics()
            ),
        }
    }
    pids.dedup();
    eprintln!("worker pids across the gap loop: {pids:?}");
    c.assert_running();
}

#[test]
fn host_header_routing_and_internal_headers() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    let bob = ensure_user(BOB);
    let host = "echo.example.com";
    c.add_site(host, &alice, &c.echo_site_dir(&alice, host), &[]);
    c.add_site("other.example", &bob, &c.echo_site_dir(&bob, "other"), &[]);
    for h in [host, "other.example"] {
        if let Err(last) = c.wait_for_status(h, 200, PROPAGATION) {
            panic!("{h} never 200; last: {last}\n{}", c.diagnostics());
        }
    }

    let r = c.get("nope.example.com", "/").expect("unknown host");
    assert_eq!(r.status, 404, "unknown host: {}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "404 page is not text/plain: {:?}",
        r.headers
    );

    for bad in [Some("bad host!"), Some("a..b"), Some(""), None] {
        let r = get(c.proxy_addr, bad, "/", &[]).expect("request with a bad Host");
        assert_eq!(r.status, 400, "Host {bad:?}: {} {}", r.status, r.text());
    }

    for spelling in ["EcHo.Example.COM:8080", "echo.example.com."] {
        let r = c.get(spelling, "/").expect("mixed-case host");
        assert_served_by(&r, host, &alice);
    }

    let spoof = [
        ("X-Roost-Site", "other.example"),
        ("X-Roost-Auth", "x"),
        ("x-roost-anything", "y"),
    ];
    let r = get(c.proxy_addr, Some(host), "/", &spoof).expect("request with internal headers");
    let v = assert_served_by(&r, host, &alice);
    let leaked: Vec<&String> = v["environ"]
        .as_object()
        .expect("environ object")
        .keys()
        .filter(|k| k.starts_with("HTTP_X_ROOST_"))
        .collect();
    assert!(
        leaked.is_empty(),
        "internal headers reached the app: {leaked:?}"
    );
    assert!(
        !r.text().contains(&c.secret),
        "the proxy's secret reached the app"
    );
}

/// A log line names `key` and `field` (tracing writes `k=v`, or `k="v"` for str fields).
fn line_names(line: &str, key: &str, field: Option<&str>) -> bool {
    let has = |name: &str, val: &str| {
        line.contains(&format!("{name}={val}")) || line.contains(&format!("{name}=\"{val}\""))
    };
    line.contains("skipping invalid site record")
        && has("key", key)
        && match field {
            Some(f) => has("field", f),
            None => line.contains("field="),
        }
}

#[test]
fn malformed_site_records_are_skipped_and_logged() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    for h in ["good.example", "keep.example"] {
        c.add_site(h, &alice, &c.echo_site_dir(&alice, h), &[]);
        if let Err(last) = c.wait_for_status(h, 200, PROPAGATION) {
            panic!("{h} never 200; last: {last}\n{}", c.diagnostics());
        }
    }

    let bad_key = "/roost/sites/bad.example";
    let junk_key = "/roost/sites/junk.example";
    let keep_key = "/roost/sites/keep.example";
    c.etcd.put(
        bad_key,
        &format!(r#"{{"user":"{ALICE}","app":"nocolon","dir":"/x"}}"#),
    );
    c.etcd.put(junk_key, "not json");
    // Overwriting a valid site with an invalid record keeps the last valid version.
    c.etcd.put(
        keep_key,
        &format!(r#"{{"user":"{ALICE}","app":"app:application","dir":"relative"}}"#),
    );

    let expected = [
        (bad_key, Some("app")),
        (junk_key, None),
        (keep_key, Some("dir")),
    ];
    for (who, log) in [
        ("proxy", Cluster::proxy_log as fn(&Cluster) -> String),
        ("agent", Cluster::agent_log),
    ] {
        for (key, field) in expected {
            let logged = wait_until(PROPAGATION, || {
                log(&c).lines().any(|l| line_names(l, key, field))
            });
            assert!(
                logged,
                "{who} log has no `skipping invalid site record` line naming key={key} field={field:?}\n{}",
                c.diagnostics()
            );
        }
    }

    for h in ["good.example", "keep.example"] {
        let r = c.get(h, "/").expect("valid site after bad records");
        assert_served_by(&r, h, &alice);
    }
    let r = c.get("bad.example", "/").expect("skipped site");
    assert_eq!(
        r.status,
        404,
        "a skipped record is not a site: {}",
        r.text()
    );
    c.assert_running();
}

#[test]
fn agent_refuses_requests_without_the_secret() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    let host = "direct.example";
    c.add_site(host, &alice, &c.echo_site_dir(&alice, host), &[]);
    if let Err(last) = c.wait_for_status(host, 200, PROPAGATION) {
        panic!("{host} never 200; last: {last}\n{}", c.diagnostics());
    }
    let wrong = "0".repeat(c.secret.len());
    let attempts: [&[(&str, &str)]; 3] = [
        &[],
        &[("X-Roost-Site", host)],
        &[("X-Roost-Site", host), ("X-Roost-Auth", &wrong)],
    ];
    for headers in attempts {
        let r = get(c.agent_addr, Some(host), "/", headers).expect("direct request to the agent");
        assert_eq!(
            r.status,
            403,
            "agent with headers {headers:?}: {}",
            r.text()
        );
    }
    // With the proxy's credential the same request is served: the 403s above are the secret's doing.
    let r = get(
        c.agent_addr,
        Some(host),
        "/",
        &[("X-Roost-Site", host), ("X-Roost-Auth", &c.secret)],
    )
    .expect("direct request with the secret");
    assert_served_by(&r, host, &alice);
}

/// Sockets in `/proc/net/<table>` (tcp, tcp6) connected to local port `port`, either end.
fn established_tcp_on_port(port: u16) -> usize {
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/net/{t}")).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port_of = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            // st 01: ESTABLISHED
            f.len() > 3
                && f[3] == "01"
                && (port_of(f[1]) == Some(port) || port_of(f[2]) == Some(port))
        })
        .count()
}

/// Connected unix sockets bound to `path` (the agent's ends of accepted connections).
fn connected_unix_on(path: &std::path::Path) -> usize {
    let text = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path = path.to_string_lossy();
    text.lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // St 03: connected
            f.len() >= 8 && f[5] == "03" && f[7] == path
        })
        .count()
}

/// A request as `user` (ids only, as a tenant's shell would run it) straight to the agent's
/// unix socket, with `headers`; prints the status line.
const TENANT_TO_AGENT_SOCKET: &str = r#"
import socket, sys
path, host = sys.argv[1], sys.argv[2]
extra = "".join(h + "\r\n" for h in sys.argv[3:])
s = socket.socket(socket.AF_UNIX)
s.connect(path)
s.sendall(("GET / HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n" % (host, extra)).encode())
print(s.recv(200).split(b"\r\n")[0].decode())
"#;

#[test]
fn a_proxy_on_the_agents_machine_reaches_it_over_its_unix_socket_which_still_asks_for_the_secret() {
    let c = Cluster::start();
    let alice = ensure_user(ALICE);
    let host = "local-link.example";
    c.add_site(host, &alice, &c.echo_site_dir(&alice, host), &[]);
    if let Err(last) = c.wait_for_status(host, 200, PROPAGATION) {
        panic!("{host} never 200; last: {last}\n{}", c.diagnostics());
    }
    // The node record offers the socket, named for the node.
    let socket = c.state_dir.join("agent-node-1.sock");
    let record: Value = serde_json::from_str(
        &c.etcd
            .get(&format!(
                "{}/nodes/{}",
                roost_tests::cluster::PREFIX,
                roost_tests::cluster::NODE_ID
            ))
            .expect("the node record"),
    )
    .unwrap();
    assert_eq!(
        record["labels"]["roost/local-socket"],
        socket.to_string_lossy().as_ref(),
        "{record}"
    );
    // Requests go over the socket: the proxy's pooled connections to the agent are unix
    // ones, and none is open to the agent's TCP port.
    for _ in 0..5 {
        assert_served_by(&c.get(host, "/").expect("through the proxy"), host, &alice);
    }
    assert!(
        connected_unix_on(&socket) >= 1,
        "no connection on {}",
        socket.display()
    );
    assert_eq!(
        established_tcp_on_port(c.agent_addr.port()),
        0,
        "the proxy used the agent's TCP port"
    );
    // And the proxy says so.
    assert!(
        c.proxy_log()
            .contains("reaching the agent on this machine over its unix socket"),
        "{}",
        c.diagnostics()
    );
    // A tenant can open the socket (as it can the TCP port), and gets what it gets there:
    // nothing without the secret.
    let wrong = format!("X-Roost-Auth: {}", "0".repeat(c.secret.len()));
    let site = format!("X-Roost-Site: {host}");
    for headers in [
        vec![],
        vec![site.as_str()],
        vec![site.as_str(), wrong.as_str()],
    ] {
        let out = std::process::Command::new("setpriv")
            .arg(format!("--reuid={}", alice.uid))
            .arg(format!("--regid={}", alice.gid))
            .arg("--clear-groups")
            .args(["/usr/bin/python3", "-c", TENANT_TO_AGENT_SOCKET])
            .arg(&socket)
            .arg(host)
            .args(&headers)
            .output()
            .expect("run setpriv (util-linux)");
        let status_line = String::from_utf8_lossy(&out.stdout);
        assert!(
            status_line.starts_with("HTTP/1.1 403"),
            "tenant with {headers:?} got {status_line:?} ({})",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
