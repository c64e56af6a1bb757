//! The app's kubelet probes, run by the proxy from inside the pod. `trellis inject` points an
//! app's `httpGet`/`tcpSocket` probe at the admin listener (`/app-health/<container>/<kind>`)
//! because the kubelet's plaintext request to a captured app port would meet the inbound
//! listener, which requires mTLS; it gives the original probes to the proxy as JSON
//! (`--app-probes` / `TRELLIS_APP_PROBES`, written by `trellis_control::inject::probes`).
//!
//! Where it sits: beside the data path, on the admin listener (`admin.rs`). A probe connects
//! to the app as the proxy's uid, which the capture rules leave alone: on 127.0.0.1, then on
//! the pod IP for apps listening only there. HTTP probes answer with the app's own status (the
//! kubelet counts 200–399 as success), TCP probes 200 when the port accepts; an app that does
//! not answer in the probe's `timeoutSeconds` is a 503. Only the configured probes are run:
//! the admin port forwards nothing else to the app.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
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

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

/// The probes by `<container>/<kind>`.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// Longest a probe may take, whatever its `timeoutSeconds` says (the kubelet's own maximum
/// is far above any sane value; a probe is not a long poll).
const MAX_TIMEOUT_SECONDS: u64 = 300;

/// Parses and checks `TRELLIS_APP_PROBES`; the error names the probe and what is wrong.
pub fn parse(json: &str) -> Result<AppProbes, String> {
    let probes: AppProbes = serde_json::from_str(json).map_err(|e| format!("not a JSON object of probes: {e}"))?;
    for (key, p) in &probes {
        let bad = |what: &str| Err(format!("probe {key:?}: {what}"));
        if key.split('/').count() != 2 || key.split('/').any(str::is_empty) {
            return bad("the key must be <container>/<kind>");
        }
        if p.port == 0 {
            return bad("port 0");
        }
        if !(1..=MAX_TIMEOUT_SECONDS).contains(&p.timeout_seconds) {
            return bad(&format!("timeoutSeconds must be 1..={MAX_TIMEOUT_SECONDS}"));
        }
        match (&p.http_get, &p.tcp_socket) {
            (Some(get), None) => {
                if let Some(path) = &get.path
                    && !(path.is_empty() || path.starts_with('/'))
                {
                    return bad(&format!("path {path:?} must start with '/'"));
                }
                for h in &get.headers {
                    if HeaderName::from_bytes(h.name.as_bytes()).is_err() || HeaderValue::from_str(&h.value).is_err() {
                        return bad(&format!("header {:?} is not a valid HTTP header", h.name));
                    }
                }
            }
            (None, Some(_)) => {}
            _ => return bad("needs exactly one of httpGet and tcpSocket"),
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
        match &probe.http_get {
            None => Ok((StatusCode::OK, format!("port {} accepts connections\n", probe.port))),
            Some(get) => http_get(tcp, probe.port, get, user_agent).await.map(|s| (s, format!("app answered {s}\n"))),
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
    let path = get.path.as_deref().filter(|p| !p.is_empty()).unwrap_or("/");
    let mut req = Request::get(path)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_injection_writes_parses_and_bad_probes_are_named() {
        let ok = r#"{"web/readyz":{"port":8080,"timeoutSeconds":2,"httpGet":{"path":"/ready","port":"http","httpHeaders":[{"name":"X-Probe","value":"1"}]}},
                     "web/livez":{"port":8080,"timeoutSeconds":1,"tcpSocket":{"port":8080}}}"#;
        let probes = parse(ok).unwrap();
        assert_eq!(probes["web/readyz"].http_get.as_ref().unwrap().headers[0].name, "X-Probe");
        assert!(probes["web/livez"].tcp_socket.is_some());
        for (bad, says) in [
            ("[]", "not a JSON object"),
            (r#"{"web":{"port":1,"tcpSocket":{}}}"#, "<container>/<kind>"),
            (r#"{"web/x":{"port":0,"tcpSocket":{}}}"#, "port 0"),
            (r#"{"web/x":{"port":1,"timeoutSeconds":0,"tcpSocket":{}}}"#, "timeoutSeconds"),
            (r#"{"web/x":{"port":1}}"#, "exactly one"),
            (r#"{"web/x":{"port":1,"httpGet":{"path":"x"}}}"#, "must start with '/'"),
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
}
