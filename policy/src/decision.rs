//! What the evaluator is asked ([`Flow`], [`EgressFlow`]) and what it answers ([`Decision`]),
//! with the stable text and JSON forms that the CLI, the proxy's deny header, logs and spans
//! use.
//!
//! Inputs borrow from the caller and outputs hold no owned strings (a policy's name is an
//! `Arc<str>` shared with the snapshot), so a decision allocates nothing.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use trellis_identity::SpiffeId;

use crate::model::Action;
use crate::path::PathError;

/// A flow into a mesh workload, checked against AuthorizationPolicies.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    /// The peer's SPIFFE ID from its certificate; `None` for an unauthenticated peer, which can
    /// match only rules without identity or namespace conditions.
    pub source: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub destination: &'a SpiffeId,
    /// The application's port (the inbound target's, not the listener's: docs/telemetry.md, `server.port`).
    pub port: u16,
    /// `Some` for an HTTP request, `None` for a connection (or opaque TCP).
    pub http: Option<HttpRequest<'a>>,
}

/// The HTTP parts of a request, as received: the path is normalized by the evaluator.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The request-target path, query included or not.
    pub path: &'a str,
}

impl<'a> HttpRequest<'a> {
    /// A request as `policy check` and the API's check are asked about it, refused when no
    /// sidecar could receive it so: their answer would describe a request that never happens.
    pub fn checked(method: &'a str, path: &'a str) -> Result<Self, RequestError> {
        let token = !method.is_empty() && method.bytes().all(crate::is_tchar);
        if !token || method.len() > crate::limits::MAX_METHOD_LEN {
            return Err(RequestError::Method(method.into()));
        }
        // A CONNECT target is authority-form (`host:port`): a sidecar judges it as written,
        // an invalid path, whatever the policies say; `/x` would be judged as a path and allowed.
        if method == "CONNECT" && path.starts_with('/') {
            return Err(RequestError::ConnectWithPath);
        }
        Ok(HttpRequest { method, path })
    }
}

/// Why [`HttpRequest::checked`] refused a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error(
        "{0:?} is not an HTTP method (1 to {max} of letters, digits and !#$%&'*+-.^_`|~)",
        max = crate::limits::MAX_METHOD_LEN
    )]
    Method(String),
    #[error(
        "a CONNECT request's target is host:port, not a path; a sidecar judges it as written, \
         an invalid path, and denies it (give the host:port as the path to see that decision)"
    )]
    ConnectWithPath,
}

/// A connection from a mesh workload to an address outside the mesh, checked against
/// EgressPolicies.
#[derive(Debug, Clone, Copy)]
pub struct EgressFlow<'a> {
    pub source: &'a SpiffeId,
    pub destination_ip: IpAddr,
    pub port: u16,
}

/// The actions taken when no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    /// For flows between mesh workloads: deny (an operator may allow while onboarding).
    pub mesh: Action,
    /// For connections to addresses outside the mesh: deny.
    pub egress: Action,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults { mesh: Action::Deny, egress: Action::Deny }
    }
}

/// Why a flow got its action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A rule matched: the first in (policy name, rule index) order among the matching rules of
    /// the winning action.
    Policy { name: Arc<str>, rule: usize, action: Action },
    /// No rule matched; the default applied.
    Default { action: Action },
    /// The request path is ambiguous and was refused before any policy was consulted.
    InvalidPath(PathError),
}

impl Reason {
    pub fn action(&self) -> Action {
        match self {
            Reason::Policy { action, .. } | Reason::Default { action } => *action,
            Reason::InvalidPath(_) => Action::Deny,
        }
    }

    /// The value of the `x-trellis-denied` HTTP header: short, ASCII, stable:
    /// `policy=<name>; rule=<n>`, `default-deny` (or `default-allow`), `invalid-path`.
    pub fn header_value(&self) -> Cow<'static, str> {
        match self {
            Reason::Policy { name, rule, .. } => Cow::Owned(format!("policy={name}; rule={rule}")),
            Reason::Default { action: Action::Deny } => Cow::Borrowed("default-deny"),
            Reason::Default { action: Action::Allow } => Cow::Borrowed("default-allow"),
            Reason::InvalidPath(_) => Cow::Borrowed("invalid-path"),
        }
    }

    /// `policy`, `default` or `invalid-path`.
    pub fn kind(&self) -> &'static str {
        match self {
            Reason::Policy { .. } => "policy",
            Reason::Default { .. } => "default",
            Reason::InvalidPath(_) => "invalid-path",
        }
    }
}

/// `allow: policy "api-from-web" rule 0`, `deny: no rule matched (default deny)`,
/// `deny: invalid path: encoded '/' in path`.
impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Policy { name, rule, action } => write!(f, "{action}: policy {name:?} rule {rule}"),
            Reason::Default { action } => write!(f, "{action}: no rule matched (default {action})"),
            Reason::InvalidPath(e) => write!(f, "deny: invalid path: {e}"),
        }
    }
}

/// `{"kind": "policy", "policy": NAME, "rule": N, "action": "deny", "message": TEXT}`;
/// `{"kind": "default", "action": ..., "message": ...}`;
/// `{"kind": "invalid-path", "action": "deny", "error": CODE, "message": ...}`.
impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("kind", self.kind())?;
        if let Reason::Policy { name, rule, .. } = self {
            m.serialize_entry("policy", &**name)?;
            m.serialize_entry("rule", rule)?;
        }
        m.serialize_entry("action", self.action().as_str())?;
        if let Reason::InvalidPath(e) = self {
            m.serialize_entry("error", e.code())?;
        }
        m.serialize_entry("message", &self.to_string())?;
        m.end()
    }
}

/// What a flow would get at the end of a rollout: with the audit-mode policies that select it
/// enforced alongside the enforced ones, and the default deny.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditOutcome {
    pub action: Action,
    pub reason: Reason,
}

impl fmt::Display for AuditOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.reason.fmt(f)
    }
}

impl Serialize for AuditOutcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("action", self.action.as_str())?;
        m.serialize_entry("reason", &self.reason)?;
        m.end()
    }
}

/// The answer for one flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub reason: Reason,
    /// Present when at least one audit-mode policy selects the flow (its destination; for
    /// egress, its source): the outcome the flow would get with those policies enforced too
    /// and the default deny. Never changes `action`.
    pub audit: Option<AuditOutcome>,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.action == Action::Allow
    }

    /// The telemetry label: `allow`, `deny`, or `audit-deny` when the flow is allowed but
    /// would be denied with the audit-mode policies enforced.
    pub fn label(&self) -> &'static str {
        match (self.action, &self.audit) {
            (Action::Allow, Some(AuditOutcome { action: Action::Deny, .. })) => "audit-deny",
            (action, _) => action.as_str(),
        }
    }
}

/// The reason line (which starts with the action).
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.reason.fmt(f)
    }
}

/// `{"action": "allow"|"deny", "reason": {...}, "audit": null | {"action": ..., "reason": {...}}}`
impl Serialize for Decision {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("action", self.action.as_str())?;
        m.serialize_entry("reason", &self.reason)?;
        m.serialize_entry("audit", &self.audit)?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checked_request_is_one_a_sidecar_could_receive() {
        assert!(HttpRequest::checked("GET", "/x").is_ok());
        assert!(HttpRequest::checked("get", "/x").is_ok(), "any token reaches a sidecar as HTTP");
        assert!(HttpRequest::checked("CONNECT", "db:5432").is_ok(), "judged as written: an invalid path");
        assert_eq!(HttpRequest::checked("CONNECT", "/x").unwrap_err(), RequestError::ConnectWithPath);
        for bad in ["", "G T", "GET\r", &"X".repeat(crate::limits::MAX_METHOD_LEN + 1)] {
            assert_eq!(HttpRequest::checked(bad, "/x").unwrap_err(), RequestError::Method(bad.into()), "{bad:?}");
        }
    }
}
