//! Test fixtures: CAs, SVIDs and deliberately broken certificates, all minted with rcgen
//! at test time (no key is ever checked in), plus a loopback handshake driver.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_identity::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use trellis_identity::rustls::{ClientConfig, ServerConfig};
use trellis_identity::verify::{SpiffeClientVerifier, SpiffeServerVerifier};
use trellis_identity::{
    CertificateAuthority, CredentialStore, SpiffeId, Svid, TrustBundle, TrustDomain, VerifyError, WorkloadKey,
    crypto_provider,
};

pub const HOUR: Duration = Duration::from_secs(3600);

pub fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A fresh root CA for `trust_domain`, with its bundle.
pub struct TestCa {
    pub ca: CertificateAuthority,
    pub bundle: TrustBundle,
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> Self {
        let ca = CertificateAuthority::create_root(&td(trust_domain), 24 * HOUR).unwrap();
        Self::wrap(ca)
    }

    pub fn wrap(ca: CertificateAuthority) -> Self {
        let bundle = TrustBundle::new(vec![ca.root().clone()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        ca.save(dir.path()).unwrap();
        TestCa { ca, bundle, dir }
    }

    /// An SVID for `spiffe_id` through the real key → CSR → sign path.
    pub fn svid(&self, spiffe_id: &str) -> Svid {
        self.svid_at(spiffe_id, HOUR, SystemTime::now())
    }

    pub fn svid_at(&self, spiffe_id: &str, ttl: Duration, now: SystemTime) -> Svid {
        let key = WorkloadKey::generate().unwrap();
        let who = id(spiffe_id);
        let csr = key.csr(&who).unwrap();
        let issued = self.ca.sign_csr_at(&csr, &who, ttl, now).unwrap();
        key.into_svid(issued.chain).unwrap()
    }

    pub fn store(&self, spiffe_id: &str) -> Arc<CredentialStore> {
        CredentialStore::with(self.svid(spiffe_id)).unwrap()
    }

    /// An rcgen issuer over this CA's saved key, for minting certificates the real CA
    /// refuses to sign (no URI SAN, two URI SANs, CA leaves...).
    pub fn raw_issuer(&self) -> Issuer<'static, KeyPair> {
        let cert = std::fs::read_to_string(self.dir.path().join("ca.pem")).unwrap();
        let key = std::fs::read_to_string(self.dir.path().join("ca-key.pem")).unwrap();
        Issuer::from_ca_cert_pem(&cert, KeyPair::from_pem(&key).unwrap()).unwrap()
    }

    /// A leaf with arbitrary SANs/CA flag, signed by this CA's key.
    pub fn raw_leaf(&self, sans: Vec<SanType>, is_ca: bool) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        if is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        } else {
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.raw_issuer()).unwrap();
        (vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }
}

pub fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

pub fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

/// A server presenting an arbitrary chain, verifying clients like a Trellis inbound.
pub fn raw_server(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    bundle: &TrustBundle,
    tds: &[&str],
) -> Arc<ServerConfig> {
    let provider = crypto_provider();
    let verifier =
        SpiffeClientVerifier::new(bundle.root_store(), provider.clone(), tds.iter().map(|t| td(t)).collect(), true)
            .unwrap();
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&trellis_identity::rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
        .unwrap();
    Arc::new(cfg)
}

/// A client presenting an arbitrary chain (or none), expecting `expected`.
pub fn raw_client(
    creds: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    bundle: &TrustBundle,
    expected: &str,
) -> Arc<ClientConfig> {
    let provider = crypto_provider();
    let verifier =
        SpiffeServerVerifier::new(bundle.root_store(), provider.signature_verification_algorithms, id(expected));
    let b = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&trellis_identity::rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let cfg = match creds {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

pub fn svid_parts(svid: &Svid) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (svid.chain().to_vec(), svid.key().clone_key())
}

/// What each side of one loopback handshake saw.
#[derive(Debug)]
pub struct Outcome {
    /// The server's view: the client's SPIFFE ID, or why the handshake failed.
    pub server: Result<SpiffeId, VerifyError>,
    /// The client's view: Ok once an application round trip succeeded.
    pub client: Result<(), VerifyError>,
}

/// Runs one handshake over 127.0.0.1 and a ping/pong, reporting both sides.
pub async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| VerifyError::from_io(&e).unwrap_or(VerifyError::Other(e.to_string())))?;
        // Anonymous clients (optional client auth) still get their round trip.
        let peer = trellis_identity::peer_spiffe_id(tls.get_ref().1);
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| VerifyError::Other(e.to_string()))?;
        tls.write_all(b"pong").await.map_err(|e| VerifyError::Other(e.to_string()))?;
        tls.flush().await.map_err(|e| VerifyError::Other(e.to_string()))?;
        peer
    });
    let client = async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let io = |e: std::io::Error| VerifyError::from_io(&e).unwrap_or(VerifyError::Other(e.to_string()));
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(io)?;
        tls.write_all(b"ping").await.map_err(io)?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(io)?;
        assert_eq!(&buf, b"pong");
        Ok::<_, VerifyError>(())
    }
    .await;
    let server = srv.await.unwrap();
    Outcome { server, client }
}
