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

use crate::head_timer::HeadTimer;
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
/// The largest header block accepted, in either direction: the proxy refuses a request's
/// ([`over_header_limit`]: `431`, `x-trellis-error: header_too_large`) and the pooled clients
/// a response's, so a header that passes one hop passes the next.
pub const MAX_HEADER_LIST: u32 = 64 * 1024;
/// hyper's HTTP/1.1 read buffer; it bounds a head only loosely (it reads in growing chunks),
/// so HTTP/1.1 heads are also measured against [`MAX_HEADER_LIST`] ([`request_header_list_size`]).
/// A head that does not fit (or has more than hyper's 100 fields) gets hyper's own bare `431`.
pub const MAX_H1_BUF: usize = 256 * 1024;
/// What the HTTP/2 servers let h2 read of a request's header block. More than
/// [`MAX_HEADER_LIST`], so a request over the limit reaches the proxy and is refused by it, as
/// on HTTP/1.1: with `x-trellis-error` and a request span saying why. Beyond this h2 answers a
/// bare `431` itself (then `RST_STREAM(NO_ERROR)` if the request is still sending, the vendored
/// h2's patch) and the proxy never sees the request. Twice the limit, not [`MAX_H1_BUF`]: h2
/// holds a block this size for each of up to [`MAX_CONCURRENT_STREAMS`] streams at once.
pub const H2_SERVER_HEADER_LIST: u32 = 2 * MAX_HEADER_LIST;

/// A header block's size as HTTP/2 counts it for `SETTINGS_MAX_HEADER_LIST_SIZE` (name, value
/// and 32 bytes per field), so one limit means the same on every hop, HTTP/1.1 or HTTP/2.
pub fn header_list_size(headers: &http::HeaderMap) -> usize {
    headers.iter().map(|(name, value)| field_size(name.as_str(), value.len())).sum()
}

fn field_size(name: &str, value_len: usize) -> usize {
    name.len() + value_len + 32
}

/// A request's header block as h2 measures it on an HTTP/2 hop: its fields and its
/// pseudo-header fields (`:method`, `:path`, and `:scheme` and `:authority` when the target is
/// absolute, as the outbound sends it to its peer).
pub fn request_header_list_size<B>(req: &http::Request<B>) -> usize {
    let uri = req.uri();
    let path = uri.path_and_query().map_or(1, |p| p.as_str().len());
    header_list_size(req.headers())
        + field_size(":method", req.method().as_str().len())
        + field_size(":path", path)
        + uri.scheme_str().map_or(0, |s| field_size(":scheme", s.len()))
        + uri.authority().map_or(0, |a| field_size(":authority", a.as_str().len()))
}

/// A response's header block as h2 measures it: its fields and `:status`.
pub fn response_header_list_size<B>(resp: &http::Response<B>) -> usize {
    header_list_size(resp.headers()) + field_size(":status", 3)
}

/// Is a header block of `size` over the limit? h2 refuses a block of [`MAX_HEADER_LIST`] bytes
/// or more, so the proxy's own checks do too, and a block one hop accepts the next accepts.
pub fn over_header_limit(size: usize) -> bool {
    size >= MAX_HEADER_LIST as usize
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
/// At `retire_at` (when a certificate the connection was authenticated with expires) it
/// takes no new request — HTTP/2 GOAWAY, HTTP/1.1 closed after the request in flight —
/// and runs until its requests end or `stop`.
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
    retire_at: Option<tokio::time::Instant>,
    stop: F,
) -> impl Future<Output = ()> + Send
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = TracedBody> + Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    F: Future<Output = Duration> + Send,
{
    let conn: Conn = if h2 {
        let io = TokioIo::new(io);
        Box::pin(
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_header_list_size(H2_SERVER_HEADER_LIST)
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                // h2's guard against rapid-reset floods (CVE-2023-44487) closes the connection
                // once 20 streams are reset before they were accepted — and on the pooled
                // connection between sidecars, every app client that gives up a request
                // resets one: a burst of client aborts cut every other request to this
                // sidecar. Bounded still, at the streams a connection may have open anyway.
                .max_pending_accept_reset_streams(MAX_CONCURRENT_STREAMS as usize)
                // The lifetime count of streams h2 reset itself: see `peer_h2::handshake`.
                .max_local_error_reset_streams(None)
                .serve_connection(io, svc),
        )
    } else {
        // The header clock starts at a head's first byte, not when the connection goes idle.
        let (io, timer) = HeadTimer::watch(io, header_timeout);
        Box::pin(
            http1::Builder::new()
                .timer(timer)
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .max_buf_size(MAX_H1_BUF)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades(),
        )
    };
    drive(conn, retire_at, stop)
}

/// A hyper server connection of either protocol, boxed at exactly its own size.
type Conn = Pin<Box<dyn Drain + Send>>;

/// `conn` comes boxed at exactly its protocol's size: held inline, the caller's future
/// would be as large as the larger of the two connection types for every connection.
async fn drive(mut conn: Conn, retire_at: Option<tokio::time::Instant>, stop: impl Future<Output = Duration>) {
    // Boxed, and only when there is a deadline: a timer is ~100 bytes every idle
    // connection would otherwise carry.
    let mut retire = retire_at.map(|at| Box::pin(tokio::time::sleep_until(at)));
    tokio::pin!(stop);
    let drain = loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP connection ended with error");
                }
                return;
            }
            () = async {
                match retire.as_mut() {
                    Some(sleep) => sleep.await,
                    None => std::future::pending().await,
                }
            } => {
                // Expiry is the mesh's revocation: requests on it are over for an identity
                // whose SVID has lapsed; a live peer reconnects with its current one.
                tracing::debug!("a certificate this connection was authenticated with expired: no new requests on it");
                conn.as_mut().drain();
                retire = None;
            }
            d = &mut stop => break d,
        }
    };
    conn.as_mut().drain();
    if tokio::time::timeout(drain, conn).await.is_err() {
        // Its requests still in flight end here without a response (their spans say so).
        tracing::warn!(timeout = ?drain, "drain deadline reached: HTTP connection cut off with requests in flight");
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use bytes::Bytes;
    use http::{HeaderValue, Method, Request, Response, StatusCode};

    use super::*;
    use crate::http::{ERROR, generated};
    use crate::telemetry::body::Traced;

    #[test]
    fn sizes_count_pseudo_header_fields_as_h2_does() {
        let mut req = Request::builder().method(Method::GET).uri("http://api.shop/items?id=1").body(()).unwrap();
        req.headers_mut().insert("x-a", HeaderValue::from_static("12345"));
        // x-a (3 + 5), :method (7 + 3), :path (5 + 11), :scheme (7 + 4), :authority (10 + 8).
        assert_eq!(request_header_list_size(&req), 8 + 10 + 16 + 11 + 18 + 5 * 32);
        // An origin-form target has no :scheme or :authority (its Host is a field).
        *req.uri_mut() = "/items?id=1".parse().unwrap();
        assert_eq!(request_header_list_size(&req), 8 + 10 + 16 + 3 * 32);
        let resp = Response::builder().header("x-a", "12345").body(()).unwrap();
        assert_eq!(response_header_list_size(&resp), 8 + 10 + 2 * 32);
        // h2 refuses a block of exactly the limit, so the proxy does too.
        assert!(!over_header_limit(MAX_HEADER_LIST as usize - 1));
        assert!(over_header_limit(MAX_HEADER_LIST as usize));
    }

    /// An HTTP/2 server as the sidecars run it, answering 200 to anything it is handed, and an
    /// h2 client connected to it.
    async fn h2_server() -> h2::client::SendRequest<Bytes> {
        let (client, server) = tokio::io::duplex(1 << 20);
        let svc = hyper::service::service_fn(|_req| async {
            let resp = generated(StatusCode::OK, (ERROR, "none"), "served\n".into());
            Ok::<_, std::convert::Infallible>(resp.map(Traced::plain))
        });
        tokio::spawn(serve_http(server, svc, true, Duration::from_secs(10), None, std::future::pending()));
        let (send, conn) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(conn);
        send
    }

    fn big_request(value_len: usize) -> Request<()> {
        let value = HeaderValue::from_str(&"a".repeat(value_len)).unwrap();
        Request::builder().method(Method::POST).uri("http://api.shop/").header("x-big", value).body(()).unwrap()
    }

    /// A request over the limit but within what h2 reads reaches the service (which, in the
    /// sidecars, answers its own 431); one beyond gets h2's 431, and the stream it was still
    /// sending is reset with NO_ERROR — the request was answered, not refused or malformed.
    #[tokio::test]
    async fn over_the_limit_reaches_the_service_and_far_over_gets_h2s_431_and_no_error() {
        let send = h2_server().await;
        let (resp, _body) = send.clone().ready().await.unwrap().send_request(big_request(100_000), false).unwrap();
        assert_eq!(resp.await.unwrap().status(), StatusCode::OK, "100 KB of header reaches the service");

        let (resp, mut body) = send.ready().await.unwrap().send_request(big_request(200_000), false).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp).await.expect("answered").unwrap();
        assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let reset = tokio::time::timeout(Duration::from_secs(5), poll_fn(|cx| body.poll_reset(cx))).await;
        assert_eq!(reset.expect("the unfinished request is reset").unwrap(), h2::Reason::NO_ERROR);
    }
}
