//! The edge's request path, one pingora phase per step:
//!
//! 1. `request_filter`: canonicalise `Host`, find the site, rank its nodes (400/404/503 here).
//! 2. `upstream_peer`: the next node of the ranking.
//! 3. `fail_to_connect`: a node that can't be reached → retry on the next one (bounded).
//! 4. `upstream_request_filter`: drop every client-sent internal header, add ours.
//! 5. `fail_to_proxy`: Roost's short error pages instead of pingora's.
//! 6. `logging`: one line and the metrics per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use roost_proto::headers::{self, is_internal, valid_request_id};
use roost_proto::canonical_host;
use tracing::{info, warn};

use crate::metrics::{status_class, Metrics};
use crate::respond::respond;
use crate::routes::Router;

pub struct EdgeHttp {
    pub router: Arc<Router>,
    pub secret: Option<Vec<u8>>,
    pub metrics: Arc<Metrics>,
    pub max_node_attempts: usize,
}

#[derive(Default)]
pub struct RequestCtx {
    request_id: String,
    host: String,
    site: String,
    revision: i64,
    request_timeout: Duration,
    /// (node id, agent address), best first.
    nodes: Vec<(String, String)>,
    /// Index into `nodes` of the node being tried.
    attempt: usize,
    started: Option<Instant>,
}

impl EdgeHttp {
    async fn refuse(&self, session: &mut Session, status: u16, why: &'static str, reason: &str) -> Result<bool> {
        self.metrics.rejected.with_label_values(&[why]).inc();
        respond(session, status, reason, (status == 503).then_some(2)).await?;
        Ok(true)
    }
}

/// The host a client asked for: the `Host` header, or the authority of an absolute URI
/// (HTTP/2, absolute-form). More than one `Host` header is refused: it is how requests are
/// smuggled past proxies that read the first while the app reads the last.
fn requested_host(req: &RequestHeader) -> std::result::Result<String, &'static str> {
    let mut hosts = req.headers.get_all("host").iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has more than one Host header");
    }
    match first {
        Some(v) => v
            .to_str()
            .map(str::to_string)
            .map_err(|_| "the Host header is not valid text"),
        None => match req.uri.authority() {
            Some(a) => Ok(a.as_str().to_string()),
            None => Err("the request has no Host header"),
        },
    }
}

#[async_trait]
impl ProxyHttp for EdgeHttp {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            started: Some(Instant::now()),
            ..Default::default()
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let req = session.req_header();
        ctx.request_id = req
            .headers
            .get(headers::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|id| valid_request_id(id))
            .map(str::to_string)
            .unwrap_or_else(|| format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>()));
        let raw_host = match requested_host(req) {
            Ok(h) => h,
            Err(why) => return self.refuse(session, 400, "bad_host", why).await,
        };
        let host = match canonical_host(&raw_host) {
            Ok(h) => h,
            Err(e) => return self.refuse(session, 400, "bad_host", &format!("invalid Host: {e}")).await,
        };
        ctx.host = host.clone();
        let table = self.router.table();
        let Some(route) = table.lookup(&host) else {
            return self
                .refuse(session, 404, "unknown_site", &format!("no site is registered for {host}"))
                .await;
        };
        ctx.site = route.site.clone();
        ctx.revision = table.revision;
        ctx.request_timeout = Duration::from_secs(route.spec.request_timeout);
        ctx.nodes = table.ranked_addrs(route);
        if ctx.nodes.is_empty() {
            return self
                .refuse(session, 503, "no_node", &format!("no node is available for site {}", route.site))
                .await;
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Self::CTX) -> Result<Box<HttpPeer>> {
        let Some((node, addr)) = ctx.nodes.get(ctx.attempt) else {
            return Error::e_explain(ErrorType::ConnectError, "every node of the site's ranking failed");
        };
        let sockaddr: SocketAddr = addr
            .parse()
            .or_else(|_| Error::e_explain(ErrorType::ConnectError, format!("node {node} has a bad address")))?;
        let mut peer = HttpPeer::new(sockaddr, false, String::new());
        peer.options.connection_timeout = Some(Duration::from_secs(2));
        // The agent answers 504 at the site's own timeout; wait a little longer for that.
        peer.options.read_timeout = Some(ctx.request_timeout + Duration::from_secs(5));
        peer.options.write_timeout = Some(ctx.request_timeout + Duration::from_secs(5));
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    fn fail_to_connect(&self, _session: &mut Session, _peer: &HttpPeer, ctx: &mut Self::CTX, mut e: Box<Error>) -> Box<Error> {
        // Nothing reached the agent, so trying the next node cannot run the request twice.
        let next = ctx.attempt + 1;
        if next < ctx.nodes.len() && next < self.max_node_attempts {
            warn!(request_id = %ctx.request_id, site = %ctx.site, node = %ctx.nodes[ctx.attempt].0,
                error = %e, "node unreachable; trying the next node");
            self.metrics.node_retries.inc();
            ctx.attempt = next;
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let internal: Vec<String> = upstream
            .headers
            .keys()
            .map(|k| k.as_str())
            .filter(|k| is_internal(k))
            .map(str::to_string)
            .collect();
        for name in internal {
            upstream.remove_header(&name);
        }
        upstream.insert_header(headers::SITE, &ctx.site)?;
        upstream.insert_header(headers::REVISION, ctx.revision.to_string())?;
        upstream.insert_header(headers::REQUEST_ID, &ctx.request_id)?;
        if let Some(secret) = &self.secret {
            upstream.insert_header(headers::AUTH, secret.as_slice())?;
        }
        // No load balancer is trusted yet, so whatever the client claims is replaced.
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        upstream.insert_header("x-forwarded-for", client_ip)?;
        upstream.insert_header("x-forwarded-proto", "http")?;
        upstream.insert_header("x-forwarded-host", &ctx.host)?;
        Ok(())
    }

    async fn response_filter(&self, _session: &mut Session, resp: &mut ResponseHeader, ctx: &mut Self::CTX) -> Result<()> {
        resp.insert_header(headers::REQUEST_ID, &ctx.request_id)?;
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Self::CTX) -> FailToProxy {
        let site = &ctx.site;
        let (code, reason) = match (e.esource(), e.etype()) {
            (_, ErrorType::HTTPStatus(code)) => (*code, "the request was refused".to_string()),
            (ErrorSource::Downstream, ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed) => {
                (0, String::new())
            }
            (ErrorSource::Downstream, _) => (400, "the request could not be read".to_string()),
            (ErrorSource::Upstream, ErrorType::ReadTimedout | ErrorType::WriteTimedout) => {
                (504, format!("site {site} did not answer in time"))
            }
            (_, ErrorType::ConnectTimedout | ErrorType::ConnectRefused | ErrorType::ConnectError | ErrorType::ConnectNoRoute) => {
                (503, format!("no node serving site {site} could be reached"))
            }
            (ErrorSource::Upstream, _) => (502, format!("the node serving site {site} closed the connection")),
            _ => (500, "internal error in the proxy".to_string()),
        };
        if code > 0 {
            let _ = respond(session, code, &reason, (code == 503).then_some(2)).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let class = status_class(status);
        let elapsed = ctx.started.map(|s| s.elapsed()).unwrap_or_default();
        self.metrics.requests.with_label_values(&[class]).inc();
        self.metrics.duration.with_label_values(&[class]).observe(elapsed.as_secs_f64());
        let req = session.req_header();
        info!(
            request_id = %ctx.request_id,
            host = %ctx.host,
            site = %ctx.site,
            node = ctx.nodes.get(ctx.attempt).map(|n| n.0.as_str()).unwrap_or("-"),
            method = %req.method,
            path = %req.uri.path(),
            status,
            ms = elapsed.as_millis() as u64,
            error = e.map(|e| e.to_string()).unwrap_or_default(),
            "request"
        );
    }
}
