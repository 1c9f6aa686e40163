//! `CertRecord`: a TLS certificate the proxy serves for one host name, stored under
//! `<prefix>/certs/<host>` (or `<prefix>/certs/*.<host>` for a wildcard certificate).
//!
//! The value is JSON with the PEM text of the certificate chain (leaf first) and of its
//! private key. Both live in one value so a renewal replaces them in one atomic write: a
//! handshake never sees a new certificate with an old key. This crate checks only the
//! shape; the proxy parses the PEM and checks that the key matches the certificate.

use serde::{Deserialize, Serialize};

use crate::host::canonical_host;
use crate::informer::Record;
use crate::site::SpecError;

/// One certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRecord {
    /// PEM: the leaf certificate, then any intermediates.
    pub cert: String,
    /// PEM: the private key of the leaf certificate.
    pub key: String,
}

impl CertRecord {
    pub fn from_json(bytes: &[u8]) -> Result<Self, SpecError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let rec: CertRecord = serde_path_to_error::deserialize(de).map_err(|e| SpecError {
            field: match e.path().to_string() {
                p if p == "." => "(record)".to_string(),
                p => p,
            },
            reason: e.into_inner().to_string(),
        })?;
        if !rec.cert.contains("-----BEGIN CERTIFICATE-----") {
            return Err(SpecError {
                field: "cert".into(),
                reason: "holds no PEM certificate".into(),
            });
        }
        if !(rec.key.contains("-----BEGIN") && rec.key.contains("PRIVATE KEY-----")) {
            return Err(SpecError {
                field: "key".into(),
                reason: "holds no PEM private key".into(),
            });
        }
        Ok(rec)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("CertRecord always serialises")
    }
}

/// True for a name a certificate may be stored under: a canonical host, or `*.` and one.
pub fn valid_cert_name(name: &str) -> bool {
    let bare = name.strip_prefix("*.").unwrap_or(name);
    canonical_host(bare).is_ok_and(|c| c == bare)
}

impl Record for CertRecord {
    const KIND: &'static str = "certificate";
    fn decode(name: &str, value: &[u8]) -> Result<Self, SpecError> {
        if !valid_cert_name(name) {
            return Err(SpecError {
                field: "(key)".into(),
                reason: format!("{name:?} is not a canonical host name or `*.` and one"),
            });
        }
        CertRecord::from_json(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"cert":"-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n","key":"-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n"}"#;

    #[test]
    fn records_decode_and_name_bad_fields() {
        let r = CertRecord::decode("a.example", OK.as_bytes()).unwrap();
        assert_eq!(CertRecord::from_json(r.to_json().as_bytes()).unwrap(), r);
        assert!(CertRecord::decode("*.a.example", OK.as_bytes()).is_ok());
        assert_eq!(
            CertRecord::decode("A.example", OK.as_bytes())
                .unwrap_err()
                .field,
            "(key)"
        );
        assert_eq!(
            CertRecord::decode("*.*.a", OK.as_bytes())
                .unwrap_err()
                .field,
            "(key)"
        );
        assert_eq!(
            CertRecord::from_json(br#"{"cert":"x","key":"y"}"#)
                .unwrap_err()
                .field,
            "cert"
        );
        let no_key = OK.replace("PRIVATE KEY", "PUBLIC KEY");
        assert_eq!(
            CertRecord::from_json(no_key.as_bytes()).unwrap_err().field,
            "key"
        );
        assert!(CertRecord::from_json(br#"{"cert":"x"}"#).is_err());
    }
}
