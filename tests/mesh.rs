//! The data plane end to end (issue #5): real `trellis` processes — a control plane and two
//! sidecars — with real HTTP and TCP backends, on loopback.
//!
//! web's app → web's outbound route → mTLS → api's inbound → api's backend.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::mesh::{API, AppPair, Mesh, MeshOptions, WEB, start_mesh};

fn http_rule(backend: SocketAddr) -> String {
    format!(
        "      to:\n        - ports: [{}]\n          methods: [GET, HEAD]\n          paths: [\"/api/*\", \"/ws\", \"/slow/*\"]\n",
        backend.port()
    )
}

async fn mesh(control_args: &[&str], api_args: &[&str], tcp_backend: SocketAddr) -> Mesh {
    let policy = |backend: SocketAddr, tcp: SocketAddr| {
        allow("api-from-web", API, WEB, &http_rule(backend))
            + &allow("api-tcp-from-web", API, WEB, &format!("      to:\n        - ports: [{}]\n", tcp.port()))
    };
    let extra = |name: &str| match name {
        "api" => api_args.iter().map(|s| s.to_string()).collect(),
        _ => Vec::new(),
    };
    start_mesh(MeshOptions { control_args, policy: &policy, tcp_backend, extra: &extra }).await
}

async fn default_mesh() -> Mesh {
    let tcp = backends::tcp_echo().await;
    mesh(&[], &[], tcp).await
}

async fn echo_once(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf)).await??;
    Ok(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_get_reaches_backend_with_verified_peer_id() {
    let m = default_mesh().await;
    let client = http_client();
    let (status, _, body) = get(&client, &format!("http://{}/api/items?x=1", m.http), "GET", &[]).await;
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["path"], "/api/items");
    assert_eq!(seen["query"], "x=1");
    assert_eq!(seen["headers"]["host"], m.http.to_string(), "the app sees the Host its client used");
    assert_eq!(seen["headers"]["x-trellis-peer-id"], WEB);
    // The app spoke HTTP/1.1 to its sidecar, so its backend hears HTTP/1.1 again.
    assert_eq!(seen["version"], "HTTP/1.1");
    assert!(
        m.api.metrics().contains("trellis_flows_total{direction=\"inbound\",decision=\"allow\",protocol=\"http2\"}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_path_and_method_get_403_with_reason() {
    let m = default_mesh().await;
    let client = http_client();
    let (status, headers, body) = get(&client, &format!("http://{}/admin", m.http), "GET", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(headers["x-trellis-denied"], "default-deny");
    assert!(body.contains("no rule matched"), "{body}");
    let (status, headers, _) = get(&client, &format!("http://{}/api/items", m.http), "DELETE", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(headers["x-trellis-denied"], "default-deny");
    // Methods outside the usual uppercase ones are HTTP too, decided per request like any
    // other (they were once read as opaque TCP, and their connections closed).
    for method in ["FOO_BAR", "get", "REPORT2"] {
        let (status, headers, _) = get(&client, &format!("http://{}/api/items", m.http), method, &[]).await;
        assert_eq!(status, 403, "{method}");
        assert_eq!(headers["x-trellis-denied"], "default-deny", "{method}");
    }
    // `..` cannot climb out of an allowed prefix.
    let (status, _, _) = get(&client, &format!("http://{}/api/../admin", m.http), "GET", &[]).await;
    assert_eq!(status, 403);
    // An explicit DENY names its policy and rule.
    let deny = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: no-secrets}}\nspec:\n  selector: {API}\n  action: DENY\n  rules:\n    - to:\n        - paths: [\"/api/secret*\"]\n"
    );
    let v = m.control.apply(&deny).await;
    m.api.wait_version(v, Duration::from_secs(5));
    let (status, headers, _) = get(&client, &format!("http://{}/api/secret", m.http), "GET", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(headers["x-trellis-denied"], "policy=no-secrets; rule=0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_peer_id_header_is_replaced() {
    let m = default_mesh().await;
    let client = http_client();
    // Under any spelling a CGI-style app folds into HTTP_X_TRELLIS_PEER_ID.
    for name in ["x-trellis-peer-id", "x_trellis_peer_id", "x-trellis_peer-id"] {
        let spoof = [(name, "spiffe://cluster.local/ns/kube-system/sa/admin")];
        let (status, _, body) = get(&client, &format!("http://{}/api/x", m.http), "GET", &spoof).await;
        assert_eq!(status, 200);
        let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["headers"]["x-trellis-peer-id"], WEB, "{name}");
        let forged: Vec<&String> = seen["headers"].as_object().unwrap().keys().filter(|k| k.contains("peer")).collect();
        assert_eq!(forged, ["x-trellis-peer-id"], "{name}: {seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_is_allowed_or_closed_by_policy() {
    let m = default_mesh().await;
    let mut conn = TcpStream::connect(m.tcp).await.unwrap();
    assert_eq!(echo_once(&mut conn, b"hello tcp").await.unwrap(), b"hello tcp");
    drop(conn);
    m.control.delete("api-tcp-from-web").await;
    let v = m.control.client().list_policies().await.unwrap().version;
    m.api.wait_version(v, Duration::from_secs(5));
    let mut conn = TcpStream::connect(m.tcp).await.unwrap();
    let r = echo_once(&mut conn, b"hello again").await;
    assert!(r.is_err(), "a denied TCP connection is closed: {r:?}");
    assert!(m.api.metrics().contains("trellis_flows_total{direction=\"inbound\",decision=\"deny\",protocol=\"tcp\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_policy_closes_an_open_connection_within_a_second() {
    let m = default_mesh().await;
    let mut conn = TcpStream::connect(m.tcp).await.unwrap();
    assert_eq!(echo_once(&mut conn, b"open").await.unwrap(), b"open");
    let revoked_at = Instant::now();
    m.control.delete("api-tcp-from-web").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "connection still open 1s after revocation: {n:?}");
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
}

/// An opaque app whose connections each follow the script their first line names, telling
/// the test what the app saw:
/// - `reset`: writes `partial`, waits for one byte (so the client has read it), then resets
///   the connection (`SO_LINGER` 0, then close);
/// - `close`: writes `complete`, closes its write half (a FIN), then reports what the client
///   sent after that (half-close);
/// - `hold`: writes `ok`, then reports how its next read ended.
async fn scripted_app() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::AsyncBufReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tcp = tokio::io::BufReader::new(tcp);
                let mut script = String::new();
                if tcp.read_line(&mut script).await.is_err() {
                    return;
                }
                match script.trim() {
                    "reset" => {
                        tcp.write_all(b"partial").await.unwrap();
                        let mut go = [0u8; 1];
                        tcp.read_exact(&mut go).await.unwrap();
                        tcp.get_ref().set_zero_linger().unwrap();
                    }
                    "close" => {
                        tcp.write_all(b"complete").await.unwrap();
                        tcp.shutdown().await.unwrap();
                        let mut after = Vec::new();
                        let report = match tcp.read_to_end(&mut after).await {
                            Ok(_) => format!("after FIN: {}", String::from_utf8_lossy(&after)),
                            Err(e) => format!("after FIN: {:?}", e.kind()),
                        };
                        let _ = tx.send(report);
                    }
                    "hold" => {
                        tcp.write_all(b"ok").await.unwrap();
                        let mut buf = [0u8; 16];
                        let report = match tcp.read(&mut buf).await {
                            Ok(0) => "EOF".to_string(),
                            Ok(n) => format!("{n} bytes"),
                            Err(e) => format!("{:?}", e.kind()),
                        };
                        let _ = tx.send(report);
                    }
                    other => panic!("no script {other:?}"),
                }
            });
        }
    });
    (addr, rx)
}

/// The status code and `error.type` of a span.
fn status_of(span: &serde_json::Value) -> (&str, Option<&str>) {
    (span["status"]["code"].as_str().unwrap(), span["attributes"]["error.type"].as_str())
}

/// A request whose client goes away before the app answers still gets its span on both
/// sides: status ERROR, `error.type` `request_cancelled`, no status code. Until then a
/// request with no response had no span at all (DESIGN §7: one span per request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_abandoned_before_its_response_still_gets_a_span_and_is_counted() {
    // An app that takes requests and never answers; it says when it has one.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let (got, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let got = got.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                    let _ = got.send(n);
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let spans = |name: &str| dir.path().join(format!("{name}-spans.jsonl"));
    let extra = |name: &str| vec!["--trace-file".to_string(), spans(name).display().to_string()];
    let pair = AppPair::start_with(app, &extra("api"), &extra("web")).await;
    let mut client = TcpStream::connect(pair.route).await.unwrap();
    client.write_all(b"GET /never HTTP/1.1\r\nhost: api\r\n\r\n").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), got_rx.recv()).await.expect("the app got the request");
    drop(client);
    for (side, direction) in [("web", "outbound"), ("api", "inbound")] {
        let span = wait_for_span(&spans(side), side, |s| is_request_span(s, direction, "/never")).await;
        assert_eq!(status_of(&span), ("error", Some("request_cancelled")), "{side}: {span}");
        assert!(span["attributes"].get("http.response.status_code").is_none(), "{side}: {span}");
    }
    // Metrics count what the spans record: the request, and its time.
    for (sidecar, direction, protocol) in [(&pair.web, "outbound", "http1"), (&pair.api, "inbound", "http2")] {
        let text = sidecar.metrics();
        let flow =
            format!("trellis_flows_total{{direction=\"{direction}\",decision=\"allow\",protocol=\"{protocol}\"}} 1\n");
        let timed = format!("trellis_request_duration_seconds_count{{direction=\"{direction}\"}} 1\n");
        assert!(text.contains(&flow) && text.contains(&timed), "{direction}:\n{text}");
    }
}

/// An app that resets its connection mid-answer (a close-delimited protocol's truncated
/// answer) is seen by its client as a reset, never as the clean end a FIN would say, and
/// both sidecars' spans record it; a client's reset reaches the app as one. A FIN is still
/// an EOF, and the other direction keeps going after it (half-close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_crosses_the_mesh_as_a_reset_and_a_fin_as_an_eof() {
    let (app, mut seen) = scripted_app().await;
    let dir = tempfile::tempdir().unwrap();
    let spans = |name: &str| dir.path().join(format!("{name}-spans.jsonl"));
    let extra = |name: &str| vec!["--trace-file".to_string(), spans(name).display().to_string()];
    let policy = |_: SocketAddr, tcp: SocketAddr| {
        allow("api-tcp-from-web", API, WEB, &format!("      to:\n        - ports: [{}]\n", tcp.port()))
    };
    let m = start_mesh(MeshOptions { control_args: &[], policy: &policy, tcp_backend: app, extra: &extra }).await;
    let wait = Duration::from_secs(5);

    // The app resets after its first bytes: they arrive, then the reset does.
    let mut s = TcpStream::connect(m.tcp).await.unwrap();
    let reset_port = s.local_addr().unwrap().port();
    s.write_all(b"reset\n").await.unwrap();
    let mut partial = [0u8; 7];
    tokio::time::timeout(wait, s.read_exact(&mut partial)).await.unwrap().unwrap();
    assert_eq!(&partial, b"partial");
    s.write_all(b"!").await.unwrap();
    let mut rest = [0u8; 16];
    match tokio::time::timeout(wait, s.read(&mut rest)).await.expect("the connection ended") {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("the app's reset reached its client as a clean end ({n} more bytes, then EOF)"),
    }

    // A FIN from the app is the client's EOF; the client can still send, then close too.
    let mut s = TcpStream::connect(m.tcp).await.unwrap();
    let close_port = s.local_addr().unwrap().port();
    s.write_all(b"close\n").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(wait, s.read_to_end(&mut got)).await.unwrap().expect("a clean EOF");
    assert_eq!(got, b"complete");
    s.write_all(b"late").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(tokio::time::timeout(wait, seen.recv()).await.unwrap().unwrap(), "after FIN: late");

    // The client resets: the app's read fails with a reset, not an EOF.
    let mut s = TcpStream::connect(m.tcp).await.unwrap();
    let hold_port = s.local_addr().unwrap().port();
    s.write_all(b"hold\n").await.unwrap();
    let mut ok = [0u8; 2];
    tokio::time::timeout(wait, s.read_exact(&mut ok)).await.unwrap().unwrap();
    s.set_zero_linger().unwrap();
    drop(s);
    assert_eq!(tokio::time::timeout(wait, seen.recv()).await.unwrap().unwrap(), "ConnectionReset");

    // Each flow's spans, both sides: web's by its client's port, api's by the bytes it carried.
    let (web, api) = (spans("web"), spans("api"));
    let outbound = |port: u16| move |s: &serde_json::Value| s["attributes"]["client.port"] == port;
    let inbound = |sent: u64, received: u64| {
        move |s: &serde_json::Value| {
            s["name"] == "inbound connection"
                && s["attributes"]["trellis.bytes.sent"] == sent
                && s["attributes"]["trellis.bytes.received"] == received
        }
    };
    let reset_out = wait_for_span(&web, "the app's reset, outbound", outbound(reset_port)).await;
    assert_eq!(status_of(&reset_out), ("error", Some("peer_reset")), "{reset_out}");
    assert_eq!(reset_out["attributes"]["trellis.decision"], "allow");
    assert_eq!(reset_out["attributes"]["trellis.bytes.received"], 7);
    let reset_in = wait_for_span(&api, "the app's reset, inbound", inbound(7, 7)).await;
    assert_eq!(status_of(&reset_in), ("error", Some("app_failed")), "{reset_in}");
    assert_eq!(reset_in["status"]["message"], "app_failed: the app reset the connection");
    assert_eq!(reset_in["attributes"]["trellis.decision"], "allow");

    let close_out = wait_for_span(&web, "the app's FIN, outbound", outbound(close_port)).await;
    assert_eq!(status_of(&close_out), ("unset", None), "{close_out}");
    let close_in = wait_for_span(&api, "the app's FIN, inbound", inbound(10, 8)).await;
    assert_eq!(status_of(&close_in), ("unset", None), "{close_in}");

    let hold_out = wait_for_span(&web, "the client's reset, outbound", outbound(hold_port)).await;
    assert_eq!(status_of(&hold_out), ("error", Some("client_reset")), "{hold_out}");
    let hold_in = wait_for_span(&api, "the client's reset, inbound", inbound(5, 2)).await;
    assert_eq!(status_of(&hold_in), ("error", Some("peer_reset")), "{hold_in}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_to_a_peer_with_another_identity_is_refused() {
    let m = default_mesh().await;
    let wrong = addr(free_port());
    let web2 = Sidecar::start(
        &m.control,
        "spiffe://cluster.local/ns/shop/sa/web2",
        &["--route".into(), format!("{wrong}={},spiffe://cluster.local/ns/shop/sa/db", m.api_http_inbound)],
    );
    let client = http_client();
    let (status, headers, body) = get(&client, &format!("http://{wrong}/api/x"), "GET", &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(headers["x-trellis-error"], "id_mismatch");
    assert!(body.contains("spiffe://cluster.local/ns/shop/sa/api"), "{body}");
    assert!(web2.metrics().contains("trellis_handshake_failures_total{reason=\"id_mismatch\"}"));
}

/// A WebSocket handshake for `path` through web's route, with `connection` as the
/// `Connection` header; returns the socket and the response head.
async fn open_websocket(m: &Mesh, path: &str, connection: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(m.http).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: api\r\nConnection: {connection}\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    (s, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let m = default_mesh().await;
    let (mut s, head) = open_websocket(&m, "/ws", "Upgrade").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("x-echo-path: /ws\r\n") && head.contains(&format!("x-echo-peer: {WEB}\r\n")), "{head}");
    assert_eq!(echo_once(&mut s, b"frames are just bytes to us").await.unwrap(), b"frames are just bytes to us");

    // The app gets the path the policy judged, not the one sent (a Java app would map
    // `/x/;/../ws`-style paths differently), and the caller's identity whatever the client
    // names in `Connection`.
    let (_s, head) = open_websocket(&m, "/api/../ws", "Upgrade, x-trellis-peer-id").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("x-echo-path: /ws\r\n") && head.contains(&format!("x-echo-peer: {WEB}\r\n")), "{head}");
}

/// Reads one HTTP/1.1 response (head and `content-length` body) off a raw socket.
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await.unwrap().unwrap();
        assert_eq!(n, 1, "connection closed mid-head: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut body)).await.unwrap().unwrap();
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// Every client that gives up a request resets its stream on the pooled connection between
/// the sidecars. h2's guards against abusive peers closed that connection (GOAWAY
/// `ENHANCE_YOUR_CALM`) after 1,024 such resets in its life, or 20 at once on streams not yet
/// taken, cutting every other client's request on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_abandoned_requests_leaves_the_pooled_connection_to_the_others() {
    let m = default_mesh().await;
    let url = format!("http://{}/slow/6000", m.http);
    let client = http_client();
    let victim = tokio::spawn(async move { get(&client, &url, "GET", &[]).await });
    let start = Instant::now();
    for _ in 0..12 {
        let batch: Vec<_> = (0..100)
            .map(|_| {
                let addr = m.http;
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    s.write_all(b"GET /slow/5000 HTTP/1.1\r\nHost: api\r\n\r\n").await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                })
            })
            .collect();
        for t in batch {
            t.await.unwrap();
        }
    }
    assert!(start.elapsed() < Duration::from_secs(5), "the storm outlasted the victim: {:?}", start.elapsed());
    let (status, _, body) = victim.await.unwrap();
    assert_eq!(status, 200, "{body}");
}

/// ApacheBench's `-k`: HTTP/1.0 with `Connection: Keep-Alive`. The response must say
/// `keep-alive` to keep the connection (or the client waits for a close that never comes), and
/// a plain HTTP/1.0 request's connection must end after its response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_clients_get_keep_alive_when_asked_and_a_close_otherwise() {
    let m = default_mesh().await;
    let mut s = TcpStream::connect(m.http).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /api/a HTTP/1.0\r\nConnection: Keep-Alive\r\nHost: api\r\n\r\n").await.unwrap();
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.to_ascii_lowercase().contains("connection: keep-alive\r\n"), "{head}");
        assert!(body.contains("/api/a"), "{body}");
    }
    let mut s = TcpStream::connect(m.http).await.unwrap();
    s.write_all(b"GET /api/b HTTP/1.0\r\nHost: api\r\n\r\n").await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.contains(" 200 ") && !head.to_ascii_lowercase().contains("keep-alive"), "{head}");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(matches!(n, Ok(Ok(0))), "the connection stays open after an HTTP/1.0 response: {n:?}");
}

const H2C_UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_forwarded_as_a_plain_request_and_smuggles_nothing() {
    let m = default_mesh().await;
    let mut s = TcpStream::connect(m.http).await.unwrap();
    s.write_all(H2C_UPGRADE).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "no switch to h2c: {head}");
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("upgrade:"), "{head}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    for hop in ["upgrade", "http2-settings", "connection"] {
        assert!(seen["headers"].get(hop).is_none(), "the app saw {hop}: {seen}");
    }
    // The connection carries on as HTTP/1.1, and each request on it is decided on its own.
    s.write_all(b"GET /admin HTTP/1.1\r\nHost: api\r\n\r\n").await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.to_ascii_lowercase().contains("x-trellis-denied: default-deny"), "{head}");
    // WebSocket is still carried (see websocket_upgrade_passes_through).
}

/// An app that answers `101` to any request and then records every byte it gets.
async fn switches_to_anything() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut answered = false;
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let _ = tx.send(buf[..n].to_vec());
                    if !answered {
                        answered = true;
                        let switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
                        if tcp.write_all(switch).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_switches_protocols_unasked_gets_no_tunnel() {
    let (app, mut seen) = switches_to_anything().await;
    let pair = AppPair::start(app).await;
    let only_ws =
        format!("      to:\n        - ports: [{}]\n          methods: [GET]\n          paths: [\"/ws\"]\n", app.port());
    let v = pair.control.apply(&allow("app-from-web", API, WEB, &only_ws)).await;
    pair.api.wait_version(v, Duration::from_secs(5));
    let mut s = TcpStream::connect(pair.route).await.unwrap();
    s.write_all(H2C_UPGRADE).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(!head.starts_with("HTTP/1.1 101"), "the client was switched: {head}");
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    // What follows is a request of its own (denied), never bytes in a tunnel to the app.
    let _ = s.write_all(b"GET /admin HTTP/1.1\r\nHost: api\r\n\r\n").await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest).into_owned();
    assert!(rest.is_empty() || rest.starts_with("HTTP/1.1 403"), "{rest}");
    let mut got = Vec::new();
    while let Ok(chunk) = seen.try_recv() {
        got.extend(chunk);
    }
    let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(got.starts_with("get /ws http/1.1"), "{got}");
    assert!(!got.contains("upgrade") && !got.contains("http2-settings"), "the app saw the offer: {got}");
    assert!(!got.contains("/admin"), "a denied request reached the app: {got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_policy_closes_an_open_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let spans = dir.path().join("api-spans.jsonl");
    let m = mesh(&[], &["--trace-file", spans.to_str().unwrap()], backends::tcp_echo().await).await;
    let (mut s, head) = open_websocket(&m, "/ws", "Upgrade").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(echo_once(&mut s, b"still allowed").await.unwrap(), b"still allowed");
    // The same policy, without /ws.
    let api_only = format!(
        "      to:\n        - ports: [{}]\n          methods: [GET, HEAD]\n          paths: [\"/api/*\"]\n",
        m.backend.port()
    );
    let revoked_at = Instant::now();
    m.control.apply(&allow("api-from-web", API, WEB, &api_only)).await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "WebSocket still open after revocation: {n:?}");
    assert!(revoked_at.elapsed() < Duration::from_secs(2));
    let metrics = support::prom::parse(&m.api.metrics()).unwrap();
    assert!(metrics.sum("trellis_connections_revoked_total", &[]) >= 1.0, "{:?}", m.api.metrics());
    assert!(m.api.proc.logs().contains("upgraded connection closed: revoked"));
    // The HTTP connection that carried it says why it ended.
    let deadline = Instant::now() + Duration::from_secs(5);
    let conn = loop {
        let text = std::fs::read_to_string(&spans).unwrap_or_default();
        let found = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["name"] == "inbound connection");
        if let Some(v) = found {
            break v;
        }
        assert!(Instant::now() < deadline, "no inbound connection span: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (conn["status"]["code"].as_str(), conn["attributes"]["error.type"].as_str()),
        (Some("error"), Some("revoked")),
        "{conn}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_block_other_clients() {
    let m = default_mesh().await;
    // Ten clients that send half a request line and stall.
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(m.http).await.unwrap();
        s.write_all(b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Slow: ").await.unwrap();
        stalled.push(s);
    }
    let client = http_client();
    let start = Instant::now();
    for _ in 0..5 {
        let (status, _, _) = get(&client, &format!("http://{}/api/fast", m.http), "GET", &[]).await;
        assert_eq!(status, 200);
    }
    assert!(start.elapsed() < Duration::from_secs(2), "others were held up: {:?}", start.elapsed());
    // Directly against the inbound too, over mTLS, the header timeout applies; here we
    // only check the stalled clients are still stalled, not served.
    assert_eq!(stalled.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_behind_an_opaque_port_has_no_sniff_delay() {
    let banner = backends::banner_server(b"220 db ready\r\n").await;
    // A long detect timeout on both sides would make any sniffing obvious.
    let m = mesh(&[], &["--detect-timeout", "5s"], banner).await;
    let start = Instant::now();
    let mut s = TcpStream::connect(m.tcp).await.unwrap();
    let mut buf = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"220 db ready\r\n");
    assert!(start.elapsed() < Duration::from_millis(1000), "banner took {:?}", start.elapsed());
    assert_eq!(echo_once(&mut s, b"QUIT\r\n").await.unwrap(), b"QUIT\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_request_then_exits_zero() {
    let mut m = default_mesh().await;
    let client = http_client();
    let url = format!("http://{}/slow/1500", m.http);
    let req = tokio::spawn(async move { get(&client, &url, "GET", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    m.api.proc.signal(nix::sys::signal::Signal::SIGTERM);
    // The admin listener answers through the drain: not ready, still alive.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match http_get(m.api.admin, "/ready") {
            Some((503, body)) if body.contains("draining") => break,
            other => assert!(Instant::now() < deadline, "/ready during the drain: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_get(m.api.admin, "/live").map(|r| r.0), Some(200));
    let (status, _, body) = req.await.unwrap();
    assert_eq!(status, 200, "the in-flight request completed: {body}");
    assert_eq!(m.api.proc.wait_exit(Duration::from_secs(10)), Some(0));
    // Once drained, the sidecar no longer accepts.
    assert!(TcpStream::connect(m.api_http_inbound).await.is_err());
    let _ = (&m.web, m.backend, m.tcp_backend, m.api_tcp_inbound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_outage_changes_nothing_and_reconnect_brings_new_policy() {
    let mut m = default_mesh().await;
    let client = http_client();
    let url = format!("http://{}/api/x", m.http);
    m.control.kill();
    for _ in 0..20 {
        assert_eq!(get(&client, &url, "GET", &[]).await.0, 200, "traffic flows with the control plane gone");
    }
    let mut fresh = TcpStream::connect(m.tcp).await.unwrap();
    assert_eq!(echo_once(&mut fresh, b"still here").await.unwrap(), b"still here");
    m.control.restart();
    // A new policy after the restart reaches the proxies, which reconnected on their own.
    let deny_all_get = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: freeze}}\nspec:\n  selector: {API}\n  action: DENY\n  rules:\n    - to:\n        - methods: [GET]\n"
    );
    let v = m.control.apply(&deny_all_get).await;
    m.api.wait_version(v, Duration::from_secs(20));
    let (status, headers, _) = get(&client, &url, "GET", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(headers["x-trellis-denied"], "policy=freeze; rule=0");
    assert_eq!(m.api.config()["control_plane"]["status"]["connected"], true);
    // The warnings of the outage are followed by a line saying it is over.
    let logs = m.api.proc.logs();
    assert!(logs.contains("lost the control plane") && logs.contains("reconnected to the control plane"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_rotation_under_load_fails_no_request() {
    let tcp = backends::tcp_echo().await;
    let m = mesh(&["--svid-ttl", "30s"], &[], tcp).await;
    let first = m.api.config()["svid_expires_at"].as_u64().unwrap();
    let client = http_client();
    let url = format!("http://{}/api/load", m.http);
    let mut rotations = 0;
    let mut last = first;
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(75);
    // Keep-alive requests and fresh connections, continuously, across >= 3 rotations of
    // both sidecars' SVIDs.
    while rotations < 3 {
        assert!(Instant::now() < deadline, "only {rotations} rotations in 75s");
        let (status, _, body) = get(&client, &url, "GET", &[]).await;
        assert_eq!(status, 200, "request {sent} failed during rotation: {body}");
        let (status, _, _) = get(&http_client(), &url, "GET", &[("connection", "close")]).await;
        assert_eq!(status, 200, "fresh-connection request {sent} failed during rotation");
        sent += 2;
        let now = m.api.config()["svid_expires_at"].as_u64().unwrap();
        if now != last {
            rotations += 1;
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sent > 100, "{sent}");
    assert!(m.web.config()["svid_expires_at"].as_u64().unwrap() > first, "web rotated too");
}

/// A certificate and key on disk for curl/openssl, from `ca` (or a foreign CA).
fn client_cert(ca: &trellis_identity::CertificateAuthority, id: &str, dir: &std::path::Path) -> (String, String) {
    let who = trellis_identity::SpiffeId::parse(id).unwrap();
    let key = trellis_identity::WorkloadKey::generate().unwrap();
    let issued = ca.sign_csr(&key.csr(&who).unwrap(), &who, Duration::from_secs(600)).unwrap();
    let svid = key.into_svid(issued.chain).unwrap();
    let (cert, keyf) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, svid.chain_pem()).unwrap();
    std::fs::write(&keyf, svid.key_pem()).unwrap();
    (cert.display().to_string(), keyf.display().to_string())
}

fn curl(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new("curl").args(["-sk", "--max-time", "5", "-i"]).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_clients_to_the_inbound_port_are_refused() {
    let m = default_mesh().await;
    let url = format!("https://{}/api/x", m.api_http_inbound);
    let dir = tempfile::tempdir().unwrap();
    // No client certificate: the TLS handshake fails (curl exits with an SSL/receive error).
    let (code, out) = curl(&[&url]);
    assert_ne!(code, 0, "no-cert client got through: {out}");
    assert!(!out.contains("HTTP/"), "{out}");
    // Plaintext HTTP to the mTLS port: refused, and counted as what it is.
    let (code, out) = curl(&[&format!("http://{}/api/x", m.api_http_inbound)]);
    assert_ne!(code, 0, "plaintext got through: {out}");
    let metrics = m.api.metrics();
    assert!(metrics.contains("trellis_handshake_failures_total{reason=\"plaintext\"} 1"), "{metrics}");
    // A certificate from a foreign CA: refused at the handshake.
    let foreign = trellis_identity::CertificateAuthority::create_root(
        &trellis_identity::TrustDomain::parse("cluster.local").unwrap(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let (cert, key) = client_cert(&foreign, WEB, dir.path());
    let (code, out) = curl(&["--cert", &cert, "--key", &key, &url]);
    assert_ne!(code, 0, "foreign-CA client got through: {out}");
    assert!(!out.contains("HTTP/"), "{out}");
    // A valid SVID whose identity no policy allows: HTTP gets 403 with the reason...
    let ca = trellis_identity::CertificateAuthority::load(
        &trellis_identity::TrustDomain::parse("cluster.local").unwrap(),
        &m.control.data().join("ca.pem"),
        &m.control.data().join("ca-key.pem"),
    )
    .unwrap();
    let (cert, key) = client_cert(&ca, "spiffe://cluster.local/ns/evil/sa/intruder", dir.path());
    let (code, out) = curl(&["--cert", &cert, "--key", &key, &url]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("HTTP/2 403") || out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("x-trellis-denied: default-deny"), "{out}");
    // ...and the allowed identity over the same path gets through (curl speaks h2 here).
    let (cert, key) = client_cert(&ca, WEB, dir.path());
    let (_, out) = curl(&["--cert", &cert, "--key", &key, &url]);
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains(WEB), "backend saw the verified peer: {out}");
    // The TCP port closes the connection for the intruder right after the handshake.
    let (cert, key) = client_cert(&ca, "spiffe://cluster.local/ns/evil/sa/intruder", dir.path());
    let mut s_client = std::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &m.api_tcp_inbound.to_string(), "-cert", &cert, "-key", &key])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = s_client.stdin.take().unwrap();
        let _ = stdin.write_all(b"hello\n");
        // Keep stdin open: the proxy, not EOF from us, must end the session.
        std::thread::sleep(Duration::from_millis(1500));
        drop(stdin);
    }
    let out = s_client.wait_with_output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hello"), "the intruder's bytes were echoed");
}

/// Header blocks beyond HTTP/2's customary 16 KiB (big cookies, JWTs) cross the sidecars'
/// HTTP/2 hop both ways, for HTTP/1.1 and HTTP/2 clients alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_request_and_response_headers_cross_the_mesh() {
    let m = default_mesh().await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .http2_max_header_list_size(256 * 1024)
        .build::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::client::legacy::connect::HttpConnector::new());
    let big = "c".repeat(40_000);
    for (client, version) in [(http_client(), "HTTP/1.1"), (h2, "HTTP/2.0")] {
        let headers = [("x-big-cookie", big.as_str()), ("x-echo-filler", "40000")];
        let (status, resp_headers, body) = get(&client, &format!("http://{}/api/big", m.http), "GET", &headers).await;
        assert_eq!(status, 200, "{version}: {body} {resp_headers:?}");
        let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["version"], version);
        assert_eq!(seen["headers"]["x-big-cookie"].as_str().map(str::len), Some(40_000), "{version}");
        assert_eq!(resp_headers.get("x-filler").map(|v| v.len()), Some(40_000), "{version}");
    }
    // Past the 64 KiB limit: the request is refused with 431, the response replaced by a 502.
    let huge = "c".repeat(70_000);
    let url = format!("http://{}/api/big", m.http);
    let (status, _, _) = get(&http_client(), &url, "GET", &[("x-big-cookie", huge.as_str())]).await;
    assert_eq!(status, 431);
    let (status, _, body) = get(&http_client(), &url, "GET", &[("x-echo-filler", "70000")]).await;
    assert_eq!(status, 502, "{body}");
    // The same limit on an HTTP/1.1 hop straight to the inbound (a mesh client of its own).
    let ca = trellis_identity::CertificateAuthority::load(
        &trellis_identity::TrustDomain::parse("cluster.local").unwrap(),
        &m.control.data().join("ca.pem"),
        &m.control.data().join("ca-key.pem"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = client_cert(&ca, WEB, dir.path());
    let direct = format!("https://{}/api/big", m.api_http_inbound);
    let header = |name: &str, value: &str| format!("{name}: {value}");
    let (_, out) = curl(&["--http1.1", "--cert", &cert, "--key", &key, "-H", &header("x-big-cookie", &big), &direct]);
    assert!(out.starts_with("HTTP/1.1 200"), "{out:.200}");
    let (_, out) = curl(&["--http1.1", "--cert", &cert, "--key", &key, "-H", &header("x-big-cookie", &huge), &direct]);
    assert!(out.starts_with("HTTP/1.1 431"), "{out:.200}");
    let (_, out) = curl(&["--http1.1", "--cert", &cert, "--key", &key, "-H", "x-echo-filler: 70000", &direct]);
    assert!(out.starts_with("HTTP/1.1 502") && out.contains("app_failed"), "{out:.300}");
}

/// A request header block over the 64 KiB limit gets the sidecar's own 431 whichever way it
/// comes — HTTP/1.1 or HTTP/2 to the outbound, HTTP/1.1 straight to the inbound — with
/// `x-trellis-error: header_too_large`, a request span saying so, and on HTTP/1.1 the
/// connection closed. Far over (beyond what h2 reads, 128 KiB) h2 answers 431 itself and
/// ends the request it was still sending with NO_ERROR, not an error that blames the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_header_gets_the_sidecars_431_on_every_hop() {
    let dir = tempfile::tempdir().unwrap();
    let (api_spans, web_spans) = (dir.path().join("api.jsonl"), dir.path().join("web.jsonl"));
    let spans = |name: &str| {
        let file = if name == "api" { &api_spans } else { &web_spans };
        vec!["--trace-file".to_string(), file.display().to_string()]
    };
    let policy = |backend: SocketAddr, _| allow("api-from-web", API, WEB, &http_rule(backend));
    let tcp_backend = backends::tcp_echo().await;
    let m = start_mesh(MeshOptions { control_args: &[], policy: &policy, tcp_backend, extra: &spans }).await;
    let huge = "c".repeat(70_000);

    // HTTP/1.1 to the outbound, on a connection the client would keep: the sidecar answers the
    // 431 with `x-trellis-error` and closes it.
    let refused = |head: String| async move {
        let mut tcp = TcpStream::connect(m.http).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(read.is_ok(), "the connection stayed open after the 431: {answer}");
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        assert!(answer.contains("\r\nx-trellis-error: header_too_large\r\n"), "{answer}");
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    };
    refused(format!("GET /api/h1 HTTP/1.1\r\nHost: api\r\nx-big-cookie: {huge}\r\n\r\n")).await;
    // A WebSocket upgrade is held to the same limit by the outbound, before it is carried.
    refused(format!(
        "GET /api/ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nx-big-cookie: {huge}\r\n\r\n"
    ))
    .await;

    // HTTP/2 to the outbound.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::client::legacy::connect::HttpConnector::new());
    let url = format!("http://{}/api/h2", m.http);
    let (status, headers, body) = get(&h2, &url, "GET", &[("x-big-cookie", huge.as_str())]).await;
    assert_eq!(status, 431, "{body}");
    assert_eq!(headers.get("x-trellis-error").map(|v| v.as_bytes()), Some(&b"header_too_large"[..]), "{headers:?}");

    // HTTP/1.1 straight to the inbound (a mesh client of its own).
    let ca = trellis_identity::CertificateAuthority::load(
        &trellis_identity::TrustDomain::parse("cluster.local").unwrap(),
        &m.control.data().join("ca.pem"),
        &m.control.data().join("ca-key.pem"),
    )
    .unwrap();
    let (cert, key) = client_cert(&ca, WEB, dir.path());
    let direct = format!("https://{}/api/direct", m.api_http_inbound);
    let cookie = format!("x-big-cookie: {huge}");
    let (_, out) = curl(&["--http1.1", "--cert", &cert, "--key", &key, "-H", &cookie, &direct]);
    assert!(out.starts_with("HTTP/1.1 431"), "{out:.300}");
    assert!(out.contains("x-trellis-error: header_too_large") && out.contains("connection: close"), "{out:.300}");

    // Each refusal is a request span with its reason, on the sidecar that refused it.
    for (file, direction, path) in [
        (&web_spans, "outbound", "/api/h1"),
        (&web_spans, "outbound", "/api/h2"),
        (&api_spans, "inbound", "/api/direct"),
    ] {
        let span = wait_for_span(file, direction, |s| is_request_span(s, direction, path)).await;
        let attrs = &span["attributes"];
        assert_eq!(span["status"]["code"], "error", "{span}");
        assert_eq!(
            (attrs["http.response.status_code"].as_u64(), attrs["error.type"].as_str()),
            (Some(431), Some("header_too_large")),
            "{span}"
        );
    }

    // Far over the limit, with a body still to come: h2's own 431, then RST_STREAM(NO_ERROR).
    let tcp = TcpStream::connect(m.http).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}/api/far", m.http))
        .header("x-big-cookie", "c".repeat(200_000))
        .body(())
        .unwrap();
    let (resp, mut upload) = send.ready().await.unwrap().send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp).await.expect("answered").unwrap();
    assert_eq!(resp.status(), 431);
    let reset = tokio::time::timeout(Duration::from_secs(5), std::future::poll_fn(|cx| upload.poll_reset(cx))).await;
    assert_eq!(reset.expect("the upload is ended").unwrap(), h2::Reason::NO_ERROR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_clients_are_carried_end_to_end() {
    let m = default_mesh().await;
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::client::legacy::connect::HttpConnector::new());
    for path in ["/api/h2", "/api/h2/again"] {
        let (status, _, body) = get(&client, &format!("http://{}{path}", m.http), "GET", &[]).await;
        assert_eq!(status, 200, "{body}");
        let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["version"], "HTTP/2.0", "an HTTP/2 client's backend hears HTTP/2");
        assert_eq!(seen["path"], path);
        assert_eq!(seen["headers"]["x-trellis-peer-id"], WEB);
        // The authority the client used reaches the app as :authority, with no Host to
        // contradict it (an HTTP/2 server may refuse that).
        assert_eq!(seen["authority"], m.http.to_string());
        assert!(seen["headers"].get("host").is_none(), "{seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_app_refusing_a_stream_gets_bodiless_requests_again() {
    let pair = AppPair::start(backends::h2_refusing_first_try().await).await;
    let route = pair.route;
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::client::legacy::connect::HttpConnector::new());

    // A GET the app refused is sent once more, and the client never sees the refusal.
    let (status, _, body) = get(&client, &format!("http://{route}/items"), "GET", &[]).await;
    assert_eq!((status, body.as_str()), (200, "attempt 2"));

    // A refused stream was not processed (RFC 9113 §8.7), so a POST without a body goes again too.
    let (status, _, body) = get(&client, &format!("http://{route}/orders"), "POST", &[]).await;
    assert_eq!((status, body.as_str()), (200, "attempt 2"));

    // A POST whose body was streamed to the app cannot be sent again: the refusal reaches the
    // client as the sidecar's 502...
    let post = |path: &str| {
        let req = http::Request::post(format!("http://{route}{path}"));
        client.request(req.body(http_body_util::Full::new(bytes::Bytes::from_static(b"order"))).unwrap())
    };
    let resp = post("/payments").await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers().get("x-trellis-error").unwrap(), "app_failed");
    // ...and the app did take the next one, so the 502 was the sidecar declining to retry.
    let resp = post("/payments").await.unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    assert_eq!(&body[..], b"attempt 2");
}

/// An app whose chunked response is malformed before any of its body: the caller gets a 502
/// from its sidecar, not an empty reply. Malformed after the first chunk: the 200 already
/// left, so the caller sees the body end early, an error, never a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_response_is_a_502_or_a_cut_body() {
    use http_body_util::BodyExt;
    let pair = AppPair::start(backends::broken_chunks().await).await;
    let client = http_client();
    let (status, headers, body) = get(&client, &format!("http://{}/bad-chunk", pair.route), "GET", &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(headers.get("x-trellis-error").map(|v| v.as_bytes()), Some(&b"peer_http"[..]), "{body}");
    let req = http::Request::get(format!("http://{}/cut", pair.route)).body(Default::default()).unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await;
    assert!(got.is_err(), "a cut body ended cleanly: {:?}", got.map(|b| b.to_bytes()));
}

/// An app that sends a head and part of its body and closes at once: its HTTP/1.1 client gets
/// the head and what came of the body, then the connection ends short of Content-Length —
/// never an empty reply (hyper dropped what it had buffered when the body failed before its
/// next flush: 1 run in 5 under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_short_reaches_the_client_as_far_as_it_came() {
    let pair = AppPair::start(backends::cut_short().await).await;
    for attempt in 0..20 {
        let mut s = TcpStream::connect(pair.route).await.unwrap();
        s.write_all(b"GET /cut HTTP/1.1\r\nhost: api\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await.expect("ended");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "attempt {attempt}: {:?}", &text[..text.len().min(80)]);
        assert!(got.len() < 100_000, "attempt {attempt}: a cut body arrived whole");
    }
}

/// A `--ca-bundle` that does not vouch for the control plane will never get better by
/// retrying: the proxy says so and exits instead of retrying forever behind a 503 `/ready`.
#[test]
fn a_trust_bundle_that_does_not_vouch_for_the_control_plane_is_fatal() {
    let control = Control::start(&[]);
    let other = Control::start(&[]);
    let mut proxy = Sidecar::spawn_with_bundle(&control, API, &other.bundle_path(), &[]);
    let code = proxy.proc.wait_exit(Duration::from_secs(10));
    let logs = proxy.proc.logs();
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}:\n{logs}");
    assert!(
        logs.contains("is --ca-bundle the control plane's bundle.pem") && logs.contains("unknown issuer"),
        "{logs}"
    );
}

/// A state dir where the SVID cannot be kept is refused before the single-use join token is
/// spent (the next start would need a new one); the token still works afterwards.
#[test]
fn an_unusable_state_dir_is_fatal_before_the_token_is_spent() {
    let control = Control::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), b"").unwrap();
    let bad = dir.path().join("file/state").display().to_string();
    let inbound = format!("{}=127.0.0.1:9", addr(free_port()));
    let mut proxy = Sidecar::spawn(&control, API, &["--state-dir".into(), bad, "--inbound".into(), inbound]);
    let code = proxy.proc.wait_exit(Duration::from_secs(10));
    let logs = proxy.proc.logs();
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}:\n{logs}");
    assert!(logs.contains("is not usable") && logs.contains("nothing was asked of the control plane"), "{logs}");
    assert!(!control.proc.logs().contains("SVID bootstrapped"), "{}", control.proc.logs());
}

/// An SVID kept from a control plane whose data was rebuilt (another CA) is not used: the
/// proxy bootstraps with its token instead of failing every renewal, never ready.
#[test]
fn a_kept_svid_from_another_ca_gives_way_to_the_token() {
    let state = tempfile::tempdir().unwrap();
    let inbound = format!("{}=127.0.0.1:9", addr(free_port()));
    let state_arg = ["--state-dir".to_string(), state.path().display().to_string(), "--inbound".into(), inbound];
    let old = Control::start(&[]);
    let first = Sidecar::start(&old, API, &state_arg);
    assert!(state.path().join("svid.pem").exists());
    drop(first);
    let rebuilt = Control::start(&[]);
    let proxy = Sidecar::start(&rebuilt, API, &state_arg);
    let logs = proxy.proc.logs();
    assert!(logs.contains("not using the SVID kept in the state dir"), "{logs}");
    assert!(logs.contains("SVID issued"), "{logs}");
}

/// A proxy restarted from its state dir renews (and so registers its addresses) at once: an
/// address changed since the last run is known to the mesh right away, not at half-life.
#[test]
fn a_restart_from_the_state_dir_registers_its_addresses_at_once() {
    let control = Control::start(&[]);
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = |ip: &str| {
        vec![
            "--state-dir".to_string(),
            state.path().display().to_string(),
            "--inbound".into(),
            // On every address: registered at the advertised one.
            format!("0.0.0.0:{port}=127.0.0.1:9"),
            "--advertise-ip".into(),
            ip.to_string(),
        ]
    };
    drop(Sidecar::start(&control, API, &args("127.0.0.2")));
    let restarted = Sidecar::start(&control, API, &args("127.0.0.3"));
    // /config shows the effective settings, these included.
    let config = restarted.config();
    assert_eq!(config["advertise_ip"], "127.0.0.3", "{config}");
    assert_eq!(config["state_dir"], state.path().display().to_string(), "{config}");
    assert_eq!(
        (config["header_timeout_ms"].as_u64(), config["attestation"].as_str()),
        (Some(10_000), Some("join_token"))
    );
    let check = |ip: &str| {
        let to = format!("{ip}:{port}");
        control.cli(&["policy", "check", "--from", WEB, "--to-address", &to]).2
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check("127.0.0.3").contains(API) {
        assert!(Instant::now() < deadline, "the new address was not registered: {}", check("127.0.0.3"));
        std::thread::sleep(Duration::from_millis(50));
    }

    // The listener hands its connections to the app's port (9), where the sidecar judges them:
    // a live check of the listener's address is judged there too, not at the listener's port.
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        policy.path(),
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: app-port}}\n\
             spec:\n  selector: {API}\n  rules:\n  - from: [{{identity: {WEB}}}]\n    to: [{{ports: [9]}}]\n"
        ),
    )
    .unwrap();
    let (code, _, err) = control.cli(&["policy", "apply", "-f", policy.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let to = format!("127.0.0.3:{port}");
    let (code, out, err) = control.cli(&["policy", "check", "--from", WEB, "--to-address", &to]);
    assert_eq!((code, out.starts_with("allow")), (0, true), "{out}{err}");
    assert!(err.contains("at its app's port 9"), "{err}");
    // An address nobody registered is egress, and the check says so.
    let (code, _, err) = control.cli(&["policy", "check", "--from", WEB, "--to-address", "192.0.2.1:9"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("judged as egress"), "{err}");
}

/// The app's kubelet probes, pointed at the admin port by `trellis inject`, are run by the
/// proxy against the app: HTTP probes answer with the app's status, TCP probes with whether
/// the port accepts, a slow app is a 503 within the probe's timeout, and nothing but the
/// configured probes reaches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_probes_run_on_the_admin_port() {
    let control = Control::start(&[]);
    let app = backends::http_echo().await;
    let grpc = backends::grpc_health().await.port();
    let closed = free_port();
    let port = app.port();
    let probes = serde_json::json!({
        "web/readyz": { "port": port, "httpGet": { "path": "/status/204/readiness", "port": "http",
                        "httpHeaders": [{ "name": "X-Probe", "value": "readiness" }] } },
        "web/livez": { "port": port, "httpGet": { "path": "/status/503" } },
        "web/startupz": { "port": port, "tcpSocket": { "port": port } },
        "db/livez": { "port": closed, "tcpSocket": { "port": closed } },
        "slow/readyz": { "port": port, "timeoutSeconds": 1, "httpGet": { "path": "/slow/5000" } },
        "api/readyz": { "port": grpc, "grpc": { "port": grpc, "service": "shop.Catalog" } },
        "api/livez": { "port": grpc, "grpc": { "port": grpc, "service": "shop.Sick" } },
    });
    let listen = addr(free_port());
    let inbound = format!("{listen}={app}");
    let s = Sidecar::start(&control, API, &["--inbound".into(), inbound, "--app-probes".into(), probes.to_string()]);
    let probe = |key: &str| http_get(s.admin, &format!("/app-health/{key}")).expect("the admin port answers");
    assert_eq!(probe("web/readyz").0, 204, "the app's own status, for a request with the probe's header");
    assert_eq!(probe("web/livez").0, 503);
    assert_eq!(probe("web/startupz").0, 200);
    let (status, why) = probe("db/livez");
    assert_eq!(status, 503);
    assert!(why.contains("connect to 127.0.0.1"), "{why}");
    let started = Instant::now();
    let (status, why) = probe("slow/readyz");
    assert_eq!(status, 503);
    assert!(why.contains("timed out after 1s") && started.elapsed() < Duration::from_secs(4), "{why}");
    assert_eq!(probe("api/readyz"), (200, "SERVING\n".to_string()), "gRPC health checking");
    assert_eq!(probe("api/livez"), (503, "NOT_SERVING\n".to_string()));
    assert_eq!(probe("web/other").0, 404, "only configured probes reach the app");
    assert_eq!(s.config()["app_probes"].as_array().map(Vec::len), Some(7));

    // The kubelet's probe as written, in plaintext to the app's (captured) port: answered for
    // a configured HTTP probe's path, with the probe's headers; anything else meets the TLS
    // handshake, which refuses it.
    assert_eq!(http_get(listen, "/status/204/readiness").map(|r| r.0), Some(204));
    assert_eq!(http_get(listen, "/status/503").map(|r| r.0), Some(503), "web/livez, as the app answers");
    assert_eq!(http_get(listen, "/status/200"), None, "not a probe: no plaintext way in");
    assert!(s.metrics().contains(r#"reason="plaintext""#), "the refusal is counted: {}", s.metrics());
    // A request head that arrives in pieces is read whole.
    let mut tcp = TcpStream::connect(listen).await.unwrap();
    tcp.write_all(b"GET /status/204/rea").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tcp.write_all(b"diness HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");

    // A probe the proxy could not run is refused at start, naming the flag.
    let bad = std::process::Command::new(bin())
        .args(["proxy", "run", "--control", &control.url, "--token", "t"])
        .args(["--ca-bundle", &control.bundle_path().display().to_string()])
        .args(["--app-probes", r#"{"web/readyz":{"port":8080}}"#])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("--app-probes") && err.contains("exactly one of httpGet, tcpSocket and grpc"), "{err}");
}

/// Under a ports-only ALLOW, a request whose line is longer than the sniff buffer (a long
/// query string) is still HTTP: it crosses as a request the proxies parsed, so the app sees
/// the verified peer ID, never one the client wrote. (It used to cross as opaque bytes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_request_line_is_http_and_cannot_forge_the_peer_id() {
    let tcp = backends::tcp_echo().await;
    let policy = |backend: SocketAddr, _tcp: SocketAddr| {
        allow("api-port-from-web", API, WEB, &format!("      to:\n        - ports: [{}]\n", backend.port()))
    };
    let m =
        start_mesh(MeshOptions { control_args: &[], policy: &policy, tcp_backend: tcp, extra: &|_| Vec::new() }).await;
    // curl, as a user would: it sends the request line in pieces the sniffer sees apart.
    for len in [100, 9_000, 30_000] {
        let url = format!("http://{}/admin/x?q={}", m.http, "a".repeat(len));
        let out = std::process::Command::new("curl")
            .args(["-s", "--max-time", "5", "-H", "x-trellis-peer-id: spiffe://cluster.local/ns/kube-system/sa/admin"])
            .arg(&url)
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        let seen: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("query of {len}: {e}: {body:.300}"));
        assert_eq!(seen["headers"]["x-trellis-peer-id"], WEB, "query of {len}");
        assert_eq!(seen["query"].as_str().map(str::len), Some(len + 2), "query of {len}");
    }
}

/// A policy change that revokes one request ends that request alone: the sidecars carry
/// every app connection's requests over one pooled HTTP/2 connection, and closing it (as a
/// revoked connection) cut the downloads the new policy still allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_one_request_leaves_the_others_on_the_connection() {
    use http_body_util::BodyExt;
    let pair = AppPair::start(backends::drip().await).await;
    let download = |path: &'static str| {
        let url: http::Uri = format!("http://{}{path}", pair.route).parse().unwrap();
        tokio::spawn(async move {
            let resp = http_client().get(url).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|e| format!("{status}, then {e}"))?;
            Ok::<_, String>((status, body.to_bytes().len()))
        })
    };
    let kept = download("/kept/30");
    let revoked = download("/revoked/30");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deny = "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-revoked\nspec:\n  selector: spiffe://cluster.local/ns/shop/sa/api\n  action: DENY\n  rules:\n    - to:\n        - paths: [\"/revoked/*\"]\n";
    let v = pair.control.apply(deny).await;
    pair.api.wait_version(v, Duration::from_secs(5));
    let revoked = tokio::time::timeout(Duration::from_secs(2), revoked).await.expect("revoked within 2 s").unwrap();
    assert!(revoked.is_err(), "the revoked download was cut: {revoked:?}");
    let kept = tokio::time::timeout(Duration::from_secs(10), kept).await.unwrap().unwrap();
    assert_eq!(kept, Ok((http::StatusCode::OK, 30 * 1024)), "the allowed download went on");
    assert!(pair.api.metrics().contains("trellis_connections_revoked_total 1"), "{}", pair.api.metrics());
    // New requests are judged by the new policy, on the same pooled connection.
    let (status, _, _) = get(&http_client(), &format!("http://{}/revoked/1", pair.route), "GET", &[]).await;
    assert_eq!(status, 403);
    let (status, _, _) = get(&http_client(), &format!("http://{}/kept/1", pair.route), "GET", &[]).await;
    assert_eq!(status, 200);
}

/// The inbound's 502s say which failure it was: nothing listening at the app's address
/// (`app_unreachable`), or an app that took the request and broke the exchange — here an
/// HTTP/1.1-only app sent HTTP/2, the caller's protocol (`app_failed`, saying so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_failures_are_told_apart() {
    let pair = AppPair::start(backends::drip().await).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::client::legacy::connect::HttpConnector::new());
    let (status, headers, body) = get(&h2, &format!("http://{}/x/1", pair.route), "GET", &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(headers.get("x-trellis-error").unwrap(), "app_failed");
    assert!(body.contains("sent as HTTP/2, the caller's protocol"), "{body}");
    // The same app over HTTP/1.1 answers.
    let (status, _, _) = get(&http_client(), &format!("http://{}/x/1", pair.route), "GET", &[]).await;
    assert_eq!(status, 200);

    let nothing = addr(free_port());
    let gone = AppPair::start(nothing).await;
    let (status, headers, body) = get(&http_client(), &format!("http://{}/x", gone.route), "GET", &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(headers.get("x-trellis-error").unwrap(), "app_unreachable");
    assert!(body.contains("is unreachable"), "{body}");
}

/// A request body the app's own client broke (an invalid chunk, fewer bytes than its
/// Content-Length) is the app's fault: its sidecar answers 400, not a 502 blaming the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_request_body_is_the_callers_400_not_the_peers_502() {
    let pair = AppPair::start(backends::drip().await).await;
    for (what, request, half_close) in [
        (
            "an invalid chunk",
            "POST /x/1 HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
            false,
        ),
        ("a short body", "POST /x/1 HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\nabc", true),
    ] {
        let mut s = TcpStream::connect(pair.route).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        if half_close {
            s.shutdown().await.unwrap();
        }
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        assert!(answer.contains("x-trellis-error: bad_request_body"), "{what}: {answer}");
    }
}

/// A client silent past the detect timeout gets an opaque stream; if what it then sends is an
/// HTTP request, the inbound closes the stream rather than hand the app a request it never
/// parsed (with an `x-trellis-peer-id` the client wrote). Other late bytes go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sent_after_the_detect_timeout_is_refused_not_forwarded_raw() {
    let tcp = backends::tcp_echo().await;
    let policy = |backend: SocketAddr, _tcp: SocketAddr| {
        allow("api-port-from-web", API, WEB, &format!("      to:\n        - ports: [{}]\n", backend.port()))
    };
    let extra = |_: &str| vec!["--detect-timeout".to_string(), "100ms".to_string()];
    let m = start_mesh(MeshOptions { control_args: &[], policy: &policy, tcp_backend: tcp, extra: &extra }).await;
    let late = |bytes: &'static [u8]| async move {
        let mut s = TcpStream::connect(m.http).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(bytes).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    };
    let forged = late(b"GET /x HTTP/1.1\r\nhost: a\r\nx-trellis-peer-id: spiffe://cluster.local/ns/shop/sa/admin\r\nconnection: close\r\n\r\n").await;
    assert_eq!(forged, "", "the late request reached the app");
    // Logged as the inbound closes, which may be just after the client saw the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !m.api.proc.logs().contains("after the protocol detection timeout") {
        assert!(Instant::now() < deadline, "{}", m.api.proc.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not HTTP: carried as before (the HTTP app answers the garbage with its own 400).
    let other = late(b"hello there\r\n\r\n").await;
    assert!(other.starts_with("HTTP/1.1 400"), "{other}");
    // An empty line first (which servers skip, RFC 9112 §2.2) does not make it something else.
    let forged = late(b"\r\nGET /x HTTP/1.1\r\nhost: a\r\nx-trellis-peer-id: spiffe://cluster.local/ns/shop/sa/admin\r\nconnection: close\r\n\r\n").await;
    assert_eq!(forged, "", "the late request after an empty line reached the app");

    // Sent at once, the same request is parsed as HTTP: the app gets the verified peer ID.
    let mut s = TcpStream::connect(m.http).await.unwrap();
    s.write_all(b"\r\nGET /x HTTP/1.1\r\nhost: a\r\nx-trellis-peer-id: spiffe://cluster.local/ns/shop/sa/admin\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(WEB) && !answer.contains("sa/admin"), "the app saw a forged peer ID: {answer}");
}

/// Downloads whose clients stopped reading do not stall other callers' requests to the same
/// peer: all of them share the sidecars' pooled HTTP/2 connection and its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_do_not_stall_the_pooled_connection() {
    // The app serving the ten downloads runs in this test's runtime: on a loaded machine it
    // can delay the last client's first bytes past the default 1 s detect timeout, and a
    // client silent that long is opaque TCP by design. This test is about the pooled
    // connection's flow control, so detection gets room.
    let web = ["--detect-timeout".to_string(), "10s".to_string()];
    let pair = AppPair::start_with(backends::body_echo().await, &[], &web).await;
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(pair.route).await.unwrap();
        s.write_all(b"GET /bytes/16000000 HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
        stalled.push(s); // never read
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let url = format!("http://{}/bytes/1000", pair.route);
    // A stall would be for good (a window never given back): a generous bound still shows it.
    let answered = tokio::time::timeout(Duration::from_secs(15), get(&http_client(), &url, "GET", &[])).await;
    let (status, headers, _) = answered.expect("a request behind ten stalled downloads did not complete");
    assert_eq!((status, headers.get("content-length").and_then(|v| v.to_str().ok())), (200, Some("1000")));
    drop(stalled);
}

/// `CONNECT host:port` has no path: it is judged as written (an invalid path, denied, as
/// `policy check` says), not as `/` — a rule allowing `/` let it reach the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_judged_as_written_not_as_the_root_path() {
    let tcp = backends::tcp_echo().await;
    let policy = |backend: SocketAddr, _tcp: SocketAddr| {
        allow(
            "root-only",
            API,
            WEB,
            &format!("      to:\n        - ports: [{}]\n          paths: [\"/\"]\n", backend.port()),
        )
    };
    let m =
        start_mesh(MeshOptions { control_args: &[], policy: &policy, tcp_backend: tcp, extra: &|_| Vec::new() }).await;
    let mut s = TcpStream::connect(m.http).await.unwrap();
    s.write_all(b"CONNECT 10.1.2.3:22 HTTP/1.1\r\nhost: 10.1.2.3:22\r\n\r\n").await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("x-trellis-denied: invalid-path"), "{answer}");
    // The root path itself is still allowed.
    let (status, _, _) = get(&http_client(), &format!("http://{}/", m.http), "GET", &[]).await;
    assert_eq!(status, 200);
}

/// A restarted sidecar (its SVID kept) takes no connection before its first policy: callers
/// wait in the listen backlog and are served once the policy arrives, not denied for having
/// come a few milliseconds early. With no policy by `--first-policy-timeout` it accepts and
/// denies everything, with its own reason (fail closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_before_the_first_policy_wait_for_it_then_fail_closed() {
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().display().to_string();
    let tcp = backends::tcp_echo().await;
    let mut m = mesh(&[], &["--state-dir", &state_dir], tcp).await;
    let token = m.control.token(API);
    m.api.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(m.api.proc.wait_exit(Duration::from_secs(10)), Some(0));
    m.control.kill();
    let restart_api = |first_policy_timeout: &str| {
        let args: Vec<String> = [
            "proxy",
            "run",
            "--control",
            &m.control.url,
            "--ca-bundle",
            &m.control.bundle_path().display().to_string(),
            "--token",
            &token,
            "--state-dir",
            &state_dir,
            "--inbound",
            &format!("{}={}", m.api_http_inbound, m.backend),
            "--first-policy-timeout",
            first_policy_timeout,
        ]
        .map(String::from)
        .to_vec();
        Proc::spawn(&format!("proxy-api-{first_policy_timeout}"), &args, state.path())
    };
    let wait_log = |p: &Proc, line: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !p.logs().contains(line) {
            assert!(Instant::now() < deadline, "no {line:?} in:\n{}", p.logs());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let client = http_client();
    let url = format!("http://{}/api/x", m.http);

    // No control plane: denied once the (short) wait is over.
    let api = restart_api("1s");
    wait_log(&api, "lost the control plane before any policy arrived");
    let (status, headers, _) = get(&client, &url, "GET", &[]).await;
    assert_eq!((status, headers["x-trellis-denied"].to_str().unwrap()), (403, "no-policy-yet"));
    assert!(api.logs().contains("no policy from the control plane yet; accepting connections"), "{}", api.logs());
    drop(api);

    // The control plane back while a request waits: the request is served.
    let api = restart_api("30s");
    wait_log(&api, "lost the control plane before any policy arrived");
    let pending = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { get(&client, &url, "GET", &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "answered before any policy: {:?}", pending.await.unwrap());
    m.control.restart();
    let (status, _, body) = pending.await.unwrap();
    assert_eq!(status, 200, "{body}\n{}", api.logs());
    let _ = (&m.web, m.tcp_backend, m.api_tcp_inbound);
}

/// A connection authenticated with a certificate that has since expired takes no new request:
/// expiry is the mesh's only revocation of an identity, and an HTTP/2 connection kept open by
/// PINGs must not carry one past its SVID. (A sidecar retires its pooled connection by then and
/// opens another with its current SVID; this client does not, as a stale or hostile one would not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_gets_no_new_request_on_its_open_connection() {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use trellis_identity::{CertificateAuthority, CredentialStore, SpiffeId, TrustBundle, TrustDomain, WorkloadKey};

    let m = default_mesh().await;
    let td = TrustDomain::parse("cluster.local").unwrap();
    let data = m.control.data();
    let ca = CertificateAuthority::load(&td, &data.join("ca.pem"), &data.join("ca-key.pem")).unwrap();
    let web = SpiffeId::parse(WEB).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let issued = ca.sign_csr(&key.csr(&web).unwrap(), &web, Duration::from_secs(2)).unwrap();
    let creds = CredentialStore::with(key.into_svid(issued.chain).unwrap()).unwrap();
    let bundle = TrustBundle::load(&m.control.bundle_path()).unwrap();
    let mut cfg = trellis_identity::client_config(Some(creds), &bundle, SpiffeId::parse(API).unwrap()).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(m.api_http_inbound).await.unwrap();
    let name = trellis_identity::pki_types::ServerName::IpAddress(m.api_http_inbound.ip().into());
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let url = format!("http://{}/api/x", m.backend);
    let req = || http::Request::get(url.as_str()).body(Empty::<bytes::Bytes>::new()).unwrap();
    assert_eq!(send.send_request(req()).await.unwrap().status(), 200, "allowed while the certificate is valid");
    // Past the certificate's expiry, on the same connection (kept open as a sidecar's is).
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(2500)).await;
    let after = send.send_request(req()).await;
    assert!(after.is_err(), "a request on a connection whose client certificate expired got {after:?}");
    let logs = m.api.proc.logs();
    assert!(logs.contains("a certificate this connection was authenticated with expired"), "{logs}");
}

/// Framing a sidecar must not guess at (RFC 9112 §3.2, §6.1, §6.3): a request without Host or
/// with two is 400; a transfer coding besides chunked is 501 (it would be lost in the
/// re-framing), and 502 from an app; an app's stale Content-Length beside chunked is dropped,
/// so the body arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_transfer_codings_are_checked_and_a_stale_length_dropped() {
    let pair = AppPair::start(backends::odd_framing().await).await;
    let ask = |raw: &'static str| async move {
        let mut s = TcpStream::connect(pair.route).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        read_response(&mut s).await
    };
    for (raw, status) in [
        ("GET /x HTTP/1.1\r\n\r\n", "HTTP/1.1 400"),
        ("GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "HTTP/1.1 400"),
        (
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "HTTP/1.1 501",
        ),
        ("GET /gzip-chunked HTTP/1.1\r\nHost: a\r\n\r\n", "HTTP/1.1 502"),
    ] {
        let (head, body) = ask(raw).await;
        assert!(head.starts_with(status), "{raw:?}: {head}{body}");
    }
    let mut s = TcpStream::connect(pair.route).await.unwrap();
    s.write_all(b"GET /cl-and-chunked HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200") && !answer.contains("content-length: 50"), "{answer}");
    assert!(answer.contains("\r\n\r\n3\r\nabc\r\n0\r\n\r\n") || answer.ends_with("\r\n\r\nabc"), "{answer}");
}

/// A second signal during the drain ends the proxy at once (Ctrl-C twice), with 130.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_ends_the_drain_at_once() {
    let mut m = default_mesh().await;
    let client = http_client();
    let url = format!("http://{}/slow/8000", m.http);
    let _req = tokio::spawn(async move { get(&client, &url, "GET", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    m.api.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !m.api.proc.logs().contains("draining (a second signal exits at once)") {
        assert!(Instant::now() < deadline, "{}", m.api.proc.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = Instant::now();
    m.api.proc.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(m.api.proc.wait_exit(Duration::from_secs(5)), Some(130));
    assert!(signalled.elapsed() < Duration::from_secs(3), "took {:?}", signalled.elapsed());
}
