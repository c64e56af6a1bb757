//! The credential store: the SVID a sidecar presents, swappable while it serves.
//!
//! Every handshake asks a resolver for the current certificate, and the resolver loads it
//! from here, so renewing the SVID is one atomic pointer swap: listeners keep running,
//! open connections keep the keys they negotiated, and the next handshake presents the
//! new certificate.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::spiffe::SpiffeId;
use crate::tls::crypto_provider;
use crate::workload::{Svid, SvidError};

/// An SVID ready for rustls, with the facts the proxy reports about it.
#[derive(Debug)]
pub struct Credential {
    pub svid: Svid,
    /// When this credential was installed; renewal is scheduled from here.
    pub received: SystemTime,
    certified: Arc<CertifiedKey>,
}

impl Credential {
    pub fn new(svid: Svid) -> Result<Self, SvidError> {
        let key = crypto_provider()
            .key_provider
            .load_private_key(svid.key().clone_key())
            .map_err(|e| SvidError::BadKey(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(svid.chain().to_vec(), key));
        Ok(Credential { svid, received: SystemTime::now(), certified })
    }

    pub fn id(&self) -> &SpiffeId {
        self.svid.id()
    }
}

/// Holds the current [`Credential`]; empty until the first SVID arrives.
#[derive(Debug, Default)]
pub struct CredentialStore {
    current: ArcSwapOption<Credential>,
}

impl CredentialStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn with(svid: Svid) -> Result<Arc<Self>, SvidError> {
        let store = Self::new();
        store.set(svid)?;
        Ok(store)
    }

    /// Installs `svid` for all handshakes that start after this returns.
    pub fn set(&self, svid: Svid) -> Result<(), SvidError> {
        let cred = Credential::new(svid)?;
        tracing::debug!(id = %cred.id(), not_after = ?cred.svid.not_after(), "credential installed");
        self.current.store(Some(Arc::new(cred)));
        Ok(())
    }

    pub fn current(&self) -> Option<Arc<Credential>> {
        self.current.load_full()
    }

    pub fn id(&self) -> Option<SpiffeId> {
        self.current.load().as_ref().map(|c| c.id().clone())
    }

    /// The current SVID as rustls wants it, for custom certificate resolvers.
    pub fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|c| c.certified.clone())
    }
}

/// Resolves the server certificate from a [`CredentialStore`] on every handshake.
#[derive(Debug)]
pub struct StoreResolver(pub Arc<CredentialStore>);

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certified_key()
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.certified_key()
    }

    fn has_certs(&self) -> bool {
        self.0.current.load().is_some()
    }
}
