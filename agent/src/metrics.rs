//! The agent's Prometheus metrics (`roost_agent_*`), on the admin port's `/metrics`.

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::site::SiteStatus;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub worker_starts: IntCounter,
    pub worker_stops: IntCounterVec,
    pub worker_crashes: IntCounter,
    pub workers: IntGauge,
    pub rejected: IntCounterVec,
    pub invalid_records: IntCounter,
    pub refused_site_users: IntCounter,
    pub refused_interpreters: IntCounter,
    pub spec_change_failures: IntCounter,
    pub snapshot_staleness_ms: IntGauge,
    pub sites_known: IntGauge,
    pub lease_losses: IntCounter,
    pub start_timeouts: IntCounter,
    pub oom_kills: IntCounter,
    pub limit_failures: IntCounter,
    /// Per-site series, only for sites with a worker (DESIGN.md: bounded label sets).
    site_in_flight: IntGaugeVec,
    site_memory_bytes: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "roost_agent_requests_total",
                    "Requests answered, by status class",
                ),
                &["class"],
            )
            .unwrap(),
            worker_starts: IntCounter::new("roost_agent_worker_starts_total", "Workers started")
                .unwrap(),
            worker_stops: IntCounterVec::new(
                Opts::new(
                    "roost_agent_worker_stops_total",
                    "Workers asked to stop, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
            worker_crashes: IntCounter::new(
                "roost_agent_worker_crashes_total",
                "Workers that exited without being asked to",
            )
            .unwrap(),
            workers: IntGauge::new(
                "roost_agent_workers",
                "Worker processes alive (including stopping ones)",
            )
            .unwrap(),
            rejected: IntCounterVec::new(
                Opts::new(
                    "roost_agent_rejected_total",
                    "Requests refused before reaching a worker, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
            invalid_records: IntCounter::new(
                "roost_agent_invalid_site_records_total",
                "Invalid site records seen in etcd since start",
            )
            .unwrap(),
            refused_site_users: IntCounter::new(
                "roost_agent_refused_site_users_total",
                "Worker starts refused because the site names a user outside min_site_uid / site_group",
            )
            .unwrap(),
            refused_interpreters: IntCounter::new(
                "roost_agent_refused_interpreters_total",
                "Worker starts refused because the site's python or virtualenv is outside the interpreters allowlist",
            )
            .unwrap(),
            spec_change_failures: IntCounter::new(
                "roost_agent_spec_change_failures_total",
                "Changed site specs whose new worker failed, so the previous spec's worker kept serving",
            )
            .unwrap(),
            snapshot_staleness_ms: IntGauge::new(
                "roost_agent_snapshot_staleness_milliseconds",
                "Time since etcd last confirmed the agent's site snapshot",
            )
            .unwrap(),
            sites_known: IntGauge::new("roost_agent_sites", "Valid sites in the agent's snapshot")
                .unwrap(),
            lease_losses: IntCounter::new(
                "roost_agent_lease_losses_total",
                "Times the node's lease was lost and the node re-registered",
            )
            .unwrap(),
            start_timeouts: IntCounter::new(
                "roost_agent_worker_start_timeouts_total",
                "Workers killed for not answering within the start timeout",
            )
            .unwrap(),
            oom_kills: IntCounter::new(
                "roost_agent_worker_oom_kills_total",
                "Worker processes killed for exceeding their site's memory limit",
            )
            .unwrap(),
            limit_failures: IntCounter::new(
                "roost_agent_limit_failures_total",
                "Workers started without kernel limits because their cgroup could not be set up",
            )
            .unwrap(),
            site_in_flight: IntGaugeVec::new(
                Opts::new(
                    "roost_agent_site_in_flight",
                    "Requests in flight, per site with a worker",
                ),
                &["site"],
            )
            .unwrap(),
            site_memory_bytes: IntGaugeVec::new(
                Opts::new(
                    "roost_agent_site_memory_bytes",
                    "Memory charged to the site's cgroup, per site with a worker",
                ),
                &["site"],
            )
            .unwrap(),
            registry,
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.worker_starts.clone()),
            Box::new(m.worker_stops.clone()),
            Box::new(m.worker_crashes.clone()),
            Box::new(m.workers.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.invalid_records.clone()),
            Box::new(m.refused_site_users.clone()),
            Box::new(m.refused_interpreters.clone()),
            Box::new(m.spec_change_failures.clone()),
            Box::new(m.snapshot_staleness_ms.clone()),
            Box::new(m.sites_known.clone()),
            Box::new(m.lease_losses.clone()),
            Box::new(m.start_timeouts.clone()),
            Box::new(m.oom_kills.clone()),
            Box::new(m.limit_failures.clone()),
            Box::new(m.site_in_flight.clone()),
            Box::new(m.site_memory_bytes.clone()),
        ] {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// Refill the per-site series from the supervisor's view: sites whose worker stopped
    /// drop out, so the series count follows the workers, not every site ever seen.
    pub fn set_site_series(&self, sites: &[SiteStatus]) {
        self.site_in_flight.reset();
        self.site_memory_bytes.reset();
        for site in sites.iter().filter(|s| s.pid.is_some()) {
            self.site_in_flight
                .with_label_values(&[site.host.as_str()])
                .set(site.in_flight as i64);
            if let Some(bytes) = site.memory_bytes {
                self.site_memory_bytes
                    .with_label_values(&[site.host.as_str()])
                    .set(bytes as i64);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}
