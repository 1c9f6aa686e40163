//! Issue 15: gunicorn's corpus of invalid requests through a real proxy → agent → worker.
//! Every file gets a 4xx from Roost's proxy and nothing reaches the agent or the worker;
//! a file whose head never ends (`001.http`) gets no answer; the proxy serves a good request
//! after each file. The corpus directory is read whole, so a newer corpus dropped in works;
//! `ROOST_CORPUS_DIR` points the test at another one.
//!
//! Also: what the edge accepts still arrives intact (a chunked body with an allowed trailer,
//! one larger than the proxy reads ahead, an absolute-form target), and the agent applies
//! the same rules to what reaches it directly.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use roost_proto::canonical_host;
use roost_tests::http::parse;
use roost_tests::{ensure_user, get, site_dir, wait_until, Cluster, Response};

const USER: &str = "roost-t-corpus";
const RECORDER: &str = include_str!("../apps/recorder/app.py");
/// How long to wait for an answer to one corpus file. The client half-closes after sending,
/// so the proxy sees the end at once; this only bounds a proxy that hangs.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// Host of the site that answers the good requests.
const GOOD_HOST: &str = "example.com";

fn corpus_dir() -> PathBuf {
    match std::env::var_os("ROOST_CORPUS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("corpora/gunicorn-invalid-requests"),
    }
}

/// The corpus README's decoding rule: drop real newlines; `\r`, `\n`, `\0`, `\t` and `\xHH`
/// become those bytes; anything else stays as written.
fn decode(text: &[u8]) -> Vec<u8> {
    let text: Vec<u8> = text.iter().copied().filter(|&b| b != b'\n').collect();
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'\\' && i + 1 < text.len() {
            let esc = match text[i + 1] {
                b'r' => Some(b'\r'),
                b'n' => Some(b'\n'),
                b'0' => Some(0),
                b't' => Some(b'\t'),
                b'x' => text
                    .get(i + 2..i + 4)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok()),
                _ => None,
            };
            if let Some(b) = esc {
                out.push(b);
                i += if text[i + 1] == b'x' { 4 } else { 2 };
                continue;
            }
        }
        out.push(text[i]);
        i += 1;
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether the bytes hold the end of a request head: if not, a server must wait for more.
fn head_ends(bytes: &[u8]) -> bool {
    find(bytes, b"\r\n\r\n").is_some() || find(bytes, b"\n\n").is_some()
}

/// The hosts the corpus names in `Host:` lines that are valid site names.
fn corpus_hosts(files: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut hosts: Vec<String> = files
        .iter()
        .flat_map(|(_, bytes)| bytes.split(|&b| b == b'\n'))
        .filter_map(|line| {
            let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("host")
                .then(|| canonical_host(value).ok())?
        })
        .collect();
    hosts.push(GOOD_HOST.to_string());
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Send `bytes`, half-close, and read whatever comes back until EOF (or the timeout).
fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect to the proxy");
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    // The proxy may answer and close before reading everything: a failed write is fine.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    raw
}

/// Total requests the agent has handled (its request-path `logging` phase counts each).
fn agent_requests(cluster: &Cluster) -> f64 {
    let text = get(cluster.agent_admin, Some("localhost"), "/metrics", &[])
        .expect("agent metrics")
        .text();
    text.lines()
        .filter(|l| l.starts_with("roost_agent_requests_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Requests the worker was called for (the recorder's `start` lines).
fn seen_lines(seen: &Path) -> usize {
    seen_log(seen)
        .lines()
        .filter(|l| l.starts_with("start "))
        .count()
}

fn seen_log(seen: &Path) -> String {
    std::fs::read_to_string(seen).unwrap_or_default()
}

/// Who wrote a 4xx: Roost's proxy (its error page, or pingora's parser inside it before a
/// request exists). `None`: something else.
fn refused_by_proxy(resp: &Response) -> Option<&'static str> {
    if resp.header("x-roost-error") == Some("proxy") {
        return Some("roost error page");
    }
    let parser = resp.header("server") == Some("Pingora")
        && resp.status == 400
        && resp.body.is_empty()
        && resp.header("x-roost-error").is_none();
    parser.then_some("proxy's HTTP parser")
}

struct Setup {
    cluster: Cluster,
    seen: PathBuf,
}

/// A cluster with one recorder site per host in `hosts`, all writing the same `seen.log`.
fn setup(hosts: &[String]) -> Setup {
    let cluster = Cluster::start();
    let user = ensure_user(USER);
    let dir = site_dir(&cluster.root().join("sites"), &user, "recorder", RECORDER);
    for host in hosts {
        cluster.add_site(host, &user, &dir, &[]);
    }
    let seen = dir.join("seen.log");
    for host in hosts {
        cluster
            .wait_for_status(host, 200, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("site {host} never answered: {e}"));
    }
    Setup { cluster, seen }
}

#[test]
fn every_corpus_request_is_refused_by_the_proxy_and_none_reaches_a_worker() {
    let dir = corpus_dir();
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read corpus {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "http"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            (name, decode(&text))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .http files in {}", dir.display());

    let hosts = corpus_hosts(&files);
    let Setup { cluster, seen } = setup(&hosts);

    // The agent counts a request once it has answered it: let the setup's requests (one
    // answered by each site) be counted before the first file's count is taken.
    assert!(
        wait_until(Duration::from_secs(5), || agent_requests(&cluster)
            >= hosts.len() as f64),
        "the agent never counted the setup's requests"
    );
    let baseline = seen_lines(&seen);
    let mut refused = Vec::new();
    let mut unanswered = Vec::new();
    let mut failures = Vec::new();
    for (name, bytes) in &files {
        let (agent_before, seen_before) = (agent_requests(&cluster), seen_lines(&seen));
        let raw = send_raw(cluster.proxy_addr, bytes);
        let (agent_after, seen_after) = (agent_requests(&cluster), seen_lines(&seen));
        if agent_after != agent_before {
            failures.push(format!(
                "{name}: reached the agent ({agent_before} -> {agent_after} requests)"
            ));
        }
        if seen_after != seen_before {
            failures.push(format!(
                "{name}: reached the worker ({seen_before} -> {seen_after} requests seen)"
            ));
        }
        if raw.is_empty() {
            if head_ends(bytes) {
                failures.push(format!("{name}: no answer to a complete request head"));
            } else {
                unanswered.push(name.clone());
            }
        } else {
            match parse(&raw) {
                Ok(resp) if (400..500).contains(&resp.status) => match refused_by_proxy(&resp) {
                    Some(by) => refused.push(format!(
                        "{name}: {} by the {by}: {}",
                        resp.status,
                        resp.text().trim()
                    )),
                    None => failures.push(format!(
                        "{name}: {} not from the proxy: {:?} {}",
                        resp.status,
                        resp.headers,
                        resp.text()
                    )),
                },
                Ok(resp) => {
                    failures.push(format!("{name}: answered {} {}", resp.status, resp.text()))
                }
                Err(e) => failures.push(format!(
                    "{name}: unreadable answer ({e}): {:?}",
                    String::from_utf8_lossy(&raw)
                )),
            }
        }
        // The proxy keeps serving: a good request reaches the worker. The agent counts it
        // once it has answered, so wait for that before the next file's count is taken.
        match cluster.get(GOOD_HOST, "/after") {
            Ok(r) if r.status == 200 && r.text().starts_with("seen ") => {
                let counted = wait_until(Duration::from_secs(5), || {
                    agent_requests(&cluster) > agent_after
                });
                assert!(counted, "{name}: the agent never counted the good request");
            }
            Ok(r) => failures.push(format!(
                "{name}: the good request after it got {} {}",
                r.status,
                r.text()
            )),
            Err(e) => failures.push(format!("{name}: the good request after it failed: {e}")),
        }
    }
    eprintln!(
        "corpus {}: {} of {} answered 4xx by Roost's proxy; no answer (head never ends): {:?}",
        dir.display(),
        refused.len(),
        files.len(),
        unanswered
    );
    for line in &refused {
        eprintln!("  {line}");
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        cluster.diagnostics()
    );
    assert_eq!(refused.len() + unanswered.len(), files.len());
    // Every good request (one per file) and nothing else reached the worker.
    assert_eq!(
        seen_lines(&seen),
        baseline + files.len(),
        "{}",
        std::fs::read_to_string(&seen).unwrap_or_default()
    );
}

/// Send `request` and parse the answer (the request says `Connection: close`).
fn exchange(addr: SocketAddr, request: &[u8]) -> Response {
    let raw = roost_tests::http::exchange(addr, request).expect("exchange with the proxy");
    parse(&raw).unwrap_or_else(|e| {
        panic!(
            "unreadable answer ({e}): {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

#[test]
fn accepted_forms_reach_the_worker_intact() {
    let Setup { cluster, seen } = setup(&[GOOD_HOST.to_string()]);
    let before = seen_lines(&seen);

    // A chunked body with an allowed trailer: checked whole at the proxy, the trailer
    // dropped.
    let chunked = b"POST /chunked HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Checksum: 1\r\n\r\n";
    let r = exchange(cluster.proxy_addr, chunked);
    assert_eq!((r.status, r.text().as_str()), (200, "seen 11 body bytes\n"));

    // Absolute-form is routed by its authority (here with no Host at all) and reaches the
    // worker as origin-form.
    let absolute = b"GET http://example.com/abs?q=1 HTTP/1.1\r\nConnection: close\r\n\r\n";
    let r = exchange(cluster.proxy_addr, absolute);
    assert_eq!(r.status, 200, "{}", r.text());
    let log = seen_log(&seen);
    assert!(log.contains("done POST /chunked 11\n"), "{log}");
    assert!(log.contains("done GET /abs?q=1 0\n"), "{log}");

    // An absolute-form target naming another host than Host is refused at the proxy.
    let mismatch =
        b"GET http://other.example/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n";
    let r = exchange(cluster.proxy_addr, mismatch);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        refused_by_proxy(&r).is_some(),
        "{:?} {}",
        r.headers,
        r.text()
    );

    // A chunked body larger than the tap reads ahead streams through intact.
    let mut big = b"POST /big HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..8 {
        big.extend_from_slice(format!("{:x}\r\n", 32 * 1024).as_bytes());
        big.extend_from_slice(&vec![b'x'; 32 * 1024]);
        big.extend_from_slice(b"\r\n");
    }
    big.extend_from_slice(b"0\r\n\r\n");
    let r = exchange(cluster.proxy_addr, &big);
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "seen 262144 body bytes\n")
    );
    assert_eq!(
        seen_lines(&seen),
        before + 3,
        "{}",
        std::fs::read_to_string(&seen).unwrap()
    );
}

/// The agent applies the same rules to what reaches it directly (an old proxy, say): a
/// request with both Content-Length and Transfer-Encoding, carrying the proxy's credential,
/// is refused by the agent and never reaches the worker.
#[test]
fn the_agent_refuses_what_the_proxy_would() {
    let Setup { cluster, seen } = setup(&[GOOD_HOST.to_string()]);
    let before = seen_lines(&seen);
    let request = format!(
        "POST /p HTTP/1.1\r\nHost: example.com\r\nx-roost-site: example.com\r\nx-roost-auth: {}\r\n\
         Content-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        cluster.secret
    );
    let r = exchange(cluster.agent_addr, request.as_bytes());
    assert_eq!(
        (r.status, r.header("x-roost-error")),
        (400, Some("agent")),
        "{}",
        r.text()
    );
    assert!(
        r.text().contains("Content-Length and Transfer-Encoding"),
        "{}",
        r.text()
    );
    let request = format!(
        "GET foo/bar HTTP/1.1\r\nHost: example.com\r\nx-roost-site: example.com\r\nx-roost-auth: {}\r\nConnection: close\r\n\r\n",
        cluster.secret
    );
    let r = exchange(cluster.agent_addr, request.as_bytes());
    assert_eq!(
        (r.status, r.header("x-roost-error")),
        (400, Some("agent")),
        "{}",
        r.text()
    );
    assert_eq!(
        seen_lines(&seen),
        before,
        "{}",
        std::fs::read_to_string(&seen).unwrap_or_default()
    );
}

/// A bad chunk size after the first 64 KiB of a chunked body (past what the proxy reads
/// ahead, so the request already streams to the worker): the upstream request is aborted,
/// not completed. The worker was called, but never got the end of the body.
#[test]
fn a_bad_chunk_in_a_streamed_body_aborts_the_upstream_request() {
    let Setup { cluster, seen } = setup(&[GOOD_HOST.to_string()]);
    let mut request = b"POST /streamed HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..4 {
        request.extend_from_slice(format!("{:x}\r\n", 32 * 1024).as_bytes());
        request.extend_from_slice(&vec![b'x'; 32 * 1024]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"-5\r\nhello\r\n0\r\n\r\n");
    let raw = roost_tests::http::exchange(cluster.proxy_addr, &request).unwrap_or_default();
    if let Ok(r) = parse(&raw) {
        assert!(
            (400..600).contains(&r.status) && r.header("x-roost-error").is_some(),
            "the bad chunk was answered {} {:?}: {}",
            r.status,
            r.headers,
            r.text()
        );
    }
    // The worker may have been called (the head streamed on), but must not finish the body.
    std::thread::sleep(Duration::from_secs(1));
    let log = seen_log(&seen);
    eprintln!(
        "bad chunk after 128 KiB: answer {:?}; worker log:\n{log}",
        parse(&raw).map(|r| (r.status, r.text()))
    );
    assert!(
        !log.contains("done POST /streamed"),
        "the request was completed: {log}"
    );
    // The proxy keeps serving.
    let r = cluster.get(GOOD_HOST, "/after").expect("good request");
    assert_eq!((r.status, r.text().as_str()), (200, "seen 0 body bytes\n"));
}
