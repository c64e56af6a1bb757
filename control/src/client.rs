//! A client for the control plane's API, used by the proxy (bootstrap, renew, watch, ack)
//! and by the CLI (admin calls).
//!
//! Every call is HTTPS with TLS 1.3, verifying that the server is the control plane's SVID
//! (`spiffe://<td>/trellis/control`) under the given trust bundle, and presenting the
//! caller's SVID when it has one. One short-lived HTTP/1.1 connection per call keeps the
//! client simple; the watch stream holds its own connection for as long as it lives.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use trellis_identity::pki_types::ServerName;
use trellis_identity::rustls::ClientConfig;
use trellis_identity::{CredentialStore, SpiffeId, TrustBundle, TrustDomain, VerifyError, client_config};

use crate::api::{self, ErrorBody, WatchEvent, paths};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A watch stream that says nothing (not even a keepalive) for this long is dead.
pub const WATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(45);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad control plane URL {0:?}: expected https://HOST:PORT (no path)")]
    Url(String),
    #[error(
        "the trust bundle's root has no spiffe:// URI SAN, so it names no trust domain: use the control plane's bundle.pem"
    )]
    NoTrustDomain,
    #[error("cannot connect to the control plane at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("TLS with the control plane failed: {0}{hint}", hint = bundle_hint(.0))]
    Tls(VerifyError),
    #[error("control plane request failed: {0}")]
    Http(String),
    #[error("control plane answered {status}: {body}")]
    Api { status: StatusCode, body: ErrorBody },
    #[error("unexpected answer from the control plane: {0}")]
    Decode(String),
    #[error("the watch stream ended")]
    StreamEnded,
    /// A failure on the caller's side before anything was asked (a key, a CSR, a token file).
    #[error("{0}")]
    Local(String),
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How to reach and authenticate to the control plane.
#[derive(Clone)]
pub struct ControlClient {
    host: String,
    port: u16,
    tls: Arc<ClientConfig>,
    admin_token: Option<String>,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlClient({}:{})", self.host, self.port)
    }
}

/// What a certificate the bundle does not vouch for most often means.
const BUNDLE_HINT: &str = " (is --ca-bundle the control plane's bundle.pem, and --control the control plane?)";

/// What a server answering in plaintext most often means: an app's or an admin port.
const PORT_HINT: &str = " (is --control the control plane's https port?)";

fn bundle_hint(v: &VerifyError) -> &'static str {
    match v {
        VerifyError::Plaintext => PORT_HINT,
        v if untrusted_server(v) => BUNDLE_HINT,
        _ => "",
    }
}

/// Whether a failed handshake says the control plane's certificate is not one the trust
/// bundle vouches for (rather than expired, not yet valid, or refused by the other side).
fn untrusted_server(v: &VerifyError) -> bool {
    !matches!(
        v,
        VerifyError::Expired
            | VerifyError::NotYetValid
            | VerifyError::PeerRejected(_)
            | VerifyError::ProtocolVersion
            | VerifyError::Plaintext
            | VerifyError::Other(_)
    )
}

impl ClientError {
    /// The control plane's certificate is not one the trust bundle vouches for: retrying
    /// cannot help, the bundle or the URL is wrong.
    pub fn is_untrusted_server(&self) -> bool {
        matches!(self, ClientError::Tls(v) if untrusted_server(v))
    }
}

/// The host and port of a control plane URL, `https://HOST[:PORT]` with no path: what a
/// proxy will be able to use (injection checks the URL it writes into pods with this).
pub fn parse_control_url(url: &str) -> Result<(String, u16), ClientError> {
    let bad = || ClientError::Url(url.into());
    let uri: Uri = url.parse().map_err(|_| bad())?;
    // A path (`https://host:7443/trellis`) would be silently dropped: every API path is
    // absolute from the root.
    let extra = !matches!(uri.path(), "" | "/") || uri.query().is_some();
    if uri.scheme_str() != Some("https") || extra {
        return Err(bad());
    }
    let host = uri.host().ok_or_else(bad)?.trim_matches(['[', ']']).to_string();
    // The TLS name the proxy will verify must be a DNS name or an IP address.
    if host.is_empty() || ServerName::try_from(host.clone()).is_err() {
        return Err(bad());
    }
    let port = uri.authority().and_then(|a| authority_port(a, 443)).ok_or_else(bad)?;
    Ok((host, port))
}

/// The port a URL's authority names, `default` when it names none; `None` when what follows
/// the host is no port (`:99999`, `:abc`, `:`, `:0`), which `Uri` accepts and its
/// `port_u16()` then reads as absent, sending the caller to the default port unwarned.
pub fn authority_port(authority: &http::uri::Authority, default: u16) -> Option<u16> {
    let host_port = authority.as_str().rsplit_once('@').map_or(authority.as_str(), |(_, hp)| hp);
    match host_port.strip_prefix(authority.host())? {
        "" => Some(default),
        rest => rest.strip_prefix(':')?.parse().ok().filter(|&p| p != 0),
    }
}

impl ControlClient {
    /// `url` is `https://host:port`; the server must present
    /// `spiffe://<trust domain>/trellis/control` chaining to `bundle`.
    pub fn new(
        url: &str,
        bundle: &TrustBundle,
        trust_domain: Option<TrustDomain>,
        creds: Option<Arc<CredentialStore>>,
        admin_token: Option<String>,
    ) -> Result<Self, ClientError> {
        let (host, port) = parse_control_url(url)?;
        let td = trust_domain.or_else(|| bundle.trust_domain()).ok_or(ClientError::NoTrustDomain)?;
        let expected =
            SpiffeId::from_segments(&td, &["trellis", "control"]).map_err(|e| ClientError::Url(e.to_string()))?;
        let mut tls = client_config(creds, bundle, expected).map_err(|e| ClientError::Http(e.to_string()))?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Every call is a full handshake: a resumed session would carry the SVID of the
        // handshake it resumes, and a renewal must be judged on the current one.
        tls.resumption = trellis_identity::rustls::client::Resumption::disabled();
        Ok(ControlClient { host, port, tls: Arc::new(tls), admin_token })
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let addr = format!("{}:{}", self.host, self.port);
        let connect_err = |reason: String| ClientError::Connect { addr: addr.clone(), reason };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone()).map_err(|_| ClientError::Url(self.host.clone()))?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| connect_err("TLS handshake timed out".into()))?
            .map_err(|e| match VerifyError::from_io(&e) {
                Some(v) => ClientError::Tls(v),
                None => connect_err(e.to_string()),
            })?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "control plane connection ended");
            }
        });
        Ok(send)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        ctype: &str,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let mut send = self.connect().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, format!("{}:{}", self.host, self.port))
            .header(header::USER_AGENT, concat!("trellis/", env!("CARGO_PKG_VERSION")));
        if let Some(t) = &self.admin_token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", t.trim()));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, ctype);
        }
        let req = req.body(Full::new(body.unwrap_or_default())).map_err(|e| ClientError::Http(e.to_string()))?;
        send.send_request(req).await.map_err(|e| ClientError::Http(e.to_string()))
    }

    /// One request, whole response body; a non-2xx status becomes [`ClientError::Api`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        ctype: &str,
    ) -> Result<Bytes, ClientError> {
        let fut = async {
            let resp = self.send(method, path, body, ctype).await?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await.map_err(|e| ClientError::Http(e.to_string()))?.to_bytes();
            if status.is_success() {
                Ok(bytes)
            } else {
                let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
                    error: String::from_utf8_lossy(&bytes).trim().to_string(),
                    details: vec![],
                });
                Err(ClientError::Api { status, body })
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut).await.map_err(|_| ClientError::Http("request timed out".into()))?
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(|b| serde_json::to_vec(b).map(Bytes::from))
            .transpose()
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let bytes = self.call(method, path, body, "application/json").await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn bootstrap(&self, req: &api::BootstrapRequest) -> Result<api::SvidResponse, ClientError> {
        self.json(Method::POST, paths::BOOTSTRAP, Some(req)).await
    }

    pub async fn renew(&self, req: &api::RenewRequest) -> Result<api::SvidResponse, ClientError> {
        self.json(Method::POST, paths::RENEW, Some(req)).await
    }

    pub async fn ack(&self, session: u64, version: u64) -> Result<(), ClientError> {
        let _: serde_json::Value =
            self.json(Method::POST, paths::ACK, Some(&api::AckRequest { session, version })).await?;
        Ok(())
    }

    pub async fn create_token(&self, req: &api::TokenRequest) -> Result<api::TokenResponse, ClientError> {
        self.json(Method::POST, paths::TOKENS, Some(req)).await
    }

    /// Applies a policy file (YAML or JSON text) as is.
    pub async fn apply_policies(&self, text: String) -> Result<crate::store::ApplyOutcome, ClientError> {
        let bytes = self.call(Method::POST, paths::POLICIES, Some(Bytes::from(text)), "application/yaml").await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn list_policies(&self) -> Result<api::PolicyList, ClientError> {
        self.json(Method::GET, paths::POLICIES, None::<&()>).await
    }

    pub async fn get_policy(&self, name: &str) -> Result<trellis_policy::Policy, ClientError> {
        self.json(Method::GET, &format!("{}/{}", paths::POLICIES, encode_segment(name)), None::<&()>).await
    }

    pub async fn delete_policy(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        self.json(Method::DELETE, &format!("{}/{}", paths::POLICIES, encode_segment(name)), None::<&()>).await
    }

    pub async fn check(&self, req: &api::CheckRequest) -> Result<api::CheckResponse, ClientError> {
        self.json(Method::POST, paths::CHECK, Some(req)).await
    }

    pub async fn workloads(&self) -> Result<Vec<api::WorkloadStatus>, ClientError> {
        self.json(Method::GET, paths::WORKLOADS, None::<&()>).await
    }

    pub async fn audit(&self, after: u64) -> Result<Vec<crate::store::AuditEntry>, ClientError> {
        self.json(Method::GET, &format!("{}?after={after}", paths::AUDIT), None::<&()>).await
    }

    /// Opens the watch stream (requires an SVID in the client's credential store).
    pub async fn watch(&self) -> Result<WatchStream, ClientError> {
        let resp = self.send(Method::GET, paths::WATCH, None, "").await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let body = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| ErrorBody { error: String::from_utf8_lossy(&bytes).into(), details: vec![] });
            return Err(ClientError::Api { status, body });
        }
        Ok(WatchStream { body: resp.into_body(), buf: BytesMut::new() })
    }
}

/// Policy names are DNS-1123 (no characters that need escaping), but be safe anyway.
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The proxy's end of the watch stream: parses server-sent events into [`WatchEvent`]s.
#[derive(Debug)]
pub struct WatchStream {
    body: Incoming,
    buf: BytesMut,
}

impl WatchStream {
    /// The next update; errors when the stream ends, breaks, or goes silent for
    /// [`WATCH_IDLE_TIMEOUT`].
    pub async fn next(&mut self) -> Result<WatchEvent, ClientError> {
        loop {
            if let Some(event) = self.take_event()? {
                return Ok(event);
            }
            let frame = tokio::time::timeout(WATCH_IDLE_TIMEOUT, self.body.frame())
                .await
                .map_err(|_| ClientError::Http("watch stream went silent".into()))?;
            match frame {
                None => return Err(ClientError::StreamEnded),
                Some(Err(e)) => return Err(ClientError::Http(e.to_string())),
                Some(Ok(f)) => {
                    if let Ok(mut data) = f.into_data() {
                        self.buf.extend_from_slice(&data.copy_to_bytes(data.remaining()));
                    }
                }
            }
            if self.buf.len() > 64 * 1024 * 1024 {
                return Err(ClientError::Decode("watch event larger than 64 MiB".into()));
            }
        }
    }

    /// Pops one complete `event: update` block from the buffer, skipping comments.
    fn take_event(&mut self) -> Result<Option<WatchEvent>, ClientError> {
        while let Some(end) = find(&self.buf, b"\n\n") {
            let block = self.buf.split_to(end + 2);
            let text = std::str::from_utf8(&block).map_err(|e| ClientError::Decode(e.to_string()))?;
            let data: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect::<Vec<_>>()
                .join("\n");
            if data.is_empty() {
                continue; // a keepalive comment
            }
            let event = serde_json::from_str(&data).map_err(|e| ClientError::Decode(format!("watch event: {e}")))?;
            return Ok(Some(event));
        }
        Ok(None)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_url_names_a_real_port_or_none() {
        assert_eq!(parse_control_url("https://127.0.0.1:7443").unwrap(), ("127.0.0.1".into(), 7443));
        assert_eq!(parse_control_url("https://control.example/").unwrap(), ("control.example".into(), 443));
        assert_eq!(parse_control_url("https://[::1]:7443").unwrap(), ("::1".into(), 7443));
        for bad in [
            "https://127.0.0.1:7443x",
            "https://127.0.0.1:99999",
            "https://127.0.0.1:-1",
            "https://127.0.0.1:",
            "https://127.0.0.1:0",
            "https://[::1]:abc",
            "http://127.0.0.1:7443",
            "https://127.0.0.1:7443/trellis",
        ] {
            assert!(matches!(parse_control_url(bad), Err(ClientError::Url(_))), "{bad} was accepted");
        }
        let with_user: Uri = "http://u:p@otel:4318".parse().unwrap();
        assert_eq!(authority_port(with_user.authority().unwrap(), 80), Some(4318));
    }
}
