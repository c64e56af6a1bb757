//! The certificate authority: creates the root (and optionally an intermediate), saves and
//! loads it, and signs workload CSRs into X.509-SVIDs.
//!
//! Sits at the start of every identity: the control plane owns one of these and calls
//! [`CertificateAuthority::sign_csr`] with the identity the caller *proved* (a join token,
//! a Kubernetes token, or its current SVID); the CSR only supplies the public key. Nothing
//! the CSR asks for beyond that is copied into the certificate, and anything it asks for
//! that we would not grant is refused with its own [`CsrError`].

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256};
use x509_parser::prelude::FromDer;

use crate::cert::CertInfo;
use crate::pem::{self, PemError};
use crate::spiffe::{SpiffeId, TrustDomain};

/// How far back a new certificate's `notBefore` is set, so a peer whose clock runs a
/// little behind does not reject it as not yet valid.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// File names inside a data dir.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Why a CSR was refused. Each refusal is its own variant so the control plane can
/// answer with a precise 4xx and tests can assert which rule fired.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not valid DER: {0}")]
    Malformed(String),
    #[error("CSR signature does not verify with its own public key")]
    BadSignature,
    #[error("CSR key is not supported: {0} (an SVID key must be ECDSA P-256)")]
    UnsupportedKey(String),
    #[error("CSR asks for {requested} but the caller is entitled only to {entitled}")]
    IdMismatch { requested: String, entitled: SpiffeId },
    #[error("CSR carries SANs besides the SPIFFE ID ({0}); an SVID has exactly one URI SAN")]
    ExtraSans(String),
    #[error("CSR asks to be a certificate authority")]
    RequestsCa,
    #[error("requested TTL {0:?} is too short (at least 1s)")]
    BadTtl(Duration),
    /// So large that "now + TTL" is not a time a certificate can carry (past year 9999, or
    /// beyond what the clock can even add): refused, never a panic.
    #[error("requested TTL {0:?} is too long: it ends beyond any date a certificate can carry")]
    TtlTooLong(Duration),
    #[error("the CA certificate has expired; it cannot sign")]
    CaExpired,
    #[error("signing failed: {0}")]
    Signing(String),
}

/// Why a CA could not be created, loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Pem(#[from] PemError),
    // The cause is in the message and not also a `source`, so a chain prints it once.
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("CA key does not match the CA certificate")]
    KeyMismatch,
    #[error("CA certificate is not a CA (basicConstraints CA:TRUE missing)")]
    NotACa,
    #[error("CA certificate has expired")]
    Expired,
    /// Everything it signed would be refused until then (its SVIDs start no earlier).
    #[error("CA certificate is not valid until {0} (Unix time): check its notBefore and this host's clock")]
    NotYetValid(u64),
    #[error("CA certificate chain must end at a self-signed root")]
    NoRoot,
    #[error("certificate could not be read: {0}")]
    BadCertificate(String),
    #[error("CA key is not usable: {0}")]
    BadKey(String),
    #[error("CA generation failed: {0}")]
    Generation(String),
    /// "now + lifetime" is not a time a certificate can carry.
    #[error("certificate lifetime {0:?} is too long: it ends beyond any date a certificate can carry")]
    LifetimeTooLong(Duration),
}

/// A signed X.509-SVID: the leaf followed by any intermediates, ready to present.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

/// A CA that can sign SVIDs for one trust domain.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    /// This CA's certificate followed by its parents up to and including the root.
    chain: Vec<CertificateDer<'static>>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed ECDSA P-256 root for `trust_domain`, valid for `lifetime`.
    pub fn create_root(trust_domain: &TrustDomain, lifetime: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let name = format!("Trellis root CA {trust_domain} {}", short_key_id(&key));
        let params = ca_params(trust_domain, &name, lifetime, BasicConstraints::Unconstrained)?;
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Self::from_parts(trust_domain.clone(), vec![cert.der().clone()], key)
    }

    /// A new intermediate CA signed by `self`, constrained to sign only leaves.
    pub fn create_intermediate(&self, lifetime: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let name = format!("Trellis intermediate CA {} {}", self.trust_domain, short_key_id(&key));
        let mut params = ca_params(&self.trust_domain, &name, lifetime, BasicConstraints::Constrained(0))?;
        let ca_end = to_offset(self.not_after).ok_or(CaError::LifetimeTooLong(lifetime))?;
        params.not_after = params.not_after.min(ca_end);
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Self::from_parts(self.trust_domain.clone(), chain, key)
    }

    /// Loads a CA from PEM text: `cert_pem` holds the CA certificate followed by its parents
    /// up to the self-signed root; `key_pem` its private key.
    pub fn from_pem(trust_domain: &TrustDomain, cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, CaError> {
        let chain = pem::certs_from_pem("CA certificate", cert_pem)?;
        let key_der = pem::key_from_pem("CA key", key_pem)?;
        let key = KeyPair::try_from(&key_der).map_err(|e| {
            // ring reads PKCS#8 only; `openssl ecparam -genkey` writes SEC1 (`EC PRIVATE KEY`).
            let hint = match &key_der {
                rustls_pki_types::PrivateKeyDer::Sec1(_) | rustls_pki_types::PrivateKeyDer::Pkcs1(_) => {
                    " (a PKCS#8 key is needed: `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8` converts it)"
                }
                _ => "",
            };
            CaError::BadKey(format!("{e}{hint}"))
        })?;
        Self::from_parts(trust_domain.clone(), chain, key)
    }

    /// Loads `cert_path` and `key_path` (see [`Self::from_pem`]).
    pub fn load(trust_domain: &TrustDomain, cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let cert = pem::read_file(cert_path)?;
        let key = pem::read_file(key_path)?;
        Self::from_pem(trust_domain, &cert, &key)
    }

    /// Writes `ca.pem` and `ca-key.pem` into `dir`, both mode 0600: the data dir is private
    /// (docs/architecture.md, control), and the public root is handed out as `bundle.pem` and `/v1/bundle`.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        let io = |path: PathBuf| move |cause| CaError::Io { path, cause };
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        pem::write_private(&key_path, self.key_pem.as_bytes(), 0o600).map_err(io(key_path.clone()))?;
        pem::write_private(&cert_path, pem::certs_to_pem(&self.chain).as_bytes(), 0o600)
            .map_err(io(cert_path.clone()))?;
        Ok(())
    }

    fn from_parts(
        trust_domain: TrustDomain,
        chain: Vec<CertificateDer<'static>>,
        key: KeyPair,
    ) -> Result<Self, CaError> {
        let leaf = chain.first().ok_or(CaError::NoRoot)?;
        let info = CertInfo::parse(leaf).map_err(CaError::BadCertificate)?;
        if !info.is_ca {
            return Err(CaError::NotACa);
        }
        if info.not_after < SystemTime::now() {
            return Err(CaError::Expired);
        }
        if info.not_before > SystemTime::now() + CLOCK_SKEW {
            let at = info.not_before.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            return Err(CaError::NotYetValid(at));
        }
        let last = chain.last().map(|c| CertInfo::parse(c)).transpose().map_err(CaError::BadCertificate)?;
        if !last.is_some_and(|l| l.self_signed) {
            return Err(CaError::NoRoot);
        }
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| CaError::BadCertificate(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch);
        }
        let key_pem = key.serialize_pem();
        let issuer = Issuer::from_ca_cert_der(leaf, key).map_err(|e| CaError::BadCertificate(e.to_string()))?;
        Ok(CertificateAuthority {
            trust_domain,
            chain,
            key_pem,
            issuer,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The self-signed root that verifiers must trust (what goes in `bundle.pem`).
    pub fn root(&self) -> &CertificateDer<'static> {
        self.chain.last().expect("chain is never empty")
    }

    /// This CA's own certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs `csr` into an SVID for `entitled`, valid for `ttl` from now.
    pub fn sign_csr(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        entitled: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedSvid, CsrError> {
        self.sign_csr_at(csr, entitled, ttl, SystemTime::now())
    }

    /// [`Self::sign_csr`] with the clock passed in, so tests can mint expired and
    /// not-yet-valid SVIDs through the real signing path.
    pub fn sign_csr_at(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        entitled: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedSvid, CsrError> {
        let spki = inspect_csr(csr, entitled)?;
        if ttl < Duration::from_secs(1) {
            return Err(CsrError::BadTtl(ttl));
        }
        if self.not_after <= now {
            return Err(CsrError::CaExpired);
        }
        let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now).max(self.not_before);
        // Checked: the TTL comes from configuration, and `SystemTime + Duration` panics on
        // overflow (a `--svid-ttl` of u64::MAX seconds once took the control plane down).
        let end = now.checked_add(ttl).ok_or(CsrError::TtlTooLong(ttl))?;
        // A leaf never outlives its CA: near the CA's end, SVIDs get shorter, not refused.
        let not_after = end.min(self.not_after);
        let too_long = || CsrError::TtlTooLong(ttl);
        let validity = (to_offset(not_before).ok_or_else(too_long)?, to_offset(not_after).ok_or_else(too_long)?);
        let params = svid_params(entitled, validity)?;
        let cert = params.signed_by(&spki, &self.issuer).map_err(|e| CsrError::Signing(e.to_string()))?;
        let mut chain = Vec::with_capacity(self.chain.len());
        chain.push(cert.der().clone());
        // Intermediates travel with the leaf; the root is in every verifier's bundle.
        chain.extend(self.chain[..self.chain.len() - 1].iter().cloned());
        Ok(IssuedSvid { chain, not_after })
    }
}

impl CertificateAuthority {
    /// A TLS serving certificate for DNS names and IP addresses (`names`) that also names `id`.
    /// The only caller is the control plane: the Kubernetes API server checks the webhook's
    /// certificate by DNS name (`trellis-control.trellis-system.svc`), curl and OpenAPI
    /// clients check the name or address they call, and proxies and the CLI check the
    /// SPIFFE ID (`id`) — one certificate must satisfy all of them.
    /// It carries serverAuth only, so no mTLS peer accepts it as a client.
    pub fn issue_serving_cert(
        &self,
        names: &[String],
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, rustls_pki_types::PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(gen_err)?;
        let uri = rcgen::string::Ia5String::try_from(id.as_str()).map_err(gen_err)?;
        params.subject_alt_names.push(SanType::URI(uri));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "trellis");
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        let too_long = || CaError::LifetimeTooLong(ttl);
        let end = now.checked_add(ttl).ok_or_else(too_long)?.min(self.not_after);
        params.not_before = to_offset(now.checked_sub(CLOCK_SKEW).unwrap_or(now)).ok_or_else(too_long)?;
        params.not_after = to_offset(end).ok_or_else(too_long)?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain[..self.chain.len() - 1].iter().cloned());
        let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok((chain, key_der))
    }
}

/// Checks a CSR against what the caller may have and returns its public key.
fn inspect_csr(csr: &CertificateSigningRequestDer<'_>, entitled: &SpiffeId) -> Result<SubjectPublicKeyInfo, CsrError> {
    let (rest, req) =
        X509CertificationRequest::from_der(csr.as_ref()).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed("trailing bytes after CSR".into()));
    }
    let info = &req.certification_request_info;
    let spki = &info.subject_pki;
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve.as_ref() != Some(&OID_EC_P256) {
        return Err(CsrError::UnsupportedKey(format!(
            "algorithm {} {}",
            spki.algorithm.algorithm,
            curve.map(|c| c.to_string()).unwrap_or_default()
        )));
    }
    if req.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(CsrError::UnsupportedKey(format!("signature algorithm {}", req.signature_algorithm.algorithm)));
    }
    req.verify_signature().map_err(|_| CsrError::BadSignature)?;
    check_requested_extensions(&req, entitled)?;
    SubjectPublicKeyInfo::from_der(spki.raw).map_err(|e| CsrError::UnsupportedKey(e.to_string()))
}

fn check_requested_extensions(req: &X509CertificationRequest<'_>, entitled: &SpiffeId) -> Result<(), CsrError> {
    let Some(exts) = req.requested_extensions() else {
        return Ok(());
    };
    for ext in exts {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                let mut uris = Vec::new();
                let mut others = Vec::new();
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => uris.push(*u),
                        other => others.push(other.to_string()),
                    }
                }
                if uris.len() > 1 {
                    others.extend(uris[1..].iter().map(|u| format!("URI:{u}")));
                }
                if !others.is_empty() {
                    return Err(CsrError::ExtraSans(others.join(", ")));
                }
                if let Some(uri) = uris.first()
                    && *uri != entitled.as_str()
                {
                    return Err(CsrError::IdMismatch { requested: uri.to_string(), entitled: entitled.clone() });
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::RequestsCa),
            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                return Err(CsrError::RequestsCa);
            }
            _ => {}
        }
    }
    Ok(())
}

fn ca_params(
    trust_domain: &TrustDomain,
    common_name: &str,
    lifetime: Duration,
    constraints: BasicConstraints,
) -> Result<CertificateParams, CaError> {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "trellis");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    // The trust domain's own SPIFFE ID marks which trust domain this CA speaks for.
    let uri = rcgen::string::Ia5String::try_from(trust_domain.id().as_str())
        .map_err(|e| CaError::Generation(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let too_long = || CaError::LifetimeTooLong(lifetime);
    params.not_before = to_offset(now.checked_sub(CLOCK_SKEW).unwrap_or(now)).ok_or_else(too_long)?;
    params.not_after = to_offset(now.checked_add(lifetime).ok_or_else(too_long)?).ok_or_else(too_long)?;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// `validity` is `(notBefore, notAfter)`.
fn svid_params(id: &SpiffeId, validity: (OffsetDateTime, OffsetDateTime)) -> Result<CertificateParams, CsrError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "trellis");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let uri = rcgen::string::Ia5String::try_from(id.as_str()).map_err(|e| CsrError::Signing(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    (params.not_before, params.not_after) = validity;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Eight hex digits of the key's SHA-256, so two meshes' CAs never share a subject name
/// (WebPKI matches issuers by name: a collision would turn "unknown issuer" into a
/// confusing "bad signature").
fn short_key_id(key: &KeyPair) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
    digest.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// 16 random bytes, top bit clear so the DER integer stays positive.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// `t` as a certificate time, or `None` when it is outside what `time` (and X.509) can
/// represent; `OffsetDateTime::from(SystemTime)` would panic there.
pub(crate) fn to_offset(t: SystemTime) -> Option<OffsetDateTime> {
    let (since, after_epoch) = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (d, true),
        Err(e) => (e.duration(), false),
    };
    let since = time::Duration::try_from(since).ok()?;
    if after_epoch {
        OffsetDateTime::UNIX_EPOCH.checked_add(since)
    } else {
        OffsetDateTime::UNIX_EPOCH.checked_sub(since)
    }
}

fn gen_err(e: rcgen::Error) -> CaError {
    CaError::Generation(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::WorkloadKey;

    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    fn td() -> TrustDomain {
        TrustDomain::parse("cluster.local").unwrap()
    }

    fn csr_for(id: &SpiffeId) -> CertificateSigningRequestDer<'static> {
        WorkloadKey::generate().unwrap().csr(id).unwrap()
    }

    /// Leaf certificates say "not a CA" as DER requires: `cA` is `DEFAULT FALSE`, so the
    /// basicConstraints value is an empty SEQUENCE. An explicit `FALSE` (rcgen before 0.14.10)
    /// made strict parsers — Python's `cryptography`, so sslyze and any Python app looking at
    /// its peer's certificate — refuse every SVID.
    #[test]
    fn leaves_encode_basic_constraints_as_der_requires() {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let ca = CertificateAuthority::create_root(&td(), YEAR).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let svid = ca.sign_csr(&csr_for(&id), &id, Duration::from_secs(3600)).unwrap().chain.remove(0);
        let control = SpiffeId::parse("spiffe://cluster.local/trellis/control").unwrap();
        let serving = ca.issue_serving_cert(&["svc.example".to_string()], &control, YEAR).unwrap().0.remove(0);
        for der in [svid, serving] {
            let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
            let bc =
                cert.extensions().iter().find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_BASIC_CONSTRAINTS);
            let bc = bc.expect("basicConstraints present (SPIFFE: leaves say they are no CA)");
            assert!(bc.critical);
            assert_eq!(bc.value, [0x30, 0x00]);
        }
    }

    /// `--svid-ttl 18446744073709551615s` used to panic here ("overflow when adding duration
    /// to instant") on the first bootstrap.
    #[test]
    fn ttls_past_the_clock_are_refused_not_a_panic() {
        let ca = CertificateAuthority::create_root(&td(), YEAR).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        for ttl in [Duration::MAX, Duration::from_secs(u64::MAX), Duration::from_secs(9_999_999_999_999_999_999)] {
            assert_eq!(ca.sign_csr(&csr_for(&id), &id, ttl).unwrap_err(), CsrError::TtlTooLong(ttl), "{ttl:?}");
        }
        // A "now" at the far end of the clock cannot overflow either.
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(i64::MAX as u64 / 2);
        let err = ca.sign_csr_at(&csr_for(&id), &id, Duration::from_secs(u64::MAX), far).unwrap_err();
        assert!(matches!(err, CsrError::CaExpired | CsrError::TtlTooLong(_)), "{err:?}");
    }

    #[test]
    fn a_long_ttl_that_fits_the_clock_ends_with_the_ca() {
        let ca = CertificateAuthority::create_root(&td(), YEAR).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let issued = ca.sign_csr(&csr_for(&id), &id, 1000 * YEAR).unwrap();
        assert_eq!(issued.not_after, ca.not_after());
    }

    #[test]
    fn ca_and_serving_lifetimes_past_any_certificate_date_are_refused() {
        for lifetime in [Duration::MAX, 10_000 * YEAR] {
            let err = CertificateAuthority::create_root(&td(), lifetime).unwrap_err();
            assert!(matches!(err, CaError::LifetimeTooLong(l) if l == lifetime), "{err:?}");
        }
        let ca = CertificateAuthority::create_root(&td(), YEAR).unwrap();
        let err = ca.create_intermediate(Duration::MAX).unwrap_err();
        assert!(matches!(err, CaError::LifetimeTooLong(_)), "{err:?}");
        let control = SpiffeId::parse("spiffe://cluster.local/trellis/control").unwrap();
        let err = ca.issue_serving_cert(&["svc.example".to_string()], &control, Duration::MAX).unwrap_err();
        assert!(matches!(err, CaError::LifetimeTooLong(_)), "{err:?}");
        // Long but representable: capped at the CA's own end, as before.
        assert!(ca.issue_serving_cert(&["svc.example".to_string()], &control, 1000 * YEAR).is_ok());
    }

    #[test]
    fn saved_ca_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::create_root(&td(), YEAR).unwrap().save(dir.path()).unwrap();
        for file in [CA_CERT_FILE, CA_KEY_FILE] {
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
    }

    /// A CA from files that is not valid yet would sign SVIDs every peer refuses until then:
    /// refused at start, as an expired one is.
    #[test]
    fn a_ca_not_valid_yet_is_refused() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = ca_params(&td(), "future", YEAR, BasicConstraints::Unconstrained).unwrap();
        let tomorrow = SystemTime::now() + Duration::from_secs(24 * 3600);
        params.not_before = to_offset(tomorrow).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let err = CertificateAuthority::from_pem(&td(), cert.pem().as_bytes(), key.serialize_pem().as_bytes());
        assert!(matches!(err, Err(CaError::NotYetValid(_))), "{err:?}");
    }
}
