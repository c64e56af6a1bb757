//! Open connections and the flows they were allowed for, so a policy change that revokes a
//! permission can close the connections it no longer allows (docs/policy.md, *Matching*).
//!
//! Each allowed TCP connection registers its flow and a cancellation token. On an HTTP
//! connection each request in flight registers instead (until its response body ends), under
//! the connection's family: one connection carries many callers' requests (the sidecars'
//! pooled HTTP/2 connection), so a revoked request ends alone — its stream reset, on HTTP/1.1
//! its connection closed — while the requests still allowed go on; later requests are judged
//! by the new policy as they come. An upgraded WebSocket keeps its request's registration
//! for its life. When a new snapshot is swapped in, [`ConnTracker::recheck`] evaluates every
//! registered flow against it and cancels the ones now denied.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Method;
use http::uri::PathAndQuery;
use hyper::body::{Body, Frame, SizeHint};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use trellis_identity::SpiffeId;
use trellis_policy::{EgressFlow, Flow, HttpRequest, PolicySnapshot};

use crate::http::AppBody;

/// The flow a connection was allowed for, owned so it can be re-evaluated later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackedFlow {
    /// Into this workload (inbound); `http` is the request's method and target (shared with
    /// the request: no copy).
    Mesh {
        source: Option<SpiffeId>,
        source_ip: IpAddr,
        destination: SpiffeId,
        port: u16,
        http: Option<(Method, PathAndQuery)>,
    },
    /// Out of the mesh (outbound egress).
    Egress { source: SpiffeId, destination_ip: IpAddr, port: u16 },
}

/// For the log line of a revocation: who, to what, and the request if it is one.
impl std::fmt::Display for TrackedFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrackedFlow::Mesh { source, source_ip, destination, port, http } => {
                match source {
                    Some(id) => write!(f, "{id} ({source_ip})")?,
                    None => write!(f, "unauthenticated {source_ip}")?,
                }
                write!(f, " -> {destination} port {port}")?;
                match http {
                    Some((method, target)) => write!(f, ", {method} {target}"),
                    None => Ok(()),
                }
            }
            TrackedFlow::Egress { source, destination_ip, port } => {
                write!(f, "{source} -> {} (egress)", std::net::SocketAddr::new(*destination_ip, *port))
            }
        }
    }
}

impl TrackedFlow {
    fn allowed_by(&self, snapshot: &PolicySnapshot) -> bool {
        match self {
            TrackedFlow::Mesh { source, source_ip, destination, port, http } => {
                let http = http.as_ref().map(|(m, p)| HttpRequest { method: m.as_str(), path: p.as_str() });
                let flow = Flow { source: source.as_ref(), source_ip: *source_ip, destination, port: *port, http };
                snapshot.evaluate(&flow).is_allowed()
            }
            TrackedFlow::Egress { source, destination_ip, port } => {
                let flow = EgressFlow { source, destination_ip: *destination_ip, port: *port };
                snapshot.evaluate_egress(&flow).is_allowed()
            }
        }
    }
}

/// A registration: the flow never changes once registered (a request in flight is one
/// registration), so it is shared, not locked.
#[derive(Debug)]
struct Entry {
    flow: Arc<TrackedFlow>,
    cancel: CancellationToken,
    /// The connection this registration belongs to: its own id, or the HTTP connection
    /// whose request (or upgraded WebSocket) it is. A revocation counts connections.
    family: u64,
}

#[derive(Debug, Default)]
pub struct ConnTracker {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
}

impl ConnTracker {
    /// Registers an allowed connection, to be closed through `cancel` if a later policy
    /// no longer allows `flow`; it is forgotten when the handle drops.
    pub fn track(self: &Arc<Self>, flow: TrackedFlow, cancel: CancellationToken) -> Tracked {
        self.register(flow, cancel, None)
    }

    /// A family for the flows one connection carries (an HTTP connection's requests).
    pub fn new_family(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a flow carried by the connection of `family` (a request in flight, or an
    /// upgraded WebSocket): judged on its own, counted as that one connection when several
    /// of its flows are revoked.
    pub fn track_in(self: &Arc<Self>, family: u64, flow: TrackedFlow, cancel: CancellationToken) -> Tracked {
        self.register(flow, cancel, Some(family))
    }

    fn register(self: &Arc<Self>, flow: TrackedFlow, cancel: CancellationToken, family: Option<u64>) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let family = family.unwrap_or(id);
        let flow = Arc::new(flow);
        self.lock().insert(id, Entry { flow: flow.clone(), cancel: cancel.clone(), family });
        Tracked { id, cancel, flow, tracker: self.clone() }
    }

    /// Cancels every connection `snapshot` no longer allows; returns how many connections
    /// that closed.
    pub fn recheck(&self, snapshot: &PolicySnapshot) -> usize {
        let live = self.lock();
        let mut closed: Vec<u64> = Vec::new();
        for entry in live.values() {
            let flow = &entry.flow;
            if !entry.cancel.is_cancelled() && !flow.allowed_by(snapshot) {
                tracing::info!(flow = %*flow, "a policy change revoked an open flow; ending it");
                entry.cancel.cancel();
                if !closed.contains(&entry.family) {
                    closed.push(entry.family);
                }
            }
        }
        closed.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A registered connection.
#[derive(Debug)]
pub struct Tracked {
    id: u64,
    pub cancel: CancellationToken,
    flow: Arc<TrackedFlow>,
    tracker: Arc<ConnTracker>,
}

impl Tracked {
    /// Judges the flow again against `snapshot` and closes the connection if it is no longer
    /// allowed; true if it closed it.
    pub fn recheck(&self, snapshot: &PolicySnapshot) -> bool {
        let allowed = self.flow.allowed_by(snapshot);
        if !allowed && !self.cancel.is_cancelled() {
            tracing::info!("policy changed while the connection was being admitted; closing it");
            self.cancel.cancel();
            return true;
        }
        false
    }
}

pin_project_lite::pin_project! {
    /// A relayed response body that stays registered (its request revocable) until it ends,
    /// and fails when a policy change revokes its request: hyper then resets the HTTP/2
    /// stream, or closes the HTTP/1.1 connection, instead of finishing the response.
    pub struct Revocable {
        #[pin]
        inner: AppBody,
        #[pin]
        revoked: WaitForCancellationFutureOwned,
        request: Tracked,
    }
}

impl Revocable {
    pub fn new(inner: AppBody, request: Tracked) -> Self {
        let revoked = request.cancel.clone().cancelled_owned();
        Revocable { inner, revoked, request }
    }
}

/// Why a revoked response ended early (what hyper logs, and the caller's stream reset).
#[derive(Debug, thiserror::Error)]
#[error("revoked: a policy change ended this request while its response was being relayed")]
pub struct Revoked;

impl Body for Revocable {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if this.revoked.poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(Revoked))));
        }
        this.inner.poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.tracker.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use trellis_policy::{Defaults, parse_documents};

    use super::*;

    fn snapshot(version: u64, port: u16) -> PolicySnapshot {
        let text = format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\n\
             spec: {{selector: '*', rules: [{{to: [{{ports: [{port}]}}]}}]}}\n"
        );
        PolicySnapshot::compile(version, parse_documents(&text).unwrap(), Defaults::default()).unwrap()
    }

    fn flow(port: u16) -> TrackedFlow {
        TrackedFlow::Mesh {
            source: Some(SpiffeId::parse("spiffe://td/web").unwrap()),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination: SpiffeId::parse("spiffe://td/api").unwrap(),
            port,
            http: None,
        }
    }

    #[test]
    fn flows_read_as_who_to_what() {
        let mut request = flow(8080);
        if let TrackedFlow::Mesh { http, .. } = &mut request {
            *http = Some((Method::GET, PathAndQuery::from_static("/api/x?y=1")));
        }
        assert_eq!(request.to_string(), "spiffe://td/web (10.0.0.1) -> spiffe://td/api port 8080, GET /api/x?y=1");
        let egress = TrackedFlow::Egress {
            source: SpiffeId::parse("spiffe://td/web").unwrap(),
            destination_ip: "203.0.113.9".parse().unwrap(),
            port: 443,
        };
        assert_eq!(egress.to_string(), "spiffe://td/web -> 203.0.113.9:443 (egress)");
    }

    /// A connection admitted by an older snapshot is judged again by the newer one it missed.
    #[test]
    fn a_late_registration_is_judged_by_the_newer_policy() {
        let tracker = Arc::new(ConnTracker::default());
        let kept = tracker.track(flow(80), CancellationToken::new());
        let revoked = tracker.track(flow(81), CancellationToken::new());
        let newer = snapshot(2, 80);
        assert!(!kept.recheck(&newer));
        assert!(!kept.cancel.is_cancelled());
        assert!(revoked.recheck(&newer));
        assert!(revoked.cancel.is_cancelled());
        assert!(!revoked.recheck(&newer), "counted once");
        // The tracker's own recheck skips what is already closed.
        assert_eq!(tracker.recheck(&newer), 0);
        drop(revoked);
        assert_eq!(tracker.len(), 1);
        assert_eq!(tracker.recheck(&snapshot(3, 81)), 1);
    }

    /// An upgraded WebSocket and its HTTP connection are one connection to count, whichever
    /// of the two the recheck reaches first; a WebSocket whose HTTP registration is gone
    /// still counts.
    #[test]
    fn a_websocket_and_its_http_connection_are_revoked_as_one() {
        let tracker = Arc::new(ConnTracker::default());
        let with_ws = |parent_first: bool| {
            let token = CancellationToken::new();
            let family = tracker.new_family();
            let http = tracker.track_in(family, flow(81), token.clone());
            // Tokens independent of each other, so the visiting order decides which is seen
            // first, as with a child token cancelled by its parent or not.
            let ws = tracker.track_in(family, flow(81), if parent_first { token } else { CancellationToken::new() });
            (http, ws)
        };
        let pairs = [with_ws(true), with_ws(false), with_ws(false)];
        let lone = {
            let (http, ws) = with_ws(false);
            drop(http);
            ws
        };
        assert_eq!(tracker.len(), 7);
        assert_eq!(tracker.recheck(&snapshot(2, 80)), 4, "three pairs and one lone WebSocket");
        assert!(pairs.iter().all(|(h, w)| h.cancel.is_cancelled() && w.cancel.is_cancelled()));
        assert!(lone.cancel.is_cancelled());
    }
}
