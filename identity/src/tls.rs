//! rustls configurations for Trellis: TLS 1.3 only, one crypto provider, SPIFFE verifiers.
//!
//! The proxy's inbound listener and the control plane use [`server_config`]; the proxy's
//! outbound connector and the CLI use [`client_config`], one per expected peer identity.
//! After a handshake, [`peer_spiffe_id`] reads who is on the other end.
//!
//! The crypto provider is `ring` and is always passed explicitly: rcgen already depends on
//! ring, and a second provider in the build would make rustls' `builder()` panic.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, CommonState, ServerConfig};

use crate::bundle::TrustBundle;
use crate::cert::CertInfo;
use crate::credentials::{CredentialStore, StoreResolver};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::verify::{DeferredClientVerifier, SpiffeClientVerifier, SpiffeServerVerifier, VerifyError};

/// ALPN Trellis sidecars offer each other when the connection carries HTTP/2 (pooled,
/// multiplexed sidecar-to-sidecar traffic).
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot build TLS verifier: {0}")]
    Verifier(String),
    #[error("cannot build TLS config: {0}")]
    Config(#[from] rustls::Error),
}

/// Whether a server insists on a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// mTLS: no certificate, no connection (sidecar inbound).
    Required,
    /// Verified if presented (clients without a certificate get no identity).
    Optional,
    /// Requested but checked by the application (see [`crate::verify::DeferredClientVerifier`]):
    /// the control-plane API, which answers bad SVIDs with a 4xx body.
    Deferred,
}

/// The one crypto provider of the process.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// A TLS 1.3 server presenting the current SVID from `creds` and verifying client SVIDs
/// against `bundle`, accepting identities from `trust_domains`.
pub fn server_config(
    creds: Arc<CredentialStore>,
    bundle: &TrustBundle,
    trust_domains: &[TrustDomain],
    client_auth: ClientAuth,
) -> Result<ServerConfig, TlsError> {
    server_config_with_resolver(Arc::new(StoreResolver(creds)), bundle, trust_domains, client_auth)
}

/// [`server_config`] with a caller-chosen certificate resolver (the control plane picks
/// a DNS serving certificate for its webhook's SNI name and its SVID otherwise).
pub fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    bundle: &TrustBundle,
    trust_domains: &[TrustDomain],
    client_auth: ClientAuth,
) -> Result<ServerConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = client_verifier(bundle, trust_domains, client_auth == ClientAuth::Required)?;
    let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> = match client_auth {
        ClientAuth::Deferred => Arc::new(DeferredClientVerifier::new(verifier)),
        ClientAuth::Required | ClientAuth::Optional => Arc::new(verifier),
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    Ok(config)
}

/// The SPIFFE client-certificate checks on their own, for [`ClientAuth::Deferred`] servers
/// to run on a peer's chain after the handshake.
pub fn client_verifier(
    bundle: &TrustBundle,
    trust_domains: &[TrustDomain],
    mandatory: bool,
) -> Result<SpiffeClientVerifier, TlsError> {
    SpiffeClientVerifier::new(bundle.root_store(), crypto_provider(), trust_domains.to_vec(), mandatory)
        .map_err(|e| TlsError::Verifier(format!("{e:?}")))
}

/// A TLS 1.3 client that requires the server to be exactly `expected`, presenting the
/// current SVID from `creds` when it has one.
pub fn client_config(
    creds: Option<Arc<CredentialStore>>,
    bundle: &TrustBundle,
    expected: SpiffeId,
) -> Result<ClientConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = SpiffeServerVerifier::new(bundle.root_store(), provider.signature_verification_algorithms, expected);
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // a custom verifier; it still runs full WebPKI verification
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match creds {
        Some(store) => builder.with_client_cert_resolver(Arc::new(StoreResolver(store))),
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// The SPIFFE ID the peer proved in a completed handshake.
pub fn peer_spiffe_id(state: &CommonState) -> Result<SpiffeId, VerifyError> {
    let leaf = state.peer_certificates().and_then(|c| c.first()).ok_or(VerifyError::NoCertificate)?;
    let info = CertInfo::parse(leaf).map_err(VerifyError::BadEncoding)?;
    Ok(info.spiffe_id()?)
}
