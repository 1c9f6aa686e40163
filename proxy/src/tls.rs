//! TLS termination with a certificate per host name, chosen by SNI during the handshake.
//!
//! Certificates come from two places, both picked up while running:
//! - etcd, `<prefix>/certs/<host>` ([`CertRecord`] JSON), through an informer;
//! - a directory (`tls_cert_dir`) of `<host>.crt` (chain, leaf first) + `<host>.key` pairs,
//!   rescanned every few seconds.
//!
//! `*.example.com` names a wildcard certificate (key `<prefix>/certs/*.example.com`, files
//! `*.example.com.crt`/`.key`). A name in the directory wins over the same name in etcd: the
//! directory is the local override. Every source is parsed once when it changes, never on the
//! handshake path, and a pair whose key does not match its certificate is refused (logged,
//! counted), keeping the last good one for that name.
//!
//! The openssl backend is used because pingora 0.9 calls `certificate_callback` only there.

use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::listeners::TlsAccept;
use pingora_core::protocols::tls::TlsRef;
use pingora_core::tls::ext;
use pingora_core::tls::pkey::{PKey, Private};
use pingora_core::tls::ssl::NameType;
use pingora_core::tls::x509::X509;
use roost_proto::{CertRecord, Informer};
use tracing::{debug, info, warn};

/// A parsed certificate chain and key, ready for a handshake.
pub struct LoadedCert {
    /// The name it is stored under (`a.example` or `*.a.example`).
    pub name: String,
    pub source: &'static str,
    leaf: X509,
    chain: Vec<X509>,
    key: PKey<Private>,
}

impl std::fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedCert")
            .field("name", &self.name)
            .field("source", &self.source)
            .finish()
    }
}

/// Parse a PEM chain and key and check that they belong together.
pub fn load_pem(
    name: &str,
    source: &'static str,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<LoadedCert, String> {
    let mut certs = X509::stack_from_pem(cert_pem).map_err(|e| format!("certificate: {e}"))?;
    if certs.is_empty() {
        return Err("certificate: no PEM certificate found".into());
    }
    let leaf = certs.remove(0);
    let key = PKey::private_key_from_pem(key_pem).map_err(|e| format!("key: {e}"))?;
    let public = leaf
        .public_key()
        .map_err(|e| format!("certificate public key: {e}"))?;
    if !public.public_eq(&key) {
        return Err("the key does not belong to the certificate".into());
    }
    Ok(LoadedCert {
        name: name.to_string(),
        source,
        leaf,
        chain: certs,
        key,
    })
}

/// What the handshake chose, kept with the connection for the request path.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// The SNI name the client sent (lower case, no trailing dot).
    pub sni: Option<String>,
    /// The name of the certificate served.
    pub cert_name: Option<String>,
}

impl TlsInfo {
    /// Whether the certificate this connection was set up with covers `host`: when it does
    /// not, the request came over a connection meant for another name (421).
    pub fn covers(&self, host: &str) -> bool {
        match &self.cert_name {
            None => true,
            Some(name) => cert_covers(name, host),
        }
    }
}

/// `name` (`a.example` or `*.a.example`) covers `host` by the rules of TLS name matching:
/// a wildcard covers exactly one more label.
pub fn cert_covers(name: &str, host: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => name == host,
    }
}

#[derive(Default)]
struct Sources {
    /// From etcd: the record each was parsed from, to parse only what changed.
    etcd: HashMap<String, (Arc<CertRecord>, Arc<LoadedCert>)>,
    /// From the directory: (modified time, length) of both files when parsed.
    dir: HashMap<String, (FileStamp, Arc<LoadedCert>)>,
}

type FileStamp = (Option<SystemTime>, u64, Option<SystemTime>, u64);

/// Every certificate the proxy can serve, by name; swapped whole when a source changes.
pub struct CertStore {
    table: ArcSwap<HashMap<String, Arc<LoadedCert>>>,
    sources: Mutex<Sources>,
    default_host: Option<String>,
    etcd: OnceLock<Arc<Informer<CertRecord>>>,
    pub invalid: AtomicU64,
    pub no_cert_handshakes: AtomicU64,
}

impl CertStore {
    pub fn new(default_host: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            table: ArcSwap::from_pointee(HashMap::new()),
            sources: Mutex::new(Sources::default()),
            default_host,
            etcd: OnceLock::new(),
            invalid: AtomicU64::new(0),
            no_cert_handshakes: AtomicU64::new(0),
        })
    }

    /// Follow this informer's certificates (once).
    pub fn attach(&self, informer: Arc<Informer<CertRecord>>) {
        let _ = self.etcd.set(informer);
    }

    /// True once etcd's certificates have been listed.
    pub fn is_synced(&self) -> bool {
        self.etcd.get().is_some_and(|i| i.is_synced())
    }

    pub fn count(&self) -> usize {
        self.table.load().len()
    }

    /// The certificate for SNI name `sni`: the exact name, else the wildcard of its parent,
    /// else the default host's (which also serves clients that send no SNI).
    pub fn find(&self, sni: Option<&str>) -> Option<Arc<LoadedCert>> {
        let table = self.table.load();
        if let Some(name) = sni {
            if let Some(c) = table.get(name) {
                return Some(c.clone());
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(c) = table.get(&format!("*.{parent}")) {
                    return Some(c.clone());
                }
            }
        }
        let default = self.default_host.as_deref()?;
        table.get(default).cloned()
    }

    fn publish(&self, sources: &Sources) {
        let mut table: HashMap<String, Arc<LoadedCert>> = HashMap::new();
        for (name, (_, cert)) in &sources.etcd {
            table.insert(name.clone(), cert.clone());
        }
        for (name, (_, cert)) in &sources.dir {
            if table.contains_key(name) {
                debug!(name = %name, "certificate in both etcd and the directory; the directory's wins");
            }
            table.insert(name.clone(), cert.clone());
        }
        self.table.store(Arc::new(table));
    }

    /// Follow `<prefix>/certs/` until the informer ends.
    pub async fn follow_etcd(self: Arc<Self>, informer: Arc<Informer<CertRecord>>) {
        let mut rx = informer.subscribe();
        let mut last = None;
        loop {
            let snap = informer.snapshot();
            if last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &snap)) {
                self.apply_etcd(&snap.items);
                last = Some(snap);
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn apply_etcd(&self, items: &roost_proto::informer::Items<CertRecord>) {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::new();
        for (name, rec) in items {
            if let Some((old_rec, cert)) = sources.etcd.get(name) {
                if Arc::ptr_eq(old_rec, rec) || **old_rec == **rec {
                    next.insert(name.clone(), (rec.clone(), cert.clone()));
                    continue;
                }
            }
            match load_pem(name, "etcd", rec.cert.as_bytes(), rec.key.as_bytes()) {
                Ok(cert) => {
                    info!(name = %name, source = "etcd", "certificate loaded");
                    next.insert(name.clone(), (rec.clone(), Arc::new(cert)));
                }
                Err(e) => {
                    self.invalid.fetch_add(1, Ordering::Relaxed);
                    let kept = sources.etcd.get(name).cloned();
                    warn!(name = %name, source = "etcd", error = %e, kept_last_valid = kept.is_some(),
                        "skipping invalid certificate");
                    if let Some(k) = kept {
                        next.insert(name.clone(), k);
                    }
                }
            }
        }
        for name in sources.etcd.keys() {
            if !next.contains_key(name) {
                info!(name = %name, source = "etcd", "certificate removed");
            }
        }
        sources.etcd = next;
        self.publish(&sources);
    }

    /// Rescan `dir` every `every` forever.
    pub async fn follow_dir(self: Arc<Self>, dir: PathBuf, every: Duration) {
        loop {
            let store = self.clone();
            let d = dir.clone();
            // File reads are blocking; keep them off the async workers.
            let _ = tokio::task::spawn_blocking(move || store.scan_dir(&d)).await;
            tokio::time::sleep(every).await;
        }
    }

    /// Read `dir` once: load new and changed pairs, drop removed ones.
    pub fn scan_dir(&self, dir: &Path) {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot read the certificate directory");
                return;
            }
        };
        let mut names = Vec::new();
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(file) = file.to_str() else { continue };
            if let Some(name) = file.strip_suffix(".crt") {
                if roost_proto::cert::valid_cert_name(name) {
                    names.push(name.to_string());
                } else {
                    debug!(file, "ignoring a file whose name is not a host name");
                }
            }
        }
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::new();
        let mut changed = false;
        for name in names {
            let crt = dir.join(format!("{name}.crt"));
            let key = dir.join(format!("{name}.key"));
            let stamp = |p: &Path| {
                std::fs::metadata(p)
                    .map(|m| (m.modified().ok(), m.len()))
                    .unwrap_or((None, 0))
            };
            let (cm, cl) = stamp(&crt);
            let (km, kl) = stamp(&key);
            let now: FileStamp = (cm, cl, km, kl);
            if let Some((old, cert)) = sources.dir.get(&name) {
                if *old == now {
                    next.insert(name, (now, cert.clone()));
                    continue;
                }
            }
            let loaded = std::fs::read(&crt)
                .map_err(|e| format!("{}: {e}", crt.display()))
                .and_then(|c| {
                    std::fs::read(&key)
                        .map_err(|e| format!("{}: {e}", key.display()))
                        .map(|k| (c, k))
                })
                .and_then(|(c, k)| load_pem(&name, "dir", &c, &k));
            changed = true;
            match loaded {
                Ok(cert) => {
                    info!(name = %name, source = "dir", "certificate loaded");
                    next.insert(name, (now, Arc::new(cert)));
                }
                Err(e) => {
                    self.invalid.fetch_add(1, Ordering::Relaxed);
                    // Keep the last good pair, but remember the new stamp so a broken file
                    // is reported once, not on every scan.
                    let kept = sources.dir.get(&name).map(|(_, c)| c.clone());
                    warn!(name = %name, source = "dir", error = %e, kept_last_valid = kept.is_some(),
                        "skipping invalid certificate");
                    if let Some(k) = kept {
                        next.insert(name, (now, k));
                    }
                }
            }
        }
        for name in sources.dir.keys() {
            if !next.contains_key(name) {
                changed = true;
                info!(name = %name, source = "dir", "certificate removed");
            }
        }
        sources.dir = next;
        if changed {
            self.publish(&sources);
        }
    }
}

/// Pingora's TLS hooks: pick the certificate by SNI; remember what was picked.
pub struct SniCallbacks {
    pub store: Arc<CertStore>,
}

fn sni_of(ssl: &TlsRef) -> Option<String> {
    ssl.servername(NameType::HOST_NAME)
        .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
        .filter(|s| !s.is_empty())
}

#[async_trait]
impl TlsAccept for SniCallbacks {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let sni = sni_of(ssl);
        let Some(cert) = self.store.find(sni.as_deref()) else {
            // No certificate: the handshake fails with an alert, which is all we can say.
            self.store
                .no_cert_handshakes
                .fetch_add(1, Ordering::Relaxed);
            debug!(sni = ?sni, "no certificate for this name");
            return;
        };
        let set = ext::ssl_use_certificate(ssl, &cert.leaf)
            .and_then(|_| ext::ssl_use_private_key(ssl, &cert.key))
            .and_then(|_| {
                cert.chain
                    .iter()
                    .try_for_each(|c| ext::ssl_add_chain_cert(ssl, c))
            });
        if let Err(e) = set {
            warn!(sni = ?sni, cert = %cert.name, error = %e, "cannot use certificate");
        }
    }

    async fn handshake_complete_callback(
        &self,
        ssl: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let sni = sni_of(ssl);
        let cert_name = self.store.find(sni.as_deref()).map(|c| c.name.clone());
        Some(Arc::new(TlsInfo { sni, cert_name }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(cert_covers("a.example", "a.example"));
        assert!(!cert_covers("a.example", "b.example"));
        assert!(cert_covers("*.a.example", "x.a.example"));
        assert!(!cert_covers("*.a.example", "a.example"));
        assert!(!cert_covers("*.a.example", "y.x.a.example"));
    }
}
