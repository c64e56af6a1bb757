//! Protocol detection: is this stream HTTP/1.1, HTTP/2 (prior knowledge), or something
//! else, judged from its first bytes within a short, bounded time.
//!
//! Sniffing only reads: the bytes come back through [`crate::io::Prefixed`]. Ports declared
//! opaque are never sniffed (the caller does not call this), so server-speaks-first
//! protocols there never wait; elsewhere a silent client is treated as opaque TCP after
//! the detect timeout. The detect timeout bounds the wait for the *first* bytes only: once
//! they could still begin an HTTP/1.1 request line or the HTTP/2 preface, the rest gets up
//! to [`REST_TIMEOUT`] (a slow client's `GET ` then its path a second later is still HTTP,
//! and calling it TCP would have the inbound deny it at L4).
//!
//! A stream that starts like a request line (`METHOD target`) is never passed on as opaque
//! bytes just because the line is long, slow or names an odd version: under a ports-only
//! rule the app would get a request the proxy never parsed, with a client-written
//! `x-trellis-peer-id`, no L7 policy and no span. It is HTTP, and the HTTP server answers it
//! (`414`, `431`, `505`, `400`, or its header timeout). Only a complete first line without
//! ` HTTP/` (an uppercase text protocol such as a Redis inline command) is opaque.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use trellis_policy::is_tchar;
use trellis_policy::limits::MAX_METHOD_LEN;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Opaque => "tcp",
        }
    }
}

/// The outcome of sniffing, with the bytes read so far.
#[derive(Debug)]
pub struct Detected {
    pub protocol: Protocol,
    pub prefix: Bytes,
    pub timed_out: bool,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Enough for any real request line's method and the start of its target.
const MAX_SNIFF: usize = 8 * 1024;
/// How long, from the start, a stream whose first bytes may still be HTTP gets to finish
/// its request line (or preface) before it is decided anyway (a started request line: HTTP).
pub const REST_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads until the protocol is known, `MAX_SNIFF` bytes or EOF; opaque when nothing came
/// within `timeout`; what came and is still undecided after [`REST_TIMEOUT`] (or `timeout`,
/// if longer) is decided by `undecided`. `timed_out` means no bytes came at all.
pub async fn detect<R: AsyncRead + Unpin>(io: &mut R, timeout: Duration) -> std::io::Result<Detected> {
    let mut buf = BytesMut::with_capacity(1024);
    let start = tokio::time::Instant::now();
    let first_bytes = start + timeout;
    let rest = start + timeout.max(REST_TIMEOUT);
    loop {
        if let Some(p) = classify(&buf) {
            return Ok(Detected { protocol: p, prefix: buf.freeze(), timed_out: false });
        }
        if buf.len() >= MAX_SNIFF {
            return Ok(Detected { protocol: undecided(&buf), prefix: buf.freeze(), timed_out: false });
        }
        // `classify` said "undecided", so anything read so far is a possible HTTP prefix.
        let deadline = if buf.is_empty() { first_bytes } else { rest };
        let read = match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(read) => Some(read),
            Err(_) if buf.is_empty() => late_bytes(io, &mut buf).await,
            Err(_) => None,
        };
        match read {
            Some(Ok(0)) => return Ok(Detected { protocol: Protocol::Opaque, prefix: buf.freeze(), timed_out: false }),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => {
                let timed_out = buf.is_empty();
                let protocol = if timed_out { Protocol::Opaque } else { undecided(&buf) };
                tracing::debug!(bytes = buf.len(), protocol = protocol.label(), "first line still incomplete");
                return Ok(Detected { protocol, prefix: buf.freeze(), timed_out });
            }
        }
    }
}

/// Event-loop turns [`late_bytes`] waits through.
const LATE_TURNS: usize = 32;

/// One more look before a client is called silent. A busy event loop runs every expired
/// timer on each turn but takes in at most `--events-per-poll` sockets' readiness, so
/// under load the detect timer can fire while bytes that arrived long before it are still
/// queued in the kernel's ready list: an HTTP client would then be taken for opaque TCP
/// and refused. Each `yield_now` lets the loop take in another batch; a client that truly
/// sent nothing costs these few turns once, on a path that waited a whole timeout already.
async fn late_bytes<R: AsyncRead + Unpin>(io: &mut R, buf: &mut BytesMut) -> Option<std::io::Result<usize>> {
    for _ in 0..LATE_TURNS {
        tokio::task::yield_now().await;
        let mut read = std::pin::pin!(io.read_buf(buf));
        if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
            tracing::debug!("the client's first bytes were read after the detect timer fired");
            return Some(r);
        }
    }
    None
}

/// Guards an opaque stream on a port not declared opaque whose first bytes nobody has looked
/// at (opaque by ALPN, or its client said nothing within the detect timeout): if the client's first bytes turn out to be
/// an HTTP request after all, the stream fails instead of carrying it. Passed on raw, such a
/// request would reach the app unparsed — with an `x-trellis-peer-id` the client wrote, under
/// a ports-only rule. The first bytes are held back until they decide; the other direction
/// flows meanwhile (a server that speaks first is not held up), and once decided the guard
/// is a pass-through. Bytes still undecided [`REST_TIMEOUT`] after the first of them came
/// (`ruok`, a text protocol's word without its line end) are decided as they stand, as
/// [`detect`] decides them: held for good, they would stall the client and its app forever.
pub struct LateHttpGuard<IO> {
    inner: IO,
    state: Guard,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

enum Guard {
    Sniffing(BytesMut),
    Releasing(Bytes),
    Open,
}

/// The error a guarded stream fails with.
pub const LATE_HTTP: &str = "an HTTP request sent after the protocol detection timeout, on a stream already \
    treated as opaque; send it promptly, or declare the port opaque if it is not HTTP";

impl<IO> LateHttpGuard<IO> {
    pub fn new(inner: IO) -> Self {
        LateHttpGuard { inner, state: Guard::Sniffing(BytesMut::new()), deadline: None }
    }
}

impl<IO: crate::tunnel::OverTcp> crate::tunnel::OverTcp for LateHttpGuard<IO> {
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        self.inner.tcp()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for LateHttpGuard<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                Guard::Open => return Pin::new(&mut this.inner).poll_read(cx, buf),
                Guard::Releasing(held) => {
                    let n = held.len().min(buf.remaining());
                    buf.put_slice(&held[..n]);
                    held.advance(n);
                    if held.is_empty() {
                        this.state = Guard::Open;
                    }
                    return Poll::Ready(Ok(()));
                }
                Guard::Sniffing(seen) => {
                    let mut chunk = [0u8; 1024];
                    let mut chunk = ReadBuf::new(&mut chunk);
                    let read = Pin::new(&mut this.inner).poll_read(cx, &mut chunk)?;
                    let expired = read.is_pending() && !seen.is_empty() && {
                        let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(REST_TIMEOUT)));
                        deadline.as_mut().poll(cx).is_ready()
                    };
                    if read.is_pending() && !expired {
                        return Poll::Pending;
                    }
                    let eof = read.is_ready() && chunk.filled().is_empty();
                    seen.extend_from_slice(chunk.filled());
                    let decided = match classify(seen) {
                        None if eof || expired || seen.len() >= MAX_SNIFF => Some(undecided(seen)),
                        other => other,
                    };
                    match decided {
                        Some(Protocol::Http1 | Protocol::Http2) => {
                            return Poll::Ready(Err(std::io::Error::new(
                                std::io::ErrorKind::PermissionDenied,
                                LATE_HTTP,
                            )));
                        }
                        Some(Protocol::Opaque) if seen.is_empty() => this.state = Guard::Open,
                        Some(Protocol::Opaque) => this.state = Guard::Releasing(std::mem::take(seen).freeze()),
                        None => {}
                    }
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for LateHttpGuard<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What bytes `classify` left undecided are when no more may come: a started request line
/// (`METHOD ` and more) is HTTP/1 (see the module docs); a partial HTTP/2 preface or a lone
/// method token is not.
fn undecided(b: &[u8]) -> Protocol {
    let line = after_empty_lines(b);
    match line.iter().position(|&c| is_blank(c)) {
        Some(i) if i > 0 && line.len() > i + 1 && !b.starts_with(&H2_PREFACE[..3]) => Protocol::Http1,
        _ => Protocol::Opaque,
    }
}

/// The separators RFC 9112 §3 lets a recipient read between a request line's words (SP,
/// HTAB, VT, FF, bare CR): nginx does, so a line split by any of them is a request to it.
fn is_blank(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | 0x0b | 0x0c | b'\r')
}

/// The bytes after any empty lines: RFC 9112 §2.2 has servers skip them before a request
/// line (hyper and nginx do), so `\r\nGET / HTTP/1.1` is a request, not opaque bytes.
fn after_empty_lines(b: &[u8]) -> &[u8] {
    let skip = b.iter().position(|&c| c != b'\r' && c != b'\n').unwrap_or(b.len());
    &b[skip..]
}

/// `Some` once the bytes decide the question.
pub fn classify(b: &[u8]) -> Option<Protocol> {
    if b.is_empty() {
        return None;
    }
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return (b.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    let b = after_empty_lines(b);
    if b.is_empty() {
        return None;
    }
    // HTTP/1: METHOD SP target SP HTTP/1.x CRLF; decide on the method token and, once the
    // line is complete, its version.
    let method_end = b.iter().position(|&c| is_blank(c));
    // Any method token a policy can name (RFC 9110: `get`, `FOO_BAR` and `REPORT2` are
    // methods too); anything else is not HTTP.
    let token_ok = |t: &[u8]| !t.is_empty() && t.len() <= MAX_METHOD_LEN && t.iter().all(|&c| is_tchar(c));
    match method_end {
        None if b.len() > MAX_METHOD_LEN || !token_ok(b) => Some(Protocol::Opaque),
        None => None,
        Some(i) if !token_ok(&b[..i]) => Some(Protocol::Opaque),
        Some(_) => match b.iter().position(|&c| c == b'\n') {
            Some(eol) => {
                // Any `HTTP/` version, in any case and however spaced, is HTTP: the server
                // refuses what it does not parse (400, 505) rather than the app — which may
                // read it (nginx does) — getting an unparsed request. So is HTTP/0.9's
                // `GET /path`, which has no version at all.
                let mut words = b[..eol].split(|&c| is_blank(c)).filter(|w| !w.is_empty());
                let (method, target) = (words.next(), words.next());
                let last = words.next_back().or(target);
                let versioned = last.is_some_and(|v| v.len() >= 5 && v[..5].eq_ignore_ascii_case(b"HTTP/"));
                let http09 = method == Some(b"GET") && target.is_some_and(|t| t.starts_with(b"/")) && last == target;
                Some(if versioned || http09 { Protocol::Http1 } else { Protocol::Opaque })
            }
            None => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST /api/x?y=1 HTTP/1.0\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET /partial"), None, "needs the rest of the line");
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Opaque), "a TLS hello");
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"hello world\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET / FOO/1.1\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"PING\r\n"), Some(Protocol::Opaque), "redis inline command");
        assert_eq!(classify(b"SET key value\r\n"), Some(Protocol::Opaque), "redis inline command");
        // Versions hyper refuses are still HTTP: refused by the proxy, never passed on raw.
        assert_eq!(classify(b"GET /admin HTTP/1.2\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET /admin HTTP/2.0\r\n"), Some(Protocol::Http1));
        // Request lines a lenient app server (nginx) reads are HTTP, refused by the proxy's own
        // parser (400) rather than passed on unparsed with a client-written peer header.
        assert_eq!(classify(b"GET /admin\r\n"), Some(Protocol::Http1), "HTTP/0.9");
        assert_eq!(classify(b"\r\nGET /x HTTP/1.1\r\n"), Some(Protocol::Http1), "a leading empty line");
        assert_eq!(classify(b"\r\n\n\r\nGET /x HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"\r\n\r\n"), None, "only empty lines: undecided");
        assert_eq!(undecided(b"\r\n\r\n"), Protocol::Opaque);
        assert_eq!(undecided(b"\r\nGET /adm"), Protocol::Http1);
        assert_eq!(classify(b"GET\t/x\tHTTP/1.1\r\n"), Some(Protocol::Http1), "tabs");
        assert_eq!(classify(b"GET /x http/1.1\r\n"), Some(Protocol::Http1), "lowercase version");
        assert_eq!(classify(b"GET /x HTTP/1.1 \r\n"), Some(Protocol::Http1), "trailing space");
        assert_eq!(classify(b"GET  /x  HTTP/1.1\r\n"), Some(Protocol::Http1), "doubled spaces");
        assert_eq!(classify(b"GET key\r\n"), Some(Protocol::Opaque), "redis inline GET");
        assert_eq!(classify(b"GET /a b\r\n"), Some(Protocol::Opaque), "three words, no version");
        // Every method token a policy can name is read as HTTP, so its rules can match.
        for method in ["get", "PoST", "FOO_BAR", "REPORT2", "PROPFINDEXTENDED1", "M.SEARCH", &"X".repeat(32)] {
            let line = format!("{method} /x HTTP/1.1\r\n");
            assert_eq!(classify(line.as_bytes()), Some(Protocol::Http1), "{method}");
            assert_eq!(classify(&line.as_bytes()[..method.len()]), None, "{method}: the method alone is undecided");
        }
        let too_long = "X".repeat(33);
        assert_eq!(classify(format!("{too_long} /x HTTP/1.1\r\n").as_bytes()), Some(Protocol::Opaque));
        assert_eq!(classify(too_long.as_bytes()), Some(Protocol::Opaque));
        assert_eq!(classify(b"GE(T / HTTP/1.1\r\n"), Some(Protocol::Opaque), "not a token");
    }

    /// Bytes the guard holds undecided are decided as they stand once the rest timeout has
    /// passed: a text protocol's word without its line end reaches the app; a started
    /// request line is refused as late HTTP. Neither waits for ever.
    #[tokio::test(start_paused = true)]
    async fn a_guard_decides_what_it_holds_after_the_rest_timeout() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(64);
        let mut guard = LateHttpGuard::new(server);
        client.write_all(b"ruok").await.unwrap();
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 16];
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ruok");
        assert!(started.elapsed() >= REST_TIMEOUT, "released early: {:?}", started.elapsed());

        let (mut client, server) = tokio::io::duplex(64);
        let mut guard = LateHttpGuard::new(server);
        client.write_all(b"GET /x").await.unwrap();
        let err = guard.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);

        // Decided before the timeout, nothing waits for it.
        let (mut client, server) = tokio::io::duplex(64);
        let mut guard = LateHttpGuard::new(server);
        client.write_all(b"hello world\n").await.unwrap();
        let started = tokio::time::Instant::now();
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], started.elapsed()), (&b"hello world\n"[..], Duration::ZERO));
    }

    #[tokio::test]
    async fn silent_client_times_out_as_opaque() {
        let (mut a, _b) = tokio::io::duplex(64);
        let d = detect(&mut a, Duration::from_millis(20)).await.unwrap();
        assert_eq!((d.protocol, d.timed_out), (Protocol::Opaque, true));
    }

    /// A client that sends `GET ` and the rest of its request line later than the detect
    /// timeout is still HTTP.
    #[tokio::test(start_paused = true)]
    async fn a_started_request_line_gets_past_the_detect_timeout() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            b.write_all(b"GET ").await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            b.write_all(b"/api/x HTTP/1.1\r\n").await.unwrap();
            std::future::pending::<()>().await;
        });
        let d = detect(&mut a, Duration::from_secs(1)).await.unwrap();
        assert_eq!((d.protocol, d.timed_out), (Protocol::Http1, false));
        assert_eq!(&d.prefix[..], b"GET /api/x HTTP/1.1\r\n");
        // The same for a slow HTTP/2 preface.
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            b.write_all(&H2_PREFACE[..4]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
            b.write_all(&H2_PREFACE[4..]).await.unwrap();
            std::future::pending::<()>().await;
        });
        let d = detect(&mut a, Duration::from_secs(1)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_request_line_is_http_after_the_longer_bound() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"GET /never-finished").await.unwrap();
        let start = tokio::time::Instant::now();
        let d = detect(&mut a, Duration::from_secs(1)).await.unwrap();
        assert_eq!((d.protocol, d.timed_out), (Protocol::Http1, false), "a started request line is HTTP");
        assert_eq!(start.elapsed(), REST_TIMEOUT);
        assert_eq!(&d.prefix[..], b"GET /never-finished");
        // What never started a request line is opaque then.
        for stalled in [&b"GET"[..], b"GET ", &H2_PREFACE[..8]] {
            let (mut a, mut b) = tokio::io::duplex(64);
            b.write_all(stalled).await.unwrap();
            let d = detect(&mut a, Duration::from_secs(1)).await.unwrap();
            assert_eq!(d.protocol, Protocol::Opaque, "{stalled:?}");
        }
        drop(b);
    }

    /// A request line longer than the sniff buffer is HTTP (the server answers 414), not
    /// opaque bytes for the app.
    #[tokio::test]
    async fn a_request_line_longer_than_the_sniff_buffer_is_http() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let line = format!("GET /api/x?q={} HTTP/1.1\r\n", "a".repeat(2 * MAX_SNIFF));
        tokio::spawn(async move { b.write_all(line.as_bytes()).await });
        let d = detect(&mut a, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http1);
        assert!(d.prefix.len() >= MAX_SNIFF);
    }

    #[tokio::test(start_paused = true)]
    async fn the_detect_timeout_still_bounds_the_first_bytes() {
        let (mut a, _b) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let d = detect(&mut a, Duration::from_secs(1)).await.unwrap();
        assert_eq!((d.protocol, d.timed_out), (Protocol::Opaque, true));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    /// Bytes there before the deadline but not yet seen by a busy event loop when its timer
    /// fired: the reader says "not yet" to the first two polls (the first wait, and the one
    /// the timer's wake-up makes), as a socket does whose readiness is still queued.
    #[tokio::test(start_paused = true)]
    async fn bytes_seen_late_by_a_busy_event_loop_still_decide() {
        struct Late {
            polls: usize,
            data: &'static [u8],
        }
        impl AsyncRead for Late {
            fn poll_read(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                self.polls += 1;
                if self.polls <= 2 {
                    return Poll::Pending;
                }
                let data = std::mem::take(&mut self.data);
                buf.put_slice(data);
                Poll::Ready(Ok(()))
            }
        }
        let mut late = Late { polls: 0, data: b"GET /x HTTP/1.1\r\n" };
        let d = detect(&mut late, Duration::from_secs(1)).await.unwrap();
        assert_eq!((d.protocol, d.timed_out), (Protocol::Http1, false));
        assert_eq!(&d.prefix[..], b"GET /x HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn bytes_arriving_in_pieces_are_kept() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            b.write_all(b"GET /x ").await.unwrap();
            b.write_all(b"HTTP/1.1\r\n").await.unwrap();
        });
        let d = detect(&mut a, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http1);
        assert_eq!(&d.prefix[..], b"GET /x HTTP/1.1\r\n");
    }
}
