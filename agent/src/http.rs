//! The agent's request path: a pingora proxy from proxies (HTTP/1.1 over TCP) to the site's
//! worker (HTTP/1.1 over the site's unix socket). Phases:
//!
//! 1. `request_filter`: check the proxy's credential, find the site, claim a worker.
//! 2. `upstream_peer`: the site's socket, pooled per worker generation (the first request
//!    after a warm call takes the connection the call opened, `preconnect.rs`).
//! 3. `upstream_request_filter`: remove every internal header before the app sees it.
//! 4. `fail_to_proxy`: Roost's own short error pages (503/504/502 with a reason).
//! 5. `logging`: give the worker back, count, one log line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use roost_proto::headers::{self, valid_request_id, Credential};
use roost_proto::{canonical_host, Informer, SiteSpec};
use tracing::info;

use roost_runtime::{check_request_head, respond, status_class, strip_internal_headers, Origin};

use crate::metrics::Metrics;
use crate::preconnect::Preconnects;
use crate::site::{AcquireError, Sites, Ticket};

/// How long an agent that is behind the proxy's snapshot waits to learn of a new site.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

pub struct AgentHttp {
    pub supervisor: Arc<Sites>,
    pub sites: Arc<Informer<SiteSpec>>,
    /// The cluster secret proxies present, when the agent has one.
    pub credential: Option<Credential>,
    pub metrics: Arc<Metrics>,
    pub preconnects: Arc<Preconnects>,
}

pub struct RequestCtx {
    site: String,
    request_id: String,
    ticket: Option<Ticket>,
    started: Instant,
    /// A proxy's warm call, not a request: counted in `roost_agent_warm_calls_total` only.
    warm_call: bool,
    /// A new worker's first answer, small: its bookkeeping waits until it has been sent.
    answered_once_sent: bool,
}

/// A new worker's first response up to this size is counted as its first answer once it has
/// been sent, not when its head arrives: the actor's bookkeeping for a first answer (gate,
/// CPU weight, cold-start metric), run meanwhile, delayed the response itself (about half a
/// millisecond in the debug build). A larger or unsized one (a download, a stream) counts
/// at its head, so the worker is not left unanswered for as long as it lasts.
const ANSWER_ONCE_SENT_MAX: u64 = 64 * 1024;

impl AgentHttp {
    /// The site's spec from this agent's snapshot, waiting briefly when the proxy has seen a
    /// newer revision (a site added a moment ago may reach the proxy's snapshot first).
    async fn find_site(&self, host: &str, proxy_revision: Option<i64>) -> Option<Arc<SiteSpec>> {
        if let Some(spec) = self.sites.snapshot().items.get(host) {
            return Some(spec.clone());
        }
        let rev = proxy_revision?;
        if rev > self.sites.revision() {
            self.sites.wait_for_revision(rev, CATCH_UP_WAIT).await;
        }
        self.sites.snapshot().items.get(host).cloned()
    }

    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        status: u16,
        why: &'static str,
        reason: &str,
    ) -> Result<bool> {
        self.metrics.rejected.with_label_values(&[why]).inc();
        let retry_after = (status == 503).then_some(1);
        respond(
            session,
            Origin::Agent,
            status,
            reason,
            retry_after,
            Some(&ctx.request_id),
        )
        .await?;
        Ok(true)
    }
}

impl AgentHttp {
    /// A proxy's warm call (it saw the site named in a TLS ClientHello, or a head whose body
    /// is still coming): start the site's worker if none runs, and answer at once, so the
    /// start overlaps the round trips before the real request arrives.
    async fn answer_warm_call(
        &self,
        session: &mut Session,
        site: String,
        spec: Arc<SiteSpec>,
    ) -> Result<bool> {
        self.metrics.warm_calls.inc();
        let (sites, preconnects) = (self.supervisor.clone(), self.preconnects.clone());
        tokio::spawn(async move {
            // The ticket is dropped at once: a started worker then waits for requests until
            // its idle timeout, as after any request.
            match sites.acquire(&site, &spec).await {
                Ok(ticket) => {
                    // Only for a worker that has yet to answer: one that has has pooled
                    // connections.
                    let fresh = !ticket.worker_has_answered();
                    let (socket, generation) = (ticket.socket_path.clone(), ticket.generation);
                    drop(ticket);
                    if fresh {
                        preconnects.open(&socket, generation).await;
                    }
                }
                Err(e) => {
                    tracing::debug!(site = %site, error = %e, "warm call could not start the worker");
                }
            }
        });
        let mut resp = ResponseHeader::build(204, Some(1))?;
        resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        session.write_response_header(Box::new(resp), true).await?;
        Ok(true)
    }
}

fn header_str<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[async_trait]
impl ProxyHttp for AgentHttp {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            site: String::new(),
            request_id: String::new(),
            ticket: None,
            started: Instant::now(),
            warm_call: false,
            answered_once_sent: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        // The proxy's acceptance rules again: an agent must not trust every proxy is current.
        if let Err(r) = check_request_head(session) {
            return self
                .refuse(session, ctx, r.status, r.label, &r.reason)
                .await;
        }
        let req = session.req_header();
        if let Some(credential) = &self.credential {
            let presented = req.headers.get(headers::AUTH).map(|v| v.as_bytes());
            if !presented.is_some_and(|p| credential.matches(p)) {
                return self
                    .refuse(
                        session,
                        ctx,
                        403,
                        "forbidden",
                        "this port only serves Roost proxies",
                    )
                    .await;
            }
        }
        ctx.request_id = header_str(&req.headers, headers::REQUEST_ID)
            .filter(|id| valid_request_id(id))
            .map(str::to_string)
            .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
        let site = match header_str(&req.headers, headers::SITE) {
            Some(s) if canonical_host(s).is_ok_and(|c| c == s) => s.to_string(),
            _ => {
                return self
                    .refuse(
                        session,
                        ctx,
                        400,
                        "no_site",
                        "the request names no valid site",
                    )
                    .await
            }
        };
        let proxy_revision =
            header_str(&req.headers, headers::REVISION).and_then(|r| r.parse().ok());
        ctx.site = site.clone();
        let Some(spec) = self.find_site(&site, proxy_revision).await else {
            return self
                .refuse(
                    session,
                    ctx,
                    404,
                    "unknown_site",
                    &format!("no site {site} is registered"),
                )
                .await;
        };
        if session.req_header().headers.contains_key(headers::WARM) {
            ctx.warm_call = true;
            return self.answer_warm_call(session, site, spec).await;
        }
        match self.supervisor.acquire(&site, &spec).await {
            Ok(ticket) => {
                ctx.ticket = Some(ticket);
                Ok(false)
            }
            Err(AcquireError::Removed) => {
                self.refuse(
                    session,
                    ctx,
                    404,
                    "unknown_site",
                    &format!("site {site} was removed"),
                )
                .await
            }
            Err(e @ AcquireError::ShuttingDown) => {
                // Not 404: the site exists; another node (or this one, restarted) serves it.
                self.refuse(
                    session,
                    ctx,
                    503,
                    "shutting_down",
                    &format!("site {site} cannot be served here now: {e}"),
                )
                .await
            }
            Err(e @ AcquireError::CrashLoop { .. }) => {
                self.refuse(
                    session,
                    ctx,
                    503,
                    "crash_loop",
                    &format!("site {site}: {e}"),
                )
                .await
            }
            Err(e @ AcquireError::StartQueueFull { .. }) => {
                self.refuse(
                    session,
                    ctx,
                    503,
                    "start_queue_full",
                    &format!("site {site} is starting: {e}"),
                )
                .await
            }
            Err(e @ AcquireError::TooManyRequests { .. }) => {
                self.refuse(
                    session,
                    ctx,
                    503,
                    "too_many_requests",
                    &format!("site {site} is busy: {e}"),
                )
                .await
            }
            Err(e @ AcquireError::AtCapacity) => {
                self.refuse(
                    session,
                    ctx,
                    503,
                    "at_capacity",
                    &format!("site {site} cannot start now: {e}"),
                )
                .await
            }
            Err(e) => {
                tracing::error!(site = %site, request_id = %ctx.request_id, error = %e, "cannot start worker");
                self.refuse(
                    session,
                    ctx,
                    503,
                    "start_failed",
                    &format!("site {site} cannot start: {e}"),
                )
                .await
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let Some(ticket) = &ctx.ticket else {
            return Error::e_explain(ErrorType::InternalError, "no worker claimed");
        };
        // The socket's address (where it was bound), which pingora checks pooled
        // connections against; a socket bound ahead is reached at another path.
        let address = ticket.socket_address.to_string_lossy();
        let mut peer = HttpPeer::new_uds(&address, false, String::new())?;
        if ticket.socket_address != ticket.socket_path {
            peer.options.custom_l4 = Some(Arc::new(crate::preconnect::ConnectAt {
                socket: ticket.socket_path.clone(),
            }));
        }
        peer.group_key = ticket.generation;
        peer.options.connection_timeout = Some(Duration::from_secs(5));
        peer.options.read_timeout = Some(ticket.request_timeout);
        peer.options.write_timeout = Some(ticket.request_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(30));
        // Only a worker that has yet to answer can have a connection kept for it: a warm
        // worker's requests never touch the node-wide map.
        if !ticket.worker_has_answered() {
            if let Some(kept) = self
                .preconnects
                .take(&ticket.socket_path, ticket.generation)
            {
                peer.options.custom_l4 = Some(kept);
            }
        }
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // The app never sees the proxy's credential or any other internal header.
        strip_internal_headers(upstream);
        upstream.insert_header(headers::REQUEST_ID, &ctx.request_id)?;
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(ticket) = &ctx.ticket {
            let small = header_str(&upstream.headers, "content-length")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|len| len <= ANSWER_ONCE_SENT_MAX);
            if small && !ticket.worker_has_answered() {
                ctx.answered_once_sent = true;
            } else {
                ticket.mark_answered(ctx.started);
            }
        }
        Ok(())
    }

    /// pingora retries an idempotent request that failed on a reused connection (a worker
    /// may close an idle keep-alive connection at any time). Not when the worker itself died:
    /// the request may be what killed it, and would kill the next one too.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let worker_gone = ctx.ticket.as_ref().is_some_and(|t| !t.worker_alive());
        if worker_gone
            || !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let site = &ctx.site;
        let timeout = ctx
            .ticket
            .as_ref()
            .map(|t| t.request_timeout.as_secs())
            .unwrap_or(0);
        let (code, reason) = match (e.esource(), e.etype()) {
            (_, ErrorType::HTTPStatus(code)) => (*code, "the request was refused".to_string()),
            (
                ErrorSource::Downstream,
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
            ) => (0, String::new()),
            (ErrorSource::Downstream, _) => (400, "the request could not be read".to_string()),
            (ErrorSource::Upstream, ErrorType::ReadTimedout | ErrorType::WriteTimedout) => {
                if let Some(ticket) = &ctx.ticket {
                    ticket.recycle();
                }
                (
                    504,
                    format!("site {site} did not answer within {timeout} s"),
                )
            }
            (ErrorSource::Upstream, etype) => {
                // A worker that died (or was killed for memory) after the request was sent
                // explains any later error: a reset, or a refused connect to its socket.
                let died = match &ctx.ticket {
                    Some(t) => t.failure_reason().await,
                    None => None,
                };
                match died {
                    // The detail goes to the agent's log, not to the world: it may name paths.
                    Some(why) => {
                        tracing::warn!(site = %site, request_id = %ctx.request_id, reason = %why,
                            "worker died with the request");
                        if why.starts_with("exceeded its memory limit") {
                            (503, format!("site {site} {why}"))
                        } else {
                            (
                                503,
                                format!(
                                    "site {site} failed while answering; the site's log says why"
                                ),
                            )
                        }
                    }
                    None if matches!(
                        etype,
                        ErrorType::ConnectTimedout
                            | ErrorType::ConnectRefused
                            | ErrorType::ConnectError
                    ) =>
                    {
                        (
                            503,
                            format!("the worker of site {site} could not be reached"),
                        )
                    }
                    None => (
                        502,
                        format!(
                            "the worker of site {site} closed the connection without an answer"
                        ),
                    ),
                }
            }
            _ => (500, "internal error in the agent".to_string()),
        };
        if code > 0 {
            let _ = respond(
                session,
                Origin::Agent,
                code,
                &reason,
                (code == 503).then_some(1),
                Some(&ctx.request_id),
            )
            .await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        if ctx.answered_once_sent && session.response_written().is_some() {
            if let Some(ticket) = &ctx.ticket {
                ticket.mark_answered(ctx.started);
            }
        }
        // Give the worker back first: the idle clock starts when the response is done.
        let reached_worker = ctx.ticket.take().is_some();
        if ctx.warm_call {
            return;
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let class = status_class(status);
        self.metrics.count_request(
            class,
            reached_worker.then_some(ctx.site.as_str()),
            ctx.started.elapsed().as_secs_f64(),
        );
        let req = session.req_header();
        info!(
            request_id = %ctx.request_id,
            site = %ctx.site,
            method = %req.method,
            path = %req.uri.path(),
            status,
            ms = ctx.started.elapsed().as_millis() as u64,
            error = e.map(|e| e.to_string()).unwrap_or_default(),
            "request"
        );
    }
}
