//! Kubernetes sidecar injection: the one piece of code behind `trellis inject` (manifests on
//! disk) and the admission webhook (`POST /inject` on the control plane, see [`webhook`]).
//!
//! Injecting a pod spec adds exactly the objects Trellis owns and nothing else:
//! - the `trellis-init` init container, which runs `trellis proxy init` to install the
//!   nftables capture rules (NET_ADMIN and NET_RAW only);
//! - the `trellis-proxy` sidecar, as a *native* sidecar (an init container with
//!   `restartPolicy: Always`, right after `trellis-init`) or, with
//!   [`InjectConfig::classic_sidecar`], as the first entry of `containers`;
//! - the `trellis-token` projected ServiceAccount token volume (audience `trellis`), which the
//!   proxy presents to the control plane for TokenReview attestation;
//! - the `trellis.dev/injected: <version>` annotation on the pod (template) metadata.
//!
//! Every other field keeps its value and its position, with two exceptions the user asks for:
//! `trellis.dev/rewrite-app-probes: "true"` points app probes at the admin port (restored on
//! re-injection), and a manifest injected before that now opts out (disabled, hostNetwork)
//! has the owned objects taken out again. Re-injecting replaces the owned objects in place,
//! so injecting an injected manifest with the same configuration changes nothing, and
//! injecting it with a new image or control URL upgrades it.
//!
//! Layout: [`manifest`] reads and writes multi-document YAML/JSON and finds the pod template
//! of each workload kind; `pod` edits one pod template; `containers` builds the owned
//! objects; `annotations` reads the `trellis.dev/*` annotations that tune them.

mod annotations;
mod containers;
pub mod manifest;
mod pod;
pub mod probes;
mod quantity;
pub mod webhook;

pub use manifest::{Injected, inject_document, inject_manifests, parse_manifests, to_yaml};
pub use webhook::{WebhookError, admission_review};

/// The Trellis version written into `trellis.dev/injected` and the default image tag.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where injected proxies find the control plane unless told otherwise: the Service in
/// `deploy/kubernetes/`.
pub const DEFAULT_CONTROL_URL: &str = "https://trellis-control.trellis-system.svc:7443";
/// The image repository; the tag is [`VERSION`].
pub const IMAGE_REPOSITORY: &str = "ghcr.io/trellis-mesh/trellis";

/// `trellis.dev/inject: disabled` on a workload or pod template opts it out.
pub const ANNOTATION_INJECT: &str = "trellis.dev/inject";
/// Set on every injected pod template; its value is the Trellis version.
pub const ANNOTATION_INJECTED: &str = "trellis.dev/injected";
/// Comma list of ports whose inbound traffic is not captured.
pub const ANNOTATION_EXCLUDE_INBOUND_PORTS: &str = "trellis.dev/exclude-inbound-ports";
/// Comma list of destination ports whose outbound traffic is not captured.
pub const ANNOTATION_EXCLUDE_OUTBOUND_PORTS: &str = "trellis.dev/exclude-outbound-ports";
/// Comma list of destination CIDRs (IPv4 or IPv6) whose outbound traffic is not captured.
pub const ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: &str = "trellis.dev/exclude-outbound-cidrs";
/// Comma list of ports the proxy must never sniff (server-speaks-first protocols).
pub const ANNOTATION_OPAQUE_PORTS: &str = "trellis.dev/opaque-ports";
/// The proxy container's resources (Kubernetes quantities); unset ones keep the defaults
/// below. Linkerd spells these `config.linkerd.io/proxy-*`.
pub const ANNOTATION_PROXY_CPU_REQUEST: &str = "trellis.dev/proxy-cpu-request";
pub const ANNOTATION_PROXY_CPU_LIMIT: &str = "trellis.dev/proxy-cpu-limit";
pub const ANNOTATION_PROXY_MEMORY_REQUEST: &str = "trellis.dev/proxy-memory-request";
pub const ANNOTATION_PROXY_MEMORY_LIMIT: &str = "trellis.dev/proxy-memory-limit";
/// `"true"` points the app's HTTP, TCP and gRPC probes at the proxy's admin port; by default
/// they stay as written (HTTP probes are answered by the proxy on the captured port).
pub const ANNOTATION_REWRITE_APP_PROBES: &str = "trellis.dev/rewrite-app-probes";
/// `"allow"` makes mesh flows no policy matches allowed in this pod (`TRELLIS_DEFAULT_ACTION`):
/// for onboarding, while its ALLOW policies are watched in `mode: audit`. Absent: deny.
pub const ANNOTATION_DEFAULT_ACTION: &str = "trellis.dev/default-action";
/// The proxy's default resources: a request near its idle footprint, no CPU limit (a
/// throttled proxy adds latency to every request of its pod), and a memory limit sized in
/// docs/kubernetes.md.
pub const DEFAULT_PROXY_CPU_REQUEST: &str = "50m";
pub const DEFAULT_PROXY_MEMORY_REQUEST: &str = "32Mi";
pub const DEFAULT_PROXY_MEMORY_LIMIT: &str = "256Mi";

/// Names of the objects Trellis owns in a pod spec.
pub const INIT_CONTAINER_NAME: &str = "trellis-init";
pub const PROXY_CONTAINER_NAME: &str = "trellis-proxy";
pub const TOKEN_VOLUME_NAME: &str = "trellis-token";

/// The proxy's uid: its own traffic is exempt from capture, so an app must not run as it.
pub const PROXY_UID: u32 = 1337;
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
pub const ADMIN_PORT: u16 = 15000;

/// `ghcr.io/trellis-mesh/trellis:<version>`.
pub fn default_image() -> String {
    format!("{IMAGE_REPOSITORY}:{VERSION}")
}

/// Namespaces the webhook never injects, even when labelled: the cluster's own and Trellis'.
pub fn default_skip_namespaces() -> Vec<String> {
    ["kube-system", "kube-public", "trellis-system"].into_iter().map(String::from).collect()
}

/// What to inject, shared by the CLI and the webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// Image for both `trellis-init` and `trellis-proxy` (one binary, two roles).
    pub image: String,
    /// `TRELLIS_CONTROL` of the injected proxies.
    pub control_url: String,
    /// The trust bundle (PEM certificates) embedded as `TRELLIS_CA_BUNDLE_PEM`.
    pub ca_bundle_pem: String,
    /// Put the proxy in `containers` instead of a native sidecar (clusters before 1.29).
    pub classic_sidecar: bool,
    /// Namespaces the webhook skips (the CLI injects what it is given).
    pub skip_namespaces: Vec<String>,
}

impl InjectConfig {
    /// The defaults with `ca_bundle_pem`, refused unless it is a PEM bundle of CA certificates.
    pub fn new(ca_bundle_pem: impl Into<String>) -> Result<Self, InjectError> {
        let cfg = InjectConfig {
            image: default_image(),
            control_url: DEFAULT_CONTROL_URL.to_string(),
            ca_bundle_pem: ca_bundle_pem.into(),
            classic_sidecar: false,
            skip_namespaces: default_skip_namespaces(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what would otherwise surface only when a pod starts: the bundle parses as CA
    /// certificates and holds no private key (it is copied into every pod spec), the image
    /// and the control URL are set.
    pub fn validate(&self) -> Result<(), InjectError> {
        if self.ca_bundle_pem.contains("PRIVATE KEY-----") {
            return Err(InjectError::BadBundle(
                "it contains a PRIVATE KEY; the bundle is copied into every pod spec and must hold only \
                 certificates"
                    .into(),
            ));
        }
        trellis_identity::TrustBundle::from_pem(self.ca_bundle_pem.as_bytes())
            .map_err(|e| InjectError::BadBundle(e.to_string()))?;
        check_settings(&self.image, &self.control_url)
    }
}

/// Checks the image and control URL injection writes into pods, so that what a proxy would
/// refuse at startup (and crash-loop on) is refused here: by `trellis inject` before it writes
/// anything, by `trellis control run --webhook` before it serves.
pub fn check_settings(image: &str, control_url: &str) -> Result<(), InjectError> {
    if image.trim().is_empty() {
        return Err(InjectError::BadConfig("the image is empty".into()));
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(InjectError::BadConfig(format!("the image {image:?} has whitespace or control characters")));
    }
    if !control_url.starts_with("https://") {
        return Err(InjectError::BadConfig(format!(
            "the control URL {control_url:?} must start with https:// (proxies only talk TLS to the control plane)"
        )));
    }
    crate::client::parse_control_url(control_url).map_err(|e| InjectError::BadConfig(e.to_string()))?;
    Ok(())
}

/// What injection did to one document (or, for a `List`, to each item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The pod (template) now carries the sidecar. `warnings`: what will not work in the
    /// mesh as written (app probes the kubelet cannot pass once their port is captured).
    Injected { warnings: Vec<String> },
    /// A workload left as it was, and why.
    Skipped(SkipReason),
    /// A workload injected before that now opts out (or uses hostNetwork): Trellis' parts
    /// were taken out again, its probes restored.
    Removed(SkipReason),
    /// Not a workload (Service, ConfigMap, ...): passed through.
    NotAWorkload,
    /// A `List`: one outcome per item.
    List(Vec<Outcome>),
}

impl Outcome {
    /// How many pod templates were injected, counting into lists.
    pub fn injected_count(&self) -> usize {
        match self {
            Outcome::Injected { .. } => 1,
            Outcome::List(items) => items.iter().map(Outcome::injected_count).sum(),
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// `trellis.dev/inject: disabled` on the workload or its pod template.
    Disabled,
    /// `spec.hostNetwork: true`: capture rules would rewrite the node's own traffic.
    HostNetwork,
    /// The webhook saw `trellis.dev/injected` already (the CLI re-injects instead).
    AlreadyInjected,
    /// The webhook's request came from a namespace in [`InjectConfig::skip_namespaces`].
    Namespace(String),
}

/// A pod template that cannot be injected: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    /// A field Trellis must read or extend has the wrong shape (e.g. `containers` not a list).
    #[error("{field}: {reason}")]
    Malformed { field: String, reason: String },
    /// A `trellis.dev/*` annotation with a value that means nothing. `at`: the metadata it
    /// is in (`items[5].spec.template.metadata`), once known.
    #[error("{}annotation {annotation}: {reason} (value {value:?})", located(at))]
    BadAnnotation { annotation: String, value: String, reason: String, at: String },
}

fn located(at: &str) -> String {
    if at.is_empty() { String::new() } else { format!("{at}.annotations: ") }
}

impl PodError {
    /// Names the metadata a bad annotation is in (where it was found, for the first time).
    pub(crate) fn in_metadata(mut self, metadata: &str) -> Self {
        if let PodError::BadAnnotation { at, .. } = &mut self
            && at.is_empty()
        {
            *at = metadata.to_string();
        }
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// YAML that does not parse, or over a limit; `document` counts from 1 in the input.
    #[error("document {document}: YAML not read: {message}")]
    Yaml { document: usize, line: Option<u64>, message: String },
    /// JSON that does not parse.
    #[error("malformed JSON: {message}")]
    Json { line: usize, column: usize, message: String },
    /// A document that is not a Kubernetes object (no `apiVersion`/`kind`, a scalar, a
    /// sequence); `document` counts from 1.
    #[error("document {document}: {reason}")]
    NotAnObject { document: usize, reason: String },
    /// A workload that cannot be injected.
    #[error("document {document} ({kind} {name:?}): {error}")]
    Pod { document: usize, kind: String, name: String, error: Box<PodError> },
    #[error("CA bundle is not a PEM bundle of CA certificates: {0}")]
    BadBundle(String),
    #[error("bad injection config: {0}")]
    BadConfig(String),
    #[error("cannot write YAML: {0}")]
    Serialize(String),
}
