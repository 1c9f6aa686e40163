//! Issue 13: metrics an operator can scrape, chart and alert on. Real etcd, real roost-proxy
//! and roost-agent binaries, real workers; `promtool` (Debian's `prometheus` package) judges
//! the exposition and the alerting rules; the dashboards' queries are checked against what
//! the binaries export right after start.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use roost_tests::edge::{metric_sum, metric_value, Edge, ProxyOpts};
use roost_tests::{ensure_user, get, site_dir, wait_until, Cluster, User, MISBEHAVE_APP};
use serde_json::{json, Value};

const CAROL: &str = "roost-m-carol";
const DASHBOARDS: [&str; 3] = ["edge.json", "nodes.json", "site.json"];
const SHOW: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

fn scrape(admin: SocketAddr) -> String {
    let r = get(admin, Some("localhost"), "/metrics", &[]).expect("scrape /metrics");
    assert_eq!(r.status, 200, "/metrics on {admin}: {}", r.text());
    r.text()
}

/// `promtool check metrics` on `text`: panics with promtool's complaint unless it passes.
fn promtool_check_metrics(what: &str, text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (deploy/install-deps.sh installs the prometheus package)");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics rejects the {what} metrics ({}):\n{}{}\n--- exposition ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// The metric names a scrape exports, with a histogram's (or summary's) own series names.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            names.insert(name.to_string());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// The metric names a PromQL expression reads: identifiers outside strings, label matchers
/// `{...}` and ranges `[...]`, that are not functions, keywords, or grouping labels.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 24] = [
        // aggregations: `sum by (le) (...)` puts its modifier before the parenthesis
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
    ];
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Depth of `{}` / `[]` (skipped), and whether a grouping keyword's list comes next.
    let (mut braces, mut brackets) = (0, 0);
    let mut grouping_next = false;
    let mut in_grouping = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                continue;
            }
            '{' => braces += 1,
            '}' => braces -= 1,
            '[' => brackets += 1,
            ']' => brackets -= 1,
            '(' if grouping_next => {
                in_grouping = true;
                grouping_next = false;
            }
            ')' if in_grouping => in_grouping = false,
            _ => {}
        }
        if c.is_ascii_digit() && braces == 0 {
            // A number (1e-9, 0.99): not an identifier.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if (c.is_ascii_alphabetic() || c == '_' || c == ':' || c == '$') && braces == 0 {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':' | '$'))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if brackets > 0 || in_grouping || word.starts_with('$') {
                continue;
            }
            if GROUPING.contains(&word.as_str()) {
                grouping_next = true;
                continue;
            }
            if next == Some(&'(') || KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                continue;
            }
            names.insert(word);
            continue;
        }
        i += 1;
    }
    names
}

/// Every PromQL expression of a Grafana dashboard: its panels' targets and its variables'
/// queries (`label_values(metric, label)`).
fn dashboard_exprs(board: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in board["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("?");
        for t in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((format!("panel {title:?}"), expr.to_string()));
            }
        }
    }
    for var in board["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = var["query"]["query"].as_str() {
            // label_values(metric, label): the metric is the first argument.
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.split(',').next())
                .unwrap_or(q);
            out.push((format!("variable {:?}", var["name"]), inner.to_string()));
        }
    }
    out
}

/// Every `expr:` of a rules file: one line, or a `>-` / `|` block of deeper-indented lines.
fn alert_exprs(yaml: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut alert = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            alert = name.trim().to_string();
        }
        if let Some(value) = trimmed.strip_prefix("expr:") {
            let value = value.trim();
            let indent = line.len() - trimmed.len();
            if value.starts_with('>') || value.starts_with('|') {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let l = lines[i + 1];
                    let t = l.trim_start();
                    if t.is_empty() || l.len() - t.len() > indent {
                        block.push(t);
                        i += 1;
                    } else {
                        break;
                    }
                }
                out.push((format!("alert {alert}"), block.join(" ")));
            } else {
                out.push((format!("alert {alert}"), value.to_string()));
            }
        }
        i += 1;
    }
    out
}

fn carol() -> User {
    ensure_user(CAROL)
}

/// Put a site record straight into etcd (for fields roostctl has no flag for).
fn put_site(c: &Cluster, host: &str, spec: &Value) {
    c.etcd
        .put(&format!("/roost/sites/{host}"), &spec.to_string());
}

fn agent_scrape(c: &Cluster) -> String {
    scrape(c.agent_admin)
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

// ---------------------------------------------------------------------------------------

#[test]
fn promtool_accepts_the_alerting_rules() {
    let rules = repo().join("dashboards/alerts.yml");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .expect("run promtool (deploy/install-deps.sh installs the prometheus package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules: {text}");
    // Every alert the issue asks for is there, and promtool found them all.
    let exprs = alert_exprs(&std::fs::read_to_string(&rules).unwrap());
    for name in [
        "RoostNoLiveNode",
        "RoostProxySnapshotStale",
        "RoostColdStartSlow",
        "RoostCrashLoop",
        "RoostSiteAtMemoryLimit",
    ] {
        assert!(
            exprs
                .iter()
                .any(|(what, _)| what == &format!("alert {name}")),
            "no alert {name}"
        );
    }
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "promtool and the test disagree on the rules: {text}"
    );
}

#[test]
fn the_promql_tokenizer_finds_metric_names_only() {
    let names = promql_metric_names(
        "histogram_quantile(0.99, sum by (le, launcher) (rate(roost_agent_cold_start_duration_seconds_bucket{instance=~\"$agent\",x=\"a{b}\"}[$__rate_interval]))) \
         / clamp_min(sum without (node) (roost_proxy_requests_total offset 5m), 1e-9) > bool 0.5 and on (instance) up",
    );
    let want: BTreeSet<String> = [
        "roost_agent_cold_start_duration_seconds_bucket",
        "roost_proxy_requests_total",
        "up",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names, want);
}

#[test]
fn every_metric_a_panel_or_alert_queries_is_exported_right_after_start() {
    let c = Cluster::start();
    let (proxy, agent) = (scrape(c.proxy_admin), agent_scrape(&c));
    let exported: BTreeSet<String> = exported_names(&proxy)
        .into_iter()
        .chain(exported_names(&agent))
        .collect();

    let mut queried = Vec::new();
    for file in DASHBOARDS {
        let text = std::fs::read_to_string(repo().join("dashboards").join(file))
            .unwrap_or_else(|e| panic!("dashboards/{file}: {e}"));
        let board: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("dashboards/{file}: {e}"));
        for (what, expr) in dashboard_exprs(&board) {
            queried.push((format!("{file} {what}"), expr));
        }
    }
    let rules = std::fs::read_to_string(repo().join("dashboards/alerts.yml")).unwrap();
    queried.extend(alert_exprs(&rules));
    assert!(queried.len() > 50, "only {} queries found", queried.len());

    // Per-site series exist only for sites with a worker (DESIGN.md: never one per site of
    // the cluster), so those names are checked once a site is warm, below.
    let per_site = |name: &str| name.starts_with("roost_agent_site_");
    let mut missing = Vec::new();
    let mut site_names = BTreeSet::new();
    let mut checked = BTreeSet::new();
    for (what, expr) in &queried {
        let names = promql_metric_names(expr);
        assert!(!names.is_empty(), "{what}: no metric in {expr}");
        for name in names {
            if per_site(&name) {
                site_names.insert(name.clone());
            } else if !exported.contains(&name) {
                missing.push(format!("{what}: {name}"));
            }
            checked.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not exported by a fresh cluster:\n{}",
        missing.join("\n")
    );

    // One warm site with a memory limit: every per-site name a panel or alert reads exists.
    let carol = carol();
    let dir = c.echo_site_dir(&carol, "warm");
    c.add_site("warm.example", &carol, &dir, &["--memory-limit-mb", "256"]);
    c.wait_for_status("warm.example", 200, SHOW)
        .unwrap_or_else(|last| panic!("warm.example: {last}\n{}", c.diagnostics()));
    let warm = exported_names(&agent_scrape(&c));
    let absent: Vec<_> = site_names.iter().filter(|n| !warm.contains(*n)).collect();
    assert!(
        absent.is_empty(),
        "per-site metrics queried but not exported for a warm site: {absent:?}"
    );
    eprintln!(
        "{} queries over {} distinct series names: all exported at start, the {} per-site ones once a site is warm",
        queried.len(),
        checked.len(),
        site_names.len()
    );
}

#[test]
fn promtool_accepts_both_outputs_before_and_after_serving_and_the_metrics_move() {
    let c = Cluster::start();
    promtool_check_metrics("fresh proxy", &scrape(c.proxy_admin));
    promtool_check_metrics("fresh agent", &agent_scrape(&c));
    let fresh = agent_scrape(&c);
    for name in [
        "roost_agent_cold_start_duration_seconds_count{launcher=\"zygote\"}",
        "roost_agent_cold_start_duration_seconds_count{launcher=\"direct\"}",
        "roost_agent_worker_spawns_total{launcher=\"zygote\"}",
        "roost_agent_worker_spawns_total{launcher=\"direct\"}",
        "roost_agent_worker_stops_total{reason=\"idle\"}",
        "roost_agent_rejected_total{reason=\"crash_loop\"}",
        "roost_agent_workers{state=\"ready\"}",
    ] {
        assert_eq!(sample(&fresh, name), 0.0, "{name} at start");
    }

    let carol = carol();
    // Cold start 1: a zygote site that stops when idle.
    let dir = c.echo_site_dir(&carol, "zyg");
    c.add_site("zyg.example", &carol, &dir, &["--idle-timeout", "1"]);
    // Cold start 2: a site that opted out of the zygote (no roostctl flag: straight to etcd).
    let dir = c.echo_site_dir(&carol, "direct");
    put_site(
        &c,
        "direct.example",
        &json!({"user": carol.name, "app": roost_tests::ECHO_ENTRY,
                "dir": dir.to_str().unwrap(), "spawn": "direct"}),
    );
    for host in ["zyg.example", "direct.example"] {
        c.wait_for_status(host, 200, SHOW)
            .unwrap_or_else(|last| panic!("{host}: {last}\n{}", c.diagnostics()));
    }
    let warm = agent_scrape(&c);
    assert!(
        warm.contains("roost_agent_site_requests_total{site=\"direct.example\"}"),
        "no per-site series for warm direct.example:\n{warm}"
    );
    // A worker that crashes on its first request (a spawn, a crash, no cold start: it never
    // answered), then cold start 3: the next request starts another.
    let dir = site_dir(&c.root().join("sites"), &carol, "crash", MISBEHAVE_APP);
    c.add_site("crash.example", &carol, &dir, &[]);
    let r = c.get("crash.example", "/crash").expect("crash request");
    assert!(r.status >= 500, "a crash answers 5xx, got {}", r.status);
    assert!(
        wait_until(SHOW, || c.agent_metric("roost_agent_worker_crashes_total")
            == 1.0),
        "crash not counted\n{}",
        c.diagnostics()
    );
    c.wait_for_status("crash.example", 200, SHOW)
        .unwrap_or_else(|last| panic!("crash.example after the crash: {last}"));
    let warm = agent_scrape(&c);
    assert!(
        warm.contains("roost_agent_site_requests_total{site=\"crash.example\"}"),
        "no per-site series for warm crash.example:\n{warm}"
    );
    let r = c.get("nobody.example", "/").expect("unknown host");
    assert_eq!(r.status, 404);

    // zyg.example's worker stops after 1 s without requests; its per-site series go with it.
    assert!(
        wait_until(SHOW, || c
            .agent_metric("roost_agent_worker_stops_total{reason=\"idle\"}")
            >= 1.0),
        "no idle stop\n{}",
        c.diagnostics()
    );
    assert!(
        wait_until(SHOW, || !agent_scrape(&c).contains("site=\"zyg.example\"")),
        "zyg.example's series outlived its worker:\n{}",
        agent_scrape(&c)
    );

    let (proxy, agent) = (scrape(c.proxy_admin), agent_scrape(&c));
    promtool_check_metrics("proxy after serving", &proxy);
    promtool_check_metrics("agent after serving", &agent);

    let cold = |l: &str| {
        sample(
            &agent,
            &format!("roost_agent_cold_start_duration_seconds_count{{launcher=\"{l}\"}}"),
        )
    };
    let spawns = |l: &str| {
        sample(
            &agent,
            &format!("roost_agent_worker_spawns_total{{launcher=\"{l}\"}}"),
        )
    };
    let mean_ms = |metric: &str, l: &str| {
        let series = |part: &str| format!("{metric}_{part}{{launcher=\"{l}\"}}");
        1000.0 * sample(&agent, &series("sum")) / sample(&agent, &series("count")).max(1.0)
    };
    for l in ["zygote", "direct"] {
        eprintln!(
            "{l}: {} cold starts, mean {:.1} ms; {} spawns, mean spawn {:.1} ms",
            cold(l),
            mean_ms("roost_agent_cold_start_duration_seconds", l),
            spawns(l),
            mean_ms("roost_agent_worker_spawn_duration_seconds", l),
        );
    }
    assert_eq!(
        cold("zygote") + cold("direct"),
        3.0,
        "the test made 3 cold starts (the crashed worker never answered)"
    );
    assert_eq!(cold("direct"), 1.0, "direct.example's start");
    assert_eq!(spawns("direct"), 1.0);
    assert_eq!(spawns("zygote"), 3.0, "zyg, the crash, crash.example again");
    assert_eq!(
        metric_sum(&agent, "roost_agent_worker_spawn_duration_seconds_count"),
        4.0
    );
    assert_eq!(sample(&agent, "roost_agent_worker_crashes_total"), 1.0);
    assert!(sample(&agent, "roost_agent_cold_start_waits_total") >= 4.0);
    assert_eq!(cold("zygote"), 2.0);
    // The proxy: the 404 is its own, the rest went to the one node.
    assert_eq!(
        sample(
            &proxy,
            "roost_proxy_rejected_total{reason=\"unknown_site\"}"
        ),
        1.0
    );
    assert_eq!(metric_value(&proxy, "roost_proxy_nodes"), Some(1.0));
    assert_eq!(metric_value(&proxy, "roost_proxy_sites"), Some(3.0));
    assert!(
        sample(
            &proxy,
            &format!(
                "roost_proxy_requests_total{{class=\"2xx\",node=\"{}\"}}",
                roost_tests::cluster::NODE_ID
            )
        ) >= 3.0
    );
    assert_eq!(
        sample(
            &proxy,
            "roost_proxy_requests_total{class=\"4xx\",node=\"none\"}"
        ),
        1.0
    );
    assert!(metric_sum(&proxy, "roost_proxy_upstream_duration_seconds_count") >= 3.0);
    assert_eq!(
        metric_value(&proxy, "roost_proxy_sites_awaiting_response"),
        Some(0.0)
    );
}

#[test]
fn the_proxy_counts_failovers_and_drops_a_dead_nodes_series() {
    let mut edge = Edge::new("metrics-failover");
    let user = carol();
    // A short lease: the dead node leaves the node set a few seconds after it dies.
    edge.start_agent("node-a", "lease_ttl_secs = 3\n");
    edge.start_agent("node-b", "lease_ttl_secs = 3\n");
    edge.start_proxy(ProxyOpts::default());
    edge.put_echo_site("failover.example", &user, json!({}));
    let p = &edge.proxies[0];
    p.wait_status("failover.example", "/", 200, SHOW)
        .unwrap_or_else(|last| panic!("not 200: {last}"));
    let before = scrape(p.admin);
    promtool_check_metrics("two-node proxy", &before);
    assert_eq!(metric_value(&before, "roost_proxy_nodes"), Some(2.0));
    for node in ["node-a", "node-b"] {
        assert!(
            before.contains(&format!("node=\"{node}\"")),
            "no series for {node} at start:\n{before}"
        );
    }
    let r = p
        .get_with("failover.example", "/", &[("X-Request-Id", "m-failover-1")])
        .unwrap();
    assert_eq!(r.status, 200);
    let first = edge.served_by("m-failover-1").expect("who served");
    let victim = edge.agents.iter().position(|a| a.id == first).unwrap();
    let failovers_before = metric_value(&before, "roost_proxy_failovers_total").unwrap();
    edge.agents[victim].kill();

    let r = p
        .get_with("failover.example", "/", &[("X-Request-Id", "m-failover-2")])
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let during = scrape(p.admin);
    assert_eq!(
        metric_value(&during, "roost_proxy_failovers_total"),
        Some(failovers_before + 1.0)
    );
    let survivor = edge.served_by("m-failover-2").expect("who served");
    assert_ne!(survivor, first);
    assert!(
        sample(
            &during,
            &format!("roost_proxy_requests_total{{class=\"2xx\",node=\"{survivor}\"}}")
        ) >= 1.0
    );

    // Once its lease expires the node leaves: the live-node count drops and its series go.
    assert!(
        wait_until(SHOW, || p.metric("roost_proxy_nodes") == Some(1.0)),
        "the dead node never left\n{}",
        edge.diagnostics()
    );
    let after = scrape(p.admin);
    assert!(
        !after.contains(&format!("node=\"{first}\"")),
        "the dead node's series outlived it:\n{after}"
    );
    promtool_check_metrics("proxy after a node loss", &after);

    // A node that joins draining (written by hand, as an operator may): counted as live and
    // as draining, with its request series at 0 from the moment it is known; gone with it.
    edge.etcd.put(
        "/roost/nodes/node-d",
        r#"{"addr": "127.0.0.1:9", "draining": true}"#,
    );
    assert!(
        wait_until(SHOW, || p.metric("roost_proxy_nodes") == Some(2.0)),
        "node-d never joined"
    );
    let joined = scrape(p.admin);
    assert_eq!(
        metric_value(&joined, "roost_proxy_draining_nodes"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &joined,
            "roost_proxy_requests_total{class=\"2xx\",node=\"node-d\"}"
        ),
        0.0
    );
    edge.etcd.del("/roost/nodes/node-d");
    assert!(
        wait_until(SHOW, || p.metric("roost_proxy_draining_nodes") == Some(0.0)),
        "node-d never left"
    );
    assert!(!scrape(p.admin).contains("node=\"node-d\""));
}

#[test]
fn the_readme_explains_every_panel_and_alert() {
    let readme = std::fs::read_to_string(repo().join("dashboards/README.md")).unwrap();
    let mut unexplained = Vec::new();
    for file in DASHBOARDS {
        let text = std::fs::read_to_string(repo().join("dashboards").join(file)).unwrap();
        let board: Value = serde_json::from_str(&text).unwrap();
        for panel in board["panels"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default();
            if panel["type"] != "row" && !readme.contains(&format!("| {title} |")) {
                unexplained.push(format!("{file}: panel {title:?}"));
            }
        }
    }
    let rules = std::fs::read_to_string(repo().join("dashboards/alerts.yml")).unwrap();
    for (what, _) in alert_exprs(&rules) {
        let name = what.trim_start_matches("alert ");
        if !readme.contains(&format!("| `{name}` |")) {
            unexplained.push(what);
        }
    }
    assert!(
        unexplained.is_empty(),
        "dashboards/README.md does not explain: {unexplained:?}"
    );
}

#[test]
fn the_alerts_fire_when_they_should_and_only_then() {
    // dashboards/alerts_test.yml feeds series shaped like real scrapes to the rules.
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(repo().join("dashboards/alerts_test.yml"))
        .output()
        .expect("run promtool (deploy/install-deps.sh installs the prometheus package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("SUCCESS"),
        "promtool test rules: {text}"
    );
}
