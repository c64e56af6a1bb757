//! The tower layers of the HTTP path. Each connection builds its stack once:
//!
//! - inbound:  `Trace → Metrics → Policy → forward to app`
//! - outbound: `Trace → Metrics → forward to peer`
//!
//! [`PolicyLayer`] decides every request and either answers 403 itself or attaches the
//! [`Permit`] the forwarding service requires; [`MetricsLayer`] times every request and
//! counts it by decision; [`TraceLayer`] continues or starts the request's trace, passes its
//! `traceparent` on, and records the request's span when the response body ends.
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
use tower::{Layer, Service};

use crate::authz::{Denial, Permit};
use crate::http::{AUDIT, ERROR, ReqBody, RespBody, TracedBody, forbidden};
use crate::inbound::ConnCtx;
use crate::metrics::DirectionLabels;
use crate::state::ProxyState;
use crate::telemetry::body::{Counted, Finish, Traced};
use crate::telemetry::{Active, ConnFacts, FlowRecord, HttpFacts, RecordPath, SpanIds, Started, TraceParent, Verdict};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How a request was decided, left in the response's extensions for the outer layers.
#[derive(Debug, Clone)]
pub struct Decided(pub Verdict);

/// Starts each request's span (continuing its `traceparent`), passes the span on as the
/// forwarded request's `traceparent`, and finishes it when the response body ends.
#[derive(Clone)]
pub struct TraceLayer {
    state: Arc<ProxyState>,
    /// `None` when telemetry is off: the layer is then a pass-through.
    facts: Option<Arc<ConnFacts>>,
}

impl TraceLayer {
    /// `facts` is only called when telemetry is on.
    pub fn new(state: &Arc<ProxyState>, facts: impl FnOnce() -> Arc<ConnFacts>) -> Self {
        let facts = state.telemetry.is_on().then(facts);
        TraceLayer { state: state.clone(), facts }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = TraceService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TraceService { inner, state: self.state.clone(), facts: self.facts.clone() }
    }
}

#[derive(Clone)]
pub struct TraceService<S> {
    inner: S,
    state: Arc<ProxyState>,
    facts: Option<Arc<ConnFacts>>,
}

impl<S> Service<Request<Incoming>> for TraceService<S>
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = std::convert::Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<TracedBody>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Response<TracedBody>, std::convert::Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let (Some(tel), Some(facts)) = (self.state.telemetry.active(), &self.facts) else {
            let fut = self.inner.call(req.map(Counted::plain));
            return Box::pin(async move { Ok(fut.await?.map(Traced::plain)) });
        };
        let ids = tel.new_span(TraceParent::from_headers(req.headers()));
        ids.inject(req.headers_mut());
        // Bodiless requests (most GETs) need no counter.
        let request_bytes = (!http_body::Body::is_end_stream(req.body())).then(|| Arc::new(AtomicU64::new(0)));
        let span = RequestSpan {
            tel: tel.clone(),
            facts: facts.clone(),
            ids,
            started: Started::now(),
            http: HttpFacts {
                method: req.method().clone(),
                path: RecordPath::new(req.uri().path()),
                status: 0,
                version: if req.version() == Version::HTTP_2 { "2" } else { "1.1" },
            },
            request_bytes: request_bytes.clone(),
            verdict: Verdict::Forwarded,
            error: None,
        };
        let fut = self.inner.call(req.map(|b| match request_bytes {
            Some(counter) => Counted::with_counter(b, counter),
            None => Counted::plain(b),
        }));
        Box::pin(async move { Ok(span.attach(fut.await?)) })
    }
}

/// A request's span between its start and the end of its response body.
struct RequestSpan {
    tel: Arc<Active>,
    facts: Arc<ConnFacts>,
    ids: SpanIds,
    started: Started,
    http: HttpFacts,
    request_bytes: Option<Arc<AtomicU64>>,
    verdict: Verdict,
    error: Option<Cow<'static, str>>,
}

impl RequestSpan {
    /// Reads the outcome off the response head and rides along with its body.
    fn attach(mut self, resp: Response<RespBody>) -> Response<TracedBody> {
        self.http.status = resp.status().as_u16();
        if let Some(d) = resp.extensions().get::<Decided>() {
            self.verdict = d.0.clone();
        }
        self.error = resp.headers().get(ERROR).map(|v| Cow::Owned(String::from_utf8_lossy(v.as_bytes()).into_owned()));
        resp.map(|b| Traced::with_span(b, Box::new(self)))
    }
}

impl Finish for RequestSpan {
    fn finish(self: Box<Self>, response_bytes: u64) {
        let s = *self;
        let record = FlowRecord {
            ids: s.ids,
            facts: s.facts,
            protocol: if s.http.version == "2" { "http2" } else { "http1" },
            http: Some(s.http),
            started: s.started.at,
            duration: s.started.mono.elapsed(),
            verdict: s.verdict,
            bytes_sent: s.request_bytes.map_or(0, |c| c.load(Ordering::Relaxed)),
            bytes_received: response_bytes,
            error: s.error,
        };
        s.tel.finish(record);
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
    type Future = BoxFuture<Result<Response<RespBody>, std::convert::Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let start = Instant::now();
        let protocol = if req.version() == http::Version::HTTP_2 { "http2" } else { "http1" };
        let fut = self.inner.call(req);
        let (state, direction) = (self.state.clone(), self.direction);
        Box::pin(async move {
            let resp = fut.await?;
            let decision = resp.extensions().get::<Decided>().map(|d| d.0.label()).unwrap_or("allow");
            state.metrics.flow(direction, decision, protocol);
            state
                .metrics
                .request_duration
                .get_or_create(&DirectionLabels { direction })
                .observe(start.elapsed().as_secs_f64());
            Ok(resp)
        })
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

impl<S> Service<Request<ReqBody>> for PolicyService<S>
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = std::convert::Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<RespBody>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Response<RespBody>, std::convert::Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match self.ctx.authorize(&req) {
            Ok(permit) => {
                let decided = Decided(permit.verdict());
                let audit = audit_header(&permit);
                req.extensions_mut().insert(Arc::new(PermitSlot::new(permit)));
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let mut resp = fut.await?;
                    resp.extensions_mut().insert(decided);
                    if let Some(a) = audit {
                        resp.headers_mut().insert(AUDIT, a);
                    }
                    Ok(resp)
                })
            }
            Err(denial) => {
                let mut resp = deny_response(&denial);
                resp.extensions_mut().insert(Decided(denial.verdict()));
                Box::pin(async move { Ok(resp) })
            }
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

/// Carries the permit from the policy layer to the forwarding service through the
/// request's extensions (which must be `Clone`), to be taken exactly once.
#[derive(Debug)]
pub struct PermitSlot(std::sync::Mutex<Option<Permit>>);

impl PermitSlot {
    fn new(p: Permit) -> Self {
        PermitSlot(std::sync::Mutex::new(Some(p)))
    }

    /// Takes the permit out of a request; `None` means the request was never authorized.
    pub fn take<B>(req: &Request<B>) -> Option<Permit> {
        req.extensions().get::<Arc<PermitSlot>>().and_then(|s| s.0.lock().ok()?.take())
    }
}
