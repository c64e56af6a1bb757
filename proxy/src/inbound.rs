//! Inbound: peers → this workload's app.
//!
//! accept ([`Accepted`]) → TLS, mTLS required → identify the peer from its SVID
//! ([`Authenticated`]) → detect the protocol → authorize → forward:
//! - opaque TCP: one L4 decision for the connection; a [`Permit`] opens the tunnel to the app
//!   (`tcp.rs`);
//! - HTTP/1.1 and HTTP/2: one decision per request (method + normalized path) in the
//!   tower stack built by `http_stage`; denied requests get 403 + `x-trellis-denied`.
//!
//! In a pod whose app has kubelet HTTP probes, a connection that does not start with a TLS
//! handshake may be the kubelet probing the app's port: `probes::answer_plaintext` answers it
//! if it asks for a listed probe's path; other plaintext is refused (it could never pass the
//! handshake), recorded like a refused handshake with the class `plaintext`.
//!
//! Allowed TCP connections, and HTTP requests while in flight, are registered with the
//! connection tracker, so a later policy that revokes them ends them. Telemetry records a span for each connection (opaque:
//! allowed or denied; HTTP: when it closes, with its request counts), each refused
//! handshake, and (in the tower stack) each request.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, header};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tracing::{Instrument, field};
use trellis_identity::{SpiffeId, VerifyError};
use trellis_policy::{Flow, HttpRequest};

use crate::app::AppClient;
use crate::authz::{Denial, Permit, authorize};
use crate::config::InboundSpec;
use crate::conns::{Revocable, Tracked, TrackedFlow};
use crate::http::{
    AppBody, ORIG_PROTO, PEER_ID, ReqBody, RespBody, app_uri, header_too_large, is_websocket_upgrade, proxy_error,
    revocable, strip_hop_by_hop, strip_trellis_headers,
};
use crate::io::Prefixed;
use crate::layers::{MetricsLayer, Permitted, PolicyLayer, TraceLayer};
use crate::metrics::OpenGuard;
use crate::serve::{
    MAX_HEADER_LIST, over_header_limit, request_header_list_size, response_header_list_size, serve_http,
};
use crate::sniff::{Protocol, detect};
use crate::state::{ALPN_H2, ALPN_HTTP11, ALPN_OPAQUE, ProxyState};
use crate::telemetry::{ConnFacts, ConnOutcome, Direction, HttpConnSpan, Metered, Started, Verdict};

mod tcp;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type PeerIo = Prefixed<TlsStream<TcpStream>>;

/// Serves one inbound listener until shutdown.
pub async fn serve(state: Arc<ProxyState>, spec: InboundSpec, listener: TcpListener) {
    while let Some((tcp, remote)) = state.accept(&listener, "inbound").await {
        let started = Started::now();
        let state = state.clone();
        let spec = spec.clone();
        tokio::spawn(async move {
            let _open = OpenGuard::new(&state.metrics, "inbound");
            let Some(accepted) = accept(&state, &spec, tcp, remote, started) else { return };
            let span = tracing::info_span!(
                "inbound",
                peer.addr = %remote,
                app = %accepted.app,
                peer.id = field::Empty,
                protocol = field::Empty,
            );
            handle(state, accepted).instrument(span).await;
        });
    }
}

/// A TCP connection from a peer and the app address its bytes are for.
pub struct Accepted {
    tcp: TcpStream,
    remote: SocketAddr,
    app: SocketAddr,
    started: Started,
}

/// The peer has proved its SPIFFE ID over mTLS.
pub struct Authenticated {
    io: TlsStream<TcpStream>,
    remote: SocketAddr,
    app: SocketAddr,
    peer: SpiffeId,
    me: SpiffeId,
    /// When the first of the two certificates of the handshake expires.
    valid_until: Instant,
    started: Started,
}

/// Works out the app target: fixed (`LISTEN=APP`) or the original destination.
fn accept(
    state: &ProxyState,
    spec: &InboundSpec,
    tcp: TcpStream,
    remote: SocketAddr,
    started: Started,
) -> Option<Accepted> {
    let app = match spec.app {
        Some(app) => app,
        None => {
            let Some(dst) = crate::orig_dst::original_dst(&tcp) else {
                tracing::warn!(%remote, "transparent inbound connection without an original destination; closing");
                return None;
            };
            if dst.port() == spec.listen.port() || state.config.admin.port() == dst.port() && dst.ip().is_loopback() {
                tracing::warn!(%remote, %dst, "inbound connection addressed to the proxy itself; refusing the loop");
                return None;
            }
            let local = tcp.local_addr().map_or(dst.ip(), |a| a.ip());
            if !crate::orig_dst::is_own_address(dst.ip(), local) {
                // Not counted as a flow: no caller identity is known yet, and no app was reached.
                tracing::warn!(%remote, %dst, "inbound connection addressed to another host or to loopback; refusing to relay it");
                return None;
            }
            dst
        }
    };
    Some(Accepted { tcp, remote, app, started })
}

async fn handle(state: Arc<ProxyState>, mut accepted: Accepted) {
    // In a pod whose app has probes, the kubelet's plaintext probe of an app port arrives
    // here too; it is answered without TLS (probes.rs), anything else goes on to the handshake.
    if !state.config.app_probes.is_empty() {
        use crate::probes::{FirstBytes, answer_plaintext};
        let Accepted { tcp, remote, app, started } = accepted;
        let probes = &state.config.app_probes;
        match Box::pin(answer_plaintext(probes, state.config.advertise_ip, app.port(), tcp)).await {
            FirstBytes::Tls(tcp) => accepted = Accepted { tcp, remote, app, started },
            FirstBytes::Probe => return,
            FirstBytes::Refused(why) => {
                tracing::info!(reason = %why, "inbound plaintext connection refused");
                return refusal(&state, remote, app, started, "plaintext", why);
            }
        }
    }
    // Each stage is boxed and dropped before the next: the task lives as long as the
    // connection, and unboxed it would stay sized for its largest stage — kilobytes per
    // idle connection, times tens of thousands of connections.
    let Some(auth) = Box::pin(handshake(&state, accepted)).await else { return };
    tracing::Span::current().record("peer.id", field::display(&auth.peer));
    let Some((auth, protocol, prefix)) = Box::pin(protocol_of(&state, auth)).await else { return };
    dispatch(state, auth, protocol, prefix).await
}

/// The protocol inside the tunnel: from ALPN (sidecars always say), the opaque ports, or
/// else sniffed from the first bytes.
async fn protocol_of(state: &ProxyState, mut auth: Authenticated) -> Option<(Authenticated, Protocol, bytes::Bytes)> {
    let alpn = auth.io.get_ref().1.alpn_protocol();
    let protocol = match alpn {
        Some(ALPN_H2) => Some(Protocol::Http2),
        Some(ALPN_HTTP11) => Some(Protocol::Http1),
        Some(ALPN_OPAQUE) => Some(Protocol::Opaque),
        _ if state.config.is_opaque(auth.app.port()) => Some(Protocol::Opaque),
        _ => None,
    };
    if let Some(protocol) = protocol {
        return Some((auth, protocol, bytes::Bytes::new()));
    }
    let detected = match detect(&mut auth.io, state.config.detect_timeout).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "connection failed while detecting its protocol");
            return None;
        }
    };
    if detected.timed_out {
        state.metrics.detect_timeouts.inc();
    }
    Some((auth, detected.protocol, detected.prefix))
}

/// Hands the connection to its protocol's stage. Not `async`: the stream moves into the
/// stage's boxed future here, and an async fn would keep a dead copy of it (and of every
/// stage's state) in the task for the connection's whole life.
fn dispatch(
    state: Arc<ProxyState>,
    auth: Authenticated,
    protocol: Protocol,
    prefix: bytes::Bytes,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    tracing::Span::current().record("protocol", protocol.label());
    let Authenticated { io, remote, app, peer, me, valid_until, started } = auth;
    // Opaque with no bytes read: by ALPN or because the client was silent, so what it sends
    // first has not been looked at (`LateHttpGuard`); bytes that decided "opaque" have.
    let unsniffed = prefix.is_empty();
    let io = Prefixed::new(prefix, io);
    let facts = state.telemetry.is_on().then(|| inbound_facts(remote, app, Some(peer.clone()), Some(me.clone())));
    let peer_header = HeaderValue::from_str(peer.as_str()).ok();
    let state_family = state.conns.new_family();
    let ctx = Arc::new(ConnCtx {
        state,
        peer,
        me,
        remote,
        app,
        started,
        valid_until,
        facts,
        cancel: CancellationToken::new(),
        peer_header,
        family: state_family,
    });
    match protocol {
        Protocol::Opaque => Box::pin(tcp::tcp_stage(ctx, io, unsniffed)),
        Protocol::Http1 | Protocol::Http2 => Box::pin(http_stage(ctx, io, protocol)),
    }
}

/// TLS with mutual authentication; failures are counted by reason, recorded as a span,
/// and the connection dropped.
async fn handshake(state: &ProxyState, accepted: Accepted) -> Option<Authenticated> {
    let Accepted { tcp, remote, app, started } = accepted;
    let tls = state.tls.load_full()?;
    // Read before the handshake: the SVID it presents is this one or a newer one.
    let own_not_after = state.creds.current()?.svid.not_after();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let refused = |label: &'static str, message: String| refusal(state, remote, app, started, label, message);
    let io = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            let (label, reason) = handshake_refusal(&e);
            tracing::info!(%reason, "inbound TLS handshake refused");
            refused(label, reason);
            return None;
        }
        Err(_) => {
            tracing::info!("inbound TLS handshake timed out");
            refused("timeout", "the handshake timed out".into());
            return None;
        }
    };
    let (peer, peer_not_after) = match peer_identity(io.get_ref().1) {
        Ok(id) => id,
        Err(reason) => {
            tracing::info!(%reason, "inbound peer identity refused");
            refused(reason.label(), reason.to_string());
            return None;
        }
    };
    let me = state.id()?;
    let valid_until = crate::pool::instant_of(own_not_after.min(peer_not_after));
    Some(Authenticated { io, remote, app, peer, me, valid_until, started })
}

/// The failure class and message of a refused handshake: `plaintext` for bytes that are no
/// TLS at all; the verifier's for a certificate
/// problem, and `protocol_version` for a client that does not offer TLS 1.3 (an old
/// client, `openssl s_client -tls1_2`), which never gets as far as a certificate.
fn handshake_refusal(e: &std::io::Error) -> (&'static str, String) {
    let reason = VerifyError::from_io(e).unwrap_or(VerifyError::Other(e.to_string()));
    (reason.label(), reason.to_string())
}

/// Counts a refused handshake and records its span.
fn refusal(
    state: &ProxyState,
    remote: SocketAddr,
    app: SocketAddr,
    started: Started,
    label: &'static str,
    message: String,
) {
    state.metrics.handshake_failure(label);
    let facts = || inbound_facts(remote, app, None, state.id());
    state.telemetry.connection(facts, started, ConnOutcome::empty(Verdict::Handshake { label, message }, None));
}

fn inbound_facts(
    remote: SocketAddr,
    app: SocketAddr,
    source: Option<SpiffeId>,
    destination: Option<SpiffeId>,
) -> Arc<ConnFacts> {
    Arc::new(ConnFacts {
        direction: Direction::Inbound,
        peer: remote,
        client: None,
        server_port: app.port(),
        source,
        destination,
    })
}

/// The peer's SPIFFE ID and its certificate's expiry, refusing certificates that expired
/// since the session that a resumed handshake reuses was first established.
fn peer_identity(
    conn: &trellis_identity::rustls::ServerConnection,
) -> Result<(SpiffeId, std::time::SystemTime), VerifyError> {
    let leaf = conn.peer_certificates().and_then(|c| c.first()).ok_or(VerifyError::NoCertificate)?;
    let info = trellis_identity::CertInfo::parse(leaf).map_err(VerifyError::BadEncoding)?;
    if info.not_after < std::time::SystemTime::now() {
        return Err(VerifyError::Expired);
    }
    Ok((info.spiffe_id()?, info.not_after))
}

/// Per-connection facts every request on it shares.
pub struct ConnCtx {
    pub state: Arc<ProxyState>,
    pub peer: SpiffeId,
    pub me: SpiffeId,
    pub remote: SocketAddr,
    pub app: SocketAddr,
    pub started: Started,
    /// No new request is taken on the connection after this ([`Authenticated`]).
    pub valid_until: Instant,
    /// What the connection's spans share (`None` when telemetry is off).
    pub facts: Option<Arc<ConnFacts>>,
    /// Fired when a policy change revokes this connection (opaque TCP; on HTTP, each request
    /// has its own).
    pub cancel: CancellationToken,
    /// `x-trellis-peer-id` for every request on this connection, built once.
    peer_header: Option<HeaderValue>,
    /// What the registrations of this connection's requests share ([`crate::conns`]).
    family: u64,
}

impl ConnCtx {
    fn conn_facts(&self) -> Arc<ConnFacts> {
        self.facts
            .clone()
            .unwrap_or_else(|| inbound_facts(self.remote, self.app, Some(self.peer.clone()), Some(self.me.clone())))
    }

    /// Records this connection's L4 span.
    fn record(&self, outcome: ConnOutcome) {
        self.state.telemetry.connection(|| self.conn_facts(), self.started, outcome);
    }

    fn flow<'a>(&'a self, http: Option<HttpRequest<'a>>) -> Flow<'a> {
        Flow {
            source: Some(&self.peer),
            source_ip: self.remote.ip(),
            destination: &self.me,
            port: self.app.port(),
            http,
        }
    }

    /// Decides one request; an allowed one is registered, revocable, while it is in flight.
    pub fn authorize<B>(&self, req: &Request<B>) -> Result<(Permit, Tracked), Denial> {
        let method = req.method();
        // A target with no path (`CONNECT host:port`, authority-form) is judged as written —
        // an invalid path, denied, as `policy check` says — not as `/`.
        let target = match req.uri().path_and_query() {
            Some(target) => target.clone(),
            None => {
                let written = req.uri().to_string();
                let view = self.state.policy.load();
                authorize(&view, &self.flow(Some(HttpRequest { method: method.as_str(), path: &written })))?;
                // Not reached: a path not starting with `/` never normalizes.
                PathAndQuery::from_static("/")
            }
        };
        let view = self.state.policy.load();
        let permit =
            authorize(&view, &self.flow(Some(HttpRequest { method: method.as_str(), path: target.as_str() })))?;
        let flow = TrackedFlow::Mesh {
            source: Some(self.peer.clone()),
            source_ip: self.remote.ip(),
            destination: self.me.clone(),
            port: self.app.port(),
            http: Some((method.clone(), target)),
        };
        let tracked = self.state.track_in(self.family, flow, CancellationToken::new(), permit.version());
        Ok((permit, tracked))
    }
}

/// Serves HTTP on the connection through the tower stack, until the peer closes, the
/// policy revokes the connection, or the proxy drains.
fn http_stage(ctx: Arc<ConnCtx>, io: PeerIo, protocol: Protocol) -> impl Future<Output = ()> + Send {
    let state = ctx.state.clone();
    let conn = HttpConnSpan::start(&state.telemetry, || ctx.conn_facts(), ctx.started, protocol.label());
    let svc = ServiceBuilder::new()
        .layer(TraceLayer::new(conn.clone()))
        .layer(MetricsLayer { state: state.clone(), direction: "inbound" })
        .layer(PolicyLayer { ctx: ctx.clone() })
        .service(ForwardToApp { app: ctx.state.app.get(ctx.app), ctx: ctx.clone(), conn: conn.clone() });
    let svc = hyper_util::service::TowerToHyperService::new(svc);
    // A proxy shutting down drains it (revocation ends requests, not the connection).
    let header_timeout = state.config.header_timeout;
    let stop = async move {
        state.shutdown.cancelled().await;
        state.config.drain_timeout
    };
    let retire_at = Some(ctx.valid_until);
    serve_http(Metered::new(io, conn), svc, protocol == Protocol::Http2, header_timeout, retire_at, stop)
}

/// The innermost service: sends a permitted request to the app.
#[derive(Clone)]
pub struct ForwardToApp {
    ctx: Arc<ConnCtx>,
    /// Looked up once per connection, not per request.
    app: Arc<AppClient>,
    /// The connection's span, for an upgrade to record a revocation on.
    conn: Option<Arc<HttpConnSpan>>,
}

impl tower::Service<Permitted> for ForwardToApp {
    type Response = Response<RespBody>;
    type Error = std::convert::Infallible;
    type Future = crate::layers::BoxFuture<Result<Response<RespBody>, std::convert::Infallible>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, Permitted { permit, request, tracked }: Permitted) -> Self::Future {
        let (ctx, app) = (self.ctx.clone(), self.app.clone());
        // Decided once here: an upgrade also takes the connection's span, to mark a revocation on.
        let exchange =
            if is_websocket_upgrade(&request) { Exchange::WebSocket(self.conn.clone()) } else { Exchange::Request };
        Box::pin(async move { Ok(forward_http(&ctx, &app, permit, request, tracked, exchange).await) })
    }
}

/// What a permitted request asks for, decided once per request.
enum Exchange {
    /// A request and its response.
    Request,
    /// A WebSocket upgrade, with the connection's span (when telemetry is on) to mark a
    /// revocation on: the upgraded stream outlives the request.
    WebSocket(Option<Arc<HttpConnSpan>>),
}

/// Rewrites a permitted request for the app (verified peer ID, normalized path, hop-by-hop
/// headers removed) and relays the app's answer; `tracked` ends it early if a policy change
/// revokes it.
async fn forward_http(
    ctx: &ConnCtx,
    app: &AppClient,
    permit: Permit,
    mut req: Request<ReqBody>,
    tracked: Tracked,
    exchange: Exchange,
) -> Response<RespBody> {
    tracing::debug!(policy_version = permit.version(), reason = %permit.decision(), "request allowed");
    // A calling sidecar sends nothing over the limit (the outbound checks too); a client of
    // its own straight to this port may, over HTTP/1.1 or HTTP/2 (h2 reads up to
    // `H2_SERVER_HEADER_LIST`, so such a request gets here, to be refused with a span).
    if over_header_limit(request_header_list_size(&req)) {
        tracing::debug!("request refused: its header block is over the limit");
        return header_too_large(req.version());
    }
    if let Some(problem) = crate::http::host_problem(&req) {
        return proxy_error(StatusCode::BAD_REQUEST, "bad_request", problem);
    }
    if crate::http::other_transfer_coding(req.headers()) {
        let detail = "a transfer coding other than chunked is not supported";
        return proxy_error(StatusCode::NOT_IMPLEMENTED, "bad_request", detail);
    }
    if let Exchange::WebSocket(conn) = exchange {
        // As for any request: the app gets the path the policy judged (normalized), and the
        // verified peer header after the hop-by-hop ones (which the client names) are gone.
        prepare_for_app(ctx, &mut req, false);
        // Boxed so the rare upgrade does not size (and slow) every request's future.
        return Box::pin(crate::upgrade::forward_upgrade(req, UpgradeTarget::App(ctx.app), Some(tracked), conn)).await;
    }
    let downgrade = req.headers_mut().remove(ORIG_PROTO).is_some() || req.version() != http::Version::HTTP_2;
    prepare_for_app(ctx, &mut req, !downgrade);
    *req.version_mut() = if downgrade { http::Version::HTTP_11 } else { http::Version::HTTP_2 };
    let sent = tokio::select! {
        biased;
        sent = async {
            if downgrade {
                app.h1.send(req).await.map(|r| r.map(AppBody::Left))
            } else {
                // Boxed: its future is twice the HTTP/1.1 one's (~1 KB more), and every
                // request's future would carry and move that.
                Box::pin(app.send_h2(req)).await.map(|r| r.map(AppBody::Right))
            }
        } => sent,
        () = tracked.cancel.cancelled() => {
            let detail = "a policy change revoked this request before the app answered";
            return proxy_error(StatusCode::FORBIDDEN, "revoked", detail);
        }
    };
    match sent {
        // No upgrade was asked for (any other upgrade offer was stripped above): an app that
        // switches protocols anyway would have the caller's connection become a tunnel.
        Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            tracing::info!(app = %ctx.app, "the app answered 101 to a request that asked for no upgrade");
            let detail = "the app switched protocols on a request that asked for no upgrade";
            proxy_error(StatusCode::BAD_GATEWAY, "upgrade_refused", detail)
        }
        // Over the limit the peer's sidecar would refuse it mid-stream, after this side had
        // recorded a success: refused here, where the cause is known.
        Ok(resp) if crate::http::other_transfer_coding(resp.headers()) => {
            let detail = "the app's response has a transfer coding other than chunked, which would be lost";
            proxy_error(StatusCode::BAD_GATEWAY, "app_failed", detail)
        }
        Ok(resp) if over_header_limit(response_header_list_size(&resp)) => {
            let detail = format!("the app's response header block reaches the {MAX_HEADER_LIST}-byte limit");
            proxy_error(StatusCode::BAD_GATEWAY, "app_failed", &detail)
        }
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            strip_trellis_headers(&mut parts.headers);
            // An h2c app's response says HTTP/2: see the outbound's answer to an HTTP/1.0 client.
            parts.version = http::Version::HTTP_11;
            Response::from_parts(parts, revocable(Revocable::new(body, tracked)))
        }
        Err(e) => {
            let (label, detail) = e.label_and_detail(ctx.app, downgrade);
            tracing::warn!(app = %ctx.app, error = %detail, "app request failed");
            proxy_error(StatusCode::BAD_GATEWAY, label, &detail)
        }
    }
}

pub use crate::upgrade::UpgradeTarget;

/// Sets the headers and absolute URI the app client needs.
/// The URI carries the authority the caller used (the app client dials the app whatever it
/// says); HTTP/2 to the app carries it as `:authority` only.
fn prepare_for_app<B>(ctx: &ConnCtx, req: &mut Request<B>, h2: bool) {
    let uri = app_uri(std::mem::take(req.uri_mut()), req.headers().get(header::HOST), ctx.app);
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    set_peer_header(ctx, headers);
    if h2 {
        headers.remove(header::HOST);
    }
}

/// Replaces any `x-trellis-peer-id` the client sent with the verified one — under any
/// spelling a CGI-style app reads as the same (`x_trellis_peer_id`: WSGI, PHP and CGI fold
/// `_` and `-` into `HTTP_X_TRELLIS_PEER_ID`, and would see the client's copy first).
fn set_peer_header(ctx: &ConnCtx, headers: &mut http::HeaderMap) {
    crate::http::remove_peer_id(headers);
    if let Some(v) = &ctx.peer_header {
        headers.insert(PEER_ID, v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_without_tls13_is_refused_as_protocol_version() {
        use trellis_identity::rustls::{AlertDescription, Error, PeerIncompatible};
        let io = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        for e in [
            PeerIncompatible::Tls12NotOffered,
            PeerIncompatible::Tls12NotOfferedOrEnabled,
            PeerIncompatible::SupportedVersionsExtensionRequired,
            // TLS 1.0 and 1.1 hellos (`openssl s_client -tls1`) carry no signature algorithms.
            PeerIncompatible::SignatureAlgorithmsExtensionRequired,
        ] {
            assert_eq!(handshake_refusal(&io(Error::PeerIncompatible(e))).0, "protocol_version");
        }
        // Bytes that are no TLS record: plaintext HTTP to the inbound port (`curl http://`).
        let plain = io(Error::InvalidMessage(trellis_identity::rustls::InvalidMessage::InvalidContentType));
        assert_eq!(handshake_refusal(&plain).0, "plaintext");
        // A TLS 1.2-only server answering a sidecar's hello, as the outbound sees it.
        let alert = io(Error::AlertReceived(AlertDescription::ProtocolVersion));
        assert_eq!(VerifyError::from_io(&alert), Some(VerifyError::ProtocolVersion));
        assert_eq!(
            handshake_refusal(&io(Error::PeerIncompatible(PeerIncompatible::NoCipherSuitesInCommon))).0,
            "other"
        );
        let no_cert = io(Error::NoCertificatesPresented);
        assert_eq!(handshake_refusal(&no_cert).0, VerifyError::from_io(&no_cert).unwrap().label());
    }
}
