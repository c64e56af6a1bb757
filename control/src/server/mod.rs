//! The control plane's HTTPS server: TLS accept loop, routing, and the helpers every
//! handler shares (admin-token and SVID authentication, JSON responses; bodies in `body.rs`).
//!
//! Flow of one request: accept → TLS (the control plane's serving certificate: its SPIFFE ID
//! and the names host-name-checking clients need, `run.rs`; a client certificate
//! is requested but checked later, see `trellis_identity::verify::DeferredClientVerifier`)
//! → route → authenticate (admin token or SVID, per route) → handler → JSON response.
//! Handlers live in `svid.rs` (bootstrap, renew), `watch.rs` (the push stream) and
//! `admin.rs` (tokens, policies, check, workloads, audit).
//!
//! HTTP conformance (RFC 9110, and `docs/api/openapi.yaml` as the contract): a method a
//! path does not document gets `405` with `Allow`; an admin `401` carries
//! `WWW-Authenticate: Bearer`, and the `Bearer` scheme is matched case-insensitively.

mod admin;
pub use admin::MAX_TOKEN_TTL;
mod body;
pub use body::{read_body, read_json};
mod svid;
mod watch;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use trellis_identity::pki_types::{CertificateDer, UnixTime};
use trellis_identity::verify::SpiffeClientVerifier;
use trellis_identity::{CertificateAuthority, SpiffeId, TrustDomain, VerifyError};

use crate::api::{ErrorBody, paths};
use crate::state::Shared;
use crate::store::Actor;

pub type Body = BoxBody<Bytes, Infallible>;

/// Largest request body accepted, except policy applies.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest policy apply accepted: the policy crate's input limit, so that a file `trellis
/// policy validate` accepts is one the control plane takes.
pub const MAX_POLICY_BODY: usize = trellis_policy::limits::MAX_INPUT_BYTES;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a request handler may need.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub ca: CertificateAuthority,
    pub trust_domain: TrustDomain,
    pub svid_ttl: Duration,
    pub admin_token: String,
    /// Checks client SVIDs after the handshake (see module docs).
    pub svid_checker: SpiffeClientVerifier,
    pub hooks: Hooks,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

/// Verifies a Kubernetes projected ServiceAccount token; resolves to the SPIFFE ID it proves.
pub type AttestHook = Arc<dyn Fn(String) -> AttestFuture + Send + Sync>;
/// Answers an AdmissionReview body (the `/inject` webhook) given the current trust bundle
/// PEM (which injected pods embed), or says why the body is malformed.
pub type WebhookHook = Arc<dyn Fn(&[u8], &str) -> Result<Vec<u8>, String> + Send + Sync>;

/// Optional integrations, plugged in by `trellis control run` flags.
#[derive(Default)]
pub struct Hooks {
    pub k8s_attest: Option<AttestHook>,
    pub webhook: Option<WebhookHook>,
    /// Lists Services and EndpointSlices for the proxies' service table (`crate::services`).
    pub k8s_services: Option<crate::kube::TokenReviewer>,
    /// Hands the heap's free pages back to the system; called after a policy change. A large
    /// apply parses and compiles the whole set twice, and the allocator would otherwise keep
    /// that peak (hundreds of MB for 60 k rules) for the life of the process. True if
    /// anything was released.
    pub release_memory: Option<fn() -> bool>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("k8s_attest", &self.k8s_attest.is_some())
            .field("webhook", &self.webhook.is_some())
            .field("k8s_services", &self.k8s_services.is_some())
            .field("release_memory", &self.release_memory.is_some())
            .finish()
    }
}

pub type AttestFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<SpiffeId, ApiError>> + Send>>;

/// What the TLS handshake told us about the client.
#[derive(Debug)]
pub struct Conn {
    pub remote: SocketAddr,
    pub peer_chain: Option<Vec<CertificateDer<'static>>>,
}

/// An error answered as `{"error": ...}` with a status code (and, for 401 and 405, the
/// header RFC 9110 requires with it).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// Few and rare, so a `Vec` (a `HeaderMap` would triple the size of every `Result`).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// The admin API's challenge (RFC 6750 §3); `realm` tells it apart from other services.
const ADMIN_CHALLENGE: &str = "Bearer realm=\"trellis-admin\"";

impl ApiError {
    pub fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        ApiError { status, body: ErrorBody { error: msg.into(), details: vec![] }, headers: Vec::new() }
    }
    /// 405 with `Allow` listing `allowed`.
    pub fn method_not_allowed(method: &Method, path: &str, allowed: &[Method]) -> Self {
        let list = allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
        let mut e =
            Self::new(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {path}; allowed: {list}"));
        if let Ok(v) = http::HeaderValue::from_str(&list) {
            e.headers.push((header::ALLOW, v));
        }
        e
    }
    /// 401 for the admin API, with its `WWW-Authenticate: Bearer` challenge; `error` is
    /// RFC 6750's code (`invalid_token`) when a token was sent.
    pub fn admin_unauthorized(msg: impl Into<String>, error: Option<&'static str>) -> Self {
        let mut e = Self::unauthorized(msg);
        let challenge = match error {
            Some(code) => format!("{ADMIN_CHALLENGE}, error=\"{code}\""),
            None => ADMIN_CHALLENGE.to_string(),
        };
        if let Ok(v) = http::HeaderValue::from_str(&challenge) {
            e.headers.push((header::WWW_AUTHENTICATE, v));
        }
        e
    }
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, msg)
    }
    pub fn unauthorized(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, msg)
    }
    pub fn forbidden(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, msg)
    }
    pub fn internal(msg: impl std::fmt::Display) -> Self {
        tracing::error!(error = %msg, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {msg}"))
    }
}

pub type ApiResult = Result<Response<Body>, ApiError>;

/// Serves HTTPS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<trellis_identity::rustls::ServerConfig>,
    ctx: Arc<Ctx>,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let ctx = ctx.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let peer_chain =
                tls.get_ref().1.peer_certificates().map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
            let conn = Arc::new(Conn { remote, peer_chain });
            let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let seen = asked.clone();
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
                req.extensions_mut().insert(body::IdleTimeout(header_timeout));
                let (ctx, conn) = (ctx.clone(), conn.clone());
                async move { Ok::<_, Infallible>(route(ctx, conn, req).await) }
            });
            // The protocol is the one ALPN chose (HTTP/1.1 without ALPN): no waiting, with no
            // timeout, for a client to say which. HTTP/1.1 gets the header timeout, which also
            // ends a connection idle between requests; HTTP/2, keep-alive pings.
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10));
            let builder = if h2 { builder.http2_only() } else { builder.http1_only() };
            let fut = watcher.watch(builder.serve_connection(TokioIo::new(tls), svc).into_owned());
            tokio::pin!(fut);
            // hyper's HTTP/2 server has no header timeout: an h2 connection that asks nothing
            // within it is closed, as a silent HTTP/1.1 one is (slowloris over h2).
            let first = tokio::time::sleep(header_timeout);
            let ended = tokio::select! {
                r = &mut fut => Some(r),
                () = first, if h2 => None,
            };
            let ended = match ended {
                Some(r) => r,
                None if !asked.load(std::sync::atomic::Ordering::Relaxed) => {
                    tracing::debug!(%remote, "HTTP/2 connection asked nothing within the header timeout; closed");
                    return;
                }
                None => fut.await,
            };
            if let Err(e) = ended {
                tracing::debug!(%remote, error = %e, "connection ended with error");
            }
        });
    }
    // Watch streams never end on their own; give in-flight requests a moment, then go.
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
}

async fn route(ctx: Arc<Ctx>, conn: Arc<Conn>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let result = match (method.clone(), path.as_str()) {
        // HEAD too: load balancers and uptime checkers probe with it (hyper sends no body).
        (Method::GET | Method::HEAD, paths::HEALTHZ) => Ok(text(StatusCode::OK, "ok\n")),
        (Method::GET | Method::HEAD, paths::BUNDLE) => Ok(text(StatusCode::OK, ctx.shared.bundle.load().to_pem())),
        (Method::POST, paths::BOOTSTRAP) => svid::bootstrap(&ctx, &conn, req).await,
        (Method::POST, paths::RENEW) => svid::renew(&ctx, &conn, req).await,
        (Method::GET, paths::WATCH) => watch::watch(&ctx, &conn, req).await,
        (Method::POST, paths::ACK) => watch::ack(&ctx, &conn, req).await,
        (Method::POST, paths::INJECT) => webhook(&ctx, req).await,
        (_, p) if is_admin_path(p) => admin::route(&ctx, &conn, req).await,
        (_, p) => Err(not_routed(&method, p)),
    };
    let response = result.unwrap_or_else(|e| {
        let mut r = json(e.status, &e.body);
        for (name, value) in e.headers {
            r.headers_mut().insert(name, value);
        }
        r
    });
    tracing::debug!(%method, %path, status = response.status().as_u16(), remote = %conn.remote, "request");
    // hyper drops a HEAD response's body on HTTP/1.1 but sends it on HTTP/2, where DATA on a
    // HEAD stream is a protocol error (curl: "PROTOCOL_ERROR"): no body, whatever the protocol.
    if method == Method::HEAD {
        return response.map(|_| full(Bytes::new()));
    }
    response
}

/// The methods `docs/api/openapi.yaml` documents for `path`, or `None` for an unknown path.
pub fn allowed_methods(path: &str) -> Option<&'static [Method]> {
    const GET: &[Method] = &[Method::GET];
    const POST: &[Method] = &[Method::POST];
    match path {
        paths::HEALTHZ | paths::BUNDLE => Some(&[Method::GET, Method::HEAD]),
        paths::WATCH | paths::WORKLOADS | paths::AUDIT => Some(GET),
        paths::BOOTSTRAP | paths::RENEW | paths::ACK | paths::INJECT | paths::TOKENS | paths::CHECK => Some(POST),
        paths::POLICIES => Some(&[Method::GET, Method::POST]),
        p if p.strip_prefix(paths::POLICIES).and_then(|r| r.strip_prefix('/')).is_some_and(|n| !n.contains('/')) => {
            Some(&[Method::GET, Method::DELETE])
        }
        _ => None,
    }
}

/// The answer for a request no handler took: 405 (with `Allow`) on a known path, else 404.
pub fn not_routed(method: &Method, path: &str) -> ApiError {
    match allowed_methods(path) {
        Some(allowed) => ApiError::method_not_allowed(method, path, allowed),
        None => ApiError::new(StatusCode::NOT_FOUND, format!("no such endpoint: {method} {path}")),
    }
}

fn is_admin_path(p: &str) -> bool {
    [paths::TOKENS, paths::POLICIES, paths::CHECK, paths::WORKLOADS, paths::AUDIT]
        .iter()
        .any(|a| p == *a || p.strip_prefix(a).is_some_and(|rest| rest.starts_with('/')))
}

async fn webhook(ctx: &Ctx, req: Request<Incoming>) -> ApiResult {
    let Some(hook) = ctx.hooks.webhook.clone() else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "the injection webhook is not enabled (--webhook)"));
    };
    let body = read_body(req, MAX_POLICY_BODY).await?;
    match hook(&body, &ctx.shared.bundle.load().to_pem()) {
        Ok(out) => Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(out))
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response"))),
        Err(e) => Err(ApiError::bad_request(format!("malformed AdmissionReview: {e}"))),
    }
}

/// Requires `Authorization: Bearer <admin token>`.
pub fn require_admin<B>(ctx: &Ctx, conn: &Conn, req: &Request<B>) -> Result<Actor, ApiError> {
    // Two credentials have no one meaning (RFC 9110 §11.6.2 allows one): taking the first
    // let a good token before a bad one through, and not the other way round.
    if req.headers().get_all(header::AUTHORIZATION).iter().nth(1).is_some() {
        return Err(ApiError::bad_request("more than one Authorization header"));
    }
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::admin_unauthorized(
            "missing admin token: send `Authorization: Bearer <admin token>`",
            None,
        ));
    };
    let presented = value.to_str().ok().and_then(bearer_token).unwrap_or("");
    if presented.is_empty() || !crate::tokens::admin_token_matches(presented, &ctx.admin_token) {
        tracing::warn!(remote = %conn.remote, "admin request with a wrong token refused");
        return Err(ApiError::admin_unauthorized("invalid admin token", Some("invalid_token")));
    }
    Ok(Actor { principal: "admin".into(), remote: conn.remote.to_string() })
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive
/// and followed by one or more spaces (RFC 9110 §11.4, §11.1), so `bearer x` works too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim_matches(' '))
}

/// The client's SVID after the full checks on its certificate chain: its SPIFFE ID, expiry
/// (Unix seconds) and serial (hex).
pub fn require_svid(ctx: &Ctx, conn: &Conn) -> Result<(SpiffeId, u64, String), ApiError> {
    let chain = conn
        .peer_chain
        .as_deref()
        .ok_or_else(|| ApiError::unauthorized("this endpoint requires a client SVID (mutual TLS)"))?;
    let id = ctx.svid_checker.verify_chain(chain, UnixTime::now()).map_err(|e| {
        let msg = match &e {
            VerifyError::Expired => "client SVID has expired; bootstrap again with a new join token".to_string(),
            VerifyError::UnknownIssuer => "client SVID is not issued by this control plane's CA".to_string(),
            other => format!("client SVID refused: {other}"),
        };
        tracing::warn!(remote = %conn.remote, reason = e.label(), "SVID refused");
        ApiError::unauthorized(msg)
    })?;
    let info = trellis_identity::CertInfo::parse(&chain[0]).ok();
    let expires = info.as_ref().map_or(0, |i| i.not_after_unix());
    Ok((id, expires, info.map(|i| i.serial_hex).unwrap_or_default()))
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            let mut r = Response::new(full(bytes));
            *r.status_mut() = status;
            r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("serialization failed: {e}")),
    }
}

/// Runs blocking store work off the async threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(ApiError::internal)
}
