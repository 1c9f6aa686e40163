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
/// Proof that an admin request comes from a holder of the secret, without sending the
/// secret: see [`admin_proof`].
pub const ADMIN_PROOF: &str = "x-roost-admin-proof";
/// How long an [`admin_proof`] is accepted, either side of its time.
pub const ADMIN_PROOF_WINDOW_SECS: u64 = 60;
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
    Credential::new(expected).matches(presented)
}

/// The expected credential, hashed once: checking a request then hashes only what it
/// presents ([`credential_matches`] on every request hashed both, a few % of the agent's CPU).
#[derive(Clone)]
pub struct Credential {
    digest: [u8; 32],
}

impl Credential {
    pub fn new(expected: &[u8]) -> Self {
        Self {
            digest: openssl::sha::sha256(expected),
        }
    }

    pub fn matches(&self, presented: &[u8]) -> bool {
        openssl::memcmp::eq(&openssl::sha::sha256(presented), &self.digest)
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(..)")
    }
}

/// `<unix secs>:<hex HMAC-SHA256(secret, "<secs>\n<path and query>")>`: what roostctl sends
/// to an agent's admin port, whose address it read from etcd. A forged node record then
/// collects a proof good for that one path for a minute, never the secret itself.
pub fn admin_proof(secret: &[u8], path_and_query: &str, unix_secs: u64) -> String {
    format!(
        "{unix_secs}:{}",
        hex(&admin_mac(secret, path_and_query, unix_secs))
    )
}

/// True when `proof` is [`admin_proof`] of `path_and_query` under `secret`, made within
/// [`ADMIN_PROOF_WINDOW_SECS`] of `now_secs`.
pub fn admin_proof_valid(secret: &[u8], path_and_query: &str, proof: &[u8], now_secs: u64) -> bool {
    let Ok(proof) = std::str::from_utf8(proof) else {
        return false;
    };
    let Some((secs, mac)) = proof.split_once(':') else {
        return false;
    };
    let Ok(secs) = secs.parse::<u64>() else {
        return false;
    };
    if secs.abs_diff(now_secs) > ADMIN_PROOF_WINDOW_SECS {
        return false;
    }
    let expected = hex(&admin_mac(secret, path_and_query, secs));
    credential_matches(mac.as_bytes(), expected.as_bytes())
}

fn admin_mac(secret: &[u8], path_and_query: &str, unix_secs: u64) -> Vec<u8> {
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::sign::Signer;
    let mac = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let key = PKey::hmac(secret)?;
        let mut signer = Signer::new(MessageDigest::sha256(), &key)?;
        signer.update(format!("{unix_secs}\n{path_and_query}").as_bytes())?;
        signer.sign_to_vec()
    };
    // HMAC-SHA256 with an in-memory key fails only when OpenSSL itself is broken; an empty
    // MAC then matches nothing a sender could make.
    mac().unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
    fn admin_proofs_bind_the_path_and_expire() {
        let secret = b"0123456789abcdef";
        let proof = admin_proof(secret, "/sites/a.example/log?lines=5", 1_000);
        let ok = |path: &str, now| admin_proof_valid(secret, path, proof.as_bytes(), now);
        assert!(ok("/sites/a.example/log?lines=5", 1_000));
        assert!(ok(
            "/sites/a.example/log?lines=5",
            1_000 + ADMIN_PROOF_WINDOW_SECS
        ));
        assert!(!ok(
            "/sites/a.example/log?lines=5",
            1_001 + ADMIN_PROOF_WINDOW_SECS
        ));
        assert!(!ok("/sites/b.example/log?lines=5", 1_000));
        assert!(!ok("/sites", 1_000));
        assert!(!admin_proof_valid(
            b"another secret!!",
            "/sites/a.example/log?lines=5",
            proof.as_bytes(),
            1_000
        ));
        assert!(!admin_proof_valid(secret, "/sites", b"garbage", 1_000));
        assert!(!proof.contains("0123456789abcdef"));
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
