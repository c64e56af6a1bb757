//! The HTTP/1.1 header timeout, counted from the first byte of a request's head rather than
//! from the moment the connection starts waiting for one. Used by [`crate::serve`] for every
//! HTTP/1.1 connection it serves (apps' to the outbound, peers' to the inbound).
//!
//! hyper arms its header timer as soon as it waits for a head — right after each response
//! too — so on its own `--header-timeout` (10 s) also closed every keep-alive connection idle
//! that long, and a client reusing one from its pool a moment later got a reset; a POST is
//! not retried by most clients. Here the timer is a [`HeadTimer`] that waits for the next
//! read returning bytes ([`Watched`] counts them) before it starts the header clock; until
//! then only [`KEEP_ALIVE_IDLE`] bounds the wait, as Envoy's default idle timeout does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How long an HTTP/1.1 connection may sit idle between requests before it is closed.
pub const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(3600);

/// hyper's timer for one HTTP/1.1 connection, sharing its read count with [`Watched`].
#[derive(Debug, Clone)]
pub struct HeadTimer {
    header_timeout: Duration,
    reads: Arc<AtomicU64>,
}

impl HeadTimer {
    /// The timer and the connection's `io` wrapped to count its reads for it.
    pub fn watch<I>(io: I, header_timeout: Duration) -> (Watched<I>, HeadTimer) {
        let reads = Arc::new(AtomicU64::new(0));
        (Watched { io, reads: reads.clone() }, HeadTimer { header_timeout, reads })
    }

    fn arm(&self, sleep: Pin<&mut HeadSleep>) {
        let this = sleep.project();
        *this.reads_at_arm = self.reads.load(Ordering::Relaxed);
        *this.head_started = false;
        this.sleep.reset(Instant::now() + KEEP_ALIVE_IDLE);
    }
}

impl hyper::rt::Timer for HeadTimer {
    /// Not called by hyper's HTTP/1.1 server; a plain sleep, should that change.
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            timer: self.clone(),
            reads_at_arm: 0,
            head_started: true,
            sleep: tokio::time::sleep(duration),
        })
    }

    /// hyper's `deadline` is its wait plus the header timeout; the wait for a head's first
    /// byte is bounded by the idle timeout instead.
    fn sleep_until(&self, _deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            timer: self.clone(),
            reads_at_arm: self.reads.load(Ordering::Relaxed),
            head_started: false,
            sleep: tokio::time::sleep(KEEP_ALIVE_IDLE),
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(head) => self.arm(head),
            None => *sleep = self.sleep_until(deadline),
        }
    }
}

pin_project_lite::pin_project! {
    /// Fires [`KEEP_ALIVE_IDLE`] after it was armed if no byte came, else the header
    /// timeout after the first read that brought some.
    struct HeadSleep {
        timer: HeadTimer,
        reads_at_arm: u64,
        head_started: bool,
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        // hyper polls this only after a read came back empty-handed, so a head that arrives
        // whole never looks here; one that arrives in pieces does, on each piece.
        if !*this.head_started && this.timer.reads.load(Ordering::Relaxed) != *this.reads_at_arm {
            *this.head_started = true;
            this.sleep.as_mut().reset(Instant::now() + this.timer.header_timeout);
        }
        this.sleep.poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

pin_project_lite::pin_project! {
    /// A connection's I/O, counting the reads that return bytes for its [`HeadTimer`].
    #[derive(Debug)]
    pub struct Watched<I> {
        #[pin]
        io: I,
        reads: Arc<AtomicU64>,
    }
}

impl<I: AsyncRead> AsyncRead for Watched<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        ready!(this.io.poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.reads.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite> AsyncWrite for Watched<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::http::{ERROR, generated};
    use crate::serve::serve_http;
    use crate::telemetry::body::Traced;

    const HEADER_TIMEOUT: Duration = Duration::from_secs(1);

    /// An HTTP/1.1 connection served as the sidecars serve one, answering 200 to anything.
    fn connection() -> DuplexStream {
        let (client, server) = tokio::io::duplex(1 << 16);
        let svc = hyper::service::service_fn(|_req| async {
            let resp = generated(StatusCode::OK, (ERROR, "none"), "served\n".into());
            Ok::<_, std::convert::Infallible>(resp.map(Traced::plain))
        });
        tokio::spawn(serve_http(server, svc, false, HEADER_TIMEOUT, None, std::future::pending()));
        client
    }

    async fn request(client: &mut DuplexStream) -> String {
        client.write_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n").await.unwrap();
        let mut buf = vec![0; 4096];
        let n = client.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Everything the server sends until it closes, and when it closed.
    async fn until_closed(client: &mut DuplexStream) -> (String, Instant) {
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        (String::from_utf8_lossy(&rest).into_owned(), Instant::now())
    }

    /// A keep-alive connection idle far longer than the header timeout still takes the next
    /// request; only an hour of idleness closes it (the test's clock is tokio's, paused).
    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_outlives_the_header_timeout() {
        let mut client = connection();
        assert!(request(&mut client).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(HEADER_TIMEOUT * 30).await;
        assert!(request(&mut client).await.starts_with("HTTP/1.1 200"), "closed while idle");
        let idle_since = Instant::now();
        let (rest, closed) = until_closed(&mut client).await;
        assert_eq!(rest, "");
        assert_eq!(closed - idle_since, KEEP_ALIVE_IDLE);
    }

    /// A head that starts and stalls is cut the header timeout after its first byte, however
    /// long the connection was idle before it.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_head_is_cut_the_header_timeout_after_its_first_byte() {
        let mut client = connection();
        assert!(request(&mut client).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(HEADER_TIMEOUT * 30).await;
        client.write_all(b"GET /slow HTTP/1.1\r\nhost: ").await.unwrap();
        let first_byte = Instant::now();
        let (_, closed) = until_closed(&mut client).await;
        assert_eq!(closed - first_byte, HEADER_TIMEOUT);
    }

    /// Byte by byte, a head keeps the clock its first byte started.
    #[tokio::test(start_paused = true)]
    async fn a_head_sent_byte_by_byte_gets_no_more_time() {
        let mut client = connection();
        let first_byte = Instant::now();
        // 35 bytes, 100 ms apart: the server hangs up at the first second, mid-head.
        for b in b"GET / HTTP/1.1\r\nhost: app\r\nx-slow: " {
            if client.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let closed = Instant::now();
        assert!(client.write_all(b"\r\n\r\n").await.is_err(), "still open after the head's bytes");
        assert!(closed - first_byte <= HEADER_TIMEOUT + Duration::from_millis(100), "{:?}", closed - first_byte);
    }
}
