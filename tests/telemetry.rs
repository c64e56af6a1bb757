//! Telemetry end to end (issue #6): real `trellis` processes (control plane, web's and api's
//! sidecars) export spans to a real OTLP receiver running in the test (gRPC and
//! HTTP/protobuf, decoded with the `opentelemetry-proto` types), to a JSON-lines trace file,
//! and to a flow log; `/metrics` is parsed as Prometheus text.
//!
//! web's app → web's outbound route → mTLS → api's inbound → api's backend.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::mesh::{API, Mesh, MeshOptions, WEB, start_mesh};
use support::otlp::{Receiver, Span};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BILLING: &str = "spiffe://cluster.local/ns/shop/sa/billing";
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const ERROR: i32 = 2;
const WAIT: Duration = Duration::from_secs(10);

/// HTTP: web may GET /api/*; /api/secret* is denied by name; /api/legacy* is what an
/// audit-mode DENY would block. TCP: only billing may connect, so web is denied at L4.
fn policies(backend: SocketAddr, tcp_backend: SocketAddr) -> String {
    let http_rule = format!(
        "      to:\n        - ports: [{}]\n          methods: [GET, HEAD]\n          paths: [\"/api/*\"]\n",
        backend.port()
    );
    let tcp_rule = format!("      to:\n        - ports: [{}]\n", tcp_backend.port());
    let port = backend.port();
    let deny = |name: &str, mode: &str, path: &str| {
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}}}\nspec:\n  selector: {API}\n  action: DENY\n  mode: {mode}\n  rules:\n    - to:\n        - ports: [{port}]\n          paths: [\"{path}\"]\n---\n"
        )
    };
    allow("api-from-web", API, WEB, &http_rule)
        + &allow("api-tcp-from-billing", API, BILLING, &tcp_rule)
        + &deny("no-secrets", "enforce", "/api/secret*")
        + &deny("legacy-audit", "audit", "/api/legacy*")
}

/// Starts the mesh; `extra(name)` adds flags to the sidecar named `api` or `web`.
async fn mesh(extra: impl Fn(&str) -> Vec<String>) -> Mesh {
    let tcp_backend = backends::tcp_echo().await;
    let extra = |name: &str| {
        let mut args = extra(name);
        if name == "web" {
            args.extend(["--detect-timeout".to_string(), "200ms".to_string()]);
        }
        args
    };
    start_mesh(MeshOptions { control_args: &[], policy: &policies, tcp_backend, extra: &extra }).await
}

fn otlp_args(r: &Receiver, protocol: &str) -> impl Fn(&str) -> Vec<String> {
    let url = r.url();
    let protocol = protocol.to_string();
    move |_| vec!["--otlp-endpoint".into(), url.clone(), "--otlp-protocol".into(), protocol.clone()]
}

/// A TCP connection through web's opaque route; api's inbound closes it (web is not
/// allowed there), so the echo never comes back.
async fn denied_tcp(m: &Mesh) {
    let mut s = TcpStream::connect(m.tcp).await.unwrap();
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 5];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await;
    assert!(!matches!(r, Ok(Ok(_))), "a denied TCP connection echoed: {r:?}");
}

/// A TLS client without a certificate straight to api's inbound: refused in the handshake.
async fn no_cert_handshake(m: &Mesh) {
    let bundle = trellis_identity::TrustBundle::load(&m.control.bundle_path()).unwrap();
    let api = trellis_identity::SpiffeId::parse(API).unwrap();
    let cfg = trellis_identity::client_config(None, &bundle, api).unwrap();
    let tcp = TcpStream::connect(m.api_http_inbound).await.unwrap();
    let name = trellis_identity::pki_types::ServerName::IpAddress(m.api_http_inbound.ip().into());
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await {
        // TLS 1.3: the server checks the client's (missing) certificate after the client
        // thinks the handshake is done; the refusal arrives as an alert on first read.
        let _ = tls.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
        let mut buf = [0u8; 16];
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
    }
}

const TWO_REQUESTS: &str =
    "GET /api/conn HTTP/1.1\r\nHost: api\r\n\r\nGET /admin HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n";

/// Two requests on one HTTP/1.1 connection to web's route, the second denied and closing
/// it; returns the client's port.
async fn two_requests_one_connection(m: &Mesh) -> u16 {
    let mut s = TcpStream::connect(m.http).await.unwrap();
    let port = s.local_addr().unwrap().port();
    s.write_all(TWO_REQUESTS.as_bytes()).await.unwrap();
    let mut answers = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut answers)).await.expect("both answers, then a close").unwrap();
    assert!(answers.starts_with("HTTP/1.1 200") && answers.contains("HTTP/1.1 403"), "{answers}");
    port
}

fn is(s: &Span, name: &str, path: &str) -> bool {
    s.name == name && s.str("url.path") == path
}

fn assert_ids(s: &Span, source: &str, destination: &str) {
    assert_eq!(s.str("trellis.source.spiffe_id"), source, "{s:?}");
    assert_eq!(s.str("trellis.destination.spiffe_id"), destination, "{s:?}");
}

/// The outbound span is the inbound span's parent, in one trace.
fn assert_nested(outbound: &Span, inbound: &Span) {
    assert_eq!(outbound.trace_id, inbound.trace_id, "one trace:\n{outbound:?}\n{inbound:?}");
    assert_eq!(inbound.parent_span_id, outbound.span_id, "inbound is the outbound's child");
}

/// The `traceparent` the app received: (trace id, parent span id).
fn app_traceparent(body: &str) -> (String, String) {
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    let tp = seen["headers"]["traceparent"].as_str().expect("the app receives a traceparent").to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    (parts[1].to_string(), parts[2].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_spans_for_allowed_denied_audit_and_refused_flows() {
    let r = Receiver::grpc(Duration::ZERO).await;
    let mut m = mesh(otlp_args(&r, "grpc")).await;
    let client = http_client();
    let url = |p: &str| format!("http://{}{p}", m.http);

    // Allowed, no traceparent: a new trace, continued by api's sidecar and passed to the app.
    let (status, headers, body) = get(&client, &url("/api/items"), "GET", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(!headers.contains_key("x-trellis-audit"));
    let out = r.wait_for("allowed outbound", WAIT, |s| is(s, "outbound GET", "/api/items")).await;
    let inb = r.wait_for("allowed inbound", WAIT, |s| is(s, "inbound GET", "/api/items")).await;
    assert_eq!((out.kind, inb.kind), (CLIENT, SERVER));
    assert_nested(&out, &inb);
    assert!(out.parent_span_id.is_empty(), "a new trace starts at the outbound: {out:?}");
    assert_eq!(app_traceparent(&body), (inb.trace_id.clone(), inb.span_id.clone()));
    for s in [&out, &inb] {
        assert_ids(s, WEB, API);
        assert_eq!(s.str("trellis.decision"), "allow");
        assert_eq!(s.str("http.request.method"), "GET");
        assert_eq!(s.int("http.response.status_code"), Some(200));
        assert_eq!(s.str("network.protocol.name"), "http");
        assert!(s.int("http.response.body.size").unwrap() > 0, "{s:?}");
        assert!(s.int("network.peer.port").is_some() && !s.str("network.peer.address").is_empty());
        assert!(s.end_unix_nano >= s.start_unix_nano && s.start_unix_nano > 0);
        assert_ne!(s.status_code, ERROR);
    }
    assert_eq!(out.str("trellis.direction"), "outbound");
    assert_eq!(inb.str("trellis.direction"), "inbound");
    assert_eq!((inb.str("trellis.policy"), inb.int("trellis.rule")), ("api-from-web", Some(0)));
    assert_eq!(inb.int("server.port"), Some(i64::from(m.backend.port())));
    assert_eq!(inb.resource.get("service.name").and_then(|v| v.as_str()), Some("trellis-proxy"));
    assert_eq!(inb.resource.get("trellis.workload.spiffe_id").and_then(|v| v.as_str()), Some(API));
    assert_eq!(out.resource.get("trellis.workload.spiffe_id").and_then(|v| v.as_str()), Some(WEB));

    // A request that arrives with a traceparent keeps its trace id; its span is the parent.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let tp = format!("00-{trace}-b7ad6b7169203331-01");
    let state = [("traceparent", tp.as_str()), ("tracestate", "congo=t61rcWkgMzE"), ("tracestate", "rojo=00f067aa")];
    let (status, _, body) = get(&client, &url("/api/traced"), "GET", &state).await;
    assert_eq!(status, 200);
    let out = r.wait_for("traced outbound", WAIT, |s| is(s, "outbound GET", "/api/traced")).await;
    let inb = r.wait_for("traced inbound", WAIT, |s| is(s, "inbound GET", "/api/traced")).await;
    assert_eq!((out.trace_id.as_str(), out.parent_span_id.as_str()), (trace, "b7ad6b7169203331"));
    assert_nested(&out, &inb);
    assert_eq!(app_traceparent(&body).0, trace);
    // The trace's tracestate travels with it and is each span's trace_state (its lines are
    // one list).
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(seen["headers"]["tracestate"].is_string(), "the app gets the tracestate: {seen}");
    for s in [&out, &inb] {
        assert_eq!(s.trace_state, "congo=t61rcWkgMzE,rojo=00f067aa", "{s:?}");
    }

    // Denied by path (default deny) and by a named DENY policy.
    let (status, _, _) = get(&client, &url("/admin"), "GET", &[]).await;
    assert_eq!(status, 403);
    let inb = r.wait_for("denied inbound", WAIT, |s| is(s, "inbound GET", "/admin")).await;
    let out = r.wait_for("denied outbound", WAIT, |s| is(s, "outbound GET", "/admin")).await;
    assert_nested(&out, &inb);
    for s in [&out, &inb] {
        assert_eq!((s.str("trellis.decision"), s.status_code), ("deny", ERROR), "{s:?}");
        assert_eq!(s.int("http.response.status_code"), Some(403));
        assert!(s.status_message.contains("default") && s.str("trellis.reason").contains("default"), "{s:?}");
    }
    assert!(inb.status_message.contains("no rule matched"), "{inb:?}");
    get(&client, &url("/api/secret"), "GET", &[]).await;
    let inb = r.wait_for("named denial", WAIT, |s| is(s, "inbound GET", "/api/secret")).await;
    let out = r.wait_for("named denial out", WAIT, |s| is(s, "outbound GET", "/api/secret")).await;
    for s in [&out, &inb] {
        assert_eq!((s.str("trellis.policy"), s.int("trellis.rule")), ("no-secrets", Some(0)), "{s:?}");
        assert!(s.status_message.contains("no-secrets"), "{s:?}");
        // An audit-mode policy selects api too, but `trellis.audit` is for audit-deny only.
        assert!(s.attr("trellis.audit").is_none(), "an enforced deny has no audit finding: {s:?}");
    }

    // Audit mode: allowed now, an audit-mode DENY would block it.
    let (status, headers, _) = get(&client, &url("/api/legacy/v1"), "GET", &[]).await;
    assert_eq!(status, 200);
    assert!(!headers.contains_key("x-trellis-audit"), "the app never sees the audit header");
    let inb = r.wait_for("audit inbound", WAIT, |s| is(s, "inbound GET", "/api/legacy/v1")).await;
    let out = r.wait_for("audit outbound", WAIT, |s| is(s, "outbound GET", "/api/legacy/v1")).await;
    for s in [&out, &inb] {
        assert_eq!(s.str("trellis.decision"), "audit-deny", "{s:?}");
        assert!(s.str("trellis.audit").contains("legacy-audit"), "{s:?}");
        assert!(s.str("trellis.reason").starts_with("allow"), "audit-deny spans carry the reason: {s:?}");
        assert_ne!(s.status_code, ERROR, "audit never fails a request");
    }
    assert_eq!(inb.str("trellis.policy"), "api-from-web");

    // L4 denied by identity: web may not open the opaque TCP port.
    denied_tcp(&m).await;
    // (Matched by port: an idle spare connection of the HTTP client also ends up as TCP.)
    let tcp_port = Some(i64::from(m.tcp_backend.port()));
    let tcp =
        r.wait_for("denied tcp", WAIT, |s| s.name == "inbound connection" && s.int("server.port") == tcp_port).await;
    assert_eq!((tcp.str("trellis.decision"), tcp.status_code, tcp.kind), ("deny", ERROR, SERVER));
    assert_eq!(tcp.str("trellis.protocol"), "tcp");
    assert_eq!(tcp.int("server.port"), Some(i64::from(m.tcp_backend.port())));
    assert_ids(&tcp, WEB, API);
    assert!(tcp.str("trellis.reason").contains("no rule matched"), "{tcp:?}");
    let peer_port = Some(i64::from(m.api_tcp_inbound.port()));
    let out = r
        .wait_for("outbound tcp", WAIT, |s| s.name == "outbound connection" && s.int("network.peer.port") == peer_port)
        .await;
    assert_eq!((out.kind, out.str("trellis.protocol")), (CLIENT, "tcp"));
    assert_ids(&out, WEB, API);
    // The peer denied it and closed cleanly (it had read what the client sent first): not a
    // reset, not a failure on this side.
    assert_eq!((out.str("error.type"), out.status_code), ("", 0), "{out:?}");

    // Refused at the TLS handshake: no client certificate.
    no_cert_handshake(&m).await;
    let hs = r.wait_for("refused handshake", WAIT, |s| s.name == "inbound TLS handshake").await;
    assert_eq!((hs.str("trellis.decision"), hs.status_code, hs.kind), ("deny", ERROR, SERVER));
    assert_eq!(hs.str("error.type"), "no_certificate");
    assert!(hs.status_message.contains("no certificate"), "{hs:?}");
    assert_eq!(hs.str("trellis.destination.spiffe_id"), API);
    assert!(hs.attr("trellis.source.spiffe_id").is_none());

    // A request the outbound cannot deliver (api's sidecar is gone): its span says why,
    // with the cause, as a TCP connection's does.
    m.api.proc.signal(nix::sys::signal::Signal::SIGKILL);
    m.api.proc.wait_exit(WAIT);
    let (status, headers, _) = get(&client, &url("/api/unreachable"), "GET", &[]).await;
    assert_eq!(status, 502);
    let label = headers.get("x-trellis-error").unwrap().to_str().unwrap().to_string();
    let failed = r.wait_for("failed request", WAIT, |s| is(s, "outbound GET", "/api/unreachable")).await;
    assert_eq!((failed.str("trellis.decision"), failed.status_code), ("error", ERROR), "{failed:?}");
    assert_eq!(failed.str("error.type"), label);
    assert!(
        failed.status_message.starts_with(&format!("{label}: ")) && failed.status_message.len() > label.len() + 10,
        "the status names the cause: {failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_protobuf_exports_nested_spans_and_denials() {
    let r = Receiver::http(Duration::ZERO).await;
    let m = mesh(otlp_args(&r, "http")).await;
    let client = http_client();
    assert_eq!(get(&client, &format!("http://{}/api/x", m.http), "GET", &[]).await.0, 200);
    assert_eq!(get(&client, &format!("http://{}/api/x", m.http), "DELETE", &[]).await.0, 403);
    let out = r.wait_for("allowed outbound", WAIT, |s| is(s, "outbound GET", "/api/x")).await;
    let inb = r.wait_for("allowed inbound", WAIT, |s| is(s, "inbound GET", "/api/x")).await;
    assert_nested(&out, &inb);
    assert_ids(&inb, WEB, API);
    let denied = r.wait_for("denied", WAIT, |s| is(s, "inbound DELETE", "/api/x")).await;
    assert_eq!((denied.str("trellis.decision"), denied.status_code), ("deny", ERROR));
    assert_eq!(denied.str("http.request.method"), "DELETE");
    assert!(r.exports() > 0);
    let cfg = m.web.config();
    assert_eq!(cfg["telemetry"]["otlp_protocol"], "http");
    assert_eq!(cfg["telemetry"]["otlp_endpoint"], r.url());

    // An HTTP connection has a span of its own, on each side, when it closes.
    let client_port = Some(i64::from(two_requests_one_connection(&m).await));
    let conn = r
        .wait_for("outbound HTTP connection", WAIT, |s| {
            s.name == "outbound connection" && s.int("client.port") == client_port
        })
        .await;
    assert_eq!((conn.kind, conn.str("trellis.protocol"), conn.str("trellis.decision")), (CLIENT, "http1", "allow"));
    assert_eq!((conn.int("trellis.http.requests"), conn.int("trellis.http.requests.denied")), (Some(2), Some(1)));
    assert_eq!(conn.int("trellis.bytes.sent"), Some(TWO_REQUESTS.len() as i64), "what the client wrote: {conn:?}");
    assert!(conn.int("trellis.bytes.received").unwrap() > 100, "two answers: {conn:?}");
    assert!(conn.str("trellis.reason").contains("each request"), "{conn:?}");
    assert_ne!(conn.status_code, ERROR, "a connection whose requests were denied did not fail: {conn:?}");
    assert_ids(&conn, WEB, API);
    // The sidecars' pooled HTTP/2 connection closes when web's sidecar stops.
    m.web.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let peer = r
        .wait_for("inbound HTTP connection", WAIT, |s| {
            s.name == "inbound connection" && s.str("trellis.protocol") == "http2"
        })
        .await;
    assert_eq!((peer.kind, peer.str("trellis.decision")), (SERVER, "allow"));
    assert!(peer.int("trellis.http.requests").unwrap() >= 4, "every request rode it: {peer:?}");
    assert!(peer.int("trellis.http.requests.denied").unwrap() >= 2, "{peer:?}");
    assert!(peer.int("trellis.bytes.sent").unwrap() > 0 && peer.int("trellis.bytes.received").unwrap() > 0);
    assert_ids(&peer, WEB, API);
    assert_eq!(peer.int("server.port"), Some(i64::from(m.backend.port())));
}

/// Spans to `<dir>/<name>-spans.jsonl`; the flow log to `<dir>/<name>-flows.jsonl`, or to
/// stdout for the sidecar named `stdout_flows`.
/// A collector that answers "partial success: rejected N" took nothing: its spans are
/// counted as dropped (`rejected`), not exported, over gRPC and HTTP alike; a flow log whose
/// writes fail (a full disk) counts the lines it lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_a_collector_rejects_and_flow_lines_a_full_disk_loses_are_counted() {
    for protocol in ["grpc", "http"] {
        let r = if protocol == "grpc" {
            Receiver::grpc(Duration::ZERO).await
        } else {
            Receiver::http(Duration::ZERO).await
        };
        r.reject_everything();
        let otlp = otlp_args(&r, protocol);
        let m = mesh(move |name| {
            let mut args = otlp(name);
            args.extend(["--flow-log".to_string(), "/dev/full".to_string()]);
            args
        })
        .await;
        let client = http_client();
        for _ in 0..3 {
            assert_eq!(get(&client, &format!("http://{}/api/x", m.http), "GET", &[]).await.0, 200);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let api = metrics(&m.api);
            let rejected = api.sum("trellis_spans_dropped_total", &[("reason", "rejected")]);
            let lost = api.sum("trellis_flow_log_dropped_total", &[("reason", "write_failed")]);
            if rejected >= 3.0 && lost >= 3.0 {
                assert_eq!(api.sum("trellis_spans_exported_total", &[]), 0.0, "{protocol}: nothing was taken");
                assert_eq!(api.sum("trellis_flow_log_dropped_total", &[("reason", "queue_full")]), 0.0);
                break;
            }
            assert!(Instant::now() < deadline, "{protocol}: rejected {rejected}, lost {lost}:\n{}", m.api.metrics());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(r.exports() > 0 && r.spans().is_empty());
        let logs = m.api.proc.logs();
        assert!(logs.contains("the collector rejected spans") && logs.contains("over the span limit"), "{logs}");
        assert!(logs.contains("cannot write the flow log"), "{logs}");
    }
}

fn file_args(dir: &Path, ratio: &str, stdout_flows: &str) -> impl Fn(&str) -> Vec<String> {
    let dir = dir.to_path_buf();
    let (ratio, stdout_flows) = (ratio.to_string(), stdout_flows.to_string());
    move |name| {
        let flows = if name == stdout_flows {
            "-".into()
        } else {
            dir.join(format!("{name}-flows.jsonl")).display().to_string()
        };
        vec![
            "--trace-file".into(),
            dir.join(format!("{name}-spans.jsonl")).display().to_string(),
            "--flow-log".into(),
            flows,
            "--trace-sample-ratio".into(),
            ratio.clone(),
            // As `trellis inject` sets them from the downward API.
            "--pod-name".into(),
            format!("{name}-7d9f8-x2x"),
            "--pod-namespace".into(),
            "shop".into(),
        ]
    }
}

/// The JSON lines a process writes to stdout, as they come.
fn stdout_lines(proc: &mut Proc) -> std::sync::mpsc::Receiver<serde_json::Value> {
    let out = proc.child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
            let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("stdout line is not JSON: {line:?}: {e}"));
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    rx
}

fn json_lines(path: &PathBuf) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}"))).collect()
}

async fn wait_lines(path: &PathBuf, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = json_lines(path).into_iter().find(|v| pred(v)) {
            return v;
        }
        assert!(Instant::now() < deadline, "no line for {what} in {}:\n{:?}", path.display(), json_lines(path));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_file_and_flow_log_are_json_lines_and_sampling_keeps_denials() {
    let dir = tempfile::tempdir().unwrap();
    // Ratio 0: allowed flows are exported only when the caller's traceparent is sampled.
    let mut m = mesh(file_args(dir.path(), "0", "web")).await;
    let web_flows = stdout_lines(&mut m.web.proc);
    let client = http_client();
    let url = |p: &str| format!("http://{}{p}", m.http);
    assert_eq!(get(&client, &url("/api/unsampled"), "GET", &[]).await.0, 200);
    let tp = "00-11111111111111111111111111111111-2222222222222222-01";
    assert_eq!(get(&client, &url("/api/sampled"), "GET", &[("traceparent", tp), ("tracestate", "k=v")]).await.0, 200);
    assert_eq!(get(&client, &url("/admin"), "GET", &[]).await.0, 403);

    let api_spans = dir.path().join("api-spans.jsonl");
    let denied = wait_lines(&api_spans, "denied span", |v| v["attributes"]["url.path"] == "/admin").await;
    for field in ["trace_id", "span_id", "parent_span_id", "name", "kind", "status", "attributes", "resource"] {
        assert!(!denied[field].is_null(), "{field} missing: {denied}");
    }
    assert_eq!(denied["kind"], "server");
    assert_eq!(denied["status"]["code"], "error");
    assert_eq!(denied["attributes"]["trellis.decision"], "deny");
    assert_eq!(denied["resource"]["service.name"], "trellis-proxy");
    assert_eq!(
        (&denied["resource"]["k8s.pod.name"], &denied["resource"]["k8s.namespace.name"]),
        (&"api-7d9f8-x2x".into(), &"shop".into())
    );
    assert!(denied["end_time_unix_nano"].as_u64().unwrap() >= denied["start_time_unix_nano"].as_u64().unwrap());
    let sampled = wait_lines(&api_spans, "sampled span", |v| v["attributes"]["url.path"] == "/api/sampled").await;
    assert_eq!(
        (&sampled["trace_id"], &sampled["trace_state"]),
        (&"11111111111111111111111111111111".into(), &"k=v".into())
    );
    assert!(denied["trace_state"].is_null(), "a new trace has no tracestate: {denied}");
    let web_spans = dir.path().join("web-spans.jsonl");
    let out = wait_lines(&web_spans, "sampled outbound", |v| v["attributes"]["url.path"] == "/api/sampled").await;
    assert_eq!(out["parent_span_id"], "2222222222222222");
    assert_eq!(sampled["parent_span_id"], out["span_id"]);
    let all = json_lines(&api_spans).into_iter().chain(json_lines(&web_spans));
    assert!(
        all.into_iter().all(|v| v["attributes"]["url.path"] != "/api/unsampled"),
        "ratio 0 exported an allowed flow"
    );

    // The flow log has every flow, sampled or not, from both directions.
    let api_flows = dir.path().join("api-flows.jsonl");
    let line = wait_lines(&api_flows, "unsampled flow", |v| v["path"] == "/api/unsampled").await;
    assert_eq!((line["direction"].as_str(), line["decision"].as_str()), (Some("inbound"), Some("allow")));
    assert_eq!(line["source_spiffe_id"], WEB);
    assert_eq!(line["policy"], "api-from-web");
    assert_eq!(line["status_code"], 200);
    assert!(line["time"].as_str().unwrap().ends_with('Z'));
    // web writes its flow log to stdout (`--flow-log -`).
    let deadline = Instant::now() + WAIT;
    let line = loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        let v = web_flows.recv_timeout(wait).expect("web's flow log on stdout has the denied request");
        if v["path"] == "/admin" {
            break v;
        }
    };
    assert_eq!((line["direction"].as_str(), line["decision"].as_str()), (Some("outbound"), Some("deny")));
    assert_eq!(line["destination_spiffe_id"], API);
}

/// A TLS 1.2-only client (`openssl s_client -tls1_2`) straight to api's inbound; false (and
/// says why) when openssl is not installed.
fn tls12_handshake(m: &Mesh) -> bool {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-tls1_2", "-connect", &m.api_http_inbound.to_string()])
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(out) => {
            assert!(!out.status.success(), "a TLS 1.2 handshake succeeded");
            true
        }
        Err(e) => {
            eprintln!("skipped: the TLS 1.2 check needs openssl ({e})");
            false
        }
    }
}

fn metrics(s: &Sidecar) -> prom::Exposition {
    let text = s.metrics();
    prom::parse(&text).unwrap_or_else(|e| panic!("/metrics is not valid exposition text: {e}\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_move_with_flows() {
    let dir = tempfile::tempdir().unwrap();
    let m = mesh(file_args(dir.path(), "1", "")).await;
    let (api0, web0) = (metrics(&m.api), metrics(&m.web));
    for name in [
        "trellis_svid_expiry_timestamp_seconds",
        "trellis_policy_version",
        "trellis_spans_dropped_total",
        "trellis_protocol_detect_timeouts_total",
        "trellis_open_connections",
    ] {
        assert!(api0.has(name), "{name} missing");
    }
    assert!(api0.sum("trellis_svid_expiry_timestamp_seconds", &[]) > 1.6e9);
    assert!(api0.sum("trellis_policy_version", &[]) >= 1.0);
    admin_speaks_both_formats_and_refuses_writes(m.api.admin);

    let client = http_client();
    let url = |p: &str| format!("http://{}{p}", m.http);
    get(&client, &url("/api/a"), "GET", &[]).await;
    get(&client, &url("/admin"), "GET", &[]).await;
    get(&client, &url("/api/legacy"), "GET", &[]).await;
    denied_tcp(&m).await;
    no_cert_handshake(&m).await;
    let tls12 = tls12_handshake(&m);
    // Silence on web's HTTP route: detected as opaque after the detect timeout.
    let silent = TcpStream::connect(m.http).await.unwrap();
    wait_lines(&dir.path().join("api-spans.jsonl"), "handshake span", |v| v["name"] == "inbound TLS handshake").await;
    // Counters move as the flows end and the spans are exported: wait for the last ones.
    let deadline = Instant::now() + WAIT;
    while metrics(&m.web).sum("trellis_protocol_detect_timeouts_total", &[]) < 1.0
        || metrics(&m.api).sum("trellis_spans_exported_total", &[]) < 5.0
    {
        assert!(Instant::now() < deadline, "counters did not move:\n{}\n{}", m.web.metrics(), m.api.metrics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(silent);

    let (api, web) = (metrics(&m.api), metrics(&m.web));
    let delta =
        |a: &prom::Exposition, b: &prom::Exposition, name: &str, l: &[(&str, &str)]| b.sum(name, l) - a.sum(name, l);
    let flows = "trellis_flows_total";
    let by = |d, dec, p| [("direction", d), ("decision", dec), ("protocol", p)];
    assert_eq!(delta(&api0, &api, flows, &by("inbound", "allow", "http2")), 1.0);
    assert_eq!(delta(&api0, &api, flows, &by("inbound", "deny", "http2")), 1.0);
    assert_eq!(delta(&api0, &api, flows, &by("inbound", "audit-deny", "http2")), 1.0);
    assert!(delta(&api0, &api, flows, &by("inbound", "deny", "tcp")) >= 1.0);
    assert_eq!(delta(&web0, &web, flows, &by("outbound", "allow", "http1")), 1.0);
    assert_eq!(delta(&web0, &web, flows, &by("outbound", "deny", "http1")), 1.0);
    assert_eq!(delta(&web0, &web, flows, &by("outbound", "audit-deny", "http1")), 1.0);
    assert!(delta(&web0, &web, flows, &by("outbound", "allow", "tcp")) >= 1.0);
    assert_eq!(delta(&api0, &api, "trellis_handshake_failures_total", &[("reason", "no_certificate")]), 1.0);
    if tls12 {
        let failures = "trellis_handshake_failures_total";
        assert_eq!(delta(&api0, &api, failures, &[("reason", "protocol_version")]), 1.0, "{}", m.api.metrics());
        assert_eq!(delta(&api0, &api, failures, &[("reason", "other")]), 0.0);
    }
    // At least the silent connection (the HTTP client may also leave a spare idle one).
    assert!(delta(&web0, &web, "trellis_protocol_detect_timeouts_total", &[]) >= 1.0);
    let hist = "trellis_request_duration_seconds_count";
    assert_eq!(delta(&api0, &api, hist, &[("direction", "inbound")]), 3.0);
    assert_eq!(delta(&web0, &web, hist, &[("direction", "outbound")]), 3.0);
    assert!(delta(&api0, &api, "trellis_spans_exported_total", &[]) >= 5.0);
    assert_eq!(api.sum("trellis_spans_dropped_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_collector_never_holds_up_requests() {
    let nobody = format!("http://{}", addr(free_port()));
    let m = mesh(|_| vec!["--otlp-endpoint".into(), nobody.clone()]).await;
    let client = http_client();
    let start = Instant::now();
    for i in 0..200 {
        let (status, _, _) = get(&client, &format!("http://{}/api/{i}", m.http), "GET", &[]).await;
        assert_eq!(status, 200);
    }
    assert!(start.elapsed() < Duration::from_secs(20), "200 requests took {:?}", start.elapsed());
    let deadline = Instant::now() + Duration::from_secs(20);
    while metrics(&m.api).sum("trellis_spans_dropped_total", &[("reason", "export_failed")]) == 0.0 {
        assert!(Instant::now() < deadline, "failed exports were not counted:\n{}", m.api.metrics());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The log says what failed (not only hyper's "client error (Connect)").
    let logs = m.api.proc.logs();
    let line = logs.lines().find(|l| l.contains("span export failed")).unwrap_or_else(|| panic!("{logs}"));
    assert!(line.contains("cannot connect to the collector") && line.contains("Connection refused"), "{line}");
    // Nothing answered, so the protocol hint would mislead; and no cause printed twice.
    assert!(!line.contains("--otlp-protocol") && !line.contains("tcp connect error: tcp connect error"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_collector_overflows_the_bounded_queue_and_counts_drops() {
    let r = Receiver::grpc(Duration::from_secs(3)).await;
    let url = r.url();
    let m = mesh(|_| vec!["--otlp-endpoint".into(), url.clone(), "--trace-queue-size".into(), "8".into()]).await;
    let client = http_client();
    let start = Instant::now();
    for i in 0..300 {
        let (status, _, _) = get(&client, &format!("http://{}/api/{i}", m.http), "GET", &[]).await;
        assert_eq!(status, 200);
    }
    assert!(start.elapsed() < Duration::from_secs(20), "300 requests took {:?}", start.elapsed());
    let dropped = metrics(&m.api).sum("trellis_spans_dropped_total", &[("reason", "queue_full")]);
    assert!(dropped > 0.0, "a full queue must drop and count:\n{}", m.api.metrics());
    // Denials are always exported: a queue full of allowed flows gives one up for each.
    for i in 0..3 {
        let (status, _, _) = get(&client, &format!("http://{}/api/secret{i}", m.http), "GET", &[]).await;
        assert_eq!(status, 403);
    }
    // What was queued still arrives once the slow collector answers.
    r.wait_for("a span from the slow collector", WAIT, |s| s.name == "inbound GET").await;
    for i in 0..3 {
        let path = format!("/api/secret{i}");
        r.wait_for(&format!("the denial of {path}"), Duration::from_secs(30), |s| is(s, "inbound GET", &path)).await;
    }
}

/// At SIGTERM the queue gets 3 s to reach a collector; one that does not answer costs no more
/// than that, and the log says spans were lost rather than ending on "drained".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_delays_exit_by_at_most_the_flush_and_the_loss_is_logged() {
    let r = Receiver::grpc(Duration::from_secs(60)).await;
    let mut m = mesh(otlp_args(&r, "grpc")).await;
    let (status, _, _) = get(&http_client(), &format!("http://{}/api/secret-at-exit", m.http), "GET", &[]).await;
    assert_eq!(status, 403);
    let deadline = Instant::now() + WAIT;
    while r.exports() == 0 {
        assert!(Instant::now() < deadline, "no export reached the stalled collector");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = Instant::now();
    m.api.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let code = m.api.proc.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{}", m.api.proc.logs());
    // The drain (no connection left open here: a moment) and the 3 s flush.
    assert!(start.elapsed() < Duration::from_secs(6), "exit took {:?}", start.elapsed());
    let logs = m.api.proc.logs();
    assert!(logs.contains("spans still being exported at exit were lost"), "{logs}");
}

/// A collector that is down keeps the denials for when it is back (up to the queue's size);
/// allowed flows' spans are dropped and counted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_made_while_the_collector_is_down_arrive_when_it_is_back() {
    let at = addr(free_port());
    let url = format!("http://{at}");
    let m = mesh(|_| vec!["--otlp-endpoint".into(), url.clone()]).await;
    let client = http_client();
    let failed = || metrics(&m.api).sum("trellis_spans_dropped_total", &[("reason", "export_failed")]);
    let (status, _, _) = get(&client, &format!("http://{}/api/allowed", m.http), "GET", &[]).await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + WAIT;
    while failed() == 0.0 {
        assert!(Instant::now() < deadline, "the failed export was not counted:\n{}", m.api.metrics());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..3 {
        let (status, _, _) = get(&client, &format!("http://{}/api/secret-while-down{i}", m.http), "GET", &[]).await;
        assert_eq!(status, 403);
    }
    let r = Receiver::grpc_on(at, Duration::ZERO).await;
    for i in 0..3 {
        let path = format!("/api/secret-while-down{i}");
        let s = r.wait_for(&format!("the denial of {path}"), WAIT, |s| is(s, "inbound GET", &path)).await;
        assert_eq!(s.str("trellis.decision"), "deny");
    }
    assert!(!r.spans().iter().any(|s| is(s, "inbound GET", "/api/allowed")), "allowed flows are not kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_telemetry_flags_fail_with_a_clear_error() {
    let control = Control::start(&[]);
    let bundle = control.bundle_path().display().to_string();
    let cases: [(&[&str], &str); 8] = [
        (&["--trace-sample-ratio", "1.5"], "not a sample ratio"),
        (&["--otlp-protocol", "http"], "--otlp-endpoint"),
        (&["--otlp-endpoint", "http://user:secret@127.0.0.1:4318"], "must not carry credentials"),
        (&["--otlp-endpoint", "https://otel:4317"], "TLS to the collector is not supported"),
        (&["--otlp-endpoint", "otel:4317"], "http://"),
        (&["--otlp-protocol", "xml"], "xml"),
        (&["--otlp-endpoint", "http://127.0.0.1:4317", "--trace-file", "x"], "cannot be used with"),
        (&["--trace-file", "/nonexistent-dir/spans.jsonl"], "--trace-file: cannot open /nonexistent-dir/spans.jsonl"),
    ];
    for (flags, expected) in cases {
        let out = std::process::Command::new(bin())
            .args(["proxy", "run", "--control", &control.url, "--ca-bundle", &bundle, "--token", "t"])
            .args([
                "--admin",
                &addr(free_port()).to_string(),
                "--inbound",
                &format!("{}=127.0.0.1:1", addr(free_port())),
            ])
            .args(flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(err.contains(expected), "{flags:?}: {err}");
    }
}

/// `/metrics` is the classic text format unless OpenMetrics is asked for (as Prometheus
/// does); the admin endpoints are read-only and say so with `Allow`; unknown paths are 404s.
fn admin_speaks_both_formats_and_refuses_writes(admin: SocketAddr) {
    let (_, head, classic) = support::http_request(admin, "GET", "/metrics", "").unwrap();
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    assert_eq!(prom::format(&classic), prom::Format::Classic);
    assert!(classic.contains("# TYPE trellis_spans_dropped_total counter\n"), "{classic}");
    let accept = "Accept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3\r\n";
    let (_, head, open) = support::http_request(admin, "GET", "/metrics", accept).unwrap();
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    assert_eq!(prom::format(&open), prom::Format::OpenMetrics);
    let open = prom::parse(&open).unwrap_or_else(|e| panic!("OpenMetrics /metrics does not parse: {e}\n{open}"));
    assert!(open.has("trellis_spans_dropped_total") && open.has("trellis_policy_version"));

    for path in ["/metrics", "/ready", "/config"] {
        let (status, head, body) = support::http_request(admin, "POST", path, "").unwrap();
        assert_eq!(status, 405, "POST {path}: {head}\n{body}");
        assert!(head.to_ascii_lowercase().contains("allow: get, head"), "POST {path}: {head}");
        assert!(body.contains("only GET and HEAD"), "{body}");
    }
    for method in ["GET", "POST"] {
        let (status, _, body) = support::http_request(admin, method, "/nonexistent", "").unwrap();
        assert_eq!(status, 404, "{method} /nonexistent: {body}");
    }
}

#[test]
fn prometheus_parser_rejects_malformed_input() {
    let good = "# HELP x_total X.\n# TYPE x counter\nx_total{a=\"q\\\"\"} 1\n# EOF\n";
    assert_eq!(prom::parse(good).unwrap().sum("x_total", &[("a", "q\"")]), 1.0);
    let classic = "# HELP x_total X.\n# TYPE x_total counter\nx_total{a=\"q\\\"\"} 1\n";
    assert_eq!(prom::parse(classic).unwrap().sum("x_total", &[("a", "q\"")]), 1.0);
    for bad in [
        "x_total 1\n",
        "# TYPE x counter\nx_total{a=\"b} 1\n",
        "# TYPE x counter\nx_total{1a=\"b\"} 1\n",
        "# TYPE x counter\nx_total one\n",
        "# TYPE x counter\nx_sum 1\n",
        "# TYPE x counter\n# TYPE x counter\n",
        "# TYPE x counter\n# EOF\nx_total 1\n",
        // Classic text: a counter family is named as its samples, and there is no UNIT.
        "# TYPE x counter\nx_total 1\n",
        "# TYPE x_seconds gauge\n# UNIT x_seconds seconds\nx_seconds 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
    ] {
        assert!(prom::parse(bad).is_err(), "accepted {bad:?}");
    }
}
