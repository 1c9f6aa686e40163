//! Connecting to etcd the same way in every component: endpoints, TLS and credentials
//! ([`crate::etcd_security`]), keep-alives, and a start-time check whose error names the cause.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};

use crate::etcd_security::{EtcdSecurity, EtcdSecurityArgs, SecurityError};

/// The endpoints used when neither `--etcd` nor `$ROOST_ETCD` says otherwise.
pub const DEFAULT_ENDPOINTS: &str = "http://127.0.0.1:2379";

/// Split `--etcd` (comma-separated URLs) into endpoints.
pub fn endpoints(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Options that notice a dead etcd within seconds (HTTP/2 keep-alive), so watches are
/// re-established promptly instead of hanging on a half-open connection.
pub fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3))
        .with_keep_alive_while_idle(true)
}

/// Everything a component needs to reach etcd: where, and as whom. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EtcdAccess {
    urls: Arc<str>,
    security: Arc<EtcdSecurity>,
}

impl EtcdAccess {
    /// `urls` (comma separated) with the security options, whose files are read now.
    pub fn new(urls: &str, security: &EtcdSecurityArgs) -> Result<Self, SecurityError> {
        let loaded = security.load()?;
        if loaded.uses_tls() {
            if let Some(plain) = endpoints(urls)
                .into_iter()
                .find(|u| !u.starts_with("https://"))
            {
                return Err(SecurityError {
                    option: "--etcd",
                    path: plain.into(),
                    reason: "TLS options (--etcd-ca/--etcd-cert) need https:// endpoints; \
                             this one would be reached in clear text"
                        .into(),
                });
            }
        }
        Ok(Self {
            urls: urls.into(),
            security: Arc::new(loaded),
        })
    }

    /// Plain access to `urls`: no TLS, no user (tests, tools, one-machine setups).
    pub fn plain(urls: &str) -> Self {
        Self {
            urls: urls.into(),
            security: Arc::new(EtcdSecurity::default()),
        }
    }

    /// The endpoints as given.
    pub fn urls(&self) -> &str {
        &self.urls
    }

    pub fn security(&self) -> &EtcdSecurity {
        &self.security
    }

    /// Connect once (the client reconnects lazily afterwards). With a user, this
    /// authenticates, so a wrong password fails here.
    pub async fn connect(&self) -> Result<Client, etcd_client::Error> {
        Client::connect(
            endpoints(&self.urls),
            Some(self.security.apply(connect_options())),
        )
        .await
    }

    /// Connect and prove, at start, that this component may do what it will do: read
    /// under each of `reads` (a prefix), and write each of `writes` (a key). Nothing is
    /// written: the writes are the unreachable branch of a transaction, which etcd still
    /// checks permissions for. An error says what is wrong, in an operator's words.
    pub async fn check(&self, reads: &[String], writes: &[String]) -> Result<(), AccessError> {
        match self.check_inner(reads, writes).await {
            Err(e) if !e.fatal && self.security.uses_tls() => Err(self.with_tls_cause(e).await),
            other => other,
        }
    }

    /// `e` (etcd unreachable), or what a TLS handshake of our own says is wrong: with TLS
    /// 1.3 a refused client certificate looks like a closed connection to the gRPC client.
    pub async fn with_tls_cause(&self, e: AccessError) -> AccessError {
        let access = self.clone();
        let probe = tokio::task::spawn_blocking(move || {
            endpoints(&access.urls)
                .iter()
                .find_map(|url| access.security.tls_failure(url))
        });
        match probe.await {
            Ok(Some(cause)) => {
                let explained = explain_text(&cause, self);
                if explained.fatal {
                    return explained;
                }
                e
            }
            _ => e,
        }
    }

    async fn check_inner(&self, reads: &[String], writes: &[String]) -> Result<(), AccessError> {
        let explain = |e: etcd_client::Error| explain(&e, self);
        let mut client = self.connect().await.map_err(explain)?;
        for prefix in reads {
            client
                .get(
                    prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .map_err(|e| explain(e).reading(prefix))?;
        }
        if !writes.is_empty() {
            // `version < 0` never holds: the puts are checked, never applied.
            let never = writes
                .iter()
                .map(|k| Compare::version(k.as_str(), CompareOp::Less, 0))
                .collect::<Vec<_>>();
            let puts = writes
                .iter()
                .map(|k| TxnOp::put(k.as_str(), "", None))
                .collect::<Vec<_>>();
            client
                .txn(Txn::new().when(never).and_then(puts))
                .await
                .map_err(|e| explain(e).writing(writes))?;
        }
        Ok(())
    }
}

/// Why a component can't use etcd.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AccessError {
    /// True when retrying can't help (credentials, certificates, permissions): the
    /// component stops at start. False for an etcd that is down or unreachable.
    pub fatal: bool,
    pub message: String,
}

impl AccessError {
    fn reading(mut self, prefix: &str) -> Self {
        if self.message.contains("permission denied") {
            self.message = format!("{} (reading {prefix})", self.message);
        }
        self
    }

    fn writing(mut self, keys: &[String]) -> Self {
        if self.message.contains("permission denied") {
            self.message = format!("{} (writing {})", self.message, keys.join(", "));
        }
        self
    }
}

/// Turn a client error into a sentence naming the cause and the option that fixes it.
pub fn explain(e: &etcd_client::Error, access: &EtcdAccess) -> AccessError {
    explain_text(&error_chain(e), access)
}

fn explain_text(chain: &str, access: &EtcdAccess) -> AccessError {
    let lower = chain.to_ascii_lowercase();
    let user = access.security.user().unwrap_or("");
    let ca_hint = if access.security.uses_tls() {
        "the server's certificate is not signed by the CA in --etcd-ca"
    } else {
        "give the CA that signed etcd's certificate with --etcd-ca"
    };
    let fatal = |message: String| AccessError {
        fatal: true,
        message,
    };
    if lower.contains("authentication failed") {
        fatal(format!(
            "etcd refused user {user:?}: wrong user name or password \
             (check --etcd-user and --etcd-password-file): {chain}"
        ))
    } else if lower.contains("user name is empty") || lower.contains("user name not found") {
        fatal(format!(
            "etcd requires authentication: give --etcd-user and --etcd-password-file: {chain}"
        ))
    } else if lower.contains("permission denied") {
        fatal(format!(
            "permission denied: etcd user {user:?} lacks a role granting this \
             (see deploy/etcd/roles.sh): {chain}"
        ))
    } else if lower.contains("certificate verify failed") {
        fatal(format!(
            "TLS: cannot verify etcd's certificate: {ca_hint}: {chain}"
        ))
    } else if lower.contains("alert")
        && (lower.contains("certificate") || lower.contains("unknown ca"))
    {
        fatal(format!(
            "TLS: etcd rejected our client certificate (it must be signed by a CA in etcd's \
             --trusted-ca-file; check --etcd-cert and --etcd-key): {chain}"
        ))
    } else if lower.contains("wrong version number") || lower.contains("ssl") {
        fatal(format!("TLS handshake with etcd failed: {chain}"))
    } else {
        AccessError {
            fatal: false,
            message: format!("cannot reach etcd at {}: {chain}", access.urls),
        }
    }
}

/// The error and each of its causes, deduplicated, joined by ": ".
fn error_chain(e: &etcd_client::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let etcd_client::Error::GRpcStatus(s) = e {
        if !s.message().is_empty() {
            parts.push(s.message().to_string());
        }
    }
    let mut next: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_split_and_trimmed() {
        assert_eq!(
            super::endpoints("http://a:1, http://b:2,"),
            vec!["http://a:1".to_string(), "http://b:2".to_string()]
        );
    }

    #[test]
    fn statuses_are_explained() {
        let access = EtcdAccess::plain("http://127.0.0.1:1");
        let status = |msg: &str| etcd_client::Error::GRpcStatus(tonic_status(msg));
        let e = explain(
            &status("etcdserver: authentication failed, invalid user ID or password"),
            &access,
        );
        assert!(
            e.fatal && e.message.contains("wrong user name or password"),
            "{}",
            e.message
        );
        let e = explain(&status("etcdserver: permission denied"), &access);
        assert!(
            e.fatal && e.message.starts_with("permission denied"),
            "{}",
            e.message
        );
        let e = explain(&status("etcdserver: user name is empty"), &access);
        assert!(
            e.fatal && e.message.contains("requires authentication"),
            "{}",
            e.message
        );
        let e = explain(&etcd_client::Error::InvalidArgs("x".into()), &access);
        assert!(!e.fatal);
    }

    /// A self-signed CA certificate (PEM), made in memory.
    fn ca_pem() -> Vec<u8> {
        use openssl::{ec, hash::MessageDigest, nid::Nid, pkey::PKey, x509};
        let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap();
        let mut name = x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "test CA").unwrap();
        let name = name.build();
        let mut b = x509::X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        b.build().to_pem().unwrap()
    }

    #[test]
    fn tls_options_refuse_a_clear_text_endpoint() {
        let dir = std::env::temp_dir().join(format!("roost-etcd-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_pem()).unwrap();
        let args = EtcdSecurityArgs {
            etcd_ca: Some(ca),
            ..Default::default()
        };
        let e = EtcdAccess::new("https://a:2379,http://b:2379", &args).unwrap_err();
        assert_eq!(e.option, "--etcd");
        assert!(e.to_string().contains("http://b:2379"), "{e}");
        let ok = EtcdAccess::new("https://a:2379", &args).unwrap();
        assert!(ok.security().uses_tls());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tonic_status(msg: &str) -> tonic::Status {
        tonic::Status::new(tonic::Code::PermissionDenied, msg)
    }
}
