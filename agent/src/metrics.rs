//! The agent's Prometheus metrics (`roost_agent_*`, base units, counters for counts), on
//! the admin port's `/metrics`.
//!
//! Every series of a bounded label set (status class, refusal reason, launcher, stop
//! reason, worker state) exists from start at 0. Per-site series (`site` label) exist only
//! for sites with a worker on this node and go when its last worker does, so their number
//! follows the warm sites (at most `max_workers`), never every site of the cluster.

use std::collections::HashSet;

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::launch::LauncherKind;
use crate::site::{SiteStatus, StopReason};

/// The status classes of `roost_runtime::status_class`; "none": no response was written.
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// Reasons the agent answers a request itself (`AgentHttp::refuse`), beyond the
/// request-acceptance rules' own (`Refusal::LABELS`). `crash_loop` to `start_failed` are
/// refusals while a site is cold; `too_many_requests` is a site's concurrency limit.
pub const AGENT_REFUSALS: [&str; 9] = [
    "forbidden",
    "no_site",
    "unknown_site",
    "shutting_down",
    "crash_loop",
    "start_queue_full",
    "at_capacity",
    "start_failed",
    "too_many_requests",
];

/// The worker states of `roost_agent_workers`.
pub const WORKER_STATES: [&str; 3] = ["starting", "ready", "draining"];

/// Cold-start buckets (seconds): a zygote fork answers in tens of milliseconds, a direct
/// gunicorn start in a few hundred, a slow app up to the start timeout.
const COLD_START_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];

/// Per-site latency buckets: few, since there is one set per warm site.
const SITE_LATENCY_BUCKETS: [f64; 8] = [0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub rejected: IntCounterVec,
    /// Admin requests for `/sites` or a site's log refused for want of the secret.
    pub admin_refused: IntCounter,
    /// Requests that found their site's worker not started (or not answered) yet and waited.
    pub cold_waits: IntCounter,
    /// Request accepted → first response byte of a new worker, by launcher.
    pub cold_start: HistogramVec,
    /// The launcher's part of a start (user, cgroup, fork from the zygote or exec), by launcher.
    pub spawn_duration: HistogramVec,
    pub spawns: IntCounterVec,
    pub worker_stops: IntCounterVec,
    pub worker_crashes: IntCounter,
    pub workers: IntGaugeVec,
    pub max_workers: IntGauge,
    pub capacity_used: Gauge,
    pub invalid_records: IntCounter,
    pub refused_site_users: IntCounter,
    pub refused_interpreters: IntCounter,
    pub spec_change_failures: IntCounter,
    pub etcd_revision: IntGauge,
    pub snapshot_staleness: Gauge,
    pub sites_known: IntGauge,
    pub lease_losses: IntCounter,
    pub start_timeouts: IntCounter,
    pub memory_limit_kills: IntCounter,
    pub limit_failures: IntCounter,
    site_requests: IntCounterVec,
    site_duration: HistogramVec,
    pub warm_calls: IntCounter,
    pub preconnects: IntCounterVec,
    site_in_flight: IntGaugeVec,
    site_memory_bytes: IntGaugeVec,
    site_memory_limit_bytes: IntGaugeVec,
    site_cpu_seconds: CounterVec,
    frameworks: FrameworkMetrics,
}

/// The framework zygotes (issue 14), read from `launch::framework_zygotes` at each scrape.
/// Per-framework series (`framework` label: the set's packages) exist while its zygote
/// does, at most `frameworks_max` of them.
struct FrameworkMetrics {
    zygotes: IntGauge,
    modules: IntGaugeVec,
    rss_bytes: IntGaugeVec,
    pid: IntGaugeVec,
    left_out: IntCounterVec,
    forks: IntCounterVec,
    reports_refused: IntCounter,
}

impl FrameworkMetrics {
    fn new() -> Self {
        let per_framework = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["framework"]).expect("valid metric")
        };
        Self {
            zygotes: gauge(
                "roost_agent_framework_zygotes",
                "Framework zygotes running: forks of a base zygote that preload a framework several sites share",
            ),
            modules: per_framework(
                "roost_agent_framework_zygote_modules",
                "Modules a framework zygote preloaded, per framework (its packages)",
            ),
            rss_bytes: per_framework(
                "roost_agent_framework_zygote_rss_bytes",
                "Resident memory of a framework zygote, per framework",
            ),
            pid: per_framework(
                "roost_agent_framework_zygote_pid",
                "Process id of a framework zygote, per framework (its workers' parent)",
            ),
            left_out: counter_vec(
                "roost_agent_framework_modules_left_out_total",
                "Modules kept out of framework zygotes, by reason (failed to import, side effect, not root's, forbidden)",
                "reason",
            ),
            forks: counter_vec(
                "roost_agent_zygote_forks_total",
                "Workers forked from a zygote, by zygote (base: the interpreter's; framework: one that preloads the site's framework)",
                "zygote",
            ),
            reports_refused: counter(
                "roost_agent_framework_reports_refused_total",
                "Workers' module reports refused as malformed (too large, bad names)",
            ),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.zygotes.clone()),
            Box::new(self.modules.clone()),
            Box::new(self.rss_bytes.clone()),
            Box::new(self.pid.clone()),
            Box::new(self.left_out.clone()),
            Box::new(self.forks.clone()),
            Box::new(self.reports_refused.clone()),
        ]
    }

    fn refresh(&self) {
        let Some(fw) = crate::launch::zygote::global().and_then(|z| z.frameworks()) else {
            return;
        };
        let stats = fw.stats();
        self.zygotes.set(stats.zygotes.len() as i64);
        self.modules.reset();
        self.rss_bytes.reset();
        self.pid.reset();
        for (name, pid, modules, rss) in &stats.zygotes {
            self.modules.with_label_values(&[name]).set(*modules as i64);
            self.rss_bytes.with_label_values(&[name]).set(*rss as i64);
            self.pid.with_label_values(&[name]).set(*pid as i64);
        }
        let catch_up = |c: &IntCounter, total: u64| {
            if total > c.get() {
                c.inc_by(total - c.get());
            }
        };
        for (reason, n) in stats.left_out {
            catch_up(&self.left_out.with_label_values(&[reason]), n);
        }
        catch_up(&self.forks.with_label_values(&["base"]), stats.forks_base);
        catch_up(
            &self.forks.with_label_values(&["framework"]),
            stats.forks_framework,
        );
        catch_up(&self.reports_refused, stats.reports_refused);
    }
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn counter_vec(name: &str, help: &str, label: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

fn site_gauge(name: &str, help: &str) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), &["site"]).expect("valid metric")
}

fn histogram(name: &str, help: &str, label: &str, buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        &[label],
    )
    .expect("valid metric")
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::new(),
            requests: counter_vec(
                "roost_agent_requests_total",
                "Requests answered, by status class",
                "class",
            ),
            rejected: counter_vec(
                "roost_agent_rejected_total",
                "Requests refused before reaching a worker, by reason",
                "reason",
            ),
            admin_refused: counter(
                "roost_agent_admin_refused_total",
                "Admin requests for /sites or a site's log refused without the cluster secret",
            ),
            cold_waits: counter(
                "roost_agent_cold_start_waits_total",
                "Requests that waited for their site's worker to start",
            ),
            cold_start: histogram(
                "roost_agent_cold_start_duration_seconds",
                "Cold start: a request accepted by the agent until the first response byte of the new worker it started, by launcher",
                "launcher",
                &COLD_START_BUCKETS,
            ),
            spawn_duration: histogram(
                "roost_agent_worker_spawn_duration_seconds",
                "The launcher's part of a cold start: user lookup, cgroup, and the fork from the zygote (or the exec), by launcher",
                "launcher",
                &COLD_START_BUCKETS,
            ),
            spawns: counter_vec(
                "roost_agent_worker_spawns_total",
                "Workers started, by launcher (zygote: forked from a preloaded interpreter; direct: fork and exec)",
                "launcher",
            ),
            worker_stops: counter_vec(
                "roost_agent_worker_stops_total",
                "Workers asked to stop, by reason (idle, evicted, memory_limit, ...)",
                "reason",
            ),
            worker_crashes: counter(
                "roost_agent_worker_crashes_total",
                "Workers that exited without being asked to",
            ),
            workers: IntGaugeVec::new(
                Opts::new(
                    "roost_agent_workers",
                    "Worker processes, by state (starting: not answered yet; ready; draining: asked to stop)",
                ),
                &["state"],
            )
            .expect("valid metric"),
            max_workers: gauge(
                "roost_agent_max_workers",
                "The node's worker limit (max_workers)",
            ),
            capacity_used: Gauge::new(
                "roost_agent_capacity_used_ratio",
                "Worker slots held (starting, running or stopping) / max_workers",
            )
            .expect("valid metric"),
            invalid_records: counter(
                "roost_agent_invalid_site_records_total",
                "Invalid site records seen in etcd since start",
            ),
            refused_site_users: counter(
                "roost_agent_refused_site_users_total",
                "Worker starts refused because the site names a user outside min_site_uid / site_group",
            ),
            refused_interpreters: counter(
                "roost_agent_refused_interpreters_total",
                "Worker starts refused because the site's python or virtualenv is outside the interpreters allowlist",
            ),
            spec_change_failures: counter(
                "roost_agent_spec_change_failures_total",
                "Changed site specs whose new worker failed, so the previous spec's worker kept serving",
            ),
            etcd_revision: gauge(
                "roost_agent_etcd_revision",
                "The etcd revision of the agent's site snapshot",
            ),
            snapshot_staleness: Gauge::new(
                "roost_agent_snapshot_staleness_seconds",
                "Time since etcd last confirmed the agent's site snapshot",
            )
            .expect("valid metric"),
            sites_known: gauge("roost_agent_sites", "Valid sites in the agent's snapshot"),
            lease_losses: counter(
                "roost_agent_lease_losses_total",
                "Times the node's lease was lost and the node re-registered",
            ),
            start_timeouts: counter(
                "roost_agent_worker_start_timeouts_total",
                "Workers killed for not answering within the start timeout",
            ),
            memory_limit_kills: counter(
                "roost_agent_worker_memory_limit_kills_total",
                "Worker processes killed for exceeding their site's memory limit (kernel OOM in the site's cgroup, or the RSS watchdog)",
            ),
            limit_failures: counter(
                "roost_agent_limit_failures_total",
                "Workers started without kernel limits because their cgroup could not be set up",
            ),
            warm_calls: counter(
                "roost_agent_warm_calls_total",
                "Proxies' warm calls: start a site's worker ahead of its request",
            ),
            preconnects: counter_vec(
                "roost_agent_preconnects_total",
                "Connections a warm call opened to the worker it started, by what became of them",
                "outcome",
            ),
            site_requests: counter_vec(
                "roost_agent_site_requests_total",
                "Requests answered, per site with a worker (the series goes with the worker)",
                "site",
            ),
            site_duration: histogram(
                "roost_agent_site_request_duration_seconds",
                "Time to answer a request at the agent, per site with a worker",
                "site",
                &SITE_LATENCY_BUCKETS,
            ),
            site_in_flight: site_gauge(
                "roost_agent_site_requests_in_flight",
                "Requests in flight, per site with a worker",
            ),
            site_memory_bytes: site_gauge(
                "roost_agent_site_memory_bytes",
                "Memory charged to the site's cgroup, per site with a worker",
            ),
            site_memory_limit_bytes: site_gauge(
                "roost_agent_site_memory_limit_bytes",
                "The site's memory limit, per site with a worker and a limit",
            ),
            site_cpu_seconds: CounterVec::new(
                Opts::new(
                    "roost_agent_site_cpu_seconds_total",
                    "CPU time used by the site's workers, per site with a worker",
                ),
                &["site"],
            )
            .expect("valid metric"),
            frameworks: FrameworkMetrics::new(),
        };
        let mut collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.admin_refused.clone()),
            Box::new(m.cold_waits.clone()),
            Box::new(m.cold_start.clone()),
            Box::new(m.spawn_duration.clone()),
            Box::new(m.spawns.clone()),
            Box::new(m.worker_stops.clone()),
            Box::new(m.worker_crashes.clone()),
            Box::new(m.workers.clone()),
            Box::new(m.max_workers.clone()),
            Box::new(m.capacity_used.clone()),
            Box::new(m.invalid_records.clone()),
            Box::new(m.refused_site_users.clone()),
            Box::new(m.refused_interpreters.clone()),
            Box::new(m.spec_change_failures.clone()),
            Box::new(m.etcd_revision.clone()),
            Box::new(m.snapshot_staleness.clone()),
            Box::new(m.sites_known.clone()),
            Box::new(m.lease_losses.clone()),
            Box::new(m.start_timeouts.clone()),
            Box::new(m.memory_limit_kills.clone()),
            Box::new(m.limit_failures.clone()),
            Box::new(m.site_requests.clone()),
            Box::new(m.site_duration.clone()),
            Box::new(m.warm_calls.clone()),
            Box::new(m.preconnects.clone()),
            Box::new(m.site_in_flight.clone()),
            Box::new(m.site_memory_bytes.clone()),
            Box::new(m.site_memory_limit_bytes.clone()),
            Box::new(m.site_cpu_seconds.clone()),
        ];
        collectors.extend(m.frameworks.collectors());
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        for class in STATUS_CLASSES {
            m.requests.with_label_values(&[class]);
        }
        for reason in roost_proto::request_rules::Refusal::LABELS
            .iter()
            .chain(AGENT_REFUSALS.iter())
        {
            m.rejected.with_label_values(&[reason]);
        }
        for outcome in crate::preconnect::Outcome::ALL {
            m.preconnects.with_label_values(&[outcome.label()]);
        }
        for kind in LauncherKind::ALL {
            m.cold_start.with_label_values(&[kind.as_str()]);
            m.spawn_duration.with_label_values(&[kind.as_str()]);
            m.spawns.with_label_values(&[kind.as_str()]);
        }
        for reason in StopReason::ALL {
            m.worker_stops.with_label_values(&[reason.as_str()]);
        }
        for state in WORKER_STATES {
            m.workers.with_label_values(&[state]);
        }
        for reason in crate::launch::framework_zygotes::LEFT_OUT_REASONS {
            m.frameworks.left_out.with_label_values(&[reason]);
        }
        for zygote in ["base", "framework"] {
            m.frameworks.forks.with_label_values(&[zygote]);
        }
        m
    }

    /// Count one answered request; `site` when it reached the site's worker.
    pub fn count_request(&self, class: &str, site: Option<&str>, seconds: f64) {
        self.requests.with_label_values(&[class]).inc();
        if let Some(site) = site {
            self.site_requests.with_label_values(&[site]).inc();
            self.site_duration
                .with_label_values(&[site])
                .observe(seconds);
        }
    }

    /// Refresh the worker and per-site series from the supervisor's view of the sites with
    /// a worker (O(warm sites)): sites whose worker is gone lose their series.
    pub fn set_sites(&self, sites: &[SiteStatus], slots_held: usize, max_workers: usize) {
        let mut by_state = [0i64; WORKER_STATES.len()];
        for s in sites {
            if s.pid.is_some() {
                by_state[if s.state == "ready" { 1 } else { 0 }] += 1;
            }
            by_state[0] += s.candidate.is_some() as i64;
            by_state[2] += s.stopping.len() as i64;
        }
        for (state, n) in WORKER_STATES.iter().zip(by_state) {
            self.workers.with_label_values(&[state]).set(n);
        }
        self.max_workers.set(max_workers as i64);
        self.capacity_used
            .set(slots_held as f64 / max_workers.max(1) as f64);

        let warm: Vec<&SiteStatus> = sites.iter().filter(|s| s.pid.is_some()).collect();
        let keep: HashSet<&str> = warm.iter().map(|s| s.host.as_str()).collect();
        self.site_in_flight.reset();
        self.site_memory_bytes.reset();
        self.site_memory_limit_bytes.reset();
        for site in &warm {
            let host = [site.host.as_str()];
            self.site_in_flight
                .with_label_values(&host)
                .set(site.in_flight as i64);
            if let Some(bytes) = site.memory_bytes {
                self.site_memory_bytes
                    .with_label_values(&host)
                    .set(bytes as i64);
            }
            if let Some(limit) = site.memory_limit_bytes {
                self.site_memory_limit_bytes
                    .with_label_values(&host)
                    .set(limit as i64);
            }
            // Series start with the worker, so their first value is the site's total so far.
            self.site_requests.with_label_values(&host);
            self.site_duration.with_label_values(&host);
            if let Some(cpu) = site.cpu_seconds {
                let counter = self.site_cpu_seconds.with_label_values(&host);
                if cpu > counter.get() {
                    counter.inc_by(cpu - counter.get());
                }
            }
        }
        // The counters and histograms keep counting between scrapes; drop only sites that
        // no longer have a worker (including series a late request re-created).
        for gone in exported_sites(&self.site_requests.collect())
            .into_iter()
            .chain(exported_sites(&self.site_duration.collect()))
            .chain(exported_sites(&self.site_cpu_seconds.collect()))
            .filter(|h| !keep.contains(h.as_str()))
            .collect::<HashSet<_>>()
        {
            let _ = self.site_requests.remove_label_values(&[&gone]);
            let _ = self.site_duration.remove_label_values(&[&gone]);
            let _ = self.site_cpu_seconds.remove_label_values(&[&gone]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        self.frameworks.refresh();
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `site` label values a per-site collector exports now.
fn exported_sites(families: &[prometheus::proto::MetricFamily]) -> Vec<String> {
    families
        .iter()
        .flat_map(|f| f.get_metric())
        .flat_map(|m| m.get_label())
        .filter(|l| l.name() == "site")
        .map(|l| l.value().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warm(host: &str, state: &'static str) -> SiteStatus {
        SiteStatus {
            host: host.to_string(),
            user: "alice".to_string(),
            state,
            pid: Some(42),
            stopping: vec![43],
            candidate: None,
            in_flight: 1,
            idle_for_secs: 0,
            memory_bytes: Some(1 << 20),
            memory_limit_bytes: Some(1 << 28),
            cpu_seconds: Some(1.5),
            failures: 0,
            note: None,
        }
    }

    #[test]
    fn per_site_series_exist_only_while_the_site_has_a_worker() {
        let m = Metrics::new();
        m.set_sites(
            &[warm("a.example", "ready"), warm("b.example", "starting")],
            4,
            8,
        );
        m.count_request("2xx", Some("a.example"), 0.01);
        let t = String::from_utf8(m.render()).unwrap();
        assert!(t.contains(r#"roost_agent_site_requests_total{site="a.example"} 1"#));
        assert!(t.contains(r#"roost_agent_site_cpu_seconds_total{site="b.example"} 1.5"#));
        assert!(t.contains(r#"roost_agent_workers{state="ready"} 1"#));
        assert!(t.contains(r#"roost_agent_workers{state="starting"} 1"#));
        assert!(t.contains(r#"roost_agent_workers{state="draining"} 2"#));
        assert!(t.contains("roost_agent_capacity_used_ratio 0.5"));
        // a.example's worker is gone; a late request of it does not bring its series back.
        m.count_request("2xx", Some("a.example"), 0.01);
        m.set_sites(&[warm("b.example", "ready")], 2, 8);
        let t = String::from_utf8(m.render()).unwrap();
        assert!(!t.contains("a.example"), "{t}");
        assert!(t.contains(r#"roost_agent_site_memory_bytes{site="b.example"} 1048576"#));
        assert_eq!(m.requests.with_label_values(&["2xx"]).get(), 2);
    }
}
