//! mTLS over 127.0.0.1 with real rustls handshakes: the right identities get through, and
//! every way a certificate can be wrong fails with its own precise error on the side that
//! verifies it.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use trellis_identity::{ClientAuth, VerifyError, client_config, server_config};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

/// An inbound-style server for `API` and an outbound-style client for `WEB` expecting `API`.
fn good_pair(
    ca: &TestCa,
) -> (Arc<trellis_identity::rustls::ServerConfig>, Arc<trellis_identity::rustls::ClientConfig>) {
    let server = server_config(ca.store(API), &ca.bundle, &[td("cluster.local")], ClientAuth::Required).unwrap();
    let client = client_config(Some(ca.store(WEB)), &ca.bundle, id(API)).unwrap();
    (Arc::new(server), Arc::new(client))
}

#[tokio::test]
async fn right_identities_succeed_and_server_learns_peer() {
    let ca = TestCa::new("cluster.local");
    let (server, client) = good_pair(&ca);
    let out = handshake(server, client).await;
    assert_eq!(out.server, Ok(id(WEB)));
    assert_eq!(out.client, Ok(()));
}

#[tokio::test]
async fn intermediate_ca_chain_verifies() {
    let root = TestCa::new("cluster.local");
    let inter = TestCa::wrap(root.ca.create_intermediate(HOUR * 2).unwrap());
    // Verifiers trust only the root; the intermediate travels in the SVID chain.
    assert_eq!(inter.bundle, root.bundle);
    let server = server_config(inter.store(API), &root.bundle, &[td("cluster.local")], ClientAuth::Required).unwrap();
    let client = client_config(Some(inter.store(WEB)), &root.bundle, id(API)).unwrap();
    let out = handshake(Arc::new(server), Arc::new(client)).await;
    assert_eq!(out.server, Ok(id(WEB)));
    assert_eq!(out.client, Ok(()));
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let ca = TestCa::new("cluster.local");
    let (server, _) = good_pair(&ca);
    let client = client_config(None, &ca.bundle, id(API)).unwrap();
    let out = handshake(server, Arc::new(client)).await;
    assert_eq!(out.server, Err(VerifyError::NoCertificate));
    assert!(out.client.is_err());
}

#[tokio::test]
async fn client_cert_from_foreign_ca_is_unknown_issuer() {
    let ca = TestCa::new("cluster.local");
    let foreign = TestCa::new("cluster.local");
    let (server, _) = good_pair(&ca);
    // The rogue trusts our root for the server but presents a foreign-CA SVID.
    let client = client_config(Some(foreign.store(WEB)), &ca.bundle, id(API)).unwrap();
    let out = handshake(server, Arc::new(client)).await;
    assert_eq!(out.server, Err(VerifyError::UnknownIssuer));
    assert!(out.client.is_err());
}

#[tokio::test]
async fn server_cert_from_foreign_ca_is_unknown_issuer() {
    let ca = TestCa::new("cluster.local");
    let foreign = TestCa::new("cluster.local");
    let server = server_config(foreign.store(API), &ca.bundle, &[td("cluster.local")], ClientAuth::Required).unwrap();
    let client = client_config(Some(ca.store(WEB)), &ca.bundle, id(API)).unwrap();
    let out = handshake(Arc::new(server), Arc::new(client)).await;
    assert_eq!(out.client, Err(VerifyError::UnknownIssuer));
}

#[tokio::test]
async fn expired_client_svid_is_refused() {
    let ca = TestCa::new("cluster.local");
    let (server, _) = good_pair(&ca);
    let two_hours_ago = SystemTime::now() - HOUR * 2;
    let old = ca.svid_at(WEB, HOUR, two_hours_ago);
    let client = raw_client(Some(svid_parts(&old)), &ca.bundle, API);
    let out = handshake(server, client).await;
    assert_eq!(out.server, Err(VerifyError::Expired));
}

#[tokio::test]
async fn expired_server_svid_is_refused() {
    let ca = TestCa::new("cluster.local");
    let old = ca.svid_at(API, HOUR, SystemTime::now() - HOUR * 2);
    let (chain, key) = svid_parts(&old);
    let server = raw_server(chain, key, &ca.bundle, &["cluster.local"]);
    let client = client_config(Some(ca.store(WEB)), &ca.bundle, id(API)).unwrap();
    let out = handshake(server, Arc::new(client)).await;
    assert_eq!(out.client, Err(VerifyError::Expired));
}

#[tokio::test]
async fn not_yet_valid_svid_is_refused() {
    let ca = TestCa::new("cluster.local");
    let (server, _) = good_pair(&ca);
    // Issued "one hour from now": notBefore = now + 1h - skew, still in the future.
    let future = ca.svid_at(WEB, HOUR, SystemTime::now() + HOUR);
    let client = raw_client(Some(svid_parts(&future)), &ca.bundle, API);
    let out = handshake(server, client).await;
    assert_eq!(out.server, Err(VerifyError::NotYetValid));
}

#[tokio::test]
async fn server_presenting_another_id_is_refused() {
    let ca = TestCa::new("cluster.local");
    let server = server_config(ca.store(WEB), &ca.bundle, &[td("cluster.local")], ClientAuth::Required).unwrap();
    let client = client_config(Some(ca.store(WEB)), &ca.bundle, id(API)).unwrap();
    let out = handshake(Arc::new(server), Arc::new(client)).await;
    assert_eq!(out.client, Err(VerifyError::IdMismatch { expected: id(API), presented: id(WEB) }));
}

#[tokio::test]
async fn cert_without_uri_san_is_refused() {
    let ca = TestCa::new("cluster.local");
    let (server, _) = good_pair(&ca);
    let client = raw_client(Some(ca.raw_leaf(vec![], false)), &ca.bundle, API);
    let out = handshake(server, client).await;
    assert_eq!(out.server, Err(VerifyError::NoUriSan));
}

#[tokio::test]
async fn cert_with_two_uri_sans_is_refused() {
    let ca = TestCa::new("cluster.local");
    let (server, _) = good_pair(&ca);
    let client = raw_client(Some(ca.raw_leaf(vec![uri(WEB), uri(API)], false)), &ca.bundle, API);
    let out = handshake(server, client).await;
    assert_eq!(out.server, Err(VerifyError::MultipleUriSans(2)));
}

#[tokio::test]
async fn cert_with_only_dns_san_is_refused() {
    let ca = TestCa::new("cluster.local");
    let (server, _) = good_pair(&ca);
    let client = raw_client(Some(ca.raw_leaf(vec![dns("web.shop.svc")], false)), &ca.bundle, API);
    let out = handshake(server, client).await;
    assert_eq!(out.server, Err(VerifyError::NoUriSan));
}

#[tokio::test]
async fn server_cert_with_only_dns_san_is_refused() {
    let ca = TestCa::new("cluster.local");
    let (chain, key) = ca.raw_leaf(vec![dns("127.0.0.1"), dns("api.shop.svc")], false);
    let server = raw_server(chain, key, &ca.bundle, &["cluster.local"]);
    let client = client_config(Some(ca.store(WEB)), &ca.bundle, id(API)).unwrap();
    let out = handshake(server, Arc::new(client)).await;
    assert_eq!(out.client, Err(VerifyError::NoUriSan));
}

#[tokio::test]
async fn ca_certificate_used_as_leaf_is_refused() {
    let ca = TestCa::new("cluster.local");
    let (server, _) = good_pair(&ca);
    let client = raw_client(Some(ca.raw_leaf(vec![uri(WEB)], true)), &ca.bundle, API);
    let out = handshake(server, client).await;
    assert_eq!(out.server, Err(VerifyError::NotALeaf));
}

/// A workload minting certificates with its own SVID as the issuer (an impersonation
/// attempt: `[forged admin leaf, real web SVID]`) is refused as a chain to no trusted CA,
/// with that reason, not as an unclassified failure.
#[tokio::test]
async fn a_leaf_signed_by_another_leaf_is_unknown_issuer() {
    use rcgen::{CertificateParams, DistinguishedName, Issuer, KeyPair};
    let ca = TestCa::new("cluster.local");
    let (server, _) = good_pair(&ca);
    let (real, real_key) = ca.raw_leaf(vec![uri(WEB)], false);
    let issuer = Issuer::from_ca_cert_der(&real[0], KeyPair::try_from(&real_key).unwrap()).unwrap();
    let forged_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![uri("spiffe://cluster.local/ns/shop/sa/admin")];
    let forged = params.signed_by(&forged_key, &issuer).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(forged_key.serialize_der().into());
    let client = raw_client(Some((vec![forged.der().clone(), real[0].clone()], key)), &ca.bundle, API);
    let out = handshake(server, client).await;
    assert_eq!(out.server, Err(VerifyError::UnknownIssuer));
}

#[tokio::test]
async fn uri_san_that_is_not_spiffe_is_refused() {
    let ca = TestCa::new("cluster.local");
    let (server, _) = good_pair(&ca);
    let client = raw_client(Some(ca.raw_leaf(vec![uri("https://web.shop")], false)), &ca.bundle, API);
    let out = handshake(server, client).await;
    assert!(matches!(out.server, Err(VerifyError::InvalidSpiffeId(_))), "{:?}", out.server);
}

#[tokio::test]
async fn different_trust_domain_is_refused_by_server() {
    let ca = TestCa::new("cluster.local");
    let (server, _) = good_pair(&ca);
    // Same CA, so the chain is fine: only the trust domain is wrong.
    let client = client_config(Some(ca.store("spiffe://other.mesh/ns/shop/sa/web")), &ca.bundle, id(API)).unwrap();
    let out = handshake(server, Arc::new(client)).await;
    assert_eq!(
        out.server,
        Err(VerifyError::WrongTrustDomain { expected: "cluster.local".into(), presented: "other.mesh".into() })
    );
}

#[tokio::test]
async fn different_trust_domain_is_refused_by_client() {
    let ca = TestCa::new("cluster.local");
    let other = "spiffe://other.mesh/ns/shop/sa/api";
    let server = server_config(ca.store(other), &ca.bundle, &[td("cluster.local")], ClientAuth::Required).unwrap();
    let client = client_config(Some(ca.store(WEB)), &ca.bundle, id(API)).unwrap();
    let out = handshake(Arc::new(server), Arc::new(client)).await;
    assert_eq!(
        out.client,
        Err(VerifyError::WrongTrustDomain { expected: "cluster.local".into(), presented: "other.mesh".into() })
    );
}

#[tokio::test]
async fn optional_client_auth_admits_anonymous_clients() {
    let ca = TestCa::new("cluster.local");
    let server = server_config(ca.store(API), &ca.bundle, &[td("cluster.local")], ClientAuth::Optional).unwrap();
    let client = client_config(None, &ca.bundle, id(API)).unwrap();
    let out = handshake(Arc::new(server), Arc::new(client)).await;
    // Handshake and round trip succeed; there is simply no peer identity.
    assert_eq!(out.server, Err(VerifyError::NoCertificate));
    assert_eq!(out.client, Ok(()));
}

#[tokio::test]
async fn tls12_only_client_is_refused() {
    // A TLS 1.2 peer (what old proxies and scanners try) cannot talk to a Trellis listener.
    let ca = TestCa::new("cluster.local");
    let (server, _) = good_pair(&ca);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio_rustls::TlsAcceptor::from(server).accept(tcp).await.err()
    });
    // Hand-written TLS 1.2-only ClientHello: legacy_version 0x0303, no supported_versions ext.
    let hello: &[u8] = &[
        0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03, // record + handshake hdr
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,    // random
        0x00, // session id
        0x00, 0x02, 0xc0, 0x2b, // cipher suites: ECDHE-ECDSA-AES128-GCM-SHA256
        0x01, 0x00, // compression null
        0x00, 0x00, // no extensions
    ];
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, hello).await.unwrap();
    let err = srv.await.unwrap().expect("TLS 1.2 hello must fail");
    let msg = err.to_string();
    assert!(msg.contains("version") || msg.contains("Version") || msg.contains("incompatible"), "{msg}");
}

#[tokio::test]
async fn rotation_keeps_open_connections_and_new_handshakes_see_new_cert() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = TestCa::new("cluster.local");
    let server_store = ca.store(API);
    let first_serial =
        trellis_identity::CertInfo::parse(&server_store.current().unwrap().svid.chain()[0]).unwrap().serial_hex;
    let server = Arc::new(
        server_config(server_store.clone(), &ca.bundle, &[td("cluster.local")], ClientAuth::Required).unwrap(),
    );
    let client = Arc::new(client_config(Some(ca.store(WEB)), &ca.bundle, id(API)).unwrap());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    // An echo server that serves many connections, like a listener that is never restarted.
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut tls = acceptor.accept(tcp).await.unwrap();
                let mut buf = [0u8; 64];
                loop {
                    let n = tls.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    tls.write_all(&buf[..n]).await.unwrap();
                }
            });
        }
    });
    let connect = || {
        let client = client.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(client)
                .connect(trellis_identity::pki_types::ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .unwrap()
        }
    };
    let serial_of = |tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        let cert = &tls.get_ref().1.peer_certificates().unwrap()[0];
        trellis_identity::CertInfo::parse(cert).unwrap().serial_hex
    };
    async fn echo(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>, msg: &[u8]) {
        tls.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
    }

    let mut before = connect().await;
    echo(&mut before, b"before rotation").await;
    assert_eq!(serial_of(&before), first_serial);

    // Rotate while `before` is open and handshakes are running concurrently.
    let racing: Vec<_> = (0..8).map(|_| tokio::spawn(connect())).collect();
    server_store.set(ca.svid(API)).unwrap();
    for r in racing {
        let mut tls = r.await.expect("no handshake fails during rotation");
        echo(&mut tls, b"during").await;
    }

    let mut after = connect().await;
    echo(&mut after, b"after rotation").await;
    assert_ne!(serial_of(&after), first_serial, "new handshakes present the new SVID");
    echo(&mut before, b"old connection still works").await;
    let _ = Duration::ZERO;
}

#[tokio::test]
async fn deferred_client_auth_completes_the_handshake_and_leaves_the_verdict_to_the_app() {
    use trellis_identity::pki_types::UnixTime;
    let ca = TestCa::new("cluster.local");
    let server =
        Arc::new(server_config(ca.store(API), &ca.bundle, &[td("cluster.local")], ClientAuth::Deferred).unwrap());
    let checker = trellis_identity::client_verifier(&ca.bundle, &[td("cluster.local")], false).unwrap();
    let foreign = TestCa::new("cluster.local");
    let cases = [
        (svid_parts(&ca.svid_at(WEB, HOUR, SystemTime::now() - HOUR * 2)), Err(VerifyError::Expired)),
        (svid_parts(&foreign.svid(WEB)), Err(VerifyError::UnknownIssuer)),
        (svid_parts(&ca.svid(WEB)), Ok(id(WEB))),
    ];
    for (creds, verdict) in cases {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.expect("the handshake itself succeeds");
            tls.get_ref().1.peer_certificates().unwrap().iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>()
        });
        let client = raw_client(Some(creds), &ca.bundle, API);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _tls = tokio_rustls::TlsConnector::from(client)
            .connect(trellis_identity::pki_types::ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .unwrap();
        let chain = srv.await.unwrap();
        assert_eq!(checker.verify_chain(&chain, UnixTime::now()), verdict);
    }
}
