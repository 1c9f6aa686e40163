//! A tap on every client connection that keeps the bytes of the request being read, so the
//! edge can check what pingora 0.9 reads and then throws away: the chunk framing and the
//! trailer section of a chunked body (`roost_proto::request_rules`). pingora gives no access
//! to trailers, and its `IO` trait is how a connection reaches it, so the tap is an `IO`
//! around the real one.
//!
//! For a chunked request the proxy has the tap read ahead ([`TapStream::read_ahead`]) up to
//! [`READ_AHEAD_LIMIT`] bytes before any node is chosen: a small body is then checked whole
//! and refused before anything reaches an agent, and pingora reads the same bytes from the
//! tap afterwards. A larger body streams, and a bad chunk in it makes pingora abort the
//! upstream request.
//!
//! It records only the head of each request and a chunked body's first bytes; otherwise it
//! is paused ([`Recording::pause`]) so uploads are not copied. When it has lost its place
//! (bytes read while paused, a head that pingora rewrote) the check is skipped, not
//! guessed: pingora drops trailers in any case, so none reaches a worker either way.

use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::SslDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::Session;
use roost_proto::request_rules::{scan_chunked, Chunked};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much of a chunked body the tap reads ahead to check it whole.
pub const READ_AHEAD_LIMIT: usize = 64 * 1024;

/// Most bytes a recording holds: a head (pingora allows up to 1 MiB) and a buffered chunked
/// body with its framing. Past it the recording gives up until the next request.
const CAPACITY: usize = 2 << 20;

/// The bytes of the request being read on one connection.
#[derive(Debug, Default)]
pub struct Recording {
    bytes: Vec<u8>,
    paused: bool,
    lost: bool,
    /// Read ahead from the connection, not yet handed to pingora.
    pending: Vec<u8>,
}

/// What reading ahead found in a chunked body.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadAhead {
    /// The whole body is here; these are its trailers.
    Whole(Trailers),
    /// The body's framing is bad (why).
    Malformed(&'static str),
    /// The client closed the connection before the body ended.
    Cut,
    /// More than [`READ_AHEAD_LIMIT`], or the tap lost its place: the body streams.
    Streams,
}

/// The trailer section of a chunked body, as the tap saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Trailers {
    /// The field names, in the order sent.
    Seen(Vec<Vec<u8>>),
    /// The chunked framing the tap saw is not valid (pingora accepted it: refuse it anyway).
    Malformed(&'static str),
    /// The tap lost its place in this connection's bytes; nothing can be said.
    Unknown,
}

impl Recording {
    fn record(&mut self, read: &[u8]) {
        if self.paused || self.lost {
            return;
        }
        if self.bytes.len() + read.len() > CAPACITY {
            self.lost = true;
            self.bytes = Vec::new();
            return;
        }
        self.bytes.extend_from_slice(read);
    }

    /// A new request's head was parsed: keep only what follows it. False when the head is
    /// not among the recorded bytes: then nothing can be said about this request's body
    /// (its bytes would be read from the wrong place), and recording starts afresh at the
    /// next request ([`Self::resume`]).
    pub fn start_request(&mut self, raw_head: &[u8]) -> bool {
        self.paused = false;
        let at = if self.lost || raw_head.is_empty() {
            None
        } else {
            find(&self.bytes, raw_head)
        };
        match at {
            Some(at) => {
                self.bytes.drain(..at + raw_head.len());
            }
            None => self.bytes = Vec::new(),
        }
        self.lost = at.is_none();
        !self.lost
    }

    /// Stop recording until [`Self::resume`]: the request's body is not checked here.
    pub fn pause(&mut self) {
        self.paused = true;
        self.bytes = Vec::new();
    }

    /// Record again (the request is over; the next head follows).
    pub fn resume(&mut self) {
        self.paused = false;
        if self.lost {
            self.bytes = Vec::new();
            self.lost = false;
        }
    }

    /// After a whole chunked body was read: its trailer names, and the recording moves past
    /// the body to whatever the client sent next.
    pub fn take_trailers(&mut self) -> Trailers {
        if self.lost || self.paused {
            return Trailers::Unknown;
        }
        match scan_chunked(&self.bytes) {
            Chunked::Complete { end, trailers, .. } => {
                let names = trailers.into_iter().map(<[u8]>::to_vec).collect();
                self.bytes.drain(..end);
                Trailers::Seen(names)
            }
            Chunked::Malformed(why) => Trailers::Malformed(why),
            // pingora said the body ended, the tap disagrees: it lost its place.
            Chunked::Incomplete => Trailers::Unknown,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The recording of the connection a request came on (`None` for HTTP/2, which has no
/// chunked framing, and for connections that did not come through [`Tapped`]).
pub fn recording(session: &Session) -> Option<Arc<Mutex<Recording>>> {
    let stream = session.downstream_session.stream()?;
    (**stream)
        .as_any()
        .downcast_ref::<TapStream>()
        .map(|t| t.recording.clone())
}

/// The tap of the connection a request came on (`None` for HTTP/2, which has no chunked
/// framing, and for connections that did not come through [`Tapped`]).
pub fn tap_of(session: &Session) -> Option<&TapStream> {
    let stream = session.downstream_session.stream()?;
    (**stream).as_any().downcast_ref::<TapStream>()
}

/// A client connection with a [`Recording`] of what is read from it.
pub struct TapStream {
    /// Locked only by [`TapStream::read_ahead`]; pingora's reads own it (`get_mut`).
    inner: Mutex<Stream>,
    recording: Arc<Mutex<Recording>>,
}

impl TapStream {
    pub fn new(inner: Stream) -> TapStream {
        TapStream {
            inner: Mutex::new(inner),
            recording: Arc::default(),
        }
    }

    fn inner_mut(&mut self) -> &mut Stream {
        self.inner.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    fn inner_ref(&self) -> std::sync::MutexGuard<'_, Stream> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_recording(&self) -> std::sync::MutexGuard<'_, Recording> {
        self.recording.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Read a chunked body's bytes ahead of pingora (which reads them from the tap later)
    /// until the body ends, its framing turns out bad, or [`READ_AHEAD_LIMIT`] is passed.
    /// Call right after [`Recording::start_request`]; the caller bounds it with a timeout.
    pub async fn read_ahead(&self) -> std::io::Result<ReadAhead> {
        let mut piece = vec![0u8; 16 * 1024];
        loop {
            {
                let mut rec = self.lock_recording();
                if rec.lost || rec.paused {
                    return Ok(ReadAhead::Streams);
                }
                match scan_chunked(&rec.bytes) {
                    Chunked::Complete { .. } => return Ok(ReadAhead::Whole(rec.take_trailers())),
                    Chunked::Malformed(why) => return Ok(ReadAhead::Malformed(why)),
                    Chunked::Incomplete if rec.bytes.len() > READ_AHEAD_LIMIT => {
                        rec.pause();
                        return Ok(ReadAhead::Streams);
                    }
                    Chunked::Incomplete => {}
                }
            }
            let n = poll_fn(|cx| {
                let mut inner = self.inner_ref();
                let mut buf = ReadBuf::new(&mut piece);
                match Pin::new(&mut *inner).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().len())),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await?;
            if n == 0 {
                return Ok(ReadAhead::Cut);
            }
            let mut rec = self.lock_recording();
            rec.pending.extend_from_slice(&piece[..n]);
            rec.record(&piece[..n]);
        }
    }
}

impl fmt::Debug for TapStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TapStream")
            .field("inner", &*self.inner_ref())
            .finish()
    }
}

impl AsyncRead for TapStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        {
            // Bytes read ahead go first, and were recorded when they were read.
            let mut rec = self.lock_recording();
            if !rec.pending.is_empty() {
                let n = rec.pending.len().min(buf.remaining());
                buf.put_slice(&rec.pending[..n]);
                rec.pending.drain(..n);
                return Poll::Ready(Ok(()));
            }
        }
        let before = buf.filled().len();
        let polled = Pin::new(self.inner_mut()).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                self.lock_recording().record(read);
            }
        }
        polled
    }
}

impl AsyncWrite for TapStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.inner_mut()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.inner_mut()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.inner_mut()).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.inner_mut()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner_ref().is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for TapStream {
    async fn shutdown(&mut self) {
        self.inner_mut().shutdown().await
    }
}

impl UniqueID for TapStream {
    fn id(&self) -> UniqueIDType {
        self.inner_ref().id()
    }
}

// `get_ssl` is left at its default (None): it lends a reference into the stream, which sits
// behind a lock here; pingora only calls it on the TLS stream itself, during the handshake.
impl Ssl for TapStream {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner_ref().get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner_ref().selected_alpn_proto()
    }
}

impl GetTimingDigest for TapStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner_ref().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner_ref().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner_ref().get_write_pending_time()
    }
}

impl GetProxyDigest for TapStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner_ref().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner_mut().set_proxy_digest(digest)
    }
}

impl GetSocketDigest for TapStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner_ref().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner_mut().set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for TapStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner_mut().try_peek(buf).await
    }
}

/// A server app whose connections all go through a [`TapStream`].
pub struct Tapped<A>(pub Arc<A>);

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Tapped<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A kept-alive connection comes back already tapped.
        let stream: Stream = if (*stream).as_any().is::<TapStream>() {
            stream
        } else {
            Box::new(TapStream::new(stream))
        };
        self.0.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.0.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_are_found_after_the_head_and_the_rest_is_kept() {
        let mut rec = Recording::default();
        let head = b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        rec.record(b"leftover");
        rec.record(head);
        rec.record(b"5\r\nhello\r\n0\r\nHost: evil\r\n\r\nGET / HTTP/1.1\r\n");
        assert!(rec.start_request(head));
        assert_eq!(rec.take_trailers(), Trailers::Seen(vec![b"Host".to_vec()]));
        assert!(rec.start_request(b"GET / HTTP/1.1\r\n"));
    }

    #[test]
    fn a_paused_or_lost_recording_says_nothing() {
        let mut rec = Recording::default();
        rec.pause();
        rec.record(b"5\r\nhello\r\n0\r\nHost: evil\r\n\r\n");
        assert_eq!(rec.take_trailers(), Trailers::Unknown);
        rec.resume();
        // A head the tap never saw: its body cannot be placed.
        assert!(!rec.start_request(b"GET / HTTP/1.1\r\n\r\n"));
        rec.record(b"0\r\n\r\n");
        assert_eq!(rec.take_trailers(), Trailers::Unknown);
        // The next request starts afresh; past the capacity the place is lost again.
        rec.resume();
        rec.record(b"POST / HTTP/1.1\r\n\r\n");
        assert!(rec.start_request(b"POST / HTTP/1.1\r\n\r\n"));
        rec.record(&vec![b'x'; CAPACITY + 1]);
        assert_eq!(rec.take_trailers(), Trailers::Unknown);
    }
}
