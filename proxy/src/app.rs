//! Clients from the inbound sidecar to its local app: pooled HTTP/1.1 ([`H1Pool`]), and
//! HTTP/2 with prior knowledge for apps whose clients speak it (gRPC servers).
//!
//! A client dials one fixed app address whatever the request's URI says, so the URI can
//! carry the authority the caller used (`Host` for HTTP/1.1, `:authority` for HTTP/2) all
//! the way to the app — an HTTP/2 server must not see a `Host` that disagrees with
//! `:authority` (RFC 9113 §8.3.1).
//!
//! An HTTP/2 app may refuse a stream it will not process (`REFUSED_STREAM`, or a GOAWAY
//! racing requests on the shared connection); [`AppClient::send_h2`] sends idempotent,
//! bodiless requests once more rather than answering the caller 502.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body::Body;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::http::ReqBody;
use crate::peer_h2::{ConnSlot, PeerBody, PeerConn, SendError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The pair of clients for one app address.
#[derive(Debug)]
pub struct AppClient {
    pub h1: Arc<H1Pool<ReqBody>>,
    app: SocketAddr,
    /// The one HTTP/2 connection to the app, shared by every request sent as HTTP/2.
    h2: ConnSlot,
}

impl AppClient {
    fn new(app: SocketAddr) -> Self {
        // Kept while the app keeps it open: unlike a peer's, it carries no certificate to expire.
        AppClient { h1: Arc::new(H1Pool::new(app)), app, h2: ConnSlot::new(Duration::MAX) }
    }

    /// Sends a request to an HTTP/2 app over the shared connection. A request that never
    /// left (the connection had closed, or the app had said GOAWAY) goes on a new one. A
    /// request without a body that the app did not process — its stream refused
    /// (`REFUSED_STREAM`), or above the last stream a GOAWAY let through, as nginx sends one
    /// every `keepalive_requests` (RFC 9113 §8.7) — is sent again, whatever its method, up to
    /// [`UNPROCESSED_RETRIES`] times: under load a GOAWAY cuts off every stream queued behind
    /// the app's concurrency limit, and the next connection may say GOAWAY as well. An
    /// idempotent one is sent once more whatever cut it off (RFC 9110 §9.2.2). A request whose
    /// body has been streamed cannot be sent again and fails as it is.
    ///
    /// On `h2` directly, as the outbound's client to its peers ([`crate::peer_h2`]): hyper's
    /// client would put a channel and a task per request between this and the connection.
    pub async fn send_h2<B>(&self, req: Request<B>) -> Result<Response<PeerBody>, AppError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let idempotent = req.method().is_idempotent();
        let replay = req.body().is_end_stream().then(|| bodiless_copy::<B, B>(&req));
        // The caller's body, or none when a request goes again.
        let mut result = self.send_h2_once(req.map(Either::<B, Empty<Bytes>>::Left)).await;
        let Some(replay) = replay else { return result };
        for again in 1..=UNPROCESSED_RETRIES {
            match &result {
                Err(AppError::H2(e)) if unprocessed(e) || (again == 1 && idempotent) => {
                    tracing::debug!(error = %e, again, "HTTP/2 app did not take the request; sending it again");
                    // A GOAWAY's requests go to a new connection at once; an app refusing
                    // streams on a live one is likely overloaded, and gets room to recover
                    // (10 ms, doubling: 1.3 s over all retries) rather than 9 requests at once.
                    if e.is_reset() && again > 1 {
                        tokio::time::sleep(REFUSED_BACKOFF * (1 << (again - 2))).await;
                    }
                }
                _ => break,
            }
            result = self.send_h2_once(bodiless_copy::<B, _>(&replay)).await;
        }
        result
    }

    /// Sends on the shared connection; a request that never left goes once more on a new one.
    async fn send_h2_once<T>(&self, req: Request<T>) -> Result<Response<PeerBody>, AppError>
    where
        T: Body<Data = Bytes> + Send + 'static,
        T::Error: std::fmt::Display + Send,
    {
        match self.h2_conn().await?.send(req).await {
            Err(SendError::Unsent(_, req)) => self.h2_conn().await?.send(*req).await.map_err(AppError::from),
            sent => sent.map_err(AppError::from),
        }
    }

    async fn h2_conn(&self) -> Result<PeerConn, AppError> {
        let app = self.app;
        self.h2
            .get_or_open(|| async move {
                let tcp = connect(app).await?;
                crate::peer_h2::handshake(tcp, app, crate::peer_h2::APP_SETTINGS).await.map_err(AppError::H2Handshake)
            })
            .await
    }
}

impl<B> From<SendError<B>> for AppError {
    fn from(e: SendError<B>) -> Self {
        match e {
            SendError::Unsent(e, _) | SendError::Failed(e) => AppError::H2(e),
        }
    }
}

/// How many more times a bodiless request the app did not process is sent ([`unprocessed`]).
/// Each GOAWAY fails every stream queued behind the app's concurrency limit, and one
/// connection takes only so many before its own (nginx: 1,000), so a deep queue needs several
/// rounds; bounded, so an app that refuses everything is answered 502, not retried forever.
const UNPROCESSED_RETRIES: usize = 8;
/// The first wait before a refused stream's request goes again on the same connection.
const REFUSED_BACKOFF: Duration = Duration::from_millis(10);

/// The app did no processing of the request: it reset the stream with `REFUSED_STREAM`, or
/// said GOAWAY naming an earlier last stream — h2 fails with the GOAWAY only the streams above
/// it and those still queued here, never sent (a stream it did let through that then breaks
/// fails with the broken connection's error instead).
fn unprocessed(e: &h2::Error) -> bool {
    let refused = e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM);
    e.is_remote() && (refused || e.is_go_away())
}

fn bodiless_copy<B, L>(req: &Request<L>) -> Request<Either<B, Empty<Bytes>>> {
    let mut copy = Request::new(Either::Right(Empty::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// A TCP connection to the app, for either protocol.
async fn connect(app: SocketAddr) -> Result<TcpStream, AppError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(app))
        .await
        .map_err(|_| AppError::ConnectTimeout)?
        .map_err(AppError::Connect)?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// How long an HTTP/1.1 connection to the app may sit unused before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many HTTP/1.1 connections to one app are kept for reuse.
const MAX_POOLED: usize = 256;

/// Why a request did not reach the app or its answer did not come back.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("connecting timed out after {}s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout,
    #[error("HTTP/1.1 handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("HTTP/2 handshake failed: {0}")]
    H2Handshake(h2::Error),
    #[error("HTTP/2: {0}")]
    H2(h2::Error),
}

impl AppError {
    /// `app_unreachable` when nothing accepted the connection, `app_failed` when the app took it
    /// and the exchange broke (a reset, a refused stream, a protocol the app does not speak), with
    /// the whole error chain: hyper's outer message alone ("client error (SendRequest)") names
    /// nothing an operator can act on.
    pub fn label_and_detail(&self, app: std::net::SocketAddr, h1: bool) -> (&'static str, String) {
        let mut chain = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            let text = s.to_string();
            if !chain.contains(&text) {
                chain = format!("{chain}: {text}");
            }
            source = s.source();
        }
        let unreachable = match self {
            AppError::Connect(_) | AppError::ConnectTimeout => true,
            AppError::Handshake(_) | AppError::Http(_) | AppError::H2Handshake(_) | AppError::H2(_) => false,
        };
        if unreachable {
            return ("app_unreachable", format!("the app at {app} is unreachable: {chain}"));
        }
        let spoke = if h1 { "HTTP/1.1" } else { "HTTP/2" };
        ("app_failed", format!("the app at {app} failed the request (sent as {spoke}, the caller's protocol): {chain}"))
    }
}

/// HTTP/1.1 connections to one app, each carrying one request at a time.
///
/// Each connection's hyper task reads and writes; the pool only keeps the handles. A handle
/// goes back into the pool as soon as its request is handed over, and is taken again once
/// hyper says the connection is ready, i.e. the previous response has been read to its end.
/// No task is spawned per request to wait for that (hyper-util's pooled client does, and
/// hashes and formats a pool key per request: together a few microseconds per request at
/// the inbound's peak). Closed and long-unused connections are dropped at checkout and by a
/// sweep every half `IDLE_TIMEOUT`.
#[derive(Debug)]
pub struct H1Pool<B> {
    app: SocketAddr,
    /// Oldest first; checkout takes the newest ready one, so a quiet app keeps few warm.
    conns: Mutex<Vec<Pooled<B>>>,
    sweeping: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Pooled<B> {
    send: http1::SendRequest<B>,
    /// When its last request was handed over.
    used: Instant,
}

impl<B> H1Pool<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn new(app: SocketAddr) -> Self {
        H1Pool { app, conns: Mutex::new(Vec::new()), sweeping: false.into() }
    }

    /// Sends a request in origin form with a `Host` header. A pooled connection the app
    /// closed while it was idle fails before the request is written; that request goes
    /// again on a new connection.
    pub async fn send(self: &Arc<Self>, mut req: Request<B>) -> Result<Response<Incoming>, AppError> {
        to_origin_form(&mut req);
        if let Some(mut send) = self.checkout() {
            let sent = send.try_send_request(req);
            self.checkin(send);
            match sent.await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let mut send = self.connect().await?;
        let sent = send.send_request(req);
        self.checkin(send);
        Ok(sent.await?)
    }

    /// The newest connection ready for a request; closed ones are dropped on the way.
    fn checkout(&self) -> Option<http1::SendRequest<B>> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut i = conns.len();
        while i > 0 {
            i -= 1;
            if conns[i].send.is_closed() {
                conns.remove(i);
            } else if conns[i].send.is_ready() {
                return Some(conns.remove(i).send);
            }
        }
        None
    }

    /// Keeps a connection whose request was just handed over, unless the pool is full (it
    /// then closes once that request is done).
    fn checkin(&self, send: http1::SendRequest<B>) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.len() < MAX_POOLED {
            conns.push(Pooled { send, used: Instant::now() });
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<http1::SendRequest<B>, AppError> {
        let tcp = connect(self.app).await?;
        let (send, conn) = http1::Builder::new()
            .max_buf_size(crate::serve::MAX_H1_BUF)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(AppError::Handshake)?;
        let app = self.app;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%app, error = %e, "app connection ended");
            }
        });
        if !self.sweeping.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
        Ok(send)
    }

    /// Drops connections that are closed, or ready and unused for [`IDLE_TIMEOUT`].
    fn drop_idle(&self, now: Instant) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let expired = |c: &Pooled<B>| c.send.is_ready() && now.duration_since(c.used) >= IDLE_TIMEOUT;
        conns.retain(|c| !(c.send.is_closed() || expired(c)));
    }

    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Runs while the pool exists.
async fn sweep<B>(pool: std::sync::Weak<H1Pool<B>>)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let period = IDLE_TIMEOUT / 2;
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.drop_idle(Instant::now());
    }
}

/// HTTP/1.1 to an origin server takes the path and query as the request target, and the
/// authority in `Host` (added from the URI when the caller sent none). CONNECT keeps its
/// authority-form target.
fn to_origin_form<B>(req: &mut Request<B>) {
    if req.method() == http::Method::CONNECT {
        return;
    }
    if !req.headers().contains_key(header::HOST)
        && let Some(host) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// One [`AppClient`] per app address (one per `--inbound LISTEN=APP`, or per original
/// destination when capturing transparently).
#[derive(Debug, Default)]
pub struct AppClients {
    by_app: Mutex<HashMap<SocketAddr, Arc<AppClient>>>,
}

impl AppClients {
    /// Shared, not cloned: a request's future holds this across its await, and a pair of
    /// `Client`s by value would make every request's future hundreds of bytes larger.
    pub fn get(&self, app: SocketAddr) -> Arc<AppClient> {
        let mut map = self.by_app.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(app).or_insert_with(|| Arc::new(AppClient::new(app))).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::{Notify, mpsc};

    /// What the test app saw.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Conn,
        Head(String),
        Closed,
    }

    /// How the test app answers.
    #[derive(Clone, Copy)]
    enum Mode {
        /// `ok` to every request, keeping the connection.
        KeepAlive,
        /// `ok`, then closes the connection without saying so (an app's idle timeout).
        CloseAfterOne,
        /// The first connection's body waits for the gate.
        GateFirst,
    }

    async fn app(mode: Mode) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>, Arc<Notify>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let gate = Arc::new(Notify::new());
        let open = gate.clone();
        tokio::spawn(async move {
            for n in 0.. {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let (tx, open) = (tx.clone(), open.clone());
                let _ = tx.send(Seen::Conn);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 1024];
                        let read = conn.read(&mut chunk).await.unwrap_or(0);
                        if read == 0 {
                            let _ = tx.send(Seen::Closed);
                            return;
                        }
                        buf.extend_from_slice(&chunk[..read]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        let _ = tx.send(Seen::Head(String::from_utf8_lossy(&head).into_owned()));
                        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n").await.unwrap();
                        if matches!(mode, Mode::GateFirst) && n == 0 {
                            open.notified().await;
                        }
                        conn.write_all(b"ok").await.unwrap();
                        if matches!(mode, Mode::CloseAfterOne) {
                            return;
                        }
                    }
                });
            }
        });
        (addr, rx, gate)
    }

    fn get(uri: &str) -> Request<Empty<Bytes>> {
        Request::get(uri).body(Empty::new()).unwrap()
    }

    async fn body(resp: Response<Incoming>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Vec<Seen> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[tokio::test]
    async fn one_connection_carries_sequential_requests_in_origin_form_with_host() {
        let (addr, mut seen, _) = app(Mode::KeepAlive).await;
        let pool = Arc::new(H1Pool::new(addr));
        for _ in 0..3 {
            let resp = pool.send(get("http://api.shop/items?id=1")).await.unwrap();
            assert_eq!(body(resp).await, "ok");
        }
        let seen = drain(&mut seen);
        assert_eq!(seen.iter().filter(|s| **s == Seen::Conn).count(), 1, "{seen:?}");
        let heads: Vec<&String> =
            seen.iter().filter_map(|s| if let Seen::Head(h) = s { Some(h) } else { None }).collect();
        assert_eq!(heads.len(), 3);
        for head in heads {
            assert!(head.starts_with("GET /items?id=1 HTTP/1.1\r\n"), "{head}");
            assert!(head.to_ascii_lowercase().contains("\r\nhost: api.shop\r\n"), "{head}");
        }
        assert_eq!(pool.pooled(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_replaced() {
        let (addr, mut seen, _) = app(Mode::CloseAfterOne).await;
        let pool = Arc::new(H1Pool::new(addr));
        assert_eq!(body(pool.send(get("http://app/a")).await.unwrap()).await, "ok");
        // Wait for hyper to see the close, as an idle connection would before its next use.
        while pool.conns.lock().unwrap().iter().any(|c| !c.send.is_closed()) {
            tokio::task::yield_now().await;
        }
        assert_eq!(body(pool.send(get("http://app/b")).await.unwrap()).await, "ok");
        let conns = drain(&mut seen).into_iter().filter(|s| *s == Seen::Conn).count();
        assert_eq!(conns, 2);
        assert_eq!(pool.pooled(), 1, "the closed connection left the pool");
    }

    #[tokio::test]
    async fn a_connection_still_answering_is_not_given_a_second_request() {
        let (addr, mut seen, gate) = app(Mode::GateFirst).await;
        let pool = Arc::new(H1Pool::new(addr));
        let slow = pool.send(get("http://app/slow")).await.unwrap();
        // The first response's body has not arrived: the second request needs its own connection.
        assert_eq!(body(pool.send(get("http://app/fast")).await.unwrap()).await, "ok");
        gate.notify_one();
        assert_eq!(body(slow).await, "ok");
        let conns = drain(&mut seen).into_iter().filter(|s| *s == Seen::Conn).count();
        assert_eq!(conns, 2);
        assert_eq!(pool.pooled(), 2);
    }

    #[tokio::test]
    async fn connections_unused_for_the_idle_timeout_are_closed() {
        let (addr, mut seen, _) = app(Mode::KeepAlive).await;
        let pool = Arc::new(H1Pool::new(addr));
        assert_eq!(body(pool.send(get("http://app/")).await.unwrap()).await, "ok");
        pool.drop_idle(Instant::now() + IDLE_TIMEOUT / 2);
        assert_eq!(pool.pooled(), 1, "not idle long enough yet");
        pool.drop_idle(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(pool.pooled(), 0);
        loop {
            match seen.recv().await {
                Some(Seen::Closed) => break,
                Some(_) => {}
                None => panic!("the app never saw the connection close"),
            }
        }
    }

    /// An h2c app answering `ok <connection number> <request body length>`; with `close_after`,
    /// each connection says GOAWAY and closes after that many requests.
    async fn h2_app(close_after: Option<usize>) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        h2_app_taking(close_after, u32::MAX).await
    }

    /// [`h2_app`] that takes at most `max_streams` concurrent streams per connection.
    async fn h2_app_taking(
        close_after: Option<usize>,
        max_streams: u32,
    ) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = conns.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let server = h2::server::Builder::new().max_concurrent_streams(max_streams).handshake(tcp);
                    let Ok(mut conn) = server.await else { return };
                    let mut accepted = 0;
                    // Each stream on its own task: the accept loop is what drives the connection.
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        tokio::spawn(answer(req, respond, n));
                        accepted += 1;
                        if close_after == Some(accepted) {
                            // GOAWAY; the connection closes once the stream is answered.
                            conn.graceful_shutdown();
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    async fn answer(req: Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>, conn: usize) {
        let mut body = req.into_body();
        let mut len = 0;
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            len += chunk.len();
        }
        let mut tx = respond.send_response(Response::new(()), false).unwrap();
        tx.send_data(Bytes::from(format!("ok {conn} {len}")), true).unwrap();
    }

    fn h2_request(method: http::Method, body: &'static str) -> Request<http_body_util::Full<Bytes>> {
        let body = http_body_util::Full::new(Bytes::from_static(body.as_bytes()));
        Request::builder().method(method).uri("http://api.shop/items").body(body).unwrap()
    }

    async fn h2_text(client: &AppClient, req: Request<http_body_util::Full<Bytes>>) -> String {
        let resp = client.send_h2(req).await.unwrap();
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection_to_the_app() {
        let (addr, conns) = h2_app(None).await;
        let client = Arc::new(AppClient::new(addr));
        // Concurrent first requests too: they wait for one connect rather than each open one.
        let mut sent = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let client = client.clone();
            sent.spawn(async move { h2_text(&client, h2_request(http::Method::GET, "")).await });
        }
        for text in sent.join_all().await {
            assert_eq!(text, "ok 1 0");
        }
        assert_eq!(h2_text(&client, h2_request(http::Method::POST, "abc")).await, "ok 1 3");
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_http2_app_closed_is_replaced_for_any_method() {
        let (addr, conns) = h2_app(Some(1)).await;
        let client = AppClient::new(addr);
        assert_eq!(h2_text(&client, h2_request(http::Method::GET, "")).await, "ok 1 0");
        // Once the client has seen the close, a POST (never sent twice) must go on a new connection.
        while client.h2.holds_open() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(h2_text(&client, h2_request(http::Method::POST, "abcd")).await, "ok 2 4");
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// An app that takes 4 streams at a time and says GOAWAY after every 5 (nginx does both,
    /// at 128 and 1,000): the streams queued here and those above the GOAWAY's last stream
    /// were never processed, so each bodiless request goes again, whatever its method, until
    /// a connection takes it — one retry was not enough under load.
    #[tokio::test]
    async fn a_busy_http2_app_saying_goaway_gets_every_bodiless_request() {
        let (addr, conns) = h2_app_taking(Some(5), 4).await;
        let client = Arc::new(AppClient::new(addr));
        let mut sent = tokio::task::JoinSet::new();
        for i in 0..30 {
            let client = client.clone();
            let method = [http::Method::GET, http::Method::POST, http::Method::DELETE][i % 3].clone();
            sent.spawn(async move { client.send_h2(h2_request(method, "")).await.map(|r| r.status()) });
        }
        for result in sent.join_all().await {
            assert_eq!(result.unwrap(), http::StatusCode::OK);
        }
        let conns = conns.load(std::sync::atomic::Ordering::SeqCst);
        assert!(conns >= 3, "{conns} connections: too few GOAWAYs to need a second retry");
    }

    /// Retries are bounded: an app that refuses every stream gets a request 1 + 8 times and
    /// the caller a failure.
    #[tokio::test]
    async fn an_http2_app_refusing_every_stream_is_asked_nine_times() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
                    while let Some(Ok((_req, mut respond))) = conn.accept().await {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    }
                });
            }
        });
        let client = AppClient::new(addr);
        let start = std::time::Instant::now();
        let err = client.send_h2(h2_request(http::Method::POST, "")).await.unwrap_err();
        // The first retry at once, then 10 ms doubling: not nine requests in a burst.
        assert!(start.elapsed() >= REFUSED_BACKOFF * 127, "{:?}", start.elapsed());
        assert!(matches!(&err, AppError::H2(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM)), "{err:?}");
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1 + UNPROCESSED_RETRIES);
        // A request with a body was streamed to the app: it is not sent again.
        seen.store(0, std::sync::atomic::Ordering::SeqCst);
        client.send_h2(h2_request(http::Method::PUT, "x")).await.unwrap_err();
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_http2_app_that_is_not_listening_is_unreachable() {
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let client = AppClient::new(addr);
        let err = client.send_h2(h2_request(http::Method::GET, "")).await.unwrap_err();
        assert!(matches!(err, AppError::Connect(_)), "{err:?}");
        assert_eq!(err.label_and_detail(addr, false).0, "app_unreachable");
    }

    #[tokio::test]
    async fn an_app_that_is_not_listening_is_a_connect_error() {
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let pool = Arc::new(H1Pool::<Empty<Bytes>>::new(addr));
        let err = pool.send(get("http://app/")).await.unwrap_err();
        assert!(matches!(err, AppError::Connect(_)), "{err:?}");
        assert!(err.to_string().starts_with("cannot connect: "), "{err}");
        assert_eq!(pool.pooled(), 0);
    }
}
