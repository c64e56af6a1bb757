//! Defects a black-box audit found, each held to its fix: SVID TTL limits, the reserved
//! `/trellis/` IDs, the data dir's trust domain and permissions, ack versions, HTTP
//! conformance (405 + `Allow`, 401 + `WWW-Authenticate`, case-insensitive `Bearer`, the
//! audit `limit` maximum) and start-up errors printed once, before anything is created.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use trellis_control::api::{RenewRequest, TokenRequest};
use trellis_control::run::MAX_SVID_TTL;
use trellis_control::server::Hooks;
use trellis_control::store::{Actor, TokenRecord, now_unix};
use trellis_control::{StartError, tokens};
use trellis_identity::{CredentialStore, SpiffeId, TrustDomain, WorkloadKey};

const CONTROL: &str = "spiffe://cluster.local/trellis/control";

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// One request with whatever headers, answering status, headers and body: the typed
/// client cannot show response headers or send a lowercase `bearer`.
async fn raw(
    plane: &Plane,
    method: Method,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> (StatusCode, HeaderMap, String) {
    let expected = SpiffeId::parse(CONTROL).unwrap();
    let mut tls = trellis_identity::client_config(None, &plane.bundle(), expected).unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(plane.running.local_addr).await.unwrap();
    let name = trellis_identity::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path).header(header::HOST, "localhost");
    if let Some(a) = authorization {
        req = req.header(header::AUTHORIZATION, a);
    }
    let resp = send.send_request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned())
}

// --- 1. --svid-ttl ---------------------------------------------------------------------

#[tokio::test]
async fn an_svid_ttl_above_the_maximum_is_refused_before_anything_is_created() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    for ttl in [
        Duration::from_secs(u64::MAX),
        Duration::from_secs(9_999_999_999_999_999_999),
        Duration::from_secs(1000 * 365 * 24 * 3600),
        MAX_SVID_TTL + Duration::from_secs(1),
    ] {
        let mut cfg = config(&dir);
        cfg.svid_ttl = ttl;
        let err = trellis_control::start(cfg, Hooks::default()).await.unwrap_err();
        assert!(matches!(err, StartError::SvidTtlTooLong { .. }), "{ttl:?}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains("--svid-ttl") && msg.contains("30 days"), "{msg}");
        assert!(!dir.exists(), "a refused start created the data dir");
    }
}

#[tokio::test]
async fn the_maximum_svid_ttl_bootstraps() {
    let parent = tempfile::tempdir().unwrap();
    let mut cfg = config(parent.path());
    cfg.svid_ttl = MAX_SVID_TTL;
    let running = trellis_control::start(cfg, Hooks::default()).await.unwrap();
    let plane = Plane { running, dir: parent };
    let token = plane.token(WEB).await;
    let resp = plane.anonymous().bootstrap(&bootstrap_request(&token, WEB).1).await.unwrap();
    assert!(resp.expires_at > now_unix() + MAX_SVID_TTL.as_secs() - 60);
}

// --- 2. reserved and path-less IDs -----------------------------------------------------

#[tokio::test]
async fn no_join_token_for_the_control_plane_id_or_a_bare_trust_domain() {
    let plane = Plane::start().await;
    let admin = plane.admin();
    let before = plane.running.shared.store.audit(0, 100).unwrap();
    for (who, reason) in [
        (CONTROL, "reserved for Trellis"),
        ("spiffe://cluster.local/trellis", "reserved for Trellis"),
        ("spiffe://cluster.local/trellis/proxy", "reserved for Trellis"),
        ("spiffe://cluster.local", "has no path"),
    ] {
        let (status, msg) =
            api_error(admin.create_token(&TokenRequest { spiffe_id: id(who), ttl_seconds: None }).await);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{who}");
        assert!(msg.contains(reason), "{who}: {msg}");
    }
    assert_eq!(plane.running.shared.store.audit(0, 100).unwrap(), before, "no token was stored");
    // Look-alikes are ordinary workload IDs.
    admin
        .create_token(&TokenRequest {
            spiffe_id: id("spiffe://cluster.local/ns/trellis/sa/control"),
            ttl_seconds: None,
        })
        .await
        .unwrap();
}

/// A token stored for a reserved ID (minted before the rule, or written to the store by
/// other means) still gets no certificate, and is not spent.
#[tokio::test]
async fn bootstrap_never_signs_a_reserved_or_pathless_id() {
    let plane = Plane::start().await;
    let actor = Actor { principal: "test".into(), remote: "-".into() };
    for (who, reason) in [(CONTROL, "reserved for Trellis"), ("spiffe://cluster.local", "has no path")] {
        let secret = tokens::mint();
        let record = TokenRecord { spiffe_id: id(who), created: now_unix(), expires: now_unix() + 600, used: None };
        plane.running.shared.store.insert_token(&tokens::hash(&secret), &record, &actor).unwrap();
        let (status, msg) = api_error(plane.anonymous().bootstrap(&bootstrap_request(&secret, who).1).await);
        assert_eq!(status, StatusCode::FORBIDDEN, "{who}");
        assert!(msg.contains(reason), "{who}: {msg}");
        let stored = plane.running.shared.store.peek_token(&tokens::hash(&secret), now_unix()).unwrap();
        assert_eq!(stored.used, None, "{who}: the refused token was spent");
    }
}

#[tokio::test]
async fn renewal_never_signs_the_control_plane_id() {
    let plane = Plane::start().await;
    // An SVID for the control plane's ID from this CA (as one issued before the fix was).
    let svid = plane.svid_at(CONTROL, Duration::from_secs(3600), SystemTime::now());
    let client = plane.client_with(Some(CredentialStore::with(svid).unwrap()), None);
    let key = WorkloadKey::generate().unwrap();
    let csr_pem = trellis_identity::pem::csr_to_pem(&key.csr(&id(CONTROL)).unwrap());
    let (status, msg) = api_error(client.renew(&RenewRequest { csr_pem, addresses: vec![] }).await);
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(msg.contains("reserved for Trellis"), "{msg}");
}

// --- 3. the data dir's trust domain ----------------------------------------------------

fn config_for(dir: &Path, td: &str) -> trellis_control::ControlConfig {
    let mut cfg = config(dir);
    cfg.trust_domain = TrustDomain::parse(td).unwrap();
    cfg
}

#[tokio::test]
async fn a_data_dir_for_another_trust_domain_is_refused_and_left_alone() {
    let plane = Plane::start().await;
    let Plane { running, dir } = plane;
    running.shutdown().await;
    let bundle_before = std::fs::read(dir.path().join("bundle.pem")).unwrap();

    let err = trellis_control::start(config_for(dir.path(), "other.mesh"), Hooks::default()).await.unwrap_err();
    assert!(matches!(err, StartError::TrustDomainMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("trust domain cluster.local") && msg.contains("--trust-domain is other.mesh"), "{msg}");
    assert_eq!(std::fs::read(dir.path().join("bundle.pem")).unwrap(), bundle_before, "bundle rewritten");

    // The store remembers its trust domain too, e.g. when the CA comes from elsewhere.
    let other = trellis_identity::CertificateAuthority::create_root(
        &TrustDomain::parse("other.mesh").unwrap(),
        Duration::from_secs(86_400),
    )
    .unwrap();
    let ca_dir = tempfile::tempdir().unwrap();
    other.save(ca_dir.path()).unwrap();
    let mut cfg = config_for(dir.path(), "other.mesh");
    cfg.ca_files = Some((ca_dir.path().join("ca.pem"), ca_dir.path().join("ca-key.pem")));
    let msg = trellis_control::start(cfg, Hooks::default()).await.unwrap_err().to_string();
    assert!(msg.contains("holds a store for trust domain cluster.local"), "{msg}");

    // The right trust domain still starts.
    let running = trellis_control::start(config(dir.path()), Hooks::default()).await.unwrap();
    running.shutdown().await;
}

/// `bundle.pem` may hold earlier roots of this mesh (a rotation's overlap) and nothing else:
/// another mesh's root, a CA naming no trust domain or an unreadable file is refused at start
/// with the certificate named, and the file is left as it was.
#[tokio::test]
async fn a_bundle_holding_anything_but_this_meshs_roots_is_refused_and_left_alone() {
    let Plane { running, dir } = Plane::start().await;
    running.shutdown().await;
    let path = dir.path().join("bundle.pem");
    let ours = std::fs::read_to_string(&path).unwrap();
    let other = trellis_identity::CertificateAuthority::create_root(
        &TrustDomain::parse("other.mesh").unwrap(),
        Duration::from_secs(86_400),
    )
    .unwrap();
    let other_pem = trellis_identity::pem::certs_to_pem([other.root()]);
    let nameless = rcgen::CertificateParams::new(Vec::<String>::new())
        .map(|mut p| {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p
        })
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    for (text, want) in [
        (format!("{other_pem}{ours}"), "certificate 1 (SHA256 "),
        (format!("{ours}{other_pem}"), "is the root of trust domain other.mesh"),
        (format!("{ours}{nameless}"), "certificate 2 (SHA256 "),
        (format!("{ours}{nameless}"), "is a CA naming no trust domain"),
        ("not a certificate\n".to_string(), "trust bundle: no CERTIFICATE found"),
    ] {
        std::fs::write(&path, &text).unwrap();
        let err = trellis_control::start(config(dir.path()), Hooks::default()).await.unwrap_err();
        assert!(matches!(err, StartError::BundleFile { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(want) && msg.contains("bundle.pem"), "{msg}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "bundle rewritten");
    }
    // This mesh's roots only: it starts, and keeps them.
    std::fs::write(&path, &ours).unwrap();
    let running = trellis_control::start(config(dir.path()), Hooks::default()).await.unwrap();
    running.shutdown().await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), ours);
}

// --- 4. permissions ---------------------------------------------------------------------

#[tokio::test]
async fn the_data_dir_is_0700_and_its_files_0600_also_when_they_were_looser() {
    let plane = Plane::start().await;
    let dir = plane.dir.path().to_path_buf();
    let files = ["ca.pem", "ca-key.pem", "bundle.pem", "admin.token", "trellis.redb"];
    assert_eq!(mode(&dir), 0o700);
    for f in files {
        assert_eq!(mode(&dir.join(f)), 0o600, "new {f}");
    }
    // Loosened by hand (or an older version, or umask 000): tightened on the next start.
    let Plane { running, dir: tmp } = plane;
    running.shutdown().await;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    for f in files {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let running = trellis_control::start(config(tmp.path()), Hooks::default()).await.unwrap();
    assert_eq!(mode(&dir), 0o700);
    for f in files {
        assert_eq!(mode(&dir.join(f)), 0o600, "existing {f}");
    }
    running.shutdown().await;
}

// --- 5. acks ----------------------------------------------------------------------------

#[tokio::test]
async fn an_ack_ahead_of_the_current_version_is_refused() {
    let plane = Plane::start().await;
    plane.admin().apply_policies(POLICY.into()).await.unwrap();
    let client = plane.workload(WEB);
    let mut stream = client.watch().await.unwrap();
    let first = stream.next().await.unwrap();
    assert_eq!(first.version, 1);
    let (status, msg) = api_error(client.ack(first.session, 999).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(msg.contains("current policy version 1"), "{msg}");
    assert_eq!(plane.admin().workloads().await.unwrap()[0].acked_version, None);
    client.ack(first.session, 1).await.unwrap();
    assert_eq!(plane.admin().workloads().await.unwrap()[0].acked_version, Some(1));
}

/// Acks travel on connections of their own and may arrive out of order: an older one after
/// a newer one does not make an up-to-date proxy look behind.
#[tokio::test]
async fn an_ack_arriving_after_a_newer_one_does_not_lower_the_acked_version() {
    let plane = Plane::start().await;
    plane.admin().apply_policies(POLICY.into()).await.unwrap();
    plane.admin().apply_policies(POLICY.replace("8080", "8081")).await.unwrap();
    let client = plane.workload(WEB);
    let mut stream = client.watch().await.unwrap();
    let first = stream.next().await.unwrap();
    assert_eq!(first.version, 2);
    client.ack(first.session, 2).await.unwrap();
    client.ack(first.session, 1).await.unwrap();
    assert_eq!(plane.admin().workloads().await.unwrap()[0].acked_version, Some(2));
}

// --- 6. HTTP conformance ---------------------------------------------------------------

#[tokio::test]
async fn undocumented_methods_get_405_with_allow_and_change_nothing() {
    let plane = Plane::start().await;
    let bearer = format!("Bearer {}", plane.admin_token());
    let (status, headers, _) = raw(&plane, Method::PUT, "/v1/policies", Some(&bearer), POLICY).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers[header::ALLOW], "GET, POST");
    assert_eq!(plane.running.shared.store.version().unwrap(), 0, "PUT applied policies");

    for (method, path, allow) in [
        (Method::DELETE, "/v1/svid/bootstrap", "POST"),
        (Method::POST, "/healthz", "GET, HEAD"),
        (Method::GET, "/v1/watch/ack", "POST"),
    ] {
        let (status, headers, _) = raw(&plane, method.clone(), path, None, "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(headers[header::ALLOW], allow, "{method} {path}");
    }
    for (method, path, allow) in [
        (Method::GET, "/v1/tokens", "POST"),
        (Method::PUT, "/v1/policies/x", "GET, DELETE"),
        (Method::POST, "/v1/audit", "GET"),
    ] {
        let (status, headers, _) = raw(&plane, method.clone(), path, Some(&bearer), "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(headers[header::ALLOW], allow, "{method} {path}");
    }
    let (status, _, _) = raw(&plane, Method::GET, "/v1/tokens/nothing", Some(&bearer), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Load balancers probe liveness with HEAD, over either protocol (curl negotiates h2); HEAD
    // works wherever a public GET does (RFC 9110 §9.3.2).
    let (status, _, body) = raw(&plane, Method::HEAD, "/healthz", None, "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
    for (path, code) in [("/healthz", "200"), ("/v1/bundle", "200")] {
        let url = format!("https://{}{path}", plane.running.local_addr);
        // On a blocking thread: this test's runtime serves the control plane meanwhile.
        let args = ["-sk", "--max-time", "5", "--http2", "-I", "-o", "/dev/null", "-w", "%{http_code} %{http_version}"];
        let curl = move || std::process::Command::new("curl").args(args).arg(&url).output().unwrap();
        let out = tokio::task::spawn_blocking(curl).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{code} 2"),
            "HEAD {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "HEAD {path}: curl exit {:?}", out.status.code());
    }
}

#[tokio::test]
async fn audit_limit_above_the_maximum_is_400() {
    let plane = Plane::start().await;
    let bearer = format!("Bearer {}", plane.admin_token());
    let (status, _, body) = raw(&plane, Method::GET, "/v1/audit?limit=10001", Some(&bearer), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("maximum 10000"), "{body}");
    for ok in ["/v1/audit?limit=10000", "/v1/audit?limit=0"] {
        assert_eq!(raw(&plane, Method::GET, ok, Some(&bearer), "").await.0, StatusCode::OK, "{ok}");
    }
    let (status, _, body) = raw(&plane, Method::GET, "/v1/audit?after=1&after=2", Some(&bearer), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("after") && body.contains("is given twice"), "{body}");
}

#[tokio::test]
async fn admin_401s_challenge_with_bearer_and_the_scheme_is_case_insensitive() {
    let plane = Plane::start().await;
    let token = plane.admin_token();
    let (status, headers, _) = raw(&plane, Method::GET, "/v1/policies", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let challenge = headers[header::WWW_AUTHENTICATE].to_str().unwrap();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    let (status, headers, _) = raw(&plane, Method::GET, "/v1/policies", Some("Bearer wrong"), "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers[header::WWW_AUTHENTICATE].to_str().unwrap().contains("error=\"invalid_token\""));

    for auth in [format!("bearer {token}"), format!("BEARER {token}"), format!("Bearer  {token}")] {
        let (status, _, body) = raw(&plane, Method::GET, "/v1/policies", Some(&auth), "").await;
        assert_eq!(status, StatusCode::OK, "{auth:?}: {body}");
    }
    for auth in [format!("Basic {token}"), token.clone(), format!("Bearer{token}")] {
        assert_eq!(
            raw(&plane, Method::GET, "/v1/policies", Some(&auth), "").await.0,
            StatusCode::UNAUTHORIZED,
            "{auth:?}"
        );
    }
}

// --- 7. start-up errors ----------------------------------------------------------------

#[tokio::test]
async fn a_port_in_use_is_reported_once_and_creates_nothing() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let mut cfg = config(&dir);
    cfg.listen = taken.local_addr().unwrap();
    let err = trellis_control::start(cfg, Hooks::default()).await.unwrap_err();
    let msg = anyhow_like(&err);
    assert_eq!(msg.matches("in use").count(), 1, "{msg}");
    assert!(!dir.exists(), "a start that could not bind created the data dir");
}

#[tokio::test]
async fn a_data_dir_in_use_is_reported_once_and_named() {
    let plane = Plane::start().await;
    let err = trellis_control::start(config(plane.dir.path()), Hooks::default()).await.unwrap_err();
    let msg = anyhow_like(&err);
    assert!(msg.contains("another control plane is probably using this data dir"), "{msg}");
    assert_eq!(msg.matches("trellis.redb").count(), 1, "{msg}");
}

/// What `{:#}` on an `anyhow::Error` prints (the binary's `error: ...`): every error in the
/// `source()` chain, joined by ": ".
fn anyhow_like(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

// --- a declared body over the limit --------------------------------------------------------

/// A `Content-Length` over the limit is answered 413 at once, not after the server has waited
/// for (or read) a body it would throw away.
#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_before_the_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let plane = Plane::start().await;
    let expected = SpiffeId::parse(CONTROL).unwrap();
    let tls = trellis_identity::client_config(None, &plane.bundle(), expected).unwrap();
    let tcp = tokio::net::TcpStream::connect(plane.running.local_addr).await.unwrap();
    let name = trellis_identity::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.unwrap();
    let head = format!(
        "POST /v1/policies HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\n\
         content-type: application/yaml\r\ncontent-length: 99999999999\r\n\r\n",
        plane.admin_token()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("no answer while the body was still owed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

/// A TLS connection to `plane` over HTTP/1.1, as a raw client sees it.
async fn h1_stream(plane: &Plane) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let expected = SpiffeId::parse(CONTROL).unwrap();
    let tls = trellis_identity::client_config(None, &plane.bundle(), expected).unwrap();
    let tcp = tokio::net::TcpStream::connect(plane.running.local_addr).await.unwrap();
    let name = trellis_identity::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.unwrap()
}

/// A body over the limit that the client sends anyway is read (and thrown away) before the
/// 413, so the client — still writing — gets the answer, not a reset connection.
#[tokio::test]
async fn a_client_sending_a_body_over_the_limit_reads_the_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let plane = Plane::start().await;
    let mut stream = h1_stream(&plane).await;
    let body = vec![b'x'; 32 << 20];
    let head = format!(
        "POST /v1/tokens HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        plane.admin_token(),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.expect("the whole body is taken");
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

/// Two Authorization headers have no one meaning: 400 whichever comes first (the first one
/// used to decide, so a good token before a bad one passed).
#[tokio::test]
async fn two_authorization_headers_are_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let plane = Plane::start().await;
    let token = plane.admin_token();
    for (first, second) in [(token.as_str(), "wrong"), ("wrong", token.as_str())] {
        let mut stream = h1_stream(&plane).await;
        let req = format!(
            "GET /v1/policies HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {first}\r\n\
             authorization: Bearer {second}\r\nconnection: close\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("more than one Authorization"), "{answer}");
    }
    // A well-formed body with a value a field refuses is an invalid request, not malformed JSON.
    let bearer = format!("Bearer {token}");
    let body = r#"{"spiffe_id": "spiffe://cluster.local/ns/../sa/x"}"#;
    let (status, _, answer) = raw(&plane, Method::POST, "/v1/tokens", Some(&bearer), body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(answer.contains("invalid request body") && !answer.contains("malformed"), "{answer}");
}

/// A body that stops arriving is answered 408 after the header timeout, not waited for with
/// the connection (and its memory) held for good.
#[tokio::test]
async fn a_body_that_stops_arriving_is_408_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.header_timeout = Duration::from_millis(500);
    let running = trellis_control::start(cfg, Hooks::default()).await.unwrap();
    let plane = Plane { running, dir };
    let mut stream = h1_stream(&plane).await;
    let head = "POST /v1/svid/bootstrap HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                content-length: 1000\r\n\r\n{\"token\":";
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "still open 5 s into a stalled body");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("stopped arriving"), "{answer}");
}

/// A data dir that holds other things too (`--data-dir .`, a home directory) keeps its mode:
/// only the control plane's own files are made private.
#[tokio::test]
async fn a_shared_data_dir_keeps_its_mode() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.txt"), "mine").unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let running = trellis_control::start(config(tmp.path()), Hooks::default()).await.unwrap();
    assert_eq!(mode(tmp.path()), 0o755);
    for f in ["ca-key.pem", "admin.token", "trellis.redb"] {
        assert_eq!(mode(&tmp.path().join(f)), 0o600, "{f}");
    }
    running.shutdown().await;
}

/// The API listens on every interface: a client that sends part of its headers and stalls
/// (slowloris), or an HTTP/1.1 connection left idle, is closed after `--header-timeout`;
/// a watch stream (a long response, not a slow request) is not.
#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.header_timeout = Duration::from_millis(500);
    let running = trellis_control::start(cfg, Hooks::default()).await.unwrap();
    let plane = Plane { running, dir };
    let (bundle, addr) = (plane.bundle(), plane.running.local_addr);
    let connect_with = |alpn: &'static [u8]| {
        let bundle = bundle.clone();
        async move {
            let expected = SpiffeId::parse(CONTROL).unwrap();
            let mut tls = trellis_identity::client_config(None, &bundle, expected).unwrap();
            tls.alpn_protocols = vec![alpn.to_vec()];
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = trellis_identity::pki_types::ServerName::try_from("localhost").unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.unwrap()
        }
    };
    let mut partial = connect_with(b"http/1.1").await;
    partial.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n").await.unwrap();
    let mut idle = connect_with(b"http/1.1").await;
    // HTTP/2 has no header timeout in hyper: a connection that asks nothing is closed too.
    let mut idle_h2 = connect_with(b"h2").await;
    for (what, stream) in
        [("partial headers", &mut partial), ("an idle connection", &mut idle), ("an idle h2 one", &mut idle_h2)]
    {
        // Closed: read to the end (after a 408, or HTTP/2's own SETTINGS), never an answer.
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "{what}: still open after 5 s");
        assert!(!String::from_utf8_lossy(&got).contains("200 OK"), "{what}");
    }
    let mut watch = plane.workload(WEB).watch().await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), watch.next()).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    plane.admin().apply_policies(POLICY.into()).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(2), watch.next()).await.expect("the watch stream lives on");
    assert_eq!(event.unwrap().version, 1);
}
