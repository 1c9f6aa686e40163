//! The edge's request path, one pingora phase per step:
//!
//! 1. `request_filter`: let a client pipeline (answers in order), the request-acceptance
//!    rules (`roost_proto::request_rules`: framing, target form, which host), canonicalise
//!    the host, find the site, check limits, check a chunked body's framing and trailers as
//!    far as the tap reads ahead, rank the site's nodes (400/404/405/408/413/421/431/503
//!    here). Nothing reaches an agent before this.
//! 2. `request_body_filter`: count body bytes against the site's limit while streaming.
//! 3. `upstream_peer`: the next node of the ranking.
//! 4. `fail_to_connect`: a node that can't be reached is marked suspect and the request
//!    goes to the next one (bounded). Nothing reached that agent, so nothing runs twice.
//! 5. `upstream_request_filter`: drop every client-sent internal header, add ours and the
//!    forwarded headers; absolute-form becomes origin-form with its authority as `Host`.
//! 6. `upstream_response_filter`: the agent's response header arrived: upstream latency,
//!    and the site stops counting as awaiting an answer (the proxy's view of a cold start).
//! 7. `fail_to_proxy`: Roost's short error pages instead of pingora's.
//! 8. `logging`: one line and the metrics per request (by status class and node).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::protocols::Digest;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use roost_proto::canonical_host;
use roost_proto::headers::{self, valid_request_id};
use roost_proto::request_rules::{check_trailers, Refusal, Target};
use tracing::{info, warn};

use crate::awaiting::{AwaitingGuard, AwaitingSites};
use crate::config::Config;
use crate::forwarded::forwarded;
use crate::metrics::Metrics;
use crate::routes::{AgentAddr, Router};
use crate::tap::{self, ReadAhead, Trailers};
use crate::tls::TlsInfo;
use crate::warm::Warmer;
use roost_runtime::{check_request_head, respond, status_class, strip_internal_headers, Origin};

/// How long a request that arrives before the first etcd sync waits for it.
const STARTUP_WAIT: Duration = Duration::from_secs(5);

pub struct EdgeHttp {
    pub router: Arc<Router>,
    pub cfg: Arc<Config>,
    pub warmer: Arc<Warmer>,
    pub metrics: Arc<Metrics>,
    /// Requests between `new_ctx` and the end of `logging`: what a drain waits for.
    pub in_flight: Arc<AtomicUsize>,
    /// Sites with a request sent to an agent and no answer yet (a metric).
    pub awaiting: Arc<AwaitingSites>,
}

/// Counts a request in flight for as long as its context lives.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct RequestCtx {
    request_id: String,
    host: String,
    /// The host as the client named it (for `X-Forwarded-Host`).
    raw_host: String,
    /// Absolute-form only: (authority, origin-form) to forward instead.
    absolute: Option<(String, String)>,
    site: String,
    revision: i64,
    request_timeout: Duration,
    /// (node id, agent address), best first (shared with the route's cached ranking).
    nodes: roost_proto::placement::Ranking,
    /// Index into `nodes` of the node being tried.
    attempt: usize,
    started: Instant,
    /// 0: unlimited.
    max_body: u64,
    body_bytes: u64,
    /// Why the proxy refused the request part-way (shown on the error page).
    refusal: Option<String>,
    client: String,
    /// When the request was sent to an agent (the last attempt), if it was.
    sent_upstream: Option<Instant>,
    /// Held from sending to the agent until its response header arrives.
    awaiting: Option<AwaitingGuard>,
    _in_flight: InFlight,
}

fn tls_info(digest: Option<&Digest>) -> Option<(bool, Option<TlsInfo>)> {
    let ssl = digest?.ssl_digest.as_ref()?;
    Some((true, ssl.extension.get::<TlsInfo>().cloned()))
}

impl EdgeHttp {
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        status: u16,
        why: &'static str,
        reason: &str,
    ) -> Result<bool> {
        self.metrics.rejected.with_label_values(&[why]).inc();
        let has_body = !session.downstream_session.is_body_empty();
        respond(
            session,
            Origin::Proxy,
            status,
            reason,
            (status == 503).then_some(2),
            Some(&ctx.request_id),
        )
        .await?;
        if has_body {
            linger(session).await;
        }
        Ok(true)
    }
}

impl EdgeHttp {
    /// Answer a refusal of the request-acceptance rules.
    async fn refuse_for(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        refusal: &Refusal,
    ) -> Result<bool> {
        self.refuse(session, ctx, refusal.status, refusal.label, &refusal.reason)
            .await
    }

    /// Check a chunked body before any node is chosen: the tap reads it ahead (up to
    /// [`tap::READ_AHEAD_LIMIT`]), so bad chunk framing and forbidden trailers are refused
    /// here and nothing of such a request reaches an agent. A larger body streams; a bad
    /// chunk later in it makes pingora abort the upstream request, and its trailers are
    /// dropped by pingora like all trailers.
    async fn check_chunked_body(
        &self,
        session: &Session,
        ctx: &RequestCtx,
    ) -> std::result::Result<(), Refusal> {
        let Some(tap) = tap::tap_of(session) else {
            return Ok(());
        };
        let bad = |reason: String| Refusal {
            status: 400,
            label: "malformed_chunked",
            reason,
        };
        let wait = Duration::from_secs(self.cfg.client_timeout_secs);
        match tokio::time::timeout(wait, tap.read_ahead()).await {
            Err(_) => Err(Refusal {
                status: 408,
                label: "client_timeout",
                reason: "the client did not send the request body in time".into(),
            }),
            Ok(Err(e)) => Err(bad(format!("the request body could not be read: {e}"))),
            Ok(Ok(ReadAhead::Whole(Trailers::Seen(names)))) => {
                check_trailers(names.iter().map(Vec::as_slice))
            }
            Ok(Ok(ReadAhead::Whole(Trailers::Malformed(why)) | ReadAhead::Malformed(why))) => {
                Err(bad(format!("the chunked request body is malformed: {why}")))
            }
            Ok(Ok(ReadAhead::Cut)) => {
                Err(bad("the request body ended before its last chunk".into()))
            }
            Ok(Ok(ReadAhead::Whole(Trailers::Unknown))) => {
                warn!(request_id = %ctx.request_id, "the tap lost its place; chunked body not checked");
                Ok(())
            }
            Ok(Ok(ReadAhead::Streams)) => Ok(()),
        }
    }
}

/// How long to keep reading (and discarding) a body the proxy refused before closing.
const LINGER: Duration = Duration::from_secs(5);

/// Lingering close, after answering a request whose body was not (all) read: read what the
/// client is still sending for up to [`LINGER`], then close. Closing with unread data makes
/// the kernel reset the connection, and a client still writing would see the reset instead
/// of the answer.
async fn linger(session: &mut Session) {
    session.set_keepalive(None);
    // A client that asked `Expect: 100-continue` sends no body after a final answer.
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue || session.downstream_session.is_body_done() {
        return;
    }
    session
        .downstream_session
        .set_total_drain_timeout(Some(LINGER));
    let _ = session.downstream_session.drain_request_body().await;
}

/// How the proxy reaches the agent of `node` at `addr`: for requests and for warm calls alike.
pub fn agent_peer(cfg: &Config, node: &str, addr: &str, io_timeout: Duration) -> Result<HttpPeer> {
    let Some(addr) = AgentAddr::parse(addr) else {
        return Error::e_explain(
            ErrorType::ConnectError,
            format!("node {node} has a bad address"),
        );
    };
    // With --agent-ca: TLS, and the agent's certificate must name `node` (docs/security.md).
    // A unix socket is offered only without it (`Config::local_agent_sockets`).
    let mut peer = match (addr, &cfg.agent_tls) {
        (AgentAddr::Tcp(addr), Some(tls)) => tls.peer(addr, node),
        (AgentAddr::Tcp(addr), None) => HttpPeer::new(addr, false, String::new()),
        (AgentAddr::Unix(path), _) => HttpPeer::new_uds(path, false, String::new())?,
    };
    peer.options.connection_timeout = Some(Duration::from_millis(cfg.connect_timeout_ms));
    peer.options.read_timeout = Some(io_timeout);
    peer.options.write_timeout = Some(io_timeout);
    peer.options.idle_timeout = Some(Duration::from_secs(cfg.upstream_idle_secs));
    Ok(peer)
}

/// Bytes of the request head as a client sent it (near enough: names, values, separators).
fn header_bytes(req: &RequestHeader) -> usize {
    let line = req.method.as_str().len() + req.uri.to_string().len() + 12;
    line + req
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
}

#[async_trait]
impl ProxyHttp for EdgeHttp {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestCtx {
            request_id: String::new(),
            host: String::new(),
            raw_host: String::new(),
            absolute: None,
            site: String::new(),
            revision: 0,
            request_timeout: Duration::from_secs(60),
            nodes: Arc::new([]),
            attempt: 0,
            started: Instant::now(),
            max_body: 0,
            body_bytes: 0,
            refusal: None,
            client: String::new(),
            sent_upstream: None,
            awaiting: None,
            _in_flight: InFlight(self.in_flight.clone()),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        // HTTP/1.1 pipelining (RFC 9112 §9.3.2): requests a client sent ahead are served one
        // after another, answers in order, instead of pingora's default of dropping them with
        // the connection. Each still goes through every phase here. Not for an upgrade
        // (WebSocket): there pingora keeps its default, since with pipelining on, client
        // bytes its idle read takes before it switches to the upgraded body would be held
        // for a next request. The setting carries over to the connection's next request, so
        // it is set on each.
        let upgrade = session.downstream_session.is_upgrade_req();
        session.downstream_session.set_pipelining_enabled(!upgrade);
        let client_timeout = Some(Duration::from_secs(self.cfg.client_timeout_secs));
        session.downstream_session.set_read_timeout(client_timeout);
        session.downstream_session.set_write_timeout(client_timeout);
        let req = session.req_header();
        ctx.request_id = req
            .headers
            .get(headers::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|id| valid_request_id(id))
            .map(str::to_string)
            .unwrap_or_else(|| {
                format!(
                    "{:016x}{:016x}",
                    rand::random::<u64>(),
                    rand::random::<u64>()
                )
            });
        ctx.client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical().to_string())
            .unwrap_or_default();
        // The tap's place in this connection's bytes moves to this request, refused or not.
        let recording = tap::recording(session);
        if let Some(rec) = &recording {
            let raw_head = session.downstream_session.to_h1_raw();
            rec.lock()
                .unwrap_or_else(|e| e.into_inner())
                .start_request(&raw_head);
        }
        let accepted = match check_request_head(session) {
            Ok(a) => a,
            Err(r) => return self.refuse_for(session, ctx, &r).await,
        };
        // HTTP/2 names its host in `:authority`, which the head's request line does not show.
        let authority = || Some(session.req_header().uri.authority()?.as_str().to_string());
        let Some(raw_host) = accepted.host.or_else(authority) else {
            return self
                .refuse(
                    session,
                    ctx,
                    400,
                    "bad_host",
                    "the request has no Host header",
                )
                .await;
        };
        ctx.raw_host = raw_host.clone();
        if let Target::Absolute { authority, path } = accepted.target {
            ctx.absolute = Some((authority, path));
        }
        let host = match canonical_host(&raw_host) {
            Ok(h) => h,
            Err(e) => {
                return self
                    .refuse(session, ctx, 400, "bad_host", &format!("invalid Host: {e}"))
                    .await
            }
        };
        ctx.host = host.clone();
        if let Some((_, Some(tls))) = tls_info(session.digest()) {
            if !tls.covers(&host) {
                let sni = tls.sni.unwrap_or_default();
                return self
                    .refuse(
                        session,
                        ctx,
                        421,
                        "misdirected",
                        &format!(
                            "this connection was set up for {sni}, not {host}; open a new one"
                        ),
                    )
                    .await;
            }
        }
        if !self.router.is_synced() && !self.router.wait_synced(STARTUP_WAIT).await {
            // An empty table says nothing about whether the site exists: not 404.
            return self
                .refuse(
                    session,
                    ctx,
                    503,
                    "not_synced",
                    "the proxy has not loaded the site list from etcd yet",
                )
                .await;
        }
        let table = self.router.table();
        let Some(route) = table.lookup(&host) else {
            return self
                .refuse(
                    session,
                    ctx,
                    404,
                    "unknown_site",
                    &format!("no site is registered for {host}"),
                )
                .await;
        };
        ctx.site = route.host.clone();
        let (max_header, max_body) = self.cfg.limits_for(&route.host);
        let req = session.req_header();
        if max_header > 0 && header_bytes(req) > max_header {
            return self
                .refuse(
                    session,
                    ctx,
                    431,
                    "headers_too_large",
                    &format!("the request headers are larger than {max_header} bytes"),
                )
                .await;
        }
        ctx.max_body = max_body;
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if max_body > 0 && declared.is_some_and(|n| n > max_body) {
            return self
                .refuse(
                    session,
                    ctx,
                    413,
                    "body_too_large",
                    &format!("the request body is larger than {max_body} bytes"),
                )
                .await;
        }
        let chunked = session
            .req_header()
            .headers
            .contains_key(http::header::TRANSFER_ENCODING);
        if !session.downstream_session.is_body_empty() {
            // The body is still to come (and a chunked one is read ahead below): let the
            // site's worker start meanwhile.
            let client = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            self.warmer
                .warm(&route.host, client.map(|ip| ip.to_canonical()));
        }
        if let Some(rec) = &recording {
            if !chunked && !session.downstream_session.is_body_empty() {
                rec.lock().unwrap_or_else(|e| e.into_inner()).pause();
            }
        }
        if chunked {
            let expects_continue = session
                .req_header()
                .headers
                .get(http::header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if expects_continue {
                // The client waits for this before the body the tap reads ahead.
                session.downstream_session.write_continue_response().await?;
            }
            if let Err(r) = self.check_chunked_body(session, ctx).await {
                return self.refuse_for(session, ctx, &r).await;
            }
        }
        ctx.revision = table.revision;
        ctx.request_timeout = Duration::from_secs(route.spec.request_timeout);
        ctx.nodes = self.router.ranked(&table, route);
        if ctx.nodes.is_empty() {
            return self
                .refuse(
                    session,
                    ctx,
                    503,
                    "no_node",
                    &format!("no node is available for site {}", route.host),
                )
                .await;
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(b) = body {
            ctx.body_bytes += b.len() as u64;
            if ctx.max_body > 0 && ctx.body_bytes > ctx.max_body {
                let why = format!("the request body is larger than {} bytes", ctx.max_body);
                ctx.refusal = Some(why.clone());
                self.metrics
                    .rejected
                    .with_label_values(&["body_too_large"])
                    .inc();
                return Error::e_explain(ErrorType::HTTPStatus(413), why);
            }
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let Some((node, addr)) = ctx.nodes.get(ctx.attempt) else {
            return Error::e_explain(
                ErrorType::ConnectError,
                "every node of the site's ranking failed",
            );
        };
        // The agent answers 504 at the site's own timeout; wait a little longer for that.
        let peer = agent_peer(
            &self.cfg,
            node,
            addr,
            ctx.request_timeout + Duration::from_secs(5),
        )?;
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let node = ctx
            .nodes
            .get(ctx.attempt)
            .map(|n| n.0.clone())
            .unwrap_or_default();
        if self.router.mark_suspect(&node) {
            warn!(node = %node, error = %e, suspect_secs = self.cfg.suspect_secs,
                "node refused a connection; trying it last for a while");
        }
        // Nothing reached the agent, so trying the next node cannot run the request twice.
        let next = ctx.attempt + 1;
        if next < ctx.nodes.len() && next < self.cfg.max_node_attempts {
            warn!(request_id = %ctx.request_id, site = %ctx.site, node = %node,
                next = %ctx.nodes[next].0, error = %e, "node unreachable; trying the next node");
            self.metrics.failovers.inc();
            ctx.attempt = next;
            e.set_retry(true);
        } else {
            e.set_retry(false);
        }
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if !reused {
            if let Some((node, _)) = ctx.nodes.get(ctx.attempt) {
                self.router.clear_suspect(node);
            }
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        ctx.sent_upstream = Some(Instant::now());
        if ctx.awaiting.is_none() {
            ctx.awaiting = Some(self.awaiting.begin(&ctx.site));
        }
        strip_internal_headers(upstream);
        upstream.insert_header(headers::SITE, &ctx.site)?;
        upstream.insert_header(headers::REVISION, ctx.revision.to_string())?;
        upstream.insert_header(headers::REQUEST_ID, &ctx.request_id)?;
        if let Some(secret) = &self.cfg.secret {
            upstream.insert_header(headers::AUTH, secret.as_slice())?;
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let tls = tls_info(session.digest()).is_some();
        if let Some((authority, path)) = &ctx.absolute {
            // The authority won over Host for routing; the worker reads the same one.
            let origin = path.parse().or_else(|_| {
                Error::e_explain(ErrorType::InternalError, "absolute-form path is not a URI")
            })?;
            upstream.set_uri(origin);
            upstream.insert_header(http::header::HOST, authority.as_str())?;
        }
        let f = forwarded(
            &self.cfg.trusted_proxies,
            peer,
            &upstream.headers,
            tls,
            &ctx.raw_host,
        );
        ctx.client = f.client;
        for name in ["forwarded", "x-real-ip"] {
            if !crate::forwarded::is_trusted(&self.cfg.trusted_proxies, peer) {
                upstream.remove_header(name);
            }
        }
        upstream.insert_header("x-forwarded-for", f.xff)?;
        upstream.insert_header("x-forwarded-proto", f.proto)?;
        upstream.insert_header("x-forwarded-host", f.host)?;
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        ctx.awaiting.take();
        if let Some(sent) = ctx.sent_upstream {
            self.metrics
                .upstream_duration
                .observe(sent.elapsed().as_secs_f64());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        resp.insert_header(headers::REQUEST_ID, &ctx.request_id)?;
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let site = &ctx.site;
        let (code, reason) = match (e.esource(), e.etype()) {
            (_, ErrorType::HTTPStatus(code)) => (
                *code,
                ctx.refusal
                    .clone()
                    .unwrap_or_else(|| "the request was refused".to_string()),
            ),
            (
                ErrorSource::Downstream,
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
            ) => (0, String::new()),
            (ErrorSource::Downstream, ErrorType::ReadTimedout | ErrorType::WriteTimedout) => (
                408,
                "the client did not send the request in time".to_string(),
            ),
            (ErrorSource::Downstream, _) => (400, "the request could not be read".to_string()),
            (ErrorSource::Upstream, ErrorType::ReadTimedout | ErrorType::WriteTimedout) => {
                (504, format!("site {site} did not answer in time"))
            }
            (
                _,
                ErrorType::ConnectTimedout
                | ErrorType::ConnectRefused
                | ErrorType::ConnectError
                | ErrorType::ConnectNoRoute,
            ) => (503, format!("no node serving site {site} could be reached")),
            (ErrorSource::Upstream, _) => (
                502,
                format!("the node serving site {site} closed the connection"),
            ),
            _ => (500, "internal error in the proxy".to_string()),
        };
        // Once a response has started, the only honest signal left is closing the connection.
        let started = session.response_written().map(|r| r.status.as_u16());
        if code > 0 && started.is_none() {
            let _ = respond(
                session,
                Origin::Proxy,
                code,
                &reason,
                (code == 503).then_some(2),
                Some(&ctx.request_id),
            )
            .await;
            if code == 413 {
                linger(session).await;
            }
        }
        FailToProxy {
            error_code: started.unwrap_or(code),
            can_reuse_downstream: false,
        }
    }

    /// `logging` writes one line per request with its error: pingora's own would repeat it.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Self::CTX, _error: &Error) -> bool {
        true
    }

    /// Connect failures are logged by `fail_to_connect`, with the next node; other retries
    /// (a pooled connection the agent had closed) keep pingora's warning.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &Self::CTX,
        error: &Error,
        _context: ProxyWarnLogContext,
    ) -> bool {
        matches!(
            error.etype(),
            ErrorType::ConnectTimedout
                | ErrorType::ConnectRefused
                | ErrorType::ConnectError
                | ErrorType::ConnectNoRoute
        )
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        if let Some(rec) = tap::recording(session) {
            rec.lock().unwrap_or_else(|e| e.into_inner()).resume();
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let class = status_class(status);
        let elapsed = ctx.started.elapsed();
        ctx.awaiting.take();
        let node = ctx
            .sent_upstream
            .and_then(|_| ctx.nodes.get(ctx.attempt))
            .map(|n| n.0.as_str());
        self.metrics
            .count_request(class, node, elapsed.as_secs_f64());
        let req = session.req_header();
        info!(
            request_id = %ctx.request_id,
            client = %ctx.client,
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
