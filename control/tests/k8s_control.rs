//! The Kubernetes integrations through the control plane's real HTTPS API: bootstrap with a
//! projected ServiceAccount token (TokenReview against a fake API server), and the injection
//! webhook called the way the API server calls it (by DNS name, verifying the serving
//! certificate against the bundle).

mod common;

use std::sync::Arc;

use common::fake_kube::start_fake_api;
use common::*;
use http::StatusCode;
use trellis_control::ClientError;
use trellis_control::api::BootstrapRequest;
use trellis_control::hooks::{injection_webhook, k8s_attestation};
use trellis_control::server::Hooks;
use trellis_identity::WorkloadKey;

async fn plane_with(hooks: Hooks, dns: Vec<String>) -> Plane {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.serving_names = dns;
    let running = trellis_control::start(cfg, hooks).await.unwrap();
    Plane { running, dir }
}

fn k8s_bootstrap(token: &str) -> (WorkloadKey, BootstrapRequest) {
    let key = WorkloadKey::generate().unwrap();
    let csr_pem = trellis_identity::pem::csr_to_pem(&key.anonymous_csr().unwrap());
    (key, BootstrapRequest { token: None, k8s_token: Some(token.into()), csr_pem, addresses: vec!["10.4.0.7".into()] })
}

#[tokio::test]
async fn a_service_account_token_bootstraps_its_spiffe_id() {
    let api = start_fake_api().await;
    let hooks = Hooks { k8s_attest: Some(k8s_attestation(api.reviewer(), td())), ..Hooks::default() };
    let plane = plane_with(hooks, vec![]).await;
    let (key, req) = k8s_bootstrap("pod-token");
    let resp = plane.anonymous().bootstrap(&req).await.unwrap();
    assert_eq!(resp.spiffe_id, id("spiffe://cluster.local/ns/shop/sa/checkout"));
    let chain = trellis_identity::pem::certs_from_pem("chain", resp.chain_pem.as_bytes()).unwrap();
    assert_eq!(key.into_svid(chain).unwrap().id().as_str(), "spiffe://cluster.local/ns/shop/sa/checkout");
    // The same token works again (projected tokens are not single use) — a restarted pod.
    plane.anonymous().bootstrap(&k8s_bootstrap("pod-token").1).await.unwrap();
    // Each issuance is audited, as a join token's is.
    let audit = plane.admin().audit(0).await.unwrap();
    let issued = audit
        .iter()
        .filter(|e| e.action == "svid.bootstrap" && e.target == "spiffe://cluster.local/ns/shop/sa/checkout")
        .count();
    assert_eq!(issued, 2, "{audit:?}");
    // A link-local address (the cloud's metadata service among them) is no workload's.
    let (_, mut req) = k8s_bootstrap("pod-token");
    req.addresses = vec!["169.254.169.254".into()];
    match plane.anonymous().bootstrap(&req).await {
        Err(ClientError::Api { status, body }) => {
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(body.error.contains("link-local"), "{}", body.error);
        }
        other => panic!("{other:?}"),
    }

    for (token, status) in [
        ("revoked-token", StatusCode::UNAUTHORIZED),
        ("api-audience-token", StatusCode::UNAUTHORIZED),
        ("user-token", StatusCode::UNAUTHORIZED),
        ("overloaded", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        match plane.anonymous().bootstrap(&k8s_bootstrap(token).1).await {
            Err(ClientError::Api { status: s, body }) => {
                assert_eq!(s, status, "{token}: {}", body.error);
                assert!(body.error.contains("Kubernetes"), "{token}: {}", body.error);
            }
            other => panic!("{token}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn kubernetes_tokens_are_refused_when_attestation_is_off() {
    let plane = Plane::start().await;
    match plane.anonymous().bootstrap(&k8s_bootstrap("pod-token").1).await {
        Err(ClientError::Api { status, body }) => {
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(body.error.contains("--k8s-attestation"), "{}", body.error);
        }
        other => panic!("{other:?}"),
    }
}

/// A plain WebPKI client, like the API server: trusts the bundle, checks the DNS name.
fn webpki_client(plane: &Plane) -> Arc<trellis_identity::rustls::ClientConfig> {
    let mut roots = trellis_identity::rustls::RootCertStore::empty();
    for root in plane.bundle().roots() {
        roots.add(root.clone()).unwrap();
    }
    let cfg = trellis_identity::rustls::ClientConfig::builder_with_provider(trellis_identity::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(cfg)
}

/// The certificate the control plane serves to a client asking for `name` by SNI.
async fn served_cert(plane: &Plane, name: &str) -> trellis_identity::CertInfo {
    let tcp = tokio::net::TcpStream::connect(plane.running.local_addr).await.unwrap();
    let server_name = trellis_identity::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(webpki_client(plane)).connect(server_name, tcp).await.unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    trellis_identity::CertInfo::parse(&leaf).unwrap()
}

async fn post_review(plane: &Plane, name: &str, body: Vec<u8>) -> Result<(StatusCode, serde_json::Value), String> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(plane.running.local_addr).await.unwrap();
    let server_name = trellis_identity::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(webpki_client(plane))
        .connect(server_name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/inject")
        .header("host", name)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)))
}

#[tokio::test]
async fn the_webhook_answers_the_api_server_over_dns_verified_tls() {
    let dns = "trellis-control.trellis-system.svc".to_string();
    let hooks = Hooks { webhook: Some(injection_webhook(None, None)), ..Hooks::default() };
    let plane = plane_with(hooks, vec![dns.clone()]).await;
    let review = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject/admission/pod-create.json"),
    )
    .unwrap();
    let (status, answer) = post_review(&plane, &dns, review.clone()).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let (status, err) = post_review(&plane, &dns, b"{not json".to_vec()).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err["error"].as_str().unwrap().contains("AdmissionReview"), "{err}");
    // Asked for any other name, the control plane shows the same certificate, which does not
    // name it: a WebPKI client refuses it, while SPIFFE-verifying clients keep working.
    let err = post_review(&plane, "evil.example.com", review).await.unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    plane.admin().list_policies().await.unwrap();
    // It names the control plane's SPIFFE ID (proxies ask by this name too), so it lives no
    // longer than the control plane's own SVID (24 h, renewed at half-life), not the CA's years.
    let served = served_cert(&plane, &dns).await;
    assert_eq!(served.uri_sans, ["spiffe://cluster.local/trellis/control"]);
    let lifetime = served.not_after.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(lifetime <= std::time::Duration::from_secs(24 * 3600), "{lifetime:?}");
}

/// Injected proxies reach the control plane by the webhook's DNS name (the Service's: the
/// injected `TRELLIS_CONTROL` and the webhook's `--inject-control` default), so what it
/// serves to that name must also pass their SPIFFE check: the bootstrap works by name.
#[tokio::test]
async fn proxies_reach_the_control_plane_by_the_webhooks_dns_name() {
    let api = start_fake_api().await;
    let hooks = Hooks {
        k8s_attest: Some(k8s_attestation(api.reviewer(), td())),
        webhook: Some(injection_webhook(None, None)),
        ..Hooks::default()
    };
    // `localhost` stands in for the Service name: it resolves here without DNS.
    let plane = plane_with(hooks, vec!["localhost".into()]).await;
    let (status, _) = post_review(&plane, "localhost", b"{}".to_vec()).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "the API server's view: DNS-verified TLS");
    let url = format!("https://localhost:{}", plane.running.local_addr.port());
    let by_name = trellis_control::ControlClient::new(&url, &plane.bundle(), None, None, None).unwrap();
    let resp = by_name.bootstrap(&k8s_bootstrap("pod-token").1).await.unwrap();
    assert_eq!(resp.spiffe_id, id("spiffe://cluster.local/ns/shop/sa/checkout"));
}

#[tokio::test]
async fn the_webhook_is_off_unless_enabled() {
    let plane = Plane::start().await;
    match plane.anonymous().call(http::Method::POST, "/inject", Some("{}".into()), "application/json").await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status, StatusCode::NOT_FOUND),
        other => panic!("{other:?}"),
    }
}

/// In Kubernetes mode the control plane lists Services and EndpointSlices and pushes the
/// service table on the watch stream; without the RBAC to list them it keeps going (and the
/// proxies simply get no table).
#[tokio::test]
async fn services_listed_from_the_api_reach_the_watch_stream() {
    let api = start_fake_api().await;
    let services = serde_json::json!([{
        "metadata": { "namespace": "shop", "name": "api" },
        "spec": { "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
    }, {
        "metadata": { "namespace": "shop", "name": "db" },
        "spec": { "clusterIP": "10.96.0.11", "ports": [{ "port": 5432 }] },
    }, {
        "metadata": { "namespace": "shop", "name": "cache" },
        "spec": { "clusterIP": "10.96.0.12", "ports": [{ "port": 6379 }] },
    }]);
    let slices = serde_json::json!([{
        "metadata": { "namespace": "shop", "name": "api-abcde", "labels": { "kubernetes.io/service-name": "api" } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": [{ "addresses": ["10.244.1.5"], "conditions": { "ready": true } }],
    }]);
    *api.cluster.lock().unwrap() = Some((services, slices));
    // The fake answers one object per page: three pages of Services, joined by `continue`.
    let table = trellis_control::services::list_table(&api.reviewer()).await.unwrap();
    // Behind a path prefix (`--k8s-api https://host/k8s/clusters/c1`) lists go there too, as
    // token reviews always did: they asked the bare path and got 404.
    let behind = common::fake_kube::start_fake_api_at(common::fake_kube::PREFIX).await;
    *behind.cluster.lock().unwrap() = api.cluster.lock().unwrap().clone();
    let prefixed = trellis_control::kube::TokenReviewer::new(
        &format!("{}{}", behind.url(), common::fake_kube::PREFIX),
        behind.ca_pem.as_bytes(),
        common::fake_kube::CONTROL_PLANE_TOKEN,
    )
    .unwrap();
    assert_eq!(trellis_control::services::list_table(&prefixed).await.unwrap(), table);
    assert_eq!(prefixed.review("pod-token").await.unwrap().namespace, "shop");
    let addresses: Vec<&str> = table.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(addresses, ["10.96.0.10:80", "10.96.0.11:5432", "10.96.0.12:6379"]);
    assert_eq!(table[0].endpoints, ["10.244.1.5:8080"]);

    let hooks = Hooks { k8s_services: Some(api.reviewer()), ..Hooks::default() };
    let plane = plane_with(hooks, vec![]).await;
    let client = plane.workload("spiffe://cluster.local/ns/shop/sa/web");
    let mut stream = client.watch().await.unwrap();
    let mut event = stream.next().await.unwrap();
    // The first listing may land just after the stream opened.
    while event.services.is_none() {
        event = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next()).await.unwrap().unwrap();
    }
    assert_eq!(event.services.unwrap(), table);
    assert_eq!(event.services_version, Some(1));

    // A live check of the Service's address is judged as a call to its endpoint in the mesh.
    let api_id = "spiffe://cluster.local/ns/shop/sa/api";
    let token = plane.token(api_id).await;
    let (_, mut req) = common::bootstrap_request(&token, api_id);
    req.addresses = vec!["10.244.1.5".into()];
    plane.anonymous().bootstrap(&req).await.unwrap();
    let check = trellis_control::api::CheckRequest {
        from: Some(id("spiffe://cluster.local/ns/shop/sa/web")),
        to_address: Some("10.96.0.10:80".into()),
        ..Default::default()
    };
    let answer = plane.admin().check(&check).await.unwrap();
    assert_eq!(answer.resolved, Some(id(api_id)));
    assert_eq!(answer.endpoint.as_deref(), Some("10.244.1.5:8080"));
    assert_eq!(answer.decision["action"], "deny", "{:?}", answer.decision);

    // A malformed answer is an error naming what was wrong, not an empty table.
    *api.cluster.lock().unwrap() = Some((serde_json::json!({ "not": "a list" }), serde_json::json!([])));
    let e = trellis_control::services::list_table(&api.reviewer()).await.unwrap_err().to_string();
    assert!(e.contains("/api/v1/services") && e.contains("items is not a list"), "{e}");

    // Without permission to list: an error naming the refusal; a plane started so runs on.
    *api.cluster.lock().unwrap() = None;
    let e = trellis_control::services::list_table(&api.reviewer()).await.unwrap_err().to_string();
    assert!(e.contains("403") && e.contains("forbidden"), "{e}");
}
