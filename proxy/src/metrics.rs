//! The proxy's Prometheus metrics (`roost_proxy_*`). Label sets are bounded: status class,
//! outcome; never a host or a path.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub rejected: IntCounterVec,
    pub node_retries: IntCounter,
    pub sites: IntGauge,
    pub nodes: IntGauge,
    pub invalid_records: IntGauge,
    pub snapshot_staleness_ms: IntGauge,
    pub in_flight: IntGauge,
    pub suspect_nodes: IntGauge,
    pub certificates: IntGauge,
    pub invalid_certificates: IntGauge,
    pub tls_no_certificate: IntGauge,
    pub draining: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                Opts::new("roost_proxy_requests_total", "Requests answered, by status class"),
                &["class"],
            )
            .unwrap(),
            duration: HistogramVec::new(
                HistogramOpts::new("roost_proxy_request_duration_seconds", "Time to answer a request, by status class")
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                &["class"],
            )
            .unwrap(),
            rejected: IntCounterVec::new(
                Opts::new("roost_proxy_rejected_total", "Requests answered by the proxy itself, by reason"),
                &["reason"],
            )
            .unwrap(),
            node_retries: IntCounter::new(
                "roost_proxy_node_retries_total",
                "Connections that failed and were retried on the next node of the ranking",
            )
            .unwrap(),
            sites: IntGauge::new("roost_proxy_sites", "Valid sites in the proxy's snapshot").unwrap(),
            nodes: IntGauge::new("roost_proxy_nodes", "Live nodes in the proxy's snapshot").unwrap(),
            invalid_records: IntGauge::new(
                "roost_proxy_invalid_site_records_total",
                "Invalid site records seen in etcd since start",
            )
            .unwrap(),
            snapshot_staleness_ms: IntGauge::new(
                "roost_proxy_snapshot_staleness_milliseconds",
                "Time since etcd last confirmed the proxy's routing snapshot (sites and nodes); grows while etcd is unreachable",
            )
            .unwrap(),
            in_flight: IntGauge::new("roost_proxy_requests_in_flight", "Requests being answered now").unwrap(),
            suspect_nodes: IntGauge::new(
                "roost_proxy_suspect_nodes",
                "Nodes that refused a connection recently and are tried last",
            )
            .unwrap(),
            certificates: IntGauge::new("roost_proxy_tls_certificates", "TLS certificates loaded (etcd and directory)")
                .unwrap(),
            invalid_certificates: IntGauge::new(
                "roost_proxy_tls_invalid_certificates_total",
                "Certificates refused since start (unparsable, or the key does not match)",
            )
            .unwrap(),
            tls_no_certificate: IntGauge::new(
                "roost_proxy_tls_no_certificate_total",
                "TLS handshakes for a name with no certificate since start",
            )
            .unwrap(),
            draining: IntGauge::new("roost_proxy_draining", "1 while the proxy drains after SIGTERM or SIGQUIT").unwrap(),
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.duration.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.node_retries.clone()),
            Box::new(m.sites.clone()),
            Box::new(m.nodes.clone()),
            Box::new(m.invalid_records.clone()),
            Box::new(m.snapshot_staleness_ms.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.suspect_nodes.clone()),
            Box::new(m.certificates.clone()),
            Box::new(m.invalid_certificates.clone()),
            Box::new(m.tls_no_certificate.clone()),
            Box::new(m.draining.clone()),
        ] {
            m.registry.register(c).expect("metric names are unique");
        }
        // The request-acceptance refusals exist from start at 0, so a rate over them works.
        for reason in roost_proto::request_rules::Refusal::LABELS {
            m.rejected.with_label_values(&[reason]);
        }
        m
    }

    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}
