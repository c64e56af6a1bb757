//! The control plane end to end over loopback HTTPS: bootstrap, every refusal, renewal,
//! admin authentication, all-or-nothing policy applies, and restarts.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use http::StatusCode;
use trellis_control::api::{CheckRequest, RenewRequest, TokenRequest};
use trellis_control::server::Hooks;
use trellis_control::store::{Actor, TokenRecord, now_unix};
use trellis_control::{ClientError, ControlConfig, tokens};
use trellis_identity::{CredentialStore, Svid, WorkloadKey};

#[tokio::test]
async fn bootstrap_with_token_issues_svid_and_registers_addresses() {
    let plane = Plane::start().await;
    let token = plane.token(WEB).await;
    let (key, mut req) = bootstrap_request(&token, WEB);
    req.addresses = vec!["10.1.2.3".into(), "10.1.2.3:15006".into()];
    let resp = plane.anonymous().bootstrap(&req).await.unwrap();
    assert_eq!(resp.spiffe_id, id(WEB));
    let chain = trellis_identity::pem::certs_from_pem("chain", resp.chain_pem.as_bytes()).unwrap();
    let svid = key.into_svid(chain).unwrap();
    assert_eq!(svid.id(), &id(WEB));
    assert_eq!(resp.bundle_pem, plane.bundle().to_pem());
    let registry = plane.running.shared.registry.load();
    assert_eq!(registry.resolve("10.1.2.3:9999".parse().unwrap()), Some(&id(WEB)));
}

/// A workload cannot take the address of another that keeps renewing it, from elsewhere:
/// the bootstrap is refused (409) before its token is spent, a renewal is signed but leaves
/// the address out. (Every request here comes from 127.0.0.1, not from 10.9.9.9.)
#[tokio::test]
async fn an_address_another_workload_holds_is_not_taken_over() {
    const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
    const EVIL: &str = "spiffe://cluster.local/ns/evil/sa/evil";
    let plane = Plane::start().await;
    let token = plane.token(DB).await;
    let (_, mut req) = bootstrap_request(&token, DB);
    req.addresses = vec!["10.9.9.9".into()];
    plane.anonymous().bootstrap(&req).await.unwrap();

    let token = plane.token(EVIL).await;
    let (_, mut req) = bootstrap_request(&token, EVIL);
    req.addresses = vec!["10.6.6.6".into(), "10.9.9.9".into()];
    let (status, msg) = api_error(plane.anonymous().bootstrap(&req).await);
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(msg.contains("10.9.9.9 is registered to spiffe://cluster.local/ns/shop/sa/db"), "{msg}");
    let registry = plane.running.shared.registry.load();
    assert_eq!(registry.resolve("10.9.9.9:5432".parse().unwrap()), Some(&id(DB)));
    assert_eq!(registry.resolve("10.6.6.6:80".parse().unwrap()), None, "refused whole");
    // The token was not spent: without the address, it bootstraps.
    req.addresses = vec!["10.6.6.6".into()];
    plane.anonymous().bootstrap(&req).await.unwrap();

    let csr_pem = trellis_identity::pem::csr_to_pem(&WorkloadKey::generate().unwrap().csr(&id(EVIL)).unwrap());
    let renewal = RenewRequest { csr_pem, addresses: vec!["10.9.9.9".into(), "10.6.6.7".into()] };
    plane.workload(EVIL).renew(&renewal).await.unwrap();
    let registry = plane.running.shared.registry.load();
    assert_eq!(registry.resolve("10.9.9.9:5432".parse().unwrap()), Some(&id(DB)));
    assert_eq!(registry.resolve("10.6.6.7:80".parse().unwrap()), Some(&id(EVIL)));
}

/// Policy names are cluster-wide: a same-named policy from another namespace, or of another
/// kind, does not silently replace the stored one (each namespace's `deny-all`).
#[tokio::test]
async fn a_same_named_policy_of_another_namespace_or_kind_is_refused() {
    let plane = Plane::start().await;
    let admin = plane.admin();
    let deny_all = |ns: &str| {
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-all, namespace: {ns}}}\n\
             spec: {{selector: 'spiffe://cluster.local/ns/{ns}/*', action: DENY, rules: [{{}}]}}\n"
        )
    };
    admin.apply_policies(deny_all("a")).await.unwrap();
    // The answer's message and each detail's, one per line.
    let refused = |r: Result<trellis_control::store::ApplyOutcome, ClientError>| {
        let Err(ClientError::Api { status, body }) = r else { panic!("{r:?}") };
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let details = body.details.iter().map(|d| format!("{}: {}: {}", d.document, d.path, d.message));
        std::iter::once(body.error).chain(details).collect::<Vec<_>>()
    };
    let msg = refused(admin.apply_policies(deny_all("b")).await).join("\n");
    assert!(msg.contains(r#"policy "deny-all" is stored with namespace "a", and this one has namespace "b""#), "{msg}");
    assert!(msg.contains("nothing was applied"), "{msg}");
    let egress = "apiVersion: trellis.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: deny-all, namespace: a}\n\
                  spec: {selector: 'spiffe://cluster.local/ns/a/*', rules: [{to: [{ports: [53]}]}]}\n";
    let msg = refused(admin.apply_policies(egress.into()).await).join("\n");
    assert!(msg.contains("stored as an AuthorizationPolicy, and this one is an EgressPolicy"), "{msg}");
    // Told in one answer with the file's other problems, not after they are mended.
    let typo = deny_all("c").replace("deny-all", "deny-c").replace("cluster.local", "cluster.locl");
    let lines = refused(admin.apply_policies(format!("{egress}---\n{typo}")).await);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines[0].starts_with("policy file refused: 2 problem(s)"), "{lines:#?}");
    assert!(lines.iter().any(|l| l.starts_with("deny-c: spec.selector: spiffe://cluster.locl/")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.starts_with("deny-all: metadata: policy \"deny-all\" is stored as")), "{lines:#?}");
    let list = admin.list_policies().await.unwrap();
    assert_eq!((list.version, list.policies[0].selector.as_str()), (1, "spiffe://cluster.local/ns/a/*"));
    // The same namespace and kind is an ordinary update.
    assert_eq!(admin.apply_policies(deny_all("a").replace("DENY", "ALLOW")).await.unwrap().version, 2);
}

#[tokio::test]
async fn reused_token_is_refused() {
    let plane = Plane::start().await;
    let token = plane.token(WEB).await;
    plane.anonymous().bootstrap(&bootstrap_request(&token, WEB).1).await.unwrap();
    let (status, msg) = api_error(plane.anonymous().bootstrap(&bootstrap_request(&token, WEB).1).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(msg.contains("already been used"), "{msg}");
}

#[tokio::test]
async fn expired_and_unknown_tokens_are_refused() {
    let plane = Plane::start().await;
    let secret = tokens::mint();
    let record = TokenRecord { spiffe_id: id(WEB), created: now_unix() - 100, expires: now_unix() - 1, used: None };
    let actor = Actor { principal: "test".into(), remote: "-".into() };
    plane.running.shared.store.insert_token(&tokens::hash(&secret), &record, &actor).unwrap();
    let (status, msg) = api_error(plane.anonymous().bootstrap(&bootstrap_request(&secret, WEB).1).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(msg.contains("expired"), "{msg}");

    let (status, msg) = api_error(plane.anonymous().bootstrap(&bootstrap_request(&tokens::mint(), WEB).1).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(msg.contains("unknown"), "{msg}");
}

#[tokio::test]
async fn csr_for_another_id_is_refused_and_token_not_spent() {
    let plane = Plane::start().await;
    let token = plane.token(WEB).await;
    let (_, req) = bootstrap_request(&token, "spiffe://cluster.local/ns/kube-system/sa/admin");
    let (status, msg) = api_error(plane.anonymous().bootstrap(&req).await);
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(msg.contains("entitled only to spiffe://cluster.local/ns/shop/sa/web"), "{msg}");
    // The token was not spent by the refused attempt.
    plane.anonymous().bootstrap(&bootstrap_request(&token, WEB).1).await.unwrap();
}

#[tokio::test]
async fn malformed_bootstrap_bodies_get_400() {
    let plane = Plane::start().await;
    let token = plane.token(WEB).await;
    let (_, mut req) = bootstrap_request(&token, WEB);
    req.csr_pem = "not a csr".into();
    let (status, msg) = api_error(plane.anonymous().bootstrap(&req).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(msg.contains("csr_pem"), "{msg}");
    let (_, mut req) = bootstrap_request(&token, WEB);
    req.addresses = vec!["not-an-ip".into()];
    let (status, msg) = api_error(plane.anonymous().bootstrap(&req).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(msg.contains("not-an-ip"), "{msg}");
    for (bad, why) in [
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("10.0.0.1:0", "port 0"),
    ] {
        let (_, mut req) = bootstrap_request(&token, WEB);
        req.addresses = vec![bad.into()];
        let (status, msg) = api_error(plane.anonymous().bootstrap(&req).await);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(msg.contains(bad) && msg.contains(why), "{bad}: {msg}");
    }
    let raw = plane
        .anonymous()
        .call(http::Method::POST, "/v1/svid/bootstrap", Some("{nope".into()), "application/json")
        .await;
    let (status, msg) = api_error(raw);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(msg.contains("malformed JSON"), "{msg}");
}

#[tokio::test]
async fn renewal_with_current_svid_works() {
    let plane = Plane::start().await;
    let client = plane.workload(WEB);
    let key = WorkloadKey::generate().unwrap();
    let csr_pem = trellis_identity::pem::csr_to_pem(&key.csr(&id(WEB)).unwrap());
    let resp = client.renew(&RenewRequest { csr_pem, addresses: vec![] }).await.unwrap();
    assert_eq!(resp.spiffe_id, id(WEB));
    assert!(resp.expires_at > now_unix() + 3000);
}

#[tokio::test]
async fn renewal_refusals() {
    let plane = Plane::start().await;
    let csr_for = |who: &str| {
        let key = WorkloadKey::generate().unwrap();
        RenewRequest { csr_pem: trellis_identity::pem::csr_to_pem(&key.csr(&id(who)).unwrap()), addresses: vec![] }
    };
    // No SVID at all.
    let (status, msg) = api_error(plane.anonymous().renew(&csr_for(WEB)).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(msg.contains("requires a client SVID"), "{msg}");
    // A CSR for someone else.
    let (status, msg) = api_error(plane.workload(WEB).renew(&csr_for(API)).await);
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(msg.contains("entitled only to"), "{msg}");
    // An expired SVID.
    let old = plane.svid_at(WEB, Duration::from_secs(3600), SystemTime::now() - Duration::from_secs(7200));
    let client = plane.client_with(Some(CredentialStore::with(old).unwrap()), None);
    let (status, msg) = api_error(client.renew(&csr_for(WEB)).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(msg.contains("expired"), "{msg}");
    // An SVID from a foreign CA.
    let foreign = Plane::start().await;
    let svid: Svid = foreign.svid_at(WEB, Duration::from_secs(3600), SystemTime::now());
    let client = plane.client_with(Some(CredentialStore::with(svid).unwrap()), None);
    let (status, msg) = api_error(client.renew(&csr_for(WEB)).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(msg.contains("not issued by this control plane"), "{msg}");
}

#[tokio::test]
async fn every_admin_endpoint_requires_the_admin_token() {
    let plane = Plane::start().await;
    let wrong = plane.client_with(None, Some("0".repeat(64)));
    let before_audit = plane.running.shared.store.audit(0, 100).unwrap();
    for client in [plane.anonymous(), wrong] {
        let calls: Vec<(http::Method, &str, Option<&str>)> = vec![
            (http::Method::POST, "/v1/tokens", Some(r#"{"spiffe_id":"spiffe://cluster.local/ns/a/sa/b"}"#)),
            (http::Method::GET, "/v1/policies", None),
            (http::Method::POST, "/v1/policies", Some(POLICY)),
            (http::Method::GET, "/v1/policies/api-from-web", None),
            (http::Method::DELETE, "/v1/policies/api-from-web", None),
            (http::Method::POST, "/v1/check", Some(r#"{"to":"spiffe://cluster.local/ns/a/sa/b","port":80}"#)),
            (http::Method::GET, "/v1/workloads", None),
            (http::Method::GET, "/v1/audit", None),
        ];
        for (method, path, body) in calls {
            let r = client.call(method.clone(), path, body.map(|b| b.to_string().into()), "application/json").await;
            let (status, msg) = api_error(r);
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert!(msg.contains("admin token"), "{msg}");
        }
    }
    assert_eq!(plane.running.shared.store.version().unwrap(), 0, "nothing applied");
    assert_eq!(plane.running.shared.store.audit(0, 100).unwrap(), before_audit, "no token created");
}

#[tokio::test]
async fn invalid_policy_file_is_refused_whole_with_field_errors() {
    let plane = Plane::start().await;
    plane.admin().apply_policies(POLICY.into()).await.unwrap();
    let bad = format!(
        "{POLICY}\n---\napiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: second}}\nspec:\n  selector: spiffe://cluster.local/ns/shop/sa/db\n  rules:\n    - to:\n        - ports: [70000]\n"
    )
    .replace("ports: [8080]", "ports: [8081]");
    let err = plane.admin().apply_policies(bad).await.unwrap_err();
    let ClientError::Api { status, body } = err else { panic!("{err:?}") };
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.error.contains("nothing was applied"), "{}", body.error);
    assert!(
        body.details.iter().any(|d| d.path.contains("spec.rules[0].to[0].ports") && d.document == "second"),
        "{body:?}"
    );
    // The store is unchanged: the first document's edit (8080 -> 8081) did not land either.
    assert_eq!(plane.running.shared.store.version().unwrap(), 1);
    let stored = plane.admin().get_policy("api-from-web").await.unwrap();
    assert!(serde_json::to_string(&stored).unwrap().contains("8080"));

    // Patterns outside the mesh's trust domain (a typo) could never match: refused, named.
    let typo = POLICY.replace("spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.locl/ns/shop/sa/web");
    let err = plane
        .admin()
        .apply_policies(typo.replace("spiffe://cluster.local/ns/shop/sa/api", "spiffe://other.td/ns/a/*"))
        .await
        .unwrap_err();
    let ClientError::Api { status, body } = err else { panic!("{err:?}") };
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let details: Vec<_> = body.details.iter().map(|d| (d.path.as_str(), d.message.as_str())).collect();
    assert_eq!(
        details,
        [
            (
                "spec.selector",
                "spiffe://other.td/ns/a/* is not in this mesh's trust domain cluster.local, so it can never match"
            ),
            (
                "spec.rules[0].from[0].identity",
                "spiffe://cluster.locl/ns/shop/sa/web is not in this mesh's trust domain cluster.local, so it can never match"
            ),
        ]
    );
    assert_eq!(plane.running.shared.store.version().unwrap(), 1);
}

#[tokio::test]
async fn apply_versions_each_change_and_audits_it() {
    let plane = Plane::start().await;
    let admin = plane.admin();
    let first = admin.apply_policies(POLICY.into()).await.unwrap();
    assert_eq!((first.version, first.created.as_slice()), (1, ["api-from-web".to_string()].as_slice()));
    let again = admin.apply_policies(POLICY.into()).await.unwrap();
    assert_eq!(again.version, 1, "an identical apply is not a change");
    assert_eq!(again.unchanged, ["api-from-web"]);
    let edited = admin.apply_policies(POLICY.replace("8080", "9090")).await.unwrap();
    assert_eq!((edited.version, edited.configured.as_slice()), (2, ["api-from-web".to_string()].as_slice()));
    let list = admin.list_policies().await.unwrap();
    assert_eq!(list.version, 2);
    assert_eq!(list.policies[0].name, "api-from-web");
    let deleted = admin.delete_policy("api-from-web").await.unwrap();
    assert_eq!(deleted["version"], 3);
    let (status, _) = api_error(admin.delete_policy("api-from-web").await);
    assert_eq!(status, StatusCode::NOT_FOUND);
    let audit = admin.audit(0).await.unwrap();
    let actions: Vec<_> = audit.iter().map(|e| (e.action.as_str(), e.version)).collect();
    assert_eq!(actions, [("policy.apply", 1), ("policy.apply", 2), ("policy.delete", 3)]);
    assert!(audit.iter().all(|e| e.actor.principal == "admin" && e.actor.remote.starts_with("127.0.0.1")));
}

#[tokio::test]
async fn live_check_matches_policy_and_registry() {
    let plane = Plane::start().await;
    let admin = plane.admin();
    admin.apply_policies(POLICY.into()).await.unwrap();
    let check = |from: &str, port| CheckRequest {
        from: Some(id(from)),
        to: Some(id(API)),
        port: Some(port),
        ..CheckRequest::default()
    };
    let allow = admin.check(&check(WEB, 8080)).await.unwrap();
    assert_eq!(allow.decision["action"], "allow");
    assert_eq!(allow.version, 1);
    let (status, msg) = api_error(admin.check(&check(WEB, 0)).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(msg.contains("port 0"), "{msg}");
    let deny = admin.check(&check("spiffe://cluster.local/ns/shop/sa/evil", 8080)).await.unwrap();
    assert_eq!(deny.decision["action"], "deny");
    // An address in the registry resolves to its workload.
    plane.running.shared.store.register_endpoints(&id(API), &["10.0.0.9".into()], &FROM_ITSELF).unwrap();
    plane.running.shared.reload_registry().unwrap();
    let via_addr = CheckRequest { from: Some(id(WEB)), to_address: Some("10.0.0.9:8080".into()), ..Default::default() };
    let r = admin.check(&via_addr).await.unwrap();
    assert_eq!((r.resolved, r.decision["action"].as_str()), (Some(id(API)), Some("allow")));
    // A VM's listener (`--inbound 10.0.0.7:15006=127.0.0.1:8080`) is judged at the app's port,
    // as its sidecar judges the connections it hands on; at its own port it would be denied.
    let vm = ["10.0.0.7:15006=8080", "10.0.0.7:15007=9999", "[fd00::7]:15006=8080"].map(String::from);
    plane.running.shared.store.register_endpoints(&id(API), &vm, &FROM_ITSELF).unwrap();
    plane.running.shared.reload_registry().unwrap();
    // IPv6 and IPv4-mapped spellings find the same entries (the registry stores canonical text).
    for (listener, action) in [
        ("10.0.0.7:15006", "allow"),
        ("10.0.0.7:15007", "deny"),
        ("[::ffff:10.0.0.7]:15006", "allow"),
        ("[fd00::7]:15006", "allow"),
    ] {
        let req = CheckRequest { from: Some(id(WEB)), to_address: Some(listener.into()), ..Default::default() };
        let r = admin.check(&req).await.unwrap();
        assert_eq!((r.resolved, r.decision["action"].as_str()), (Some(id(API)), Some(action)), "{listener}");
    }
    // Anything else is egress, denied by default.
    let egress =
        CheckRequest { from: Some(id(WEB)), to_address: Some("93.184.216.34:443".into()), ..Default::default() };
    assert_eq!(admin.check(&egress).await.unwrap().decision["action"], "deny");
    let (status, _) = api_error(admin.check(&CheckRequest::default()).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn token_requests_are_validated() {
    let plane = Plane::start().await;
    let admin = plane.admin();
    let other_td = TokenRequest { spiffe_id: id("spiffe://other.mesh/ns/a/sa/b"), ttl_seconds: None };
    let (status, msg) = api_error(admin.create_token(&other_td).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(msg.contains("trust domain"), "{msg}");
    let zero = TokenRequest { spiffe_id: id(WEB), ttl_seconds: Some(0) };
    assert_eq!(api_error(admin.create_token(&zero).await).0, StatusCode::BAD_REQUEST);
    let ok = admin.create_token(&TokenRequest { spiffe_id: id(WEB), ttl_seconds: Some(60) }).await.unwrap();
    assert!(ok.expires_at <= now_unix() + 60 && ok.token.len() == 64);
}

#[tokio::test]
async fn restart_keeps_ca_policies_version_tokens_and_audit() {
    let plane = Plane::start().await;
    let fingerprint = plane.running.ca_fingerprint.clone();
    let admin_token = plane.admin_token();
    plane.admin().apply_policies(POLICY.into()).await.unwrap();
    plane.admin().apply_policies(POLICY.replace("8080", "8081")).await.unwrap();
    let unused = plane.token(WEB).await;
    let audit_before = plane.running.shared.store.audit(0, 100).unwrap();

    let plane = plane.restart().await;
    assert_eq!(plane.running.ca_fingerprint, fingerprint, "same CA");
    assert_eq!(plane.admin_token(), admin_token, "same admin token");
    let list = plane.admin().list_policies().await.unwrap();
    assert_eq!((list.version, list.policies.len()), (2, 1));
    assert_eq!(plane.running.shared.store.audit(0, 100).unwrap(), audit_before);
    // A token minted before the restart still bootstraps.
    plane.anonymous().bootstrap(&bootstrap_request(&unused, WEB).1).await.unwrap();
}

/// A data dir whose store was lost (deleted, or truncated to nothing) beside the CA and
/// admin token of an earlier start is refused, not silently replaced by an empty store that
/// would tell every proxy "version 0, no policies"; with the file restored it starts as before.
#[tokio::test]
async fn a_lost_store_beside_an_earlier_ca_is_refused() {
    let plane = Plane::start().await;
    plane.admin().apply_policies(POLICY.into()).await.unwrap();
    let Plane { running, dir } = plane;
    running.shutdown().await;
    let store = dir.path().join(trellis_control::store::STORE_FILE);
    let saved = dir.path().join("saved.redb");
    std::fs::rename(&store, &saved).unwrap();
    for lost in ["missing", "empty"] {
        if lost == "empty" {
            std::fs::write(&store, b"").unwrap();
        }
        let err = trellis_control::start(config(dir.path()), trellis_control::server::Hooks::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("store (trellis.redb) is missing or empty") && err.contains("restore"), "{lost}: {err}");
        assert_eq!(std::fs::metadata(&store).map(|m| m.len()).unwrap_or(0), 0, "{lost}: no new store was created");
    }
    std::fs::rename(&saved, &store).unwrap();
    let running = trellis_control::start(config(dir.path()), trellis_control::server::Hooks::default()).await.unwrap();
    let plane = Plane { running, dir };
    assert_eq!(plane.admin().list_policies().await.unwrap().version, 1);
}

/// The mirror case: the store is there but the CA is gone (files deleted, or a start without
/// the --ca-cert of the earlier ones). A new CA would leave every proxy's bundle unable to
/// verify the control plane: refused, naming the CA it needs.
#[tokio::test]
async fn a_lost_ca_beside_an_earlier_store_is_refused() {
    let plane = Plane::start().await;
    let fingerprint = plane.running.ca_fingerprint.clone();
    let Plane { running, dir } = plane;
    running.shutdown().await;
    let keep = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "ca-key.pem"] {
        std::fs::rename(dir.path().join(f), keep.path().join(f)).unwrap();
    }
    let err = trellis_control::start(config(dir.path()), trellis_control::server::Hooks::default()).await.unwrap_err();
    let err = err.to_string();
    assert!(err.contains("no CA is given") && err.contains(&fingerprint), "{err}");
    assert!(!dir.path().join("ca.pem").exists(), "no new CA was made");
    for f in ["ca.pem", "ca-key.pem"] {
        std::fs::rename(keep.path().join(f), dir.path().join(f)).unwrap();
    }
    let running = trellis_control::start(config(dir.path()), trellis_control::server::Hooks::default()).await.unwrap();
    assert_eq!(running.ca_fingerprint, fingerprint);
    running.shutdown().await;
}

/// A CA given in files must name the mesh's trust domain (proxies and the CLI learn it from
/// the root): one naming none or another is refused before the data dir is touched. And once
/// a CA was given, starting without it is refused rather than going back to the data dir's
/// older ca.pem; giving that one on purpose is taken.
#[tokio::test]
async fn a_given_ca_must_be_the_meshs_and_is_not_dropped_silently() {
    let files = tempfile::tempdir().unwrap();
    let save = |ca: &trellis_identity::CertificateAuthority, name: &str| {
        let dir = files.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        ca.save(&dir).unwrap();
        (dir.join("ca.pem"), dir.join("ca-key.pem"))
    };
    let other = trellis_identity::TrustDomain::parse("other.td").unwrap();
    let foreign = save(
        &trellis_identity::CertificateAuthority::create_root(&other, Duration::from_secs(86_400)).unwrap(),
        "foreign",
    );
    // No URI SAN at all: what `openssl req -x509` makes without -addext subjectAltName.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let plain = files.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let plain_root = params.self_signed(&key).unwrap();
    std::fs::write(plain.join("ca.pem"), plain_root.pem()).unwrap();
    std::fs::write(plain.join("ca-key.pem"), key.serialize_pem()).unwrap();
    // An intermediate that names the trust domain under that root: the root is what goes
    // into bundle.pem, and it names none — refused as well.
    let inter_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut inter = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    inter.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    inter.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    inter.subject_alt_names = vec![rcgen::SanType::URI("spiffe://cluster.local".try_into().unwrap())];
    let issuer = rcgen::Issuer::new(params, key);
    let inter_cert = inter.signed_by(&inter_key, &issuer).unwrap();
    let chained = files.path().join("chained");
    std::fs::create_dir(&chained).unwrap();
    std::fs::write(chained.join("ca.pem"), format!("{}{}", inter_cert.pem(), plain_root.pem())).unwrap();
    std::fs::write(chained.join("ca-key.pem"), inter_key.serialize_pem()).unwrap();
    let data = tempfile::tempdir().unwrap();
    let fresh = data.path().join("data");
    for (ca, says) in [
        (foreign, "trust domain other.td"),
        ((plain.join("ca.pem"), plain.join("ca-key.pem")), "names no trust domain"),
        ((chained.join("ca.pem"), chained.join("ca-key.pem")), "names no trust domain"),
    ] {
        let config = ControlConfig { ca_files: Some(ca), ..config(&fresh) };
        let err = trellis_control::start(config, Hooks::default()).await.unwrap_err().to_string();
        assert!(err.contains(says) && err.contains("spiffe://cluster.local"), "{err}");
        assert!(!fresh.exists(), "a refused CA left the data dir behind");
    }

    // Started on its own CA, then given another: taken (on purpose). Then started without it.
    let plane = Plane::start().await;
    let own = plane.running.ca_fingerprint.clone();
    let Plane { running, dir } = plane;
    running.shutdown().await;
    let given = save(
        &trellis_identity::CertificateAuthority::create_root(&td(), Duration::from_secs(86_400)).unwrap(),
        "given",
    );
    let with = |files: Option<(std::path::PathBuf, std::path::PathBuf)>| ControlConfig {
        ca_files: files,
        ..config(dir.path())
    };
    let running = trellis_control::start(with(Some(given.clone())), Hooks::default()).await.unwrap();
    let new = running.ca_fingerprint.clone();
    assert_ne!(new, own);
    running.shutdown().await;
    let err = trellis_control::start(with(None), Hooks::default()).await.unwrap_err().to_string();
    assert!(err.contains(&new) && err.contains(&own) && err.contains("--ca-cert"), "{err}");
    // Going back to the data dir's own CA on purpose: given as files.
    let back = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
    let running = trellis_control::start(with(Some(back)), Hooks::default()).await.unwrap();
    assert_eq!(running.ca_fingerprint, own);
    running.shutdown().await;
    let running = trellis_control::start(with(None), Hooks::default()).await.unwrap();
    assert_eq!(running.ca_fingerprint, own, "the data dir's CA is the mesh's again");
    running.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_are_clear() {
    let plane = Plane::start().await;
    let (status, msg) = api_error(plane.anonymous().call(http::Method::GET, "/v2/nothing", None, "").await);
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(msg.contains("/v2/nothing"), "{msg}");
    let (status, _) = api_error(plane.anonymous().call(http::Method::DELETE, "/v1/svid/bootstrap", None, "").await);
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let ok = plane.anonymous().call(http::Method::GET, "/healthz", None, "").await.unwrap();
    assert_eq!(&ok[..], b"ok\n");
}

/// Each policy change (apply, delete) hands the freed heap back: the hook the binary wires to
/// `malloc_trim` runs once per change, after the new set is live; a refused apply changes nothing.
#[tokio::test]
async fn each_policy_change_releases_freed_memory() {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    fn count() -> bool {
        CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        true
    }
    let dir = tempfile::tempdir().unwrap();
    let hooks = trellis_control::server::Hooks { release_memory: Some(count), ..Default::default() };
    let running = trellis_control::start(config(dir.path()), hooks).await.unwrap();
    let plane = Plane { running, dir };
    let admin = plane.admin();
    admin.apply_policies(POLICY.into()).await.unwrap();
    assert_eq!(CALLS.load(std::sync::atomic::Ordering::SeqCst), 1);
    let (status, _) = api_error(admin.apply_policies("kind: Nope".into()).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(CALLS.load(std::sync::atomic::Ordering::SeqCst), 1, "a refused apply is not a change");
    admin.delete_policy("api-from-web").await.unwrap();
    assert_eq!(CALLS.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let plane = Plane::start().await;
    let big = "x".repeat(200 * 1024);
    let (status, _) = api_error(
        plane.anonymous().call(http::Method::POST, "/v1/svid/bootstrap", Some(big.into()), "application/json").await,
    );
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

/// An endpoint whose owner stopped registering (bootstrap, renewals) for two SVID lifetimes
/// leaves the registry, so its address is egress again; one that keeps renewing stays.
#[tokio::test]
async fn endpoints_nobody_renews_expire_from_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.svid_ttl = Duration::from_secs(1);
    let running = trellis_control::start(cfg, trellis_control::server::Hooks::default()).await.unwrap();
    let shared = running.shared.clone();
    shared.store.register_endpoints(&id(API), &["10.0.0.9".into()], &FROM_ITSELF).unwrap();
    shared.store.register_endpoints(&id(WEB), &["10.0.0.7".into()], &FROM_ITSELF).unwrap();
    shared.reload_registry().unwrap();
    let registered = shared.registry.load().version;
    assert_eq!(shared.registry.load().resolve("10.0.0.9:80".parse().unwrap()), Some(&id(API)));

    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while shared.registry.load().resolve("10.0.0.9:80".parse().unwrap()).is_some() {
        assert!(std::time::Instant::now() < deadline, "the stale endpoint never expired");
        // WEB keeps renewing, as a live proxy does.
        shared.store.register_endpoints(&id(WEB), &["10.0.0.7".into()], &FROM_ITSELF).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let registry = shared.registry.load();
    assert!(registry.version > registered, "watchers see a new registry version");
    assert_eq!(registry.resolve("10.0.0.7:80".parse().unwrap()), Some(&id(WEB)));
    running.shutdown().await;
}
