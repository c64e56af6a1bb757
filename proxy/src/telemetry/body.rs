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
    /// A request body whose data bytes are added to a shared counter.
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
        let polled = this.inner.poll_frame(cx);
        if let (Some(c), Poll::Ready(Some(Ok(frame)))) = (this.counter.as_ref(), &polled)
            && let Some(data) = frame.data_ref()
        {
            c.fetch_add(data.remaining() as u64, Ordering::Relaxed);
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

/// Called once with the response body's byte count when the body ends or is dropped.
pub trait Finish: Send + Sync {
    fn finish(self: Box<Self>, response_bytes: u64);
}

pin_project! {
    /// A response body that finishes its span when it is done.
    pub struct Traced<B> {
        #[pin]
        inner: B,
        span: Option<Box<dyn Finish>>,
        bytes: u64,
    }

    impl<B> PinnedDrop for Traced<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(span) = this.span.take() {
                span.finish(*this.bytes);
            }
        }
    }
}

impl<B> Traced<B> {
    pub fn plain(inner: B) -> Self {
        Traced { inner, span: None, bytes: 0 }
    }

    pub fn with_span(inner: B, span: Box<dyn Finish>) -> Self {
        Traced { inner, span: Some(span), bytes: 0 }
    }
}

impl<B: Body> Body for Traced<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if this.span.is_none() {
            return polled;
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.remaining() as u64;
                }
            }
            Poll::Ready(_) => {
                if let Some(span) = this.span.take() {
                    span.finish(*this.bytes);
                }
            }
            Poll::Pending => {}
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

    struct Probe(Arc<Mutex<Vec<u64>>>);
    impl Finish for Probe {
        fn finish(self: Box<Self>, n: u64) {
            self.0.lock().unwrap().push(n);
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
        assert_eq!(*seen.lock().unwrap(), vec![3]);

        // Dropped before it was read: finished on drop, with what was sent so far.
        drop(Traced::with_span(Full::new(Bytes::from_static(b"abc")), Box::new(Probe(seen.clone()))));
        assert_eq!(*seen.lock().unwrap(), vec![3, 0]);
    }
}
