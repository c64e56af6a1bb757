//! PEM in and out: parsing via `rustls-pki-types`, encoding via the `pem` crate.
//!
//! Every file Trellis reads or writes with certificates or keys (the CA, `bundle.pem`, a
//! proxy's SVID) passes through here, so a bad file always gets the same clear error.

use std::fs;
use std::io::Write;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};

/// A PEM input that could not be used, naming where it came from.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    // The cause is in the message and not also a `source`, so a chain prints it once.
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
    #[error("{what}: not valid PEM: {reason}")]
    Malformed { what: String, reason: String },
    #[error("{what}: no {kind} found")]
    Missing { what: String, kind: &'static str },
}

fn malformed(what: &str, e: rustls_pki_types::pem::Error) -> PemError {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => PemError::Missing { what: what.to_string(), kind: "PEM item" },
        other => PemError::Malformed { what: what.to_string(), reason: other.to_string() },
    }
}

/// All certificates in a PEM text, in order; at least one.
pub fn certs_from_pem(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| malformed(what, e))?;
    if certs.is_empty() {
        return Err(PemError::Missing { what: what.to_string(), kind: "CERTIFICATE" });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in a PEM text.
pub fn key_from_pem(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PemError::Missing { what: what.to_string(), kind: "PRIVATE KEY" },
        other => malformed(what, other),
    })
}

/// The first CSR in a PEM text.
pub fn csr_from_pem(what: &str, pem: &[u8]) -> Result<CertificateSigningRequestDer<'static>, PemError> {
    CertificateSigningRequestDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            PemError::Missing { what: what.to_string(), kind: "CERTIFICATE REQUEST" }
        }
        other => malformed(what, other),
    })
}

pub fn read_file(path: &Path) -> Result<Vec<u8>, PemError> {
    fs::read(path).map_err(|cause| PemError::Io { what: path.display().to_string(), cause })
}

pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs.into_iter().map(|c| encode("CERTIFICATE", c.as_ref())).collect()
}

pub fn csr_to_pem(csr: &CertificateSigningRequestDer<'_>) -> String {
    encode("CERTIFICATE REQUEST", csr.as_ref())
}

pub fn key_to_pem(key: &PrivateKeyDer<'_>) -> String {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    encode(label, key.secret_der())
}

fn encode(label: &str, der: &[u8]) -> String {
    let p = pem::Pem::new(label, der.to_vec());
    pem::encode_config(&p, pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}

/// Writes `contents` to `path` atomically (temp file + rename) with the given mode, so a
/// crash never leaves a half-written key and a key is never readable by others, not even
/// for an instant.
pub fn write_private(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp =
        dir.join(format!(".{}.tmp{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("file"), std::process::id()));
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
