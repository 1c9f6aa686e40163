//! Host-name canonicalisation.
//!
//! The same function builds etcd keys (`roostctl site add Example.COM`) and reads `Host`
//! headers (`EXAMPLE.com:8080`), so both meet on one spelling: lower case, no port, no
//! trailing dot, IDNA (punycode) for non-ASCII names.

use thiserror::Error;

/// Why a host name was refused. The message is safe to show to a client.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HostError {
    #[error("host is empty")]
    Empty,
    #[error("host is longer than 253 characters")]
    TooLong,
    #[error("host has an invalid port")]
    BadPort,
    #[error("host label {0:?} is empty or longer than 63 characters")]
    BadLabel(String),
    #[error("host contains the character {0:?}, which no host name may contain")]
    BadChar(char),
    #[error("host is not a valid internationalised domain name")]
    Idna,
    #[error("host is an IP address literal, not a site name")]
    IpLiteral,
}

/// Canonicalise a host name as it appears in a `Host` header or on a command line.
///
/// Accepts an optional `:port` (which is dropped), a trailing dot, any case, and Unicode
/// names (converted to punycode). Refuses IP literals: a site is always a name.
pub fn canonical_host(raw: &str) -> Result<String, HostError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if raw.starts_with('[') {
        return Err(HostError::IpLiteral);
    }
    let name = match raw.rsplit_once(':') {
        Some((name, port)) => {
            if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HostError::BadPort);
            }
            if port.parse::<u16>().is_err() {
                return Err(HostError::BadPort);
            }
            name
        }
        None => raw,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    let ascii = if name.is_ascii() {
        name.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii_strict(name).map_err(|_| HostError::Idna)?
    };
    validate_ldh(&ascii)?;
    if ascii.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(HostError::IpLiteral);
    }
    Ok(ascii)
}

/// Letters, digits, hyphens (and underscores, which real DNS names carry, e.g. `_dmarc`) in
/// labels of 1..=63 characters, 253 in all; a leading `*.`
/// label is not allowed here (wildcards are an alias feature, checked where aliases are).
fn validate_ldh(name: &str) -> Result<(), HostError> {
    if name.len() > 253 {
        return Err(HostError::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(HostError::BadLabel(label.to_string()));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(HostError::BadChar(c));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostError::BadLabel(label.to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_port_and_trailing_dot_are_normalised() {
        assert_eq!(canonical_host("Example.COM").unwrap(), "example.com");
        assert_eq!(canonical_host("example.com:8080").unwrap(), "example.com");
        assert_eq!(canonical_host("example.com.").unwrap(), "example.com");
        assert_eq!(canonical_host("EXAMPLE.com.:80").unwrap(), "example.com");
        assert_eq!(canonical_host("localhost").unwrap(), "localhost");
    }

    #[test]
    fn unicode_names_become_punycode() {
        assert_eq!(
            canonical_host("bücher.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(
            canonical_host("BÜCHER.example").unwrap(),
            "xn--bcher-kva.example"
        );
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert_eq!(canonical_host(""), Err(HostError::Empty));
        assert_eq!(canonical_host("   "), Err(HostError::Empty));
        assert_eq!(canonical_host("."), Err(HostError::Empty));
        assert_eq!(canonical_host("a b.com"), Err(HostError::BadChar(' ')));
        assert_eq!(
            canonical_host("evil.com/path"),
            Err(HostError::BadChar('/'))
        );
        assert_eq!(
            canonical_host("a..b"),
            Err(HostError::BadLabel(String::new()))
        );
        assert_eq!(
            canonical_host("-a.com"),
            Err(HostError::BadLabel("-a".into()))
        );
        assert_eq!(canonical_host("a.com:"), Err(HostError::BadPort));
        assert_eq!(canonical_host("a.com:99999"), Err(HostError::BadPort));
        assert_eq!(canonical_host("a.com:x"), Err(HostError::BadPort));
        assert_eq!(canonical_host("user@a.com"), Err(HostError::BadChar('@')));
        assert_eq!(
            canonical_host(&"a".repeat(64)),
            Err(HostError::BadLabel("a".repeat(64)))
        );
        assert_eq!(canonical_host(&"a.".repeat(130)), Err(HostError::TooLong));
    }

    #[test]
    fn ip_literals_are_not_site_names() {
        assert_eq!(canonical_host("127.0.0.1"), Err(HostError::IpLiteral));
        assert_eq!(canonical_host("127.0.0.1:8080"), Err(HostError::IpLiteral));
        assert_eq!(canonical_host("[::1]:80"), Err(HostError::IpLiteral));
    }
}
