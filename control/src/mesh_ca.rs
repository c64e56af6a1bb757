//! The mesh's CA at start: the one given in files (`--ca-cert`/`--ca-key`), the data dir's,
//! or a new one on a first start — checked against the trust domain and against the root the
//! store recorded, so that a forgotten flag or a lost file cannot quietly give the mesh a CA
//! that no proxy's bundle vouches for. Then `bundle.pem`, which keeps earlier roots. Called by
//! [`crate::run::start`] before anything is served.

use std::path::{Path, PathBuf};

use trellis_identity::pem::write_private;
use trellis_identity::{CertificateAuthority, SpiffeId, TrustBundle, TrustDomain, ca, cert::fingerprint_sha256};

use crate::run::{BUNDLE_FILE, CA_LIFETIME, ControlConfig, StartError, mismatch};
use crate::store::Store;

/// The mesh's CA for this start, and the root fingerprint the store recorded before it (none
/// on a first start): the one `given` in files, or the data dir's, or a new one on a first
/// start. A CA gone missing beside an earlier store is refused, and so is a data dir CA other
/// than the recorded one unless it is given on purpose; a CA given on purpose is recorded.
pub(crate) fn choose(
    config: &ControlConfig,
    store: &Store,
    given: Option<CertificateAuthority>,
) -> Result<(CertificateAuthority, Option<String>), StartError> {
    let dir = &config.data_dir;
    let recorded_ca = store.ca_fingerprint()?;
    let has_ca = config.ca_files.is_some() || dir.join(ca::CA_CERT_FILE).exists() || dir.join(ca::CA_KEY_FILE).exists();
    // A mesh whose CA went missing (a forgotten --ca-cert, deleted files) must not quietly get
    // a new one: every proxy's bundle would stop vouching for this control plane.
    if let (Some(fingerprint), false) = (&recorded_ca, has_ca) {
        return Err(StartError::CaLost { data_dir: dir.clone(), fingerprint: fingerprint.clone() });
    }
    let ca = match given {
        Some(ca) => ca,
        None => load_or_create_ca(config)?,
    };
    let fingerprint = fingerprint_sha256(ca.root());
    // A change of CA is taken only when given: without --ca-cert/--ca-key after a start with
    // them, the data dir's own (older) ca.pem would quietly become the mesh's CA again.
    if let Some(recorded) = recorded_ca.as_ref().filter(|r| config.ca_files.is_none() && **r != fingerprint) {
        return Err(StartError::CaNotTheMeshs {
            data_dir: dir.clone(),
            recorded: recorded.clone(),
            found: fingerprint,
        });
    }
    if recorded_ca.as_deref() != Some(fingerprint.as_str()) {
        if let Some(before) = &recorded_ca {
            tracing::warn!(before = %before, now = %fingerprint, "the mesh's CA root changed; bundle.pem holds both roots");
        }
        store.set_ca_fingerprint(&fingerprint)?;
    }
    Ok((ca, recorded_ca))
}

/// The CA given with `--ca-cert`/`--ca-key`, which must name the configured trust domain: one
/// that names none, or another, would start and then fail every proxy and CLI call.
pub(crate) fn given(td: &TrustDomain, (cert, key): &(PathBuf, PathBuf)) -> Result<CertificateAuthority, StartError> {
    let ca = CertificateAuthority::load(td, cert, key)?;
    let problem = match ca_trust_domain(&ca) {
        Some(found) if found == td.as_str() => return Ok(ca),
        Some(found) => format!("it is the CA of trust domain {found}, not of --trust-domain {td}"),
        None => "its root (the last certificate, which bundle.pem carries) names no trust domain".to_string(),
    };
    Err(StartError::CaTrustDomain { cert: cert.clone(), problem, configured: td.clone() })
}

fn load_or_create_ca(config: &ControlConfig) -> Result<CertificateAuthority, StartError> {
    let td = &config.trust_domain;
    let cert = config.data_dir.join(ca::CA_CERT_FILE);
    let key = config.data_dir.join(ca::CA_KEY_FILE);
    if cert.exists() || key.exists() {
        let ca = CertificateAuthority::load(td, &cert, &key)?;
        // A CA this control plane created names its trust domain in its URI SAN.
        if let Some(found) = ca_trust_domain(&ca).filter(|found| found != td.as_str()) {
            return Err(mismatch(config, "CA", found));
        }
        return Ok(ca);
    }
    let ca = CertificateAuthority::create_root(td, CA_LIFETIME)?;
    ca.save(&config.data_dir)?;
    tracing::info!(fingerprint = %fingerprint_sha256(ca.root()), "created a new CA");
    Ok(ca)
}

/// The trust domain the CA's root names in a path-less SPIFFE URI SAN, if it names one: the
/// root is what goes into bundle.pem, and proxies and the CLI learn the trust domain from it.
fn ca_trust_domain(ca: &CertificateAuthority) -> Option<String> {
    root_trust_domain(ca.root())
}

fn root_trust_domain(root: &[u8]) -> Option<String> {
    let info = trellis_identity::CertInfo::parse(root).ok()?;
    info.uri_sans
        .iter()
        .filter_map(|uri| SpiffeId::parse(uri).ok())
        .find(|id| id.path().is_empty())
        .map(|id| id.trust_domain_str().to_string())
}

/// The roots an earlier start left in `bundle.pem` (none on a first start), checked before
/// anything is written: every one must be a CA of this trust domain — the current root and
/// earlier ones kept for a rotation. A file that does not read, or holds another mesh's root or
/// a certificate naming no trust domain, is refused rather than dropped (it would lose the
/// rotation overlap) or served (every proxy would trust another mesh, and clients learn the
/// trust domain from the bundle's first root).
pub(crate) fn earlier_bundle(dir: &Path, td: &TrustDomain) -> Result<Option<TrustBundle>, StartError> {
    let path = dir.join(BUNDLE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let refuse = |problem: String| StartError::BundleFile { path: path.clone(), problem, configured: td.clone() };
    let text = std::fs::read(&path).map_err(|e| refuse(format!("cannot read it: {e}")))?;
    let bundle = TrustBundle::from_pem(&text).map_err(|e| refuse(e.to_string()))?;
    for (index, root) in bundle.roots().iter().enumerate() {
        let named = match root_trust_domain(root) {
            Some(found) if found == td.as_str() => continue,
            Some(found) => format!("the root of trust domain {found}"),
            None => "a CA naming no trust domain".to_string(),
        };
        return Err(refuse(format!("certificate {} (SHA256 {}) is {named}", index + 1, fingerprint_sha256(root))));
    }
    Ok(Some(bundle))
}

/// Keeps the roots an earlier start left in `bundle.pem` (rotation overlap) and adds the
/// current one.
pub(crate) fn write_bundle(
    dir: &Path,
    earlier: Option<TrustBundle>,
    ca: &CertificateAuthority,
) -> Result<TrustBundle, StartError> {
    let path = dir.join(BUNDLE_FILE);
    let bundle = match earlier {
        Some(earlier) => earlier.with_root(ca.root().clone())?,
        None => TrustBundle::new(vec![ca.root().clone()])?,
    };
    write_private(&path, bundle.to_pem().as_bytes(), 0o600)
        .map_err(|error| StartError::DataDir { path: path.clone(), error })?;
    Ok(bundle)
}
