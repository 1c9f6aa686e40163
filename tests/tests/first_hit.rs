//! The first hit of a site that has no worker: the proxy starts the worker while the TLS
//! handshake is still in flight (from the ClientHello's SNI), so over a real round trip a
//! never-started site answers about as fast as a warm one.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use roost_tests::edge::{make_cert, Edge, ProxyOpts, PREFIX};
use roost_tests::latency::DelayRelay;
use roost_tests::{ensure_user, User};
use serde_json::json;

const SHOW: Duration = Duration::from_secs(20);
/// Half the simulated round trip between client and proxy.
const ONE_WAY: Duration = Duration::from_millis(10);
/// Cold sites measured (each is started once, by its first request). Single requests here
/// vary by several ms (by 5 and more while the machine is busy), and the medians compared
/// must be within 2 ms: with 101 pairs, noise alone moves their difference by about 0.2 ms
/// on a quiet machine and 0.4 ms on one with a core taken (measured: the difference of
/// medians over repeated runs). 15 pairs, as before, moved it by more than a millisecond.
const COLD_SITES: usize = 101;

/// One test at a time: the TLS test compares latencies within 2 ms, and a second cluster
/// starting beside it on a 2-core machine moved its median by more than that.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One HTTPS GET of `host` over a new connection through `relay`; the time curl measured
/// from its start to the last byte, in seconds.
fn timed_get(relay: &DelayRelay, host: &str, ca: &Path) -> f64 {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--http1.1", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{time_total}"])
        .arg("--connect-to")
        .arg(format!("{host}:443:{}", relay.addr))
        .arg("--cacert")
        .arg(ca)
        .arg(format!("https://{host}/"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, took) = text.split_once(' ').unwrap_or_default();
    assert_eq!(
        code,
        "200",
        "GET https://{host}/: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took.parse().expect("curl's time_total")
}

fn user() -> User {
    ensure_user("roost-t-firsthit")
}

#[test]
fn a_never_started_site_answers_over_tls_as_fast_as_a_warm_one() {
    let _serial = roost_tests::one_at_a_time(&ONE_AT_A_TIME);
    let mut edge = Edge::new("first-hit");
    let user = user();
    let work = edge.root().join("certwork");
    std::fs::create_dir_all(&work).unwrap();
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts {
        tls: true,
        ..Default::default()
    });
    let (cert, key) = make_cert(&work, "wild", &["*.hit.example"]);
    edge.etcd.put(
        &format!("{PREFIX}/certs/*.hit.example"),
        &json!({"cert": cert, "key": key}).to_string(),
    );
    let ca = work.join("wild.crt.pem");
    // Long idle timeouts: no worker may stop during the measurement.
    let idle = json!({"idle_timeout": 600});
    edge.put_echo_site("warm.hit.example", &user, idle.clone());
    for i in 0..COLD_SITES {
        edge.put_echo_site(&format!("cold{i}.hit.example"), &user, idle.clone());
    }
    let proxy = &edge.proxies[0];
    proxy
        .wait_status("warm.hit.example", "/", 200, SHOW)
        .unwrap_or_else(|last| panic!("warm site not up: {last}"));
    let tls = proxy.tls_addr.expect("TLS listener");
    let relay = DelayRelay::start(tls, ONE_WAY);
    // The certificate may reach the proxy after the sites: wait until a handshake works.
    assert!(
        roost_tests::wait_until(SHOW, || {
            Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "--max-time", "5", "--cacert"])
                .arg(&ca)
                .arg("--connect-to")
                .arg(format!("warm.hit.example:443:{}", relay.addr))
                .arg("https://warm.hit.example/")
                .status()
                .is_ok_and(|s| s.success())
        }),
        "no TLS handshake for *.hit.example"
    );
    let sent_before = proxy
        .metric("roost_proxy_warm_calls_total{outcome=\"sent\"}")
        .unwrap_or(0.0);

    // Alternate: a warm request, then a cold site's very first request, each on a new
    // connection through the same round trip.
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    for i in 0..COLD_SITES {
        warm.push(timed_get(&relay, "warm.hit.example", &ca));
        cold.push(timed_get(&relay, &format!("cold{i}.hit.example"), &ca));
    }
    let (warm_ms, cold_ms) = (median(warm.clone()) * 1e3, median(cold.clone()) * 1e3);
    eprintln!(
        "over a {} ms round trip: warm site median {warm_ms:.2} ms, first hit of a never-started \
         site median {cold_ms:.2} ms, difference {:.2} ms\n  warm: {warm:?}\n  cold: {cold:?}",
        (ONE_WAY * 2).as_millis(),
        cold_ms - warm_ms
    );
    let sent = proxy
        .metric("roost_proxy_warm_calls_total{outcome=\"sent\"}")
        .unwrap_or(0.0)
        - sent_before;
    assert!(
        sent >= COLD_SITES as f64,
        "the proxy sent {sent} warm calls for {COLD_SITES} first hits"
    );
    // The warm call also opened a connection to each worker it started, which the first
    // request took. (A start slower than the handshake leaves its request to connect.)
    let used = agent_metric(&edge, "roost_agent_preconnects_total{outcome=\"used\"}");
    assert!(
        used >= (COLD_SITES / 2) as f64,
        "{used} of {COLD_SITES} first hits used the connection their warm call opened"
    );
    assert!(
        cold_ms - warm_ms <= 2.0,
        "a first hit took {cold_ms:.2} ms, a warm request {warm_ms:.2} ms: more than 2 ms apart; \
         the new workers' boots (a long `accept` or `request` phase is the worker waiting for \
         its request, not booting):\n{}",
        boot_lines(&edge)
    );
}

/// Each cold site's worker's boot timeline, as it logged it with its first response.
fn boot_lines(edge: &Edge) -> String {
    let logs = edge.root().join("state-node-1").join("logs");
    (0..COLD_SITES)
        .filter_map(|i| {
            let log =
                std::fs::read_to_string(logs.join(format!("cold{i}.hit.example.log"))).ok()?;
            let line = log.lines().find(|l| l.contains("first response"))?;
            Some(format!(
                "  cold{i}: {}",
                line.split("] ").last().unwrap_or(line)
            ))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A series of the agent's metrics (0 when absent).
fn agent_metric(edge: &Edge, series: &str) -> f64 {
    let r = roost_tests::get(edge.agents[0].admin, Some("localhost"), "/metrics", &[])
        .expect("agent metrics");
    roost_tests::edge::metric_value(&r.text(), series).unwrap_or(0.0)
}

/// The agent's count of warm calls it answered.
fn agent_warm_calls(edge: &Edge) -> f64 {
    agent_metric(edge, "roost_agent_warm_calls_total")
}

#[test]
fn a_request_whose_body_is_still_coming_starts_the_worker_at_once() {
    let _serial = roost_tests::one_at_a_time(&ONE_AT_A_TIME);
    use std::io::{Read, Write};
    let mut edge = Edge::new("first-hit-body");
    let user = user();
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts::default());
    edge.put_echo_site("known.hit.example", &user, json!({}));
    edge.put_echo_site("slow.hit.example", &user, json!({}));
    let proxy = &edge.proxies[0];
    proxy
        .wait_status("known.hit.example", "/", 200, SHOW)
        .unwrap_or_else(|last| panic!("site not up: {last}"));
    let before = agent_warm_calls(&edge);

    let mut conn = std::net::TcpStream::connect(proxy.addr).unwrap();
    conn.set_read_timeout(Some(SHOW)).unwrap();
    conn.write_all(
        b"POST /upload HTTP/1.1\r\nHost: slow.hit.example\r\nContent-Length: 5\r\n\
          Connection: close\r\n\r\n",
    )
    .unwrap();
    // The head alone reaches the agent as a warm call, before any byte of the body.
    assert!(
        roost_tests::wait_until(SHOW, || agent_warm_calls(&edge) > before),
        "no warm call reached the agent while the body was awaited"
    );
    conn.write_all(b"hello").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("slow.hit.example"), "{answer}");

    // A head for a host that is no site warms nothing.
    let warm_sent = |p: &roost_tests::edge::Proxy| {
        p.metric("roost_proxy_warm_calls_total{outcome=\"sent\"}")
            .unwrap_or(0.0)
    };
    let sent = warm_sent(proxy);
    let mut conn = std::net::TcpStream::connect(proxy.addr).unwrap();
    conn.set_read_timeout(Some(SHOW)).unwrap();
    conn.write_all(
        b"POST / HTTP/1.1\r\nHost: nobody.hit.example\r\nContent-Length: 1\r\n\
          Connection: close\r\n\r\nx",
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert_eq!(warm_sent(proxy), sent, "a host that is no site was warmed");
}
