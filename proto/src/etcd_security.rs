//! How a component proves itself to a secured etcd (DESIGN.md, decision 6): TLS with a CA
//! and a client certificate, and a user name with its password.
//!
//! Every binary takes the same five options (flags, TOML keys of the same name with `_`,
//! `ROOST_ETCD_*` environment variables). The files are read and checked here, once, at
//! start, so a wrong path, a file that is not PEM or a key that does not match its
//! certificate is refused with the option and file named, before any connection is tried.

use std::path::{Path, PathBuf};

use std::time::Duration;

use etcd_client::{ConnectOptions, OpenSslClientConfig};
use openssl::error::ErrorStack;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{HandshakeError, SslConnector, SslConnectorBuilder, SslMethod};
use openssl::x509::X509;
use serde::Deserialize;

/// The five options, as flags (`--etcd-ca` …) and as TOML keys (`etcd_ca` …). Global, so
/// roostctl takes them before or after its subcommand.
#[derive(clap::Args, Deserialize, Default, Debug, Clone, PartialEq, Eq)]
pub struct EtcdSecurityArgs {
    /// CA certificate (PEM) that signed etcd's server certificate; needs https:// endpoints.
    #[arg(long, global = true, value_name = "FILE", env = "ROOST_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to etcd (with --etcd-key).
    #[arg(long, global = true, value_name = "FILE", env = "ROOST_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(long, global = true, value_name = "FILE", env = "ROOST_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user name (with --etcd-password-file).
    #[arg(long, global = true, value_name = "USER", env = "ROOST_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password (one line).
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "ROOST_ETCD_PASSWORD_FILE"
    )]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdSecurityArgs {
    /// Each option from `self` (flags) when given there, else from `file`.
    pub fn or(self, file: EtcdSecurityArgs) -> Self {
        Self {
            etcd_ca: self.etcd_ca.or(file.etcd_ca),
            etcd_cert: self.etcd_cert.or(file.etcd_cert),
            etcd_key: self.etcd_key.or(file.etcd_key),
            etcd_user: self.etcd_user.or(file.etcd_user),
            etcd_password_file: self.etcd_password_file.or(file.etcd_password_file),
        }
    }

    /// True when any TLS option is set.
    pub fn wants_tls(&self) -> bool {
        self.etcd_ca.is_some() || self.etcd_cert.is_some() || self.etcd_key.is_some()
    }

    /// Read and check every file named.
    pub fn load(&self) -> Result<EtcdSecurity, SecurityError> {
        let ca = match &self.etcd_ca {
            Some(path) => Some(read_certs("--etcd-ca", path)?),
            None => None,
        };
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs("--etcd-cert", cert)?;
                let pem = read("--etcd-key", key)?;
                let key_pkey = PKey::private_key_from_pem(&pem).map_err(|e| SecurityError {
                    option: "--etcd-key",
                    path: key.clone(),
                    reason: format!("holds no PEM private key ({e})"),
                })?;
                let leaf_key = chain[0].public_key().map_err(|e| SecurityError {
                    option: "--etcd-cert",
                    path: cert.clone(),
                    reason: format!("has no readable public key ({e})"),
                })?;
                if !key_pkey.public_eq(&leaf_key) {
                    return Err(SecurityError {
                        option: "--etcd-key",
                        path: key.clone(),
                        reason: format!("is not the key of the certificate in {}", cert.display()),
                    });
                }
                Some(Identity {
                    chain,
                    key: key_pkey,
                })
            }
            (Some(cert), None) => {
                return Err(SecurityError {
                    option: "--etcd-cert",
                    path: cert.clone(),
                    reason: "needs --etcd-key as well".into(),
                })
            }
            (None, Some(key)) => {
                return Err(SecurityError {
                    option: "--etcd-key",
                    path: key.clone(),
                    reason: "needs --etcd-cert as well".into(),
                })
            }
            (None, None) => None,
        };
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(user), Some(path)) => {
                let text =
                    String::from_utf8(read("--etcd-password-file", path)?).map_err(|_| {
                        SecurityError {
                            option: "--etcd-password-file",
                            path: path.clone(),
                            reason: "is not UTF-8 text".into(),
                        }
                    })?;
                let password = text.trim_end_matches(['\n', '\r']);
                if password.is_empty() || password.contains(['\n', '\r']) {
                    return Err(SecurityError {
                        option: "--etcd-password-file",
                        path: path.clone(),
                        reason: "must hold the password on one non-empty line".into(),
                    });
                }
                Some((user.clone(), password.to_string()))
            }
            (Some(_), None) => {
                return Err(SecurityError {
                    option: "--etcd-user",
                    path: PathBuf::new(),
                    reason: "needs --etcd-password-file as well".into(),
                })
            }
            (None, Some(path)) => {
                return Err(SecurityError {
                    option: "--etcd-password-file",
                    path: path.clone(),
                    reason: "needs --etcd-user as well".into(),
                })
            }
            (None, None) => None,
        };
        Ok(EtcdSecurity {
            tls: (ca.is_some() || identity.is_some()).then_some(Tls { ca, identity }),
            user,
        })
    }
}

/// An option whose file can't be used.
#[derive(Debug, thiserror::Error)]
#[error("{option}{}: {reason}", if path.as_os_str().is_empty() { String::new() } else { format!(" {}", path.display()) })]
pub struct SecurityError {
    pub option: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

/// The checked material, in memory.
#[derive(Clone, Default)]
pub struct EtcdSecurity {
    tls: Option<Tls>,
    user: Option<(String, String)>,
}

#[derive(Clone)]
struct Tls {
    ca: Option<Vec<X509>>,
    identity: Option<Identity>,
}

#[derive(Clone)]
struct Identity {
    /// Leaf first, then intermediates.
    chain: Vec<X509>,
    key: PKey<Private>,
}

/// Never prints the password or the key.
impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("tls", &self.tls.is_some())
            .field("client_cert", &self.has_client_cert())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl EtcdSecurity {
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn has_client_cert(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.identity.is_some())
    }

    /// The etcd user name, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_ref().map(|(u, _)| u.as_str())
    }

    /// `options` with this TLS material and user added.
    pub fn apply(&self, mut options: ConnectOptions) -> ConnectOptions {
        if let Some((user, password)) = &self.user {
            // etcd's tokens expire (5 minutes by default): get a new one instead of failing.
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &self.tls {
            let tls = tls.clone();
            options = options.with_openssl_tls(
                OpenSslClientConfig::default().manually(move |builder| tls.configure(builder)),
            );
        }
        options
    }

    /// Why a TLS connection to `url` (`https://host:port`) fails, if it does: a handshake
    /// of our own, then a short read. With TLS 1.3 a server checks the client certificate
    /// after the handshake, and the gRPC client only sees "connection closed"; the alert
    /// that says why arrives on that read. Blocking: call it off the async threads.
    pub fn tls_failure(&self, url: &str) -> Option<String> {
        let tls = self.tls.as_ref()?;
        let authority = url.strip_prefix("https://")?.split('/').next()?;
        let host = match authority.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => authority,
        };
        let mut builder = SslConnector::builder(SslMethod::tls_client()).ok()?;
        tls.configure(&mut builder).ok()?;
        let connector = builder.build();
        let stream = std::net::TcpStream::connect(authority).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream
            .set_write_timeout(Some(Duration::from_secs(2)))
            .ok()?;
        let mut ssl = match connector.connect(host, stream) {
            Ok(ssl) => ssl,
            Err(HandshakeError::Failure(mid)) => return Some(tls_error_text(mid.error())),
            Err(e) => return Some(e.to_string()),
        };
        let mut byte = [0u8; 1];
        match ssl.ssl_read(&mut byte) {
            Err(e) => Some(tls_error_text(&e)).filter(|s| s.contains("alert")),
            Ok(_) => None,
        }
    }
}

impl Tls {
    fn configure(&self, builder: &mut SslConnectorBuilder) -> Result<(), ErrorStack> {
        if let Some(ca) = &self.ca {
            for cert in ca {
                builder.cert_store_mut().add_cert(cert.clone())?;
            }
        }
        if let Some(id) = &self.identity {
            builder.set_certificate(&id.chain[0])?;
            for extra in &id.chain[1..] {
                builder.add_extra_chain_cert(extra.clone())?;
            }
            builder.set_private_key(&id.key)?;
        }
        Ok(())
    }
}

/// OpenSSL's reason, with the certificate check's own words when that is what failed.
fn tls_error_text(e: &openssl::ssl::Error) -> String {
    match e.ssl_error() {
        Some(stack) => stack.to_string(),
        None => e.to_string(),
    }
}

fn read(option: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|e| SecurityError {
        option,
        path: path.to_path_buf(),
        reason: format!("cannot read: {e}"),
    })
}

/// One or more PEM certificates.
fn read_certs(option: &'static str, path: &Path) -> Result<Vec<X509>, SecurityError> {
    let pem = read(option, path)?;
    match X509::stack_from_pem(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(SecurityError {
            option,
            path: path.to_path_buf(),
            reason: "holds no PEM certificate".into(),
        }),
        Err(e) => Err(SecurityError {
            option,
            path: path.to_path_buf(),
            reason: format!("holds no PEM certificate ({e})"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(ca: Option<&Path>, user: Option<&str>, pw: Option<&Path>) -> EtcdSecurityArgs {
        EtcdSecurityArgs {
            etcd_ca: ca.map(Path::to_path_buf),
            etcd_user: user.map(str::to_string),
            etcd_password_file: pw.map(Path::to_path_buf),
            ..Default::default()
        }
    }

    #[test]
    fn bad_files_are_refused_naming_option_and_file() {
        let dir = std::env::temp_dir().join(format!("roost-etcd-sec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("ca.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let e = args(Some(&not_pem), None, None).load().unwrap_err();
        assert_eq!(e.option, "--etcd-ca");
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
        assert!(e.to_string().contains("ca.pem"), "{e}");

        let missing = dir.join("missing");
        let e = args(Some(&missing), None, None).load().unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");

        let e = args(None, Some("proxy"), None).load().unwrap_err();
        assert_eq!(e.option, "--etcd-user");

        let pw = dir.join("pw");
        std::fs::write(&pw, "\n").unwrap();
        let e = args(None, Some("proxy"), Some(&pw)).load().unwrap_err();
        assert_eq!(e.option, "--etcd-password-file");

        std::fs::write(&pw, "s3cret\n").unwrap();
        let sec = args(None, Some("proxy"), Some(&pw)).load().unwrap();
        assert_eq!(sec.user(), Some("proxy"));
        assert!(!sec.uses_tls());
        assert!(!format!("{sec:?}").contains("s3cret"));

        let only_cert = EtcdSecurityArgs {
            etcd_cert: Some(not_pem.clone()),
            ..Default::default()
        };
        assert_eq!(only_cert.load().unwrap_err().option, "--etcd-cert");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn flags_win_over_the_file() {
        let flags = args(None, Some("a"), None);
        let file = args(Some(Path::new("/ca")), Some("b"), None);
        let merged = flags.or(file);
        assert_eq!(merged.etcd_user.as_deref(), Some("a"));
        assert_eq!(merged.etcd_ca.as_deref(), Some(Path::new("/ca")));
        assert!(merged.wants_tls());
    }
}
