//! Copying a connection both ways (opaque TCP, upgraded HTTP) with no per-connection buffer
//! while it is idle.
//!
//! `tokio::io::copy_bidirectional` gives every tunnel two buffers for its whole life: 32 KiB
//! for each of 10,000 idle connections is 320 MiB. Here every read goes into one 64 KiB
//! scratch buffer per thread and is written straight through; only what the writer cannot
//! take at once is kept, in a buffer of the connection's own, and that buffer is freed as
//! soon as the connection goes quiet. Bulk transfers get large reads and writes (fewer
//! syscalls and full 16 KiB TLS records); idle connections hold nothing.
//!
//! How a tunnel ends is passed on as it happened. An EOF (a FIN, or TLS close_notify) is
//! passed on as a shutdown of the other side's write half, so half-closed connections keep
//! working. A failure — a side reset its connection (`ECONNRESET`), or reading or writing it
//! failed — and a cut (a policy change revoking the stream, the drain deadline) end both
//! connections with a TCP reset (`SO_LINGER` 0, then close), never with a
//! FIN: a client of a close-delimited protocol would take a FIN for the end of its data,
//! and a reset is the only way to tell it the data was cut (bytes not yet handed to a slow
//! reader go with it, as with any reset). Chained through two sidecars
//! (the tunnel between them is its own mTLS connection, reset the same way), an app's reset
//! reaches the client as a reset, and a client's reset reaches the app. The tunnel reports
//! which side failed ([`Failure`]) for the flow's span.

use std::borrow::Cow;
use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
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
    /// bytes were still going to it); both connections were then reset. The counts stand
    /// either way.
    pub error: Option<Failure>,
}

impl Transferred {
    /// The span error for a failure, by side: `(label, who)` for the connecting side and for
    /// the side it connected to (see [`Failure::describe`]).
    pub fn failure(&self, client: (&str, &str), server: (&str, &str)) -> Option<Cow<'static, str>> {
        self.error.map(|f| match f.side {
            Side::Client => f.describe(client.0, client.1),
            Side::Server => f.describe(server.0, server.1),
        })
    }
}

/// One of a tunnel's two connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `a` of [`tunnel`]: the connection from the side that connected.
    Client,
    /// `b`: the connection to the side it connected to.
    Server,
}

/// What ended a tunnel early: reading from or writing to `side`'s connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub side: Side,
    pub kind: io::ErrorKind,
}

impl Failure {
    /// The span error for this failure, `label: what happened`, where `who` names the far
    /// end of the connection that failed ("the app").
    pub fn describe(self, label: &str, who: &str) -> Cow<'static, str> {
        match self.kind {
            io::ErrorKind::ConnectionReset => format!("{label}: {who} reset the connection").into(),
            kind => format!("{label}: the connection to {who} failed: {kind}").into(),
        }
    }
}

/// A stream a tunnel carries, and the TCP connection under it, which a failed tunnel resets.
pub trait OverTcp {
    /// The TCP connection the stream runs on, when this proxy holds it (`None` for one that
    /// hyper holds, such as an upgraded HTTP connection: it is closed, not reset).
    fn tcp(&self) -> Option<&TcpStream>;
}

impl OverTcp for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl OverTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.get_ref().0)
    }
}

impl OverTcp for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.get_ref().0)
    }
}

/// Makes dropping `s` reset its connection rather than close it with a FIN. No close_notify
/// is sent on TLS either: the reset is the message.
fn reset_on_drop<S: OverTcp + ?Sized>(s: &S) {
    if let Some(tcp) = s.tcp()
        && let Err(e) = tcp.set_zero_linger()
    {
        tracing::debug!(error = %e, "cannot set SO_LINGER 0; the connection will close with a FIN");
    }
}

/// Which stream of a [`Direction`] an error came from.
enum Broke {
    Reading(io::Error),
    Writing(io::Error),
}

impl Broke {
    /// The failure, given which side this direction reads and which it writes.
    fn at(self, reader: Side, writer: Side) -> Failure {
        match self {
            Broke::Reading(e) => Failure { side: reader, kind: e.kind() },
            Broke::Writing(e) => Failure { side: writer, kind: e.kind() },
        }
    }
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
    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<Result<(), Broke>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            while self.written < self.pending.len() {
                let n =
                    ready!(Pin::new(&mut *w).poll_write(cx, &self.pending[self.written..])).map_err(Broke::Writing)?;
                if n == 0 {
                    return Poll::Ready(Err(Broke::Writing(io::ErrorKind::WriteZero.into())));
                }
                self.written += n;
                self.need_flush = true;
            }
            self.pending.clear();
            self.written = 0;
            if self.eof {
                if self.need_flush {
                    ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(Broke::Writing)?;
                    self.need_flush = false;
                }
                if !self.shut_down {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx)).map_err(Broke::Writing)?;
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(()));
            }
            match self.read_through(cx, r, w) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Quiet: hand over what the writer buffered, and keep no memory.
                    if self.need_flush && Pin::new(&mut *w).poll_flush(cx).map_err(Broke::Writing)?.is_ready() {
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
    fn read_through<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<Result<(), Broke>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut *r).poll_read(cx, &mut buf)).map_err(Broke::Reading)?;
            let data = buf.filled();
            if data.is_empty() {
                self.eof = true;
                return Poll::Ready(Ok(()));
            }
            self.read += data.len() as u64;
            let taken = match Pin::new(&mut *w).poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(Broke::Writing(io::ErrorKind::WriteZero.into()))),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Broke::Writing(e))),
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
/// is counted in every case. After an error or a cancel both connections are set to reset
/// when the caller drops them (see the module docs).
pub async fn tunnel<A, B>(a: &mut A, b: &mut B, cancel: &CancellationToken) -> Transferred
where
    A: AsyncRead + AsyncWrite + OverTcp + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + OverTcp + Unpin + ?Sized,
{
    let (mut ab, mut ba) = (Direction::default(), Direction::default());
    let copy = poll_fn(|cx| {
        let forward = ab.poll_copy(cx, a, b).map_err(|e| e.at(Side::Client, Side::Server))?;
        let back = ba.poll_copy(cx, b, a).map_err(|e| e.at(Side::Server, Side::Client))?;
        if forward.is_ready() && back.is_ready() { Poll::Ready(Ok::<_, Failure>(())) } else { Poll::Pending }
    });
    let result = tokio::select! {
        r = copy => r.map(|()| false),
        () = cancel.cancelled() => Ok(true),
    };
    let (cancelled, error) = match result {
        Ok(cancelled) => (cancelled, None),
        Err(failure) => (false, Some(failure)),
    };
    if cancelled || error.is_some() {
        // The side that failed is gone or broken, or a policy change (or the drain deadline)
        // cut the stream; either way the other side must learn that its stream was cut,
        // which a FIN would hide from a protocol that ends at EOF. (Resetting the failed side
        // too costs nothing and ends one that is merely broken, e.g. a TLS error, at once.)
        reset_on_drop(a);
        reset_on_drop(b);
    }
    Transferred { sent: ab.read, received: ba.read, cancelled, error }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    impl OverTcp for DuplexStream {
        fn tcp(&self) -> Option<&TcpStream> {
            None
        }
    }

    /// Both ends of a loopback TCP connection: (connecting, accepted).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connecting = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (connecting, accepted)
    }

    /// client ⇄ [a tunnel b] ⇄ server over real sockets; the tunnel's task drops `a` and
    /// `b` when it ends, as the proxy does.
    async fn tcp_tunnel() -> (TcpStream, TcpStream, tokio::task::JoinHandle<Transferred>) {
        let ((client, mut a), (mut b, server)) = (tcp_pair().await, tcp_pair().await);
        let t = tokio::spawn(async move { tunnel(&mut a, &mut b, &CancellationToken::new()).await });
        (client, server, t)
    }

    async fn read_some(s: &mut TcpStream) -> io::Result<Vec<u8>> {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await.expect("no answer")?;
        Ok(buf[..n].to_vec())
    }

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
        let broken = Failure { side: Side::Server, kind: io::ErrorKind::BrokenPipe };
        assert_eq!((done.sent, done.error), (9, Some(broken)), "{done:?}");
    }

    #[tokio::test]
    async fn a_server_reset_reaches_the_client_as_a_reset_after_the_bytes_before_it() {
        let (mut client, mut server, t) = tcp_tunnel().await;
        server.write_all(b"partial").await.unwrap();
        assert_eq!(read_some(&mut client).await.unwrap(), b"partial");
        server.set_zero_linger().unwrap();
        drop(server);
        let err = read_some(&mut client).await.expect_err("the reset must not look like an EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        let done = t.await.unwrap();
        assert_eq!(done.received, 7);
        assert_eq!(done.error, Some(Failure { side: Side::Server, kind: io::ErrorKind::ConnectionReset }));
    }

    #[tokio::test]
    async fn a_client_reset_reaches_the_server_as_a_reset() {
        let (mut client, mut server, t) = tcp_tunnel().await;
        client.write_all(b"hello").await.unwrap();
        assert_eq!(read_some(&mut server).await.unwrap(), b"hello");
        client.set_zero_linger().unwrap();
        drop(client);
        let err = read_some(&mut server).await.expect_err("the reset must not look like an EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        let done = t.await.unwrap();
        assert_eq!(done.error, Some(Failure { side: Side::Client, kind: io::ErrorKind::ConnectionReset }));
    }

    #[tokio::test]
    async fn a_fin_stays_an_eof_and_the_other_half_keeps_going() {
        let (mut client, mut server, t) = tcp_tunnel().await;
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"done", "the server's FIN is the client's EOF");
        // Half-closed: the client still talks to the server, then closes too.
        client.write_all(b"after").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"after");
        let done = t.await.unwrap();
        assert_eq!(done, Transferred { sent: 5, received: 4, cancelled: false, error: None });
    }

    #[test]
    fn failures_name_the_side_and_what_happened() {
        let reset = Failure { side: Side::Server, kind: io::ErrorKind::ConnectionReset };
        assert_eq!(reset.describe("app_failed", "the app"), "app_failed: the app reset the connection");
        let pipe = Failure { side: Side::Client, kind: io::ErrorKind::BrokenPipe };
        assert_eq!(
            pipe.describe("client_reset", "the client"),
            "client_reset: the connection to the client failed: broken pipe"
        );
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

    /// A revoked (or drained) stream was cut: both sides get a reset, not a FIN that a
    /// protocol ending at EOF would take for the end of its data.
    #[tokio::test]
    async fn a_cancelled_tunnel_resets_both_connections() {
        let ((mut client, mut a), (mut b, mut server)) = (tcp_pair().await, tcp_pair().await);
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let t = tokio::spawn(async move { tunnel(&mut a, &mut b, &c).await });
        client.write_all(b"hello").await.unwrap();
        assert_eq!(read_some(&mut server).await.unwrap(), b"hello");
        cancel.cancel();
        assert!(t.await.unwrap().cancelled);
        for (side, s) in [("client", &mut client), ("server", &mut server)] {
            let err = read_some(s).await.expect_err(side);
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{side}");
        }
    }
}
