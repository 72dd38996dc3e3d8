//! The connection gate's client stream: pingora's plain TCP stream with a
//! write buffer that holds memory only between a write and its flush.
//!
//! pingora buffers each connection's writes (a response's header and body
//! go out in one system call) in a buffer allocated at accept and kept for
//! the connection's life: 1,460 bytes of every idle keep-alive connection,
//! a third of what one cost (BENCHMARKS.md, RSS). The main listener gets
//! no such buffer from pingora; this wrapper buffers instead, with the same
//! rule as tokio's `BufWriter` (written out when full or flushed), and lets
//! the memory go once a flush has written it all. Hand-written because no
//! crate's writer frees its buffer between flushes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Writes up to this many bytes are gathered before they go out (pingora's
/// own buffer size: one TCP segment on most links).
pub const WRITE_BUF: usize = 1460;

/// A plain client connection whose write buffer exists only while it
/// holds bytes not yet written.
#[derive(Debug)]
pub struct GateStream {
    inner: Box<L4Stream>,
    /// Bytes written by the session and not yet sent; no capacity while
    /// empty after a flush.
    pending: Vec<u8>,
    /// How much of `pending` has gone out already.
    sent: usize,
}

impl GateStream {
    /// Wraps `inner`, whose own write buffer should be empty (the main
    /// listener's is; another's simply sits below this one).
    pub fn new(inner: Box<L4Stream>) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            sent: 0,
        }
    }

    /// The stream underneath, to put bytes back into (its rewind).
    pub fn inner_mut(&mut self) -> &mut L4Stream {
        &mut self.inner
    }

    /// Writes out what `pending` holds; on success it is empty again and
    /// its memory let go.
    fn poll_write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut *self.inner).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for GateStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GateStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            // Nothing to gather: no buffer for it.
            return Poll::Ready(Ok(0));
        }
        if this.pending.len() + buf.len() > WRITE_BUF {
            ready!(this.poll_write_pending(cx))?;
        }
        if buf.len() >= WRITE_BUF {
            // Nothing to gather it with: straight out.
            return Pin::new(&mut *this.inner).poll_write(cx, buf);
        }
        if this.pending.capacity() == 0 {
            this.pending.reserve_exact(WRITE_BUF);
        }
        this.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_pending(cx))?;
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_pending(cx))?;
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for GateStream {
    async fn shutdown(&mut self) {
        // As pingora's own stream: write out, then FIN; a failure is the
        // end of the connection anyway.
        if let Err(e) = AsyncWriteExt::shutdown(self).await {
            tracing::debug!(error = %e, "could not shut the connection down");
        }
    }
}

impl UniqueID for GateStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GateStream {}

#[async_trait]
impl Peek for GateStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl GetTimingDigest for GateStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GateStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for GateStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[cfg(test)]
mod tests {
    use super::{GateStream, WRITE_BUF};
    use pingora_core::protocols::l4::stream::Stream as L4Stream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A gate stream over one end of a loopback connection, and the other end.
    async fn pair() -> (GateStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.expect("accept");
        let gate = GateStream::new(Box::new(L4Stream::from(server)));
        (gate, client.expect("connect"))
    }

    /// Small writes are gathered until a flush, which sends them in order
    /// and lets the buffer's memory go; a write of a whole buffer or more
    /// goes straight out after what was gathered.
    #[tokio::test]
    async fn writes_are_gathered_until_a_flush_and_the_buffer_is_let_go() {
        let (mut gate, mut peer) = pair().await;
        assert_eq!(gate.pending.capacity(), 0, "no buffer before a write");
        assert_eq!(gate.write(b"").await.expect("empty write"), 0);
        assert_eq!(gate.pending.capacity(), 0, "no buffer for an empty write");
        gate.write_all(b"HTTP/1.1 200 OK\r\n").await.expect("write");
        gate.write_all(b"\r\n").await.expect("write");
        let mut probe = [0u8; 64];
        assert!(
            peer.try_read(&mut probe).is_err(),
            "nothing leaves before the flush"
        );
        gate.flush().await.expect("flush");
        assert_eq!(gate.pending.capacity(), 0, "the buffer is let go");
        let mut got = vec![0u8; 19];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(got, b"HTTP/1.1 200 OK\r\n\r\n");

        let big = vec![b'x'; WRITE_BUF * 3];
        gate.write_all(b"head").await.expect("write");
        gate.write_all(&big).await.expect("write");
        gate.flush().await.expect("flush");
        let mut got = vec![0u8; 4 + big.len()];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got[..4], b"head");
        assert!(got[4..].iter().all(|&b| b == b'x'));
        assert_eq!(gate.pending.capacity(), 0);
    }

    /// A shutdown writes out what was gathered, then ends the stream.
    #[tokio::test]
    async fn a_shutdown_writes_out_first() {
        let (mut gate, mut peer) = pair().await;
        gate.write_all(b"bye").await.expect("write");
        gate.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read to the end");
        assert_eq!(got, b"bye");
    }
}
