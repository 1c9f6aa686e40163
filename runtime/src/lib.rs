//! Plumbing that `roost-proxy` and `roost-agent` share: both are pingora servers with an
//! admin port, a shared secret, and Roost's own short error pages. What they *mean* lives in
//! `roost-proto`; this crate is only how both binaries do the same chores the same way.

use std::path::Path;

use anyhow::Result;
use bytes::Bytes;
use http::Response;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use roost_proto::headers;
use roost_proto::request_rules::{self, Accepted, Refusal};

/// Log to stderr, `RUST_LOG` filtering (default `info`), colours only on a terminal so log
/// files and `grep` see plain `key=value` fields.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Read the cluster secret with the rule every Roost binary shares
/// ([`roost_proto::headers::read_secret`]).
pub fn read_secret(path: &Path) -> Result<Vec<u8>> {
    Ok(headers::read_secret(path)?)
}

/// Who wrote an error response, in its `x-roost-error` header: tells an operator reading a
/// 503 whether the edge or the node refused.
#[derive(Clone, Copy)]
pub enum Origin {
    Proxy,
    Agent,
}

/// Write Roost's short error page (`roost_proto::pages`) with `status` and end the response.
pub async fn respond(
    session: &mut Session,
    origin: Origin,
    status: u16,
    reason: &str,
    retry_after: Option<u64>,
    request_id: Option<&str>,
) -> pingora_core::Result<()> {
    let body = roost_proto::pages::error_page(status, reason);
    let mut resp = ResponseHeader::build(status, Some(6))?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    let who = match origin {
        Origin::Proxy => "proxy",
        Origin::Agent => "agent",
    };
    resp.insert_header("x-roost-error", who)?;
    if let Some(id) = request_id.filter(|id| !id.is_empty()) {
        resp.insert_header(headers::REQUEST_ID, id)?;
    }
    if let Some(secs) = retry_after {
        resp.insert_header("retry-after", secs.to_string())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

/// The request-acceptance rules (`roost_proto::request_rules`) over the head as the client
/// sent it: what both proxy and agent check before anything goes further.
pub fn check_request_head(session: &Session) -> Result<Accepted, Refusal> {
    request_rules::check_raw_head(&session.downstream_session.to_h1_raw())
}

/// Remove every `x-roost-*` header: the proxy does it to what clients send, the agent to
/// what reaches the app (which must never see the credential).
pub fn strip_internal_headers(req: &mut RequestHeader) {
    let internal: Vec<String> = req
        .headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| headers::is_internal(k))
        .map(str::to_string)
        .collect();
    for name in internal {
        req.remove_header(&name);
    }
}

/// A complete admin-port response.
pub fn admin_reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body)
        .expect("static response parts are valid")
}

/// `2xx`, `4xx`, … for a status code; `none` when nothing was sent. A bounded metric label.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_headers_are_stripped_and_others_kept() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("X-Roost-Site", "evil.example").unwrap();
        req.insert_header("x-roost-auth", "guess").unwrap();
        req.insert_header("x-request-id", "abc").unwrap();
        strip_internal_headers(&mut req);
        assert!(req.headers.get("x-roost-site").is_none());
        assert!(req.headers.get("x-roost-auth").is_none());
        assert_eq!(req.headers.get("x-request-id").unwrap(), "abc");
    }

    #[test]
    fn short_secrets_are_refused() {
        let dir = std::env::temp_dir().join(format!("roost-secret-{}", std::process::id()));
        std::fs::write(&dir, "  short\n").unwrap();
        assert!(read_secret(&dir).is_err());
        std::fs::write(&dir, "0123456789abcdef0123\n").unwrap();
        assert_eq!(read_secret(&dir).unwrap(), b"0123456789abcdef0123");
        std::fs::remove_file(dir).unwrap();
    }

    #[test]
    fn status_classes_are_bounded() {
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(0), "none");
    }
}
