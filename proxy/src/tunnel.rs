//! Copying a connection both ways (opaque TCP, upgraded HTTP) with no per-connection buffer
//! while it is idle.
//!
//! `tokio::io::copy_bidirectional` gives every tunnel two buffers for its whole life: 32 KiB
//! for each of 10,000 idle connections is 320 MiB. Here every read goes into one 64 KiB
//! scratch buffer per thread and is written straight through; only what the writer cannot
//! take at once is kept, in a buffer of the connection's own, and that buffer is freed as
//! soon as the connection goes quiet. Bulk transfers get large reads and writes (fewer
//! syscalls and full 16 KiB TLS records); idle connections hold nothing.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

/// Bytes moved by a finished tunnel, and how it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the connecting side to the other.
    pub sent: u64,
    /// Back.
    pub received: u64,
    /// True when the tunnel was cut by a policy revocation or shutdown.
    pub cancelled: bool,
    /// Why it ended early, when a read or write failed (a reset, a peer that closed while
    /// bytes were still going to it). The counts stand either way.
    pub error: Option<io::ErrorKind>,
}

/// One direction of a tunnel.
#[derive(Default)]
struct Direction {
    /// Read but not yet written.
    pending: Vec<u8>,
    written: usize,
    read: u64,
    eof: bool,
    shut_down: bool,
    need_flush: bool,
}

impl Direction {
    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            while self.written < self.pending.len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.pending[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.need_flush = true;
            }
            self.pending.clear();
            self.written = 0;
            if self.eof {
                if self.need_flush {
                    ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    self.need_flush = false;
                }
                if !self.shut_down {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(()));
            }
            match self.read_through(cx, r, w) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Quiet: hand over what the writer buffered, and keep no memory.
                    if self.need_flush && Pin::new(&mut *w).poll_flush(cx)?.is_ready() {
                        self.need_flush = false;
                    }
                    if self.pending.capacity() > 0 {
                        self.pending = Vec::new();
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Reads into the thread's scratch buffer and writes as much as the writer takes at
    /// once; keeps the rest in `pending`.
    fn read_through<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut *r).poll_read(cx, &mut buf))?;
            let data = buf.filled();
            if data.is_empty() {
                self.eof = true;
                return Poll::Ready(Ok(()));
            }
            self.read += data.len() as u64;
            let taken = match Pin::new(&mut *w).poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => 0,
            };
            self.need_flush |= taken > 0;
            if taken < data.len() {
                self.pending.extend_from_slice(&data[taken..]);
            }
            Poll::Ready(Ok(()))
        })
    }
}

/// Copies both ways until both directions reach EOF (each side's write half is shut down
/// when its reader ends), an error occurs, or `cancel` fires; what was carried until then
/// is counted in every case.
pub async fn tunnel<A, B>(a: &mut A, b: &mut B, cancel: &CancellationToken) -> Transferred
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut ab, mut ba) = (Direction::default(), Direction::default());
    let copy = poll_fn(|cx| {
        let forward = ab.poll_copy(cx, a, b)?;
        let back = ba.poll_copy(cx, b, a)?;
        if forward.is_ready() && back.is_ready() { Poll::Ready(Ok::<_, io::Error>(())) } else { Poll::Pending }
    });
    let result = tokio::select! {
        r = copy => r.map(|()| false),
        () = cancel.cancelled() => Ok(true),
    };
    let (cancelled, error) = match result {
        Ok(cancelled) => (cancelled, None),
        Err(e) => (false, Some(e.kind())),
    };
    if cancelled {
        let _ = a.shutdown().await;
        let _ = b.shutdown().await;
    }
    Transferred { sent: ab.read, received: ba.read, cancelled, error }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_counts() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let cancel = CancellationToken::new();
        let t = tokio::spawn(async move { tunnel(&mut a, &mut b, &cancel).await });
        // More than the duplex buffers hold, so writes go partial and `pending` is used.
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expect = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&big).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expect);
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply");
        let done = t.await.unwrap();
        assert_eq!(done, Transferred { sent: 200_000, received: 5, cancelled: false, error: None });
    }

    #[tokio::test]
    async fn a_failed_write_ends_the_tunnel_with_what_it_carried() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let t = tokio::spawn(async move { tunnel(&mut a, &mut b, &CancellationToken::new()).await });
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        drop(server);
        let _ = client.write_all(b"more").await;
        let done = t.await.unwrap();
        assert_eq!((done.sent, done.error), (9, Some(io::ErrorKind::BrokenPipe)), "{done:?}");
    }

    #[tokio::test]
    async fn cancel_cuts_the_tunnel_and_reports_bytes() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let t = tokio::spawn(async move { tunnel(&mut a, &mut b, &c).await });
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        cancel.cancel();
        let done = t.await.unwrap();
        assert_eq!((done.sent, done.cancelled), (5, true));
        assert_eq!(server.read(&mut buf).await.unwrap(), 0, "the far side sees the close");
    }
}
