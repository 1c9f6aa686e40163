//! The agent's admin port: `/healthz`, `/readyz`, `/metrics`, `/sites`, and
//! `/sites/<host>/log?lines=N` (a site's worker output).
//!
//! `/sites` (which names each site's unix user and worker pids) and the logs (a site's
//! output is its owner's business) need the proxies' secret when the agent has one: the
//! secret itself in `x-roost-auth`, or roostctl's per-request proof in
//! `x-roost-admin-proof` ([`headers::admin_proof`]), which is all a forged node record's
//! admin address can collect.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use roost_proto::headers::{self, credential_matches};
use roost_proto::{canonical_host, Informer, SiteSpec};
use roost_runtime::admin_reply;

use crate::metrics::Metrics;
use crate::registration::Registration;
use crate::site::Sites;
use crate::sitelog;

pub struct AdminApp {
    pub metrics: Arc<Metrics>,
    pub sites: Arc<Informer<SiteSpec>>,
    pub registration: Arc<Registration>,
    pub sites_here: Arc<Sites>,
    pub secret: Option<Vec<u8>>,
    pub state_dir: std::path::PathBuf,
}

impl AdminApp {
    /// `None` when the request may see tenant details, else the 403 to send.
    fn refuse_without_secret(
        &self,
        session: &ServerSession,
        what: &str,
    ) -> Option<Response<Vec<u8>>> {
        let secret = self.secret.as_ref()?;
        let req = session.req_header();
        let secret_given = req
            .headers
            .get(headers::AUTH)
            .is_some_and(|p| credential_matches(p.as_bytes(), secret));
        let path_and_query = req.uri.path_and_query().map_or("", |p| p.as_str());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let proof_given = req
            .headers
            .get(headers::ADMIN_PROOF)
            .is_some_and(|p| headers::admin_proof_valid(secret, path_and_query, p.as_bytes(), now));
        if secret_given || proof_given {
            return None;
        }
        self.metrics.admin_refused.inc();
        let peer = session
            .client_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::warn!(path = %path_and_query, %peer, proof = req.headers.contains_key(headers::ADMIN_PROOF),
            "admin request refused: no valid secret or proof");
        Some(admin_reply(
            403,
            "text/plain",
            format!("forbidden: {what} need the cluster secret\n").into_bytes(),
        ))
    }

    async fn site_log(&self, session: &ServerSession) -> Response<Vec<u8>> {
        if let Some(refused) = self.refuse_without_secret(session, "site logs") {
            return refused;
        }
        let req = session.req_header();
        let path = req.uri.path();
        // `/sites/log` matches both ends with nothing between: no host, not a panic.
        let host = path
            .strip_prefix("/sites/")
            .and_then(|rest| rest.strip_suffix("/log"))
            .unwrap_or_default();
        if host.is_empty() || canonical_host(host).ok().as_deref() != Some(host) {
            return admin_reply(
                400,
                "text/plain",
                b"bad request: not a canonical site name\n".to_vec(),
            );
        }
        let lines = req
            .uri
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("lines=")))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(100)
            .min(10_000);
        let file = sitelog::path(&self.state_dir, host);
        let read = tokio::task::spawn_blocking(move || sitelog::tail(&file, lines))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match read {
            Ok(text) => admin_reply(200, "text/plain; charset=utf-8", text.into_bytes()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => admin_reply(
                404,
                "text/plain",
                format!("no log for {host} on this node: its worker never ran here\n").into_bytes(),
            ),
            Err(e) => admin_reply(
                500,
                "text/plain",
                format!("cannot read the log: {e}\n").into_bytes(),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/healthz" => admin_reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                let synced = self.sites.is_synced();
                let registered = self.registration.is_registered();
                if synced && registered {
                    admin_reply(200, "text/plain", b"ready\n".to_vec())
                } else {
                    let why =
                        format!("not ready: sites synced={synced}, node registered={registered}\n");
                    admin_reply(503, "text/plain", why.into_bytes())
                }
            }
            "/metrics" => {
                let snap = self.sites.snapshot();
                self.metrics.sites_known.set(snap.items.len() as i64);
                // A counter: add what the informer counted since the last scrape.
                let seen = self.sites.stats.invalid_records.load(Ordering::Relaxed);
                let exported = self.metrics.invalid_records.get();
                if seen > exported {
                    self.metrics.invalid_records.inc_by(seen - exported);
                }
                self.metrics.etcd_revision.set(snap.revision);
                self.metrics
                    .snapshot_staleness
                    .set(self.sites.staleness_ms() as f64 / 1000.0);
                let (slots_held, max_workers) = self.sites_here.capacity();
                self.metrics.set_sites(
                    &self.sites_here.status_running().await,
                    slots_held,
                    max_workers,
                );
                admin_reply(200, "text/plain; version=0.0.4", self.metrics.render())
            }
            "/sites" => {
                if let Some(refused) = self.refuse_without_secret(session, "site details") {
                    return refused;
                }
                let body =
                    serde_json::to_vec_pretty(&self.sites_here.status().await).unwrap_or_default();
                admin_reply(200, "application/json", body)
            }
            p if p.starts_with("/sites/") && p.ends_with("/log") => self.site_log(session).await,
            _ => admin_reply(
                404,
                "text/plain",
                b"not found: try /healthz, /readyz, /metrics, /sites\n".to_vec(),
            ),
        }
    }
}
