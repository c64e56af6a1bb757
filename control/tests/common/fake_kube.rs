//! A fake Kubernetes API server for TokenReview and the Service lists: real HTTPS (a CA and
//! a server certificate for 127.0.0.1 minted with rcgen at test time), real
//! `authentication.k8s.io/v1` TokenReview JSON, and `v1` ServiceList and
//! `discovery.k8s.io/v1` EndpointSliceList JSON the test sets ([`FakeApi::cluster`]). It
//! checks what a real API server checks of the caller — method, path, bearer token, body —
//! and answers per token.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use trellis_control::kube::TokenReviewer;
use trellis_identity::rustls;

pub const CONTROL_PLANE_TOKEN: &str = "control-plane-sa-token";
/// A path an API server behind a proxy is reached under (`--k8s-api https://host/k8s/clusters/c1`).
pub const PREFIX: &str = "/k8s/clusters/c1";

pub struct FakeApi {
    pub addr: SocketAddr,
    pub ca_pem: String,
    /// The bearer token the fake accepts from the control plane (rotatable).
    pub accepted_bearer: Arc<Mutex<String>>,
    /// What `GET /api/v1/services` and `GET /apis/discovery.k8s.io/v1/endpointslices`
    /// answer (their `items`); `None`: 403, as without the RBAC to list them.
    pub cluster: Arc<Mutex<Option<(Value, Value)>>>,
}

impl FakeApi {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn reviewer(&self) -> TokenReviewer {
        TokenReviewer::new(&self.url(), self.ca_pem.as_bytes(), CONTROL_PLANE_TOKEN).expect("reviewer")
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
pub fn mint_server_cert() -> (String, rustls::ServerConfig) {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "fake kubernetes CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().expect("ip"))];
    params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    let server_cert = params.signed_by(&server_key, &issuer).expect("server cert");

    let key = trellis_identity::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).expect("key der");
    let config = rustls::ServerConfig::builder_with_provider(trellis_identity::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![server_cert.der().clone()], key)
        .expect("server config");
    (ca_cert.pem(), config)
}

pub async fn start_fake_api() -> FakeApi {
    start_fake_api_at("").await
}

/// A fake API server that answers only under `prefix` (404 elsewhere).
pub async fn start_fake_api_at(prefix: &'static str) -> FakeApi {
    let (ca_pem, tls) = mint_server_cert();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted_bearer = Arc::new(Mutex::new(CONTROL_PLANE_TOKEN.to_string()));
    let bearer = accepted_bearer.clone();
    let cluster = Arc::new(Mutex::new(None));
    let lists = cluster.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            let (bearer, lists) = (bearer.clone(), lists.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |req| answer(req, bearer.clone(), lists.clone(), prefix));
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    FakeApi { addr, ca_pem, accepted_bearer, cluster }
}

/// A `ServiceList` or `EndpointSliceList`, as the API server shapes them — one object per
/// page (an API server may send fewer than `limit`), with a `continue` token holding
/// characters that must be escaped in a query (`=`, `/`, `+`).
fn list(
    path: &str,
    query: Option<&str>,
    cluster: &Mutex<Option<(Value, Value)>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let Some((services, slices)) = cluster.lock().expect("lock").clone() else {
        let message = format!("services is forbidden: cannot list resource at {path}");
        return reply(StatusCode::FORBIDDEN, status_object(403, "Forbidden", &message));
    };
    let (api_version, kind, items) = match path {
        "/api/v1/services" => ("v1", "ServiceList", services),
        "/apis/discovery.k8s.io/v1/endpointslices" => ("discovery.k8s.io/v1", "EndpointSliceList", slices),
        _ => {
            let status = status_object(404, "NotFound", "the server could not find the resource");
            return reply(StatusCode::NOT_FOUND, status);
        }
    };
    let query = query.unwrap_or("");
    if !query.split('&').any(|kv| kv.starts_with("limit=")) {
        return reply(StatusCode::BAD_REQUEST, status_object(400, "BadRequest", "this fake wants paged lists"));
    }
    let from = match query.split('&').find_map(|kv| kv.strip_prefix("continue=")) {
        None => 0,
        // Unescaped, a real API server would read `+` as a space.
        Some(token) if token.contains(['+', '/', '=']) => {
            return reply(StatusCode::BAD_REQUEST, status_object(400, "BadRequest", "continue token not escaped"));
        }
        Some(token) => {
            let token = token.replace("%3D", "=").replace("%2F", "/").replace("%2B", "+");
            match token.strip_prefix("a+b/").and_then(|n| n.trim_end_matches('=').parse::<usize>().ok()) {
                Some(n) => n,
                None => return reply(StatusCode::GONE, status_object(410, "Expired", "bad continue token")),
            }
        }
    };
    // Anything but a list is sent as it is, for the tests of a malformed answer.
    let Some(items) = items.as_array().cloned() else {
        return reply(StatusCode::OK, json!({ "apiVersion": api_version, "kind": kind, "items": items }).to_string());
    };
    let page: Vec<Value> = items.iter().skip(from).take(1).cloned().collect();
    let token = if from + 1 < items.len() { format!("a+b/{}==", from + 1) } else { String::new() };
    let metadata = json!({ "resourceVersion": "4711", "continue": token });
    reply(
        StatusCode::OK,
        json!({ "apiVersion": api_version, "kind": kind, "metadata": metadata, "items": page }).to_string(),
    )
}

pub fn reply(status: StatusCode, body: impl Into<Bytes>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
    Ok(response)
}

pub fn status_object(code: u16, reason: &str, message: &str) -> String {
    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code })
        .to_string()
}

/// What the API server answers for `spec.token` (after checking the caller like a real one).
pub async fn answer(
    req: Request<hyper::body::Incoming>,
    bearer: Arc<Mutex<String>>,
    cluster: Arc<Mutex<Option<(Value, Value)>>>,
    prefix: &str,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let Some(path) = req.uri().path().strip_prefix(prefix) else {
        return reply(StatusCode::NOT_FOUND, status_object(404, "NotFound", "the server could not find the resource"));
    };
    let expected = format!("Bearer {}", bearer.lock().expect("lock"));
    let authorized = req.headers().get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str());
    if !authorized {
        return reply(StatusCode::UNAUTHORIZED, status_object(401, "Unauthorized", "Unauthorized"));
    }
    if req.method() == hyper::Method::GET {
        return list(path, req.uri().query(), &cluster);
    }
    if req.method() != hyper::Method::POST || path != "/apis/authentication.k8s.io/v1/tokenreviews" {
        return reply(StatusCode::NOT_FOUND, status_object(404, "NotFound", "the server could not find the resource"));
    }
    let body = req.into_body().collect().await?.to_bytes();
    let Ok(review) = serde_json::from_slice::<Value>(&body) else {
        return reply(StatusCode::BAD_REQUEST, status_object(400, "BadRequest", "not JSON"));
    };
    let well_formed = review["apiVersion"] == "authentication.k8s.io/v1"
        && review["kind"] == "TokenReview"
        && review["spec"]["audiences"] == json!(["trellis"]);
    let Some(token) = review["spec"]["token"].as_str().filter(|_| well_formed) else {
        return reply(StatusCode::BAD_REQUEST, status_object(400, "BadRequest", "malformed TokenReview"));
    };
    let status = match token {
        "slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            json!({ "authenticated": false })
        }
        "garbage" => return reply(StatusCode::CREATED, "<html>this is not the API server</html>"),
        "overloaded" => {
            return reply(StatusCode::SERVICE_UNAVAILABLE, status_object(503, "ServiceUnavailable", "etcd is sad"));
        }
        "pod-token" => json!({
            "authenticated": true,
            "user": {
                "username": "system:serviceaccount:shop:checkout",
                "uid": "0f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:shop", "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/credential-id": ["JTI=3b9f0c2e-0000-4000-8000-000000000001"],
                    "authentication.kubernetes.io/node-name": ["worker-1"],
                    "authentication.kubernetes.io/pod-name": ["checkout-6f7c9d8b5d-x2x7q"],
                    "authentication.kubernetes.io/pod-uid": ["9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"],
                },
            },
            "audiences": ["trellis"],
        }),
        "unbound-sa-token" => json!({
            "authenticated": true,
            "user": { "username": "system:serviceaccount:batch:reporter", "groups": ["system:authenticated"] },
            "audiences": ["trellis"],
        }),
        "api-audience-token" => json!({
            "authenticated": true,
            "user": { "username": "system:serviceaccount:shop:checkout" },
            "audiences": ["https://kubernetes.default.svc.cluster.local"],
        }),
        "no-audience-token" => json!({
            "authenticated": true,
            "user": { "username": "system:serviceaccount:shop:checkout" },
        }),
        "user-token" => json!({
            "authenticated": true,
            "user": { "username": "alice@example.com", "groups": ["system:authenticated"] },
            "audiences": ["trellis"],
        }),
        "node-token" => json!({
            "authenticated": true,
            "user": { "username": "system:node:worker-1", "groups": ["system:nodes"] },
            "audiences": ["trellis"],
        }),
        _ => json!({
            "user": {},
            "error": "[invalid bearer token, service account token has been invalidated]",
        }),
    };
    let mut out = review.clone();
    out["metadata"] = json!({ "creationTimestamp": null });
    out["status"] = status;
    reply(StatusCode::CREATED, out.to_string())
}
