//! Headers between proxy and agent (DESIGN.md, decision 6).
//!
//! Every header whose name starts with [`INTERNAL_PREFIX`] is Roost's own: the proxy
//! removes all of them from client requests before adding its own, so a client can never
//! choose the site an agent serves or present the proxy's credential.

/// Prefix of every internal header name (lower case, as HTTP/2 and pingora store them).
pub const INTERNAL_PREFIX: &str = "x-roost-";
/// The canonical host of the site the proxy resolved.
pub const SITE: &str = "x-roost-site";
/// The proxy's credential: the shared secret both sides were given.
pub const AUTH: &str = "x-roost-auth";
/// The proxy's snapshot revision when it routed; an agent that is behind waits to catch up.
pub const REVISION: &str = "x-roost-revision";
/// Set on a proxy's *warm call*: start the site's worker if none runs, and answer at once.
pub const WARM: &str = "x-roost-warm";
/// Request id, kept from the client when present and well-formed, else generated.
pub const REQUEST_ID: &str = "x-request-id";

/// True for a header name that only Roost may set.
pub fn is_internal(name: &str) -> bool {
    name.len() >= INTERNAL_PREFIX.len()
        && name[..INTERNAL_PREFIX.len()].eq_ignore_ascii_case(INTERNAL_PREFIX)
}

/// Compare a presented credential with the expected one in time independent of where they
/// differ and of the presented length: both are hashed to 32 bytes first (so there is no
/// early exit on a length mismatch), then compared with OpenSSL's constant-time `CRYPTO_memcmp`.
pub fn credential_matches(presented: &[u8], expected: &[u8]) -> bool {
    use openssl::sha::sha256;
    openssl::memcmp::eq(&sha256(presented), &sha256(expected))
}

/// A request id we accept from outside: short, printable, no spaces.
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Why a secret file can't be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("secret file {path} holds {len} characters; use at least {MIN_SECRET_LEN}")]
    Short { path: String, len: usize },
    #[error("secret file {path} holds control characters (more than one line?)")]
    Control { path: String },
}

/// The shortest secret proxies and agents accept.
pub const MIN_SECRET_LEN: usize = 16;

/// Read the cluster secret: the file's content without surrounding whitespace, one line of
/// at least [`MIN_SECRET_LEN`] characters. The one rule proxy, agent and roostctl share.
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, SecretError> {
    let shown = || path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
        path: shown(),
        source,
    })?;
    let secret = text.trim();
    if secret.bytes().any(|b| b.is_ascii_control()) {
        return Err(SecretError::Control { path: shown() });
    }
    if secret.len() < MIN_SECRET_LEN {
        return Err(SecretError::Short {
            path: shown(),
            len: secret.len(),
        });
    }
    Ok(secret.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_headers_are_recognised_in_any_case() {
        assert!(is_internal("X-Roost-Site"));
        assert!(is_internal("x-roost-anything"));
        assert!(!is_internal("x-roos"));
        assert!(!is_internal("x-forwarded-for"));
    }

    #[test]
    fn credentials_compare_exactly() {
        assert!(credential_matches(b"secret", b"secret"));
        assert!(!credential_matches(b"secreT", b"secret"));
        assert!(!credential_matches(b"secret1", b"secret"));
        assert!(!credential_matches(b"", b"secret"));
        assert!(!credential_matches(b"secret", b""));
        assert!(credential_matches(b"", b""));
    }

    #[test]
    fn request_ids_are_checked() {
        assert!(valid_request_id("3f2a-11:x.y_z"));
        assert!(!valid_request_id("has space"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id(&"a".repeat(200)));
    }

    #[test]
    fn a_secret_is_one_trimmed_line_of_sixteen_characters_or_more() {
        let dir = std::env::temp_dir().join(format!("roost-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "  0123456789abcdef\n").unwrap();
        assert_eq!(read_secret(&file).unwrap(), b"0123456789abcdef");
        std::fs::write(&file, "short\n").unwrap();
        assert!(matches!(
            read_secret(&file),
            Err(SecretError::Short { len: 5, .. })
        ));
        std::fs::write(&file, "0123456789abcdef\nsecond line").unwrap();
        assert!(matches!(
            read_secret(&file),
            Err(SecretError::Control { .. })
        ));
        assert!(matches!(
            read_secret(&dir.join("missing")),
            Err(SecretError::Read { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
