//! The optional integrations `trellis control run` can switch on, as [`Hooks`](crate::server::Hooks) for the
//! server: Kubernetes attestation (a projected ServiceAccount token, verified with the
//! TokenReview API, becomes `spiffe://<td>/ns/<namespace>/sa/<serviceaccount>`) and the
//! sidecar-injection admission webhook (the same code as `trellis inject`).

use std::sync::{Arc, Mutex};

use trellis_identity::{SpiffeId, TrustDomain};

use crate::inject::{InjectConfig, admission_review};
use crate::kube::{KubeError, TokenReviewer};
use crate::server::{ApiError, AttestHook, WebhookHook};

/// Attestation by TokenReview: the token's service account, in `trust_domain`.
pub fn k8s_attestation(reviewer: TokenReviewer, trust_domain: TrustDomain) -> AttestHook {
    let reviewer = Arc::new(reviewer);
    Arc::new(move |token: String| {
        let (reviewer, td) = (reviewer.clone(), trust_domain.clone());
        Box::pin(async move {
            let who = reviewer.review(&token).await.map_err(kube_error)?;
            SpiffeId::workload(&td, &who.namespace, &who.service_account)
                .map_err(|e| ApiError::forbidden(format!("service account cannot be named as a SPIFFE ID: {e}")))
        })
    })
}

/// A token the API server judged bad is 401 (the proxy gives up); an API server that could
/// not judge is 503 (the proxy retries with backoff).
fn kube_error(e: KubeError) -> ApiError {
    match e {
        KubeError::Rejected(_)
        | KubeError::EmptyToken
        | KubeError::WrongAudience(_)
        | KubeError::NotServiceAccount(_) => ApiError::unauthorized(format!("Kubernetes token refused: {e}")),
        other => {
            tracing::warn!(error = %other, "TokenReview failed");
            ApiError::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot verify the Kubernetes token now: {other}"),
            )
        }
    }
}

/// The injection webhook. Its configuration embeds the trust bundle, so it is rebuilt when
/// the bundle changes and reused otherwise. `image` and `control_url` are what injected
/// proxies get (`None` keeps the defaults).
pub fn injection_webhook(image: Option<String>, control_url: Option<String>) -> WebhookHook {
    let cache: Mutex<Option<(String, Arc<InjectConfig>)>> = Mutex::new(None);
    Arc::new(move |body: &[u8], bundle_pem: &str| {
        let cfg = {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            match cache.as_ref() {
                Some((pem, cfg)) if pem == bundle_pem => cfg.clone(),
                _ => {
                    let mut cfg = InjectConfig::new(bundle_pem).map_err(|e| e.to_string())?;
                    if let Some(image) = &image {
                        cfg.image = image.clone();
                    }
                    if let Some(url) = &control_url {
                        cfg.control_url = url.clone();
                    }
                    cfg.validate().map_err(|e| e.to_string())?;
                    let cfg = Arc::new(cfg);
                    *cache = Some((bundle_pem.to_string(), cfg.clone()));
                    cfg
                }
            }
        };
        admission_review(body, &cfg).map_err(|e| e.to_string())
    })
}
