//! HTTP/1.1 upgrades (WebSocket and friends), passed through on a dedicated connection.
//!
//! An upgrade cannot ride the pooled HTTP/2 connection, so the request goes over its own
//! HTTP/1.1 connection — a fresh mTLS connection to the peer sidecar (outbound) or a plain
//! one to the app (inbound). When the far side answers `101 Switching Protocols`, the
//! client's and the far side's upgraded streams are spliced together until either closes
//! or the policy revokes the connection.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use trellis_identity::SpiffeId;

use crate::http::{ReqBody, RespBody, proxy_error, relayed};
use crate::state::{PeerProtocol, ProxyState};

/// Where an upgrade request goes.
pub enum UpgradeTarget {
    App(SocketAddr),
    Peer { state: Arc<ProxyState>, addr: SocketAddr, id: SpiffeId },
}

/// Sends `req` on a new HTTP/1.1 connection and splices the upgraded streams on 101.
pub async fn forward_upgrade(
    mut req: Request<ReqBody>,
    target: UpgradeTarget,
    cancel: CancellationToken,
) -> Response<RespBody> {
    let client_side = hyper::upgrade::on(&mut req);
    *req.version_mut() = http::Version::HTTP_11;
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
        let far_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_side, far_side) {
                Ok((a, b)) => {
                    let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                    if let Err(e) = crate::tunnel::tunnel(&mut a, &mut b, &cancel).await {
                        tracing::debug!(error = %e, "upgraded connection ended with error");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
            }
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
