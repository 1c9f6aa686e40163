//! Roost at hosting-company size (issue 9), against a real etcd, real binaries and a real
//! Python worker:
//! - 100,000 site records (written in batched transactions): a proxy and an agent started
//!   on them become ready, route the last site's alias, route a site added afterwards
//!   without a restart, and `roostctl site ls --json` lists every one;
//! - a proxy cut off from etcd while sites change and etcd compacts lists again, in pages,
//!   and converges.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use roost_tests::bins::{bin, PROXY};
use roost_tests::cluster::{status_of, Cluster, PREFIX};
use roost_tests::http::{get, Response};
use roost_tests::ports::free_addr;
use roost_tests::process::Proc;
use roost_tests::users::{ensure_user, User};
use roost_tests::wait::{wait_for, wait_until};

const SITES: usize = 100_000;
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const ROUTE_TIMEOUT: Duration = Duration::from_secs(20);

fn host(i: usize) -> String {
    format!("site-{i:06}.scale.example")
}

fn alias(i: usize) -> String {
    format!("www.site-{i:06}.scale.example")
}

/// Write sites `range`, each with one alias, all served by `user` from `dir`.
fn load_sites(etcd_url: &str, range: std::ops::Range<usize>, user: &User, dir: &Path) {
    let records = range
        .map(|i| {
            let record = serde_json::json!({
                "user": user.name,
                "app": roost_tests::ECHO_ENTRY,
                "dir": dir,
                "aliases": [alias(i)],
            });
            (format!("{PREFIX}/sites/{}", host(i)), record.to_string())
        })
        .collect();
    roost_tests::bulk::put_all(etcd_url, records);
}

/// A roost-proxy of the test's own, on `etcd` (which may be a [`Relay`]), with the
/// cluster's secret. Returns it with its listen and admin addresses.
fn start_proxy(c: &Cluster, etcd: &str, tag: &str) -> (Proc, SocketAddr, SocketAddr) {
    let (listen, admin) = (free_addr(), free_addr());
    let mut cmd = Command::new(bin(PROXY));
    cmd.arg("--etcd")
        .arg(etcd)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--admin")
        .arg(admin.to_string())
        .arg("--secret-file")
        .arg(c.root().join("secret"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let log = c.root().join(format!("proxy-{tag}.log"));
    (Proc::spawn(tag, cmd, &log, Signal::SIGTERM), listen, admin)
}

fn wait_ready(proxy: &mut Proc, admin: SocketAddr) -> Duration {
    let started = Instant::now();
    let ready = wait_until(READY_TIMEOUT, || {
        proxy.exited().is_some() || status_of(admin, "/readyz") == Some(200)
    });
    let exited = proxy.exited();
    assert!(
        ready && exited.is_none(),
        "proxy {} not ready within {READY_TIMEOUT:?} ({exited:?}):\n{}",
        proxy.name(),
        roost_tests::process::tail(&proxy.log(), 30)
    );
    started.elapsed()
}

/// Poll `proxy` until `host` answers `status`.
fn wait_status(proxy: SocketAddr, host: &str, status: u16) -> Result<Response, String> {
    let mut last = String::from("no answer");
    wait_for(ROUTE_TIMEOUT, || match get(proxy, Some(host), "/", &[]) {
        Ok(r) if r.status == status => Some(r),
        Ok(r) => {
            last = format!("status {}: {}", r.status, r.text());
            None
        }
        Err(e) => {
            last = e.to_string();
            None
        }
    })
    .ok_or(last)
}

fn assert_served_by_site(resp: &Response, site: &str, user: &User) {
    assert_eq!(resp.status, 200, "{site}: {}", resp.text());
    let report = resp.json();
    assert_eq!(report["os_environ"]["ROOST_SITE"], site, "{report}");
    assert_eq!(report["uid"], user.uid, "{report}");
}

#[test]
fn a_hundred_thousand_sites_sync_route_and_list() {
    let mut c = Cluster::start();
    let user = ensure_user("roostscale");
    let dir = c.echo_site_dir(&user, "scale");
    let loaded = Instant::now();
    load_sites(c.etcd.url(), 0..SITES, &user, &dir);
    eprintln!("[scale] wrote {SITES} sites in {:?}", loaded.elapsed());

    // An agent and a proxy started on 100,000 sites: both list them in pages.
    c.signal_agent(Signal::SIGTERM);
    assert!(c.wait_agent_exit(Duration::from_secs(30)).is_some());
    c.restart_agent();
    let (mut proxy, listen, admin) = start_proxy(&c, c.etcd.url(), "proxy-100k");
    let took = wait_ready(&mut proxy, admin);
    eprintln!("[scale] proxy ready on {SITES} sites in {took:?}");
    let log = proxy.log();
    let first_sync = log
        .lines()
        .find(|l| l.contains("first sync complete") && l.contains("/sites/"))
        .unwrap_or_else(|| panic!("no first-sync line for sites:\n{log}"));
    assert!(
        first_sync.contains(&format!("records={SITES}")),
        "{first_sync}"
    );
    assert!(first_sync.contains("pages=100"), "{first_sync}");

    let last = SITES - 1;
    let resp = wait_status(listen, &alias(last), 200).unwrap_or_else(|e| {
        panic!(
            "the last site's alias through the new proxy: {e}\n{}",
            c.diagnostics()
        )
    });
    assert_served_by_site(&resp, &host(last), &user);
    // The cluster's own proxy took the 100,000 sites as watch events.
    let resp = c
        .wait_for_status(&alias(last), 200, ROUTE_TIMEOUT)
        .unwrap_or_else(|e| panic!("the last alias through the watching proxy: {e}"));
    assert_served_by_site(&resp, &host(last), &user);

    // A site added at this size is routed without a restart.
    let added = "added.scale.example";
    c.add_site(added, &user, &dir, &["--alias", "www.added.scale.example"]);
    let resp = wait_status(listen, "www.added.scale.example", 200)
        .unwrap_or_else(|e| panic!("the added site: {e}\n{}", c.diagnostics()));
    assert_served_by_site(&resp, added, &user);
    // Its alias is indexed, so a second site can't take it (checked without a scan).
    let clash = c.roostctl(&[
        "site",
        "add",
        "thief.scale.example",
        "--user",
        &user.name,
        "--app",
        roost_tests::ECHO_ENTRY,
        "--dir",
        dir.to_str().unwrap(),
        "--alias",
        "www.added.scale.example",
    ]);
    assert_eq!(clash.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&clash.stderr);
    assert!(
        stderr.contains("www.added.scale.example is an alias of site added.scale.example"),
        "{stderr}"
    );

    // `where` on an alias written by plain etcd puts (no index entry) still finds it.
    let located = c.roostctl_ok(&["--json", "where", &alias(12_345)]);
    let located: serde_json::Value = serde_json::from_str(&located).expect("where --json");
    assert_eq!(located["site"], host(12_345), "{located}");

    // `site ls --json` streams every site as one valid JSON array.
    let listed = c.roostctl_ok(&["--json", "site", "ls"]);
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&listed).expect("site ls --json is one JSON array");
    assert_eq!(rows.len(), SITES + 1);
    assert_eq!(rows.last().unwrap()["host"], host(last));
    assert!(rows.iter().any(|r| r["host"] == added));
    c.assert_running();
}

/// A TCP relay the test can cut: the proxy's only way to etcd.
struct Relay {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (open2, conns2) = (open.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !open2.load(Ordering::Acquire) {
                    drop(client); // refused while cut
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut list = conns2.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Relay { addr, open, conns }
    }

    /// Close every relayed connection and refuse new ones.
    fn cut(&self) {
        self.open.store(false, Ordering::Release);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::Release);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

#[test]
fn a_proxy_behind_a_compaction_relists_in_pages_and_converges() {
    const SOME_SITES: usize = 3_000;
    let c = Cluster::start();
    let user = ensure_user("roostscale");
    let dir = c.echo_site_dir(&user, "relist");
    load_sites(c.etcd.url(), 0..SOME_SITES, &user, &dir);
    let etcd_addr: SocketAddr = c
        .etcd
        .url()
        .trim_start_matches("http://")
        .parse()
        .expect("etcd URL is http://ip:port");
    let relay = Relay::start(etcd_addr);
    let (mut proxy, listen, admin) =
        start_proxy(&c, &format!("http://{}", relay.addr), "proxy-relayed");
    wait_ready(&mut proxy, admin);
    let doomed = host(7);
    assert_served_by_site(
        &wait_status(listen, &doomed, 200).expect("a preloaded site"),
        &doomed,
        &user,
    );

    // Cut the proxy off; while it can't see etcd, one site comes and one goes, and etcd
    // compacts past the revision the proxy would resume its watch from.
    relay.cut();
    let added = "late.scale.example";
    c.add_site(added, &user, &dir, &[]);
    c.roostctl_ok(&["site", "rm", &doomed]);
    let status = c.etcd.etcdctl(&["endpoint", "status", "--write-out=json"]);
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("endpoint status JSON");
    let revision = status[0]["Status"]["header"]["revision"]
        .as_i64()
        .expect("a revision in endpoint status");
    let compacted = c.etcd.etcdctl(&["compact", &revision.to_string()]);
    assert!(compacted.status.success(), "{compacted:?}");
    // Still cut: the proxy serves its last snapshot, which has no new site yet.
    let behind = get(listen, Some(added), "/", &[]).expect("the cut-off proxy answers");
    assert_eq!(behind.status, 404, "{}", behind.text());

    relay.restore();
    let resp = wait_status(listen, added, 200)
        .unwrap_or_else(|e| panic!("the site added during the gap: {e}\n{}", proxy.log()));
    assert_served_by_site(&resp, added, &user);
    wait_status(listen, &doomed, 404)
        .unwrap_or_else(|e| panic!("the site removed during the gap: {e}\n{}", proxy.log()));
    let log = proxy.log();
    assert!(
        log.contains("watch start revision was compacted; listing again"),
        "{log}"
    );
    let relisted = log
        .lines()
        .find(|l| l.contains("relisted") && l.contains("/sites/"))
        .unwrap_or_else(|| panic!("no relist of the sites:\n{log}"));
    // 3,000 sites, in pages of 1,000 (plus the last, shorter page).
    assert!(
        relisted.contains(&format!("records={SOME_SITES}")) && relisted.contains("pages=3"),
        "{relisted}"
    );
}
