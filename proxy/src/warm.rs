//! Starting a site's worker before its request arrives.
//!
//! A cold start costs a worker's fork and import. Over TLS the client's first request comes
//! a round trip after its ClientHello, and the ClientHello already names the site (SNI). So
//! the proxy reads the SNI as the hello arrives ([`ClientHelloPeek`], before pingora's TLS
//! accept sees the bytes) and sends the site's agent a *warm call*: a request that carries
//! the proxy's credential and the `x-roost-warm` header, which the agent answers at once and
//! which makes it start the site's worker if none runs. For plain HTTP the same happens as
//! soon as a request's head is parsed, when a body is still to come.
//!
//! Warm calls are bounded: only for a host that is a site in the routing table, at most one
//! per site per [`REPEAT_AFTER`], and per client address a small token bucket. An unknown
//! name costs a table lookup and nothing else.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::connectors::http::v1::Connector;
use pingora_core::listeners::PreTlsProcess;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::GetSocketDigest;
use pingora_http::RequestHeader;
use roost_proto::{canonical_host, headers};
use tokio::io::AsyncReadExt;
use tracing::debug;

use crate::config::Config;
use crate::http::agent_peer;
use crate::metrics::Metrics;
use crate::routes::Router;

/// A site warmed this recently is not warmed again: its worker is up or starting.
pub const REPEAT_AFTER: Duration = Duration::from_secs(2);
/// Warm calls one client address may cause per second, and in a burst.
const CLIENT_RATE: f64 = 10.0;
const CLIENT_BURST: f64 = 20.0;
/// Past this many remembered sites or clients, entries that no longer matter are dropped.
const MAX_REMEMBERED: usize = 10_000;
/// How long the proxy gives an agent to acknowledge a warm call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a warm call was or was not sent (the `outcome` label of `roost_proxy_warm_calls_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    Repeat,
    RateLimited,
    NotASite,
    NoNode,
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Sent,
        Outcome::Repeat,
        Outcome::RateLimited,
        Outcome::NotASite,
        Outcome::NoNode,
        Outcome::Failed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Repeat => "repeat",
            Outcome::RateLimited => "rate_limited",
            Outcome::NotASite => "not_a_site",
            Outcome::NoNode => "no_node",
            Outcome::Failed => "failed",
        }
    }
}

/// A token bucket per client address.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * CLIENT_RATE;
        self.tokens = (self.tokens + refill).min(CLIENT_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&self, now: Instant) -> bool {
        self.tokens + now.duration_since(self.at).as_secs_f64() * CLIENT_RATE >= CLIENT_BURST
    }
}

/// What the limits remember: when each site was last warmed, and each client's bucket.
#[derive(Default)]
struct Limits {
    warmed: HashMap<String, Instant>,
    clients: HashMap<IpAddr, Bucket>,
}

impl Limits {
    /// Whether `site` may be warmed now for `client`; if so, it counts as warmed.
    fn admit(&mut self, site: &str, client: Option<IpAddr>, now: Instant) -> Result<(), Outcome> {
        if self
            .warmed
            .get(site)
            .is_some_and(|at| now.duration_since(*at) < REPEAT_AFTER)
        {
            return Err(Outcome::Repeat);
        }
        if let Some(ip) = client {
            if self.clients.len() >= MAX_REMEMBERED {
                self.clients.retain(|_, b| !b.is_full(now));
            }
            let bucket = self.clients.entry(ip).or_insert(Bucket {
                tokens: CLIENT_BURST,
                at: now,
            });
            if !bucket.take(now) {
                return Err(Outcome::RateLimited);
            }
        }
        if self.warmed.len() >= MAX_REMEMBERED {
            self.warmed
                .retain(|_, at| now.duration_since(*at) < REPEAT_AFTER);
        }
        self.warmed.insert(site.to_string(), now);
        Ok(())
    }
}

pub struct Warmer {
    router: Arc<Router>,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    connector: Connector,
    limits: Mutex<Limits>,
}

impl Warmer {
    pub fn new(router: Arc<Router>, cfg: Arc<Config>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            router,
            cfg,
            metrics,
            connector: Connector::new(None),
            limits: Mutex::new(Limits::default()),
        })
    }

    /// Have the node of the site serving `host` start its worker, unless a limit says no.
    /// Returns at once; the call itself runs on its own task.
    pub fn warm(self: &Arc<Self>, host: &str, client: Option<IpAddr>) {
        let outcome = self.try_warm(host, client);
        if outcome != Outcome::Sent {
            self.count(outcome);
        }
    }

    fn try_warm(self: &Arc<Self>, host: &str, client: Option<IpAddr>) -> Outcome {
        let table = self.router.table();
        if !table.synced {
            return Outcome::NotASite;
        }
        let Some(route) = table.lookup(host) else {
            return Outcome::NotASite;
        };
        let Some((node, addr)) = self.router.ranked(&table, route).first().cloned() else {
            return Outcome::NoNode;
        };
        let admitted = self.limits.lock().unwrap_or_else(|e| e.into_inner()).admit(
            &route.host,
            client,
            Instant::now(),
        );
        if let Err(outcome) = admitted {
            return outcome;
        }
        let (site, revision) = (route.host.clone(), table.revision);
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = match this.call(&node, &addr, &site, revision).await {
                Ok(()) => Outcome::Sent,
                Err(e) => {
                    debug!(site = %site, node = %node, error = %e, "warm call failed");
                    Outcome::Failed
                }
            };
            this.count(outcome);
        });
        Outcome::Sent
    }

    fn count(&self, outcome: Outcome) {
        self.metrics
            .warm_calls
            .with_label_values(&[outcome.label()])
            .inc();
    }

    /// One warm call to the agent of `node` at `addr`, over the same kind of connection as
    /// requests (TLS checked against the node id when the proxy has `--agent-ca`).
    async fn call(
        &self,
        node: &str,
        addr: &str,
        site: &str,
        revision: i64,
    ) -> pingora_core::Result<()> {
        let peer = agent_peer(&self.cfg, node, addr, CALL_TIMEOUT)?;
        let (mut session, _) = self.connector.get_http_session(&peer).await?;
        let mut req = RequestHeader::build("POST", b"/", None)?;
        req.insert_header(http::header::HOST, site)?;
        req.insert_header(http::header::CONTENT_LENGTH, "0")?;
        req.insert_header(headers::SITE, site)?;
        req.insert_header(headers::REVISION, revision.to_string())?;
        req.insert_header(headers::WARM, "1")?;
        if let Some(secret) = &self.cfg.secret {
            req.insert_header(headers::AUTH, secret.as_slice())?;
        }
        session.write_request_header(Box::new(req)).await?;
        session.finish_body().await?;
        session.read_response().await?;
        while session.read_body_bytes().await?.is_some() {}
        self.connector
            .release_http_session(session, &peer, peer.options.idle_timeout)
            .await;
        Ok(())
    }
}

/// Reads the ClientHello as it arrives, before the TLS accept, to warm the site its SNI
/// names. Whatever it read is put back for the accept; anything it does not understand is
/// left alone, and it never fails a connection.
pub struct ClientHelloPeek {
    pub warmer: Arc<Warmer>,
}

/// The most of a ClientHello read ahead: one TLS record.
const MAX_RECORD: usize = 5 + 16 * 1024;
/// How long the peek waits for a hello before leaving the connection to the TLS accept.
const HELLO_WAIT: Duration = Duration::from_secs(5);

#[async_trait]
impl PreTlsProcess for ClientHelloPeek {
    async fn process(&self, stream: &mut L4Stream) -> pingora_core::Result<()> {
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let mut buf = Vec::with_capacity(2048);
        let read = tokio::time::timeout(HELLO_WAIT, read_hello_record(stream, &mut buf)).await;
        let sni = match read {
            Ok(Ok(())) => sni_of_client_hello(&buf),
            _ => None,
        };
        stream.rewind(&buf);
        if let Some(name) = sni.and_then(|n| canonical_host(&n).ok()) {
            self.warmer.warm(&name, client.map(|ip| ip.to_canonical()));
        }
        Ok(())
    }
}

/// Appends to `buf` the first TLS record of the stream (header and body). Stops early, with
/// what it has, when the bytes are not a handshake record.
async fn read_hello_record(stream: &mut L4Stream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let want = |buf: &Vec<u8>| -> usize {
        if buf.len() < 5 {
            return 5;
        }
        if buf[0] != 0x16 {
            return buf.len();
        }
        (5 + u16::from_be_bytes([buf[3], buf[4]]) as usize).min(MAX_RECORD)
    };
    let mut chunk = [0u8; 4096];
    while buf.len() < want(buf) {
        let room = (want(buf) - buf.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// The server name a TLS ClientHello record asks for, if it is whole and names one.
pub fn sni_of_client_hello(record: &[u8]) -> Option<String> {
    use tls_parser::{
        parse_tls_extensions, parse_tls_plaintext, SNIType, TlsExtension, TlsMessage,
        TlsMessageHandshake,
    };
    let (_, plaintext) = parse_tls_plaintext(record).ok()?;
    let hello = plaintext.msg.iter().find_map(|m| match m {
        TlsMessage::Handshake(TlsMessageHandshake::ClientHello(h)) => Some(h),
        _ => None,
    })?;
    let (_, extensions) = parse_tls_extensions(hello.ext?).ok()?;
    extensions.iter().find_map(|e| match e {
        TlsExtension::SNI(names) => names.iter().find_map(|(kind, name)| {
            (*kind == SNIType::HostName)
                .then(|| std::str::from_utf8(name).ok().map(str::to_string))
                .flatten()
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_is_warmed_once_per_repeat_window() {
        let mut limits = Limits::default();
        let t0 = Instant::now();
        assert_eq!(limits.admit("a.example", None, t0), Ok(()));
        assert_eq!(
            limits.admit("a.example", None, t0 + Duration::from_millis(500)),
            Err(Outcome::Repeat)
        );
        assert_eq!(limits.admit("b.example", None, t0), Ok(()));
        assert_eq!(limits.admit("a.example", None, t0 + REPEAT_AFTER), Ok(()));
    }

    #[test]
    fn a_client_gets_a_burst_then_its_rate() {
        let mut limits = Limits::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..CLIENT_BURST as usize {
            assert_eq!(limits.admit(&format!("s{i}.example"), Some(ip), t0), Ok(()));
        }
        assert_eq!(
            limits.admit("late.example", Some(ip), t0),
            Err(Outcome::RateLimited)
        );
        assert_eq!(limits.admit("late.example", Some(other), t0), Ok(()));
        let later = t0 + Duration::from_secs_f64(1.0 / CLIENT_RATE);
        assert_eq!(limits.admit("later.example", Some(ip), later), Ok(()));
    }

    #[test]
    fn remembered_entries_stay_bounded() {
        let mut limits = Limits::default();
        let t0 = Instant::now();
        for i in 0..MAX_REMEMBERED + 10 {
            let ip = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            let at = t0 + REPEAT_AFTER * (i / MAX_REMEMBERED) as u32 * 2;
            let _ = limits.admit(&format!("s{i}.example"), Some(ip), at);
        }
        assert!(limits.warmed.len() <= MAX_REMEMBERED);
        assert!(limits.clients.len() <= MAX_REMEMBERED + 1);
    }

    /// A ClientHello as `openssl s_client -servername warm.example` sends it (TLS 1.3).
    fn hello_for(name: &str) -> Vec<u8> {
        let mut sni = Vec::new();
        let name = name.as_bytes();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut ext = Vec::new();
        ext.extend_from_slice(&0u16.to_be_bytes());
        ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sni);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
        body.extend_from_slice(&[0x01, 0x00]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![0x01];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        record.extend_from_slice(&hs);
        record
    }

    #[test]
    fn the_sni_is_read_from_a_client_hello() {
        assert_eq!(
            sni_of_client_hello(&hello_for("warm.example")).as_deref(),
            Some("warm.example")
        );
        let whole = hello_for("warm.example");
        assert_eq!(sni_of_client_hello(&whole[..whole.len() - 3]), None);
        assert_eq!(sni_of_client_hello(b"GET / HTTP/1.1\r\n\r\n"), None);
    }
}
