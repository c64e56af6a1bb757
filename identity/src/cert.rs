//! Reading X.509 certificates with x509-parser: the facts Trellis decides on.
//!
//! Used on both sides of the flow: the CA reads CSRs and its own certificate here, the TLS
//! verifiers read the peer's leaf here after WebPKI has checked the chain, and the proxy
//! reads its own SVID's expiry here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// What a certificate says about itself, as far as SPIFFE cares.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub uri_sans: Vec<String>,
    pub other_sans: usize,
    pub is_ca: bool,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial_hex: String,
    pub self_signed: bool,
}

/// Why a certificate does not name exactly one SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SanError {
    #[error("certificate has no URI SAN (an SVID carries exactly one, its SPIFFE ID)")]
    NoUriSan,
    #[error("certificate has {0} URI SANs; an SVID carries exactly one")]
    MultipleUriSans(usize),
    #[error("URI SAN {uri:?} is not a SPIFFE ID: {reason}")]
    InvalidSpiffeId { uri: String, reason: SpiffeIdError },
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        if !rest.is_empty() {
            return Err("trailing bytes after certificate".into());
        }
        Ok(Self::from_parsed(&cert))
    }

    fn from_parsed(cert: &X509Certificate<'_>) -> Self {
        let mut uri_sans = Vec::new();
        let mut other_sans = 0;
        let mut is_ca = false;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(uri) => uri_sans.push((*uri).to_string()),
                            _ => other_sans += 1,
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
                _ => {}
            }
        }
        let validity = cert.validity();
        CertInfo {
            uri_sans,
            other_sans,
            is_ca,
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
            serial_hex: cert.raw_serial_as_string(),
            self_signed: cert.subject() == cert.issuer(),
        }
    }

    /// The single SPIFFE ID this certificate names.
    pub fn spiffe_id(&self) -> Result<SpiffeId, SanError> {
        match self.uri_sans.as_slice() {
            [] => Err(SanError::NoUriSan),
            [uri] => SpiffeId::parse(uri).map_err(|reason| SanError::InvalidSpiffeId { uri: uri.clone(), reason }),
            many => Err(SanError::MultipleUriSans(many.len())),
        }
    }

    /// Seconds since the epoch at which the certificate expires.
    pub fn not_after_unix(&self) -> u64 {
        self.not_after.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
    }
}

fn to_system_time(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

/// The SPIFFE ID of a leaf certificate, for callers that only need that.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, SanError> {
    let info = CertInfo::parse(cert).map_err(|_| SanError::NoUriSan)?;
    info.spiffe_id()
}

/// SHA-256 fingerprint of a DER certificate, as colon-separated hex (what `openssl x509
/// -fingerprint -sha256` prints), so operators can compare it by eye.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}
