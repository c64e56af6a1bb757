//! Outbound: this workload's app → a peer.
//!
//! accept plaintext from the app ([`Accepted`]) → find the destination ([`Target`]: an
//! explicit route, or the original destination looked up in the endpoint registry — a
//! Kubernetes Service's ClusterIP becoming one of its endpoints in the mesh) →
//! - a mesh peer: detect the protocol; HTTP rides the pooled HTTP/2 mTLS connection to the
//!   peer (which must prove the expected SPIFFE ID), anything else gets its own mTLS
//!   tunnel. The peer's inbound sidecar authorizes; its 403s reach the app as they are.
//! - outside the mesh: egress policy decides; a [`Permit`] opens a plain TCP tunnel.
//!
//! Telemetry: a span per connection (opaque or HTTP) and per HTTP request (CLIENT kind).
//! The peer's inbound decides mesh flows; for HTTP its answer says how
//! (`x-trellis-denied`, `x-trellis-audit`), which this side turns into [`Decided`] for its
//! span and metrics.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tracing::{Instrument, field};
use trellis_identity::SpiffeId;
use trellis_policy::EgressFlow;

use crate::authz::{Permit, authorize_egress};
use crate::config::RouteSpec;
use crate::conns::TrackedFlow;
use crate::http::{
    AUDIT, DENIED, ERROR, HEADER_TOO_LARGE, ORIG_PROTO, PEER_ID, ReqBody, RespBody, from_peer, header_too_large,
    host_problem, is_websocket_upgrade, other_transfer_coding, proxy_error, strip_hop_by_hop,
};
use crate::io::Prefixed;
use crate::layers::{BoxFuture, Decided, MetricsLayer, TraceLayer};
use crate::metrics::OpenGuard;
use crate::peer_h2::{PeerBody, SendError};
use crate::pool::PeerError;
use crate::serve::{over_header_limit, request_header_list_size, serve_http};
use crate::sniff::{Protocol, detect};
use crate::state::{PeerProtocol, ProxyState};
use crate::telemetry::{ConnFacts, ConnOutcome, Direction, HttpConnSpan, Metered, Started, Verdict};
use crate::tunnel::tunnel;
use crate::upgrade::{UpgradeTarget, forward_upgrade};

const EGRESS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A plaintext connection from the local app.
pub struct Accepted {
    tcp: TcpStream,
    remote: SocketAddr,
    /// The listener's port: with the destination's port, what `--opaque-ports` is matched on.
    port: u16,
    started: Started,
}

/// Where the app's bytes go.
#[derive(Debug, Clone)]
pub enum Target {
    /// A sidecar that must prove `id`.
    /// `service`: the Service address the app called, when `addr` is one of its endpoints;
    /// HTTP requests are then spread over its endpoints one by one.
    Mesh { addr: SocketAddr, id: SpiffeId, service: Option<SocketAddr> },
    /// An address outside the mesh.
    Egress { addr: SocketAddr },
}

/// Serves an explicit route (`--route LISTEN=PEER,SPIFFE_ID`).
pub async fn serve_route(state: Arc<ProxyState>, route: RouteSpec, listener: TcpListener) {
    let target = Target::Mesh { addr: route.peer, id: route.identity.clone(), service: None };
    accept_loop(state, listener, move |_, _| Some(target.clone())).await
}

/// Serves the transparent listener: destinations from `SO_ORIGINAL_DST`.
pub async fn serve_transparent(state: Arc<ProxyState>, listener: TcpListener) {
    let own = listener.local_addr().ok();
    let lookup_state = state.clone();
    accept_loop(state, listener, move |tcp, remote| {
        let Some(dst) = crate::orig_dst::original_dst(tcp) else {
            tracing::warn!(%remote, "outbound connection without an original destination; closing");
            return None;
        };
        if is_own_listener(&lookup_state, own, dst) {
            tracing::warn!(%remote, %dst, "outbound connection to the proxy's own listener; refusing the loop");
            return None;
        }
        // A Service's ClusterIP goes to one of its endpoints in the mesh (kube-proxy, which
        // would pick one, comes after the capture).
        Some(match lookup_state.registry.load().target(dst) {
            Some((addr, id)) => Target::Mesh { addr, id: id.clone(), service: (addr != dst).then_some(dst) },
            None => Target::Egress { addr: dst },
        })
    })
    .await
}

fn is_own_listener(state: &ProxyState, own: Option<SocketAddr>, dst: SocketAddr) -> bool {
    let cfg = &state.config;
    let local = |a: SocketAddr| names_listener(a, dst);
    own.is_some_and(local)
        || local(cfg.admin)
        || cfg.inbound.iter().any(|i| local(i.listen))
        || cfg.routes.iter().any(|r| local(r.listen))
}

/// Whether a connection to `dst` reaches the listener on `listen`. One on every address
/// (`0.0.0.0:15000`) is reached only at an address of this host — another pod's or host's
/// port 15000 (a peer's admin port, scraped by a meshed Prometheus) is no loop.
fn names_listener(listen: SocketAddr, dst: SocketAddr) -> bool {
    listen.port() == dst.port()
        && (listen.ip() == dst.ip()
            || dst.ip().is_loopback()
            || (listen.ip().is_unspecified() && is_this_hosts_address(dst.ip())))
}

/// Binding a socket to an address works only for one of this host's (network namespace's)
/// own: the kernel's answer, without listing interfaces. Asked only for a destination on a
/// port the proxy listens on.
fn is_this_hosts_address(ip: std::net::IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

async fn accept_loop<F>(state: Arc<ProxyState>, listener: TcpListener, target: F)
where
    F: Fn(&TcpStream, SocketAddr) -> Option<Target> + Send + Sync + 'static,
{
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    while let Some((tcp, remote)) = state.accept(&listener, "outbound").await {
        let started = Started::now();
        let Some(target) = target(&tcp, remote) else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let _open = OpenGuard::new(&state.metrics, "outbound");
            let span = tracing::info_span!("outbound", app.addr = %remote, dst = field::Empty, dst.id = field::Empty);
            handle(state, Accepted { tcp, remote, port, started }, target).instrument(span).await
        });
    }
}

async fn handle(state: Arc<ProxyState>, accepted: Accepted, target: Target) {
    let span = tracing::Span::current();
    match target {
        Target::Egress { addr } => {
            span.record("dst", field::display(addr));
            Box::pin(egress(state, accepted, addr)).await
        }
        Target::Mesh { addr, id, service } => {
            span.record("dst", field::display(addr));
            span.record("dst.id", field::display(&id));
            let first_taken = Arc::default();
            mesh(accepted, ForwardToPeer { state, addr, id, service, first_taken }).await
        }
    }
}

/// What this side's spans of a connection to `addr` share.
fn outbound_facts(state: &ProxyState, remote: SocketAddr, addr: SocketAddr, id: Option<SpiffeId>) -> Arc<ConnFacts> {
    Arc::new(ConnFacts {
        direction: Direction::Outbound,
        peer: addr,
        client: Some(remote),
        server_port: addr.port(),
        source: state.id(),
        destination: id,
    })
}

async fn mesh(accepted: Accepted, peer: ForwardToPeer) {
    let Accepted { mut tcp, port, remote, started } = accepted;
    let (state, addr, id) = (peer.state.clone(), peer.addr, peer.id.clone());
    tracing::debug!(app = %remote, peer = %addr, "outbound connection");
    let opaque = state.config.is_opaque(port) || state.config.is_opaque(addr.port());
    let (protocol, prefix) = if opaque {
        (Protocol::Opaque, Bytes::new())
    } else {
        match detect(&mut tcp, state.config.detect_timeout).await {
            Ok(d) => {
                if d.timed_out {
                    state.metrics.detect_timeouts.inc();
                }
                (d.protocol, d.prefix)
            }
            Err(e) => {
                tracing::debug!(error = %e, "app connection failed while detecting its protocol");
                return;
            }
        }
    };
    let io = Prefixed::new(prefix, tcp);
    // Each stage's future is boxed when the stage begins: a connection still being sniffed
    // (or idle) then holds a task sized for sniffing, not for TLS plus a hyper server.
    match protocol {
        Protocol::Opaque => {
            let outcome = Box::pin(mesh_tcp(&peer, io)).await;
            state.telemetry.connection(|| outbound_facts(&state, remote, addr, Some(id)), started, outcome);
        }
        Protocol::Http1 | Protocol::Http2 => Box::pin(mesh_http(io, (remote, started), peer, protocol)).await,
    }
}

/// Opaque bytes to a mesh peer: a dedicated mTLS tunnel. The peer's inbound makes the L4
/// decision, and a denial looks like a close from here, so this side's span says only
/// that it passed the connection on.
async fn mesh_tcp(target: &ForwardToPeer, mut io: Prefixed<TcpStream>) -> ConnOutcome {
    let state = &target.state;
    let connect = |addr, id| async move { crate::pool::connect_tls(state, addr, &id, PeerProtocol::Opaque).await };
    let mut peer = match target.with_failover(target.addr, target.id.clone(), connect).await {
        Ok(p) => p,
        Err(e) => {
            state.metrics.flow("outbound", "error", "tcp");
            tracing::warn!(error = %e, "cannot reach peer");
            return ConnOutcome::empty(Verdict::Failed, Some(format!("{}: {e}", e.label()).into()));
        }
    };
    state.metrics.flow("outbound", "allow", "tcp");
    let t = tunnel(&mut io, &mut peer, &CancellationToken::new()).await;
    tracing::debug!(sent = t.sent, received = t.received, error = ?t.error, "tunnel closed");
    // Either way both connections were reset: the app's reset reached the peer's app, or
    // the peer's reset (its app's, or its own failure) reached the app.
    let error = t.failure(("client_reset", "the calling app"), ("peer_reset", "the peer's sidecar"));
    ConnOutcome { verdict: Verdict::Forwarded, sent: t.sent, received: t.received, error }
}

/// HTTP to a mesh peer: each request over the pooled HTTP/2 connection. A plain function
/// returning the connection's future, so that future holds no dead copy of `io`.
fn mesh_http(
    io: Prefixed<TcpStream>,
    (remote, started): (SocketAddr, Started),
    peer: ForwardToPeer,
    protocol: Protocol,
) -> impl Future<Output = ()> + Send {
    let state = peer.state.clone();
    // A Service's requests go to several endpoints: its spans name the Service's address.
    let facts = || outbound_facts(&state, remote, peer.service.unwrap_or(peer.addr), Some(peer.id.clone()));
    let conn = HttpConnSpan::start(&state.telemetry, facts, started, protocol.label());
    let svc = ServiceBuilder::new()
        .layer(TraceLayer::new(conn.clone()))
        .layer(MetricsLayer { state: state.clone(), direction: "outbound" })
        .service(peer);
    let svc = hyper_util::service::TowerToHyperService::new(svc);
    let header_timeout = state.config.header_timeout;
    let stop = async move {
        state.shutdown.cancelled().await;
        state.config.drain_timeout
    };
    serve_http(Metered::new(io, conn), svc, protocol == Protocol::Http2, header_timeout, None, stop)
}

/// Other endpoints of a Service tried when the chosen one cannot be reached.
const FAILOVER: usize = 2;

/// The innermost outbound service: sends a request to the peer's sidecar.
#[derive(Clone)]
struct ForwardToPeer {
    state: Arc<ProxyState>,
    /// The peer chosen for the connection.
    addr: SocketAddr,
    id: SpiffeId,
    /// The Service the app called, if it did: each request then takes the Service's next
    /// endpoint in the mesh (a long-lived HTTP/2 client would otherwise load one pod).
    service: Option<SocketAddr>,
    /// Whether the connection's own pick (made at accept, a turn of the round robin) was
    /// used: the first request takes it, so a client with one request per connection does
    /// not skip every other endpoint.
    first_taken: Arc<std::sync::atomic::AtomicBool>,
}

impl tower::Service<Request<ReqBody>> for ForwardToPeer {
    type Response = Response<RespBody>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Response<RespBody>, std::convert::Infallible>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(req).await) })
    }
}

/// How the peer decided, from its answer: a 403 with `x-trellis-denied` is its denial,
/// `x-trellis-audit` its audit finding (removed here: it is for sidecars, not the app).
fn peer_verdict(resp: &mut Response<RespBody>) -> Decided {
    let audit = resp.headers_mut().remove(AUDIT);
    let denied = (resp.status() == StatusCode::FORBIDDEN).then(|| resp.headers().get(DENIED).cloned()).flatten();
    Decided(Verdict::Peer { denied, audit })
}

/// A response this proxy generated because it could not reach a decision-maker.
fn failed(mut resp: Response<RespBody>) -> Response<RespBody> {
    resp.extensions_mut().insert(Decided(Verdict::Failed));
    resp
}

impl ForwardToPeer {
    /// Where this request goes: the Service's next endpoint, or the connection's peer (also
    /// when the Service has no endpoint in the mesh left).
    fn pick(&self) -> (SocketAddr, SpiffeId) {
        let first = || !self.first_taken.swap(true, std::sync::atomic::Ordering::Relaxed);
        let next = self
            .service
            .filter(|_| !first())
            .and_then(|vip| self.state.registry.load().target(vip).map(|(a, id)| (a, id.clone())));
        next.unwrap_or_else(|| (self.addr, self.id.clone()))
    }

    /// `connect` to (`addr`, `id`); if that fails and the app called a Service, to up to
    /// [`FAILOVER`] of its other endpoints in the mesh — one that went away since the last
    /// service table then costs a retry, not an error. The first error is what is reported.
    async fn with_failover<T, F, Fut>(&self, addr: SocketAddr, id: SpiffeId, connect: F) -> Result<T, PeerError>
    where
        F: Fn(SocketAddr, SpiffeId) -> Fut,
        Fut: Future<Output = Result<T, PeerError>>,
    {
        let first = match connect(addr, id).await {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        let Some(vip) = self.service else { return Err(first) };
        let others = self.state.registry.load().alternatives(vip, addr, FAILOVER);
        for (alt, alt_id) in others {
            tracing::info!(service = %vip, failed = %addr, error = %first, next = %alt, "Service endpoint unreachable; trying another");
            if let Ok(c) = connect(alt, alt_id).await {
                return Ok(c);
            }
        }
        Err(first)
    }

    async fn forward(&self, mut req: Request<ReqBody>) -> Response<RespBody> {
        let (addr, id) = self.pick();
        // Nothing the app sends may impersonate what sidecars tell each other.
        req.headers_mut().remove(PEER_ID);
        req.headers_mut().remove(ORIG_PROTO);
        // Only WebSocket is carried as an upgrade; any other offer (h2c) goes on below as an
        // ordinary request, its Upgrade, HTTP2-Settings and Connection removed as hop-by-hop.
        if is_websocket_upgrade(&req) {
            if over_header_limit(request_header_list_size(&req)) {
                tracing::debug!("upgrade refused: its header block is over the limit");
                return failed(header_too_large(req.version()));
            }
            let target = UpgradeTarget::Peer { state: self.state.clone(), addr, id };
            // Boxed so the rare upgrade does not size (and slow) every request's future. The
            // peer's inbound holds the revocable registration; its close ends this side too.
            let mut resp = Box::pin(forward_upgrade(req, target, None, None)).await;
            let decided = peer_verdict(&mut resp);
            resp.extensions_mut().insert(decided);
            return resp;
        }
        if let Some(problem) = host_problem(&req) {
            return failed(proxy_error(StatusCode::BAD_REQUEST, "bad_request", problem));
        }
        if other_transfer_coding(req.headers()) {
            let detail = "a transfer coding other than chunked is not supported";
            return failed(proxy_error(StatusCode::NOT_IMPLEMENTED, "bad_request", detail));
        }
        let was_h1 = req.version() != http::Version::HTTP_2;
        let called = self.service.unwrap_or(addr);
        let uri = match peer_uri(std::mem::take(req.uri_mut()), req.headers().get(header::HOST), called) {
            Ok(uri) => uri,
            Err(e) => {
                let resp = proxy_error(StatusCode::BAD_REQUEST, "bad_request", &format!("bad request target: {e}"));
                return failed(resp);
            }
        };
        *req.uri_mut() = uri;
        strip_hop_by_hop(req.headers_mut());
        if was_h1 {
            req.headers_mut().insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
        // HTTP/2 carries the authority as :authority; a Host header would duplicate it.
        req.headers_mut().remove(header::HOST);
        let client = req.version();
        *req.version_mut() = http::Version::HTTP_2;
        // Measured as it leaves, with what this side added (`traceparent`, the original
        // protocol): what passes here passes the peer's sidecar, which measures the same block
        // (one more `traceparent` if this side, its telemetry off, sent none: then the peer's
        // 431 below).
        if over_header_limit(request_header_list_size(&req)) {
            // Debug, not info: a client could fill the log with these at will.
            tracing::debug!("request refused: its header block is over the limit");
            return failed(header_too_large(client));
        }
        let resp = match self.send(req, addr, &id).await {
            Ok(resp) => resp,
            Err(generated) => return generated,
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // The peer's response says HTTP/2, which hyper's HTTP/1.1 server writes as the client's
        // version without deciding the connection's fate: an HTTP/1.0 keep-alive client (ab -k)
        // got neither `Connection: keep-alive` nor a close, and waited. Said as HTTP/1.1, hyper
        // answers it `keep-alive` or closes, as the client asked (an HTTP/2 server ignores it).
        parts.version = http::Version::HTTP_11;
        // The peer's own 431 closes an HTTP/1.1 connection as this side's does.
        if was_h1
            && parts.status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            && parts.headers.get(ERROR).is_some_and(|e| e == HEADER_TOO_LARGE)
        {
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let mut resp = Response::from_parts(parts, from_peer(body));
        let decided = peer_verdict(&mut resp);
        resp.extensions_mut().insert(decided);
        resp
    }

    /// Sends `req` over the pooled connection to the peer; once more on a new connection if
    /// the pooled one turns out closed (or told us GOAWAY) before the request left, since the
    /// peer never saw it, whatever its method. `Err` is the response to give the app.
    async fn send(
        &self,
        mut req: Request<ReqBody>,
        addr: SocketAddr,
        id: &SpiffeId,
    ) -> Result<Response<PeerBody>, Response<RespBody>> {
        let mut retried = false;
        loop {
            let state = &self.state;
            let connect = |addr, id| async move { state.pools.sender(state, addr, &id).await };
            let conn = self.with_failover(addr, id.clone(), connect).await.map_err(|e| {
                tracing::warn!(error = %e, "cannot reach peer");
                failed(proxy_error(StatusCode::BAD_GATEWAY, e.label(), &e.to_string()))
            })?;
            match conn.send(req).await {
                Ok(resp) => return Ok(resp),
                Err(SendError::Unsent(e, back)) if !retried => {
                    tracing::debug!(error = %e, "pooled connection closed before the request left; retrying");
                    retried = true;
                    req = *back;
                }
                // The stream was cancelled here, because the app's request body failed (a bad
                // chunk, a body shorter than its Content-Length): the app's fault, not the peer's.
                Err(SendError::Failed(e))
                    if e.is_reset() && !e.is_remote() && e.reason() == Some(h2::Reason::CANCEL) =>
                {
                    tracing::info!("the app's request body was malformed or ended early; the request was cancelled");
                    let detail = "the request body was malformed or ended before its declared length";
                    return Err(failed(proxy_error(StatusCode::BAD_REQUEST, "bad_request_body", detail)));
                }
                Err(SendError::Unsent(e, _) | SendError::Failed(e)) => {
                    tracing::warn!(error = %e, "request to peer failed");
                    let detail = format!("request to peer {addr} failed: {e}");
                    return Err(failed(proxy_error(StatusCode::BAD_GATEWAY, "peer_http", &detail)));
                }
            }
        }
    }
}

/// The absolute URI a request carries to the peer: the authority the app used (`Host`,
/// else the request target's, else the peer's address) and the app's path and query,
/// reused rather than re-parsed (this runs for every request).
fn peer_uri(uri: Uri, host: Option<&HeaderValue>, addr: SocketAddr) -> Result<Uri, http::Error> {
    let mut parts = uri.into_parts();
    // An absolute-form target's authority replaces Host (RFC 9112 §3.2.2: a proxy MUST).
    let authority = match (parts.authority.take(), host) {
        (Some(authority), _) => authority,
        (None, Some(host)) => Authority::try_from(host.as_bytes())?,
        (None, None) => Authority::try_from(addr.to_string())?,
    };
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    Ok(Uri::from_parts(parts)?)
}

/// A connection out of the mesh: egress policy, then a plain TCP tunnel.
async fn egress(state: Arc<ProxyState>, accepted: Accepted, addr: SocketAddr) {
    let Some(me) = state.id() else { return };
    let (remote, started) = (accepted.remote, accepted.started);
    let flow = EgressFlow { source: &me, destination_ip: addr.ip(), port: addr.port() };
    let view = state.policy.load();
    let outcome = match authorize_egress(&view, &flow) {
        Ok(permit) => {
            drop(view);
            state.metrics.flow("outbound", permit.decision().label(), "tcp");
            forward_egress(&state, permit, accepted, me, addr).await
        }
        Err(denial) => {
            drop(view);
            state.metrics.flow("outbound", "deny", "tcp");
            tracing::info!(reason = %denial, "egress denied");
            ConnOutcome::empty(denial.verdict(), None)
        }
    };
    state.telemetry.connection(|| outbound_facts(&state, remote, addr, None), started, outcome);
}

async fn forward_egress(
    state: &Arc<ProxyState>,
    permit: Permit,
    accepted: Accepted,
    me: SpiffeId,
    addr: SocketAddr,
) -> ConnOutcome {
    let Accepted { mut tcp, .. } = accepted;
    let verdict = permit.verdict();
    let flow = TrackedFlow::Egress { source: me, destination_ip: addr.ip(), port: addr.port() };
    let tracked = state.track(flow, CancellationToken::new(), permit.version());
    let unreachable = |e: Cow<'static, str>| ConnOutcome::empty(verdict.clone(), Some(e));
    let mut upstream = match tokio::time::timeout(EGRESS_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "egress destination unreachable");
            return unreachable(format!("egress_unreachable: {e}").into());
        }
        Err(_) => {
            tracing::info!("egress connect timed out");
            return unreachable("egress_unreachable: connect timed out".into());
        }
    };
    let _ = upstream.set_nodelay(true);
    tracing::debug!(reason = %permit.decision(), "egress allowed");
    let t = tunnel(&mut tcp, &mut upstream, &tracked.cancel).await;
    tracing::debug!(sent = t.sent, received = t.received, revoked = t.cancelled, error = ?t.error, "egress tunnel closed");
    let error = t.failure(("client_reset", "the calling app"), ("egress_failed", "the destination"));
    ConnOutcome { verdict, sent: t.sent, received: t.received, error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_on_every_address_is_reached_only_at_this_hosts_addresses() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let every = addr("0.0.0.0:15000");
        assert!(names_listener(every, addr("127.0.0.1:15000")));
        assert!(!names_listener(every, addr("127.0.0.1:15001")), "another port");
        // TEST-NET-1 (RFC 5737): no host's own address — a peer's admin port, not a loop.
        assert!(!names_listener(every, addr("192.0.2.7:15000")));
        assert!(names_listener(addr("192.0.2.7:15000"), addr("192.0.2.7:15000")), "the listener's own address");
        assert!(!names_listener(addr("127.0.0.1:15000"), addr("192.0.2.7:15000")));
    }

    fn addr() -> SocketAddr {
        "10.0.0.7:8080".parse().unwrap()
    }

    #[test]
    fn peer_uri_takes_the_host_header_and_keeps_path_and_query() {
        let host = HeaderValue::from_static("api.shop:9000");
        let uri = peer_uri("/v1/items?id=3".parse().unwrap(), Some(&host), addr()).unwrap();
        assert_eq!(uri.to_string(), "http://api.shop:9000/v1/items?id=3");
    }

    #[test]
    fn an_absolute_form_targets_authority_replaces_host() {
        let host = HeaderValue::from_static("a");
        let uri = peer_uri("http://api.shop/x".parse().unwrap(), Some(&host), addr()).unwrap();
        assert_eq!(uri.to_string(), "http://api.shop/x");
    }

    #[test]
    fn peer_uri_without_host_uses_the_targets_authority_then_the_peer_address() {
        let absolute = peer_uri("http://db.internal/x".parse().unwrap(), None, addr()).unwrap();
        assert_eq!(absolute.to_string(), "http://db.internal/x");
        let origin = peer_uri("/only/path".parse().unwrap(), None, addr()).unwrap();
        assert_eq!(origin.to_string(), "http://10.0.0.7:8080/only/path");
        let empty = peer_uri(Uri::default(), None, addr()).unwrap();
        assert_eq!(empty.path(), "/");
    }

    #[test]
    fn peer_uri_refuses_a_host_that_is_no_authority() {
        let host = HeaderValue::from_static("bad host/with space");
        assert!(peer_uri("/".parse().unwrap(), Some(&host), addr()).is_err());
    }
}
