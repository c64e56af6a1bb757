//! The outbound's HTTP/2 client on a pooled connection to a peer sidecar, on `h2` directly;
//! the inbound's client to an HTTP/2 app ([`crate::app`]) is the same, over plain TCP.
//!
//! Sits between [`crate::pool`] (which opens and keeps the connection, in a [`ConnSlot`])
//! and the outbound's forwarding service: [`handshake`] starts the connection and spawns
//! its `drive`r, [`PeerConn::send`] sends one request and awaits the head of the answer,
//! whose body is a [`PeerBody`].
//!
//! Why not hyper's HTTP/2 client: it puts a channel between the caller and the connection
//! and spawns a task per request to wait for the response (plus two one-shot channels).
//! Here the request is handed to `h2` in the app connection's own task, which also awaits
//! the response; only a request body that is still streaming gets a task (`pipe`). The
//! flow control, trailers and keep-alive PINGs hyper did are done here, as hyper does them.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::{HeaderMap, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

/// A PING goes to the peer this long after the last answered one...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and a peer that does not answer within this is taken for gone.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the pooled connection, as this side announces them.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_header_list: u32,
    /// Send keep-alive PINGs ([`KEEPALIVE_INTERVAL`]). To a peer sidecar, yes: a host that
    /// vanished without a FIN must be noticed. Not to an app over loopback: gRPC servers
    /// allow a PING without data at most every 5 minutes and answer more with GOAWAY
    /// `too_many_pings`, which ended every stream on the connection — a server stream
    /// quiet for two minutes died after two PINGs.
    pub keepalive: bool,
}

/// What this side announces on its client connections (to peers and to HTTP/2 apps): the
/// windows the servers use too, and their header list limit — h2's default (16 KiB) would
/// turn an app's larger response headers into a 502.
pub const SETTINGS: Settings = Settings {
    stream_window: crate::serve::STREAM_WINDOW,
    connection_window: crate::serve::CONNECTION_WINDOW,
    max_header_list: crate::serve::MAX_HEADER_LIST,
    keepalive: true,
};

/// [`SETTINGS`] for the inbound's connection to an HTTP/2 app: no keep-alive PINGs.
pub const APP_SETTINGS: Settings = Settings { keepalive: false, ..SETTINGS };

/// A handle on a live pooled connection; clones share it.
#[derive(Clone, Debug)]
pub struct PeerConn {
    send: SendRequest<Bytes>,
    /// Set when the connection's driver has finished or it refused a new stream: the pool
    /// then opens a new one.
    closed: Arc<AtomicBool>,
    /// A pool hands the connection out no later than this (a certificate of its handshake
    /// expires then).
    retire_at: Option<Instant>,
}

/// Why a request to the peer got no response.
pub enum SendError<B> {
    /// The connection could take no new stream (closed, or the peer said GOAWAY): the
    /// request never left and is handed back, to go again on a new connection whatever
    /// its method.
    Unsent(h2::Error, Box<Request<B>>),
    /// The request (or part of it) was sent; the error says what happened to it.
    Failed(h2::Error),
}

/// HTTP/2 handshake over an established (mTLS) stream; the connection is then driven by
/// its own task until it ends: closed by the peer, or by h2 once the last [`PeerConn`]
/// (the pool's included) and the last request on it are gone.
pub async fn handshake<T>(io: T, addr: SocketAddr, settings: Settings) -> Result<PeerConn, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_header_list_size(settings.max_header_list)
        // Until the server's SETTINGS say how many streams it takes, h2 would assume no limit
        // and a burst at connect (the retries after a GOAWAY) would be refused past the
        // server's (nginx: 128); 100 is the least RFC 9113 §6.5.2 asks a server to allow.
        .initial_max_send_streams(100)
        .max_concurrent_reset_streams(1024)
        // h2 counts the streams it resets itself over a connection's whole life and closes
        // it (GOAWAY `too_many_internal_resets`) at 1,024 — and a request whose client went
        // away is reset by h2 (CANCEL), so a pooled connection died with every request on it
        // after its 1,024th abandoned request (hyperium/h2#856). The far end is this mesh's
        // own sidecar or the local app, not an anonymous client the limit is meant for.
        .max_local_error_reset_streams(None)
        .max_send_buffer_size(1024 * 1024)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    let keepalive = settings.keepalive;
    tokio::spawn(async move {
        match drive(conn, keepalive).await {
            Ok(()) => tracing::debug!(%addr, "pooled peer connection closed"),
            Err(e) => tracing::debug!(%addr, error = %e, "pooled peer connection ended"),
        }
        done.store(true, Ordering::Release);
    });
    Ok(PeerConn { send, closed, retire_at: None })
}

/// Why a connection's driver stopped other than by a clean close.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error(transparent)]
    H2(#[from] h2::Error),
    #[error("no answer to a keep-alive PING within {0:?}")]
    PingTimeout(Duration),
}

/// Polls the connection (which reads and writes every stream's frames) and, if `pings`,
/// sends a keep-alive PING every [`KEEPALIVE_INTERVAL`], so a peer that vanished without a
/// FIN is noticed. A hand-written poll rather than `select!`: this runs on every frame, and the
/// timer is reset only when a PING goes out or comes back.
async fn drive<T>(mut conn: Connection<T, Bytes>, pings: bool) -> Result<(), Ended>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut ping = conn.ping_pong().filter(|_| pings);
    let mut timer = Box::pin(tokio::time::sleep(KEEPALIVE_INTERVAL));
    let mut awaiting_pong = false;
    poll_fn(|cx| {
        if let Poll::Ready(r) = Pin::new(&mut conn).poll(cx) {
            return Poll::Ready(r.map_err(Ended::from));
        }
        match ping.as_mut() {
            Some(ping) => keepalive(ping, &mut timer, &mut awaiting_pong, cx),
            None => Poll::Pending,
        }
    })
    .await
}

/// One step of the PING cycle; `Ready` only when the peer stopped answering.
fn keepalive(
    ping: &mut PingPong,
    timer: &mut Pin<Box<Sleep>>,
    awaiting_pong: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Ended>> {
    if timer.as_mut().poll(cx).is_ready() {
        if *awaiting_pong {
            return Poll::Ready(Err(Ended::PingTimeout(KEEPALIVE_TIMEOUT)));
        }
        ping.send_ping(Ping::opaque())?;
        *awaiting_pong = true;
        timer.as_mut().reset(Instant::now() + KEEPALIVE_TIMEOUT);
        let _ = timer.as_mut().poll(cx);
    }
    if *awaiting_pong && let Poll::Ready(pong) = ping.poll_pong(cx) {
        pong?;
        *awaiting_pong = false;
        timer.as_mut().reset(Instant::now() + KEEPALIVE_INTERVAL);
        let _ = timer.as_mut().poll(cx);
    }
    Poll::Pending
}

/// One shared connection, opened by the first request that needs it: concurrent first
/// requests wait for that one connect instead of each opening their own. Used for the
/// outbound's pooled connection to each peer and the inbound's to an HTTP/2 app.
#[derive(Debug)]
pub struct ConnSlot {
    /// The connection and when the slot stops handing it out (`None`: never).
    conn: tokio::sync::Mutex<Option<(PeerConn, Option<Instant>)>>,
    /// A connection this old is replaced (`Duration::MAX`: kept while it is open).
    max_age: Duration,
}

impl ConnSlot {
    pub fn new(max_age: Duration) -> Self {
        ConnSlot { conn: tokio::sync::Mutex::new(None), max_age }
    }

    /// The slot's connection if it is open and not too old, else one `open`ed now (or by a
    /// request that got there first).
    pub async fn get_or_open<E, F>(&self, open: impl FnOnce() -> F) -> Result<PeerConn, E>
    where
        F: Future<Output = Result<PeerConn, E>>,
    {
        // The common case, without waiting on the async lock.
        if let Ok(slot) = self.conn.try_lock()
            && let Some(conn) = self.live(&slot)
        {
            return Ok(conn);
        }
        // Boxed: a connect and handshake future is kilobytes, and every request's future
        // would carry (and move) it though only a connection's first requests wait here.
        Box::pin(self.open(open)).await
    }

    async fn open<E, F>(&self, open: impl FnOnce() -> F) -> Result<PeerConn, E>
    where
        F: Future<Output = Result<PeerConn, E>>,
    {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = self.live(&slot) {
            return Ok(conn);
        }
        let conn = open().await?;
        let aged = Instant::now().checked_add(self.max_age);
        let until = match (aged, conn.retire_at) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        };
        *slot = Some((conn.clone(), until));
        Ok(conn)
    }

    fn live(&self, slot: &Option<(PeerConn, Option<Instant>)>) -> Option<PeerConn> {
        let usable = |(conn, until): &&(PeerConn, Option<Instant>)| {
            !conn.is_closed() && until.is_none_or(|until| Instant::now() < until)
        };
        slot.as_ref().filter(usable).map(|(conn, _)| conn.clone())
    }

    /// Does the slot hold a connection that is still usable?
    #[cfg(test)]
    pub(crate) fn holds_open(&self) -> bool {
        self.conn.try_lock().is_ok_and(|slot| self.live(&slot).is_some())
    }
}

impl PeerConn {
    /// The connection, to be handed out by a pool no later than `at`.
    pub fn retire_by(mut self, at: Option<Instant>) -> Self {
        self.retire_at = at;
        self
    }

    /// Is the connection gone (the pool must not hand it out)?
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` (an absolute URI, no connection-specific headers) and awaits the
    /// response head. A request body still streaming is piped by its own task.
    pub async fn send<B>(&self, req: Request<B>) -> Result<Response<PeerBody>, SendError<B>>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let mut send = match self.send.clone().ready().await {
            Ok(send) => send,
            Err(e) => {
                // Closed or told GOAWAY: no new stream will ever open here.
                self.closed.store(true, Ordering::Release);
                return Err(SendError::Unsent(e, Box::new(req)));
            }
        };
        let (head, body) = req.into_parts();
        let eos = body.is_end_stream();
        let (response, stream) = send.send_request(Request::from_parts(head, ()), eos).map_err(SendError::Failed)?;
        if !eos {
            let mut pipe = Box::pin(pipe(body, stream));
            // A small body is often all there already: then no task is needed.
            if poll_fn(|cx| Poll::Ready(pipe.as_mut().poll(cx).is_pending())).await {
                tokio::spawn(pipe);
            }
        }
        let response = response.await.map_err(SendError::Failed)?;
        let len = content_length(response.headers());
        Ok(response.map(|recv| PeerBody { recv, data_done: false, len }))
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Streams the app's request body into the HTTP/2 stream, within the peer's flow-control
/// window. Stops when the peer resets the stream (it may answer before reading it all);
/// an error reading the app's body resets the stream, so the peer does not take a
/// truncated body for a whole one.
async fn pipe<B>(body: B, mut tx: SendStream<Bytes>)
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    loop {
        let next = poll_fn(|cx| {
            if let Poll::Ready(reset) = tx.poll_reset(cx) {
                return Poll::Ready(Err(reset));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await;
        let frame = match next {
            Err(_) => return,
            Ok(None) => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "app's request body failed; resetting the stream");
                tx.send_reset(Reason::CANCEL);
                return;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                if send_data(&mut tx, data, eos).await.is_err() || eos {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = tx.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}

/// Sends `data` as the window allows, ending the stream with it when `eos`.
async fn send_data(tx: &mut SendStream<Bytes>, mut data: Bytes, eos: bool) -> Result<(), h2::Error> {
    if data.is_empty() {
        return if eos { tx.send_data(data, true) } else { Ok(()) };
    }
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| tx.poll_capacity(cx)).await {
            Some(granted) => granted?,
            // The stream can take no more data (reset, or the connection went).
            None => return Err(h2::Error::from(Reason::CANCEL)),
        };
        // Zero means the window moved without opening: wait again, as hyper does.
        if granted > 0 {
            let chunk = data.split_to(granted.min(data.len()));
            tx.send_data(chunk, eos && data.is_empty())?;
        }
    }
    Ok(())
}

/// A response body arriving over the connection (from a peer sidecar, or from an HTTP/2
/// app to the inbound): data as the reader takes it (each read gives the sender that much
/// window back), then trailers (gRPC's status travels in them).
#[derive(Debug)]
pub struct PeerBody {
    recv: RecvStream,
    data_done: bool,
    /// What `content-length` says is still to come.
    len: Option<u64>,
}

impl Body for PeerBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.len = self.len.map(|left| left.saturating_sub(data.len() as u64));
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(ended_early(e, self.len)),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(ended_early(e, self.len)),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.len {
            Some(len) if !self.data_done => SizeHint::with_exact(len),
            _ => SizeHint::default(),
        }
    }
}

/// A peer that resets the stream with NO_ERROR or CANCEL after sending its response has
/// ended the body, not failed it (RFC 9113 §8.1: a server may stop reading the request),
/// as hyper treats it — unless `content-length` says bytes are missing (`left`): then the
/// reset cut the response short, and the app must not take it for whole.
fn ended_early(e: h2::Error, left: Option<u64>) -> Option<Result<Frame<Bytes>, h2::Error>> {
    match e.reason() {
        Some(Reason::NO_ERROR | Reason::CANCEL) if left.unwrap_or(0) == 0 => None,
        _ => Some(Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http::{HeaderValue, Method};
    use http_body_util::{BodyExt, Empty};
    use tokio::io::DuplexStream;

    use super::*;

    const ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);
    const SETTINGS: Settings =
        Settings { stream_window: 1 << 20, connection_window: 4 << 20, max_header_list: 64 << 10, keepalive: true };

    /// A request body of fixed frames, handed out one per poll.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn trailers(name: &'static str, value: &str) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert(name, HeaderValue::from_str(value).unwrap());
        t
    }

    /// A client `PeerConn` and the server end of its connection, over an in-memory pipe.
    async fn connected() -> (PeerConn, h2::server::Connection<DuplexStream, Bytes>) {
        let (client, server) = tokio::io::duplex(64 << 10);
        let server = tokio::spawn(h2::server::handshake(server));
        let conn = handshake(client, ADDR, SETTINGS).await.unwrap();
        (conn, server.await.unwrap().unwrap())
    }

    fn request<B>(body: B) -> Request<B> {
        Request::builder().method(Method::POST).uri("http://api.test/upload").body(body).unwrap()
    }

    /// Reads a whole body with its trailers, giving the window back as it goes.
    async fn read_all(mut body: RecvStream) -> (Vec<u8>, Option<HeaderMap>) {
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            data.extend_from_slice(&chunk);
        }
        (data, body.trailers().await.unwrap())
    }

    #[tokio::test]
    async fn bodies_larger_than_the_windows_and_trailers_cross_both_ways() {
        let (conn, mut server) = connected().await;
        tokio::spawn(async move {
            while let Some(Ok((req, mut respond))) = server.accept().await {
                tokio::spawn(async move {
                    let (got, got_trailers) = read_all(req.into_body()).await;
                    let tag = got_trailers.and_then(|t| t.get("x-sum").cloned()).unwrap();
                    let mut tx = respond.send_response(Response::new(()), false).unwrap();
                    // Three times the stream window the client announced: only flows if the
                    // client's body gives the window back as it is read.
                    let big = Bytes::from(vec![7u8; 3 << 20]);
                    tx.send_data(big, false).unwrap();
                    tx.send_trailers(trailers("grpc-status", &format!("{}-{}", got.len(), tag.to_str().unwrap())))
                        .unwrap();
                });
            }
        });
        // Larger than h2's default 64 KiB window the server announces: the pipe must wait
        // for window updates, on its own task.
        let sent: VecDeque<_> = (0..5u8)
            .map(|i| Frame::data(Bytes::from(vec![i; 100_000])))
            .chain([Frame::trailers(trailers("x-sum", "five"))])
            .collect();
        let exchange = async {
            let Ok(resp) = conn.send(request(Frames(sent))).await else { panic!("request failed") };
            resp.into_body().collect().await.unwrap()
        };
        // A stuck window shows as a hang: bounded here.
        let collected = tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("the exchange finished");
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(collected.to_bytes().len(), 3 << 20);
        assert_eq!(trailers.get("grpc-status").unwrap(), "500000-five");
    }

    #[tokio::test]
    async fn a_connection_that_said_goaway_hands_the_request_back_unsent() {
        let (conn, mut server) = connected().await;
        server.abrupt_shutdown(Reason::NO_ERROR);
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        // The GOAWAY arrives whenever the driver reads it; until then a request may still go.
        for _ in 0..100 {
            match conn.send(request(Empty::<Bytes>::new())).await {
                Err(SendError::Unsent(_, back)) => {
                    assert_eq!(back.uri().path(), "/upload", "the request itself comes back");
                    assert!(conn.is_closed(), "the pool must not hand this connection out again");
                    return;
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        panic!("the GOAWAY never took effect");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_answering_pings_is_dropped_and_an_answering_one_kept() {
        // Handshaken, then never polled again: it will not answer a PING.
        let (silent, _mute) = connected().await;
        let (alive, mut server) = connected().await;
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        tokio::time::sleep(KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT - Duration::from_secs(1)).await;
        assert!(!silent.is_closed(), "the PING's deadline has not passed yet");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(silent.is_closed(), "no PONG within the timeout closes the connection");
        tokio::time::sleep(KEEPALIVE_INTERVAL * 4).await;
        assert!(!alive.is_closed(), "a peer answering its PINGs keeps the connection");
    }

    /// gRPC servers answer PINGs without data more often than every 5 minutes with GOAWAY
    /// `too_many_pings`: an app's connection gets none. (A silent server would be taken for
    /// gone after one unanswered PING.)
    #[tokio::test(start_paused = true)]
    async fn an_apps_connection_gets_no_pings() {
        let (client, server) = tokio::io::duplex(64 << 10);
        let server = tokio::spawn(h2::server::handshake(server));
        let conn = handshake(client, ADDR, APP_SETTINGS).await.unwrap();
        let _silent = server.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!conn.is_closed(), "a PING went unanswered, so one was sent");
    }

    #[tokio::test]
    async fn the_connection_closes_when_its_last_handle_goes() {
        // hyper keeps a channel to work around h2 not noticing this; h2 0.4 wakes its
        // connection when the last handle drops, which the pool's retiring relies on.
        let (conn, mut server) = connected().await;
        let served = tokio::spawn(async move {
            while let Some(Ok((_, mut respond))) = server.accept().await {
                respond.send_response(Response::new(()), true).unwrap();
            }
        });
        assert!(conn.send(Request::get("http://api.test/").body(Empty::<Bytes>::new()).unwrap()).await.is_ok());
        // Let the connection go idle first: h2 alone would not notice the last handle go.
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(conn);
        tokio::time::timeout(Duration::from_secs(5), served).await.expect("the server saw the connection end").unwrap();
    }

    #[test]
    fn a_reset_after_the_response_ends_the_body_and_other_resets_fail_it() {
        assert!(ended_early(h2::Error::from(Reason::NO_ERROR), None).is_none());
        assert!(ended_early(h2::Error::from(Reason::CANCEL), Some(0)).is_none());
        assert!(matches!(ended_early(h2::Error::from(Reason::INTERNAL_ERROR), None), Some(Err(_))));
        // Bytes the response promised are missing: a cut, whatever the reason code.
        assert!(matches!(ended_early(h2::Error::from(Reason::CANCEL), Some(6)), Some(Err(_))));
    }

    #[tokio::test]
    async fn a_response_cut_short_by_a_reset_is_an_error_not_a_shorter_body() {
        let (conn, mut server) = connected().await;
        tokio::spawn(async move {
            while let Some(Ok((_, mut respond))) = server.accept().await {
                // Its own task: the accept loop must keep polling the connection meanwhile.
                tokio::spawn(async move {
                    let head = Response::builder().header("content-length", "10").body(()).unwrap();
                    let mut tx = respond.send_response(head, false).unwrap();
                    tx.send_data(Bytes::from_static(b"half"), false).unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    tx.send_reset(Reason::CANCEL);
                });
            }
        });
        let Ok(resp) = conn.send(Request::get("http://api.test/").body(Empty::<Bytes>::new()).unwrap()).await else {
            panic!("the response head should arrive");
        };
        let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await.unwrap();
        assert!(body.is_err(), "4 of 10 promised bytes, then a reset, must not pass for a whole body");
    }

    /// A slot stops handing out a connection at the first of its age limit and the expiry of
    /// a certificate of its handshake, and then opens another.
    #[tokio::test]
    async fn a_slot_retires_a_connection_when_a_certificate_of_it_expires() {
        let slot = ConnSlot::new(Duration::from_secs(600));
        let (first, _server) = connected().await;
        let first = first.retire_by(Some(Instant::now() + Duration::from_millis(100)));
        slot.get_or_open(|| async { Ok::<_, ()>(first) }).await.unwrap();
        assert!(slot.holds_open(), "handed out before the expiry");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!slot.holds_open(), "still handed out after a certificate of it expired");
        let (second, _server2) = connected().await;
        slot.get_or_open(|| async { Ok::<_, ()>(second) }).await.unwrap();
        assert!(slot.holds_open(), "the new connection is handed out");
    }
}
