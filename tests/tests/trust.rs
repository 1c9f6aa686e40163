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
    let ls = as_user(PROXY_USER, &["site", "ls"]);
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
