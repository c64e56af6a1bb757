//! The admin listener (default `127.0.0.1:15000`): `/live`, `/ready`, `/metrics`, `/config`,
//! and the app's own probes at `/app-health/<container>/<kind>` (`probes.rs`).
//!
//! It starts before anything else so probes can tell "alive but not ready" (no SVID or no
//! policy yet) from "dead". Kubernetes probes `/ready` as the startup and readiness probe.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::probes;
use crate::state::ProxyState;

/// Serves the admin listener for as long as the process runs: through the drain too, when
/// `/ready` says so and `/metrics` shows the connections still open.
pub async fn serve(state: Arc<ProxyState>, listener: TcpListener) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(_) => {
                // Out of file descriptors: wait rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    if let Some(key) = req.uri().path().strip_prefix(APP_HEALTH) {
                        return Ok::<_, Infallible>(app_health(&state, key, &req).await);
                    }
                    Ok(route(&state, &req))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

const APP_HEALTH: &str = "/app-health/";

/// Runs the app probe `key` (`<container>/<kind>`) for the kubelet.
async fn app_health(state: &ProxyState, key: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(refused) = only_get(req) {
        return refused;
    }
    let Some(probe) = state.config.app_probes.get(key) else {
        return text(StatusCode::NOT_FOUND, format!("no app probe {key:?} is configured\n"));
    };
    let (status, why) = probes::run(probe, state.config.advertise_ip, req.headers().get(header::USER_AGENT)).await;
    if !status.is_success() && !status.is_redirection() {
        tracing::debug!(probe = key, %status, why = why.trim_end(), "app probe failed");
    }
    text(status, why)
}

fn route(state: &ProxyState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !["/live", "/ready", "/metrics", "/config"].contains(&path) {
        return text(StatusCode::NOT_FOUND, format!("no such endpoint {path}; try /live /ready /metrics /config\n"));
    }
    if let Some(refused) = only_get(req) {
        return refused;
    }
    match path {
        // The last arm is `/config`: the paths were checked above.
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => match state.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/metrics" => metrics(state, req),
        _ => {
            let body = serde_json::to_string_pretty(&config(state)).unwrap_or_default() + "\n";
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            r
        }
    }
}

/// Every admin endpoint is read-only: anything but GET and HEAD gets a 405 saying which
/// methods are (RFC 9110 §15.5.6 requires the `Allow` header).
fn only_get(req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return None;
    }
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed; only GET and HEAD\n", req.method()));
    r.headers_mut().insert(header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
    Some(r)
}

/// OpenMetrics to a scraper that asks for it (Prometheus does), the classic Prometheus text
/// format (0.0.4) to anything else — curl, older agents, and scrapers that parse only it.
fn metrics(state: &ProxyState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let wants_openmetrics = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
    let (body, content_type) = if wants_openmetrics {
        (state.metrics.encode(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
    } else {
        (state.metrics.encode_classic(), "text/plain; version=0.0.4; charset=utf-8")
    };
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r
}

/// The effective configuration and what is being enforced right now.
fn config(state: &ProxyState) -> serde_json::Value {
    let cfg = &state.config;
    let cred = state.creds.current();
    let policy = state.policy.load();
    json!({
        "identity": cred.as_ref().map(|c| c.id().to_string()),
        "svid_expires_at": cred.as_ref().and_then(|c| c.svid.not_after().duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
        "ready": state.ready().is_ok(),
        "policy": {
            "applied": policy.applied,
            "version": policy.snapshot.version(),
            "policies": policy.snapshot.policies().iter().map(|p| p.name()).collect::<Vec<_>>(),
            "default_action": cfg.default_action.as_str(),
        },
        "control_plane": {
            "url": cfg.control_url,
            "status": state.control_status(),
        },
        "endpoint_registry": registry(&state.registry.load()),
        "listeners": {
            "inbound": cfg.inbound,
            "outbound": cfg.outbound,
            "routes": cfg.routes,
            "admin": cfg.admin,
        },
        "opaque_ports": cfg.opaque_ports,
        "app_probes": cfg.app_probes.keys().collect::<Vec<_>>(),
        "advertise_ip": cfg.advertise_ip,
        "state_dir": cfg.state_dir,
        "attestation": match cfg.attestation {
            crate::config::Attestation::JoinToken(_) => "join_token",
            crate::config::Attestation::KubernetesTokenFile(_) => "kubernetes",
        },
        "detect_timeout_ms": cfg.detect_timeout.as_millis() as u64,
        "drain_timeout_ms": cfg.drain_timeout.as_millis() as u64,
        "first_policy_timeout_ms": cfg.first_policy_timeout.as_millis() as u64,
        "header_timeout_ms": cfg.header_timeout.as_millis() as u64,
        "tracked_connections": state.conns.len(),
        "telemetry": telemetry(&cfg.telemetry),
    })
}

/// The endpoint registry and the service table, by size.
fn registry(r: &crate::state::Registry) -> serde_json::Value {
    json!({ "version": r.version, "entries": r.len(), "services_version": r.services_version, "services": r.services_len() })
}

/// Where spans and flow-log lines go.
fn telemetry(t: &crate::telemetry::TelemetryConfig) -> serde_json::Value {
    use crate::telemetry::{FlowLogTarget, OtlpProtocol};
    json!({
        "otlp_endpoint": t.otlp_endpoint,
        "otlp_protocol": match t.otlp_protocol { OtlpProtocol::Grpc => "grpc", OtlpProtocol::Http => "http" },
        "trace_file": t.trace_file,
        "sample_ratio": t.sample_ratio,
        "flow_log": match &t.flow_log {
            Some(FlowLogTarget::Stdout) => Some("-".to_string()),
            Some(FlowLogTarget::File(p)) => Some(p.display().to_string()),
            None => None,
        },
        "queue_size": t.queue_size,
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
