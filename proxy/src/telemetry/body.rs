//! HTTP body wrappers that measure a request for its span without buffering anything:
//! [`Counted`] counts the request body's bytes as they stream to the far side; [`Traced`]
//! counts the response body's bytes and finishes the span when the body ends (or is
//! dropped, when the client goes away first). With telemetry off both are a plain
//! pass-through holding `None`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// A request body whose data bytes are added to a shared counter, and whose trailers lose
    /// any `x-trellis-peer-id` the client wrote: an app or framework that merges trailer
    /// fields into its headers would take it for the verified one.
    #[derive(Debug)]
    pub struct Counted<B> {
        #[pin]
        inner: B,
        counter: Option<Arc<AtomicU64>>,
    }
}

impl<B> Counted<B> {
    pub fn plain(inner: B) -> Self {
        Counted { inner, counter: None }
    }

    pub fn with_counter(inner: B, counter: Arc<AtomicU64>) -> Self {
        Counted { inner, counter: Some(counter) }
    }
}

impl<B: Body> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let mut polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut polled {
            if let (Some(c), Some(data)) = (this.counter.as_ref(), frame.data_ref()) {
                c.fetch_add(data.remaining() as u64, Ordering::Relaxed);
            } else if let Some(trailers) = frame.trailers_mut() {
                crate::http::remove_peer_id(trailers);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Called once with the response body's byte count when the body ends or is dropped, and
/// why it ended early if it did (an error while relaying, or dropped before its end: the
/// client went away, the stream was reset, a policy change revoked it, the proxy drained).
pub trait Finish: Send + Sync {
    fn finish(self: Box<Self>, response_bytes: u64, cut: Option<String>);
}

/// What a response body dropped before its end is recorded with.
/// `label: detail`, as every span error is (the label becomes `error.type`).
pub const CUT: &str = "response_cut: the response ended before its last byte was relayed";

/// What a request dropped before its response began is recorded with.
pub const CANCELLED: &str = "request_cancelled: the request ended before its response began: the client went away, or the proxy's drain deadline passed";

pin_project! {
    /// A response body that finishes its span when it is done, and lets what was relayed of
    /// a body cut short reach the client before the error that ends it.
    pub struct Traced<B: Body> {
        #[pin]
        inner: B,
        span: Option<Box<dyn Finish>>,
        bytes: u64,
        // The body said it had nothing more (hyper then need not poll it to its end).
        ended: bool,
        // An error after some body data, held back for one poll (`poll_frame`).
        failed: Option<B::Error>,
    }

    impl<B: Body> PinnedDrop for Traced<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(span) = this.span.take() {
                span.finish(*this.bytes, (!*this.ended).then(|| CUT.to_owned()));
            }
        }
    }
}

impl<B: Body> Traced<B> {
    pub fn plain(inner: B) -> Self {
        Traced { inner, span: None, bytes: 0, ended: false, failed: None }
    }

    pub fn with_span(inner: B, span: Box<dyn Finish>) -> Self {
        let ended = inner.is_end_stream();
        Traced { inner, span: Some(span), bytes: 0, ended, failed: None }
    }
}

impl<B: Body> Body for Traced<B>
where
    B::Error: std::fmt::Display,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let polled = match this.failed.take() {
            Some(e) => Poll::Ready(Some(Err(e))),
            None => match this.inner.as_mut().poll_frame(cx) {
                // An error ends the HTTP/1.1 connection (or the HTTP/2 stream) at once, and
                // what hyper and h2 still hold unsent is dropped with it: a response cut short
                // after some of its body would reach an HTTP/1.1 client as an empty reply. One
                // `Pending` first lets them flush the head and the body so far. Not before any
                // body: then the peer's sidecar never sees the head, and answers its client 502.
                Poll::Ready(Some(Err(e))) if *this.bytes > 0 => {
                    *this.failed = Some(e);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                polled => polled,
            },
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            *this.bytes += data.remaining() as u64;
        }
        if this.span.is_none() {
            return polled;
        }
        let cut = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                // Trailers are a body's last frame, and hyper stops polling once it has them
                // (it drops the body). Some bodies do not say they ended: an HTTP/1.1 chunked
                // body (hyper's `Incoming`) still says it may go on after its trailers.
                *this.ended = frame.is_trailers() || this.inner.is_end_stream();
                return polled;
            }
            // Labelled when the error is not already (`revoked: …`): `error.type` is the label.
            Poll::Ready(Some(Err(e))) => {
                let e = e.to_string();
                Some(if e.starts_with("revoked:") { e } else { format!("response_cut: {e}") })
            }
            Poll::Ready(None) => None,
            Poll::Pending => return polled,
        };
        if let Some(span) = this.span.take() {
            span.finish(*this.bytes, cut);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use std::sync::Mutex;

    /// Each finish: the response bytes, and why the body was cut.
    type Finished = Arc<Mutex<Vec<(u64, Option<String>)>>>;
    struct Probe(Finished);
    impl Finish for Probe {
        fn finish(self: Box<Self>, n: u64, cut: Option<String>) {
            self.0.lock().unwrap().push((n, cut));
        }
    }

    #[tokio::test]
    async fn counts_and_finishes_once() {
        let counter = Arc::new(AtomicU64::new(0));
        let body = Counted::with_counter(Full::new(Bytes::from_static(b"hello")), counter.clone());
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 5);
        assert_eq!(counter.load(Ordering::Relaxed), 5);

        let seen = Arc::new(Mutex::new(Vec::new()));
        let body = Traced::with_span(Full::new(Bytes::from_static(b"abc")), Box::new(Probe(seen.clone())));
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 3);
        assert_eq!(*seen.lock().unwrap(), vec![(3, None)]);

        // Dropped before it was read: finished on drop, with what was sent so far, as cut.
        drop(Traced::with_span(Full::new(Bytes::from_static(b"abc")), Box::new(Probe(seen.clone()))));
        assert_eq!(seen.lock().unwrap()[1], (0, Some(CUT.to_owned())));
        // An empty body hyper never polls, dropped: complete.
        drop(Traced::with_span(Full::new(Bytes::new()), Box::new(Probe(seen.clone()))));
        assert_eq!(seen.lock().unwrap()[2], (0, None));
    }

    /// A body of the given frames, last first.
    struct NeverSaysEnd(Vec<Frame<Bytes>>);

    impl Body for NeverSaysEnd {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop().map(Ok))
        }
        // `Body::is_end_stream`'s default: false, as hyper's chunked `Incoming` says.
    }

    /// Trailers end a body even if it does not say so (an HTTP/1.1 chunked body does not), and
    /// hyper drops it right after them: complete, not cut.
    #[tokio::test]
    async fn trailers_end_the_body_even_when_it_does_not_say_so() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-t", http::HeaderValue::from_static("yes"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let frames = vec![Frame::trailers(trailers), Frame::data(Bytes::from_static(b"body\n"))];
        let mut body = Box::pin(Traced::with_span(NeverSaysEnd(frames), Box::new(Probe(seen.clone()))));
        // As hyper relays a body: frames until the trailers, then the body is dropped.
        let data = body.frame().await.unwrap().unwrap();
        assert_eq!(data.data_ref().map(|d| d.len()), Some(5));
        assert!(body.frame().await.unwrap().unwrap().is_trailers());
        assert!(seen.lock().unwrap().is_empty(), "finished when dropped, as hyper does");
        drop(body);
        assert_eq!(*seen.lock().unwrap(), vec![(5, None)]);
    }

    /// A body that fails midway (a revoked request, a peer's reset) finishes its span with
    /// the error, after the bytes that did go through.
    #[tokio::test]
    async fn a_failing_body_finishes_its_span_with_the_error() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        struct Failing(Vec<Result<Frame<Bytes>, String>>);
        impl Body for Failing {
            type Data = Bytes;
            type Error = String;
            fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, String>>> {
                Poll::Ready(self.0.pop())
            }
        }
        let frames = vec![Err("stream reset".to_owned()), Ok(Frame::data(Bytes::from_static(b"abcd")))];
        let body = Traced::with_span(Failing(frames), Box::new(Probe(seen.clone())));
        assert!(body.collect().await.is_err());
        assert_eq!(*seen.lock().unwrap(), vec![(4, Some("response_cut: stream reset".to_owned()))]);
    }

    /// A client's `x-trellis-peer-id` in a request's trailers (any spelling) never reaches the
    /// app; other trailers do, and the data is counted.
    #[tokio::test]
    async fn the_peer_header_is_taken_out_of_request_trailers() {
        let mut trailers = http::HeaderMap::new();
        for name in ["x-trellis-peer-id", "x_trellis_peer_id", "x-ok"] {
            trailers.insert(name, http::HeaderValue::from_static("spiffe://cluster.local/ns/prod/sa/admin"));
        }
        let frames = vec![Frame::trailers(trailers), Frame::data(Bytes::from_static(b"hello"))];
        let counter = Arc::new(AtomicU64::new(0));
        let mut body = Box::pin(Counted::with_counter(NeverSaysEnd(frames), counter.clone()));
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            seen.push(frame.unwrap());
        }
        let names: Vec<&str> = seen[1].trailers_ref().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-ok"]);
        assert_eq!(counter.load(Ordering::Relaxed), 5);
    }
}
