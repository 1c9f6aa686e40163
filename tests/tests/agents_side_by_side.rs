//! Several agents on one host (the local multi-node launcher; this suite's parallel
//! tests) must not touch each other's workers.

use std::time::Duration;

use roost_tests::process::{pid_exists, proc_state};
use roost_tests::{ensure_user, wait_until, Cluster};

#[test]
fn starting_a_second_agent_leaves_the_first_agents_workers_alone() {
    let alice = ensure_user("roost-t-alice");
    let first = Cluster::start();
    let host = "first.example";
    first.add_site(host, &alice, &first.echo_site_dir(&alice, host), &[]);
    let resp = first
        .wait_for_status(host, 200, Duration::from_secs(5))
        .unwrap_or_else(|last| panic!("{host} never 200; last: {last}\n{}", first.diagnostics()));
    let pid = resp.json()["pid"].as_u64().expect("pid") as u32;

    let second = Cluster::start();
    let other = "second.example";
    second.add_site(other, &alice, &second.echo_site_dir(&alice, other), &[]);
    if let Err(last) = second.wait_for_status(other, 200, Duration::from_secs(5)) {
        panic!("{other} never 200; last: {last}\n{}", second.diagnostics());
    }

    // The first agent's worker must live on (its idle timeout is the default 300 s).
    let killed = wait_until(Duration::from_secs(2), || !pid_exists(pid));
    assert!(
        !killed,
        "starting a second agent killed the first agent's worker {pid} (state now {:?})\n\
         --- first cluster ---\n{}\n--- second cluster ---\n{}",
        proc_state(pid),
        first.diagnostics(),
        second.diagnostics()
    );
    let resp = first
        .get(host, "/")
        .expect("first site after the second agent started");
    assert_eq!(resp.status, 200, "{}\n{}", resp.text(), first.diagnostics());
    assert_eq!(
        resp.json()["pid"].as_u64(),
        Some(pid as u64),
        "worker was replaced"
    );
}
