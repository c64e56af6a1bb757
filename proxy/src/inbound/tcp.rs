//! Inbound, opaque TCP: one L4 decision for the connection, then a byte tunnel to the app.
//!
//! Reached from [`super::dispatch`] once the peer is authenticated and the connection is
//! known not to carry HTTP (ALPN, a declared opaque port, or bytes that are not HTTP). A
//! [`Permit`] opens the tunnel; a denial closes the connection after a lingering read. The
//! connection's span records the decision and what the tunnel carried.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::{ConnCtx, PeerIo};
use crate::authz::{Permit, authorize};
use crate::conns::TrackedFlow;
use crate::sniff::{LATE_HTTP, LateHttpGuard};
use crate::telemetry::ConnOutcome;
use crate::tunnel::{Failure, Side, Transferred, tunnel};

const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// After a denied connection is shut down: what the caller had already sent is read and
/// dropped (at most 256 KiB, for at most a second), so that closing it is a FIN rather than a
/// TCP reset — which the calling sidecar would pass on to its app as a reset and record as a
/// failure, when the connection was only denied. (nginx's lingering close, for the same reason.)
async fn linger(io: &mut PeerIo) {
    let drain = async {
        // On the heap: an array here would make every inbound TCP connection's future 4 KiB
        // larger, denied or not (this future is inlined into `tcp_stage`'s).
        let mut buf = vec![0u8; 4096];
        let mut left = 256 * 1024usize;
        while left > 0 {
            match tokio::io::AsyncReadExt::read(io, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// One L4 decision, then a byte tunnel to the app; the connection's span records both.
pub(super) async fn tcp_stage(ctx: Arc<ConnCtx>, mut io: PeerIo, unsniffed: bool) {
    let view = ctx.state.policy.load();
    let permit = match authorize(&view, &ctx.flow(None)) {
        Ok(p) => p,
        Err(denial) => {
            drop(view);
            ctx.state.metrics.flow("inbound", "deny", "tcp");
            tracing::info!(reason = %denial, "connection denied");
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
            linger(&mut io).await;
            let verdict = denial.verdict();
            ctx.record(ConnOutcome::empty(verdict, None));
            return;
        }
    };
    drop(view);
    ctx.state.metrics.flow("inbound", permit.decision().label(), "tcp");
    let verdict = permit.verdict();
    let (t, error) = forward_tcp(&ctx, permit, io, unsniffed).await;
    ctx.record(ConnOutcome { verdict, sent: t.sent, received: t.received, error });
}

/// Tunnels an authorized connection to the app until either side closes or the policy
/// revokes it; returns what it carried and why it could not, if it could not.
async fn forward_tcp(
    ctx: &ConnCtx,
    permit: Permit,
    mut io: PeerIo,
    unsniffed: bool,
) -> (Transferred, Option<Cow<'static, str>>) {
    let flow = TrackedFlow::Mesh {
        source: Some(ctx.peer.clone()),
        source_ip: ctx.remote.ip(),
        destination: ctx.me.clone(),
        port: ctx.app.port(),
        http: None,
    };
    let tracked = ctx.state.track(flow, ctx.cancel.clone(), permit.version());
    let mut app = match tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(ctx.app)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(app = %ctx.app, error = %e, "app unreachable");
            return (Transferred::default(), Some(format!("app_unreachable: {e}").into()));
        }
        Err(_) => {
            tracing::warn!(app = %ctx.app, "app connect timed out");
            return (Transferred::default(), Some("app_unreachable: connect timed out".into()));
        }
    };
    let _ = app.set_nodelay(true);
    tracing::debug!(policy_version = permit.version(), reason = %permit.decision(), "connection allowed");
    // Opaque only because the client was silent (a port not declared opaque): an HTTP request
    // arriving late must not reach the app unparsed (`LateHttpGuard`).
    let t = if !unsniffed || ctx.state.config.is_opaque(ctx.app.port()) {
        tunnel(&mut io, &mut app, &tracked.cancel).await
    } else {
        tunnel(&mut LateHttpGuard::new(io), &mut app, &tracked.cancel).await
    };
    tracing::debug!(sent = t.sent, received = t.received, revoked = t.cancelled, error = ?t.error, "connection closed");
    let error = match t.error {
        Some(Failure { side: Side::Client, kind: std::io::ErrorKind::PermissionDenied }) => {
            tracing::info!("{LATE_HTTP}; reset");
            Some(Cow::Owned(format!("late_http: {LATE_HTTP}")))
        }
        _ if t.cancelled => Some(Cow::Borrowed("revoked: a policy change ended this connection")),
        // The app's reset (or broken connection) was passed on to the peer as a reset; or the
        // calling sidecar reset the tunnel, passing on its app's reset (or it failed), and the
        // app got a reset too.
        _ => t.failure(("peer_reset", "the calling sidecar"), ("app_failed", "the app")),
    };
    (t, error)
}
