//! Byte-level plumbing shared by both directions: replaying sniffed bytes, and copying a
//! TCP stream both ways until either side closes or the connection is revoked.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

pin_project! {
    /// A stream whose first bytes were already read (while sniffing the protocol) and are
    /// handed out again before the rest.
    #[derive(Debug)]
    pub struct Prefixed<T> {
        prefix: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Prefixed { prefix, inner }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead> AsyncRead for Prefixed<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Prefixed<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Bytes moved by a finished tunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the connecting side to the other.
    pub sent: u64,
    /// Back.
    pub received: u64,
    /// True when the tunnel was cut by a policy revocation or shutdown.
    pub cancelled: bool,
}

/// Copies both ways until both directions finish, an error occurs, or `cancel` fires.
/// Buffers are 16 KiB per direction: large enough for bulk transfers, small enough that
/// 10,000 idle tunnels cost little (tokio allocates them lazily).
pub async fn tunnel<A, B>(a: &mut A, b: &mut B, cancel: &CancellationToken) -> io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    // Counted here too so a revoked tunnel still reports what it carried (for its span).
    let (mut a, mut b) = (Counting::new(a), Counting::new(b));
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 16 * 1024, 16 * 1024) => {
            let (sent, received) = r?;
            Ok(Transferred { sent, received, cancelled: false })
        }
        () = cancel.cancelled() => {
            let _ = a.shutdown().await;
            let _ = b.shutdown().await;
            Ok(Transferred { sent: a.read, received: b.read, cancelled: true })
        }
    }
}

pin_project! {
    /// Counts the bytes read from a stream.
    struct Counting<T> {
        #[pin]
        inner: T,
        read: u64,
    }
}

impl<T> Counting<T> {
    fn new(inner: T) -> Self {
        Counting { inner, read: 0 }
    }
}

impl<T: AsyncRead> AsyncRead for Counting<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        *this.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for Counting<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
