//! The demo's three workloads, built into the binary so the demo needs nothing installed:
//! `api` (an HTTP server), `db` (a TCP server that speaks first, like a database), and the
//! `web` client calls the demo makes through web's sidecar.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `api`: answers every request with a line naming who called (the sidecar's verified
/// `x-trellis-peer-id`) and what they asked for.
pub async fn api_server() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let peer = req.headers().get("x-trellis-peer-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
                    let body = format!("api: {} {} from {peer}\n", req.method(), req.uri().path());
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

pub const DB_BANNER: &[u8] = b"db ready\n";

/// `db`: sends its banner as soon as a client connects, then echoes.
pub async fn db_server() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                if tcp.write_all(DB_BANNER).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// What one HTTP call saw.
pub struct HttpOutcome {
    pub status: u16,
    pub denied: Option<String>,
    pub body: String,
    pub latency: Duration,
}

/// An HTTP/1.1 request through a sidecar listener.
pub async fn http_call(to: SocketAddr, method: &str, path: &str) -> Result<HttpOutcome, String> {
    let start = Instant::now();
    let tcp = TcpStream::connect(to).await.map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "api")
        .body(Full::<Bytes>::default())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let denied = resp.headers().get("x-trellis-denied").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(HttpOutcome {
        status,
        denied,
        body: String::from_utf8_lossy(&body).trim().to_string(),
        latency: start.elapsed(),
    })
}

/// A TCP connection through a sidecar listener: did the server's banner arrive?
pub async fn tcp_call(to: SocketAddr) -> (Result<String, String>, Duration) {
    let start = Instant::now();
    let result = async {
        let mut tcp = TcpStream::connect(to).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; DB_BANNER.len()];
        match tokio::time::timeout(Duration::from_secs(3), tcp.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Ok(String::from_utf8_lossy(&buf).trim().to_string()),
            Ok(Err(_)) => Err("connection closed".to_string()),
            Err(_) => Err("no answer".to_string()),
        }
    }
    .await;
    (result, start.elapsed())
}

/// A client with no SVID trying the api sidecar's mTLS port directly.
pub async fn rogue_call(
    inbound: SocketAddr,
    bundle: &trellis_identity::TrustBundle,
    api: &trellis_identity::SpiffeId,
) -> (Result<(), String>, Duration) {
    let start = Instant::now();
    let result = async {
        let cfg = trellis_identity::client_config(None, bundle, api.clone()).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(inbound).await.map_err(|e| e.to_string())?;
        let name = trellis_identity::pki_types::ServerName::IpAddress(inbound.ip().into());
        let mut tls =
            tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(|e| e.to_string())?;
        // TLS 1.3 clients learn of a refused certificate on their first read.
        tls.write_all(b"GET /api/items HTTP/1.1\r\nHost: api\r\n\r\n").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await {
            Ok(0) => Err("connection closed".to_string()),
            Ok(_) => Ok(()),
            Err(e) => Err(match trellis_identity::VerifyError::from_io(&e) {
                Some(v) => v.to_string(),
                None => e.to_string(),
            }),
        }
    }
    .await;
    (result, start.elapsed())
}
