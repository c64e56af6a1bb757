//! HTTP/1.1 WebSocket upgrades, passed through on a dedicated connection.
//!
//! Only `Upgrade: websocket` gets here ([`crate::http::is_websocket_upgrade`]); any other
//! upgrade offer (h2c in particular) is forwarded as an ordinary request without its
//! hop-by-hop headers, so it can never become a tunnel. An upgrade cannot ride the pooled
//! HTTP/2 connection, so the request goes over its own HTTP/1.1 connection — a fresh mTLS
//! connection to the peer sidecar (outbound) or a plain one to the app (inbound). When the far side answers `101 Switching Protocols`, the
//! client's and the far side's upgraded streams are spliced together until either closes
//! or the policy revokes the connection: inbound, the upgraded connection stays registered
//! with the flow that authorized it ([`Tracked`]), so a policy change that no longer allows
//! it closes it like an opaque TCP tunnel. A `101` for anything but `websocket` is refused.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use trellis_identity::SpiffeId;

use crate::conns::Tracked;
use crate::http::{ReqBody, RespBody, offers_only_websocket, proxy_error, relayed, strip_hop_by_hop};
use crate::state::{PeerProtocol, ProxyState};
use crate::telemetry::HttpConnSpan;

/// Where an upgrade request goes.
pub enum UpgradeTarget {
    App(SocketAddr),
    Peer { state: Arc<ProxyState>, addr: SocketAddr, id: SpiffeId },
}

/// Sends a WebSocket upgrade request on a new HTTP/1.1 connection and splices the upgraded
/// streams on 101. `tracked` (inbound) is the registration a policy revocation cancels; it
/// lives as long as the upgraded connection, and a revocation is recorded on `conn`, the
/// span of the HTTP connection that carried the upgrade.
pub async fn forward_upgrade(
    mut req: Request<ReqBody>,
    target: UpgradeTarget,
    tracked: Option<Tracked>,
    conn: Option<Arc<HttpConnSpan>>,
) -> Response<RespBody> {
    let client_side = hyper::upgrade::on(&mut req);
    *req.version_mut() = http::Version::HTTP_11;
    // Only the upgrade itself is hop-by-hop here: whatever else `Connection` names (or an
    // `HTTP2-Settings` riding along) must not reach the far side.
    strip_hop_by_hop(req.headers_mut());
    req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    req.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let origin = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    if let Ok(uri) = origin.parse() {
        *req.uri_mut() = uri;
    }
    let sent = match target {
        UpgradeTarget::App(app) => match TcpStream::connect(app).await {
            Ok(tcp) => send(TokioIo::new(tcp), req).await,
            Err(e) => Err(format!("the app at {app} is unreachable: {e}")),
        },
        UpgradeTarget::Peer { state, addr, id } => {
            match crate::pool::connect_tls(&state, addr, &id, PeerProtocol::Http1).await {
                Ok(tls) => send(TokioIo::new(tls), req).await,
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => return proxy_error(StatusCode::BAD_GATEWAY, "upgrade_failed", &e),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if !offers_only_websocket(resp.headers()) {
            // The far side switched to something nobody asked for: a byte tunnel no policy
            // would see into. Its connection is dropped with `resp`.
            tracing::info!(upgrade = ?resp.headers().get(header::UPGRADE), "refused a 101 to a protocol other than websocket");
            let detail = "the far side switched to a protocol other than the websocket that was asked for";
            return proxy_error(StatusCode::BAD_GATEWAY, "upgrade_refused", detail);
        }
        let far_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let cancel = tracked.as_ref().map_or_else(CancellationToken::new, |t| t.cancel.clone());
            match tokio::try_join!(client_side, far_side) {
                Ok((a, b)) => {
                    let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                    let t = crate::tunnel::tunnel(&mut a, &mut b, &cancel).await;
                    if t.cancelled {
                        tracing::info!(sent = t.sent, received = t.received, "upgraded connection closed: revoked");
                        if let Some(conn) = &conn {
                            conn.ended_by("revoked: a policy change ended this WebSocket");
                        }
                    } else {
                        tracing::debug!(sent = t.sent, received = t.received, error = ?t.error, "upgraded connection closed")
                    }
                }
                Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
            }
            // Deregistered only now: the upgraded connection was revocable all along.
            drop(tracked);
        });
    }
    let (mut parts, body) = resp.into_parts();
    // Keep Connection/Upgrade on a 101 (they are the point); drop the rest of hop-by-hop.
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        crate::http::strip_hop_by_hop(&mut parts.headers);
    } else {
        parts.headers.remove(header::TRANSFER_ENCODING);
    }
    Response::from_parts(parts, relayed(body))
}

/// hyper holds an upgraded connection's socket, so a WebSocket whose tunnel fails is closed
/// (with a FIN), not reset like an opaque TCP tunnel.
impl crate::tunnel::OverTcp for TokioIo<hyper::upgrade::Upgraded> {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

async fn send<T>(io: TokioIo<T>, req: Request<ReqBody>) -> Result<Response<Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upgrade connection ended with error");
        }
    });
    send.send_request(req).await.map_err(|e| e.to_string())
}
