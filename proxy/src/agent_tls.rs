//! How the proxy proves itself to agents and checks that an agent is one (issue 10): TLS to
//! agents with a CA the agents' certificates must chain to, each checked against the node
//! id it was placed by (its certificate must name the node, `DNS:<node-id>`), and a client
//! certificate the agents require. A forged node record then leads to a listener that can't
//! finish the handshake, and the credential is never sent there.
//!
//! Without `--agent-ca` agents are reached over plain HTTP, as before (demo, tests); the
//! proxy warns at start, since anyone who can write a node record then receives the secret.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use pingora_core::tls::pkey::PKey;
use pingora_core::tls::x509::X509;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::CertKey;

/// TLS settings for connections to agents.
#[derive(Clone)]
pub struct AgentTls {
    ca: Arc<Box<[X509]>>,
    client: Option<Arc<CertKey>>,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTls")
            .field("ca_certs", &self.ca.len())
            .field("client_cert", &self.client.is_some())
            .finish()
    }
}

impl AgentTls {
    /// Read `--agent-ca` and, when given, `--agent-client-cert` + `--agent-client-key`.
    pub fn load(ca: &Path, cert: Option<&PathBuf>, key: Option<&PathBuf>) -> Result<Self> {
        let ca_pem = std::fs::read(ca)
            .with_context(|| format!("--agent-ca {}: cannot read", ca.display()))?;
        let ca_certs = X509::stack_from_pem(&ca_pem)
            .ok()
            .filter(|c| !c.is_empty())
            .with_context(|| format!("--agent-ca {}: holds no PEM certificate", ca.display()))?;
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some(Arc::new(load_cert_key(cert, key)?)),
            (None, None) => None,
            _ => anyhow::bail!("--agent-client-cert and --agent-client-key go together"),
        };
        Ok(Self {
            ca: Arc::new(ca_certs.into_boxed_slice()),
            client,
        })
    }

    pub fn has_client_cert(&self) -> bool {
        self.client.is_some()
    }

    /// A TLS peer for `node` at `addr`: the agent's certificate must chain to the CA and
    /// name `node`.
    pub fn peer(&self, addr: std::net::SocketAddr, node: &str) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, true, node.to_string());
        peer.client_cert_key = self.client.clone();
        peer.options.ca = Some(self.ca.clone());
        peer.options.verify_cert = true;
        peer.options.verify_hostname = true;
        peer
    }
}

fn load_cert_key(cert: &Path, key: &Path) -> Result<CertKey> {
    let pem = std::fs::read(cert)
        .with_context(|| format!("--agent-client-cert {}: cannot read", cert.display()))?;
    let chain = X509::stack_from_pem(&pem)
        .ok()
        .filter(|c| !c.is_empty())
        .with_context(|| {
            format!(
                "--agent-client-cert {}: holds no PEM certificate",
                cert.display()
            )
        })?;
    let pem = std::fs::read(key)
        .with_context(|| format!("--agent-client-key {}: cannot read", key.display()))?;
    let pkey = PKey::private_key_from_pem(&pem).with_context(|| {
        format!(
            "--agent-client-key {}: holds no PEM private key",
            key.display()
        )
    })?;
    let matches = chain[0]
        .public_key()
        .map(|public| pkey.public_eq(&public))
        .unwrap_or(false);
    if !matches {
        anyhow::bail!(
            "--agent-client-key {} is not the key of the certificate in {}",
            key.display(),
            cert.display()
        );
    }
    Ok(CertKey::new(chain, pkey))
}
