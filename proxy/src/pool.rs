//! Sidecar-to-sidecar connections: one pooled, multiplexed HTTP/2-over-mTLS connection per
//! (peer address, expected identity), shared by every HTTP request going there, plus
//! one-off mTLS connections for byte tunnels and HTTP/1.1 upgrades.
//!
//! Pooling is why a new app connection (`Connection: close` clients) costs no TLS
//! handshake between sidecars, and why many app connections cost one peer connection. A
//! pooled connection is retired after [`MAX_AGE`], or sooner when a certificate of its
//! handshake (the peer's or this sidecar's) expires — the peer's inbound takes no request on
//! it after that —; in-flight requests finish on it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use trellis_identity::pki_types::ServerName;
use trellis_identity::{SpiffeId, VerifyError};

use crate::peer_h2::{ConnSlot, PeerConn};
use crate::state::{PeerProtocol, ProxyState};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pooled connections are replaced after this long.
pub const MAX_AGE: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot connect to peer {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("peer {addr} failed TLS verification: {error}")]
    Tls { addr: SocketAddr, error: VerifyError },
    #[error("peer {addr} did not negotiate {wanted}")]
    Alpn { addr: SocketAddr, wanted: &'static str },
    #[error("HTTP/2 with peer {addr} failed: {reason}")]
    Http { addr: SocketAddr, reason: String },
    #[error("no TLS configuration: {0}")]
    Config(String),
}

impl PeerError {
    /// The `x-trellis-error` / metric label for this failure.
    pub fn label(&self) -> &'static str {
        match self {
            PeerError::Connect { .. } => "peer_unreachable",
            PeerError::Tls { error, .. } => error.label(),
            PeerError::Alpn { .. } => "peer_protocol",
            PeerError::Http { .. } => "peer_http",
            PeerError::Config(_) => "config",
        }
    }
}

/// Opens an mTLS connection to `addr`, which must prove it is `expected`.
pub async fn connect_tls(
    state: &ProxyState,
    addr: SocketAddr,
    expected: &SpiffeId,
    protocol: PeerProtocol,
) -> Result<TlsStream<TcpStream>, PeerError> {
    let tls = state.tls.load_full().ok_or_else(|| PeerError::Config("no SVID yet".into()))?;
    let cfg = tls.client(expected, protocol).map_err(|e| PeerError::Config(e.to_string()))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| PeerError::Connect { addr, reason: "timed out".into() })?
        .map_err(|e| PeerError::Connect { addr, reason: e.to_string() })?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(cfg).connect(ServerName::IpAddress(addr.ip().into()), tcp),
    )
    .await
    .map_err(|_| PeerError::Connect { addr, reason: "TLS handshake timed out".into() })?
    .map_err(|e| match VerifyError::from_io(&e) {
        Some(error) => {
            state.metrics.handshake_failure(error.label());
            PeerError::Tls { addr, error }
        }
        None => PeerError::Connect { addr, reason: e.to_string() },
    })?;
    Ok(tls)
}

/// The monotonic instant of a certificate's wall-clock expiry (now, if it has passed).
pub fn instant_of(at: std::time::SystemTime) -> tokio::time::Instant {
    let left = at.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    let now = tokio::time::Instant::now();
    // An expiry too far ahead to add is as good as never for a connection.
    now.checked_add(left).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// One slot per peer and expected identity.
type Slot = Arc<ConnSlot>;

#[derive(Default)]
pub struct PeerPools {
    /// Per peer address, a slot per identity expected there (almost always one).
    slots: Mutex<HashMap<SocketAddr, Vec<(SpiffeId, Slot)>>>,
}

impl std::fmt::Debug for PeerPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerPools({})", self.slots.lock().map(|s| s.len()).unwrap_or(0))
    }
}

impl PeerPools {
    /// A sender on the live pooled connection to (`addr`, `expected`), connecting if needed.
    pub async fn sender(
        &self,
        state: &ProxyState,
        addr: SocketAddr,
        expected: &SpiffeId,
    ) -> Result<PeerConn, PeerError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            // Found without allocating: this runs for every request.
            let by_id = slots.entry(addr).or_default();
            match by_id.iter().find(|(id, _)| id == expected) {
                Some((_, slot)) => slot.clone(),
                None => {
                    let slot = Arc::new(ConnSlot::new(MAX_AGE));
                    by_id.push((expected.clone(), slot.clone()));
                    slot
                }
            }
        };
        slot.get_or_open(|| open_h2(state, addr, expected)).await
    }

    /// Forgets every pooled connection (after a trust bundle change).
    pub fn clear(&self) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

async fn open_h2(state: &ProxyState, addr: SocketAddr, expected: &SpiffeId) -> Result<PeerConn, PeerError> {
    // Read before the handshake: the SVID it presents is this one or a newer one.
    let own_not_after = state.creds.current().map(|c| c.svid.not_after());
    let tls = connect_tls(state, addr, expected, PeerProtocol::H2).await?;
    let session = tls.get_ref().1;
    if session.alpn_protocol() != Some(crate::state::ALPN_H2) {
        return Err(PeerError::Alpn { addr, wanted: "h2" });
    }
    let peer_not_after = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| trellis_identity::CertInfo::parse(leaf).ok())
        .map(|info| info.not_after);
    let valid_until = own_not_after.into_iter().chain(peer_not_after).min().map(instant_of);
    let pooled = crate::peer_h2::handshake(tls, addr, crate::peer_h2::SETTINGS)
        .await
        .map_err(|e| PeerError::Http { addr, reason: e.to_string() })?
        .retire_by(valid_until);
    tracing::debug!(%addr, peer = %expected, "opened pooled HTTP/2 connection to peer");
    Ok(pooled)
}
