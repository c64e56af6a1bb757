//! Starting the control plane: prepare the data dir (CA, `bundle.pem`, `admin.token`, the
//! store), mint the control plane's own SVID, and serve the API.
//!
//! Used by `trellis control run`, by `trellis demo`, and in-process by tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use trellis_identity::pem::write_private;
use trellis_identity::{
    CertificateAuthority, ClientAuth, CredentialStore, SpiffeId, TrustBundle, TrustDomain, WorkloadKey, ca,
    cert::fingerprint_sha256, client_verifier, server_config_with_resolver,
};

use crate::server::{self, Ctx, Hooks};
use crate::state::Shared;
use crate::store::{STORE_FILE, Store};

pub const BUNDLE_FILE: &str = "bundle.pem";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Lifetime of a CA created on first start.
pub const CA_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// The control plane's own SVID lives this long and is renewed at half-life.
const CONTROL_SVID_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: TrustDomain,
    pub svid_ttl: Duration,
    /// Use this CA (certificate chain, key) instead of creating one in the data dir.
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// DNS names the admission webhook is called by (the Kubernetes API server checks
    /// them); empty when the webhook is off.
    pub webhook_dns_names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA: {0}")]
    Ca(#[from] trellis_identity::CaError),
    #[error("trust bundle: {0}")]
    Bundle(#[from] trellis_identity::BundleError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("control plane SVID: {0}")]
    Svid(String),
    #[error("TLS: {0}")]
    Tls(#[from] trellis_identity::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running control plane.
#[derive(Debug)]
pub struct Running {
    pub local_addr: SocketAddr,
    pub url: String,
    pub bundle_path: PathBuf,
    pub admin_token_path: PathBuf,
    pub ca_fingerprint: String,
    pub trust_domain: TrustDomain,
    pub shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    renewer: tokio::task::JoinHandle<()>,
    expirer: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, gives in-flight requests a moment, and returns.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.renewer.abort();
        self.expirer.abort();
        let _ = (&mut self.task).await;
    }

    /// Waits until the server stops (it only stops via [`Running::shutdown`]).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Prepares the data dir and starts serving; returns once the listener is bound.
pub async fn start(config: ControlConfig, hooks: Hooks) -> Result<Running, StartError> {
    let dir = &config.data_dir;
    create_private_dir(dir)?;
    let ca = load_or_create_ca(&config)?;
    let bundle = write_bundle(dir, &ca)?;
    let admin_token = load_or_create_admin_token(dir)?;
    let store = Arc::new(Store::open(&dir.join(STORE_FILE))?);
    let shared = Shared::load(store, bundle.clone())?;

    let control_id = SpiffeId::from_segments(&config.trust_domain, &["trellis", "control"])
        .map_err(|e| StartError::Svid(e.to_string()))?;
    let creds = CredentialStore::new();
    let svid_not_after = mint_own_svid(&ca, &control_id, &creds)?;
    let resolver = Arc::new(SniResolver::new(creds.clone(), &ca, &config.webhook_dns_names)?);
    let mut tls = server_config_with_resolver(
        resolver,
        &bundle,
        std::slice::from_ref(&config.trust_domain),
        ClientAuth::Deferred,
    )?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No resumption: a resumed session presents the SVID of its first handshake, and the
    // API must judge the caller's current one.
    tls.session_storage = Arc::new(trellis_identity::rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let checker = client_verifier(&bundle, std::slice::from_ref(&config.trust_domain), false)?;

    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| StartError::Listen { addr: config.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
    let ca_fingerprint = fingerprint_sha256(ca.root());
    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        ca,
        trust_domain: config.trust_domain.clone(),
        svid_ttl: config.svid_ttl,
        admin_token,
        svid_checker: checker,
        hooks,
    });
    let renewer = tokio::spawn(renew_own_svid(ctx.clone(), control_id, creds, svid_not_after));
    let expirer = tokio::spawn(expire_endpoints(shared.clone(), config.svid_ttl));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(listener, Arc::new(tls), ctx, async {
        let _ = stopped.await;
    }));
    Ok(Running {
        local_addr,
        url: format!("https://{local_addr}"),
        bundle_path: dir.join(BUNDLE_FILE),
        admin_token_path: dir.join(ADMIN_TOKEN_FILE),
        ca_fingerprint,
        trust_domain: config.trust_domain,
        shared,
        stop: Some(stop),
        task,
        renewer,
        expirer,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| StartError::DataDir { path: dir.to_path_buf(), source };
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    }
    if !dir.is_dir() {
        return Err(err(std::io::Error::other("not a directory")));
    }
    Ok(())
}

fn load_or_create_ca(config: &ControlConfig) -> Result<CertificateAuthority, StartError> {
    let td = &config.trust_domain;
    if let Some((cert, key)) = &config.ca_files {
        return Ok(CertificateAuthority::load(td, cert, key)?);
    }
    let cert = config.data_dir.join(ca::CA_CERT_FILE);
    let key = config.data_dir.join(ca::CA_KEY_FILE);
    if cert.exists() || key.exists() {
        return Ok(CertificateAuthority::load(td, &cert, &key)?);
    }
    let ca = CertificateAuthority::create_root(td, CA_LIFETIME)?;
    ca.save(&config.data_dir)?;
    tracing::info!(fingerprint = %fingerprint_sha256(ca.root()), "created a new CA");
    Ok(ca)
}

/// Keeps any roots already in `bundle.pem` (rotation overlap) and adds the current one.
fn write_bundle(dir: &Path, ca: &CertificateAuthority) -> Result<TrustBundle, StartError> {
    let path = dir.join(BUNDLE_FILE);
    let bundle = match TrustBundle::load(&path) {
        Ok(existing) => existing.with_root(ca.root().clone())?,
        Err(_) => TrustBundle::new(vec![ca.root().clone()])?,
    };
    write_private(&path, bundle.to_pem().as_bytes(), 0o644)
        .map_err(|source| StartError::DataDir { path: path.clone(), source })?;
    Ok(bundle)
}

fn load_or_create_admin_token(dir: &Path) -> Result<String, StartError> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    let err = |source| StartError::DataDir { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => Err(err(std::io::Error::other("admin token file is empty"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = crate::tokens::mint();
            write_private(&path, format!("{token}\n").as_bytes(), 0o600).map_err(err)?;
            Ok(token)
        }
        Err(e) => Err(err(e)),
    }
}

fn mint_own_svid(ca: &CertificateAuthority, id: &SpiffeId, creds: &CredentialStore) -> Result<SystemTime, StartError> {
    let key = WorkloadKey::generate().map_err(|e| StartError::Svid(e.to_string()))?;
    let csr = key.csr(id).map_err(|e| StartError::Svid(e.to_string()))?;
    let issued = ca.sign_csr(&csr, id, CONTROL_SVID_TTL).map_err(|e| StartError::Svid(e.to_string()))?;
    let svid = key.into_svid(issued.chain).map_err(|e| StartError::Svid(e.to_string()))?;
    creds.set(svid).map_err(|e| StartError::Svid(e.to_string()))?;
    Ok(issued.not_after)
}

/// An endpoint whose owner has not registered (bootstrap or renewal, every half SVID
/// lifetime) for this many SVID lifetimes is dropped from the registry: its SVID has expired
/// and it can no longer be what answers at that address, while a workload without Trellis
/// that gets the address next must be reached as egress, not over mTLS it cannot speak.
pub const ENDPOINT_STALE_AFTER_TTLS: u32 = 2;

/// Drops stale endpoints and pushes the smaller registry to the watchers. Nothing is dropped
/// during the control plane's first SVID lifetime, so that after an outage every proxy gets
/// to renew (and re-register) before anything it registered can look stale.
async fn expire_endpoints(shared: Arc<Shared>, ttl: Duration) {
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval((ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if started.elapsed() < ttl {
            continue;
        }
        let cutoff = crate::store::now_unix().saturating_sub((ttl * ENDPOINT_STALE_AFTER_TTLS).as_secs());
        let store = shared.store.clone();
        let removed = match tokio::task::spawn_blocking(move || store.expire_endpoints(cutoff)).await {
            Ok(Ok((_, removed))) => removed,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not expire stale endpoints");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "endpoint expiry task failed");
                continue;
            }
        };
        if removed.is_empty() {
            continue;
        }
        for e in &removed {
            tracing::info!(address = %e.address, spiffe_id = %e.spiffe_id, "endpoint expired: its owner stopped renewing");
        }
        if let Err(e) = shared.reload_registry() {
            tracing::warn!(error = %e, "could not reload the registry after expiring endpoints");
        }
    }
}

async fn renew_own_svid(ctx: Arc<Ctx>, id: SpiffeId, creds: Arc<CredentialStore>, mut not_after: SystemTime) {
    loop {
        let remaining = not_after.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(remaining / 2).await;
        match mint_own_svid(&ctx.ca, &id, &creds) {
            Ok(t) => not_after = t,
            Err(e) => {
                tracing::error!(error = %e, "could not renew the control plane's SVID; retrying in 60s");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    }
}

/// Presents the control plane's SVID to everyone except callers asking (by SNI) for one of
/// the webhook's DNS names: the Kubernetes API server verifies the webhook by DNS name, so
/// it gets a DNS serving certificate from the same CA instead.
#[derive(Debug)]
struct SniResolver {
    svid: Arc<CredentialStore>,
    dns_names: Vec<String>,
    serving: Option<Arc<trellis_identity::rustls::sign::CertifiedKey>>,
}

impl SniResolver {
    fn new(svid: Arc<CredentialStore>, ca: &CertificateAuthority, dns_names: &[String]) -> Result<Self, StartError> {
        let serving = if dns_names.is_empty() {
            None
        } else {
            let (chain, key) = ca.issue_serving_cert(dns_names, CA_LIFETIME)?;
            let key = trellis_identity::crypto_provider()
                .key_provider
                .load_private_key(key)
                .map_err(|e| StartError::Svid(e.to_string()))?;
            Some(Arc::new(trellis_identity::rustls::sign::CertifiedKey::new(chain, key)))
        };
        Ok(SniResolver { svid, dns_names: dns_names.to_vec(), serving })
    }
}

impl trellis_identity::rustls::server::ResolvesServerCert for SniResolver {
    fn resolve(
        &self,
        hello: trellis_identity::rustls::server::ClientHello<'_>,
    ) -> Option<Arc<trellis_identity::rustls::sign::CertifiedKey>> {
        if let (Some(sni), Some(serving)) = (hello.server_name(), &self.serving)
            && self.dns_names.iter().any(|n| n.eq_ignore_ascii_case(sni))
        {
            return Some(serving.clone());
        }
        self.svid.certified_key()
    }
}
