//! Kubernetes attestation: the control plane's client for the TokenReview API (which also
//! lists Services and EndpointSlices for [`crate::services`]).
//!
//! An injected proxy presents the projected ServiceAccount token mounted from the
//! `trellis-token` volume (audience `trellis`). The control plane does not parse or trust the
//! token itself: it asks the API server, which signed it, with an `authentication.k8s.io/v1`
//! TokenReview naming the audience `trellis`, and accepts only an authenticated service
//! account whose review confirms that audience. The resulting [`KubeIdentity`] is what the CA
//! service maps to `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
//!
//! The client is a single HTTP/1.1 request over rustls (ring provider), verifying the API
//! server with WebPKI against the cluster CA (`ca.crt`), bounded by a timeout. In a pod the
//! control plane's own API token is re-read from its file on every review, because the
//! kubelet rotates it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use trellis_identity::pki_types::ServerName;
use trellis_identity::rustls;

/// The audience every Trellis token is minted for (see the injected `trellis-token` volume).
pub const TOKEN_AUDIENCE: &str = "trellis";
/// How long one review may take, connection included, unless [`TokenReviewer::with_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Where a pod finds its service account's API token and the cluster CA.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

const REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const SA_PREFIX: &str = "system:serviceaccount:";
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// A TokenReview answer is a few KB; anything much larger is not one.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// One page of a list ([`LIST_PAGE`] objects; an EndpointSlice holds up to 100 endpoints).
const MAX_PAGE_BYTES: usize = 32 << 20;
/// Objects asked for per page of a list: the API server then answers in chunks with a
/// `continue` token, so a large cluster is never one huge response.
const LIST_PAGE: u32 = 500;
/// 1,000,000 objects: far above any cluster, only there so a server that never stops
/// sending `continue` tokens cannot grow the list without end.
const MAX_LIST_PAGES: usize = 2_000;

/// Who a verified token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeIdentity {
    pub namespace: String,
    pub service_account: String,
    /// Set for pod-bound (projected) tokens.
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The client cannot be built: missing in-cluster environment, unreadable files, bad URL
    /// or CA.
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    /// The API server says the token is not valid (expired, revoked, wrong audience, forged).
    #[error("token rejected by the Kubernetes API: {0}")]
    Rejected(String),
    /// The pod sent no token at all: refused without asking the API server.
    #[error("the token is empty (refused without asking the Kubernetes API)")]
    EmptyToken,
    /// Authenticated, but the review did not confirm the `trellis` audience.
    #[error("token is not for audience \"trellis\" (review audiences: {0:?})")]
    WrongAudience(Vec<String>),
    /// Authenticated, but as a user or node rather than a service account.
    #[error("token does not belong to a service account (user {0:?})")]
    NotServiceAccount(String),
    /// The API server could not be reached or answered 5xx, or the review timed out.
    #[error("Kubernetes API unavailable: {0}")]
    ApiUnavailable(String),
    /// The API server refused the request itself (4xx), typically the control plane's service
    /// account lacking `create` on `tokenreviews` (or `list` on Services).
    #[error("Kubernetes API refused the request with {status}: {message}")]
    ApiRefused { status: u16, message: String },
    /// An answer that is not what was asked for (a TokenReview, a list).
    #[error("unexpected Kubernetes API response: {0}")]
    BadResponse(String),
}

/// The control plane's own credential for the API server.
#[derive(Debug, Clone)]
enum Bearer {
    Static(String),
    /// Re-read on every review: the kubelet rotates projected tokens.
    File(PathBuf),
}

/// A TokenReview client for one API server.
#[derive(Clone)]
pub struct TokenReviewer {
    /// Host (without IPv6 brackets) and port to connect to.
    host: String,
    port: u16,
    /// `host:port` as written in the URL, for the Host header.
    authority: String,
    server_name: ServerName<'static>,
    /// The URL's path (`https://host/k8s/clusters/c1`), before every API path.
    prefix: String,
    review_path: String,
    tls: TlsConnector,
    bearer: Bearer,
    timeout: Duration,
}

impl std::fmt::Debug for TokenReviewer {
    // The bearer token stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer").field("authority", &self.authority).field("timeout", &self.timeout).finish()
    }
}

impl TokenReviewer {
    /// A client for the API server at `api_base_url` (`https://host[:port][/prefix]`), trusting
    /// the PEM certificates in `ca_pem`, authenticating with `bearer_token`.
    pub fn new(api_base_url: &str, ca_pem: &[u8], bearer_token: impl Into<String>) -> Result<Self, KubeError> {
        Self::build(api_base_url, ca_pem, Bearer::Static(bearer_token.into()))
    }

    /// The in-cluster client: `KUBERNETES_SERVICE_HOST`/`_PORT` and the pod's service account
    /// token and CA under [`SERVICE_ACCOUNT_DIR`].
    pub fn in_cluster() -> Result<Self, KubeError> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| KubeError::Config(format!("{name} is not set: not running in a pod?")))
        };
        Self::in_cluster_at(&var("KUBERNETES_SERVICE_HOST")?, &var("KUBERNETES_SERVICE_PORT")?, SERVICE_ACCOUNT_DIR)
    }

    /// [`TokenReviewer::in_cluster`] with explicit values (the service host and port, and a
    /// directory holding `token` and `ca.crt`).
    pub fn in_cluster_at(host: &str, port: &str, dir: impl AsRef<Path>) -> Result<Self, KubeError> {
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() };
        Self::at_url(&format!("https://{host}:{port}"), dir)
    }

    /// A client for the API server at `url` (`https://host:port`), with the bearer token and
    /// CA in `dir` (`token`, `ca.crt`), for a control plane outside the cluster.
    pub fn at_url(url: &str, dir: impl AsRef<Path>) -> Result<Self, KubeError> {
        let dir = dir.as_ref();
        let ca_path = dir.join("ca.crt");
        let ca = std::fs::read(&ca_path).map_err(|e| KubeError::Config(format!("{}: {e}", ca_path.display())))?;
        let token_path = dir.join("token");
        read_token(&token_path)?; // fail at start-up, not at the first call
        Self::build(url, &ca, Bearer::File(token_path))
    }

    /// Bounds each review (connect, TLS, request and answer) to `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn build(api_base_url: &str, ca_pem: &[u8], bearer: Bearer) -> Result<Self, KubeError> {
        let uri: Uri = api_base_url.parse().map_err(|e| KubeError::Config(format!("API URL {api_base_url:?}: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(KubeError::Config(format!("API URL {api_base_url:?} must be https")));
        }
        let authority =
            uri.authority().ok_or_else(|| KubeError::Config(format!("API URL {api_base_url:?} has no host")))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| KubeError::Config(format!("API host {host:?} is not a DNS name or IP: {e}")))?;
        let prefix = uri.path().trim_end_matches('/');
        let port = crate::client::authority_port(authority, 443).ok_or_else(|| {
            KubeError::Config(format!("API URL {api_base_url:?}: the port is not a number from 1 to 65535"))
        })?;
        Ok(TokenReviewer {
            port,
            authority: authority.to_string(),
            host,
            server_name,
            review_path: format!("{prefix}{REVIEW_PATH}"),
            prefix: prefix.to_string(),
            tls: TlsConnector::from(Arc::new(tls_config(ca_pem)?)),
            bearer,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Verifies `token` with the API server and returns whose it is.
    pub async fn review(&self, token: &str) -> Result<KubeIdentity, KubeError> {
        if token.trim().is_empty() {
            return Err(KubeError::EmptyToken);
        }
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": { "token": token, "audiences": [TOKEN_AUDIENCE] },
        });
        let (status, answer) =
            tokio::time::timeout(self.timeout, self.post(body.to_string())).await.map_err(|_| {
                KubeError::ApiUnavailable(format!("no answer from {} within {:?}", self.authority, self.timeout))
            })??;
        check_status(status, &answer)?;
        identity_from_review(&answer)
    }

    /// Lists every object at `path` (e.g. `/api/v1/services`), page by page, and returns
    /// their `items`; an error status is reported with the API server's message.
    pub async fn list(&self, path: &str) -> Result<Vec<Value>, KubeError> {
        let mut items = Vec::new();
        let mut next: Option<String> = None;
        let prefix = &self.prefix;
        for _ in 0..MAX_LIST_PAGES {
            let page_path = match &next {
                None => format!("{prefix}{path}?limit={LIST_PAGE}"),
                Some(token) => format!("{prefix}{path}?limit={LIST_PAGE}&continue={}", percent_encode(token)),
            };
            let send = self.send(Method::GET, &page_path, None, MAX_PAGE_BYTES);
            let (status, answer) = tokio::time::timeout(self.timeout, send).await.map_err(|_| {
                KubeError::ApiUnavailable(format!("no answer from {} within {:?}", self.authority, self.timeout))
            })??;
            check_status(status, &answer)?;
            let mut page: Value = serde_json::from_slice(&answer)
                .map_err(|e| KubeError::BadResponse(format!("GET {path}: not JSON: {e}")))?;
            match page.get_mut("items").map(Value::take) {
                Some(Value::Array(page_items)) => items.extend(page_items),
                Some(Value::Null) | None => {}
                Some(_) => return Err(KubeError::BadResponse(format!("GET {path}: items is not a list"))),
            }
            next = page["metadata"]["continue"].as_str().filter(|c| !c.is_empty()).map(str::to_string);
            if next.is_none() {
                return Ok(items);
            }
        }
        Err(KubeError::BadResponse(format!(
            "GET {path}: more than {MAX_LIST_PAGES} pages of {LIST_PAGE} (the limit): the list did not end"
        )))
    }

    async fn post(&self, body: String) -> Result<(StatusCode, Bytes), KubeError> {
        self.send(Method::POST, &self.review_path.clone(), Some(body), MAX_RESPONSE_BYTES).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        max_answer: usize,
    ) -> Result<(StatusCode, Bytes), KubeError> {
        let bearer = match &self.bearer {
            Bearer::Static(token) => token.clone(),
            Bearer::File(path) => read_token(path)?,
        };
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            KubeError::ApiUnavailable(format!("{what} {}: {e}", self.authority))
        };
        let tcp =
            TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| unavailable("connect to", &e))?;
        let tls = self.tls.connect(self.server_name.clone(), tcp).await.map_err(|e| unavailable("TLS with", &e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| unavailable("HTTP with", &e))?;
        let _conn = AbortOnDrop(tokio::spawn(conn));
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(header::AUTHORIZATION, format!("Bearer {}", bearer.trim()))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, concat!("trellis-control/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| KubeError::Config(format!("cannot build the request: {e}")))?;
        let response = sender.send_request(request).await.map_err(|e| unavailable("request to", &e))?;
        let status = response.status();
        let answer = Limited::new(response.into_body(), max_answer)
            .collect()
            .await
            .map_err(|e| unavailable("reading the answer of", &*e))?
            .to_bytes();
        Ok((status, answer))
    }
}

/// A `continue` token as a query value (it is opaque base64, which may hold `+`, `/`, `=`).
fn percent_encode(token: &str) -> String {
    token.bytes().fold(String::new(), |mut out, b| {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
        out
    })
}

/// Stops the connection task when the review is over or abandoned (timeout).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn tls_config(ca_pem: &[u8]) -> Result<rustls::ClientConfig, KubeError> {
    let certs =
        trellis_identity::pem::certs_from_pem("Kubernetes CA", ca_pem).map_err(|e| KubeError::Config(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| KubeError::Config(format!("Kubernetes CA: {e}")))?;
    }
    let provider = trellis_identity::crypto_provider();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| KubeError::Config(format!("Kubernetes CA: {e}")))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| KubeError::Config(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read_token(path: &Path) -> Result<String, KubeError> {
    let token = std::fs::read_to_string(path).map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
    if token.trim().is_empty() {
        return Err(KubeError::Config(format!("{} is empty", path.display())));
    }
    Ok(token)
}

fn check_status(status: StatusCode, answer: &[u8]) -> Result<(), KubeError> {
    if status.is_success() {
        return Ok(());
    }
    // A Status object's message says why (e.g. RBAC); fall back to the raw text.
    let message = serde_json::from_slice::<Value>(answer)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned());
    if status.is_server_error() {
        Err(KubeError::ApiUnavailable(format!("{status}: {message}")))
    } else if status.is_client_error() {
        Err(KubeError::ApiRefused { status: status.as_u16(), message })
    } else {
        Err(KubeError::BadResponse(format!("status {status}")))
    }
}

/// Reads a TokenReview answer and applies the acceptance rules.
fn identity_from_review(answer: &[u8]) -> Result<KubeIdentity, KubeError> {
    let review: Value = serde_json::from_slice(answer).map_err(|e| KubeError::BadResponse(e.to_string()))?;
    if review.get("kind").and_then(Value::as_str) != Some("TokenReview") {
        return Err(KubeError::BadResponse("not a TokenReview".into()));
    }
    let status = review.get("status").ok_or_else(|| KubeError::BadResponse("no status".into()))?;
    if status.get("authenticated").and_then(Value::as_bool) != Some(true) {
        let error = status.get("error").and_then(Value::as_str).unwrap_or("not authenticated");
        return Err(KubeError::Rejected(error.to_string()));
    }
    // An empty list would mean "valid for the API server's own audience": not ours.
    let audiences: Vec<String> = strings(status.get("audiences"));
    if !audiences.iter().any(|a| a == TOKEN_AUDIENCE) {
        return Err(KubeError::WrongAudience(audiences));
    }
    let user = status.get("user").ok_or_else(|| KubeError::BadResponse("authenticated without status.user".into()))?;
    let username = user.get("username").and_then(Value::as_str).unwrap_or("");
    let (namespace, service_account) = username
        .strip_prefix(SA_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .ok_or_else(|| KubeError::NotServiceAccount(username.to_string()))?;
    let extra = |key: &str| strings(user.get("extra").and_then(|e| e.get(key))).into_iter().next();
    Ok(KubeIdentity {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        pod_name: extra(POD_NAME_EXTRA),
        pod_uid: extra(POD_UID_EXTRA),
    })
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map_or_else(Vec::new, |items| items.iter().filter_map(Value::as_str).map(str::to_string).collect())
}
