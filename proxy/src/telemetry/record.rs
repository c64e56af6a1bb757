//! What one finished flow looks like: a [`FlowRecord`] built on the data path from facts
//! the proxy already holds (cheap: ids, addresses, `Arc`s, a cloned `Decision`), and turned
//! into span attributes ([`super::attrs`]) on the telemetry thread, where the strings are
//! formatted.
//!
//! A record travels by value and owns no heap memory in the common case (the path is kept
//! inline, see [`RecordPath`]): memory allocated on the data path and freed on the
//! telemetry thread made glibc's allocator contend between the two, which under load cost
//! more than everything else tracing does.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method};
use trellis_identity::SpiffeId;
use trellis_policy::Decision;

use super::context::SpanIds;

/// Which side of the workload a flow crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Facts about a connection that every span on it shares, built once per connection.
#[derive(Debug, Clone)]
pub struct ConnFacts {
    pub direction: Direction,
    /// The other end of the mTLS (or egress) connection: the peer sidecar inbound, the
    /// destination outbound.
    pub peer: SocketAddr,
    /// Outbound: the local app that opened the connection.
    pub client: Option<SocketAddr>,
    /// The application port the policy sees.
    pub server_port: u16,
    pub source: Option<SpiffeId>,
    pub destination: Option<SpiffeId>,
}

/// When a flow started: wall clock for the span, monotonic clock for its duration.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    pub at: SystemTime,
    pub mono: Instant,
}

impl Started {
    /// One clock read: the wall time is derived from the monotonic clock and an anchor
    /// taken once per process.
    pub fn now() -> Started {
        static ANCHOR: OnceLock<(SystemTime, Instant)> = OnceLock::new();
        let (wall, mono) = *ANCHOR.get_or_init(|| (SystemTime::now(), Instant::now()));
        let now = Instant::now();
        Started { at: wall + now.saturating_duration_since(mono), mono: now }
    }
}

/// How a flow was decided, as far as this proxy knows.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// This proxy evaluated the policy (inbound; egress).
    Local { decision: Decision, version: u64 },
    /// Denied because no policy has arrived yet (fail closed).
    NoPolicy,
    /// The peer's inbound sidecar decided, and said so in its response headers
    /// (`x-trellis-denied` on a 403, `x-trellis-audit` on an audit-deny).
    Peer { denied: Option<HeaderValue>, audit: Option<HeaderValue> },
    /// Passed on without a local decision: outbound TCP to a mesh peer, which decides.
    Forwarded,
    /// The inbound TLS handshake was refused (`label` is the bounded failure class).
    Handshake { label: &'static str, message: String },
    /// Never reached anything that decides (peer unreachable, TLS to the peer failed).
    Failed,
    /// An HTTP connection as a whole: admitted (mTLS verified inbound, passed to the peer
    /// outbound) while each of its requests was decided on its own, in its own span.
    HttpConnection { requests: u64, denied: u64 },
}

impl Verdict {
    /// `allow`, `deny`, `audit-deny` or `error`: the bounded `decision` label.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Local { decision, .. } => decision.label(),
            // The client gave up the handshake (it refused this sidecar's certificate): nothing
            // here denied it.
            Verdict::Handshake { label: "peer_rejected", .. } => "error",
            Verdict::NoPolicy | Verdict::Handshake { .. } => "deny",
            Verdict::Peer { denied: Some(_), .. } => "deny",
            Verdict::Peer { audit: Some(_), .. } => "audit-deny",
            Verdict::Peer { .. } | Verdict::Forwarded | Verdict::HttpConnection { .. } => "allow",
            Verdict::Failed => "error",
        }
    }

    pub fn is_denied(&self) -> bool {
        self.label() == "deny"
    }
}

/// Paths up to this many bytes are stored inline.
const INLINE_PATH: usize = 110;

/// A request path, inline when short (almost always) and on the heap otherwise.
#[derive(Clone)]
pub struct RecordPath(PathRepr);

#[derive(Clone)]
enum PathRepr {
    Inline { len: u8, buf: [u8; INLINE_PATH] },
    Heap(Box<str>),
}

impl RecordPath {
    pub fn new(s: &str) -> Self {
        if s.len() > INLINE_PATH {
            return RecordPath(PathRepr::Heap(s.into()));
        }
        let mut buf = [0u8; INLINE_PATH];
        buf[..s.len()].copy_from_slice(s.as_bytes());
        RecordPath(PathRepr::Inline { len: s.len() as u8, buf })
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Copied from a `&str` whole, so always valid UTF-8.
            PathRepr::Inline { len, buf } => std::str::from_utf8(&buf[..usize::from(*len)]).unwrap_or(""),
            PathRepr::Heap(s) => s,
        }
    }
}

impl std::fmt::Debug for RecordPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// The request half of an HTTP flow.
#[derive(Debug, Clone)]
pub struct HttpFacts {
    pub method: Method,
    pub path: RecordPath,
    pub status: u16,
    pub version: &'static str,
    /// The `tracestate` of a continued trace, for the span's `trace_state` (an owned copy;
    /// `None` on a new trace, which drops it).
    pub trace_state: Option<HeaderValue>,
}

/// One finished flow: an L4 connection, an HTTP request, or a refused handshake.
#[derive(Debug, Clone)]
pub struct FlowRecord {
    pub ids: SpanIds,
    pub facts: Arc<ConnFacts>,
    /// `tcp`, `http1` or `http2` (the `protocol` metric label).
    pub protocol: &'static str,
    pub http: Option<HttpFacts>,
    pub started: SystemTime,
    pub duration: Duration,
    pub verdict: Verdict,
    /// Client → server (the request direction).
    pub bytes_sent: u64,
    /// Server → client.
    pub bytes_received: u64,
    /// Why the proxy could not carry the flow, when that is not a policy denial.
    pub error: Option<Cow<'static, str>>,
}

impl FlowRecord {
    /// Exported whatever the sampling: denials, would-be denials, failures.
    pub fn must_export(&self) -> bool {
        self.verdict.label() != "allow" || self.error.is_some()
    }

    pub fn name(&self) -> &'static str {
        let inbound = self.facts.direction == Direction::Inbound;
        if matches!(self.verdict, Verdict::Handshake { .. }) {
            return "inbound TLS handshake";
        }
        let Some(http) = &self.http else {
            return if inbound { "inbound connection" } else { "outbound connection" };
        };
        match (inbound, http.method.as_str()) {
            (true, "GET") => "inbound GET",
            (true, "POST") => "inbound POST",
            (true, "PUT") => "inbound PUT",
            (true, "DELETE") => "inbound DELETE",
            (true, "PATCH") => "inbound PATCH",
            (true, "HEAD") => "inbound HEAD",
            (true, "OPTIONS") => "inbound OPTIONS",
            (true, _) => "inbound HTTP",
            (false, "GET") => "outbound GET",
            (false, "POST") => "outbound POST",
            (false, "PUT") => "outbound PUT",
            (false, "DELETE") => "outbound DELETE",
            (false, "PATCH") => "outbound PATCH",
            (false, "HEAD") => "outbound HEAD",
            (false, "OPTIONS") => "outbound OPTIONS",
            (false, _) => "outbound HTTP",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inline_and_long() {
        assert_eq!(RecordPath::new("/api/items").as_str(), "/api/items");
        let long = format!("/{}", "x".repeat(300));
        assert_eq!(RecordPath::new(&long).as_str(), long);
        assert_eq!(RecordPath::new(&long[..INLINE_PATH]).as_str(), &long[..INLINE_PATH]);
    }

    #[test]
    fn labels() {
        assert_eq!(Verdict::Peer { denied: None, audit: None }.label(), "allow");
        let audit = Verdict::Peer { denied: None, audit: Some(HeaderValue::from_static("default-deny")) };
        assert_eq!(audit.label(), "audit-deny");
        let denied = Verdict::Peer { denied: Some(HeaderValue::from_static("default-deny")), audit: None };
        assert!(denied.is_denied());
        assert_eq!(Verdict::Failed.label(), "error");
        assert_eq!(Verdict::Forwarded.label(), "allow");
    }
}
