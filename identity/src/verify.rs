//! SPIFFE certificate verification for rustls, on both sides of a handshake.
//!
//! Each verifier first lets rustls' WebPKI code check what WebPKI is good at (chain to a
//! trusted root, validity period, EKU, signatures) and then checks what SPIFFE adds: the
//! leaf is not a CA, it names exactly one URI SAN, that SAN is a SPIFFE ID in an accepted
//! trust domain, and — on the client side — it is exactly the ID expected for the
//! destination. Verification is never skipped or disabled.
//!
//! Failures are returned to rustls as rustls errors (so the right TLS alert goes out) and
//! can be turned back into a [`VerifyError`] with [`VerifyError::from_rustls`] or
//! [`VerifyError::from_io`] by whoever drove the handshake.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, Error, InvalidMessage, OtherError,
    PeerIncompatible, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::cert::{CertInfo, SanError};
use crate::spiffe::{SpiffeId, TrustDomain};

/// Why a peer's certificate was not accepted, precise enough to act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("peer certificate is malformed: {0}")]
    BadEncoding(String),
    #[error("peer certificate has expired")]
    Expired,
    #[error("peer certificate is not yet valid")]
    NotYetValid,
    #[error("peer certificate is not issued by a trusted root (unknown issuer)")]
    UnknownIssuer,
    #[error("peer presented a CA certificate as its leaf")]
    NotALeaf,
    #[error("peer certificate is not valid for this purpose (extended key usage)")]
    BadPurpose,
    #[error("peer certificate signature is invalid")]
    BadSignature,
    #[error("peer certificate has no URI SAN")]
    NoUriSan,
    #[error("peer certificate has {0} URI SANs; an SVID has exactly one")]
    MultipleUriSans(usize),
    #[error("peer certificate URI SAN is not a SPIFFE ID: {0}")]
    InvalidSpiffeId(String),
    #[error("peer is in trust domain {presented}, expected {expected}")]
    WrongTrustDomain { expected: String, presented: String },
    #[error("expected peer {expected}, it presented {presented}")]
    IdMismatch { expected: SpiffeId, presented: SpiffeId },
    #[error("peer refused the handshake: {0}")]
    PeerRejected(String),
    /// The other side's first bytes were no TLS record at all (rustls: "corrupt message of
    /// type InvalidContentType"): plaintext, most often HTTP to a TLS port or TLS to a
    /// plaintext one.
    #[error("the other side does not speak TLS (its first bytes were plaintext, e.g. HTTP)")]
    Plaintext,
    /// The other side offers or accepts no TLS 1.3, the only version a sidecar speaks
    /// (`openssl s_client -tls1_2`, an old client or server).
    #[error("the peer does not speak TLS 1.3, the only version accepted")]
    ProtocolVersion,
    #[error("TLS handshake failed: {0}")]
    Other(String),
}

impl VerifyError {
    /// Classifies a rustls error raised during a handshake.
    pub fn from_rustls(err: &Error) -> Self {
        match err {
            Error::NoCertificatesPresented => VerifyError::NoCertificate,
            Error::InvalidCertificate(ce) => Self::from_certificate_error(ce),
            Error::InvalidMessage(InvalidMessage::InvalidContentType) => VerifyError::Plaintext,
            Error::AlertReceived(AlertDescription::ProtocolVersion) => VerifyError::ProtocolVersion,
            // TLS 1.2 offered without 1.3; TLS 1.0/1.1 hellos also lack signature algorithms.
            Error::PeerIncompatible(
                PeerIncompatible::Tls12NotOffered
                | PeerIncompatible::Tls12NotOfferedOrEnabled
                | PeerIncompatible::SupportedVersionsExtensionRequired
                | PeerIncompatible::SignatureAlgorithmsExtensionRequired
                | PeerIncompatible::ServerDoesNotSupportTls12Or13
                | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig,
            ) => VerifyError::ProtocolVersion,
            Error::AlertReceived(alert) => VerifyError::PeerRejected(format!("{alert:?}")),
            other => VerifyError::Other(other.to_string()),
        }
    }

    fn from_certificate_error(ce: &CertificateError) -> Self {
        match ce {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => VerifyError::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => VerifyError::NotYetValid,
            CertificateError::UnknownIssuer => VerifyError::UnknownIssuer,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                VerifyError::BadPurpose
            }
            CertificateError::BadSignature => VerifyError::BadSignature,
            CertificateError::BadEncoding => VerifyError::BadEncoding("bad DER".into()),
            CertificateError::Other(OtherError(inner)) => match inner.downcast_ref::<VerifyError>() {
                Some(ours) => ours.clone(),
                // A leaf signed by another leaf (a workload minting certificates with its own
                // SVID): the chain leads to no CA the bundle trusts.
                None if matches!(inner.downcast_ref::<webpki::Error>(), Some(webpki::Error::EndEntityUsedAsCa)) => {
                    VerifyError::UnknownIssuer
                }
                None => VerifyError::Other(inner.to_string()),
            },
            other => VerifyError::Other(format!("{other:?}")),
        }
    }

    /// Classifies the `io::Error` that tokio-rustls returns from a failed handshake.
    pub fn from_io(err: &std::io::Error) -> Option<Self> {
        let inner = err.get_ref()?;
        inner.downcast_ref::<Error>().map(Self::from_rustls)
    }

    /// A short, bounded label for metrics (`trellis_handshake_failures_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            VerifyError::NoCertificate => "no_certificate",
            VerifyError::BadEncoding(_) => "bad_encoding",
            VerifyError::Expired => "expired",
            VerifyError::NotYetValid => "not_yet_valid",
            VerifyError::UnknownIssuer => "unknown_issuer",
            VerifyError::NotALeaf => "not_a_leaf",
            VerifyError::BadPurpose => "bad_purpose",
            VerifyError::BadSignature => "bad_signature",
            VerifyError::NoUriSan => "no_uri_san",
            VerifyError::MultipleUriSans(_) => "multiple_uri_sans",
            VerifyError::InvalidSpiffeId(_) => "invalid_spiffe_id",
            VerifyError::WrongTrustDomain { .. } => "wrong_trust_domain",
            VerifyError::IdMismatch { .. } => "id_mismatch",
            VerifyError::PeerRejected(_) => "peer_rejected",
            VerifyError::ProtocolVersion => "protocol_version",
            VerifyError::Plaintext => "plaintext",
            VerifyError::Other(_) => "other",
        }
    }

    fn into_rustls(self) -> Error {
        Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

impl From<SanError> for VerifyError {
    fn from(e: SanError) -> Self {
        match e {
            SanError::NoUriSan => VerifyError::NoUriSan,
            SanError::MultipleUriSans(n) => VerifyError::MultipleUriSans(n),
            SanError::InvalidSpiffeId { uri, reason } => VerifyError::InvalidSpiffeId(format!("{uri}: {reason}")),
        }
    }
}

/// Reads the leaf, refusing CA certificates before WebPKI sees the chain.
fn check_leaf(end_entity: &CertificateDer<'_>) -> Result<CertInfo, Error> {
    let info = CertInfo::parse(end_entity).map_err(|e| VerifyError::BadEncoding(e).into_rustls())?;
    if info.is_ca {
        return Err(VerifyError::NotALeaf.into_rustls());
    }
    Ok(info)
}

/// The SPIFFE ID of an already chain-verified leaf, if it is in one of `domains`.
fn check_spiffe(info: &CertInfo, domains: &[TrustDomain]) -> Result<SpiffeId, Error> {
    let id = info.spiffe_id().map_err(|e| VerifyError::from(e).into_rustls())?;
    if !domains.iter().any(|td| td.as_str() == id.trust_domain_str()) {
        let expected = domains.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(",");
        return Err(
            VerifyError::WrongTrustDomain { expected, presented: id.trust_domain_str().to_string() }.into_rustls()
        );
    }
    Ok(id)
}

/// Client-side verifier: the server must chain to the bundle and be exactly `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    expected: SpiffeId,
    domains: [TrustDomain; 1],
}

impl SpiffeServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, algs: WebPkiSupportedAlgorithms, expected: SpiffeId) -> Self {
        let domains = [expected.trust_domain()];
        SpiffeServerVerifier { roots, algs, expected, domains }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let info = check_leaf(end_entity)?;
        // The DNS/IP name is deliberately not checked: SVIDs name workloads, not hosts.
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let id = check_spiffe(&info, &self.domains)?;
        if id != self.expected {
            return Err(VerifyError::IdMismatch { expected: self.expected.clone(), presented: id }.into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server-side verifier: the client must chain to the bundle with a SPIFFE ID in one of
/// the accepted trust domains. Which identities may do what is policy's job, not this one's.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    domains: Vec<TrustDomain>,
}

impl SpiffeClientVerifier {
    /// `mandatory = false` lets clients without a certificate finish the handshake (the
    /// control plane's API, where admins authenticate with a token instead).
    pub fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<rustls::crypto::CryptoProvider>,
        domains: Vec<TrustDomain>,
        mandatory: bool,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let builder = WebPkiClientVerifier::builder_with_provider(roots, provider);
        let inner = if mandatory { builder.build()? } else { builder.allow_unauthenticated().build()? };
        Ok(SpiffeClientVerifier { inner, domains })
    }
}

impl SpiffeClientVerifier {
    /// Runs the handshake-time checks on a chain received earlier: the control plane uses
    /// this behind [`DeferredClientVerifier`] to answer a bad SVID with a 4xx body.
    pub fn verify_chain(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Result<SpiffeId, VerifyError> {
        let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::NoCertificate)?;
        let checked = check_leaf(leaf).and_then(|info| {
            self.inner.verify_client_cert(leaf, intermediates, now)?;
            check_spiffe(&info, &self.domains)
        });
        checked.map_err(|e| VerifyError::from_rustls(&e))
    }
}

/// A client verifier for APIs that must *answer* a bad client certificate rather than
/// abort the handshake: it asks for a certificate, checks only that the client holds its
/// key (the handshake signature), and leaves chain and SPIFFE checks to the application,
/// which must call [`SpiffeClientVerifier::verify_chain`] on the peer's chain before
/// trusting any identity. The Trellis control plane uses it so that an expired or foreign
/// SVID gets a clear 401 body instead of a bare TLS alert; the proxy never does.
#[derive(Debug)]
pub struct DeferredClientVerifier {
    pub checker: SpiffeClientVerifier,
}

impl DeferredClientVerifier {
    pub fn new(checker: SpiffeClientVerifier) -> Self {
        DeferredClientVerifier { checker }
    }
}

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.checker.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        // Deferred by design: see the type's documentation.
        Ok(ClientCertVerified::assertion())
    }

    // Proof of key possession is still checked here, by the same code as always.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.checker.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.checker.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.checker.supported_verify_schemes()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let info = check_leaf(end_entity)?;
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_spiffe(&info, &self.domains)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
