//! The watch stream: every connected proxy gets each change, and only the policies that
//! select it; acks show up in the workload list.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use http::StatusCode;
use trellis_control::ClientError;

fn policy(name: &str, selector: &str, port: u16) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\nspec:\n  selector: \"{selector}\"\n  rules:\n    - to:\n        - ports: [{port}]\n---\n"
    )
}

fn names(event: &trellis_control::api::WatchEvent) -> BTreeSet<String> {
    event.policies.as_ref().expect("policies present").iter().map(|p| p.name().to_string()).collect()
}

#[tokio::test]
async fn a_change_reaches_100_watchers_each_with_only_its_policies() {
    let plane = Plane::start().await;
    plane
        .admin()
        .apply_policies(policy("shop-api", "spiffe://cluster.local/ns/shop/sa/api", 80) + &policy("everyone", "*", 1))
        .await
        .unwrap();

    // 100 proxies: 50 shop/api (selected by shop-api) and 50 in other namespaces.
    let mut streams = Vec::new();
    for i in 0..100 {
        let who = if i % 2 == 0 {
            "spiffe://cluster.local/ns/shop/sa/api".to_string()
        } else {
            format!("spiffe://cluster.local/ns/team{i}/sa/svc")
        };
        let client = plane.workload(&who);
        let mut stream = client.watch().await.unwrap();
        let first = stream.next().await.unwrap();
        assert_eq!(first.version, 1);
        assert!(first.bundle_pem.is_some() && first.endpoints.is_some(), "first event is complete");
        let expected: BTreeSet<String> = if i % 2 == 0 {
            ["everyone", "shop-api"].map(String::from).into()
        } else {
            ["everyone"].map(String::from).into()
        };
        assert_eq!(names(&first), expected, "watcher {i} ({who})");
        streams.push((i, stream));
    }

    // One change that only the api watchers care about, one that all do.
    plane.admin().apply_policies(policy("shop-api", "spiffe://cluster.local/ns/shop/sa/api", 8080)).await.unwrap();
    plane.admin().apply_policies(policy("late", "spiffe://cluster.local/ns/*", 2)).await.unwrap();

    let all = streams.into_iter().map(|(i, mut stream)| {
        tokio::spawn(async move {
            // Changes may coalesce; read until this watcher reaches version 3.
            let mut last = None;
            while last.as_ref().is_none_or(|e: &trellis_control::api::WatchEvent| e.version < 3) {
                let e = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("in time").unwrap();
                assert!(e.bundle_pem.is_none(), "unchanged bundle is not resent");
                last = Some(e);
            }
            let last = last.unwrap();
            let want: BTreeSet<String> = if i % 2 == 0 {
                ["everyone", "late", "shop-api"].map(String::from).into()
            } else {
                ["everyone", "late"].map(String::from).into()
            };
            assert_eq!(names(&last), want, "watcher {i}");
            if i % 2 == 0 {
                let api = last.policies.unwrap().into_iter().find(|p| p.name() == "shop-api").unwrap();
                assert!(serde_json::to_string(&api).unwrap().contains("8080"), "watcher {i} got the new version");
            }
        })
    });
    for t in all {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn acks_show_in_workloads_and_disconnects_leave() {
    let plane = Plane::start().await;
    let who = "spiffe://cluster.local/ns/shop/sa/web";
    let client = plane.workload(who);
    let mut stream = client.watch().await.unwrap();
    let first = stream.next().await.unwrap();
    let listed = plane.admin().workloads().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].spiffe_id.as_str(), listed[0].acked_version), (who, None));
    assert!(listed[0].svid_expires_at.unwrap() > trellis_control::store::now_unix());
    assert_eq!(listed[0].address, "127.0.0.1");

    client.ack(first.session, first.version).await.unwrap();
    let listed = plane.admin().workloads().await.unwrap();
    assert_eq!(listed[0].acked_version, Some(0));

    // Someone else cannot ack this session.
    let other = plane.workload("spiffe://cluster.local/ns/shop/sa/evil");
    match other.ack(first.session, 7).await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status, StatusCode::NOT_FOUND),
        r => panic!("{r:?}"),
    }

    drop(stream);
    for _ in 0..100 {
        if plane.admin().workloads().await.unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("disconnected proxy still listed");
}

#[tokio::test]
async fn watch_without_svid_is_refused() {
    let plane = Plane::start().await;
    match plane.anonymous().watch().await {
        Err(ClientError::Api { status, body }) => {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(body.error.contains("SVID"));
        }
        r => panic!("{r:?}"),
    }
}

#[tokio::test]
async fn registry_changes_are_pushed() {
    let plane = Plane::start().await;
    let client = plane.workload("spiffe://cluster.local/ns/shop/sa/web");
    let mut stream = client.watch().await.unwrap();
    let first = stream.next().await.unwrap();
    assert_eq!(first.endpoints.as_deref(), Some(&[][..]));
    let token = plane.token("spiffe://cluster.local/ns/shop/sa/api").await;
    let (_, mut req) = bootstrap_request(&token, "spiffe://cluster.local/ns/shop/sa/api");
    req.addresses = vec!["10.9.8.7".into()];
    plane.anonymous().bootstrap(&req).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap();
    let endpoints = next.endpoints.unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].address, "10.9.8.7");
    assert!(next.policies.is_none(), "policies unchanged, not resent");
}

/// `workloads list` shows each proxy's current SVID expiry: a renewal (on its own
/// connection) updates the session of the proxy that renewed, not its replicas' (same ID).
#[tokio::test]
async fn a_renewal_shows_in_its_own_session_only() {
    use trellis_control::api::RenewRequest;
    let plane = Plane::start().await;
    let who = "spiffe://cluster.local/ns/shop/sa/web";
    let short = |ttl| {
        let creds = trellis_identity::CredentialStore::with(plane.svid_at(who, ttl, std::time::SystemTime::now()));
        plane.client_with(Some(creds.unwrap()), None)
    };
    let (renewing, replica) = (short(Duration::from_secs(600)), short(Duration::from_secs(900)));
    let mut a = renewing.watch().await.unwrap();
    let session_a = a.next().await.unwrap().session;
    let mut b = replica.watch().await.unwrap();
    let session_b = b.next().await.unwrap().session;
    let expiry = |listed: &[trellis_control::api::WorkloadStatus], session| {
        listed.iter().find(|w| w.session == session).and_then(|w| w.svid_expires_at).unwrap()
    };
    let before = plane.admin().workloads().await.unwrap();
    let key = trellis_identity::WorkloadKey::generate().unwrap();
    let csr_pem = trellis_identity::pem::csr_to_pem(&key.csr(&id(who)).unwrap());
    let renewed = renewing.renew(&RenewRequest { csr_pem, addresses: vec![] }).await.unwrap();
    let after = plane.admin().workloads().await.unwrap();
    assert_eq!(expiry(&after, session_a), renewed.expires_at);
    assert!(expiry(&after, session_a) > expiry(&before, session_a) + 2_000, "about an hour, not ten minutes");
    assert_eq!(expiry(&after, session_b), expiry(&before, session_b), "the replica did not renew");
}

/// One SVID holds at most `MAX_SESSIONS_PER_SVID` watch sessions: a newer one ends the oldest
/// (a reconnecting proxy's dead session), so a workload's SVID cannot pile up sessions without
/// bound, and the newest never waits. Replicas (same ID, same address, their own SVIDs) are not
/// counted together.
#[tokio::test]
async fn sessions_past_the_bound_end_the_oldest() {
    use trellis_control::state::MAX_SESSIONS_PER_SVID;
    let plane = Plane::start().await;
    let client = plane.workload("spiffe://cluster.local/ns/shop/sa/web");
    let mut streams = Vec::new();
    for _ in 0..MAX_SESSIONS_PER_SVID {
        let mut s = client.watch().await.unwrap();
        let session = s.next().await.unwrap().session;
        streams.push((s, session));
    }
    // A replica (its own SVID for the same ID, from the same address) is not counted with them.
    let mut other = plane.workload("spiffe://cluster.local/ns/shop/sa/web").watch().await.unwrap();
    other.next().await.unwrap();
    let mut newest = client.watch().await.unwrap();
    let newest_session = newest.next().await.unwrap().session;
    let (mut oldest, oldest_session) = streams.remove(0);
    let ended = tokio::time::timeout(Duration::from_secs(5), oldest.next()).await.expect("the oldest session ends");
    assert!(matches!(ended, Err(ClientError::StreamEnded)), "{ended:?}");
    for _ in 0..100 {
        let listed = plane.admin().workloads().await.unwrap();
        let sessions: BTreeSet<u64> = listed.iter().map(|w| w.session).collect();
        if !sessions.contains(&oldest_session) {
            assert_eq!(listed.len(), MAX_SESSIONS_PER_SVID + 1, "the bound's worth, and the replica's");
            assert!(sessions.contains(&newest_session) && streams.iter().all(|(_, s)| sessions.contains(s)));
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the oldest session is still listed");
}
