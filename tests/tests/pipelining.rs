//! Issue 12: HTTP/1.1 pipelining at the edge. A client may send its next requests before the
//! first response (RFC 9112 §9.3.2); the proxy serves them in order on the same connection.
//! pingora 0.9.0 dropped every pipelined request after the first (cloudflare/pingora#377,
//! #673); Roost turns on pingora 0.9.1's in-order pipelining for every client connection.
//! Real etcd, proxy, agent and a real worker (the echo app) behind raw TCP clients.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use roost_tests::http::{read_responses, Response};
use roost_tests::{ensure_user, Cluster};
use serde_json::Value;

const USER: &str = "roost-pipe";
const HOST: &str = "pipelined.example";

fn cluster_with_site() -> Cluster {
    let c = Cluster::start();
    let user = ensure_user(USER);
    let dir = c.echo_site_dir(&user, HOST);
    c.add_site(HOST, &user, &dir, &[]);
    c.wait_for_status(HOST, 200, Duration::from_secs(30))
        .unwrap_or_else(|last| panic!("{HOST} never answered 200: {last}\n{}", c.diagnostics()));
    c
}

fn connect(c: &Cluster) -> TcpStream {
    let s = TcpStream::connect(c.proxy_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn get_request(host: &str, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

/// The path the worker saw, from the echo app's report.
fn echoed_path(r: &Response) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = r.json();
    v["environ"]["PATH_INFO"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn closes(r: &Response) -> bool {
    r.header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
}

#[test]
fn three_pipelined_gets_are_answered_in_order_on_one_connection() {
    let c = cluster_with_site();
    let mut s = connect(&c);
    // All three in one write: the proxy reads them in one go, as it would from a pipelining client.
    let batch: String = ["/first", "/second", "/third"]
        .iter()
        .map(|p| get_request(HOST, p))
        .collect();
    s.write_all(batch.as_bytes()).unwrap();
    let (responses, closed) = read_responses(&mut s, 3);
    let paths: Vec<String> = responses.iter().map(echoed_path).collect();
    assert_eq!(
        paths,
        ["/first", "/second", "/third"],
        "pipelined requests must be answered in request order"
    );
    assert!(!closed && !responses.iter().any(closes));
    // The connection is still good for more.
    s.write_all(get_request(HOST, "/fourth").as_bytes())
        .unwrap();
    let (more, _) = read_responses(&mut s, 1);
    assert_eq!(echoed_path(&more[0]), "/fourth");
}

#[test]
fn a_pipelined_body_and_a_refusal_keep_their_places() {
    let c = cluster_with_site();
    let mut s = connect(&c);
    // A POST with a body between two GETs (the body must not be read as a request), and a
    // request for an unknown site, which the proxy itself answers 404, in between.
    let batch = format!(
        "{}POST /posted HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 27\r\n\r\nGET /not-a-request HTTP/1.1{}{}",
        get_request(HOST, "/one"),
        get_request("nobody-registered-this.example", "/two"),
        get_request(HOST, "/three"),
    );
    s.write_all(batch.as_bytes()).unwrap();
    let (responses, closed) = read_responses(&mut s, 4);
    assert_eq!(
        responses.len(),
        4,
        "closed after {} responses",
        responses.len()
    );
    assert_eq!(echoed_path(&responses[0]), "/one");
    assert_eq!(echoed_path(&responses[1]), "/posted");
    assert_eq!(
        responses[1].json()["environ"]["CONTENT_LENGTH"],
        "27",
        "the POST's body went to the POST"
    );
    assert_eq!(responses[2].status, 404, "{}", responses[2].text());
    assert_eq!(echoed_path(&responses[3]), "/three");
    assert!(!closed);
}

#[test]
fn a_plain_keep_alive_sequence_still_works() {
    let c = cluster_with_site();
    let mut s = connect(&c);
    for i in 0..5 {
        let path = format!("/seq-{i}");
        s.write_all(get_request(HOST, &path).as_bytes()).unwrap();
        let (r, closed) = read_responses(&mut s, 1);
        assert!(!closed, "closed after request {i}");
        assert!(
            !closes(&r[0]),
            "request {i} answered with Connection: close"
        );
        assert_eq!(echoed_path(&r[0]), path);
    }
}

#[test]
fn a_pipelined_chunked_body_is_checked_and_the_next_request_still_served() {
    let c = cluster_with_site();
    let mut s = connect(&c);
    // The proxy reads a chunked body ahead to check its framing (proxy/src/tap.rs); the
    // request after it must still be found where it starts.
    let batch = format!(
        "POST /chunked HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{}",
        get_request(HOST, "/after-chunked")
    );
    s.write_all(batch.as_bytes()).unwrap();
    let (responses, closed) = read_responses(&mut s, 2);
    assert_eq!(
        responses.len(),
        2,
        "closed after {} responses",
        responses.len()
    );
    assert_eq!(echoed_path(&responses[0]), "/chunked");
    assert_eq!(echoed_path(&responses[1]), "/after-chunked");
    assert!(!closed);
}
