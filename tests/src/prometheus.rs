//! A real Prometheus server (Debian's `prometheus`) scraping the proxies and agents of a test
//! cluster every second, and the dashboards' panel queries evaluated through its HTTP API.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::bins::workspace_root;
use crate::http::get;
use crate::ports::free_addr;
use crate::process::{tail, Proc};
use crate::wait::wait_until;

pub const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Fast enough that a 5 s lease expiry shows up as several samples.
pub const SCRAPE_INTERVAL: &str = "1s";

pub struct Prometheus {
    pub addr: SocketAddr,
    proc: Proc,
}

impl Prometheus {
    /// Start Prometheus in `dir` scraping `proxies` (job `proxy`) and `agents` (job
    /// `agent`); wait until it is ready.
    pub fn start(dir: &Path, proxies: &[SocketAddr], agents: &[SocketAddr]) -> Prometheus {
        let list = |addrs: &[SocketAddr]| {
            addrs
                .iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: {SCRAPE_INTERVAL}\n\
                 scrape_configs:\n\
                 \x20 - job_name: proxy\n    static_configs:\n      - targets: [{}]\n\
                 \x20 - job_name: agent\n    static_configs:\n      - targets: [{}]\n",
                list(proxies),
                list(agents)
            ),
        )
        .expect("write prometheus.yml");
        let addr = free_addr();
        let mut cmd = Command::new(PROMETHEUS);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let mut proc = Proc::spawn(
            "prometheus",
            cmd,
            &dir.join("prometheus.log"),
            Signal::SIGTERM,
        );
        let ready = wait_until(Duration::from_secs(30), || {
            proc.exited().is_some()
                || get(addr, Some("localhost"), "/-/ready", &[]).is_ok_and(|r| r.status == 200)
        });
        assert!(
            ready && proc.exited().is_none(),
            "prometheus did not get ready ({:?}):\n{}",
            proc.exited(),
            tail(&proc.log(), 30)
        );
        Prometheus { addr, proc }
    }

    /// True once every target has been scraped successfully (`up` is 1 for all of them).
    pub fn all_targets_up(&self, targets: usize) -> bool {
        self.query("sum(up)")
            .ok()
            .and_then(|v| {
                v["data"]["result"][0]["value"][1]
                    .as_str()
                    .map(str::to_string)
            })
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(|n| n as usize == targets)
    }

    /// `/api/v1/query?query=...` at the current time.
    pub fn query(&self, promql: &str) -> Result<Value, String> {
        self.api(&format!("/api/v1/query?query={}", url_encode(promql)))
    }

    /// `/api/v1/query_range` from `start` to `end` (unix seconds) with `step` seconds.
    pub fn query_range(
        &self,
        promql: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Value, String> {
        self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
            url_encode(promql)
        ))
    }

    fn api(&self, path: &str) -> Result<Value, String> {
        let r = get(self.addr, Some("localhost"), path, &[]).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("status {}: not JSON ({e}): {}", r.status, r.text()))?;
        if v["status"] != "success" {
            return Err(format!("status {}: {v}", r.status));
        }
        Ok(v)
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}

/// Percent-encode everything but unreserved characters (RFC 3986).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A dashboard panel's queries, by the panel's title, from every `dashboards/*.json`.
pub fn panel_queries(title: &str) -> Vec<String> {
    let dir = workspace_root().join("dashboards");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read dashboard");
        let dash: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        collect_panel_queries(&dash["panels"], title, &mut found);
    }
    found
}

fn collect_panel_queries(panels: &Value, title: &str, out: &mut Vec<String>) {
    for p in panels.as_array().into_iter().flatten() {
        collect_panel_queries(&p["panels"], title, out);
        if p["title"] == title {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push(expr.to_string());
                }
            }
        }
    }
}

/// A panel query made concrete the way Grafana would for "all" in every variable: template
/// variables match anything, `$__rate_interval`, `$__interval` and `$__range` become `window`.
pub fn concrete(expr: &str, window: &str) -> String {
    let mut s = expr.to_string();
    for builtin in ["__rate_interval", "__interval", "__range"] {
        s = s
            .replace(&format!("${{{builtin}}}"), window)
            .replace(&format!("${builtin}"), window);
    }
    // `$name` and `${name}` of a template variable: inside a label matcher, "anything".
    while let Some(i) = s.find('$') {
        let rest = &s[i + 1..];
        let len = if let Some(stripped) = rest.strip_prefix('{') {
            stripped.find('}').map_or(rest.len(), |e| e + 2)
        } else {
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len())
        };
        s.replace_range(i..i + 1 + len, ".*");
    }
    s
}
