//! Clients from the inbound sidecar to its local app: pooled HTTP/1.1, and HTTP/2 with prior
//! knowledge for apps whose clients speak it (gRPC servers).
//!
//! A client dials one fixed app address whatever the request's URI says, so the URI can
//! carry the authority the caller used (`Host` for HTTP/1.1, `:authority` for HTTP/2) all
//! the way to the app — an HTTP/2 server must not see a `Host` that disagrees with
//! `:authority` (RFC 9113 §8.3.1).
//!
//! An HTTP/2 app may refuse a stream it will not process (`REFUSED_STREAM`, or a GOAWAY
//! racing requests on the pooled connection); [`AppClient::send_h2`] sends idempotent,
//! bodiless requests once more rather than answering the caller 502.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::Body;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::http::ReqBody;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Dials `target` for every URI.
#[derive(Clone, Debug)]
pub struct FixedConnector {
    target: Uri,
    inner: HttpConnector,
}

impl tower::Service<Uri> for FixedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = <HttpConnector as tower::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, _dst: Uri) -> Self::Future {
        Box::pin(self.inner.call(self.target.clone()))
    }
}

/// A request to an HTTP/2 app: the caller's body, or none when a refused request goes again.
pub type H2Body = Either<ReqBody, Empty<Bytes>>;

/// The pair of clients for one app address.
#[derive(Clone, Debug)]
pub struct AppClient {
    pub h1: Client<FixedConnector, ReqBody>,
    h2: Client<FixedConnector, H2Body>,
}

impl AppClient {
    fn new(app: SocketAddr) -> Self {
        let mut inner = HttpConnector::new();
        inner.set_nodelay(true);
        inner.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let target = Uri::try_from(format!("http://{app}")).unwrap_or_else(|_| Uri::from_static("http://127.0.0.1"));
        let conn = FixedConnector { target, inner };
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(conn.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .http2_max_header_list_size(crate::serve::MAX_HEADER_LIST)
            .build(conn);
        AppClient { h1, h2 }
    }

    /// Sends a request to an HTTP/2 app over the pooled connection. An idempotent request
    /// without a body that the app did not take — its stream refused, or cut off by a GOAWAY
    /// racing it (nginx sends one every `keepalive_requests`) — is sent once more, as RFC
    /// 9110 §9.2.2 allows a proxy to; anything else fails as it is.
    pub async fn send_h2(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, legacy::Error> {
        let replay = (req.method().is_idempotent() && req.body().is_end_stream()).then(|| bodiless_copy(&req));
        match (self.h2.request(req.map(Either::Left)).await, replay) {
            (Err(e), Some(replay)) if !e.is_connect() => {
                tracing::debug!(error = %e, "HTTP/2 app did not take the request; sending it again");
                self.h2.request(replay).await
            }
            (result, _) => result,
        }
    }
}

fn bodiless_copy<B>(req: &Request<B>) -> Request<H2Body> {
    let mut copy = Request::new(Either::Right(Empty::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
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
