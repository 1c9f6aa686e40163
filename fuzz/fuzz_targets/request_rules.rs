//! The request-acceptance rules over arbitrary bytes: the head (up to the first empty line)
//! through `check_raw_head`, the rest as a chunked body through `scan_chunked` and
//! `check_trailers`. Nothing may panic, and what is accepted must keep the rules' promises,
//! checked here independently of how the rules are written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_proto::request_rules::{
    check_raw_head, check_trailers, scan_chunked, Chunked, RequestHead, Target,
};

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn count(head: &RequestHead<'_>, name: &str) -> usize {
    head.fields
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .count()
}

fuzz_target!(|data: &[u8]| {
    let split = find(data, b"\r\n\r\n").map_or(data.len(), |i| i + 4);
    let (head_bytes, body) = data.split_at(split);

    if let Ok(accepted) = check_raw_head(head_bytes) {
        let head = RequestHead::parse(head_bytes).expect("accepted heads parse");
        assert!(count(&head, "host") <= 1, "two Hosts accepted");
        assert!(count(&head, "content-length") <= 1, "two Content-Lengths accepted");
        assert!(
            count(&head, "content-length") == 0 || count(&head, "transfer-encoding") == 0,
            "Content-Length with Transfer-Encoding accepted"
        );
        assert_ne!(head.method, b"CONNECT", "CONNECT accepted");
        match &accepted.target {
            Target::Origin => assert!(head.target.starts_with(b"/")),
            Target::Asterisk => assert!(head.target == b"*" && head.method == b"OPTIONS"),
            Target::Absolute { authority, path } => {
                assert!(path.starts_with('/') && !path.contains('#'), "{path:?}");
                assert!(!authority.is_empty() && !authority.contains('@'));
                assert_eq!(accepted.host.as_deref(), Some(authority.as_str()));
            }
        }
    }

    match scan_chunked(body) {
        Chunked::Complete {
            end,
            data,
            trailers,
        } => {
            assert!(end <= body.len() && data <= end);
            // Whatever follows the body (a pipelined request) cannot change where it ends.
            let mut longer = body[..end].to_vec();
            longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert!(
                matches!(scan_chunked(&longer), Chunked::Complete { end: e, .. } if e == end)
            );
            let _ = check_trailers(trailers);
        }
        Chunked::Incomplete => {
            // A prefix of an incomplete body is incomplete too, never complete.
            if let Some(cut) = body.len().checked_sub(1) {
                assert!(!matches!(scan_chunked(&body[..cut]), Chunked::Complete { .. }));
            }
        }
        Chunked::Malformed(_) => {}
    }
});
