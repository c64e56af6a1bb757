//! The tower layers of the HTTP path. Each connection builds its stack once:
//!
//! - inbound:  `Metrics → Policy → forward to app`
//! - outbound: `Metrics → forward to peer`
//!
//! [`PolicyLayer`] decides every request and either answers 403 itself or attaches the
//! [`Permit`] the forwarding service requires; [`MetricsLayer`] times every request and
//! counts it by decision.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use tower::{Layer, Service};

use crate::authz::{Denial, Permit};
use crate::http::{RespBody, forbidden};
use crate::inbound::ConnCtx;
use crate::metrics::DirectionLabels;
use crate::state::ProxyState;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How a request was decided, left in the response's extensions for the outer layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decided(pub &'static str);

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

impl<S> Service<Request<Incoming>> for MetricsService<S>
where
    S: Service<Request<Incoming>, Response = Response<RespBody>, Error = std::convert::Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<RespBody>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Response<RespBody>, std::convert::Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let start = Instant::now();
        let protocol = if req.version() == http::Version::HTTP_2 { "http2" } else { "http1" };
        let fut = self.inner.call(req);
        let (state, direction) = (self.state.clone(), self.direction);
        Box::pin(async move {
            let resp = fut.await?;
            let decision = resp.extensions().get::<Decided>().map(|d| d.0).unwrap_or("allow");
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

impl<S> Service<Request<Incoming>> for PolicyService<S>
where
    S: Service<Request<Incoming>, Response = Response<RespBody>, Error = std::convert::Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<RespBody>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Response<RespBody>, std::convert::Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        match self.ctx.authorize(&req) {
            Ok(permit) => {
                let decided = Decided(permit.decision().label());
                req.extensions_mut().insert(Arc::new(PermitSlot::new(permit)));
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let mut resp = fut.await?;
                    resp.extensions_mut().insert(decided);
                    Ok(resp)
                })
            }
            Err(denial) => {
                let mut resp = deny_response(&denial);
                resp.extensions_mut().insert(Decided("deny"));
                Box::pin(async move { Ok(resp) })
            }
        }
    }
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
