//! Issue 5, "What it must show": the edge proxy in production conditions. Real etcd (stopped,
//! cut off, compacted), real roost-proxy and roost-agent binaries, real workers (the echo
//! WSGI app and a plain-Python `command` site), real clients (raw HTTP, curl, openssl).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use roost_tests::edge::{
    first_cert, get_counting, make_cert, peak_rss_kib, post_stream, served_cert, Edge, ProxyOpts,
    PREFIX,
};
use roost_tests::{ensure_user, get, wait_until, User};
use serde_json::{json, Value};

const ALICE: &str = "roost-e-alice";
const BOB: &str = "roost-e-bob";
/// Deadline for a change in etcd (or a recovery) to show at the proxy.
const SHOW: Duration = Duration::from_secs(30);

fn alice() -> User {
    ensure_user(ALICE)
}

/// The echo app's view of the request (`environ`), checked to come from `host`.
fn echo_environ(resp: &roost_tests::Response, host: &str) -> Value {
    assert_eq!(resp.status, 200, "{host}: {}", resp.text());
    let v = resp.json();
    assert_eq!(
        v["os_environ"]["ROOST_SITE"], host,
        "served by the wrong site: {v}"
    );
    v["environ"].clone()
}

fn wait_200(edge: &Edge, proxy: usize, host: &str, path: &str) -> roost_tests::Response {
    edge.proxies[proxy]
        .wait_status(host, path, 200, SHOW)
        .unwrap_or_else(|last| panic!("{host}{path} not 200 within {SHOW:?}; last: {last}"))
}

// ---------------------------------------------------------------------------------------

#[test]
fn etcd_outage_keeps_known_sites_served_then_catches_up() {
    let mut edge = Edge::new("edge-outage");
    let user = alice();
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts {
        toml: "staleness_warn_secs = 2\n".into(),
        ..Default::default()
    });
    edge.put_echo_site("known-a.example", &user, json!({}));
    edge.put_edge_site("known-b.example", &user, json!({}));
    wait_200(&edge, 0, "known-a.example", "/");
    wait_200(&edge, 0, "known-b.example", "/echo");

    edge.etcd.stop();
    let p = &edge.proxies[0];
    let started = Instant::now();
    let (mut ok, mut failures) = (0, Vec::new());
    let mut staleness = Vec::new();
    while started.elapsed() < Duration::from_secs(12) {
        for (host, path) in [("known-a.example", "/"), ("known-b.example", "/echo")] {
            match p.get(host, path) {
                Ok(r) if r.status == 200 => ok += 1,
                Ok(r) => failures.push(format!("{host}: {} {}", r.status, r.text())),
                Err(e) => failures.push(format!("{host}: {e}")),
            }
        }
        if let Some(s) = p.metric("roost_proxy_snapshot_staleness_seconds") {
            staleness.push((started.elapsed(), s));
        }
        assert_eq!(
            p.readyz(),
            Some(200),
            "a proxy with a snapshot stays ready while etcd is down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "etcd down for {:?}: {ok} requests answered 200, {} failed",
        started.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "requests failed while etcd was down: {failures:?}"
    );
    assert!(ok >= 20, "only {ok} requests in 12 s");
    let first = staleness
        .iter()
        .find(|(t, _)| *t >= Duration::from_secs(1))
        .expect("staleness early")
        .1;
    let last = staleness.last().expect("staleness samples").1;
    assert!(
        last > first && last >= 8.0,
        "staleness did not grow during the outage: {first} -> {last}"
    );
    assert!(
        p.log()
            .contains("etcd has not confirmed the routing snapshot"),
        "no staleness log line:\n{}",
        p.log()
    );

    edge.etcd.start();
    edge.put_echo_site("added-after.example", &user, json!({}));
    let t0 = Instant::now();
    let r = wait_200(&edge, 0, "added-after.example", "/");
    echo_environ(&r, "added-after.example");
    eprintln!(
        "etcd back: a site added afterwards answered after {:?}",
        t0.elapsed()
    );
    assert_eq!(p.get("known-a.example", "/").unwrap().status, 200);
    assert!(
        wait_until(SHOW, || p
            .log()
            .contains("etcd confirms the routing snapshot again")),
        "no recovery log line"
    );
    let s = p.metric("roost_proxy_snapshot_staleness_seconds").unwrap();
    assert!(s < 5.0, "staleness still {s} s after recovery");
}

#[test]
fn changes_made_while_cut_off_are_caught_up_even_after_a_compaction() {
    let mut edge = Edge::new("edge-compact");
    let user = alice();
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts {
        via_relay: true,
        ..Default::default()
    });
    edge.put_echo_site("stays.example", &user, json!({}));
    edge.put_echo_site("goes.example", &user, json!({}));
    wait_200(&edge, 0, "stays.example", "/");
    wait_200(&edge, 0, "goes.example", "/");

    edge.relay.as_ref().unwrap().cut();
    let p = &edge.proxies[0];
    assert!(
        wait_until(SHOW, || p
            .metric("roost_proxy_snapshot_staleness_seconds")
            .is_some_and(|s| s >= 3.0)),
        "the proxy did not notice it was cut off"
    );
    // Meanwhile, directly in etcd: a removal, an addition, many revisions, then compaction.
    edge.etcd.del(&format!("{PREFIX}/sites/goes.example"));
    edge.put_echo_site("comes.example", &user, json!({}));
    for i in 0..20 {
        edge.etcd.put("/other/noise", &i.to_string());
    }
    let compacted = edge.etcd.compact();
    eprintln!("compacted at revision {compacted} while the proxy was cut off");

    edge.relay.as_ref().unwrap().restore();
    let r = wait_200(&edge, 0, "comes.example", "/");
    echo_environ(&r, "comes.example");
    let gone = p.wait_status("goes.example", "/", 404, SHOW);
    assert!(
        gone.is_ok(),
        "a site removed while cut off is still served: {gone:?}"
    );
    assert!(
        gone.unwrap().text().starts_with("404 Not Found: "),
        "not Roost's page"
    );
    assert_eq!(p.get("stays.example", "/").unwrap().status, 200);
}

#[test]
fn readyz_is_not_200_before_the_first_sync() {
    let mut edge = Edge::new("edge-readyz");
    edge.relay.as_ref().unwrap().cut();
    edge.start_proxy(ProxyOpts {
        via_relay: true,
        no_wait: true,
        ..Default::default()
    });
    let p = &edge.proxies[0];
    let mut answers = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        if let Some(s) = p.readyz() {
            answers.push(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!answers.is_empty(), "the admin port never answered");
    // Requests meanwhile: 503 (try again), not 404 (no such site).
    let r = p.get("any.example", "/").unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.text().starts_with("503 Service Unavailable: "),
        "{}",
        r.text()
    );
    assert!(
        answers.iter().all(|s| *s == 503),
        "ready before any etcd sync: {answers:?}"
    );
    edge.relay.as_ref().unwrap().restore();
    assert!(
        wait_until(SHOW, || p.readyz() == Some(200)),
        "not ready after etcd became reachable"
    );
}

#[test]
fn sigterm_drains_requests_in_flight_then_exits() {
    let mut edge = Edge::new("edge-drain");
    let user = alice();
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts {
        toml: "drain_delay_secs = 2\ngrace_period_secs = 30\n".into(),
        ..Default::default()
    });
    edge.put_edge_site("drain.example", &user, json!({}));
    wait_200(&edge, 0, "drain.example", "/slow?ms=10");

    let addr = edge.proxies[0].addr;
    let slow = std::thread::spawn(move || get(addr, Some("drain.example"), "/slow?ms=5000", &[]));
    let p = &edge.proxies[0];
    assert!(
        wait_until(Duration::from_secs(10), || p
            .metric("roost_proxy_requests_in_flight")
            .is_some_and(|n| n >= 1.0)),
        "the slow request never got in flight"
    );
    p.signal(Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(2), || p.readyz() == Some(503)),
        "readyz not 503 while draining"
    );
    // During the drain delay new requests are still served.
    assert_eq!(
        p.get("drain.example", "/slow?ms=1").map(|r| r.status).ok(),
        Some(200)
    );

    let resp = slow.join().unwrap().expect("the request in flight failed");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "slow done\n"),
        "request in flight was cut"
    );
    let status = edge.proxies[0]
        .wait_exit(Duration::from_secs(20))
        .expect("proxy did not exit after draining");
    assert!(status.success(), "proxy exit status {status}");
    assert!(
        TcpStream::connect(addr).is_err(),
        "still accepting after the drain"
    );
    assert!(edge.proxies[0]
        .log()
        .contains("drained: no request in flight"));
}

#[test]
fn a_dead_agent_fails_over_to_the_next_node_of_the_ranking() {
    let mut edge = Edge::new("edge-failover");
    let user = alice();
    // A long lease: the dead node stays in etcd, so the proxy must fail over by itself.
    edge.start_agent("node-a", "lease_ttl_secs = 60\n");
    edge.start_agent("node-b", "lease_ttl_secs = 60\n");
    edge.start_proxy(ProxyOpts::default());
    edge.put_echo_site("failover.example", &user, json!({}));
    wait_200(&edge, 0, "failover.example", "/");

    let p = &edge.proxies[0];
    let r = p
        .get_with("failover.example", "/", &[("X-Request-Id", "failover-1")])
        .unwrap();
    echo_environ(&r, "failover.example");
    let first = edge
        .served_by("failover-1")
        .expect("no agent logged failover-1");
    let victim = edge.agents.iter().position(|a| a.id == first).unwrap();
    edge.agents[victim].kill();
    let retries_before = p.metric("roost_proxy_failovers_total").unwrap_or(0.0);

    let r = p
        .get_with("failover.example", "/", &[("X-Request-Id", "failover-2")])
        .unwrap();
    echo_environ(&r, "failover.example");
    let second = edge
        .served_by("failover-2")
        .expect("no agent logged failover-2");
    let suspected_at = Instant::now();
    assert_ne!(second, first, "served by the dead node?");
    assert!(p.log().contains("node unreachable; trying the next node"));
    let retries = p.metric("roost_proxy_failovers_total").unwrap();
    assert_eq!(
        retries,
        retries_before + 1.0,
        "the first request after the death retried once"
    );

    // The dead node is suspect now: the next requests go straight to the live one.
    for i in 3..6 {
        let id = format!("failover-{i}");
        let r = p
            .get_with("failover.example", "/", &[("X-Request-Id", &id)])
            .unwrap();
        echo_environ(&r, "failover.example");
        assert_eq!(edge.served_by(&id).as_deref(), Some(second.as_str()));
    }
    assert_eq!(
        p.metric("roost_proxy_failovers_total").unwrap(),
        retries,
        "a suspect node was tried first"
    );
    assert!(p.metric("roost_proxy_suspect_nodes").unwrap() >= 1.0);

    // When the dead node leaves etcd (its lease expires; deleted here to save the wait), it
    // stops being anyone's suspect at once, well before its 10 s of suspicion would end.
    let dead = edge.agents[victim].id.clone();
    let out = edge.etcd.etcdctl(&["del", &format!("/roost/nodes/{dead}")]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        wait_until(Duration::from_secs(5), || p
            .metric("roost_proxy_suspect_nodes")
            == Some(0.0)),
        "a node gone from etcd is still counted as suspect: {:?}",
        p.metric("roost_proxy_suspect_nodes")
    );
    assert!(
        suspected_at.elapsed() < Duration::from_secs(10),
        "the gauge fell only when the suspicion expired"
    );
}

#[test]
fn agents_refuse_requests_without_the_proxy_credential() {
    let mut edge = Edge::new("edge-auth");
    let user = alice();
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts::default());
    edge.put_echo_site("guarded.example", &user, json!({}));
    wait_200(&edge, 0, "guarded.example", "/");

    let agent = edge.agents[0].addr;
    let rev = edge.etcd.revision().to_string();
    let attempts: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no internal headers", vec![]),
        (
            "internal headers, no credential",
            vec![
                ("X-Roost-Site", "guarded.example"),
                ("X-Roost-Revision", &rev),
            ],
        ),
        (
            "a wrong credential",
            vec![
                ("X-Roost-Site", "guarded.example"),
                ("X-Roost-Revision", &rev),
                ("X-Roost-Auth", "0123456789abcdef0123456789abcdef"),
            ],
        ),
    ];
    for (what, headers) in &attempts {
        let r = get(agent, Some("guarded.example"), "/", headers).unwrap();
        assert_eq!(r.status, 403, "direct request with {what}: {}", r.text());
        assert!(r.text().starts_with("403 Forbidden: "), "{}", r.text());
    }
    // The credential is what the agent checks: with it, the same request is served.
    let r = get(
        agent,
        Some("guarded.example"),
        "/",
        &[
            ("X-Roost-Site", "guarded.example"),
            ("X-Roost-Auth", &edge.secret),
        ],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // Through the proxy, a client's internal headers are dropped before the agent sees them.
    edge.put_echo_site("other.example", &user, json!({}));
    wait_200(&edge, 0, "other.example", "/");
    let r = edge.proxies[0]
        .get_with(
            "guarded.example",
            "/",
            &[
                ("X-Roost-Site", "other.example"),
                ("X-Roost-Auth", "forged"),
                ("X-Roost-Anything", "x"),
            ],
        )
        .unwrap();
    let env = echo_environ(&r, "guarded.example");
    let leaked: Vec<&String> = env
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("HTTP_X_ROOST"))
        .collect();
    assert!(
        leaked.is_empty(),
        "internal headers reached the app: {leaked:?}"
    );
}

#[test]
fn forwarded_headers_and_request_ids() {
    let mut edge = Edge::new("edge-headers");
    let user = alice();
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts::default());
    edge.start_proxy(ProxyOpts {
        toml: "trusted_proxies = [\"127.0.0.0/8\"]\n".into(),
        ..Default::default()
    });
    edge.put_echo_site("fwd.example", &user, json!({}));
    wait_200(&edge, 0, "fwd.example", "/");
    wait_200(&edge, 1, "fwd.example", "/");
    let claims = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "claimed.example"),
        ("Forwarded", "for=6.6.6.6"),
    ];

    // An untrusted client's claims are replaced.
    let r = edge.proxies[0]
        .get_with("fwd.example:8080", "/", &claims)
        .unwrap();
    let env = echo_environ(&r, "fwd.example");
    assert_eq!(env["HTTP_X_FORWARDED_FOR"], "127.0.0.1");
    assert_eq!(env["HTTP_X_FORWARDED_PROTO"], "http");
    assert_eq!(env["HTTP_X_FORWARDED_HOST"], "fwd.example:8080");
    assert!(
        env.get("HTTP_FORWARDED").is_none(),
        "Forwarded passed from an untrusted client: {env}"
    );

    // A trusted load balancer's are kept, with its own address appended.
    let r = edge.proxies[1]
        .get_with("fwd.example", "/", &claims)
        .unwrap();
    let env = echo_environ(&r, "fwd.example");
    assert_eq!(env["HTTP_X_FORWARDED_FOR"], "6.6.6.6, 127.0.0.1");
    assert_eq!(env["HTTP_X_FORWARDED_PROTO"], "https");
    assert_eq!(env["HTTP_X_FORWARDED_HOST"], "claimed.example");

    // A request id is kept, answered, seen by the app and logged at both ends.
    let r = edge.proxies[0]
        .get_with("fwd.example", "/", &[("X-Request-Id", "edge-rid-42")])
        .unwrap();
    assert_eq!(r.header("x-request-id"), Some("edge-rid-42"));
    assert_eq!(
        echo_environ(&r, "fwd.example")["HTTP_X_REQUEST_ID"],
        "edge-rid-42"
    );
    // ...or generated when absent (or unusable).
    let r = edge.proxies[0]
        .get_with("fwd.example", "/", &[("X-Request-Id", "has spaces")])
        .unwrap();
    let id = r.header("x-request-id").expect("generated id").to_string();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "generated id {id:?}"
    );
    assert_eq!(
        echo_environ(&r, "fwd.example")["HTTP_X_REQUEST_ID"],
        id.as_str()
    );
    for id in ["edge-rid-42", id.as_str()] {
        let needle = format!("request_id={id}");
        assert!(
            wait_until(Duration::from_secs(5), || edge.proxies[0]
                .log()
                .contains(&needle)
                && edge.agents[0].log().contains(&needle)),
            "{id} not logged at both ends"
        );
    }
    // The proxy's own answers carry the id too.
    let r = edge.proxies[0]
        .get_with("nope.example", "/", &[("X-Request-Id", "edge-rid-404")])
        .unwrap();
    assert_eq!(
        (r.status, r.header("x-request-id")),
        (404, Some("edge-rid-404"))
    );
}

#[test]
fn wildcard_aliases_route_and_exact_names_win() {
    let mut edge = Edge::new("edge-wild");
    let user = alice();
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts::default());
    edge.put_echo_site(
        "wild.example",
        &user,
        json!({"aliases": ["*.wild.example", "www.alias.example"]}),
    );
    edge.put_echo_site("exact.wild.example", &user, json!({}));
    wait_200(&edge, 0, "exact.wild.example", "/");
    let p = &edge.proxies[0];
    for (host, site) in [
        ("wild.example", "wild.example"),
        ("www.alias.example", "wild.example"),
        ("anything.wild.example", "wild.example"),
        ("Deep.Er.Wild.Example.", "wild.example"),
        ("exact.wild.example", "exact.wild.example"),
        ("EXACT.wild.example:8080", "exact.wild.example"),
    ] {
        let r = wait_200(&edge, 0, host, "/");
        echo_environ(&r, site);
    }
    let r = p.get("wild.example.org", "/").unwrap();
    assert_eq!(r.status, 404);
    // Removing the exact site hands its name to the wildcard.
    edge.etcd.del(&format!("{PREFIX}/sites/exact.wild.example"));
    assert!(
        wait_until(SHOW, || p
            .get("exact.wild.example", "/")
            .is_ok_and(
                |r| r.status == 200 && r.json()["os_environ"]["ROOST_SITE"] == "wild.example"
            )),
        "the wildcard did not take over the name"
    );
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tls_certificates_by_sni_from_etcd_and_a_directory() {
    let mut edge = Edge::new("edge-tls");
    let user = alice();
    let certs = edge.root().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let work = edge.root().join("certwork");
    std::fs::create_dir_all(&work).unwrap();
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts {
        tls: true,
        cert_dir: Some(certs.clone()),
        ..Default::default()
    });
    edge.put_echo_site(
        "tls.example",
        &user,
        json!({"aliases": ["*.tls.example", "dir.example"]}),
    );
    wait_200(&edge, 0, "tls.example", "/");
    let p = &edge.proxies[0];
    let tls = p.tls_addr.unwrap();
    let pid = p.pid();
    assert_eq!(
        served_cert(tls, "tls.example"),
        None,
        "a handshake succeeded with no certificate"
    );

    let put_cert = |name: &str, cert: &str, key: &str| {
        edge.etcd.put(
            &format!("{PREFIX}/certs/{name}"),
            &json!({"cert": cert, "key": key}).to_string(),
        );
    };
    let (c1, k1) = make_cert(&work, "one", &["tls.example"]);
    put_cert("tls.example", &c1, &k1);
    assert!(
        wait_until(SHOW, || served_cert(tls, "tls.example").as_deref()
            == Some(first_cert(&c1).as_str())),
        "the certificate written to etcd is not served"
    );
    // A renewal is served on the next handshake, by the same process.
    let (c2, k2) = make_cert(&work, "two", &["tls.example"]);
    put_cert("tls.example", &c2, &k2);
    assert!(
        wait_until(SHOW, || served_cert(tls, "tls.example").as_deref()
            == Some(first_cert(&c2).as_str())),
        "the renewed certificate is not served"
    );
    assert_eq!(edge.proxies[0].pid(), pid);
    // A key that does not match is refused; the last good pair stays.
    put_cert("tls.example", &c1, &k2);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        served_cert(tls, "tls.example").as_deref(),
        Some(first_cert(&c2).as_str())
    );

    // curl, verifying against the certificate: HTTP/2, and the app sees https.
    let ca = work.join("two.crt.pem");
    let port = tls.port().to_string();
    let resolve = format!("tls.example:{port}:127.0.0.1");
    let url = format!("https://tls.example:{port}/");
    let (ok, out, err) = curl(&[
        "--resolve",
        &resolve,
        "--cacert",
        ca.to_str().unwrap(),
        "--http2",
        "-w",
        "\n%{http_version} %{http_code}",
        &url,
    ]);
    assert!(ok, "curl over TLS failed: {err}");
    let (body, tail) = out.rsplit_once('\n').unwrap();
    assert_eq!(tail, "2 200", "HTTP version and status over TLS");
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["environ"]["HTTP_X_FORWARDED_PROTO"], "https");
    // A request for a name the connection's certificate does not cover: 421.
    let (ok, out, err) = curl(&[
        "--resolve",
        &resolve,
        "--cacert",
        ca.to_str().unwrap(),
        "-H",
        "Host: dir.example",
        "-w",
        "\n%{http_code}",
        &url,
    ]);
    assert!(ok, "{err}");
    assert!(
        out.ends_with("\n421") && out.starts_with("421 Misdirected Request: "),
        "{out}"
    );

    // A wildcard certificate from etcd covers one more label.
    let (c3, k3) = make_cert(&work, "three", &["*.tls.example"]);
    put_cert("*.tls.example", &c3, &k3);
    assert!(
        wait_until(SHOW, || served_cert(tls, "a.tls.example").as_deref()
            == Some(first_cert(&c3).as_str())),
        "the wildcard certificate is not served"
    );
    assert_eq!(
        served_cert(tls, "tls.example").as_deref(),
        Some(first_cert(&c2).as_str())
    );

    // A pair dropped into the directory is picked up too.
    let (c4, k4) = make_cert(&work, "four", &["dir.example"]);
    std::fs::write(certs.join("dir.example.key"), &k4).unwrap();
    std::fs::write(certs.join("dir.example.crt"), &c4).unwrap();
    assert!(
        wait_until(SHOW, || served_cert(tls, "dir.example").as_deref()
            == Some(first_cert(&c4).as_str())),
        "the certificate from the directory is not served"
    );
    assert_eq!(served_cert(tls, "unknown.example"), None);
    // Plain HTTP stays.
    assert_eq!(edge.proxies[0].get("tls.example", "/").unwrap().status, 200);
    assert!(
        edge.proxies[0]
            .metric("roost_proxy_tls_invalid_certificates_total")
            .unwrap()
            >= 1.0
    );
}

fn pattern_sha256(len: u64) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import hashlib\np=bytes(range(256))*256\nh=hashlib.sha256()\nn={len}\nwhile n>0:\n k=min(n,len(p)); h.update(p[:k]); n-=k\nprint(h.hexdigest())"
        ))
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn uploads_downloads_and_websockets_stream_through() {
    const BIG: u64 = 128 * 1024 * 1024;
    let mut edge = Edge::new("edge-stream");
    let user = alice();
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts {
        toml: format!("max_body_bytes = {}\n", 2 * BIG),
        ..Default::default()
    });
    edge.put_edge_site("stream.example", &user, json!({}));
    wait_200(&edge, 0, "stream.example", "/echo");
    let (proxy_pid, agent_pid) = (edge.proxies[0].pid(), edge.agents[0].pid());
    let before = (
        peak_rss_kib(proxy_pid).unwrap(),
        peak_rss_kib(agent_pid).unwrap(),
    );
    let addr = edge.proxies[0].addr;
    let sha = pattern_sha256(BIG);

    for chunked in [false, true] {
        let r = post_stream(addr, "stream.example", "/upload", BIG, chunked).expect("upload");
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["bytes"], BIG, "chunked={chunked}");
        assert_eq!(v["sha256"], sha.as_str(), "chunked={chunked}");
    }
    let (status, n, intact) =
        get_counting(addr, "stream.example", &format!("/download?bytes={BIG}")).unwrap();
    assert_eq!((status, n, intact), (200, BIG, true));

    let after = (
        peak_rss_kib(proxy_pid).unwrap(),
        peak_rss_kib(agent_pid).unwrap(),
    );
    eprintln!(
        "peak RSS while moving 3 x 128 MiB: proxy {} -> {} KiB, agent {} -> {} KiB",
        before.0, after.0, before.1, after.1
    );
    // Held whole, one body alone would add 128 MiB.
    assert!(
        after.0 < before.0 + 48 * 1024,
        "proxy held bodies in memory: {before:?} -> {after:?}"
    );
    assert!(
        after.1 < before.1 + 48 * 1024,
        "agent held bodies in memory: {before:?} -> {after:?}"
    );

    // WebSocket: the upgrade passes through proxy and agent; bytes flow both ways after it.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: stream.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "closed during the upgrade: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    for msg in [&b"hello through the edge"[..], &[0u8, 1, 2, 255, 254][..]] {
        s.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    }
}

#[test]
fn limits_and_error_pages() {
    let mut edge = Edge::new("edge-limits");
    let user = alice();
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts {
        toml: "max_header_bytes = 4096\nmax_body_bytes = 65536\n[sites.\"big.example\"]\nmax_body_bytes = 0\n".into(),
        ..Default::default()
    });
    edge.put_edge_site("small.example", &user, json!({}));
    edge.put_edge_site("big.example", &user, json!({}));
    wait_200(&edge, 0, "small.example", "/echo");
    wait_200(&edge, 0, "big.example", "/echo");
    let p = &edge.proxies[0];
    let is_roost_page = |r: &roost_tests::Response, status: u16, title: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        assert!(
            r.text().starts_with(&format!("{status} {title}: ")),
            "not Roost's page: {:?}",
            r.text()
        );
        assert_eq!(r.header("x-roost-error"), Some("proxy"));
    };

    let r = post_stream(p.addr, "small.example", "/upload", 100 * 1024, false).unwrap();
    is_roost_page(&r, 413, "Content Too Large");
    let r = post_stream(p.addr, "small.example", "/upload", 100 * 1024, true).unwrap();
    is_roost_page(&r, 413, "Content Too Large");
    let r = post_stream(p.addr, "small.example", "/upload", 60 * 1024, true).unwrap();
    assert_eq!(
        (r.status, r.json()["bytes"].as_u64()),
        (200, Some(60 * 1024))
    );
    // curl, asking `Expect: 100-continue`: the refusal comes before the body is sent.
    let file = edge.root().join("100k.bin");
    std::fs::write(&file, vec![7u8; 100 * 1024]).unwrap();
    let (ok, out, err) = curl(&[
        "-H",
        "Host: small.example",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", file.display()),
        "-w",
        "\n%{http_code}",
        &format!("http://{}/upload", p.addr),
    ]);
    assert!(ok, "curl: {err}");
    assert!(
        out.starts_with("413 Content Too Large: ") && out.ends_with("\n413"),
        "{out}"
    );
    let r = post_stream(p.addr, "big.example", "/upload", 1024 * 1024, false).unwrap();
    assert_eq!(
        (r.status, r.json()["bytes"].as_u64()),
        (200, Some(1024 * 1024)),
        "per-site limit"
    );

    let long = "x".repeat(8192);
    let r = p
        .get_with("small.example", "/echo", &[("X-Long", &long)])
        .unwrap();
    is_roost_page(&r, 431, "Request Header Fields Too Large");
    let r = p.get("nope.example", "/").unwrap();
    is_roost_page(&r, 404, "Not Found");
    assert!(r.text().contains("no site is registered for nope.example"));
    let r = get(p.addr, Some("bad host!"), "/", &[]).unwrap();
    is_roost_page(&r, 400, "Bad Request");
    let r = get(p.addr, None, "/", &[]).unwrap();
    is_roost_page(&r, 400, "Bad Request");

    // No node reachable: 503 with a reason and Retry-After, not pingora's empty 502.
    edge.agents[0].kill();
    let r = edge.proxies[0].get("small.example", "/echo").unwrap();
    is_roost_page(&r, 503, "Service Unavailable");
    assert!(r.text().contains("small.example"), "{}", r.text());
    assert!(r.header("retry-after").is_some());
}

#[test]
fn binary_upgrade_hands_the_sockets_over_without_dropping_a_request() {
    let mut edge = Edge::new("edge-upgrade");
    let user = alice();
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts::default());
    edge.put_edge_site("upgrade.example", &user, json!({}));
    wait_200(&edge, 0, "upgrade.example", "/echo");
    let addr = edge.proxies[0].addr;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok) = (stop.clone(), ok.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    match get(addr, Some("upgrade.example"), "/slow?ms=20", &[]) {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failures.push(format!("{} {}", r.status, r.text())),
                        Err(e) => failures.push(e.to_string()),
                    }
                }
                failures
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let new = edge.start_proxy(ProxyOpts {
        upgrade_from: Some(0),
        no_wait: true,
        ..Default::default()
    });
    std::thread::sleep(Duration::from_secs(1));
    edge.proxies[0].signal(Signal::SIGQUIT);
    let old_exit = edge.proxies[0].wait_exit(Duration::from_secs(40));
    let served_before = ok.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Release);
    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let served = ok.load(Ordering::Relaxed);
    eprintln!(
        "upgrade: {served} requests answered 200, {} failed",
        failures.len()
    );
    assert!(
        old_exit.is_some_and(|s| s.success()),
        "old proxy did not exit cleanly: {old_exit:?}"
    );
    assert!(
        failures.is_empty(),
        "requests failed during the upgrade: {failures:?}"
    );
    assert!(
        served > served_before,
        "nothing was served after the old proxy exited"
    );
    assert_eq!(edge.proxies[new].readyz(), Some(200));
    assert!(
        edge.proxies[new].log().contains("request"),
        "the new proxy served nothing"
    );
}

#[test]
fn sites_of_two_users_both_route() {
    // Aliases across owners: each site keeps its own worker and uid.
    let mut edge = Edge::new("edge-owners");
    let (a, b) = (alice(), ensure_user(BOB));
    edge.start_agent("node-1", "");
    edge.start_proxy(ProxyOpts::default());
    edge.put_echo_site(
        "a.owners.example",
        &a,
        json!({"aliases": ["www.a.owners.example"]}),
    );
    edge.put_echo_site(
        "b.owners.example",
        &b,
        json!({"aliases": ["*.b.owners.example"]}),
    );
    for (host, site, user) in [
        ("www.a.owners.example", "a.owners.example", &a),
        ("x.b.owners.example", "b.owners.example", &b),
    ] {
        let r = wait_200(&edge, 0, host, "/");
        echo_environ(&r, site);
        assert_eq!(r.json()["uid"], user.uid);
    }
}
