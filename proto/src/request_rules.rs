//! What the edge accepts in a request (DESIGN.md, decision 6).
//!
//! Tenants' workers run whatever HTTP server their app uses, often years behind on parser
//! fixes, so anything that two parsers could read differently is refused here, by the proxy
//! and again by the agent, before a worker sees it. Pure functions over bytes:
//!
//! - [`RequestHead::parse`]: the raw HTTP/1 head. Raw, because pingora drops a
//!   `Content-Length` that comes with `Transfer-Encoding` from its parsed headers, so only
//!   the bytes as sent still show that ambiguity.
//! - [`check_head`]: framing, the request-target form, and which host the request is for.
//! - [`scan_chunked`]: where a chunked body ends and which trailer fields it carries.
//! - [`check_trailers`]: refuses trailers that name framing, routing or auth fields.
//!
//! Decisions:
//! - **absolute-form** (`GET http://example.com/x`) is routed by its authority, which wins
//!   over `Host` (RFC 9112 §3.2.2). A `Host` that names another host is refused, not guessed
//!   at, and the proxy forwards origin-form with `Host` set to that authority, so the worker
//!   reads the host the proxy routed by.
//! - **authority-form** is only for CONNECT, and Roost is not a tunnel: CONNECT gets 405.
//! - **trailers are never forwarded**: pingora 0.9 discards request trailers while reading a
//!   chunked body, and WSGI has no way to hand them to an app. A request whose trailers name
//!   a field that frames, routes or authenticates ([`forbidden_trailer`]) is refused, so a
//!   smuggling attempt gets the 400 that nginx or gunicorn would give rather than a silent
//!   drop that hides it.

use std::fmt;

/// Why a request was refused: the status to answer, a bounded label for metrics, and a
/// reason safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub label: &'static str,
    pub reason: String,
}

impl Refusal {
    fn bad(label: &'static str, reason: impl Into<String>) -> Refusal {
        Refusal {
            status: 400,
            label,
            reason: reason.into(),
        }
    }

    /// Every label a refusal can carry, so metric series can exist from start at 0.
    pub const LABELS: [&'static str; 10] = [
        "client_timeout",
        "malformed_head",
        "duplicate_field",
        "bad_length",
        "length_and_chunked",
        "bad_target",
        "connect",
        "bad_host",
        "forbidden_trailer",
        "malformed_chunked",
    ];
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Refusal {}

/// The request line and header fields of an HTTP/1 request, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead<'a> {
    pub method: &'a [u8],
    pub target: &'a [u8],
    pub version: &'a [u8],
    /// (name, value without surrounding whitespace), in the order sent.
    pub fields: Vec<(&'a [u8], &'a [u8])>,
}

/// The request-target forms Roost serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `/path?query`
    Origin,
    /// `*`, with OPTIONS only.
    Asterisk,
    /// `http://authority/path`: `authority` is what the request is for; `path` is the
    /// origin-form to forward (`/` when the URI has none).
    Absolute { authority: String, path: String },
}

/// What [`check_head`] found acceptable, and what routing needs from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub target: Target,
    /// The host as the client named it (absolute-form authority, else `Host`); not yet
    /// canonical. `None` when the request names no host at all.
    pub host: Option<String>,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Split off one line ending in LF (a CR before it is dropped). `None` when no LF is left.
fn next_line(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let lf = s.iter().position(|&b| b == b'\n')?;
    let line = &s[..lf];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some((line, &s[lf + 1..]))
}

/// One `name: value` field line; obs-fold and anything else is refused.
fn parse_field(line: &[u8]) -> Result<(&[u8], &[u8]), &'static str> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err("a header line is folded (obs-fold)");
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or("a header line has no colon")?;
    let name = &line[..colon];
    if !is_token(name) {
        return Err("a header name is not a token");
    }
    let value = trim_ows(&line[colon + 1..]);
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err("a header value holds a control character");
    }
    Ok((name, value))
}

impl<'a> RequestHead<'a> {
    /// Parse a raw head: the request line, the field lines, and the empty line that ends it
    /// (CRLF or bare LF line ends, as pingora accepts). Strict: single spaces in the request
    /// line, `name: value` fields with token names and no control bytes in values.
    pub fn parse(raw: &'a [u8]) -> Result<RequestHead<'a>, Refusal> {
        let bad = |why: &'static str| Refusal::bad("malformed_head", why);
        let (line, mut rest) =
            next_line(raw).ok_or_else(|| bad("the request head is cut short"))?;
        let mut parts = line.split(|&b| b == b' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("the request line is not `method target version`"));
        };
        if !is_token(method) {
            return Err(bad("the method is not a token"));
        }
        if target.is_empty() || target.iter().any(|&b| b <= 0x20 || b >= 0x7f) {
            return Err(bad("the request target holds a byte URIs may not hold"));
        }
        if !matches!(version, b"HTTP/1.0" | b"HTTP/1.1" | b"HTTP/2") {
            return Err(bad("the HTTP version is not 1.0 or 1.1"));
        }
        let mut fields = Vec::new();
        loop {
            let (line, next) =
                next_line(rest).ok_or_else(|| bad("the request head is cut short"))?;
            rest = next;
            if line.is_empty() {
                break;
            }
            fields.push(parse_field(line).map_err(bad)?);
        }
        Ok(RequestHead {
            method,
            target,
            version,
            fields,
        })
    }

    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a [u8]> + 's {
        self.fields
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| *v)
    }
}

/// Split an absolute-form target into its authority and the origin-form to forward.
/// `None` when it is not `http://` or `https://` with a non-empty authority.
fn split_absolute(target: &str) -> Option<(&str, &str)> {
    let lower = target
        .get(..8)
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let rest = if lower.starts_with("http://") {
        &target[7..]
    } else if lower.starts_with("https://") {
        &target[8..]
    } else {
        return None;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    (!authority.is_empty()).then_some((authority, path))
}

/// Fields a request may carry once: a second one (even with the same value, or a list in
/// one field) is how two parsers come to read different framing, routing or credentials.
const SINGLETONS: [&str; 5] = [
    "host",
    "content-length",
    "content-type",
    "authorization",
    "proxy-authorization",
];

/// The framing and target rules. Host *names* are checked where they are canonicalised
/// (`crate::host`); this only decides which one the request is for.
pub fn check_head(head: &RequestHead<'_>) -> Result<Accepted, Refusal> {
    for name in SINGLETONS {
        if head.values(name).nth(1).is_some() {
            return Err(Refusal::bad(
                if name == "host" {
                    "bad_host"
                } else {
                    "duplicate_field"
                },
                format!("the request has more than one {name} header"),
            ));
        }
    }
    if let Some(length) = head.values("content-length").next() {
        if length.is_empty() || length.len() > 18 || !length.iter().all(u8::is_ascii_digit) {
            return Err(Refusal::bad(
                "bad_length",
                "Content-Length is not a single decimal number",
            ));
        }
    }
    if head.values("content-length").next().is_some()
        && head.values("transfer-encoding").next().is_some()
    {
        return Err(Refusal::bad(
            "length_and_chunked",
            "the request has both Content-Length and Transfer-Encoding",
        ));
    }
    let method = head.method;
    if method == b"CONNECT" {
        return Err(Refusal {
            status: 405,
            label: "connect",
            reason: "CONNECT is not served here: Roost is not a tunnel".into(),
        });
    }
    // `parse` allowed only visible ASCII in the target.
    let target = std::str::from_utf8(head.target)
        .map_err(|_| Refusal::bad("bad_target", "the request target is not ASCII"))?;
    let host = match head.values("host").next() {
        Some(h) => Some(
            std::str::from_utf8(h)
                .map_err(|_| Refusal::bad("bad_host", "the Host header is not ASCII"))?
                .to_string(),
        ),
        None => None,
    };
    let target = if target.starts_with('/') {
        Target::Origin
    } else if target == "*" {
        if method != b"OPTIONS" {
            return Err(Refusal::bad(
                "bad_target",
                "the target * is only allowed with OPTIONS",
            ));
        }
        Target::Asterisk
    } else if let Some((authority, path)) = split_absolute(target) {
        if authority.contains('@') {
            return Err(Refusal::bad(
                "bad_target",
                "the request target carries user information",
            ));
        }
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            // `http://host?q` and `http://host` mean the root.
            format!("/{}", path.split('#').next().unwrap_or(""))
        };
        if path.contains('#') {
            return Err(Refusal::bad(
                "bad_target",
                "the request target carries a fragment",
            ));
        }
        Target::Absolute {
            authority: authority.to_string(),
            path,
        }
    } else if !target.contains('/') && target.contains(':') {
        return Err(Refusal::bad(
            "bad_target",
            "an authority-form target is only for CONNECT",
        ));
    } else {
        return Err(Refusal::bad(
            "bad_target",
            "the request target must be a path starting with /",
        ));
    };
    let host = match (&target, host) {
        (Target::Absolute { authority, .. }, Some(host)) => {
            let same = match (
                crate::host::canonical_host(authority),
                crate::host::canonical_host(&host),
            ) {
                (Ok(a), Ok(h)) => a == h,
                _ => authority.eq_ignore_ascii_case(host.trim()),
            };
            if !same {
                return Err(Refusal::bad(
                    "bad_host",
                    "the request target names another host than the Host header",
                ));
            }
            Some(authority.clone())
        }
        (Target::Absolute { authority, .. }, None) => Some(authority.clone()),
        (_, host) => host,
    };
    Ok(Accepted { target, host })
}

/// Parse and check a raw HTTP/1 head in one step: what proxy and agent call.
pub fn check_raw_head(raw: &[u8]) -> Result<Accepted, Refusal> {
    check_head(&RequestHead::parse(raw)?)
}

/// Trailer fields that would frame, route, authenticate or control the request (RFC 9110
/// §6.5.1), or that only Roost may set.
pub fn forbidden_trailer(name: &[u8]) -> bool {
    const FORBIDDEN: &[&str] = &[
        "content-length",
        "transfer-encoding",
        "trailer",
        "te",
        "connection",
        "keep-alive",
        "upgrade",
        "content-encoding",
        "content-type",
        "content-range",
        "host",
        "forwarded",
        "x-real-ip",
        "authorization",
        "proxy-authorization",
        "cookie",
        "expect",
        "max-forwards",
        "cache-control",
        "pragma",
        "range",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "if-range",
        "x-request-id",
    ];
    let starts_with = |prefix: &str| {
        name.len() >= prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    };
    FORBIDDEN
        .iter()
        .any(|f| name.eq_ignore_ascii_case(f.as_bytes()))
        || starts_with(crate::headers::INTERNAL_PREFIX)
        || starts_with("x-forwarded-")
}

/// Refuse trailers that name a forbidden field (see [`forbidden_trailer`]).
pub fn check_trailers<'a>(names: impl IntoIterator<Item = &'a [u8]>) -> Result<(), Refusal> {
    for name in names {
        if forbidden_trailer(name) {
            return Err(Refusal::bad(
                "forbidden_trailer",
                format!(
                    "the trailer field {} is not allowed",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
    }
    Ok(())
}

/// What [`scan_chunked`] found in the bytes of a chunked body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunked<'a> {
    /// The body ends `end` bytes in; `trailers` are the names of its trailer fields.
    Complete {
        end: usize,
        data: usize,
        trailers: Vec<&'a [u8]>,
    },
    /// More bytes are needed.
    Incomplete,
    /// Not a chunked body (why, safe to show).
    Malformed(&'static str),
}

/// The longest chunk size accepted, in hex digits: 15 keeps the size below 2^60.
const MAX_SIZE_DIGITS: usize = 15;

/// Walk a chunked body (RFC 9112 §7.1) from its first chunk-size line: sizes are bare hex
/// digits (no sign, no whitespace before them), extensions are skipped up to the line end,
/// every chunk's data is followed by CRLF, and the trailer section is `name: value` lines up
/// to an empty line.
pub fn scan_chunked(body: &[u8]) -> Chunked<'_> {
    let mut at = 0usize;
    let mut data = 0usize;
    loop {
        let line = match crlf_line(&body[at..]) {
            Ok(Some(line)) => line,
            Ok(None) => return Chunked::Incomplete,
            Err(why) => return Chunked::Malformed(why),
        };
        at += line.len() + 2;
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 {
            return Chunked::Malformed("a chunk size is not a hex number");
        }
        if digits > MAX_SIZE_DIGITS {
            return Chunked::Malformed("a chunk size is too large");
        }
        if !matches!(line.get(digits), None | Some(b';' | b' ' | b'\t')) {
            return Chunked::Malformed("a chunk size is followed by junk");
        }
        // Fewer than 16 hex digits always fit.
        let size = line[..digits].iter().fold(0usize, |n, &b| {
            n * 16 + (b as char).to_digit(16).unwrap_or(0) as usize
        });
        if size == 0 {
            break;
        }
        let after = at.saturating_add(size);
        if after > body.len() {
            return Chunked::Incomplete;
        }
        data += size;
        at = after;
        match body.get(at..at + 2) {
            Some(b"\r\n") => at += 2,
            Some(_) => return Chunked::Malformed("a chunk's data is not followed by CRLF"),
            None if body.len() > at && body[at] != b'\r' => {
                return Chunked::Malformed("a chunk's data is not followed by CRLF")
            }
            None => return Chunked::Incomplete,
        }
    }
    let mut trailers = Vec::new();
    loop {
        let line = match crlf_line(&body[at..]) {
            Ok(Some(line)) => line,
            Ok(None) => return Chunked::Incomplete,
            Err(why) => return Chunked::Malformed(why),
        };
        at += line.len() + 2;
        if line.is_empty() {
            return Chunked::Complete {
                end: at,
                data,
                trailers,
            };
        }
        match parse_field(line) {
            Ok((name, _)) => trailers.push(name),
            Err(_) => return Chunked::Malformed("a trailer line is not `name: value`"),
        }
    }
}

/// One line of chunked framing, which must end in CRLF and hold no other CR or LF.
/// `Ok(None)` when the line end has not arrived yet.
fn crlf_line(s: &[u8]) -> Result<Option<&[u8]>, &'static str> {
    let Some(lf) = s.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let line = s[..lf]
        .strip_suffix(b"\r")
        .ok_or("a chunked framing line ends in a bare LF")?;
    if line.contains(&b'\r') {
        return Err("a chunked framing line holds a bare CR");
    }
    Ok(Some(line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str) -> Result<Accepted, Refusal> {
        check_raw_head(raw.as_bytes())
    }

    fn label(raw: &str) -> &'static str {
        check(raw).expect_err("should be refused").label
    }

    #[test]
    fn an_ordinary_request_is_accepted() {
        let ok = check("GET /a?b=c HTTP/1.1\r\nHost: Example.com\r\nAccept: */*\r\n\r\n").unwrap();
        assert_eq!(ok.target, Target::Origin);
        assert_eq!(ok.host.as_deref(), Some("Example.com"));
        let ok = check("POST /p HTTP/1.1\nHost: a\nContent-Length: 3\n\n").unwrap();
        assert_eq!(ok.host.as_deref(), Some("a"));
    }

    #[test]
    fn content_length_with_transfer_encoding_is_refused() {
        let raw = "POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let r = check(raw).unwrap_err();
        assert_eq!((r.status, r.label), (400, "length_and_chunked"));
        assert_eq!(
            label("POST /p HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 0\r\n\r\n"),
            "length_and_chunked"
        );
    }

    #[test]
    fn targets_must_be_origin_form() {
        assert_eq!(
            label("GET foo/bar HTTP/1.1\r\nHost: a\r\n\r\n"),
            "bad_target"
        );
        assert_eq!(label("GET * HTTP/1.1\r\nHost: a\r\n\r\n"), "bad_target");
        assert_eq!(
            label("GET example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
            "bad_target"
        );
        assert_eq!(
            check("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
                .unwrap()
                .target,
            Target::Asterisk
        );
        let r =
            check("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").unwrap_err();
        assert_eq!((r.status, r.label), (405, "connect"));
    }

    #[test]
    fn absolute_form_is_routed_by_its_authority() {
        let ok =
            check("GET http://Example.com:80/x?y HTTP/1.1\r\nHost: example.com\r\n\r\n").unwrap();
        assert_eq!(ok.host.as_deref(), Some("Example.com:80"));
        assert_eq!(
            ok.target,
            Target::Absolute {
                authority: "Example.com:80".into(),
                path: "/x?y".into()
            }
        );
        let ok = check("GET https://b.example?q HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(ok.host.as_deref(), Some("b.example"));
        assert_eq!(
            ok.target,
            Target::Absolute {
                authority: "b.example".into(),
                path: "/?q".into()
            }
        );
        assert_eq!(
            label("GET http://a.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n"),
            "bad_host"
        );
        assert_eq!(
            label("GET http://u@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n"),
            "bad_target"
        );
    }

    #[test]
    fn singleton_fields_may_come_once() {
        assert_eq!(
            label("GET / HTTP/1.1\r\nHost: a\r\nHost: evil.example.com\r\n\r\n"),
            "bad_host"
        );
        assert_eq!(
            label("GET / HTTP/1.1\r\nHost: a\r\nContent-Type: a/b\r\ncontent-type: c/d\r\n\r\n"),
            "duplicate_field"
        );
        assert_eq!(
            label("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            "duplicate_field"
        );
    }

    #[test]
    fn content_length_is_one_decimal_number() {
        for value in [
            "5, 5",
            "+1",
            "-0",
            "0_1",
            "3 1",
            "",
            "0x10",
            "9999999999999999999",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {value}\r\n\r\n");
            assert_eq!(label(&raw), "bad_length", "{value:?}");
        }
        assert!(check("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n\r\n").is_ok());
    }

    #[test]
    fn malformed_heads_are_refused() {
        for raw in [
            "GET / HTTP/1.1\r\nLong: one\r\n two\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length : 3\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\x07b\r\n\r\n",
            "GET / FTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n",
            "",
        ] {
            assert_eq!(label(raw), "malformed_head", "{raw:?}");
        }
    }

    #[test]
    fn forbidden_trailers_are_named() {
        for name in [
            "Content-Length",
            "host",
            "TRANSFER-ENCODING",
            "Trailer",
            "authorization",
            "X-Roost-Site",
            "x-forwarded-for",
        ] {
            let r = check_trailers([name.as_bytes()]).unwrap_err();
            assert_eq!(r.label, "forbidden_trailer");
            assert!(r.reason.contains(name), "{}", r.reason);
        }
        assert!(check_trailers([b"x-checksum".as_slice(), b"Expires"]).is_ok());
    }

    #[test]
    fn chunked_bodies_are_scanned_to_their_end() {
        let body =
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 1\r\nHost: evil\r\n\r\nGET /next";
        let Chunked::Complete {
            end,
            data,
            trailers,
        } = scan_chunked(body)
        else {
            panic!("not complete: {:?}", scan_chunked(body));
        };
        assert_eq!(&body[end..], b"GET /next");
        assert_eq!(data, 11);
        assert_eq!(trailers, vec![b"X-Sum".as_slice(), b"Host"]);
        assert_eq!(
            scan_chunked(b"0\r\n\r\n"),
            Chunked::Complete {
                end: 5,
                data: 0,
                trailers: vec![]
            }
        );
        assert_eq!(scan_chunked(b"5\r\nhel"), Chunked::Incomplete);
        assert_eq!(scan_chunked(b"5\r\nhello\r\n0\r\n"), Chunked::Incomplete);
    }

    #[test]
    fn bad_chunk_sizes_are_malformed() {
        for body in [
            &b"-5\r\nhello\r\n0\r\n\r\n"[..],
            b"+5\r\nhello\r\n0\r\n\r\n",
            b" 0\r\n\r\n",
            b"6_0\r\n world\r\n0\r\n\r\n",
            b"\r\nhello\r\n0\r\n\r\n",
            b"5;ext=val\rue\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(
                matches!(scan_chunked(body), Chunked::Malformed(_)),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
