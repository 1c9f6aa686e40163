//! Issue 10: the tenant boundary. A site's user runs code of their own choosing as their own
//! uid (under `setpriv` here, as a shell account would) and tries to make root act for them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use roost_tests::{ensure_user, system_user, Cluster, User};

const ERIN: &str = "roost-t-erin";
const COLD_START: Duration = Duration::from_secs(30);
const RESTARTS: usize = 40;

/// The tenant's racer: in every directory under the state dir it can write, and over the
/// socket's names in the site's directory (listed or not), it renames a symlink to the
/// canary over each name, as fast as it can, until `stop` exists. Then it writes what it
/// tried: rename attempts, renames that succeeded, directories it could write.
const RACER: &str = r#"
import json, os, sys
state, canary, stop = sys.argv[1:4]
hosts = sys.argv[4:]
tries = renamed = 0
writable = set()
while not os.path.exists(stop):
    targets = []
    for d, dirs, files in os.walk(state):
        if os.access(d, os.W_OK):
            writable.add(d)
            targets += [(d, n) for n in files + dirs + ["sock", "sock.next"]]
    for h in hosts:
        d = os.path.join(state, "sites", h)
        targets += [(d, "sock"), (d, "sock.next")]
    for _ in range(50):
        for d, n in targets:
            tmp = os.path.join(d, ".race")
            tries += 1
            try:
                os.symlink(canary, tmp)
                os.rename(tmp, os.path.join(d, n))
                renamed += 1
            except OSError:
                pass
print(json.dumps({"tries": tries, "renamed": renamed, "writable": sorted(writable)}))
"#;

/// Run `python3 -c code args` as `user` (ids only, no groups), as a tenant's shell would.
fn as_tenant(user: &User, code: &str, args: &[&str]) -> std::process::Child {
    Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--clear-groups")
        .args(["/usr/bin/python3", "-c", code])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run setpriv (util-linux)")
}

fn owner_and_mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).expect("stat the canary");
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

#[test]
fn a_tenant_racing_symlinks_through_forty_agent_restarts_never_gets_root_to_touch_a_canary() {
    let mut c = Cluster::start();
    let erin = ensure_user(ERIN);
    let host = "race.example";
    let dir = c.echo_site_dir(&erin, host);
    c.add_site(host, &erin, &dir, &[]);
    c.wait_for_status(host, 200, COLD_START).unwrap();

    let canary = c.root().join("canary");
    std::fs::write(&canary, "root's").unwrap();
    std::fs::set_permissions(&canary, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = owner_and_mode(&canary);
    assert_eq!(before, (0, 0, 0o600));

    let stop = c.root().join("race-stop");
    let state = c.state_dir.to_str().unwrap().to_string();
    let mut racer = KillOnDrop(Some(as_tenant(
        &erin,
        RACER,
        &[
            &state,
            canary.to_str().unwrap(),
            stop.to_str().unwrap(),
            host,
        ],
    )));

    for round in 0..RESTARTS {
        // Half the rounds end the agent cleanly, half kill it: a killed agent leaves its
        // sockets behind for the next one to remove and re-create.
        let sig = if round % 2 == 0 {
            Signal::SIGTERM
        } else {
            Signal::SIGKILL
        };
        c.signal_agent(sig);
        c.wait_agent_exit(Duration::from_secs(15))
            .unwrap_or_else(|| panic!("agent did not exit on {sig:?}\n{}", c.diagnostics()));
        c.restart_agent();
        // The socket is made again on the first request; the canary is checked before
        // the answer (an agent that follows the tenant's symlink also fails to serve).
        let answered = c.wait_for_status(host, 200, COLD_START);
        assert_eq!(
            owner_and_mode(&canary),
            before,
            "round {round}: root changed the canary's owner or mode"
        );
        answered.unwrap_or_else(|e| panic!("round {round}: {e}\n{}", c.diagnostics()));
    }

    std::fs::write(&stop, "").unwrap();
    let out = racer.0.take().unwrap().wait_with_output().unwrap();
    assert!(out.status.success(), "the racer failed: {}", out.status);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["tries"].as_u64().unwrap() > 1000, "{report}");
    // The principle itself: nothing under the state dir is the tenant's to write.
    assert_eq!(report["writable"], serde_json::json!([]), "{report}");
    assert_eq!(report["renamed"], 0, "{report}");
    assert_eq!(owner_and_mode(&canary), before);
    eprintln!("racer: {report}");
}

#[test]
fn a_site_naming_a_system_user_gets_a_503_that_says_why_and_is_counted_while_its_neighbour_serves()
{
    let c = Cluster::start();
    let metrics = roost_tests::get(c.agent_admin, Some("localhost"), "/metrics", &[])
        .unwrap()
        .text();
    assert!(
        metrics
            .lines()
            .any(|l| l == "roost_agent_refused_site_users_total 0"),
        "the refusal counter exists from the start at 0"
    );
    let erin = ensure_user(ERIN);
    assert!(erin.uid >= 1000, "{erin:?}");
    let neighbour = c.echo_site_dir(&erin, "neighbour.example");
    c.add_site("neighbour.example", &erin, &neighbour, &[]);
    // `daemon` (uid 1) can enter the directory; only the node's policy stands in the way.
    let daemon = system_user("daemon");
    assert!(daemon.uid < 1000);
    let dir = c.echo_site_dir(&daemon, "system.example");
    c.add_site("system.example", &daemon, &dir, &[]);

    let r = c
        .wait_for_status("system.example", 503, COLD_START)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.diagnostics()));
    let page = r.text();
    assert!(
        page.contains("\"daemon\"") && page.contains("min_site_uid 1000"),
        "{page}"
    );
    assert!(c.agent_metric("roost_agent_refused_site_users_total") >= 1.0);
    assert!(
        c.agent_log()
            .contains("site refused: its user is not one sites may run as"),
        "{}",
        c.diagnostics()
    );
    // No process ever ran as daemon for the site.
    assert!(c.agent_sites().as_array().is_some_and(|sites| sites
        .iter()
        .all(|s| s["host"] != "system.example" || s["pid"].is_null())));
    c.wait_for_status("neighbour.example", 200, COLD_START)
        .unwrap();
    c.assert_running();
}

/// A virtualenv for `user` in `dir/venv`, made from the system python, whose `bin/python`
/// the tenant then points at `program`; with `claim_home`, its `pyvenv.cfg` also says it was
/// made from `program`'s directory.
fn doctored_venv(dir: &Path, user: &User, program: &Path, claim_home: bool) -> std::path::PathBuf {
    let venv = dir.join("venv");
    let out = Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .output()
        .expect("python3 -m venv");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python = venv.join("bin/python");
    std::fs::remove_file(&python).unwrap();
    std::os::unix::fs::symlink(program, &python).unwrap();
    if claim_home {
        let cfg = venv.join("pyvenv.cfg");
        let text = std::fs::read_to_string(&cfg).unwrap();
        let home = program.parent().unwrap().display().to_string();
        let text: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with("home") {
                    format!("home = {home}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(&cfg, text.join("\n") + "\n").unwrap();
    }
    let chown = Command::new("chown")
        .args(["-R", "-h", &format!("{}:{}", user.uid, user.gid)])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(chown.success());
    venv
}

#[test]
fn a_virtualenv_pointing_at_a_program_outside_the_allowlist_gets_a_503_and_the_program_never_runs()
{
    let c = Cluster::start();
    let erin = ensure_user(ERIN);
    // The tenant's pick: a root-owned program in a directory that is root's alone (as every
    // program in /usr/bin is), which records the uid it ran as.
    let ran = c.root().join("ran");
    std::fs::create_dir(&ran).unwrap();
    std::fs::set_permissions(&ran, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let libexec =
        Path::new("/usr/local/lib").join(format!("roost-t-tenant-{}", std::process::id()));
    std::fs::create_dir_all(&libexec).unwrap();
    let program = libexec.join("python3");
    std::fs::write(
        &program,
        format!("#!/bin/sh\nid -u >> {}/uids\nexit 1\n", ran.display()),
    )
    .unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _cleanup = Cleanup(libexec.clone());

    let put = |host: &str, claim_home: bool| {
        let dir = c.echo_site_dir(&erin, host);
        let venv = doctored_venv(&dir, &erin, &program, claim_home);
        let record = serde_json::json!({"user": erin.name, "app": "app:application",
            "dir": dir, "virtualenv": venv, "idle_timeout": 600});
        c.etcd
            .put(&format!("/roost/sites/{host}"), &record.to_string());
    };
    // The virtualenv claims to be made from the tenant's program: refused.
    put("evil.example", true);
    let r = c
        .wait_for_status("evil.example", 503, COLD_START)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.diagnostics()));
    let page = r.text();
    assert!(
        page.contains("not from an interpreter this node allows")
            && page.contains(&libexec.display().to_string()),
        "{page}"
    );
    assert!(c.agent_metric("roost_agent_refused_interpreters_total") >= 1.0);
    // Only `bin/python` points at it: the allowed interpreter's zygote serves the site and
    // the link is never followed.
    put("linked.example", false);
    c.wait_for_status("linked.example", 200, COLD_START)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.diagnostics()));
    let _ = c.get("evil.example", "/");
    assert!(
        !ran.join("uids").exists(),
        "the tenant's program ran as uid(s) {}",
        std::fs::read_to_string(ran.join("uids")).unwrap_or_default()
    );
}

/// Removes a directory the test made outside its temp root, also when it panics.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ends the tenant's racer if the test panics before it is told to stop.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
