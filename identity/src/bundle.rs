//! Trust bundles: the set of root certificates a verifier accepts.
//!
//! A bundle holds several roots so a CA can be rotated with overlap: the new root is added
//! to every bundle first, SVIDs move to it, and only then is the old root removed.
//! The control plane writes the bundle to `bundle.pem` and pushes it to proxies; the
//! verifiers in [`crate::verify`] are built from it.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;

use crate::cert::CertInfo;
use crate::pem::{self, PemError};
use crate::spiffe::TrustDomain;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("trust bundle is empty")]
    Empty,
    #[error("trust bundle root #{index} cannot be used: {reason}")]
    BadRoot { index: usize, reason: String },
}

/// Roots trusted for one mesh, cheap to clone.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Arc<[CertificateDer<'static>]>,
    store: Arc<RootCertStore>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustBundle({} roots)", self.roots.len())
    }
}

impl PartialEq for TrustBundle {
    fn eq(&self, other: &Self) -> bool {
        self.roots == other.roots
    }
}

impl TrustBundle {
    /// A bundle of `roots`; each must be a CA certificate that rustls can use as an anchor.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        let mut store = RootCertStore::empty();
        for (index, root) in roots.iter().enumerate() {
            let info = CertInfo::parse(root).map_err(|reason| BundleError::BadRoot { index, reason })?;
            if !info.is_ca {
                return Err(BundleError::BadRoot { index, reason: "not a CA certificate".into() });
            }
            store.add(root.clone()).map_err(|e| BundleError::BadRoot { index, reason: e.to_string() })?;
        }
        Ok(TrustBundle { roots: roots.into(), store: Arc::new(store) })
    }

    pub fn from_pem(pem_text: &[u8]) -> Result<Self, BundleError> {
        Self::new(pem::certs_from_pem("trust bundle", pem_text)?)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, BundleError> {
        let text = pem::read_file(path)?;
        Self::new(pem::certs_from_pem(&path.display().to_string(), &text)?)
    }

    pub fn to_pem(&self) -> String {
        pem::certs_to_pem(self.roots.iter())
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn root_store(&self) -> Arc<RootCertStore> {
        self.store.clone()
    }

    /// A new bundle with `root` added (no-op if already present).
    pub fn with_root(&self, root: CertificateDer<'static>) -> Result<Self, BundleError> {
        let mut roots = self.roots.to_vec();
        if !roots.contains(&root) {
            roots.push(root);
        }
        Self::new(roots)
    }

    /// A new bundle without `root`; refuses to become empty.
    pub fn without_root(&self, root: &CertificateDer<'_>) -> Result<Self, BundleError> {
        Self::new(self.roots.iter().filter(|r| r.as_ref() != root.as_ref()).cloned().collect())
    }

    /// The trust domain named by the first root's SPIFFE URI SAN, if any. Trellis roots
    /// carry `spiffe://<td>`, which lets a CLI given only `bundle.pem` know whom to expect.
    pub fn trust_domain(&self) -> Option<TrustDomain> {
        self.roots.iter().find_map(|r| {
            let info = CertInfo::parse(r).ok()?;
            info.uri_sans.iter().find_map(|u| TrustDomain::parse(u).ok())
        })
    }
}
