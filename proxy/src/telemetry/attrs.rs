//! A finished flow's span attributes, status and explanation, produced on the telemetry
//! thread by visiting a [`FlowRecord`]: values are borrowed from the record or formatted into
//! a reused [`Scratch`], so encoding a span (OTLP protobuf or JSON) allocates nothing.
//!
//! The attribute list is documented in `docs/telemetry.md`.

use std::fmt::Write;

use http::HeaderValue;
use trellis_policy::{Action, Decision, Reason};

use super::record::{Direction, FlowRecord, Verdict};

/// An attribute value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attr<'a> {
    Str(&'a str),
    Int(i64),
}

/// Buffers reused from span to span for the values that must be formatted.
#[derive(Debug, Default)]
pub struct Scratch {
    reason: String,
    audit: String,
    peer: String,
    client: String,
}

/// OTLP status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    Unset = 0,
    Error = 2,
}

/// The decision in words: which policy and rule, why, and what audit mode says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Explained<'a> {
    pub policy: Option<&'a str>,
    pub rule: Option<i64>,
    pub reason: Option<&'a str>,
    pub audit: Option<&'a str>,
    pub version: Option<u64>,
}

impl FlowRecord {
    /// Explains the verdict, formatting texts into `reason` and `audit`.
    pub fn explain<'a>(&'a self, reason: &'a mut String, audit: &'a mut String) -> Explained<'a> {
        reason.clear();
        audit.clear();
        match &self.verdict {
            Verdict::Local { decision, version } => local(decision, *version, reason, audit),
            Verdict::NoPolicy => Explained {
                reason: Some("deny: no policy received from the control plane yet (fail closed)"),
                ..Explained::default()
            },
            Verdict::Peer { denied, audit: finding } => peer(denied.as_ref(), finding.as_ref(), reason, audit),
            Verdict::Handshake { message, .. } => {
                let _ = write!(reason, "TLS handshake refused: {message}");
                let reason: &'a String = reason;
                Explained { reason: Some(reason), ..Explained::default() }
            }
            Verdict::HttpConnection { .. } => Explained { reason: Some(HTTP_CONNECTION), ..Explained::default() },
            Verdict::Forwarded | Verdict::Failed => Explained::default(),
        }
    }

    /// [`FlowRecord::status`], explaining into `s`.
    pub fn status_in<'a>(&'a self, s: &'a mut Scratch) -> (StatusCode, Option<&'a str>) {
        let e = self.explain(&mut s.reason, &mut s.audit);
        self.status(&e)
    }

    /// Error for a denial (with its reason) or a failure (with what failed).
    pub fn status<'a>(&'a self, e: &Explained<'a>) -> (StatusCode, Option<&'a str>) {
        if self.verdict.is_denied() || matches!(self.verdict, Verdict::Handshake { .. }) {
            return (StatusCode::Error, Some(e.reason.unwrap_or("denied")));
        }
        match &self.error {
            Some(err) => (StatusCode::Error, Some(err)),
            None => (StatusCode::Unset, None),
        }
    }

    /// The semconv `error.type`: a bounded class of what went wrong.
    pub fn error_type(&self) -> Option<&str> {
        match (&self.verdict, &self.error) {
            (Verdict::Handshake { label, .. }, _) => Some(label),
            (v, _) if v.is_denied() => Some("policy_denied"),
            (_, Some(e)) => Some(e.split(':').next().unwrap_or("error").trim()),
            _ => None,
        }
    }

    /// Calls `f` with every attribute of this flow's span.
    pub fn visit(&self, s: &mut Scratch, mut f: impl FnMut(&'static str, Attr<'_>)) {
        let Scratch { reason, audit, peer, client } = s;
        let facts = &self.facts;
        f("trellis.direction", Attr::Str(facts.direction.label()));
        f("trellis.decision", Attr::Str(self.verdict.label()));
        f("trellis.protocol", Attr::Str(self.protocol));
        f("network.transport", Attr::Str("tcp"));
        peer.clear();
        let _ = write!(peer, "{}", facts.peer.ip());
        f("network.peer.address", Attr::Str(peer));
        f("network.peer.port", Attr::Int(i64::from(facts.peer.port())));
        f("server.port", Attr::Int(i64::from(facts.server_port)));
        if let Some(c) = facts.client {
            client.clear();
            let _ = write!(client, "{}", c.ip());
            f("client.address", Attr::Str(client));
            f("client.port", Attr::Int(i64::from(c.port())));
        }
        if let Some(id) = &facts.source {
            f("trellis.source.spiffe_id", Attr::Str(id.as_str()));
        }
        if let Some(id) = &facts.destination {
            f("trellis.destination.spiffe_id", Attr::Str(id.as_str()));
        }
        self.visit_explained(self.explain(reason, audit), &mut f);
        if self.http.is_some() {
            self.visit_http(&mut f);
        } else {
            // No semantic convention names a connection's bytes; HTTP uses the body sizes.
            f("trellis.bytes.sent", Attr::Int(self.bytes_sent as i64));
            f("trellis.bytes.received", Attr::Int(self.bytes_received as i64));
        }
        if let Verdict::HttpConnection { requests, denied } = self.verdict {
            f("trellis.http.requests", Attr::Int(requests as i64));
            f("trellis.http.requests.denied", Attr::Int(denied as i64));
        }
        if let Some(t) = self.error_type() {
            f("error.type", Attr::Str(t));
        }
    }

    fn visit_explained(&self, e: Explained<'_>, f: &mut impl FnMut(&'static str, Attr<'_>)) {
        let optional = [("trellis.policy", e.policy), ("trellis.reason", e.reason), ("trellis.audit", e.audit)];
        for (key, value) in optional {
            if let Some(v) = value {
                f(key, Attr::Str(v));
            }
        }
        if let Some(r) = e.rule {
            f("trellis.rule", Attr::Int(r));
        }
        if let Some(v) = e.version {
            f("trellis.policy.version", Attr::Int(v as i64));
        }
    }

    fn visit_http(&self, f: &mut impl FnMut(&'static str, Attr<'_>)) {
        let Some(h) = &self.http else { return };
        f("network.protocol.name", Attr::Str("http"));
        f("network.protocol.version", Attr::Str(h.version));
        f("http.request.method", Attr::Str(h.method.as_str()));
        f("url.path", Attr::Str(h.path.as_str()));
        // 0: the request ended before any response.
        if h.status != 0 {
            f("http.response.status_code", Attr::Int(i64::from(h.status)));
        }
        f("http.request.body.size", Attr::Int(self.bytes_sent as i64));
        f("http.response.body.size", Attr::Int(self.bytes_received as i64));
    }

    /// OTLP span kind: SERVER inbound, CLIENT outbound.
    pub fn kind(&self) -> i32 {
        match self.facts.direction {
            Direction::Inbound => 2,
            Direction::Outbound => 3,
        }
    }
}

/// This proxy's decision. The reason is spelled out only when it is not a plain allow
/// (policy and rule already say which rule allowed).
fn local<'a>(d: &'a Decision, version: u64, reason: &'a mut String, audit: &'a mut String) -> Explained<'a> {
    let (policy, rule) = match &d.reason {
        Reason::Policy { name, rule, .. } => (Some(&**name), Some(*rule as i64)),
        _ => (None, None),
    };
    // `trellis.audit` is the audit-deny finding: on a flow the enforced policy denied it
    // would only repeat (or contradict) the reason.
    let audit_deny = d.audit.as_ref().filter(|a| d.is_allowed() && a.action == Action::Deny);
    if let Some(a) = audit_deny {
        let _ = write!(audit, "{}", a.reason);
    }
    if !d.is_allowed() || audit_deny.is_some() || policy.is_none() {
        let _ = write!(reason, "{}", d.reason);
    }
    let (reason, audit): (&'a String, &'a String) = (reason, audit);
    Explained {
        policy,
        rule,
        reason: (!reason.is_empty()).then_some(reason.as_str()),
        audit: audit_deny.map(|_| audit.as_str()),
        version: Some(version),
    }
}

/// `trellis.reason` of an HTTP connection's span: it is admitted as a whole, its requests
/// are not.
const HTTP_CONNECTION: &str = "HTTP connection: each request on it is decided on its own, in its own span";

/// `trellis.reason` of an outbound audit-deny: the peer allowed it and names no rule.
const PEER_ALLOWED: &str = "allow: by the peer sidecar's policy";

/// The peer's decision, from its `policy=NAME; rule=N` / `default-deny` header values.
fn peer<'a>(
    denied: Option<&'a HeaderValue>,
    finding: Option<&'a HeaderValue>,
    reason: &'a mut String,
    audit: &'a mut String,
) -> Explained<'a> {
    let denied = denied.and_then(|v| v.to_str().ok());
    let (policy, rule) = denied.map(parse_policy_rule).unwrap_or_default();
    if let Some(d) = denied {
        write_peer_reason(reason, d);
    }
    if let Some(a) = finding.and_then(|v| v.to_str().ok()) {
        write_peer_reason(audit, a);
    }
    let (reason, audit): (&'a String, &'a String) = (reason, audit);
    // An audit-deny is an allow by the peer, which says only what audit mode would do.
    let reason = match denied {
        Some(_) => Some(reason.as_str()),
        None if !audit.is_empty() => Some(PEER_ALLOWED),
        None => None,
    };
    Explained { policy, rule, reason, audit: (!audit.is_empty()).then_some(audit.as_str()), version: None }
}

/// The peer's `x-trellis-denied` / `x-trellis-audit` value in the words the peer's own span
/// uses for the same decision (`trellis_policy::Reason`'s), so the two spans of one request
/// say the same thing: `policy=NAME; rule=N` → `deny: policy "NAME" rule N`, `default-deny` →
/// `deny: no rule matched (default deny)`. Anything else is kept as sent.
fn write_peer_reason(out: &mut String, header: &str) {
    let _ = match (parse_policy_rule(header), header) {
        ((Some(name), Some(rule)), _) => write!(out, "deny: policy {name:?} rule {rule}"),
        (_, "default-deny") => write!(out, "deny: no rule matched (default deny)"),
        (_, "invalid-path") => write!(out, "deny: invalid path"),
        (_, "no-policy-yet") => write!(out, "deny: no policy received from the control plane yet (fail closed)"),
        (_, other) => write!(out, "deny: {other}"),
    };
}

/// `policy=NAME; rule=N` → (NAME, N).
fn parse_policy_rule(s: &str) -> (Option<&str>, Option<i64>) {
    let mut policy = None;
    let mut rule = None;
    for part in s.split(';').map(str::trim) {
        if let Some(p) = part.strip_prefix("policy=") {
            policy = Some(p);
        } else if let Some(r) = part.strip_prefix("rule=") {
            rule = r.parse().ok();
        }
    }
    (policy, rule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::tests::sample_record;
    use std::collections::BTreeMap;

    fn attrs(r: &FlowRecord) -> BTreeMap<&'static str, String> {
        let mut out = BTreeMap::new();
        r.visit(&mut Scratch::default(), |k, v| {
            let v = match v {
                Attr::Str(s) => s.to_string(),
                Attr::Int(i) => i.to_string(),
            };
            out.insert(k, v);
        });
        out
    }

    #[test]
    fn a_handshake_the_client_gave_up_is_an_error_not_a_denial() {
        let mut r = sample_record();
        r.verdict = Verdict::Handshake { label: "peer_rejected", message: "peer refused the handshake".into() };
        let a = attrs(&r);
        assert_eq!((a["trellis.decision"].as_str(), a["error.type"].as_str()), ("error", "peer_rejected"));
        let (mut reason, mut audit) = (String::new(), String::new());
        let e = r.explain(&mut reason, &mut audit);
        assert_eq!(r.status(&e).0, StatusCode::Error);
        assert!(r.must_export(), "failures are always exported");
        r.verdict = Verdict::Handshake { label: "no_certificate", message: "no certificate".into() };
        assert_eq!(attrs(&r)["trellis.decision"], "deny");
    }

    #[test]
    fn peer_denial_names_policy_and_rule() {
        let mut r = sample_record();
        r.verdict = Verdict::Peer { denied: Some(HeaderValue::from_static("policy=no; rule=2")), audit: None };
        let a = attrs(&r);
        assert_eq!(a["trellis.policy"], "no");
        assert_eq!(a["trellis.rule"], "2");
        assert_eq!(a["trellis.decision"], "deny");
        assert_eq!(a["error.type"], "policy_denied");
        let (mut reason, mut audit) = (String::new(), String::new());
        let e = r.explain(&mut reason, &mut audit);
        assert_eq!(r.status(&e), (StatusCode::Error, Some("deny: policy \"no\" rule 2")), "the inbound's words");
        r.verdict = Verdict::Peer { denied: Some(HeaderValue::from_static("default-deny")), audit: None };
        let (mut reason, mut audit) = (String::new(), String::new());
        let e = r.explain(&mut reason, &mut audit);
        assert_eq!(r.status(&e), (StatusCode::Error, Some("deny: no rule matched (default deny)")));
    }

    #[test]
    fn an_enforced_deny_carries_no_audit_finding() {
        use trellis_policy::AuditOutcome;
        let deny = Reason::Policy { name: "no-secrets".into(), rule: 0, action: Action::Deny };
        let audit = AuditOutcome { action: Action::Deny, reason: deny.clone() };
        let mut r = sample_record();
        r.verdict = Verdict::Local {
            decision: Decision { action: Action::Deny, reason: deny, audit: Some(audit.clone()) },
            version: 4,
        };
        let a = attrs(&r);
        assert_eq!(a["trellis.decision"], "deny");
        assert!(a["trellis.reason"].contains("no-secrets"), "{a:?}");
        assert!(!a.contains_key("trellis.audit"), "audit is for audit-deny only: {a:?}");
        // Allowed, audit mode would deny: both are there.
        let allow = Reason::Policy { name: "api".into(), rule: 1, action: Action::Allow };
        r.verdict = Verdict::Local {
            decision: Decision { action: Action::Allow, reason: allow, audit: Some(audit) },
            version: 4,
        };
        let a = attrs(&r);
        assert_eq!(a["trellis.decision"], "audit-deny");
        assert!(a["trellis.audit"].contains("no-secrets") && a["trellis.reason"].contains("api"), "{a:?}");
    }

    #[test]
    fn allowed_and_audit_findings() {
        let mut r = sample_record();
        r.verdict = Verdict::Peer { denied: None, audit: Some(HeaderValue::from_static("default-deny")) };
        let a = attrs(&r);
        assert_eq!(
            (a["trellis.decision"].as_str(), a["trellis.audit"].as_str()),
            ("audit-deny", "deny: no rule matched (default deny)")
        );
        assert_eq!(a["trellis.reason"], PEER_ALLOWED, "audit-deny spans carry a reason");
        assert!(!a.contains_key("error.type"));
        r.verdict = Verdict::Forwarded;
        let (mut reason, mut audit) = (String::new(), String::new());
        let e = r.explain(&mut reason, &mut audit);
        assert_eq!(r.status(&e), (StatusCode::Unset, None));
        assert_eq!(parse_policy_rule("default-deny"), (None, None));
    }
}
