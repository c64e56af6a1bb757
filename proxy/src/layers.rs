//! The tower layers of the HTTP path. Each connection builds its stack once:
//!
//! - inbound:  `Trace → Metrics → Policy → forward to app`
//! - outbound: `Trace → Metrics → forward to peer`
//!
//! [`PolicyLayer`] decides every request and either answers 403 itself or hands the
//! forwarding service the request with its [`Permit`] ([`Permitted`]); [`MetricsLayer`] times
//! every request and counts it by decision; [`TraceLayer`] continues or starts the request's
//! trace, passes its `traceparent` on, and records the request's span when the response body
//! ends. Each layer's future is a named type rather than a box: these run for every request.
//!
//! How a request was decided travels back up in the response's extensions ([`Decided`]):
//! set by the policy layer inbound, and by the forwarding service outbound from the
//! peer's answer.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::authz::{Denial, Permit};
use crate::http::{AUDIT, ERROR, ProxyFailure, ReqBody, RespBody, TracedBody, forbidden};
use crate::inbound::ConnCtx;
use crate::metrics::DirectionLabels;
use crate::state::ProxyState;
use crate::telemetry::body::{CANCELLED, Counted, Finish, Traced};
use crate::telemetry::context::trace_state;
use crate::telemetry::{FlowRecord, HttpConnSpan, HttpFacts, RecordPath, SpanIds, Started, TraceParent, Verdict};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How a request was decided, left in the response's extensions for the outer layers.
#[derive(Debug, Clone)]
pub struct Decided(pub Verdict);

/// Starts each request's span (continuing its `traceparent`), passes the span on as the
/// forwarded request's `traceparent`, and finishes it when the response body ends.
#[derive(Clone)]
pub struct TraceLayer {
    /// The connection's span, which the requests' spans share facts with and are counted
    /// in; `None` when telemetry is off: the layer is then a pass-through.
    conn: Option<Arc<HttpConnSpan>>,
}

impl TraceLayer {
    pub fn new(conn: Option<Arc<HttpConnSpan>>) -> Self {
        TraceLayer { conn }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = TraceService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TraceService { inner, conn: self.conn.clone() }
    }
}

#[derive(Clone)]
pub struct TraceService<S> {
    inner: S,
    conn: Option<Arc<HttpConnSpan>>,
}

impl<S> Service<Request<Incoming>> for TraceService<S>
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = std::convert::Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<TracedBody>;
    type Error = std::convert::Infallible;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let Some(conn) = &self.conn else {
            return TraceFuture { inner: self.inner.call(req.map(Counted::plain)), span: None };
        };
        let ids = conn.telemetry().new_span(TraceParent::from_headers(req.headers()));
        ids.inject(req.headers_mut());
        // Bodiless requests (most GETs) need no counter.
        let request_bytes = (!http_body::Body::is_end_stream(req.body())).then(|| Arc::new(AtomicU64::new(0)));
        let span = RequestSpan {
            conn: conn.clone(),
            ids,
            started: Started::now(),
            http: HttpFacts {
                method: req.method().clone(),
                path: RecordPath::new(req.uri().path()),
                status: 0,
                version: if req.version() == Version::HTTP_2 { "2" } else { "1.1" },
                trace_state: ids.parent.and_then(|_| trace_state(req.headers())),
            },
            request_bytes: request_bytes.clone(),
            verdict: Verdict::Forwarded,
            error: None,
        };
        let inner = self.inner.call(req.map(|b| match request_bytes {
            Some(counter) => Counted::with_counter(b, counter),
            None => Counted::plain(b),
        }));
        TraceFuture { inner, span: Some(Box::new(span)) }
    }
}

pin_project! {
    /// The inner service's response, with the request's span (if telemetry is on) attached
    /// to its body. A named future, not a boxed one: one allocation fewer per request.
    pub struct TraceFuture<F> {
        #[pin]
        inner: F,
        span: Option<Box<RequestSpan>>,
    }

    impl<F> PinnedDrop for TraceFuture<F> {
        // Dropped before a response: the client went away or the drain deadline cut the
        // connection. Every request gets its span, this one too.
        fn drop(this: Pin<&mut Self>) {
            if let Some(span) = this.project().span.take() {
                span.finish(0, Some(CANCELLED.to_owned()));
            }
        }
    }
}

impl<F> Future for TraceFuture<F>
where
    F: Future<Output = Result<Response<RespBody>, std::convert::Infallible>>,
{
    type Output = Result<Response<TracedBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        Poll::Ready(Ok(match this.span.take() {
            Some(span) => span.attach(resp),
            None => resp.map(Traced::plain),
        }))
    }
}

/// A request's span between its start and the end of its response body.
pub struct RequestSpan {
    conn: Arc<HttpConnSpan>,
    ids: SpanIds,
    started: Started,
    http: HttpFacts,
    request_bytes: Option<Arc<AtomicU64>>,
    verdict: Verdict,
    error: Option<Cow<'static, str>>,
}

impl RequestSpan {
    /// Reads the outcome off the response head and rides along with its body.
    fn attach(mut self: Box<Self>, resp: Response<RespBody>) -> Response<TracedBody> {
        self.http.status = resp.status().as_u16();
        if let Some(d) = resp.extensions().get::<Decided>() {
            self.verdict = d.0.clone();
        }
        // This proxy's own failure with its cause; else a failure the peer's sidecar reported,
        // of which the header tells the class.
        self.error = match resp.extensions().get::<ProxyFailure>() {
            Some(f) => Some(Cow::Owned(f.0.clone())),
            None => resp.headers().get(ERROR).map(|v| Cow::Owned(String::from_utf8_lossy(v.as_bytes()).into_owned())),
        };
        resp.map(|b| Traced::with_span(b, self))
    }
}

impl Finish for RequestSpan {
    fn finish(self: Box<Self>, response_bytes: u64, cut: Option<String>) {
        let mut s = *self;
        if s.error.is_none() {
            s.error = cut.map(Cow::Owned);
        }
        s.conn.request_done(s.verdict.is_denied());
        let record = FlowRecord {
            ids: s.ids,
            facts: s.conn.facts().clone(),
            protocol: if s.http.version == "2" { "http2" } else { "http1" },
            http: Some(s.http),
            started: s.started.at,
            duration: s.started.mono.elapsed(),
            verdict: s.verdict,
            bytes_sent: s.request_bytes.map_or(0, |c| c.load(Ordering::Relaxed)),
            bytes_received: response_bytes,
            error: s.error,
        };
        s.conn.telemetry().finish(record);
    }
}

/// Times requests and counts them by direction, decision and protocol.
#[derive(Clone)]
pub struct MetricsLayer {
    pub state: Arc<ProxyState>,
    pub direction: &'static str,
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService { inner, state: self.state.clone(), direction: self.direction }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    state: Arc<ProxyState>,
    direction: &'static str,
}

impl<S> Service<Request<ReqBody>> for MetricsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = std::convert::Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<RespBody>;
    type Error = std::convert::Infallible;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let start = Instant::now();
        let protocol = if req.version() == http::Version::HTTP_2 { "http2" } else { "http1" };
        MetricsFuture {
            inner: self.inner.call(req),
            state: self.state.clone(),
            direction: self.direction,
            protocol,
            start,
            counted: false,
        }
    }
}

pin_project! {
    /// Counts and times the request when the inner service answers — or when it is dropped
    /// unanswered (its client went away, or the drain deadline cut it), as its span records
    /// it (`request_cancelled`), so metrics and traces count the same requests.
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        state: Arc<ProxyState>,
        direction: &'static str,
        protocol: &'static str,
        start: Instant,
        counted: bool,
    }

    impl<F> PinnedDrop for MetricsFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.counted {
                // Whatever was decided, its span says `allow` with the error: no answer came.
                count_request(this.state, this.direction, "allow", this.protocol, this.start);
            }
        }
    }
}

fn count_request(
    state: &ProxyState,
    direction: &'static str,
    decision: &'static str,
    protocol: &'static str,
    start: &Instant,
) {
    let metrics = &state.metrics;
    metrics.flow(direction, decision, protocol);
    let labels = DirectionLabels { direction };
    metrics.request_duration.get_or_create(&labels).observe(start.elapsed().as_secs_f64());
}

impl<F> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Response<RespBody>, std::convert::Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let decision = resp.extensions().get::<Decided>().map(|d| d.0.label()).unwrap_or("allow");
        *this.counted = true;
        count_request(this.state, this.direction, decision, this.protocol, this.start);
        Poll::Ready(Ok(resp))
    }
}

/// Authorizes each inbound request with its method and normalized path.
#[derive(Clone)]
pub struct PolicyLayer {
    pub ctx: Arc<ConnCtx>,
}

impl<S> Layer<S> for PolicyLayer {
    type Service = PolicyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PolicyService { inner, ctx: self.ctx.clone() }
    }
}

#[derive(Clone)]
pub struct PolicyService<S> {
    inner: S,
    ctx: Arc<ConnCtx>,
}

/// A request the policy allowed, with its permit: what the forwarding service takes, so
/// nothing unauthorized can reach it. `tracked` keeps it revocable while it is in flight.
pub struct Permitted {
    pub permit: Permit,
    pub request: Request<ReqBody>,
    pub tracked: crate::conns::Tracked,
}

impl<S> Service<Request<ReqBody>> for PolicyService<S>
where
    S: Service<Permitted, Response = Response<RespBody>, Error = std::convert::Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<RespBody>;
    type Error = std::convert::Infallible;
    type Future = PolicyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        match self.ctx.authorize(&request) {
            Ok((permit, tracked)) => {
                let decided = Some(Decided(permit.verdict()));
                let audit = audit_header(&permit);
                PolicyFuture::Allowed { inner: self.inner.call(Permitted { permit, request, tracked }), decided, audit }
            }
            Err(denial) => {
                let mut resp = deny_response(&denial);
                resp.extensions_mut().insert(Decided(denial.verdict()));
                PolicyFuture::Denied { resp: Some(resp) }
            }
        }
    }
}

pin_project! {
    /// The forwarded request's response marked with the decision, or the denial.
    #[project = PolicyProj]
    pub enum PolicyFuture<F> {
        Allowed { #[pin] inner: F, decided: Option<Decided>, audit: Option<HeaderValue> },
        Denied { resp: Option<Response<RespBody>> },
    }
}

impl<F> Future for PolicyFuture<F>
where
    F: Future<Output = Result<Response<RespBody>, std::convert::Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            PolicyProj::Allowed { inner, decided, audit } => {
                let mut resp = std::task::ready!(inner.poll(cx))?;
                if let Some(d) = decided.take() {
                    resp.extensions_mut().insert(d);
                }
                if let Some(a) = audit.take() {
                    resp.headers_mut().insert(AUDIT, a);
                }
                Poll::Ready(Ok(resp))
            }
            // Polled again after it completed (a caller's bug): never ready again, no panic.
            PolicyProj::Denied { resp } => match resp.take() {
                Some(resp) => Poll::Ready(Ok(resp)),
                None => Poll::Pending,
            },
        }
    }
}

/// `x-trellis-audit` for a request allowed now that an audit-mode policy would deny, so
/// the calling sidecar can label its own span and metrics `audit-deny`.
fn audit_header(p: &Permit) -> Option<HeaderValue> {
    let audit = p.decision().audit.as_ref().filter(|a| a.action == trellis_policy::Action::Deny)?;
    HeaderValue::from_str(&audit.reason.header_value()).ok()
}

fn deny_response(denial: &Denial) -> Response<RespBody> {
    tracing::info!(reason = %denial, "request denied");
    forbidden(&denial.header_value(), &denial.to_string())
}
