//! The CA: what it signs, what it refuses, and how it is stored.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use common::*;
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair, KeyUsagePurpose};
use trellis_identity::pki_types::CertificateSigningRequestDer;
use trellis_identity::{CaError, CertificateAuthority, CsrError, WorkloadKey};
use x509_parser::prelude::*;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn csr_with(params: CertificateParams, key: &KeyPair) -> CertificateSigningRequestDer<'static> {
    params.serialize_request(key).unwrap().der().clone()
}

fn params_with_sans(sans: Vec<rcgen::SanType>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p
}

#[test]
fn signed_svid_has_exactly_the_spiffe_shape() {
    let ca = TestCa::new("cluster.local");
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&id(WEB)).unwrap();
    let before = SystemTime::now();
    let issued = ca.ca.sign_csr(&csr, &id(WEB), Duration::from_secs(600)).unwrap();
    assert_eq!(issued.chain.len(), 1, "root-signed: leaf only");
    let (_, cert) = X509Certificate::from_der(&issued.chain[0]).unwrap();

    let san = cert.subject_alternative_name().unwrap().unwrap();
    let names: Vec<_> = san.value.general_names.iter().map(|n| n.to_string()).collect();
    assert_eq!(names, [format!("URI({WEB})")]);
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.value.digital_signature() && !ku.value.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);

    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    let now = before.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(nb <= now - 60, "notBefore is backdated for clock skew");
    assert!((na - now - 600).abs() <= 2, "TTL honoured");

    let again = ca.ca.sign_csr(&csr, &id(WEB), Duration::from_secs(600)).unwrap();
    let (_, cert2) = X509Certificate::from_der(&again.chain[0]).unwrap();
    assert_ne!(cert.raw_serial(), cert2.raw_serial(), "random serials");
    assert!(cert.raw_serial().len() >= 16);
}

#[test]
fn csr_without_san_gets_the_entitled_id() {
    let ca = TestCa::new("cluster.local");
    let key = KeyPair::generate().unwrap();
    let issued = ca.ca.sign_csr(&csr_with(params_with_sans(vec![]), &key), &id(WEB), HOUR).unwrap();
    assert_eq!(trellis_identity::cert::spiffe_id_of(&issued.chain[0]).unwrap(), id(WEB));
}

#[test]
fn refuses_csr_for_another_id() {
    let ca = TestCa::new("cluster.local");
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&id("spiffe://cluster.local/ns/kube-system/sa/admin")).unwrap();
    let err = ca.ca.sign_csr(&csr, &id(WEB), HOUR).unwrap_err();
    assert_eq!(
        err,
        CsrError::IdMismatch { requested: "spiffe://cluster.local/ns/kube-system/sa/admin".into(), entitled: id(WEB) }
    );
}

#[test]
fn refuses_csr_with_extra_sans() {
    let ca = TestCa::new("cluster.local");
    let key = KeyPair::generate().unwrap();
    let dns_too = csr_with(params_with_sans(vec![uri(WEB), dns("evil.example.com")]), &key);
    assert!(
        matches!(ca.ca.sign_csr(&dns_too, &id(WEB), HOUR), Err(CsrError::ExtraSans(s)) if s.contains("evil.example.com"))
    );
    let two_uris = csr_with(params_with_sans(vec![uri(WEB), uri("spiffe://cluster.local/ns/x/sa/y")]), &key);
    assert!(matches!(ca.ca.sign_csr(&two_uris, &id(WEB), HOUR), Err(CsrError::ExtraSans(_))));
}

#[test]
fn refuses_csr_asking_to_be_a_ca() {
    let ca = TestCa::new("cluster.local");
    let key = KeyPair::generate().unwrap();
    // basicConstraints CA:TRUE in the extension request.
    let mut p = params_with_sans(vec![uri(WEB)]);
    let mut bc = CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x03, 0x01, 0x01, 0xff]);
    bc.set_criticality(true);
    p.custom_extensions = vec![bc];
    assert_eq!(ca.ca.sign_csr(&csr_with(p, &key), &id(WEB), HOUR).unwrap_err(), CsrError::RequestsCa);
    // keyCertSign key usage is a CA request too.
    let mut p = params_with_sans(vec![uri(WEB)]);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    assert_eq!(ca.ca.sign_csr(&csr_with(p, &key), &id(WEB), HOUR).unwrap_err(), CsrError::RequestsCa);
}

#[test]
fn refuses_csr_with_bad_signature() {
    let ca = TestCa::new("cluster.local");
    let key = WorkloadKey::generate().unwrap();
    let mut der = key.csr(&id(WEB)).unwrap().as_ref().to_vec();
    // The signature is the DER's tail; flip a bit in its last byte.
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let err = ca.ca.sign_csr(&der.into(), &id(WEB), HOUR).unwrap_err();
    assert_eq!(err, CsrError::BadSignature);
}

#[test]
fn refuses_unsupported_keys() {
    let ca = TestCa::new("cluster.local");
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = KeyPair::generate_for(alg).unwrap();
        let err = ca.ca.sign_csr(&csr_with(params_with_sans(vec![uri(WEB)]), &key), &id(WEB), HOUR).unwrap_err();
        assert!(matches!(err, CsrError::UnsupportedKey(_)), "{alg:?}: {err:?}");
    }
}

#[test]
fn refuses_malformed_csr_and_bad_ttl() {
    let ca = TestCa::new("cluster.local");
    let junk: CertificateSigningRequestDer = vec![0x30, 0x03, 0x02, 0x01, 0x00].into();
    assert!(matches!(ca.ca.sign_csr(&junk, &id(WEB), HOUR), Err(CsrError::Malformed(_))));
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&id(WEB)).unwrap();
    assert_eq!(ca.ca.sign_csr(&csr, &id(WEB), Duration::ZERO).unwrap_err(), CsrError::BadTtl(Duration::ZERO));
    // Longer than the CA lives: clamped to the CA's notAfter rather than refused.
    let issued = ca.ca.sign_csr(&csr, &id(WEB), HOUR * 24 * 365).unwrap();
    assert_eq!(issued.not_after, ca.ca.not_after());
    let svid = WorkloadKey::generate().unwrap();
    let csr = svid.csr(&id(WEB)).unwrap();
    let after_ca = ca.ca.not_after() + HOUR;
    assert_eq!(ca.ca.sign_csr_at(&csr, &id(WEB), HOUR, after_ca).unwrap_err(), CsrError::CaExpired);
}

#[test]
fn save_and_load_round_trip_with_private_key_mode_0600() {
    let ca = CertificateAuthority::create_root(&td("cluster.local"), HOUR).unwrap();
    let dir = tempfile::tempdir().unwrap();
    ca.save(dir.path()).unwrap();
    let key_mode = std::fs::metadata(dir.path().join("ca-key.pem")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    let loaded =
        CertificateAuthority::load(&td("cluster.local"), &dir.path().join("ca.pem"), &dir.path().join("ca-key.pem"))
            .unwrap();
    assert_eq!(loaded.root(), ca.root());
    // The loaded CA signs SVIDs that verify against the original root.
    let key = WorkloadKey::generate().unwrap();
    let issued = loaded.sign_csr(&key.csr(&id(WEB)).unwrap(), &id(WEB), HOUR).unwrap();
    let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).unwrap();
    let (_, root) = X509Certificate::from_der(ca.root()).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();
}

#[test]
fn intermediate_saves_its_chain_and_reloads() {
    let root = CertificateAuthority::create_root(&td("cluster.local"), HOUR * 4).unwrap();
    let inter = root.create_intermediate(HOUR * 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    inter.save(dir.path()).unwrap();
    let loaded =
        CertificateAuthority::load(&td("cluster.local"), &dir.path().join("ca.pem"), &dir.path().join("ca-key.pem"))
            .unwrap();
    assert_eq!(loaded.root(), root.root());
    let key = WorkloadKey::generate().unwrap();
    let issued = loaded.sign_csr(&key.csr(&id(WEB)).unwrap(), &id(WEB), HOUR).unwrap();
    assert_eq!(issued.chain.len(), 2, "leaf + intermediate");
}

#[test]
fn load_refuses_mismatched_key_and_non_ca_and_garbage() {
    let a = CertificateAuthority::create_root(&td("cluster.local"), HOUR).unwrap();
    let b = CertificateAuthority::create_root(&td("cluster.local"), HOUR).unwrap();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    a.save(da.path()).unwrap();
    b.save(db.path()).unwrap();
    let err =
        CertificateAuthority::load(&td("cluster.local"), &da.path().join("ca.pem"), &db.path().join("ca-key.pem"))
            .unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch), "{err}");

    // A leaf certificate is not a CA.
    let ca = TestCa::new("cluster.local");
    let svid = ca.svid(WEB);
    let err =
        CertificateAuthority::from_pem(&td("cluster.local"), svid.chain_pem().as_bytes(), svid.key_pem().as_bytes())
            .unwrap_err();
    assert!(matches!(err, CaError::NotACa), "{err}");

    let err = CertificateAuthority::from_pem(&td("cluster.local"), b"not pem", b"not pem").unwrap_err();
    assert!(err.to_string().contains("CA certificate"), "{err}");
    let err =
        CertificateAuthority::load(&td("cluster.local"), &da.path().join("missing.pem"), &da.path().join("ca-key.pem"))
            .unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

#[test]
fn svid_round_trips_through_pem_and_checks_key() {
    let ca = TestCa::new("cluster.local");
    let svid = ca.svid(WEB);
    let back = trellis_identity::Svid::from_pem(svid.chain_pem().as_bytes(), svid.key_pem().as_bytes()).unwrap();
    assert_eq!(back.id(), &id(WEB));
    let other = ca.svid(WEB);
    let err = trellis_identity::Svid::from_pem(svid.chain_pem().as_bytes(), other.key_pem().as_bytes()).unwrap_err();
    assert!(matches!(err, trellis_identity::SvidError::KeyMismatch));
}

#[test]
fn renewal_is_scheduled_at_half_the_remaining_life() {
    let ca = TestCa::new("cluster.local");
    let now = SystemTime::now();
    let svid = ca.svid_at(WEB, Duration::from_secs(30), now);
    let at = svid.renew_at(now).duration_since(now).unwrap();
    assert!(at >= Duration::from_secs(14) && at <= Duration::from_secs(16), "{at:?}");
}

#[test]
fn bundle_holds_several_roots_and_round_trips() {
    let a = TestCa::new("cluster.local");
    let b = TestCa::new("cluster.local");
    let both = a.bundle.with_root(b.ca.root().clone()).unwrap();
    assert_eq!(both.roots().len(), 2);
    let back = trellis_identity::TrustBundle::from_pem(both.to_pem().as_bytes()).unwrap();
    assert_eq!(back, both);
    assert_eq!(back.trust_domain(), Some(td("cluster.local")));
    assert_eq!(both.without_root(a.ca.root()).unwrap().roots(), &[b.ca.root().clone()]);
    assert!(a.bundle.without_root(a.ca.root()).is_err(), "a bundle never becomes empty");
    assert!(trellis_identity::TrustBundle::from_pem(b"").is_err());
    let leaf = a.svid(WEB);
    assert!(trellis_identity::TrustBundle::new(leaf.chain().to_vec()).is_err(), "a leaf is not a root");
}
