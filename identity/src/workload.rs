//! The workload side of identity: the private key that never leaves the sidecar, the CSR
//! it sends to the control plane, and the SVID + key pair it gets back.
//!
//! Flow: [`WorkloadKey::generate`] → [`WorkloadKey::csr`] → (control plane signs) →
//! [`Svid::new`] → [`crate::CredentialStore::set`], where every TLS handshake reads it.

use std::time::SystemTime;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::cert::{CertInfo, SanError};
use crate::pem::{self, PemError};
use crate::spiffe::SpiffeId;

/// Why an SVID (certificate chain + key) is not usable as a credential.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("SVID chain is empty")]
    EmptyChain,
    #[error("SVID certificate cannot be read: {0}")]
    BadCertificate(String),
    #[error("SVID {0}")]
    San(#[from] SanError),
    #[error("SVID leaf is a CA certificate")]
    NotALeaf,
    #[error("SVID private key does not match its certificate")]
    KeyMismatch,
    #[error("SVID private key is not usable: {0}")]
    BadKey(String),
    #[error(transparent)]
    Pem(#[from] PemError),
}

/// A freshly generated ECDSA P-256 key, created in the sidecar and never sent anywhere.
pub struct WorkloadKey {
    key: KeyPair,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkloadKey(<private>)")
    }
}

impl WorkloadKey {
    pub fn generate() -> Result<Self, SvidError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| SvidError::BadKey(e.to_string()))?;
        Ok(WorkloadKey { key })
    }

    /// A CSR naming `id` as its only SAN, signed by this key.
    pub fn csr(&self, id: &SpiffeId) -> Result<CertificateSigningRequestDer<'static>, SvidError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(id.as_str()).map_err(|e| SvidError::BadKey(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params.serialize_request(&self.key).map_err(|e| SvidError::BadKey(e.to_string()))?;
        Ok(csr.der().clone())
    }

    /// A CSR with no SAN at all, for a workload that does not know its own identity yet:
    /// the CA issues the SVID for whatever identity the caller's token proves.
    pub fn anonymous_csr(&self) -> Result<CertificateSigningRequestDer<'static>, SvidError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&self.key).map_err(|e| SvidError::BadKey(e.to_string()))?;
        Ok(csr.der().clone())
    }

    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// Pairs this key with the certificate chain the CA returned.
    pub fn into_svid(self, chain: Vec<CertificateDer<'static>>) -> Result<Svid, SvidError> {
        Svid::new(chain, self.private_key_der())
    }
}

/// An X.509-SVID with its private key: what a sidecar presents in every handshake.
#[derive(Debug)]
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Svid {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl Svid {
    /// Checks that `chain[0]` is a leaf naming exactly one SPIFFE ID and that `key` is its key.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let info = CertInfo::parse(leaf).map_err(SvidError::BadCertificate)?;
        if info.is_ca {
            return Err(SvidError::NotALeaf);
        }
        let id = info.spiffe_id()?;
        let pair = KeyPair::try_from(&key).map_err(|e| SvidError::BadKey(e.to_string()))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| SvidError::BadCertificate(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != pair.public_key_raw() {
            return Err(SvidError::KeyMismatch);
        }
        Ok(Svid { id, chain, key, not_before: info.not_before, not_after: info.not_after })
    }

    /// Reads an SVID from PEM text (certificate chain and key, in one text or two).
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, SvidError> {
        let chain = pem::certs_from_pem("SVID certificate", chain_pem)?;
        let key = pem::key_from_pem("SVID key", key_pem)?;
        Self::new(chain, key)
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn chain_pem(&self) -> String {
        pem::certs_to_pem(&self.chain)
    }

    pub fn key_pem(&self) -> String {
        pem::key_to_pem(&self.key)
    }

    /// When to start renewing an SVID received at `received`: half its remaining life, as
    /// docs/architecture.md (*Flow of one identity*) says. Measured from receipt rather than
    /// `notBefore`, which the CA backdates for clock skew and would make short-lived SVIDs
    /// renew at once.
    pub fn renew_at(&self, received: SystemTime) -> SystemTime {
        let remaining = self.not_after.duration_since(received).unwrap_or_default();
        received + remaining / 2
    }
}
