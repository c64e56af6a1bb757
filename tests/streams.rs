//! Bodies across the mesh (real `trellis` processes on loopback): request and response
//! bodies larger than HTTP/2's flow-control windows, chunked uploads, gRPC-style trailers
//! both ways, and the pooled sidecar-to-sidecar connection outliving a peer restart.
//!
//! app (HTTP/1.1 or HTTP/2) → web's outbound route → pooled HTTP/2 over mTLS → api's
//! inbound → a body-echo backend.

mod support;

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use support::mesh::AppPair;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// web's route to api's inbound, which forwards to a [`backends::body_echo`].
async fn bodies_mesh() -> AppPair {
    AppPair::start(backends::body_echo().await).await
}

/// The bytes `/bytes/N` answers.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

async fn send(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
    method: &str,
    url: &str,
    body: Vec<u8>,
) -> (u16, Bytes) {
    let req = http::Request::builder().method(method).uri(url).body(http_body_util::Full::from(body)).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req)).await.expect("answered").unwrap();
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect()).await.expect("body ended");
    (status, body.unwrap().to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_larger_than_the_flow_control_windows_cross_both_ways() {
    let m = bodies_mesh().await;
    let client = http_client();
    // 3 MiB up: three times the stream window the inbound announces to the outbound.
    let upload = pattern(3 << 20);
    let (status, echoed) = send(&client, "POST", &format!("http://{}/echo", m.route), upload.clone()).await;
    assert_eq!(status, 200);
    assert!(echoed[..] == upload[..], "the 3 MiB upload came back intact ({} bytes)", echoed.len());
    // 5 MB down: more than the outbound's stream window (1 MiB) and connection window (4 MiB).
    let (status, body) = send(&client, "GET", &format!("http://{}/bytes/5000000", m.route), Vec::new()).await;
    assert_eq!(status, 200);
    assert!(body[..] == pattern(5_000_000)[..], "the 5 MB download arrived intact ({} bytes)", body.len());
    // Several at once on the one pooled connection, each getting its own bytes.
    let calls = (1..=8).map(|i| {
        let client = client.clone();
        let url = format!("http://{}/bytes/{}", m.route, i * 300_000);
        tokio::spawn(async move { (i, send(&client, "GET", &url, Vec::new()).await) })
    });
    for call in calls {
        let (i, (status, body)) = call.await.unwrap();
        assert_eq!((status, body.len()), (200, i * 300_000));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_streams_through() {
    let m = bodies_mesh().await;
    let mut tcp = TcpStream::connect(m.route).await.unwrap();
    let head = "POST /echo HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut sent = Vec::new();
    for i in 0..40u8 {
        // Sent piece by piece, so the sidecars see a body that is still arriving.
        let chunk = vec![b'a' + (i % 26); 10_000];
        tcp.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.unwrap();
        tcp.write_all(&chunk).await.unwrap();
        tcp.write_all(b"\r\n").await.unwrap();
        sent.extend_from_slice(&chunk);
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tcp.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut answer)).await.expect("answered").unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..text.len().min(300)]);
    assert!(answer.ends_with(&sent), "the 400,000 streamed bytes came back whole");
}

/// A request body of fixed frames (data, then trailers), handed out one per poll.
struct Frames(VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_style_trailers_cross_both_ways_over_http2() {
    let m = bodies_mesh().await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build::<_, Frames>(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-sum", "d41d8cd9".parse().unwrap());
    let frames = [
        Frame::data(Bytes::from_static(b"hello ")),
        Frame::data(Bytes::from_static(b"mesh")),
        Frame::trailers(trailers),
    ];
    let req = http::Request::post(format!("http://{}/echo", m.route))
        // gRPC asks for trailers end to end; a sidecar must keep this one hop-by-hop header.
        .header("te", "trailers")
        .body(Frames(frames.into()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await.expect("answered").unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.unwrap();
    let trailers = got.trailers().cloned().expect("the backend's trailers reached the client");
    assert_eq!(got.to_bytes(), "hello mesh");
    assert_eq!(trailers.get("x-request-bytes").unwrap(), "10");
    assert_eq!(trailers.get("x-request-sum").unwrap(), "d41d8cd9", "the client's trailer reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_sidecar_gets_the_next_request_on_a_new_connection() {
    let mut m = bodies_mesh().await;
    let client = http_client();
    let url = format!("http://{}/bytes/10", m.route);
    assert_eq!(send(&client, "GET", &url, Vec::new()).await.0, 200);
    // The pooled connection's other end goes away without a GOAWAY...
    m.api.proc.signal(nix::sys::signal::Signal::SIGKILL);
    m.api.proc.wait_exit(Duration::from_secs(5));
    m.api = AppPair::start_api(&m.control, m.inbound, m.app);
    // ...and the outbound noticed: the first request after the restart succeeds.
    let (status, body) = send(&client, "GET", &url, Vec::new()).await;
    assert_eq!((status, body.len()), (200, 10), "{}", String::from_utf8_lossy(&body));
}

/// Sends `request` on a new connection to `to` and reads the answer until the server closes.
async fn exchange(to: std::net::SocketAddr, request: &str) -> String {
    let mut tcp = TcpStream::connect(to).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await.expect("answered").unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// An HTTP/1.1 app's trailers (a bare chunked response, as nginx's `add_trailer` sends) cross
/// the mesh both ways to an HTTP/1.1 client that asked for them (`TE: trailers`): hyper's
/// HTTP/1.1 server and client write the trailer fields a `Trailer` header names, and that header
/// is end to end. A response whose trailers are not announced arrives whole without them. On
/// both sidecars every such request's span is clean: the trailers are the body's last frame,
/// not a response cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_apps_trailers_reach_the_client_and_end_the_span_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (api_spans, web_spans) = (dir.path().join("api.jsonl"), dir.path().join("web.jsonl"));
    let file = |p: &std::path::Path| vec!["--trace-file".to_string(), p.display().to_string()];
    let m = AppPair::start_with(backends::trailers_app().await, &file(&api_spans), &file(&web_spans)).await;

    let upload = "POST /announced HTTP/1.1\r\nHost: api\r\nTE: trailers\r\nTrailer: x-sum\r\n\
                  Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n";
    let answer = exchange(m.route, upload).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.to_ascii_lowercase().contains("\r\ntrailer: x-t, x-request-sum"), "{head}");
    assert_eq!(
        body, "5\r\nbody\n\r\n0\r\nx-t: yes\r\nx-request-sum: 42\r\n\r\n",
        "the app's trailers reached the client, and the client's trailer reached the app"
    );

    let plain = "GET /unannounced HTTP/1.1\r\nHost: api\r\nTE: trailers\r\nConnection: close\r\n\r\n";
    let answer = exchange(m.route, plain).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Whole: the body and the last chunk. hyper writes no trailer field nothing announced.
    assert!(answer.ends_with("5\r\nbody\n\r\n0\r\n\r\n"), "{answer}");

    for path in ["/announced", "/unannounced"] {
        for (spans, direction) in [(&api_spans, "inbound"), (&web_spans, "outbound")] {
            let span = wait_for_span(spans, direction, |s| is_request_span(s, direction, path)).await;
            assert_eq!(span["status"]["code"], "unset", "{direction} {path}: {span}");
            assert!(span["attributes"].get("error.type").is_none(), "{direction} {path}: {span}");
            assert_eq!(span["attributes"]["http.response.status_code"], 200);
            assert_eq!(span["attributes"]["http.response.body.size"], 5, "{direction} {path}: {span}");
        }
    }
}
