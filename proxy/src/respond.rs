//! Short plain-text answers that the proxy writes itself (refusals, errors), in the one
//! style of `roost_proto::pages`.

use bytes::Bytes;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

/// Write `status` with a one-line reason and end the response.
pub async fn respond(
    session: &mut Session,
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
    resp.insert_header("x-roost-error", "proxy")?;
    if let Some(id) = request_id.filter(|id| !id.is_empty()) {
        resp.insert_header(roost_proto::headers::REQUEST_ID, id)?;
    }
    if let Some(secs) = retry_after {
        resp.insert_header("retry-after", secs.to_string())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}
