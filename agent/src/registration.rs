//! Announcing this node in etcd: `<prefix>/nodes/<id>` under a lease kept alive while the
//! agent runs. If the lease is lost (etcd restarted, a long pause), register again; when the
//! agent dies the key vanishes with the lease and proxies stop placing sites here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use roost_proto::{Layout, NodeInfo};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::metrics::Metrics;

/// The registration's state, shared with the admin port and shutdown.
pub struct Registration {
    cfg: Arc<Config>,
    /// The unix socket the agent serves proxies on beside --listen: published so a proxy
    /// on this machine takes it instead of loopback TCP.
    pub local_socket: Option<String>,
    registered: AtomicBool,
    draining: watch::Sender<bool>,
    lease: std::sync::Mutex<Option<i64>>,
}

impl Registration {
    pub fn new(cfg: Arc<Config>) -> Arc<Self> {
        let local_socket = cfg.local_socket.as_deref().and_then(local_socket_path);
        Arc::new(Self {
            local_socket,
            cfg,
            registered: AtomicBool::new(false),
            draining: watch::channel(false).0,
            lease: std::sync::Mutex::new(None),
        })
    }

    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    fn record(&self) -> NodeInfo {
        let mut node = NodeInfo::new(&self.cfg.advertise);
        node.admin = Some(self.cfg.admin.clone());
        node.capacity = self.cfg.capacity;
        node.draining = *self.draining.borrow();
        node.version = env!("CARGO_PKG_VERSION").to_string();
        if let Some(path) = &self.local_socket {
            node.set_local_socket(path);
        }
        node
    }

    fn key(&self) -> String {
        Layout::new(&self.cfg.prefix).node_key(&self.cfg.node_id)
    }

    /// Keep the node registered until the process ends. Registration waits until the
    /// agent's port accepts connections: a node key that proxies can read before the agent
    /// listens would send them into refused connections (and mark the node suspect).
    pub async fn run(self: Arc<Self>, metrics: Arc<Metrics>) {
        self.wait_listening().await;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.register_and_keep_alive().await {
                Ok(()) => {}
                Err(e) => {
                    if self.registered.swap(false, Ordering::AcqRel) {
                        metrics.lease_losses.inc();
                    }
                    warn!(node = %self.cfg.node_id, error = %e, retry_in = ?backoff,
                        "node registration lost; registering again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(3));
                    continue;
                }
            }
            backoff = Duration::from_millis(100);
        }
    }

    async fn wait_listening(&self) {
        let Ok(mut addr) = self.cfg.listen.parse::<std::net::SocketAddr>() else {
            return;
        };
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        for _ in 0..600 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        warn!(listen = %addr, "the agent's port does not accept connections; registering anyway");
    }

    async fn register_and_keep_alive(&self) -> Result<(), etcd_client::Error> {
        let mut client: Client = self.cfg.etcd.connect().await?;
        let ttl = self.cfg.lease_ttl_secs;
        let lease = client.lease_grant(ttl, None).await?.id();
        let put = |c: &mut Client, node: NodeInfo| {
            let key = self.key();
            let mut c = c.clone();
            async move {
                c.put(
                    key,
                    node.to_json(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await
            }
        };
        put(&mut client, self.record()).await?;
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
        self.registered.store(true, Ordering::Release);
        info!(node = %self.cfg.node_id, key = %self.key(), lease, ttl, "node registered");

        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
        let mut tick = tokio::time::interval(Duration::from_secs((ttl as u64 / 3).max(1)));
        let mut draining = self.draining.subscribe();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    keeper.keep_alive().await?;
                    match tokio::time::timeout(Duration::from_secs(ttl as u64), responses.message()).await {
                        Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                        Ok(Ok(Some(_))) => return Err(etcd_client::Error::LeaseKeepAliveError("lease expired".into())),
                        Ok(Ok(None)) => return Err(etcd_client::Error::LeaseKeepAliveError("keep-alive stream ended".into())),
                        Ok(Err(e)) => return Err(e),
                        Err(_) => return Err(etcd_client::Error::LeaseKeepAliveError("no keep-alive answer".into())),
                    }
                }
                changed = draining.changed() => {
                    if changed.is_ok() {
                        put(&mut client, self.record()).await?;
                        info!(node = %self.cfg.node_id, draining = *draining.borrow(), "node record updated");
                    }
                }
            }
        }
    }

    /// Mark the node draining in etcd: proxies stop placing sites here.
    pub fn set_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Remove the node key (revoke the lease) at the end of a drain.
    pub async fn deregister(&self) {
        let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(lease) = lease {
            if let Ok(mut client) = self.cfg.etcd.connect().await {
                match client.lease_revoke(lease).await {
                    Ok(_) => info!(node = %self.cfg.node_id, "node deregistered"),
                    Err(e) => {
                        warn!(node = %self.cfg.node_id, error = %e, "could not revoke lease; the node key expires with it")
                    }
                }
            }
        }
        self.registered.store(false, Ordering::Release);
    }
}

/// The local socket's absolute path, or `None` (logged) when it cannot be offered.
fn local_socket_path(path: &std::path::Path) -> Option<String> {
    /// `sun_path` holds 108 bytes with the terminating NUL.
    const SUN_PATH_MAX: usize = 107;
    let absolute = std::path::absolute(path).ok()?;
    let text = absolute.to_str()?.to_string();
    if text.len() > SUN_PATH_MAX {
        warn!(path = %text, "the state directory's path is too long for a unix socket; proxies here reach this agent over TCP only");
        return None;
    }
    Some(text)
}
