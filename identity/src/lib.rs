//! `trellis-identity`: who is who in a Trellis mesh.
//!
//! The leaf every other crate stands on. It owns:
//! - [`SpiffeId`] / [`TrustDomain`]: the SPIFFE ID grammar ([`spiffe`]);
//! - [`CertificateAuthority`]: the root (and intermediate) that signs CSRs into X.509-SVIDs
//!   for the identity a caller is entitled to ([`ca`]);
//! - [`WorkloadKey`] / [`Svid`]: the sidecar's key, CSR and credential ([`workload`]);
//! - [`CredentialStore`]: the current SVID, swapped atomically on renewal ([`credentials`]);
//! - [`TrustBundle`]: the roots a verifier accepts ([`bundle`]);
//! - rustls configs and the SPIFFE verifiers they use ([`tls`], [`verify`]).
//!
//! The flow of one identity: the sidecar generates a [`WorkloadKey`], sends its CSR; the
//! control plane's [`CertificateAuthority::sign_csr`] returns a chain; the sidecar wraps
//! it in an [`Svid`] and installs it in its [`CredentialStore`]; every handshake then
//! presents it, and the peer's verifier checks it against the [`TrustBundle`] and reads
//! its [`SpiffeId`] with [`tls::peer_spiffe_id`].

pub mod bundle;
pub mod ca;
pub mod cert;
pub mod credentials;
pub mod pem;
pub mod spiffe;
pub mod tls;
pub mod verify;
pub mod workload;

pub use bundle::{BundleError, TrustBundle};
pub use ca::{CaError, CertificateAuthority, CsrError, IssuedSvid};
pub use cert::{CertInfo, SanError};
pub use credentials::{Credential, CredentialStore};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use tls::{
    ClientAuth, TlsError, client_config, client_verifier, crypto_provider, peer_spiffe_id, server_config,
    server_config_with_resolver,
};
pub use verify::VerifyError;
pub use workload::{Svid, SvidError, WorkloadKey};

/// Re-exported so dependants name the exact rustls this crate was built against.
pub use rustls;
pub use rustls_pki_types as pki_types;
