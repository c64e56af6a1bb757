//! The app's kubelet probes, run by the proxy from inside the pod (`--app-probes` /
//! `TRELLIS_APP_PROBES`, written by `trellis_control::inject::probes`), because the kubelet's
//! plaintext request to a captured app port meets the inbound listener, which requires mTLS.
//! Two ways in: [`answer_plaintext`], on the inbound listener, answers the kubelet's request
//! as written for a listed `httpGet` probe's path (the default); and the admin listener's
//! `/app-health/<container>/<kind>` (`admin.rs`) runs any listed probe, for pods whose probes
//! injection rewrote to point there.
//!
//! Where it sits: beside the data path. A probe connects to the app as the proxy's uid, which
//! the capture rules leave alone: on 127.0.0.1, then on the pod IP for apps listening only
//! there. HTTP probes answer with the app's own status (the kubelet counts 200–399 as
//! success), TCP probes 200 when the port accepts, gRPC probes (the gRPC Health Checking
//! Protocol, over h2c as the kubelet speaks it) 200 when the service is `SERVING`; an app that
//! does not answer in the probe's `timeoutSeconds` is a 503. Only the configured probes are
//! run: nothing else reaches the app without mTLS.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One app probe, as injection wrote it: the original action (`httpGet` or `tcpSocket`, as
/// the user wrote it) with its port resolved to a number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppProbe {
    pub port: u16,
    #[serde(rename = "timeoutSeconds", default = "one")]
    pub timeout_seconds: u64,
    #[serde(rename = "httpGet", default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    #[serde(rename = "tcpSocket", default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcAction>,
}

/// A Kubernetes `grpc` probe action.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct GrpcAction {
    /// The service name asked about; empty or absent: the server as a whole.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default, skip_serializing)]
    pub port: Option<serde_json::Value>,
}

fn one() -> u64 {
    1
}

/// The fields of a Kubernetes `httpGet` action the proxy uses (the port is resolved above;
/// `host` and `scheme` are never set on a probe injection rewrote).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct HttpGet {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(rename = "httpHeaders", default)]
    pub headers: Vec<ProbeHeader>,
    /// The port as the user wrote it (a number or a name); [`AppProbe::port`] is what counts.
    #[serde(default, skip_serializing)]
    pub port: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing)]
    pub host: Option<String>,
}

impl HttpGet {
    /// The path the kubelet asks for: `/` when none (or an empty one) is given.
    pub fn path(&self) -> &str {
        self.path.as_deref().filter(|p| !p.is_empty()).unwrap_or("/")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

/// The probes by `<container>/<kind>`.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// Longest a probe may take, whatever its `timeoutSeconds` says (Kubernetes sets no maximum;
/// a probe is not a long poll). A longer timeout is cut to this, not refused: a sidecar that
/// would not start over a probe setting Kubernetes accepts would hold the whole pod back.
const MAX_TIMEOUT_SECONDS: u64 = 300;

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;
/// Longest request head a plaintext probe may send, and how long it has to send it.
const MAX_HEAD: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// What the inbound listener does with a new connection in a pod with app probes.
pub enum FirstBytes {
    /// It starts with a TLS handshake: on to the mTLS path.
    Tls(TcpStream),
    /// It was the kubelet's plaintext probe of a listed path, and has been answered.
    Probe,
    /// Plaintext that is no listed probe (or did not finish its request head in time): refused.
    Refused(String),
}

/// On the inbound listener: tells a TLS connection from the kubelet's plaintext HTTP probe of
/// the app's port (`app_port`) and answers the latter — a GET or HEAD of the path of a listed
/// `httpGet` probe, run against the app as [`run`] does. A connection whose first byte is not a
/// TLS handshake could never pass the handshake, so reading its request head costs nothing.
pub async fn answer_plaintext(
    probes: &AppProbes,
    pod_ip: Option<IpAddr>,
    app_port: u16,
    mut tcp: TcpStream,
) -> FirstBytes {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HEAD_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != TLS_HANDSHAKE => {}
        _ => return FirstBytes::Tls(tcp),
    }
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut tcp)).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => return FirstBytes::Refused(format!("plaintext, not a complete HTTP request head: {e}")),
        Err(_) => return FirstBytes::Refused("plaintext, and no complete HTTP request head in time".into()),
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let (Ok(httparse::Status::Complete(_)), Some(method), Some(path)) = (req.parse(&head), req.method, req.path) else {
        return FirstBytes::Refused("plaintext that is not HTTP".into());
    };
    let probe = probes.values().find(|p| p.port == app_port && p.http_get.as_ref().is_some_and(|g| g.path() == path));
    let Some(probe) = probe.filter(|_| method == "GET" || method == "HEAD") else {
        return FirstBytes::Refused(format!("plaintext {method} {path} is no app probe of port {app_port}"));
    };
    let user_agent = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("user-agent"));
    let user_agent = user_agent.and_then(|h| HeaderValue::from_bytes(h.value).ok());
    let head_only = method == "HEAD";
    let (status, why) = run(probe, pod_ip, user_agent.as_ref()).await;
    let body = if head_only { "" } else { why.as_str() };
    let reason = status.canonical_reason().unwrap_or("");
    let answer = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        why.len()
    );
    let _ = tcp.write_all(answer.as_bytes()).await;
    let _ = tcp.shutdown().await;
    FirstBytes::Probe
}

/// Reads up to the end of an HTTP request head (at most [`MAX_HEAD`] bytes).
async fn read_head(tcp: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "longer than 8 KiB"));
        }
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(head)
}

/// Parses and checks `TRELLIS_APP_PROBES`; the error names the probe and what is wrong.
/// What Kubernetes accepts is taken as the kubelet reads it: a path without its leading `/`
/// gets one (the kubelet requests `/healthz` for `healthz`), a timeout of 0 is 1 s (the API
/// server's default) and one over `MAX_TIMEOUT_SECONDS` is cut to it.
pub fn parse(json: &str) -> Result<AppProbes, String> {
    let mut probes: AppProbes = serde_json::from_str(json).map_err(|e| format!("not a JSON object of probes: {e}"))?;
    for (key, p) in &mut probes {
        let bad = |what: &str| Err(format!("probe {key:?}: {what}"));
        if key.split('/').count() != 2 || key.split('/').any(str::is_empty) {
            return bad("the key must be <container>/<kind>");
        }
        if p.port == 0 {
            return bad("port 0");
        }
        p.timeout_seconds = p.timeout_seconds.clamp(1, MAX_TIMEOUT_SECONDS);
        match (&mut p.http_get, &p.tcp_socket, &p.grpc) {
            (Some(get), None, None) => {
                if let Some(path) = &mut get.path
                    && !(path.is_empty() || path.starts_with('/'))
                {
                    path.insert(0, '/');
                }
                for h in &get.headers {
                    if HeaderName::from_bytes(h.name.as_bytes()).is_err() || HeaderValue::from_str(&h.value).is_err() {
                        return bad(&format!("header {:?} is not a valid HTTP header", h.name));
                    }
                }
            }
            (None, Some(_), None) | (None, None, Some(_)) => {}
            _ => return bad("needs exactly one of httpGet, tcpSocket and grpc"),
        }
    }
    Ok(probes)
}

/// Runs `probe` against the app: on 127.0.0.1, then on `pod_ip` (if given) when nothing
/// listens on loopback. Returns the status for the kubelet and a line saying why.
pub async fn run(probe: &AppProbe, pod_ip: Option<IpAddr>, user_agent: Option<&HeaderValue>) -> (StatusCode, String) {
    let timeout = Duration::from_secs(probe.timeout_seconds);
    let attempt = async {
        let tcp = connect(probe.port, pod_ip).await?;
        match (&probe.http_get, &probe.grpc) {
            (Some(get), _) => {
                http_get(tcp, probe.port, get, user_agent).await.map(|s| (s, format!("app answered {s}\n")))
            }
            (None, Some(grpc)) => grpc_health(tcp, probe.port, grpc.service.as_deref().unwrap_or("")).await,
            (None, None) => Ok((StatusCode::OK, format!("port {} accepts connections\n", probe.port))),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("app probe failed: {why}\n")),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, format!("app probe timed out after {}s\n", probe.timeout_seconds)),
    }
}

async fn connect(port: u16, pod_ip: Option<IpAddr>) -> Result<TcpStream, String> {
    let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    match TcpStream::connect(loopback).await {
        Ok(s) => Ok(s),
        Err(e) => match pod_ip {
            Some(ip) => TcpStream::connect(SocketAddr::new(ip, port))
                .await
                .map_err(|e2| format!("connect to {loopback}: {e}; to {}: {e2}", SocketAddr::new(ip, port))),
            None => Err(format!("connect to {loopback}: {e}")),
        },
    }
}

/// One HTTP/1.1 GET, as the kubelet sends it: the probe's path and headers, its own
/// `User-Agent` unless the probe sets one.
async fn http_get(
    tcp: TcpStream,
    port: u16,
    get: &HttpGet,
    user_agent: Option<&HeaderValue>,
) -> Result<StatusCode, String> {
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    let mut req = Request::get(get.path())
        .header(http::header::HOST, format!("127.0.0.1:{port}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("probe request: {e}"))?;
    let headers = req.headers_mut();
    if let Some(ua) = user_agent {
        headers.insert(http::header::USER_AGENT, ua.clone());
    }
    for h in &get.headers {
        // Checked by `parse`.
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_str(&h.value)) {
            headers.insert(name, value);
        }
    }
    let resp = sender.send_request(req).await.map_err(|e| format!("HTTP: {e}"))?;
    Ok(resp.status())
}

/// `grpc.health.v1.Health/Check` for `service`: 200 if the answer is `SERVING`, else 503
/// naming the status (or the gRPC error).
async fn grpc_health(tcp: TcpStream, port: u16, service: &str) -> Result<(StatusCode, String), String> {
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(conn);
    let req = Request::post(format!("http://127.0.0.1:{port}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Full::new(grpc_frame(&health_request(service))))
        .map_err(|e| format!("probe request: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| format!("HTTP/2: {e}"))?;
    if resp.status() != StatusCode::OK {
        return Ok((StatusCode::SERVICE_UNAVAILABLE, format!("gRPC health check answered HTTP {}\n", resp.status())));
    }
    let head = resp.headers().clone();
    let body = resp.into_body().collect().await.map_err(|e| format!("gRPC health check: {e}"))?;
    // A trailers-only answer (an error) carries grpc-status in the headers.
    let trailers = body.trailers().cloned().unwrap_or_default();
    let grpc_status = trailers.get("grpc-status").or(head.get("grpc-status")).map(|v| v.as_bytes().to_vec());
    if grpc_status.as_deref() != Some(b"0") {
        let message = trailers.get("grpc-message").or(head.get("grpc-message"));
        let text = |v: Option<&HeaderValue>| v.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let status = grpc_status.map(|s| String::from_utf8_lossy(&s).into_owned()).unwrap_or_else(|| "missing".into());
        let why = format!("gRPC health check failed: grpc-status {status} {}\n", text(message).unwrap_or_default());
        return Ok((StatusCode::SERVICE_UNAVAILABLE, why));
    }
    match serving_status(&body.to_bytes()) {
        Some(1) => Ok((StatusCode::OK, "SERVING\n".into())),
        Some(s) => Ok((StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", status_name(s)))),
        None => Err("gRPC health check: not a HealthCheckResponse".into()),
    }
}

/// `HealthCheckRequest { string service = 1; }`.
fn health_request(service: &str) -> Vec<u8> {
    let mut msg = Vec::new();
    if !service.is_empty() {
        prost::encoding::string::encode(1, &service.to_string(), &mut msg);
    }
    msg
}

/// One length-prefixed gRPC message (uncompressed).
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(5 + msg.len());
    frame.push(0);
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(msg);
    Bytes::from(frame)
}

/// The `status` of the `HealthCheckResponse` in a gRPC message frame (0 when absent, as
/// protobuf defaults it); `None` if the bytes are not one.
fn serving_status(frame: &[u8]) -> Option<u64> {
    use prost::encoding::{WireType, decode_key, decode_varint, skip_field};
    let (header, mut msg) = (frame.get(..5)?, frame.get(5..)?);
    if header[0] != 0 || u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize != msg.len() {
        return None;
    }
    let mut status = 0;
    while !msg.is_empty() {
        let (tag, wire) = decode_key(&mut msg).ok()?;
        match (tag, wire) {
            (1, WireType::Varint) => status = decode_varint(&mut msg).ok()?,
            _ => skip_field(wire, tag, &mut msg, prost::encoding::DecodeContext::default()).ok()?,
        }
    }
    Some(status)
}

fn status_name(status: u64) -> &'static str {
    match status {
        0 => "UNKNOWN",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "not SERVING",
    }
}

#[cfg(test)]
mod tests {

    /// The kubelet asks for `/` when a probe's path is empty or absent; the plaintext
    /// answer and the admin-port run must both look for that.
    #[test]
    fn an_empty_or_absent_probe_path_is_the_root() {
        let get = |path: Option<&str>| HttpGet { path: path.map(str::to_owned), ..serde_json::from_str("{}").unwrap() };
        assert_eq!(get(None).path(), "/");
        assert_eq!(get(Some("")).path(), "/");
        assert_eq!(get(Some("/ready")).path(), "/ready");
    }
    use super::*;

    #[test]
    fn what_injection_writes_parses_and_bad_probes_are_named() {
        let ok = r#"{"web/readyz":{"port":8080,"timeoutSeconds":2,"httpGet":{"path":"/ready","port":"http","httpHeaders":[{"name":"X-Probe","value":"1"}]}},
                     "web/livez":{"port":8080,"timeoutSeconds":1,"tcpSocket":{"port":8080}}}"#;
        let probes = parse(ok).unwrap();
        assert_eq!(probes["web/readyz"].http_get.as_ref().unwrap().headers[0].name, "X-Probe");
        assert!(probes["web/livez"].tcp_socket.is_some());
        let grpc = parse(r#"{"api/readyz":{"port":9000,"grpc":{"port":9000,"service":"shop.Catalog"}}}"#).unwrap();
        assert_eq!(grpc["api/readyz"].grpc.as_ref().unwrap().service.as_deref(), Some("shop.Catalog"));
        for (bad, says) in [
            ("[]", "not a JSON object"),
            (r#"{"web":{"port":1,"tcpSocket":{}}}"#, "<container>/<kind>"),
            (r#"{"web/x":{"port":0,"tcpSocket":{}}}"#, "port 0"),
            (r#"{"web/x":{"port":1}}"#, "exactly one"),
            (r#"{"web/x":{"port":1,"tcpSocket":{},"grpc":{}}}"#, "exactly one"),
            (
                r#"{"web/x":{"port":1,"httpGet":{"httpHeaders":[{"name":"a b","value":"1"}]}}}"#,
                "not a valid HTTP header",
            ),
            (r#"{"web/x":{"port":1,"tcpSocket":{},"extra":1}}"#, "unknown field"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    /// What Kubernetes accepts must not stop the sidecar: such probes are read as the
    /// kubelet reads them.
    #[test]
    fn probes_kubernetes_accepts_are_read_as_the_kubelet_reads_them() {
        let probes = parse(
            r#"{"web/readyz":{"port":1,"timeoutSeconds":0,"httpGet":{"path":"healthz"}},
                "web/startupz":{"port":1,"timeoutSeconds":600,"tcpSocket":{}}}"#,
        )
        .unwrap();
        assert_eq!(probes["web/readyz"].http_get.as_ref().unwrap().path(), "/healthz");
        assert_eq!(probes["web/readyz"].timeout_seconds, 1);
        assert_eq!(probes["web/startupz"].timeout_seconds, MAX_TIMEOUT_SECONDS);
    }

    #[test]
    fn health_messages_encode_and_decode() {
        assert!(health_request("").is_empty(), "the whole server: an empty message");
        assert_eq!(health_request("a.B"), b"\x0a\x03a.B");
        assert_eq!(&grpc_frame(b"\x08\x01")[..], b"\x00\x00\x00\x00\x02\x08\x01");
        assert_eq!(serving_status(&grpc_frame(b"\x08\x01")), Some(1));
        assert_eq!(serving_status(&grpc_frame(b"\x08\x02")), Some(2));
        assert_eq!(serving_status(&grpc_frame(b"")), Some(0), "absent is UNKNOWN");
        assert_eq!(serving_status(&grpc_frame(b"\x12\x01x\x08\x01")), Some(1), "unknown fields are skipped");
        assert_eq!(serving_status(b"\x00\x00\x00\x00\x05\x08"), None, "length mismatch");
        assert_eq!(serving_status(b"\x01\x00\x00\x00\x00"), None, "compressed");
        assert_eq!(serving_status(b"\x00\x00"), None, "short");
    }
}
