//! Issue 10, the cluster's trust: an authenticated store (must-show 4) and proxy ↔ agent
//! trust (must-show 6). etcd here runs as production should: TLS with client certificates
//! (`--client-cert-auth`) and `auth enable`, with `deploy/etcd/roles.sh`'s roles.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use roost_tests::bins::{bin, AGENT, CTL, PROXY};
use roost_tests::cluster::NODE_ID;
use roost_tests::ports::free_addr;
use roost_tests::secure_etcd::{agent_user, Pki, OPERATOR_USER, PROXY_USER};
use roost_tests::{ensure_user, Cluster, Options};

const USER: &str = "roost-t-trust";
const COLD_START: Duration = Duration::from_secs(30);
/// A binary refused by etcd must stop well within this.
const EXIT_WITHIN: Duration = Duration::from_secs(20);

#[test]
fn proxy_agent_and_roostctl_work_on_a_secured_etcd_each_with_its_least_privilege() {
    let c = Cluster::start_secured(Options::default());
    let user = ensure_user(USER);
    let host = "secure.example";
    let dir = c.echo_site_dir(&user, host);
    // roostctl as roost-operator: writes the site (and reads nodes to place it).
    c.add_site(host, &user, &dir, &[]);
    let r = c
        .wait_for_status(host, 200, COLD_START)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.diagnostics()));
    assert_eq!(r.status, 200);
    // The agent registered under its own role.
    assert!(c.etcd.get(&format!("/roost/nodes/{NODE_ID}")).is_some());

    // The roles are what deploy/etcd/roles.sh promises: the proxy's user can read but not
    // write; an agent's user can't write another node's key or any site.
    let tls = c.etcd.tls().expect("secured etcd");
    let as_user = |user: &str, args: &[&str]| {
        Command::new(bin(CTL))
            .arg("--etcd")
            .arg(c.etcd.url())
            .args(tls.client_args(user))
            .args(args)
            .output()
            .expect("run roostctl")
    };
    // The same credentials from roostctl's environment (ROOST_ETCD_*) instead of flags.
    let flags = tls.client_args(PROXY_USER);
    let flag = |name: &str| {
        let at = flags.iter().position(|f| f == name).unwrap();
        flags[at + 1].clone()
    };
    let ls = Command::new(bin(CTL))
        .env("ROOST_ETCD", c.etcd.url())
        .env("ROOST_ETCD_CA", flag("--etcd-ca"))
        .env("ROOST_ETCD_CERT", flag("--etcd-cert"))
        .env("ROOST_ETCD_KEY", flag("--etcd-key"))
        .env("ROOST_ETCD_USER", flag("--etcd-user"))
        .env("ROOST_ETCD_PASSWORD_FILE", flag("--etcd-password-file"))
        .args(["site", "ls"])
        .output()
        .expect("run roostctl");
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    assert!(String::from_utf8_lossy(&ls.stdout).contains(host));
    let dir_s = dir.to_str().unwrap();
    let add = [
        "site",
        "add",
        "evil.example",
        "--user",
        USER,
        "--app",
        "app:application",
        "--dir",
        dir_s,
    ];
    for who in [PROXY_USER.to_string(), agent_user(NODE_ID)] {
        let out = as_user(&who, &add);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{who} could add a site");
        assert!(err.contains("permission denied"), "{who}: {err}");
    }
    let forged = c
        .etcd
        .etcdctl_as(&agent_user(NODE_ID), &["put", "/roost/nodes/node-2", "{}"]);
    assert!(
        !forged.status.success(),
        "an agent wrote another node's key"
    );
    assert!(
        String::from_utf8_lossy(&forged.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&forged.stderr)
    );
    c.assert_running();
}

/// One way to be wrong, and the words the error must contain.
struct Wrong {
    what: &'static str,
    /// Replaces (flag, value) pairs of the correct `--etcd-*` flags.
    change: Vec<(&'static str, PathBuf)>,
    expect: &'static str,
}

#[test]
fn wrong_etcd_credentials_stop_each_binary_at_start_with_the_cause_named() {
    let c = Cluster::start_secured(Options::default());
    let tls = c.etcd.tls().expect("secured etcd");
    let scratch = c.root().join("wrong");
    std::fs::create_dir_all(&scratch).unwrap();
    let bad_password = scratch.join("bad.password");
    std::fs::write(&bad_password, "not-the-password\n").unwrap();
    let not_pem = scratch.join("not-a-ca.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let other = Pki::new(&scratch.join("pki"), "other");
    let stranger = other.issue("roost-proxy");

    let cases = [
        Wrong {
            what: "a wrong password",
            change: vec![("--etcd-password-file", bad_password.clone())],
            expect: "wrong user name or password",
        },
        Wrong {
            what: "a client certificate from another CA",
            change: vec![
                ("--etcd-cert", stranger.cert.clone()),
                ("--etcd-key", stranger.key.clone()),
            ],
            expect: "etcd rejected our client certificate",
        },
        Wrong {
            what: "a CA file that is not PEM",
            change: vec![("--etcd-ca", not_pem.clone())],
            expect: "--etcd-ca",
        },
        Wrong {
            what: "etcd's certificate checked against another CA",
            change: vec![("--etcd-ca", other.ca_cert())],
            expect: "cannot verify etcd's certificate",
        },
    ];

    for case in &cases {
        for component in [PROXY, AGENT, CTL] {
            let user = match component {
                PROXY => PROXY_USER.to_string(),
                AGENT => agent_user(NODE_ID),
                _ => OPERATOR_USER.to_string(),
            };
            let mut flags = tls.client_args(&user);
            for (flag, value) in &case.change {
                let at = flags.iter().position(|f| f == flag).expect("flag present");
                flags[at + 1] = value.to_str().unwrap().to_string();
            }
            let mut cmd = command_for(component, c.etcd.url(), &scratch, NODE_ID);
            cmd.args(&flags);
            let (status, output) = run_until_exit(cmd, &scratch.join(format!("{component}.out")));
            let status = status.unwrap_or_else(|| {
                panic!("{component} with {} kept running:\n{output}", case.what)
            });
            assert!(
                !status.success(),
                "{component} with {} succeeded:\n{output}",
                case.what
            );
            assert!(
                output.contains(case.expect),
                "{component} with {}: the error does not say {:?}:\n{output}",
                case.what,
                case.expect
            );
        }
    }

    // A role that lacks a permission is named too: an agent whose user may write only
    // node-1's key, started as node-2.
    let mut cmd = command_for(AGENT, c.etcd.url(), &scratch, "node-2");
    cmd.args(tls.client_args(&agent_user(NODE_ID)));
    let (status, output) = run_until_exit(cmd, &scratch.join("agent-node-2.out"));
    assert!(status.is_some_and(|s| !s.success()), "{output}");
    assert!(
        output.contains("permission denied") && output.contains("/roost/nodes/node-2"),
        "{output}"
    );
    c.assert_running();
}

/// The command line of `component` against `etcd`, everything else on free ports in `dir`.
fn command_for(component: &str, etcd: &str, dir: &Path, node_id: &str) -> Command {
    let mut cmd = Command::new(bin(component));
    cmd.arg("--etcd").arg(etcd);
    match component {
        PROXY => {
            cmd.arg("--listen")
                .arg(free_addr().to_string())
                .arg("--admin")
                .arg(free_addr().to_string());
        }
        AGENT => {
            let state = dir.join(format!("state-{}", free_addr().port()));
            cmd.args(["--node-id", node_id])
                .arg("--listen")
                .arg(free_addr().to_string())
                .arg("--admin")
                .arg(free_addr().to_string())
                .arg("--state-dir")
                .arg(state);
        }
        _ => {
            cmd.args(["node", "ls"]);
        }
    }
    cmd
}

/// Run `cmd` with its output in `out`; its exit status (`None` if still running after
/// [`EXIT_WITHIN`], then it is killed) and its output.
fn run_until_exit(mut cmd: Command, out: &Path) -> (Option<ExitStatus>, String) {
    let file = std::fs::File::create(out).expect("output file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if started.elapsed() > EXIT_WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(out).unwrap_or_default())
}

/// The node record an attacker who can write `/roost/nodes/` forges: their listener, with
/// a capacity that puts it first in every site's ranking.
fn forge_node(c: &Cluster, addr: std::net::SocketAddr) {
    c.etcd.put(
        "/roost/nodes/forged",
        &format!(r#"{{"addr":"{addr}","capacity":4000000000}}"#),
    );
    // The proxy ranks the forged node first once it has seen it (`where` ranks the same way).
    let ranked_first = wait_until(Duration::from_secs(10), || {
        let out = c.roostctl_ok(&["where", "victim.example"]);
        out.lines()
            .find(|l| l.contains("forged") || l.contains(NODE_ID))
            .is_some_and(|l| l.contains("forged"))
    });
    assert!(ranked_first, "the forged node is not ranked first");
    // The proxy learns of it through its own watch; give it the same moment.
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
fn with_mutual_tls_a_forged_node_record_never_receives_the_cluster_credential() {
    let c = Cluster::start_secured(Options::default());
    let user = ensure_user(USER);
    let dir = c.echo_site_dir(&user, "victim");
    c.add_site("victim.example", &user, &dir, &[]);
    c.wait_for_status("victim.example", 200, COLD_START)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.diagnostics()));

    // The attacker's TLS server: a certificate naming the node it forges, from a CA of its
    // own (it can't get one from the cluster's). It prints whatever it decrypts.
    let forger = Pki::new(&c.root().join("forger"), "forger");
    let cert = forger.issue_with_names("forged", "DNS:forged,IP:127.0.0.1");
    let addr = free_addr();
    let heard = c.root().join("forged-listener.out");
    let mut listener = KillOnDrop(
        Command::new("openssl")
            .args(["s_server", "-accept", &addr.to_string(), "-cert"])
            .arg(&cert.cert)
            .arg("-key")
            .arg(&cert.key)
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&heard).unwrap())
            .stderr(Stdio::from(
                std::fs::File::create(c.root().join("forged-listener.err")).unwrap(),
            ))
            .spawn()
            .expect("run openssl s_server"),
    );
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).is_ok()
    }));
    forge_node(&c, addr);

    let mut answered = 0;
    for _ in 0..10 {
        let r = c.get("victim.example", "/").expect("the proxy answers");
        assert!(
            r.status == 200 || r.status == 503,
            "status {}: {}",
            r.status,
            r.text()
        );
        answered += usize::from(r.status == 200);
    }
    listener.0.kill().ok();
    listener.0.wait().ok();
    let got = std::fs::read_to_string(&heard).unwrap_or_default()
        + &std::fs::read_to_string(c.root().join("forged-listener.err")).unwrap_or_default();
    // Not vacuous: the proxy did go to the forged node first, and refused its certificate.
    let proxy_log = c.proxy_log();
    assert!(
        proxy_log.contains("node=forged"),
        "the proxy never tried the forged node:\n{proxy_log}"
    );
    assert!(
        !got.contains(&c.secret),
        "the forged node got the secret:\n{got}"
    );
    assert!(!got.to_ascii_lowercase().contains("x-roost"), "{got}");
    assert!(
        !got.contains("GET /"),
        "the forged node got a request:\n{got}"
    );
    assert_eq!(answered, 10, "the real node should answer every request");

    // The agent's side: with the secret but without a proxy's certificate, no answer; with
    // the proxy's certificate, the site's.
    let request = format!(
        "GET / HTTP/1.1\r\nHost: victim.example\r\nx-roost-site: victim.example\r\n\
         x-roost-auth: {}\r\nConnection: close\r\n\r\n",
        c.secret
    );
    let mesh = c.root().join("mesh");
    let without = agent_tls_exchange(c.agent_addr, &mesh, None, &request);
    assert!(
        !without.contains("HTTP/1.1"),
        "the agent answered a client without a certificate:\n{without}"
    );
    let with = agent_tls_exchange(c.agent_addr, &mesh, Some("roost-proxy"), &request);
    assert!(
        with.contains("HTTP/1.1 200"),
        "the agent refused the proxy's certificate:\n{with}"
    );
    c.assert_running();
}

/// Send `request` to the agent over TLS with `openssl s_client`, checking the agent's
/// certificate against the mesh CA, presenting `client`'s certificate if given.
fn agent_tls_exchange(
    addr: std::net::SocketAddr,
    mesh: &Path,
    client: Option<&str>,
    request: &str,
) -> String {
    use std::io::Write;
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-quiet", "-connect", &addr.to_string()])
        .args(["-servername", NODE_ID, "-verify_return_error", "-CAfile"])
        .arg(mesh.join("mesh-ca.crt"));
    if let Some(name) = client {
        cmd.arg("-cert")
            .arg(mesh.join(format!("mesh-{name}.crt")))
            .arg("-key")
            .arg(mesh.join(format!("mesh-{name}.key")));
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl s_client");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(request.as_bytes()).ok();
    // Keep stdin open a moment: s_client stops at its end, before the answer arrives.
    let waiter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        drop(stdin);
    });
    let out = child.wait_with_output().expect("s_client output");
    let _ = waiter.join();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn without_agent_tls_a_forged_node_record_does_receive_the_secret_which_is_why_the_proxy_warns() {
    let c = Cluster::start();
    let user = ensure_user(USER);
    let dir = c.echo_site_dir(&user, "victim");
    c.add_site("victim.example", &user, &dir, &[]);
    c.wait_for_status("victim.example", 200, COLD_START)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.diagnostics()));
    assert!(c.proxy_log().contains("no --agent-ca"));

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let recorder = std::thread::spawn(move || {
        use std::io::Read;
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0u8; 16 * 1024];
        let n = conn.read(&mut got).unwrap_or(0);
        String::from_utf8_lossy(&got[..n]).into_owned()
    });
    forge_node(&c, addr);
    // The request goes to the forged node, which reads it and hangs up.
    let proxy = c.proxy_addr;
    let client =
        std::thread::spawn(move || roost_tests::get(proxy, Some("victim.example"), "/", &[]));
    let got = recorder.join().unwrap();
    let _ = client.join();
    assert!(
        got.contains(&c.secret),
        "expected the secret in clear text:\n{got}"
    );
}

fn wait_until(timeout: Duration, check: impl FnMut() -> bool) -> bool {
    roost_tests::wait_until(timeout, check)
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tenant_details_and_logs_need_the_secret_and_roostctl_never_sends_it_to_a_node_record() {
    let c = Cluster::start();
    let user = ensure_user(USER);
    let dir = c.echo_site_dir(&user, "private");
    c.add_site("private.example", &user, &dir, &[]);
    c.wait_for_status("private.example", 200, COLD_START)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.diagnostics()));

    // /sites names users and pids: not for whoever reaches the admin port.
    let anonymous = roost_tests::get(c.agent_admin, Some("localhost"), "/sites", &[]).unwrap();
    assert_eq!(anonymous.status, 403, "{}", anonymous.text());
    assert!(!anonymous.text().contains(USER));
    assert_eq!(c.agent_metric("roost_agent_admin_refused_total"), 1.0);
    assert!(c.agent_log().contains("admin request refused"));
    let with_secret =
        roost_tests::get(c.agent_admin, Some("localhost"), "/sites", &c.admin_auth()).unwrap();
    assert_eq!(with_secret.status, 200);
    assert!(with_secret.text().contains(USER), "{}", with_secret.text());

    // roostctl reads the log from the real node with a proof, not the secret.
    let secret_file = c.root().join("secret");
    let secret_flag = secret_file.to_str().unwrap();
    c.roostctl_ok(&[
        "site",
        "logs",
        "private.example",
        "--secret-file",
        secret_flag,
    ]);

    // A forged node record whose admin address is the test's listener.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = listener.local_addr().unwrap();
    let recorder = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0u8; 16 * 1024];
        let n = conn.read(&mut got).unwrap_or(0);
        let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
        String::from_utf8_lossy(&got[..n]).into_owned()
    });
    c.etcd.put(
        "/roost/nodes/forged",
        &format!(r#"{{"addr":"127.0.0.1:1","admin":"{admin}","capacity":1}}"#),
    );
    let out = c.roostctl(&[
        "site",
        "logs",
        "private.example",
        "--node",
        "forged",
        "--secret-file",
        secret_flag,
    ]);
    let got = recorder.join().unwrap();
    assert!(
        got.starts_with("GET /sites/private.example/log"),
        "roostctl did not ask the forged node: {got}\n{out:?}"
    );
    assert!(
        !got.contains(&c.secret),
        "the forged admin address got the secret:\n{got}"
    );
    let proof = got
        .lines()
        .find_map(|l| l.strip_prefix("x-roost-admin-proof: "))
        .unwrap_or_else(|| panic!("no proof header:\n{got}"))
        .trim()
        .to_string();
    // What it collected opens nothing else: replayed for /sites, the real agent refuses it.
    let replayed = roost_tests::get(
        c.agent_admin,
        Some("localhost"),
        "/sites",
        &[("x-roost-admin-proof", &proof)],
    )
    .unwrap();
    assert_eq!(replayed.status, 403);
    assert_eq!(c.agent_metric("roost_agent_admin_refused_total"), 2.0);
    c.assert_running();
}
