//! The agent's admin port: `/healthz`, `/readyz`, `/metrics`, `/sites`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use roost_proto::{Informer, SiteSpec};

use crate::metrics::Metrics;
use crate::registration::Registration;
use crate::supervisor::Supervisor;

pub struct AdminApp {
    pub metrics: Arc<Metrics>,
    pub sites: Arc<Informer<SiteSpec>>,
    pub registration: Arc<Registration>,
    pub supervisor: Arc<Supervisor>,
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
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                let synced = self.sites.is_synced();
                let registered = self.registration.is_registered();
                if synced && registered {
                    reply(200, "text/plain", b"ready\n".to_vec())
                } else {
                    let why = format!("not ready: sites synced={synced}, node registered={registered}\n");
                    reply(503, "text/plain", why.into_bytes())
                }
            }
            "/metrics" => {
                let snap = self.sites.snapshot();
                self.metrics.sites_known.set(snap.items.len() as i64);
                self.metrics
                    .invalid_records
                    .set(self.sites.stats.invalid_records.load(Ordering::Relaxed) as i64);
                self.metrics.snapshot_staleness_ms.set(self.sites.staleness_ms() as i64);
                reply(200, "text/plain; version=0.0.4", self.metrics.render())
            }
            "/sites" => {
                let body = serde_json::to_vec_pretty(&self.supervisor.status()).unwrap_or_default();
                reply(200, "application/json", body)
            }
            _ => reply(404, "text/plain", b"not found: try /healthz, /readyz, /metrics, /sites\n".to_vec()),
        }
    }
}
