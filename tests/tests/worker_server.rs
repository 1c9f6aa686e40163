//! Issue 12 (the worker hop): a worker's server (`agent/python/roost_worker.py`) answers each
//! request on the thread that read it: one thread for `threads = 1`, up to `threads` when
//! requests stay long in the app. Real etcd, proxy, agent and zygote-forked workers under a
//! real user, with an app (`tests/apps/server_probe`) that reports which connection served
//! it and how many requests ran at once.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use roost_tests::http::parse;
use roost_tests::process::proc_state;
use roost_tests::{ensure_user, get, site_dir, wait_until, Cluster, Options, Response};
use serde_json::Value;

const USER: &str = "roost-t-inline";
const PROBE_APP: &str = include_str!("../apps/server_probe/app.py");
const FIRST_ANSWER: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(15);
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Registers `host` with the probe app and `extra` options, and waits for its first answer.
fn probe_site(c: &Cluster, host: &str, extra: &[&str]) {
    let user = ensure_user(USER);
    let dir = site_dir(&c.root().join("sites"), &user, host, PROBE_APP);
    c.add_site(host, &user, &dir, extra);
    c.wait_for_status(host, 200, FIRST_ANSWER)
        .unwrap_or_else(|last| panic!("{host} never answered 200: {last}\n{}", c.diagnostics()));
}

fn get_json(c: &Cluster, host: &str, path: &str) -> Value {
    let r = c
        .get(host, path)
        .unwrap_or_else(|e| panic!("GET {host}{path}: {e}\n{}", c.diagnostics()));
    assert_eq!(r.status, 200, "GET {host}{path}: {}", r.text());
    r.json()
}

fn dead(pid: u64) -> bool {
    proc_state(pid as u32).is_none_or(|s| s == 'Z')
}

/// Reads `n` responses framed by Content-Length from `s`, in order; the connection must stay
/// open until they are all in.
fn read_responses(s: &mut impl Read, n: usize) -> Vec<Response> {
    let (out, closed) = roost_tests::http::read_responses(s, n);
    assert!(!closed, "closed after {} of {n} responses", out.len());
    out
}

/// The site's listening socket, which the agent owns (`<state-dir>/sites/<host>/*`).
fn worker_socket(c: &Cluster, host: &str) -> PathBuf {
    let dir = c.site_state_dir(host);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .find(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.path())
        .unwrap_or_else(|| panic!("no socket in {}", dir.display()))
}

#[test]
fn a_single_threaded_site_is_served_inline_over_connections_the_agent_keeps() {
    let c = Cluster::start();
    probe_site(&c, "inline.example", &["--threads", "1"]);
    probe_site(&c, "threaded.example", &["--threads", "4"]);

    let (mut conns, mut pids, mut most_on_one) = (BTreeSet::new(), BTreeSet::new(), 0);
    for i in 0..60 {
        let v = get_json(&c, "inline.example", &format!("/seq/{i}"));
        assert_eq!(v["path"], format!("/seq/{i}"));
        assert_eq!(
            v["multithread"], false,
            "threads = 1 runs the inline server: {v}"
        );
        conns.insert(v["conn"].as_u64().unwrap());
        pids.insert(v["pid"].as_u64().unwrap());
        most_on_one = most_on_one.max(v["on_conn"].as_u64().unwrap());
    }
    assert_eq!(pids.len(), 1, "one worker served them all: {pids:?}");
    // 60 requests, one at a time: the agent's pool hands the same few connections back.
    assert!(
        conns.len() <= 3 && most_on_one >= 20,
        "60 sequential requests used {} worker connections (at most {most_on_one} on one)",
        conns.len()
    );

    let v = get_json(&c, "threaded.example", "/");
    assert_eq!(v["multithread"], true, "threads > 1 tells the app: {v}");
    c.assert_running();
}

#[test]
fn pipelined_requests_are_answered_in_order_by_the_inline_server() {
    let c = Cluster::start();
    let host = "pipelined-inline.example";
    probe_site(&c, host, &["--threads", "1"]);

    // Through the proxy and the agent: GET, POST with a body, GET in one write.
    let mut s = TcpStream::connect(c.proxy_addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let batch = format!(
        "GET /one HTTP/1.1\r\nHost: {host}\r\n\r\n\
         POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 27\r\n\r\nGET /not-a-request HTTP/1.1\
         GET /three HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    s.write_all(batch.as_bytes()).unwrap();
    let r = read_responses(&mut s, 3);
    assert_eq!(r[0].json()["path"], "/one");
    assert_eq!(
        r[1].body, b"GET /not-a-request HTTP/1.1",
        "the POST's body went to the POST"
    );
    assert_eq!(r[2].json()["path"], "/three");

    // Straight to the worker's socket, three requests in one write: the parser reads them
    // all at once, and the server must answer the two it holds before waiting for more.
    let mut w = UnixStream::connect(worker_socket(&c, host)).unwrap();
    w.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let batch: String = ["/a", "/b", "/c"]
        .iter()
        .map(|p| format!("GET {p} HTTP/1.1\r\nHost: {host}\r\n\r\n"))
        .collect();
    w.write_all(batch.as_bytes()).unwrap();
    let r = read_responses(&mut w, 3);
    let seen: Vec<(String, u64)> = r
        .iter()
        .map(|r| {
            let v = r.json();
            (
                v["path"].as_str().unwrap().to_string(),
                v["conn"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        ["/a", "/b", "/c"]
    );
    assert!(
        seen.iter().all(|(_, conn)| *conn == seen[0].1),
        "all three on one connection: {seen:?}"
    );
    // And the connection is still open for the next one.
    w.write_all(format!("GET /d HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .unwrap();
    assert_eq!(read_responses(&mut w, 1)[0].json()["path"], "/d");
}

#[test]
fn chunked_uploads_streamed_responses_and_file_wrappers_pass_through_the_inline_server() {
    let c = Cluster::start();
    let host = "bodies-inline.example";
    probe_site(&c, host, &["--threads", "1"]);

    // A chunked upload, sent in pieces with pauses: the app reads it whole.
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut s = TcpStream::connect(c.proxy_addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    for piece in body.chunks(70_000) {
        s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .unwrap();
        s.write_all(piece).unwrap();
        s.write_all(b"\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let r = parse(&raw).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-transfer-encoding"), Some("chunked"));
    assert!(
        r.body == body,
        "the upload came back with {} of {} bytes",
        r.body.len(),
        body.len()
    );

    // A streamed response: each piece reaches the client while the app is still producing
    // the next (0.4 s apart), not all at the end.
    let mut s = TcpStream::connect(c.proxy_addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(
        format!("GET /stream?n=3&gap=0.4 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let (mut raw, mut chunk) = (Vec::new(), [0u8; 4096]);
    let mut first_piece_at = None;
    loop {
        let k = s.read(&mut chunk).unwrap();
        if k == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..k]);
        if first_piece_at.is_none() && raw.windows(7).any(|w| w == b"piece 0") {
            first_piece_at = Some(Instant::now());
        }
    }
    let ended = Instant::now();
    let r = parse(&raw).unwrap();
    assert_eq!(r.text(), "piece 0\npiece 1\npiece 2\n");
    let early = ended - first_piece_at.expect("the first piece arrived");
    assert!(
        early >= Duration::from_millis(500),
        "the first piece arrived only {early:?} before the end: the response was buffered"
    );

    // wsgi.file_wrapper (sendfile from the worker).
    let r = c.get(host, "/file?kb=300").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let expected: Vec<u8> = (0..300 * 4).flat_map(|_| 0..=255u8).collect();
    assert!(
        r.body == expected,
        "file body: {} of {} bytes",
        r.body.len(),
        expected.len()
    );
    c.assert_running();
}

#[test]
fn sigterm_finishes_the_request_in_hand_and_leaves_the_backlog_to_the_next_worker() {
    let c = Cluster::start();
    let host = "backlog-inline.example";
    probe_site(&c, host, &["--threads", "1"]);
    let old = get_json(&c, host, "/")["pid"].as_u64().unwrap();

    // One slow request occupies the only thread; four more wait in the socket's backlog.
    let addr = c.proxy_addr;
    let slow = std::thread::spawn(move || get(addr, Some(host), "/sleep?secs=1.5", &[]));
    std::thread::sleep(Duration::from_millis(300));
    let queued: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || get(addr, Some(host), &format!("/queued/{i}"), &[])))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    kill(Pid::from_raw(old as i32), Signal::SIGTERM).unwrap();

    let slow = slow.join().unwrap().unwrap();
    assert_eq!(slow.status, 200, "{}", slow.text());
    assert_eq!(
        slow.json()["pid"],
        old,
        "the request in hand finished in the old worker"
    );
    for (i, q) in queued.into_iter().enumerate() {
        let r = q.join().unwrap().unwrap();
        assert_eq!(
            r.status,
            200,
            "queued request {i}: {}\n{}",
            r.text(),
            c.diagnostics()
        );
        let v = r.json();
        assert_eq!(v["path"], format!("/queued/{i}"));
        assert_ne!(
            v["pid"], old,
            "queued request {i} was served by the stopping worker"
        );
    }
    assert!(
        wait_until(EXIT, || dead(old)),
        "the old worker {old} did not exit"
    );
}

/// `GET /hold?secs=` on a connection of its own, read up to the app's first line: the pid of
/// the process now inside the app, and the connection, whose response ends `secs` later.
fn hold(c: &Cluster, host: &str, secs: f64) -> (u64, TcpStream) {
    let mut s = TcpStream::connect(c.proxy_addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(
        format!("GET /hold?secs={secs} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let k = s.read(&mut byte).unwrap();
        assert_eq!(
            k,
            1,
            "the held response ended early: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.push(byte[0]);
        let text = String::from_utf8_lossy(&raw);
        if let Some(at) = text.find("pid ") {
            if let Some(line) = text[at + 4..].split_once('\n') {
                return (line.0.trim().parse().unwrap(), s);
            }
        }
    }
}

#[test]
fn two_single_threaded_processes_share_the_socket_and_follow_the_agent() {
    let mut c = Cluster::start();
    let host = "two-inline.example";
    probe_site(&c, host, &["--threads", "1", "--workers", "2"]);

    // One process is held inside the app (it has sent the first line of a response that
    // ends in 3 s); quick requests sent meanwhile are answered by the other one. A request
    // the agent sends on a connection it keeps to the held process waits for it, so several
    // at once: the agent opens new connections for the rest, which only the other can
    // accept. Which process holds the request is the kernel's choice, and does not matter.
    let (held, mut held_response) = hold(&c, host, 3.0);
    let addr = c.proxy_addr;
    let quick: Vec<_> = (0..6)
        .map(|i| std::thread::spawn(move || get(addr, Some(host), &format!("/quick/{i}"), &[])))
        .collect();
    let mut pids: BTreeSet<u64> = BTreeSet::from([held]);
    for t in quick {
        let r = t.join().unwrap().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        pids.insert(r.json()["pid"].as_u64().unwrap());
    }
    let mut rest = String::new();
    held_response.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("done"), "the held response ended: {rest:?}");
    assert_eq!(
        pids.len(),
        2,
        "while {held} was held, the other process served: {pids:?}\n{}",
        c.diagnostics()
    );

    // The agent dies without a word: both processes see the lifeline's EOF and exit.
    c.signal_agent(Signal::SIGKILL);
    c.wait_agent_exit(Duration::from_secs(5))
        .expect("agent killed");
    assert!(
        wait_until(EXIT, || pids.iter().all(|&p| dead(p))),
        "workers {pids:?} outlived the agent"
    );
}

#[test]
fn a_request_that_outlasts_the_grace_after_sigterm_does_not_keep_the_worker() {
    let c = Cluster::start_with(Options {
        agent_config: Some("stop_grace_secs = 1\n".into()),
    });
    let host = "stuck-inline.example";
    probe_site(&c, host, &["--threads", "1"]);
    let old = get_json(&c, host, "/")["pid"].as_u64().unwrap();

    let addr = c.proxy_addr;
    let stuck = std::thread::spawn(move || get(addr, Some(host), "/sleep?secs=30", &[]));
    std::thread::sleep(Duration::from_millis(300));
    kill(Pid::from_raw(old as i32), Signal::SIGTERM).unwrap();
    // The grace is 1 s: the worker ends long before the app's 30 s sleep would.
    assert!(
        wait_until(Duration::from_secs(10), || dead(old)),
        "the worker {old} outlived its grace with a request in hand"
    );
    let answer = stuck.join().unwrap();
    assert!(
        answer.as_ref().map_or(true, |r| r.status != 200),
        "the cut-off request cannot have succeeded: {:?}",
        answer.map(|r| r.status)
    );
    // The next request gets a new worker.
    let v = get_json(&c, host, "/");
    assert_ne!(v["pid"], old);
}

#[test]
fn a_threaded_site_runs_as_many_slow_requests_at_once_as_it_has_threads_and_stops_cleanly() {
    let c = Cluster::start();
    let host = "four-threads.example";
    probe_site(&c, host, &["--threads", "4"]);
    let first = get_json(&c, host, "/");
    assert_eq!(first["multithread"], true, "threads = 4: {first}");
    let old = first["pid"].as_u64().unwrap();

    // Six slow requests at once on four threads: the parked threads are promoted as the
    // first ones stay inside the app, four run together, and two wait their turn.
    let addr = c.proxy_addr;
    let slow: Vec<_> = (0..6)
        .map(|i| {
            std::thread::spawn(move || {
                get(addr, Some(host), &format!("/sleep?secs=1.5&i={i}"), &[])
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(600));
    // Stopping now: the four requests in hand finish in this worker, nothing is lost.
    kill(Pid::from_raw(old as i32), Signal::SIGTERM).unwrap();

    let mut together_in_old = Vec::new();
    for (i, t) in slow.into_iter().enumerate() {
        let r = t
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("slow request {i}: {e}"));
        assert_eq!(
            r.status,
            200,
            "slow request {i}: {}\n{}",
            r.text(),
            c.diagnostics()
        );
        let v = r.json();
        if v["pid"] == old {
            together_in_old.push(v["together"].as_u64().unwrap());
        }
    }
    assert!(
        together_in_old.len() >= 4,
        "the four requests in hand were finished by the stopping worker: {together_in_old:?}"
    );
    assert_eq!(
        together_in_old.iter().max(),
        Some(&4),
        "four threads ran four slow requests at once, never more: {together_in_old:?}"
    );
    assert!(
        wait_until(EXIT, || dead(old)),
        "the old worker {old} did not exit"
    );
    let v = get_json(&c, host, "/");
    assert_ne!(v["pid"], old, "a new worker serves after the stop");
}

#[test]
fn pipelined_requests_are_answered_in_order_by_a_threaded_worker() {
    let c = Cluster::start();
    let host = "pipelined-threads.example";
    probe_site(&c, host, &["--threads", "4"]);
    let mut w = UnixStream::connect(worker_socket(&c, host)).unwrap();
    w.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    for round in 0..3 {
        let batch: String = ["/a", "/b", "/c"]
            .iter()
            .map(|p| format!("GET {p}/{round} HTTP/1.1\r\nHost: {host}\r\n\r\n"))
            .collect();
        w.write_all(batch.as_bytes()).unwrap();
        let paths: Vec<String> = read_responses(&mut w, 3)
            .iter()
            .map(|r| r.json()["path"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            paths,
            [
                format!("/a/{round}"),
                format!("/b/{round}"),
                format!("/c/{round}")
            ],
            "round {round}: in order, on the one connection"
        );
    }
    c.assert_running();
}

#[test]
fn a_body_the_app_left_unread_is_drained_and_never_holds_up_a_stop() {
    // A long grace: a worker stuck reading a request that never comes would outlive the
    // wait below (SIGALRM ends it only after the grace).
    let c = Cluster::start_with(Options {
        agent_config: Some("stop_grace_secs = 60\n".into()),
    });
    for (host, threads) in [("unread-one.example", "1"), ("unread-four.example", "4")] {
        probe_site(&c, host, &["--threads", threads]);
        let pid = get_json(&c, host, "/")["pid"].as_u64().unwrap();
        // Straight to the worker: POSTs whose app answers without reading the body, each
        // body only after the answer, on one connection.
        let mut w = UnixStream::connect(worker_socket(&c, host)).unwrap();
        w.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let body = b"GET /not-a-request HTTP/1.1\r\n";
        let mut post = |path: &str| {
            w.write_all(
                format!(
                    "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .unwrap();
            let answer = read_responses(&mut w, 1);
            assert_eq!(answer[0].json()["path"], path, "threads {threads}");
            w.write_all(body).unwrap();
        };
        post("/first");
        post("/second");
        // The last body is in, and nothing else comes: a stop ends the worker now.
        std::thread::sleep(Duration::from_millis(300));
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
        assert!(
            wait_until(EXIT, || dead(pid)),
            "threads {threads}: the worker {pid} did not exit after SIGTERM"
        );
        drop(w);
    }
}
