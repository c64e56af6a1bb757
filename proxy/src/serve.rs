//! Serving one app- or peer-facing HTTP connection once its protocol is known (ALPN or
//! sniffed): hyper's own HTTP/1.1 or HTTP/2 server, driven until the connection ends or
//! the proxy asks it to stop, then drained.
//!
//! Not hyper-util's auto-detecting server: the protocol is already decided, and the auto
//! connection's future holds both protocols' state — kilobytes more for every open
//! connection, which is most of what an idle connection costs.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::TracedBody;

/// The HTTP/2 limits Trellis serves with (both directions).
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// Many times the stream window: on the pooled connection between two sidecars every app
/// connection's requests share this window, and each stream whose reader stalls (a client
/// that stopped reading a download, an app that does not read an upload) keeps up to a stream
/// window of it. At 4 MiB, five such streams stopped every other caller's traffic to that
/// peer; at 32 MiB it takes 32. It is credit, not memory: only data a stalled reader has not
/// taken is held.
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// The largest header block accepted, in either direction: the servers' limit on requests and
/// the pooled clients' on responses, so a header that passes one hop passes the next.
pub const MAX_HEADER_LIST: u32 = 64 * 1024;
/// hyper's HTTP/1.1 read buffer; it bounds a head only loosely (it reads in growing chunks),
/// so HTTP/1.1 heads are also measured against [`MAX_HEADER_LIST`] ([`header_list_size`]).
pub const MAX_H1_BUF: usize = 256 * 1024;

/// A header block's size as HTTP/2 counts it for `SETTINGS_MAX_HEADER_LIST_SIZE` (name, value
/// and 32 bytes per field), so one limit means the same on every hop, HTTP/1.1 or HTTP/2.
pub fn header_list_size(headers: &http::HeaderMap) -> usize {
    headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 32).sum()
}

/// A hyper server connection that can be asked to finish what is in flight and close.
trait Drain: Future<Output = Result<(), hyper::Error>> {
    fn drain(self: Pin<&mut Self>);
}

impl<I, S> Drain for http1::UpgradeableConnection<I, S>
where
    S: HttpService<Incoming, ResBody = TracedBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

impl<I, S> Drain for http2::Connection<I, S, TokioExecutor>
where
    S: HttpService<Incoming, ResBody = TracedBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

/// Serves `io` as HTTP/2 (`h2`) or HTTP/1.1 with upgrades until the peer closes it or
/// `stop` completes; then in-flight requests get the duration `stop` returned to finish.
///
/// A plain function, not `async`: `io` moves into the boxed connection right here. An async
/// fn keeps its arguments in its future for its whole life, so every caller up the chain
/// that took the stream by value would hold another dead copy of it (over a kilobyte with
/// TLS) for as long as the connection is open.
pub fn serve_http<I, S, F>(
    io: I,
    svc: S,
    h2: bool,
    header_timeout: Duration,
    stop: F,
) -> impl Future<Output = ()> + Send
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = TracedBody> + Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    F: Future<Output = Duration> + Send,
{
    let io = TokioIo::new(io);
    let conn: Conn = if h2 {
        Box::pin(
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_header_list_size(MAX_HEADER_LIST)
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .serve_connection(io, svc),
        )
    } else {
        Box::pin(
            http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .max_buf_size(MAX_H1_BUF)
                .serve_connection(io, svc)
                .with_upgrades(),
        )
    };
    drive(conn, stop)
}

/// A hyper server connection of either protocol, boxed at exactly its own size.
type Conn = Pin<Box<dyn Drain + Send>>;

/// `conn` comes boxed at exactly its protocol's size: held inline, the caller's future
/// would be as large as the larger of the two connection types for every connection.
async fn drive(mut conn: Conn, stop: impl Future<Output = Duration>) {
    let drain = tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "HTTP connection ended with error");
            }
            return;
        }
        d = stop => d,
    };
    conn.as_mut().drain();
    if tokio::time::timeout(drain, conn).await.is_err() {
        tracing::debug!("HTTP connection closed after the drain deadline");
    }
}
