//! An HTTP connection's own span (docs/telemetry.md: one span per connection *and* one per
//! request). Opaque TCP connections get theirs from `inbound`/`outbound` when the tunnel
//! closes; an HTTP connection is served by hyper, which keeps its stream until the last
//! request (or an upgraded WebSocket) is done, so its span is recorded when the last holder
//! of its [`HttpConnSpan`] lets go: the [`Metered`] stream hyper owns, and the spans of
//! requests whose response bodies are still streaming.
//!
//! Where it sits in the flow: `inbound::http_stage` and `outbound::mesh_http` start one
//! per connection (when telemetry is on), wrap the stream in [`Metered`] to count the bytes
//! both ways, and give it to the `TraceLayer`, which counts each finished request and its
//! decision.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Active, ConnFacts, FlowRecord, Started, Telemetry, Verdict};

/// One HTTP connection's span, recorded when dropped.
#[derive(Debug)]
pub struct HttpConnSpan {
    tel: Arc<Active>,
    facts: Arc<ConnFacts>,
    started: Started,
    /// `http1` or `http2`.
    protocol: &'static str,
    /// Client → server bytes (what this side read), HTTP framing included.
    sent: AtomicU64,
    /// Server → client bytes (what this side wrote).
    received: AtomicU64,
    requests: AtomicU64,
    denied: AtomicU64,
    /// What ended the connection when it did not simply close (a revoked WebSocket).
    ended_by: OnceLock<&'static str>,
}

impl HttpConnSpan {
    /// `Some` when telemetry is on; `facts` is only called then.
    pub fn start(
        tel: &Telemetry,
        facts: impl FnOnce() -> Arc<ConnFacts>,
        started: Started,
        protocol: &'static str,
    ) -> Option<Arc<HttpConnSpan>> {
        let tel = tel.active()?.clone();
        Some(Arc::new(HttpConnSpan {
            tel,
            facts: facts(),
            started,
            protocol,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            ended_by: OnceLock::new(),
        }))
    }

    pub fn facts(&self) -> &Arc<ConnFacts> {
        &self.facts
    }

    pub fn telemetry(&self) -> &Arc<Active> {
        &self.tel
    }

    /// Records what ended the connection (`label: detail`, the label becoming `error.type`);
    /// the first cause set is kept.
    pub fn ended_by(&self, error: &'static str) {
        let _ = self.ended_by.set(error);
    }

    /// Counts one finished request; `denied` when it was refused (here or by the peer).
    pub fn request_done(&self, denied: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if denied {
            self.denied.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for HttpConnSpan {
    fn drop(&mut self) {
        let verdict = Verdict::HttpConnection { requests: *self.requests.get_mut(), denied: *self.denied.get_mut() };
        self.tel.finish(FlowRecord {
            ids: self.tel.new_span(None),
            facts: self.facts.clone(),
            protocol: self.protocol,
            http: None,
            started: self.started.at,
            duration: self.started.mono.elapsed(),
            verdict,
            bytes_sent: *self.sent.get_mut(),
            bytes_received: *self.received.get_mut(),
            error: self.ended_by.get().map(|e| Cow::Borrowed(*e)),
        });
    }
}

pin_project! {
    /// A stream that adds what passes through it to its connection's span (a pass-through
    /// when telemetry is off).
    #[derive(Debug)]
    pub struct Metered<T> {
        #[pin]
        inner: T,
        span: Option<Arc<HttpConnSpan>>,
    }
}

impl<T> Metered<T> {
    pub fn new(inner: T, span: Option<Arc<HttpConnSpan>>) -> Self {
        Metered { inner, span }
    }
}

impl<T: AsyncRead> AsyncRead for Metered<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if let Some(span) = this.span {
            span.sent.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite> Metered<T> {
    fn count(span: &Option<Arc<HttpConnSpan>>, polled: &Poll<io::Result<usize>>) {
        if let (Some(span), Poll::Ready(Ok(n))) = (span, polled) {
            span.received.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for Metered<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        Self::count(this.span, &polled);
        polled
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        Self::count(this.span, &polled);
        polled
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::telemetry::{Direction, TelemetryConfig};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_span_counts_bytes_and_requests_and_is_recorded_when_the_last_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spans.jsonl");
        let config = TelemetryConfig { trace_file: Some(path.clone()), ..Default::default() };
        let tel = Telemetry::start(&config, &Metrics::new()).unwrap();
        let facts = || {
            Arc::new(ConnFacts {
                direction: Direction::Inbound,
                peer: "127.0.0.1:4000".parse().unwrap(),
                client: None,
                server_port: 8080,
                source: None,
                destination: None,
            })
        };
        let span = HttpConnSpan::start(&tel, facts, Started::now(), "http1").unwrap();
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = Metered::new(near, Some(span.clone()));
        far.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = [0u8; 18];
        io.read_exact(&mut got).await.unwrap();
        io.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        span.request_done(false);
        span.request_done(true);
        drop(io);
        assert!(std::fs::read_to_string(&path).unwrap_or_default().is_empty(), "recorded while still held");
        drop(span);
        tel.shutdown(Duration::from_secs(5)).await;
        let text = std::fs::read_to_string(&path).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["name"], "inbound connection");
        let attrs = &line["attributes"];
        assert_eq!(attrs["trellis.protocol"], "http1");
        assert_eq!(attrs["trellis.decision"], "allow");
        assert_eq!(attrs["trellis.bytes.sent"], 18);
        assert_eq!(attrs["trellis.bytes.received"], 19);
        assert_eq!(attrs["trellis.http.requests"], 2);
        assert_eq!(attrs["trellis.http.requests.denied"], 1);
    }

    #[test]
    fn off_means_no_span() {
        let tel = Telemetry::start(&TelemetryConfig::default(), &Metrics::new()).unwrap();
        assert!(HttpConnSpan::start(&tel, || unreachable!(), Started::now(), "http2").is_none());
    }
}
