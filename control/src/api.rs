//! The control plane's HTTP API as types: request and response bodies shared by the server
//! (`server/`), the client (`client.rs`, used by proxies and the CLI) and
//! `docs/api/openapi.yaml`, which describes the same shapes.
//!
//! Every body is JSON. Errors are `{"error": "...", "details": [...]}` with a 4xx/5xx status.

use serde::{Deserialize, Serialize};
use trellis_identity::SpiffeId;

/// Paths, in one place so server and client cannot drift.
pub mod paths {
    pub const HEALTHZ: &str = "/healthz";
    pub const BUNDLE: &str = "/v1/bundle";
    pub const BOOTSTRAP: &str = "/v1/svid/bootstrap";
    pub const RENEW: &str = "/v1/svid/renew";
    pub const WATCH: &str = "/v1/watch";
    pub const ACK: &str = "/v1/watch/ack";
    pub const TOKENS: &str = "/v1/tokens";
    pub const POLICIES: &str = "/v1/policies";
    pub const CHECK: &str = "/v1/check";
    pub const WORKLOADS: &str = "/v1/workloads";
    pub const AUDIT: &str = "/v1/audit";
    pub const INJECT: &str = "/inject";
}

/// An error body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ErrorDetail>,
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)?;
        for d in &self.details {
            write!(f, "\n  document {:?}: {}: {}", d.document, d.path, d.message)?;
        }
        Ok(())
    }
}

/// One validation problem in a refused policy apply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorDetail {
    pub document: String,
    pub path: String,
    pub message: String,
}

/// `POST /v1/svid/bootstrap`: a join token (or a Kubernetes token) and a CSR.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A projected ServiceAccount token (audience `trellis`), when the control plane runs
    /// with Kubernetes attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_token: Option<String>,
    pub csr_pem: String,
    /// Addresses this workload answers on (`ip`, `ip:port`, or `ip:port=APP_PORT` for a listener that hands connections to the app on APP_PORT), for the endpoint registry.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// `POST /v1/svid/renew`: authenticated by the current SVID over mTLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr_pem: String,
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// The answer to bootstrap and renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SvidResponse {
    pub spiffe_id: SpiffeId,
    /// Leaf first, then intermediates.
    pub chain_pem: String,
    pub bundle_pem: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub spiffe_id: SpiffeId,
    /// Seconds; default 900.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub spiffe_id: SpiffeId,
    pub expires_at: u64,
}

/// `GET /v1/policies`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyList {
    pub version: u64,
    pub policies: Vec<PolicySummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicySummary {
    pub name: String,
    pub kind: String,
    pub selector: String,
    pub action: String,
    pub mode: String,
    pub rules: usize,
}

/// `POST /v1/check`: the same question `trellis policy check` asks offline.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    #[serde(default)]
    pub from: Option<SpiffeId>,
    #[serde(default)]
    pub source_ip: Option<String>,
    #[serde(default)]
    pub to: Option<SpiffeId>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    /// `ip:port`: resolved through the endpoint registry; outside the mesh → egress.
    #[serde(default)]
    pub to_address: Option<String>,
    /// `allow` or `deny` (default deny) for mesh flows no rule matches.
    #[serde(default)]
    pub default: Option<String>,
}

/// The live answer to a check: the policy version it was evaluated against plus the
/// decision as `trellis_policy::Decision` serializes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResponse {
    pub version: u64,
    /// The SPIFFE ID `to_address` resolved to, when it is in the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<SpiffeId>,
    /// When `to_address` is a Kubernetes Service: the endpoint (`podIP:targetPort`) judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// For `to_address`: the port the flow was judged at — the address's own, or the app's
    /// port behind a VM sidecar's listener (`--inbound LISTEN=APP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub decision: serde_json::Value,
}

/// One connected proxy, for `trellis workloads list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkloadStatus {
    pub session: u64,
    pub spiffe_id: SpiffeId,
    pub address: String,
    pub connected_since: u64,
    pub last_seen: u64,
    pub acked_version: Option<u64>,
    pub svid_expires_at: Option<u64>,
}

/// `POST /v1/watch/ack`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    pub session: u64,
    pub version: u64,
}

/// One event on the watch stream (`text/event-stream`, `event: update`). The first event
/// of a stream carries every field; later ones omit the parts that did not change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WatchEvent {
    pub session: u64,
    /// The policy version this event brings the proxy to.
    pub version: u64,
    /// The policies selecting this proxy's identity (complete set, not a delta).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<trellis_policy::Policy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<EndpointEntry>>,
    /// Kubernetes Services (`ClusterIP:port` → endpoints), in Kubernetes mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<ServiceEntry>>,
}

/// One Service port: its virtual `ip:port` and the ready endpoints (`podIP:targetPort`)
/// behind it (`crate::services`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceEntry {
    pub address: String,
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointEntry {
    pub address: String,
    pub spiffe_id: SpiffeId,
}
