//! The mutating admission webhook: an `admission.k8s.io/v1` AdmissionReview with a Pod in
//! `request.object` in, the AdmissionReview response with a base64 JSONPatch out. The control
//! plane mounts [`admission_review`] at `POST /inject`; the MutatingWebhookConfiguration in
//! `deploy/kubernetes/` sends it pods created in namespaces labelled `trellis.dev/inject=enabled`.
//!
//! The patch is `json_patch::diff(original, injected)` with the same injection code as
//! `trellis inject`, so a pod admitted here equals the pod `trellis inject` writes. Pods that
//! opt out, use the host network, are already injected, or live in a skipped namespace are
//! allowed with no patch. A pod whose `trellis.dev/*` annotations are invalid is refused with
//! the reason, so the mistake is seen at `kubectl apply` rather than as a crash-looping pod.
//! An app probe that will fail in the mesh is admitted with an admission warning, which
//! `kubectl` prints, rather than found later as a pod that never becomes ready.

use base64::Engine;
use serde_json::{Value, json};

use super::pod::{inject_template, is_injected};
use super::{InjectConfig, Outcome, PodError, SkipReason};

const API_VERSION: &str = "admission.k8s.io/v1";

/// A request body that is not an AdmissionReview the webhook can answer; the server replies
/// 400 with this message.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("request body is not JSON: {0}")]
    NotJson(String),
    #[error("expected apiVersion {API_VERSION} kind AdmissionReview, got {api_version:?} {kind:?}")]
    WrongKind { api_version: String, kind: String },
    #[error("AdmissionReview has no {0}")]
    Missing(&'static str),
    #[error("cannot encode the AdmissionReview response: {0}")]
    Encode(String),
}

/// What the webhook decided for one pod (returned by [`review_pod`] for logging and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed with this JSONPatch; `warnings` are shown to the user who created the pod
    /// (`kubectl` prints an admission response's warnings).
    Patched { patch: json_patch::Patch, warnings: Vec<String> },
    /// Allowed unchanged.
    Skipped(SkipReason),
    /// Allowed unchanged: not a Pod CREATE (the webhook configuration should not send these).
    NotApplicable,
    /// Refused: the pod's `trellis.dev/*` annotations or spec cannot be injected.
    Refused(PodError),
}

/// Answers one AdmissionReview: `body` is the request JSON, the result the response JSON.
pub fn admission_review(body: &[u8], cfg: &InjectConfig) -> Result<Vec<u8>, WebhookError> {
    let review: Value = serde_json::from_slice(body).map_err(|e| WebhookError::NotJson(e.to_string()))?;
    let api_version = review.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = review.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version != API_VERSION || kind != "AdmissionReview" {
        return Err(WebhookError::WrongKind { api_version: api_version.into(), kind: kind.into() });
    }
    let request = review.get("request").filter(|r| r.is_object()).ok_or(WebhookError::Missing("request"))?;
    let uid = request.get("uid").and_then(Value::as_str).ok_or(WebhookError::Missing("request.uid"))?;
    let response = match review_pod(request, cfg)? {
        Decision::Patched { patch, warnings } => {
            let patch = serde_json::to_vec(&patch).map_err(|e| WebhookError::Encode(e.to_string()))?;
            let mut response = json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch),
            });
            if !warnings.is_empty() {
                // kubectl shows admission warnings only for pods it creates itself; a
                // Deployment's pods are created by its ReplicaSet, so the log is where an
                // operator finds them.
                let namespace = request.get("namespace").and_then(Value::as_str).unwrap_or("");
                let meta = request.pointer("/object/metadata");
                let name = meta.and_then(|m| m.get("name").or_else(|| m.get("generateName"))).and_then(Value::as_str);
                for w in &warnings {
                    tracing::warn!(namespace, pod = name.unwrap_or(""), warning = %w, "injected pod has a probe that will fail");
                }
                response["warnings"] = json!(warnings.iter().map(|w| format!("trellis: {w}")).collect::<Vec<_>>());
            }
            response
        }
        Decision::Skipped(_) | Decision::NotApplicable => json!({ "uid": uid, "allowed": true }),
        Decision::Refused(reason) => json!({
            "uid": uid,
            "allowed": false,
            "status": {
                "code": 400,
                "reason": "BadRequest",
                "message": format!("trellis sidecar injection: {reason}"),
            },
        }),
    };
    let out = json!({ "apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response });
    serde_json::to_vec(&out).map_err(|e| WebhookError::Encode(e.to_string()))
}

/// Decides for `request` (the AdmissionReview's `request` object).
pub fn review_pod(request: &Value, cfg: &InjectConfig) -> Result<Decision, WebhookError> {
    let object = request.get("object").filter(|o| o.is_object()).ok_or(WebhookError::Missing("request.object"))?;
    let resource_kind = request.get("kind").and_then(|k| k.get("kind")).and_then(Value::as_str);
    let operation = request.get("operation").and_then(Value::as_str);
    let is_pod = object.get("kind").and_then(Value::as_str) == Some("Pod") || resource_kind == Some("Pod");
    if !is_pod || operation.is_some_and(|op| op != "CREATE") {
        return Ok(Decision::NotApplicable);
    }
    // Pods created by controllers often have no metadata.namespace yet; the request has it.
    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .or_else(|| object.get("metadata").and_then(|m| m.get("namespace")).and_then(Value::as_str))
        .unwrap_or("");
    if cfg.skip_namespaces.iter().any(|n| n == namespace) {
        return Ok(Decision::Skipped(SkipReason::Namespace(namespace.to_string())));
    }
    if is_injected(object) {
        return Ok(Decision::Skipped(SkipReason::AlreadyInjected));
    }
    let mut pod = object.clone();
    match inject_template(false, &mut pod, cfg, "") {
        Ok(Outcome::Injected { warnings }) => Ok(Decision::Patched { patch: json_patch::diff(object, &pod), warnings }),
        Ok(Outcome::Skipped(reason)) => Ok(Decision::Skipped(reason)),
        Ok(_) => Ok(Decision::NotApplicable),
        Err(reason) => Ok(Decision::Refused(reason)),
    }
}
