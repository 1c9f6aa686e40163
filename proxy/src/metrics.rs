//! The proxy's Prometheus metrics (`roost_proxy_*`, base units, counters for counts).
//!
//! Label sets are bounded and exist from start at 0: status class, refusal reason, and the
//! node a request went to (live nodes only: a node's series go when it leaves the node
//! set). Never a host or a path.

use std::collections::BTreeSet;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// The status classes of `roost_runtime::status_class`; "none": no response was written.
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// The `node` label of a request the proxy answered itself, without reaching any node.
pub const NO_NODE: &str = "none";

/// Reasons the proxy answers a request itself (`EdgeHttp::refuse`), beyond the
/// request-acceptance rules' own (`Refusal::LABELS`).
pub const EDGE_REFUSALS: [&str; 8] = [
    "bad_host",
    "misdirected",
    "not_synced",
    "unknown_site",
    "headers_too_large",
    "body_too_large",
    "no_node",
    "malformed_chunked",
];

/// Request latency buckets (seconds): a warm request is milliseconds, a cold one up to the
/// start timeout.
const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub struct Metrics {
    registry: Registry,
    /// By status class and the node that answered (or [`NO_NODE`]).
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    /// Request sent to an agent → its response header.
    pub upstream_duration: Histogram,
    pub rejected: IntCounterVec,
    pub failovers: IntCounter,
    pub sites: IntGauge,
    pub hosts: IntGauge,
    pub nodes: IntGauge,
    pub draining_nodes: IntGauge,
    pub invalid_records: IntCounter,
    pub etcd_revision: IntGauge,
    pub snapshot_staleness: Gauge,
    pub in_flight: IntGauge,
    pub sites_awaiting_response: IntGauge,
    pub suspect_nodes: IntGauge,
    pub certificates: IntGauge,
    pub invalid_certificates: IntCounter,
    pub tls_no_certificate: IntCounter,
    pub draining: IntGauge,
    pub warm_calls: IntCounterVec,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                Opts::new(
                    "roost_proxy_requests_total",
                    "Requests answered, by status class and by the node that answered (\"none\": the proxy answered itself)",
                ),
                &["class", "node"],
            )
            .expect("valid metric"),
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "roost_proxy_request_duration_seconds",
                    "Time to answer a request at the edge, by status class",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["class"],
            )
            .expect("valid metric"),
            upstream_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "roost_proxy_upstream_duration_seconds",
                    "Time from sending a request to an agent to its response header (includes any cold start)",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            rejected: IntCounterVec::new(
                Opts::new(
                    "roost_proxy_rejected_total",
                    "Requests answered by the proxy itself, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            failovers: counter(
                "roost_proxy_failovers_total",
                "Connections to a node that failed and were retried on the next node of the site's ranking",
            ),
            sites: gauge("roost_proxy_sites", "Valid sites in the routing table"),
            hosts: gauge(
                "roost_proxy_hosts",
                "Host names in the routing table (site names, exact aliases, wildcard aliases)",
            ),
            nodes: gauge(
                "roost_proxy_nodes",
                "Live nodes in the routing table (registered under a live etcd lease, draining ones included)",
            ),
            draining_nodes: gauge(
                "roost_proxy_draining_nodes",
                "Live nodes that are draining: they serve what reaches them but get no new placements",
            ),
            invalid_records: counter(
                "roost_proxy_invalid_site_records_total",
                "Invalid site records seen in etcd since start (skipped, never routed)",
            ),
            etcd_revision: gauge(
                "roost_proxy_etcd_revision",
                "The etcd revision of the site snapshot the proxy routes by",
            ),
            snapshot_staleness: Gauge::new(
                "roost_proxy_snapshot_staleness_seconds",
                "Time since etcd last confirmed the proxy's routing snapshot (sites and nodes); grows while etcd is unreachable",
            )
            .expect("valid metric"),
            in_flight: gauge(
                "roost_proxy_requests_in_flight",
                "Requests being answered now",
            ),
            sites_awaiting_response: gauge(
                "roost_proxy_sites_awaiting_response",
                "Sites with a request sent to an agent and no response header yet: a warm site leaves within milliseconds, a site in cold start stays until its worker answers",
            ),
            suspect_nodes: gauge(
                "roost_proxy_suspect_nodes",
                "Nodes that refused a connection recently and are tried last",
            ),
            certificates: gauge(
                "roost_proxy_tls_certificates",
                "TLS certificates loaded (etcd and directory)",
            ),
            invalid_certificates: counter(
                "roost_proxy_tls_invalid_certificates_total",
                "Certificates refused since start (unparsable, or the key does not match)",
            ),
            tls_no_certificate: counter(
                "roost_proxy_tls_no_certificate_handshakes_total",
                "TLS handshakes for a name with no certificate since start",
            ),
            draining: gauge(
                "roost_proxy_draining",
                "1 while the proxy drains after SIGTERM or SIGQUIT",
            ),
            warm_calls: IntCounterVec::new(
                Opts::new(
                    "roost_proxy_warm_calls_total",
                    "Warm calls (start a site's worker ahead of its request, from the TLS SNI or a head whose body follows), by outcome",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
        };
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.duration.clone()),
            Box::new(m.upstream_duration.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.failovers.clone()),
            Box::new(m.sites.clone()),
            Box::new(m.hosts.clone()),
            Box::new(m.nodes.clone()),
            Box::new(m.draining_nodes.clone()),
            Box::new(m.invalid_records.clone()),
            Box::new(m.etcd_revision.clone()),
            Box::new(m.snapshot_staleness.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.sites_awaiting_response.clone()),
            Box::new(m.suspect_nodes.clone()),
            Box::new(m.certificates.clone()),
            Box::new(m.invalid_certificates.clone()),
            Box::new(m.tls_no_certificate.clone()),
            Box::new(m.draining.clone()),
            Box::new(m.warm_calls.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        // Every series of a bounded label set exists from start, so rates over them work
        // (and dashboards show 0, not "no data") on a proxy that has served nothing.
        for reason in roost_proto::request_rules::Refusal::LABELS
            .iter()
            .chain(EDGE_REFUSALS.iter())
        {
            m.rejected.with_label_values(&[reason]);
        }
        for outcome in crate::warm::Outcome::ALL {
            m.warm_calls.with_label_values(&[outcome.label()]);
        }
        for class in STATUS_CLASSES {
            m.duration.with_label_values(&[class]);
            m.requests.with_label_values(&[class, NO_NODE]);
        }
        m
    }

    /// Bring the per-node request series in line with the live nodes: a new node's series
    /// start at 0, a node that left (or a late request's series for it) is dropped.
    /// O(nodes), once per scrape.
    pub fn set_nodes<'a>(&self, live: impl Iterator<Item = &'a str>) {
        let live: BTreeSet<&str> = live.collect();
        let exported: BTreeSet<String> = self
            .requests
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .flat_map(|metric| metric.get_label())
            .filter(|label| label.name() == "node")
            .map(|label| label.value().to_string())
            .collect();
        for gone in exported
            .iter()
            .filter(|n| n.as_str() != NO_NODE && !live.contains(n.as_str()))
        {
            for class in STATUS_CLASSES {
                let _ = self.requests.remove_label_values(&[class, gone]);
            }
        }
        for node in live.iter().filter(|n| !exported.contains(**n)) {
            for class in STATUS_CLASSES {
                self.requests.with_label_values(&[class, node]);
            }
        }
    }

    /// Count one answered request; `node` is the node it went to, if any.
    pub fn count_request(&self, class: &str, node: Option<&str>, seconds: f64) {
        self.requests
            .with_label_values(&[class, node.unwrap_or(NO_NODE)])
            .inc();
        self.duration.with_label_values(&[class]).observe(seconds);
    }

    pub fn render(&self) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    #[test]
    fn node_series_follow_the_live_nodes() {
        let m = Metrics::new();
        m.set_nodes(["a", "b"].into_iter());
        let t = text(&m);
        assert!(t.contains(r#"roost_proxy_requests_total{class="5xx",node="a"} 0"#));
        assert!(t.contains(r#"roost_proxy_requests_total{class="2xx",node="b"} 0"#));
        m.count_request("2xx", Some("a"), 0.01);
        // b leaves; a request that was still on its way to b ends after that.
        m.set_nodes(["a"].into_iter());
        m.count_request("5xx", Some("b"), 0.01);
        m.set_nodes(["a"].into_iter());
        let t = text(&m);
        assert!(t.contains(r#"roost_proxy_requests_total{class="2xx",node="a"} 1"#));
        assert!(!t.contains(r#"node="b""#), "{t}");
        assert!(t.contains(r#"roost_proxy_requests_total{class="4xx",node="none"} 0"#));
    }
}
