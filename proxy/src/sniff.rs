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

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

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
/// its request line (or preface) before it is treated as opaque.
pub const REST_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads until the protocol is known, `MAX_SNIFF` bytes or EOF; gives up (opaque) when
/// nothing came within `timeout`, or when what came is still undecided after
/// [`REST_TIMEOUT`] (or `timeout`, if longer). `timed_out` means no bytes came at all.
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
            return Ok(Detected { protocol: Protocol::Opaque, prefix: buf.freeze(), timed_out: false });
        }
        // `classify` said "undecided", so anything read so far is a possible HTTP prefix.
        let deadline = if buf.is_empty() { first_bytes } else { rest };
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return Ok(Detected { protocol: Protocol::Opaque, prefix: buf.freeze(), timed_out: false }),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let timed_out = buf.is_empty();
                if !timed_out {
                    tracing::debug!(bytes = buf.len(), "request line still incomplete; treating the stream as opaque");
                }
                return Ok(Detected { protocol: Protocol::Opaque, prefix: buf.freeze(), timed_out });
            }
        }
    }
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
    // HTTP/1: METHOD SP target SP HTTP/1.x CRLF; decide on the method token and, once the
    // line is complete, its version.
    let method_end = b.iter().position(|&c| c == b' ');
    let token_ok = |t: &[u8]| !t.is_empty() && t.len() <= 16 && t.iter().all(|c| c.is_ascii_uppercase() || *c == b'-');
    match method_end {
        None if b.len() > 17 || !token_ok(b) => Some(Protocol::Opaque),
        None => None,
        Some(i) if !token_ok(&b[..i]) => Some(Protocol::Opaque),
        Some(_) => match b.iter().position(|&c| c == b'\n') {
            Some(eol) => {
                let line = b[..eol].strip_suffix(b"\r").unwrap_or(&b[..eol]);
                if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
                    Some(Protocol::Http1)
                } else {
                    Some(Protocol::Opaque)
                }
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
    async fn a_stalled_request_line_is_opaque_after_the_longer_bound() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"GET /never-finished").await.unwrap();
        let start = tokio::time::Instant::now();
        let d = detect(&mut a, Duration::from_secs(1)).await.unwrap();
        assert_eq!((d.protocol, d.timed_out), (Protocol::Opaque, false), "bytes came: not a detect timeout");
        assert_eq!(start.elapsed(), REST_TIMEOUT);
        assert_eq!(&d.prefix[..], b"GET /never-finished");
        drop(b);
    }

    #[tokio::test(start_paused = true)]
    async fn the_detect_timeout_still_bounds_the_first_bytes() {
        let (mut a, _b) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let d = detect(&mut a, Duration::from_secs(1)).await.unwrap();
        assert_eq!((d.protocol, d.timed_out), (Protocol::Opaque, true));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
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
