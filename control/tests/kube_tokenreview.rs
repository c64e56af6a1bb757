//! `TokenReviewer` against a fake Kubernetes API server: real HTTPS (a CA and a server
//! certificate for 127.0.0.1 minted with rcgen at test time) and real
//! `authentication.k8s.io/v1` TokenReview JSON. The fake checks what a real API server
//! checks of the caller — method, path, bearer token, body — and answers per token.

use std::time::{Duration, Instant};

use trellis_control::kube::{KubeError, KubeIdentity, TokenReviewer};

mod common;
use common::fake_kube::*;

#[tokio::test]
async fn a_pod_bound_service_account_token_is_accepted() {
    let api = start_fake_api().await;
    let id = api.reviewer().review("pod-token").await.expect("accepted");
    assert_eq!(
        id,
        KubeIdentity {
            namespace: "shop".into(),
            service_account: "checkout".into(),
            pod_name: Some("checkout-6f7c9d8b5d-x2x7q".into()),
            pod_uid: Some("9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d".into()),
        }
    );
    let id = api.reviewer().review("unbound-sa-token").await.expect("accepted");
    assert_eq!((id.namespace.as_str(), id.service_account.as_str(), id.pod_name), ("batch", "reporter", None));
}

#[tokio::test]
async fn an_invalid_token_is_rejected_with_the_api_servers_reason() {
    let api = start_fake_api().await;
    match api.reviewer().review("revoked-token").await {
        Err(KubeError::Rejected(reason)) => assert!(reason.contains("invalidated"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Refused without asking the API server, and said so.
    let empty = api.reviewer().review("  ").await;
    assert!(matches!(empty, Err(KubeError::EmptyToken)), "{empty:?}");
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused() {
    let api = start_fake_api().await;
    match api.reviewer().review("api-audience-token").await {
        Err(KubeError::WrongAudience(audiences)) => {
            assert_eq!(audiences, ["https://kubernetes.default.svc.cluster.local"]);
        }
        other => panic!("{other:?}"),
    }
    // No audiences in the answer means "valid for the API server", not for Trellis.
    assert!(
        matches!(api.reviewer().review("no-audience-token").await, Err(KubeError::WrongAudience(a)) if a.is_empty())
    );
}

#[tokio::test]
async fn users_and_nodes_are_not_service_accounts() {
    let api = start_fake_api().await;
    for (token, user) in [("user-token", "alice@example.com"), ("node-token", "system:node:worker-1")] {
        match api.reviewer().review(token).await {
            Err(KubeError::NotServiceAccount(u)) => assert_eq!(u, user),
            other => panic!("{token}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_api_url_whose_port_is_no_port_is_refused_at_start() {
    let api = start_fake_api().await;
    for bad in ["https://127.0.0.1:99999", "https://127.0.0.1:6443x", "https://127.0.0.1:"] {
        match TokenReviewer::new(bad, api.ca_pem.as_bytes(), CONTROL_PLANE_TOKEN) {
            Err(KubeError::Config(m)) => assert!(m.contains("port"), "{bad}: {m}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_api_server_that_is_down_overloaded_or_slow_is_unavailable() {
    let api = start_fake_api().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    }; // dropped: nothing listens there now
    let down = TokenReviewer::new(&format!("https://{closed}"), api.ca_pem.as_bytes(), CONTROL_PLANE_TOKEN).unwrap();
    assert!(matches!(down.review("pod-token").await, Err(KubeError::ApiUnavailable(_))));

    assert!(
        matches!(api.reviewer().review("overloaded").await, Err(KubeError::ApiUnavailable(m)) if m.contains("503"))
    );

    let started = Instant::now();
    let slow = api.reviewer().with_timeout(Duration::from_millis(300)).review("slow").await;
    assert!(matches!(slow, Err(KubeError::ApiUnavailable(_))), "{slow:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "the timeout did not bound the review");
}

#[tokio::test]
async fn an_answer_that_is_not_a_token_review_is_a_bad_response() {
    let api = start_fake_api().await;
    assert!(matches!(api.reviewer().review("garbage").await, Err(KubeError::BadResponse(_))));
}

#[tokio::test]
async fn a_control_plane_without_a_valid_api_token_is_refused_by_the_api() {
    let api = start_fake_api().await;
    let reviewer = TokenReviewer::new(&api.url(), api.ca_pem.as_bytes(), "stale-token").unwrap();
    assert!(matches!(reviewer.review("pod-token").await, Err(KubeError::ApiRefused { status: 401, .. })));
}

#[tokio::test]
async fn the_api_server_certificate_is_verified() {
    let api = start_fake_api().await;
    // Another CA: the fake's certificate does not chain to it.
    let (other_ca, _) = mint_server_cert();
    let reviewer = TokenReviewer::new(&api.url(), other_ca.as_bytes(), CONTROL_PLANE_TOKEN).unwrap();
    assert!(matches!(reviewer.review("pod-token").await, Err(KubeError::ApiUnavailable(m)) if m.contains("TLS")));
    // The right CA but another name: the certificate is for 127.0.0.1 only.
    let url = format!("https://localhost:{}", api.addr.port());
    let reviewer = TokenReviewer::new(&url, api.ca_pem.as_bytes(), CONTROL_PLANE_TOKEN).unwrap();
    assert!(matches!(reviewer.review("pod-token").await, Err(KubeError::ApiUnavailable(m)) if m.contains("TLS")));
}

#[tokio::test]
async fn in_cluster_config_reads_the_service_account_files_and_follows_token_rotation() {
    let api = start_fake_api().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.crt"), &api.ca_pem).unwrap();
    std::fs::write(dir.path().join("token"), CONTROL_PLANE_TOKEN).unwrap();
    let reviewer = TokenReviewer::in_cluster_at("127.0.0.1", &api.addr.port().to_string(), dir.path()).unwrap();
    assert!(reviewer.review("pod-token").await.is_ok());

    // The kubelet rotates the control plane's token; the API server stops accepting the old one.
    *api.accepted_bearer.lock().unwrap() = "rotated-token".into();
    std::fs::write(dir.path().join("token"), "rotated-token\n").unwrap();
    assert!(reviewer.review("pod-token").await.is_ok());
}

#[test]
fn bad_configuration_is_reported() {
    let (ca, _) = mint_server_cert();
    let config_err = |r: Result<TokenReviewer, KubeError>| matches!(r, Err(KubeError::Config(_)));
    assert!(config_err(TokenReviewer::new("http://127.0.0.1:6443", ca.as_bytes(), "t")));
    assert!(config_err(TokenReviewer::new("not a url", ca.as_bytes(), "t")));
    assert!(config_err(TokenReviewer::new("https://127.0.0.1:6443", b"not pem", "t")));
    let empty = tempfile::tempdir().expect("tempdir");
    assert!(config_err(TokenReviewer::in_cluster_at("10.96.0.1", "443", empty.path())));
    // IPv6 service hosts come bracket-less in the environment.
    std::fs::write(empty.path().join("ca.crt"), &ca).unwrap();
    std::fs::write(empty.path().join("token"), "t").unwrap();
    assert!(TokenReviewer::in_cluster_at("fd00::1", "443", empty.path()).is_ok());
}
