//! Issue 9, "Memory": an agent keeps per-site state only for sites placed on it. A site whose
//! placement moves to another node gives back its worker, socket directory and cgroup on
//! the node it left. Real etcd, two real agents, a real proxy, real workers.

use std::time::Duration;

use roost_tests::edge::{Edge, ProxyOpts, PREFIX};
use roost_tests::{ensure_user, get, wait_until};
use serde_json::{json, Value};

const HOST: &str = "moving.example";
/// Deadline for a change in etcd to take effect on an agent or the proxy.
const SHOW: Duration = Duration::from_secs(20);

/// The agent's `/sites` table (with the cluster credential, in case the page needs it).
fn sites_of(edge: &Edge, agent: usize) -> Value {
    get(
        edge.agents[agent].admin,
        Some("localhost"),
        "/sites",
        &[("x-roost-auth", &edge.secret)],
    )
    .map(|r| r.json())
    .unwrap_or(Value::Null)
}

fn lists(sites: &Value, host: &str) -> bool {
    sites
        .as_array()
        .is_some_and(|a| a.iter().any(|s| s["host"] == host))
}

/// Request the site through the proxy with a request id; the node whose agent served it.
fn served_by(edge: &Edge, id: &str) -> String {
    let r = edge.proxies[0]
        .get_with(HOST, "/", &[("X-Request-Id", id)])
        .unwrap_or_else(|e| panic!("request {id}: {e}"));
    assert_eq!(r.status, 200, "{id}: {}\n{}", r.text(), edge.diagnostics());
    assert_eq!(r.json()["os_environ"]["ROOST_SITE"], HOST);
    edge.served_by(id)
        .unwrap_or_else(|| panic!("no agent logged {id}\n{}", edge.diagnostics()))
}

/// Every cgroup directory named after the site (v1 hierarchies or v2) on this host.
fn site_cgroups(host: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for root in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"] {
        let walker = walk(std::path::Path::new(root), 4);
        found.extend(walker.into_iter().filter(|p| p.ends_with(host)));
    }
    found
}

fn walk(dir: &std::path::Path, depth: usize) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if depth == 0 {
        return out;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(p.clone());
                out.extend(walk(&p, depth - 1));
            }
        }
    }
    out
}

#[test]
fn a_site_pinned_elsewhere_is_given_back_and_served_by_its_new_node() {
    let user = ensure_user("roost-t-alice");
    let mut edge = Edge::new("placement-moves");
    edge.start_agent("node-a", "");
    edge.start_agent("node-b", "");
    edge.start_proxy(ProxyOpts::default());
    edge.put_echo_site(HOST, &user, json!({ "node": "node-a" }));
    edge.proxies[0]
        .wait_status(HOST, "/", 200, SHOW)
        .unwrap_or_else(|last| panic!("{HOST} never 200: {last}\n{}", edge.diagnostics()));
    assert_eq!(served_by(&edge, "moves-1"), "node-a");

    let a_dir = edge.agents[0].state_dir.join("sites").join(HOST);
    assert!(
        a_dir.exists(),
        "node-a has no socket directory for the site"
    );
    assert!(lists(&sites_of(&edge, 0), HOST), "node-a's /sites");
    let cgroups_on_a = site_cgroups(HOST);
    assert!(
        !cgroups_on_a.is_empty(),
        "no cgroup for the site on this host (the agent logs which limits it uses)\n{}",
        edge.diagnostics()
    );

    // The operator pins the site to node-b (as `roostctl site set --node node-b` writes it).
    let key = format!("{PREFIX}/sites/{HOST}");
    let out = edge.etcd.etcdctl(&["get", &key, "--print-value-only"]);
    let mut spec: Value = serde_json::from_slice(&out.stdout).expect("site record is JSON");
    spec["node"] = json!("node-b");
    edge.etcd.put(&key, &spec.to_string());

    let given_back = wait_until(SHOW, || {
        !a_dir.exists() && !lists(&sites_of(&edge, 0), HOST)
    });
    assert!(
        given_back,
        "node-a kept the site: socket dir exists={}, /sites={}\n{}",
        a_dir.exists(),
        sites_of(&edge, 0),
        edge.diagnostics()
    );
    for cg in &cgroups_on_a {
        assert!(
            wait_until(Duration::from_secs(5), || !cg.exists()),
            "node-a's cgroup {} is still there",
            cg.display()
        );
    }
    assert!(
        edge.agents[0]
            .log()
            .contains("site given back: it is placed on another node"),
        "node-a did not log the give-back\n{}",
        edge.diagnostics()
    );

    // The proxy follows the pin: node-b serves from now on.
    let mut attempt = 0;
    let moved = wait_until(SHOW, || {
        attempt += 1;
        let id = format!("moves-probe-{attempt}");
        edge.proxies[0]
            .get_with(HOST, "/", &[("X-Request-Id", &id)])
            .is_ok_and(|r| r.status == 200)
            && edge.served_by(&id).as_deref() == Some("node-b")
    });
    assert!(
        moved,
        "node-b never served the site\n{}",
        edge.diagnostics()
    );
    assert_eq!(served_by(&edge, "moves-2"), "node-b");
    assert!(lists(&sites_of(&edge, 1), HOST), "node-b's /sites");
    assert!(
        !edge.agents[0].state_dir.join("sites").join(HOST).exists(),
        "node-a took the site again"
    );
}
