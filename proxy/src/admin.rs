//! The proxy's admin port: `/healthz` (alive), `/readyz` (first etcd sync done and not
//! draining: what a load balancer should check), `/metrics`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use prometheus::IntCounter;
use roost_runtime::admin_reply;

use crate::awaiting::AwaitingSites;
use crate::metrics::Metrics;
use crate::routes::Router;
use crate::tls::CertStore;

pub struct AdminApp {
    pub metrics: Arc<Metrics>,
    pub router: Arc<Router>,
    pub certs: Option<Arc<CertStore>>,
    pub draining: Arc<AtomicBool>,
    pub in_flight: Arc<AtomicUsize>,
    pub awaiting: Arc<AwaitingSites>,
}

impl AdminApp {
    /// Set the gauges (and catch the counters kept elsewhere up) just before a scrape.
    fn refresh_gauges(&self) {
        let m = &self.metrics;
        if let Some(sites) = self.router.sites() {
            let snap = sites.snapshot();
            m.sites.set(snap.items.len() as i64);
            m.hosts.set(snap.index.names() as i64);
            m.etcd_revision.set(snap.revision);
            catch_up(
                &m.invalid_records,
                sites.stats.invalid_records.load(Ordering::Relaxed),
            );
        }
        let table = self.router.table();
        m.nodes.set(table.nodes.nodes.len() as i64);
        m.draining_nodes
            .set(table.nodes.nodes.values().filter(|n| n.draining).count() as i64);
        m.set_nodes(table.nodes.nodes.keys().map(String::as_str));
        m.snapshot_staleness
            .set(self.router.staleness_ms() as f64 / 1000.0);
        m.in_flight
            .set(self.in_flight.load(Ordering::Relaxed) as i64);
        m.sites_awaiting_response.set(self.awaiting.sites() as i64);
        m.suspect_nodes.set(self.router.suspect_count() as i64);
        m.draining.set(self.draining.load(Ordering::Relaxed) as i64);
        if let Some(certs) = &self.certs {
            m.certificates.set(certs.count() as i64);
            catch_up(
                &m.invalid_certificates,
                certs.invalid.load(Ordering::Relaxed),
            );
            catch_up(
                &m.tls_no_certificate,
                certs.no_cert_handshakes.load(Ordering::Relaxed),
            );
        }
    }
}

/// A counter kept as an atomic elsewhere: add what was counted since the last scrape.
fn catch_up(counter: &IntCounter, seen: u64) {
    let exported = counter.get();
    if seen > exported {
        counter.inc_by(seen - exported);
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/healthz" => admin_reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                if self.draining.load(Ordering::Acquire) {
                    admin_reply(503, "text/plain", b"not ready: draining\n".to_vec())
                } else if !self.router.is_synced()
                    || self.certs.as_ref().is_some_and(|c| !c.is_synced())
                {
                    admin_reply(
                        503,
                        "text/plain",
                        b"not ready: waiting for the first etcd sync\n".to_vec(),
                    )
                } else {
                    admin_reply(200, "text/plain", b"ready\n".to_vec())
                }
            }
            "/metrics" => {
                self.refresh_gauges();
                admin_reply(200, "text/plain; version=0.0.4", self.metrics.render())
            }
            _ => admin_reply(
                404,
                "text/plain",
                b"not found: try /healthz, /readyz, /metrics\n".to_vec(),
            ),
        }
    }
}
