//! The proxy's admin port: `/healthz` (alive), `/readyz` (first etcd sync done and not
//! draining: what a load balancer should check), `/metrics`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::metrics::Metrics;
use crate::routes::Router;

pub struct AdminApp {
    pub metrics: Arc<Metrics>,
    pub router: Arc<Router>,
    pub draining: Arc<AtomicBool>,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body)
        .expect("static response parts are valid")
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                if self.draining.load(Ordering::Acquire) {
                    reply(503, "text/plain", b"not ready: draining\n".to_vec())
                } else if !self.router.is_synced() {
                    reply(503, "text/plain", b"not ready: waiting for the first etcd sync\n".to_vec())
                } else {
                    reply(200, "text/plain", b"ready\n".to_vec())
                }
            }
            "/metrics" => {
                let sites = self.router.sites.snapshot();
                self.metrics.sites.set(sites.items.len() as i64);
                self.metrics.nodes.set(self.router.nodes.snapshot().items.len() as i64);
                self.metrics
                    .invalid_records
                    .set(self.router.sites.stats.invalid_records.load(Ordering::Relaxed) as i64);
                self.metrics
                    .snapshot_staleness_ms
                    .set(self.router.sites.staleness_ms() as i64);
                reply(200, "text/plain; version=0.0.4", self.metrics.render())
            }
            _ => reply(404, "text/plain", b"not found: try /healthz, /readyz, /metrics\n".to_vec()),
        }
    }
}
