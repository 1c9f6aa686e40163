//! Connections opened to a worker that a warm call started, before its first request.
//!
//! A warm call (`http.rs`) starts a site's worker a round trip before the site's first
//! request. Without more, that request still connects to the new worker's socket, and the
//! worker is woken once to accept it and again for the request. So the warm call also opens
//! one connection to the new worker and keeps it here; the worker accepts it while it waits,
//! and the first request that needs a new connection to that worker takes it
//! ([`Preconnected`], pingora's custom connector for one peer) instead of connecting.
//! Measured through the test suite's debug build: the agent's connect step of a first hit
//! went from about 0.5 ms to the 0.25 ms of a pooled connection.
//!
//! Bounded: one connection per worker socket, closed after [`KEEP_FOR`] if no request took
//! it (a request comes a round trip after its warm call, or not at all), and at most
//! [`MAX_KEPT`] in all. A connection is kept for one worker generation, so it is never
//! handed to a later worker; one that worker has closed (it stopped, or crashed) is not
//! used, and the request connects as usual.

use std::collections::HashMap;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::connectors::L4Connect;
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::l4::stream::Stream;
use pingora_core::{Error, ErrorType, OrErr, Result};
use prometheus::IntCounterVec;

/// How long a connection waits for its request.
pub const KEEP_FOR: Duration = Duration::from_secs(2);
/// Connections kept at once, node-wide: a burst of warm calls beyond this opens no more.
pub const MAX_KEPT: usize = 1024;
/// How long the fallback connect (when the kept connection turned out closed) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What became of a connection opened ahead (the `outcome` label of
/// `roost_agent_preconnects_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A request took it.
    Used,
    /// No request came for it within [`KEEP_FOR`], or its worker was replaced.
    Expired,
    /// The worker had closed it by the time a request came: that request connected anew.
    Closed,
    /// Not opened: the connect failed, or [`MAX_KEPT`] were already kept.
    NotOpened,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Used,
        Outcome::Expired,
        Outcome::Closed,
        Outcome::NotOpened,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Used => "used",
            Outcome::Expired => "expired",
            Outcome::Closed => "closed",
            Outcome::NotOpened => "not_opened",
        }
    }
}

struct Kept {
    generation: u64,
    stream: StdUnixStream,
    opened: Instant,
}

/// The connections opened ahead, one per worker socket.
pub struct Preconnects {
    kept: Mutex<HashMap<PathBuf, Kept>>,
    outcomes: IntCounterVec,
}

impl Preconnects {
    pub fn new(outcomes: IntCounterVec) -> Preconnects {
        Preconnects {
            kept: Mutex::new(HashMap::new()),
            outcomes,
        }
    }

    fn count(&self, outcome: Outcome) {
        self.outcomes.with_label_values(&[outcome.label()]).inc();
    }

    /// Open a connection to the worker of `generation` listening on `socket`, and keep it
    /// for that worker's first request. The worker may still be starting: the connection
    /// then waits in its backlog.
    pub async fn open(self: &Arc<Self>, socket: &Path, generation: u64) {
        if !self.has_room(socket) {
            self.count(Outcome::NotOpened);
            return;
        }
        let connected = tokio::net::UnixStream::connect(socket)
            .await
            .and_then(|s| s.into_std());
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(socket = %socket.display(), error = %e, "could not connect ahead of a request");
                self.count(Outcome::NotOpened);
                return;
            }
        };
        let opened = Instant::now();
        let replaced = {
            let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            kept.insert(
                socket.to_path_buf(),
                Kept {
                    generation,
                    stream,
                    opened,
                },
            )
        };
        if replaced.is_some() {
            self.count(Outcome::Expired);
        }
        // Not left to the next request: an unused connection would keep the worker's end
        // open (and its fd here) until the worker's keep-alive timeout.
        let (this, socket) = (self.clone(), socket.to_path_buf());
        tokio::spawn(async move {
            tokio::time::sleep(KEEP_FOR).await;
            this.expire(&socket, opened);
        });
    }

    /// Drop the connection kept for `socket` since `opened`, if no request took it.
    fn expire(&self, socket: &Path, opened: Instant) {
        let expired = {
            let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            match kept.get(socket) {
                Some(k) if k.opened == opened => kept.remove(socket),
                _ => None,
            }
        };
        if expired.is_some() {
            self.count(Outcome::Expired);
        }
    }

    /// Whether one more connection may be kept for `socket` (each leaves within
    /// [`KEEP_FOR`]).
    fn has_room(&self, socket: &Path) -> bool {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.len() < MAX_KEPT || kept.contains_key(socket)
    }

    /// The connection kept for the worker of `generation` on `socket`, if one is and it is
    /// still fresh: a connector that hands it to the request's first connect.
    pub fn take(self: &Arc<Self>, socket: &Path, generation: u64) -> Option<Arc<Preconnected>> {
        let found = {
            let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            if kept.is_empty() {
                return None;
            }
            kept.remove(socket)
        }?;
        if found.generation != generation || found.opened.elapsed() >= KEEP_FOR {
            self.count(Outcome::Expired);
            return None;
        }
        Some(Arc::new(Preconnected {
            stream: Mutex::new(Some(found.stream)),
            socket: socket.to_path_buf(),
            preconnects: self.clone(),
        }))
    }
}

/// pingora's connector for one request's peer: the connection opened ahead, or (when the
/// worker has closed it meanwhile) a new one.
pub struct Preconnected {
    stream: Mutex<Option<StdUnixStream>>,
    socket: PathBuf,
    preconnects: Arc<Preconnects>,
}

impl std::fmt::Debug for Preconnected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preconnected")
            .field("socket", &self.socket)
            .finish()
    }
}

impl Drop for Preconnected {
    fn drop(&mut self) {
        // pingora reused a pooled connection instead: this one was not needed.
        let unused = self.stream.get_mut().map(|s| s.is_some()).unwrap_or(false);
        if unused {
            self.preconnects.count(Outcome::Expired);
        }
    }
}

#[async_trait]
impl L4Connect for Preconnected {
    async fn connect(&self, _addr: &SocketAddr) -> Result<Stream> {
        let kept = self.stream.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(stream) = kept {
            if still_open(&stream) {
                self.preconnects.count(Outcome::Used);
                let stream = tokio::net::UnixStream::from_std(stream).or_err(
                    ErrorType::ConnectError,
                    "adopting a connection opened ahead",
                )?;
                return Ok(stream.into());
            }
            self.preconnects.count(Outcome::Closed);
        }
        connect_to(&self.socket).await
    }
}

/// pingora's connector for a worker socket whose address is not the path it is reached at
/// now (bound ahead under a placeholder, then its directory renamed: `launch/ready.rs`).
/// The peer carries the address, which pingora checks a pooled connection's against; this
/// connects to the path.
#[derive(Debug)]
pub struct ConnectAt {
    pub socket: Arc<Path>,
}

#[async_trait]
impl L4Connect for ConnectAt {
    async fn connect(&self, _addr: &SocketAddr) -> Result<Stream> {
        connect_to(&self.socket).await
    }
}

async fn connect_to(socket: &Path) -> Result<Stream> {
    let connect = tokio::net::UnixStream::connect(socket);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(stream)) => Ok(stream.into()),
        Ok(Err(e)) => Err(Error::because(
            ErrorType::ConnectError,
            format!("connecting to {}", socket.display()),
            e,
        )),
        Err(_) => Error::e_explain(
            ErrorType::ConnectTimedout,
            format!("connecting to {}", socket.display()),
        ),
    }
}

/// Whether the worker has neither closed nor reset `stream` (it sends nothing unasked).
fn still_open(stream: &StdUnixStream) -> bool {
    let mut byte = [0u8; 1];
    match nix::sys::socket::recv(
        std::os::fd::AsRawFd::as_raw_fd(stream),
        &mut byte,
        nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    ) {
        Err(nix::errno::Errno::EAGAIN) => true,
        Ok(_) | Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes() -> IntCounterVec {
        IntCounterVec::new(prometheus::Opts::new("t", "t"), &["outcome"]).unwrap()
    }

    fn count(p: &Preconnects, o: Outcome) -> u64 {
        p.outcomes.with_label_values(&[o.label()]).get()
    }

    /// Accept (and keep) whatever waits in `listener`'s backlog.
    fn accept_all(listener: &std::os::unix::net::UnixListener) -> Vec<StdUnixStream> {
        std::iter::from_fn(|| listener.accept().ok().map(|(s, _)| s)).collect()
    }

    /// A worker's listening socket (non-blocking) in a fresh directory named `name`.
    fn worker_socket(name: &str) -> (PathBuf, PathBuf, std::os::unix::net::UnixListener) {
        let dir = std::env::temp_dir().join(format!("roost-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        (dir, path, listener)
    }

    #[tokio::test]
    async fn a_kept_connection_goes_only_to_its_own_worker_and_only_while_open() {
        let (dir, path, listener) = worker_socket("preconnect");
        let addr = SocketAddr::Unix(std::os::unix::net::SocketAddr::from_pathname(&path).unwrap());
        let p = Arc::new(Preconnects::new(outcomes()));

        // Kept for one worker generation: a later worker never gets it.
        p.open(&path, 7).await;
        assert!(p.take(&path, 8).is_none(), "handed to a later worker");
        assert_eq!(count(&p, Outcome::Expired), 1);
        drop(accept_all(&listener));

        // Taken once, by the first connect, while the worker holds it open.
        p.open(&path, 7).await;
        let held = accept_all(&listener);
        assert_eq!(held.len(), 1);
        let c = p.take(&path, 7).expect("kept for generation 7");
        assert!(p.take(&path, 7).is_none(), "one request takes it");
        c.connect(&addr).await.expect("the kept connection");
        assert_eq!(count(&p, Outcome::Used), 1);
        assert!(
            accept_all(&listener).is_empty(),
            "the kept connection was used: no new one"
        );

        // One the worker has closed is not used: the request connects anew.
        p.open(&path, 9).await;
        drop(accept_all(&listener));
        let c = p.take(&path, 9).expect("kept for generation 9");
        c.connect(&addr).await.expect("a new connection");
        assert_eq!(count(&p, Outcome::Closed), 1);
        assert_eq!(count(&p, Outcome::Used), 1);
        assert_eq!(
            accept_all(&listener).len(),
            1,
            "the request's own connection"
        );

        // Not needed (pingora had a pooled one): counted, and closed.
        p.open(&path, 10).await;
        drop(p.take(&path, 10));
        assert_eq!(count(&p, Outcome::Expired), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_no_request_took_is_closed_after_keep_for() {
        let (dir, path, listener) = worker_socket("preconnect-expiry");
        let p = Arc::new(Preconnects::new(outcomes()));
        p.open(&path, 1).await;
        let held = accept_all(&listener);
        assert_eq!(held.len(), 1);
        tokio::time::sleep(KEEP_FOR + Duration::from_millis(10)).await;
        assert_eq!(count(&p, Outcome::Expired), 1);
        assert!(p.take(&path, 1).is_none());
        // The worker's end sees the close.
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &held[0], &mut buf).unwrap(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
