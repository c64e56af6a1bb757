//! Starting the control plane: prepare the data dir (CA, `bundle.pem`, `admin.token`, the
//! store), mint the control plane's own SVID, and serve the API.
//!
//! Used by `trellis control run`, by `trellis demo`, and in-process by tests.
//!
//! Order matters: the configuration is checked and the listener bound before the data dir
//! is touched, so a start that fails (port in use, `--svid-ttl` out of range) leaves no
//! half-made data dir behind; an existing data dir for another trust domain is refused
//! before anything in it changes. The data dir is mode 0700 and every file written there
//! 0600 (the CA key is in it), tightened on every start in case the umask or an operator
//! loosened them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use trellis_identity::pem::write_private;
use trellis_identity::{
    CertificateAuthority, ClientAuth, CredentialStore, SpiffeId, TrustDomain, WorkloadKey, ca,
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
/// The longest `--svid-ttl` accepted: 30 days. SVIDs are meant to be short-lived and
/// renewed at half-life (the default is 1 h; Istio's workload certificates default to
/// 24 h), and 30 days is also the longest a join token lives. Anything longer is almost
/// certainly a typo (`1000y`) and, near `u64::MAX` seconds, overflowed the clock.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: TrustDomain,
    pub svid_ttl: Duration,
    /// Use this CA (certificate chain, key) instead of creating one in the data dir.
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// DNS names and IP addresses the API's serving certificate carries besides the SPIFFE
    /// ID, for clients that check a host name: the admission webhook's (the Kubernetes API
    /// server checks them), `localhost`, the listen address, `--tls-san`. Empty: the
    /// control plane presents its SVID alone.
    pub serving_names: Vec<String>,
    /// How long a client may take to send a request's headers, and an HTTP/1.1 connection
    /// may sit idle between requests (slowloris guard; the API listens on every interface).
    pub header_timeout: Duration,
}

/// Why the control plane did not start.
///
/// Each message carries its cause in its own text and none is exposed as a
/// `source()`: callers print errors with `{:#}` (the whole chain), so a cause in both
/// places was printed twice ("Address already in use: Address already in use").
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--svid-ttl {}s is longer than the maximum of {} days ({}s); SVIDs are short-lived and renewed at half-life (the default is 1h)", ttl.as_secs(), MAX_SVID_TTL.as_secs() / 86_400, MAX_SVID_TTL.as_secs())]
    SvidTtlTooLong { ttl: Duration },
    #[error("data dir {path}: {error}")]
    DataDir { path: PathBuf, error: std::io::Error },
    #[error(
        "data dir {data_dir} holds a {what} for trust domain {found}, but --trust-domain is {configured}: start with --trust-domain {found}, or give trust domain {configured} its own --data-dir"
    )]
    TrustDomainMismatch { data_dir: PathBuf, what: &'static str, found: String, configured: TrustDomain },
    #[error(
        "data dir {data_dir} has {found} from an earlier start but its store ({STORE_FILE}) is missing or empty: \
         restore {STORE_FILE} from a backup (policies, tokens, the registry and the audit log are in it); \
         to start over on purpose, empty the data dir (keep ca.pem and ca-key.pem elsewhere and pass them \
         with --ca-cert/--ca-key to keep the proxies' trust)"
    )]
    StoreLost { data_dir: PathBuf, found: &'static str },
    #[error(
        "data dir {data_dir}: its store belongs to the mesh whose CA root has the fingerprint SHA256 {fingerprint}, \
         and no CA is given (no ca.pem there, no --ca-cert/--ca-key): restore ca.pem and ca-key.pem, or pass \
         --ca-cert/--ca-key as at the earlier starts; a new CA would leave every proxy's bundle.pem unable to \
         verify this control plane"
    )]
    CaLost { data_dir: PathBuf, fingerprint: String },
    #[error(
        "data dir {data_dir}: the mesh's CA root, recorded at an earlier start, is SHA256 {recorded} (given with \
         --ca-cert/--ca-key, or ca.pem there was replaced since), but ca.pem there is SHA256 {found}: pass the \
         mesh's CA with --ca-cert/--ca-key again; to make the data dir's ca.pem the mesh's CA on purpose, pass \
         it and its ca-key.pem as --ca-cert/--ca-key"
    )]
    CaNotTheMeshs { data_dir: PathBuf, recorded: String, found: String },
    #[error(
        "--ca-cert {cert}: {problem}; a Trellis CA names its trust domain in a URI SAN spiffe://<trust domain> \
         (proxies learn the trust domain from it), here spiffe://{configured}"
    )]
    CaTrustDomain { cert: PathBuf, problem: String, configured: TrustDomain },
    #[error(
        "{path}: {problem}; bundle.pem may hold only roots of trust domain {configured} (the current CA's and \
         earlier ones kept for a rotation): mend it, or delete it to have it rewritten with the current root \
         alone"
    )]
    BundleFile { path: PathBuf, problem: String, configured: TrustDomain },
    #[error("CA: {0}")]
    Ca(trellis_identity::CaError),
    #[error("trust bundle: {0}")]
    Bundle(trellis_identity::BundleError),
    /// `StoreError` names the store itself.
    #[error("{0}")]
    Store(crate::store::StoreError),
    #[error("control plane SVID: {0}")]
    Svid(String),
    #[error("TLS: {0}")]
    Tls(trellis_identity::TlsError),
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: SocketAddr, error: std::io::Error },
}

// By hand rather than `#[from]`, which would also make the inner error the `source()`.
impl From<trellis_identity::CaError> for StartError {
    fn from(e: trellis_identity::CaError) -> Self {
        StartError::Ca(e)
    }
}
impl From<trellis_identity::BundleError> for StartError {
    fn from(e: trellis_identity::BundleError) -> Self {
        StartError::Bundle(e)
    }
}
impl From<crate::store::StoreError> for StartError {
    fn from(e: crate::store::StoreError) -> Self {
        StartError::Store(e)
    }
}
impl From<trellis_identity::TlsError> for StartError {
    fn from(e: trellis_identity::TlsError) -> Self {
        StartError::Tls(e)
    }
}

/// Refuses an SVID lifetime above [`MAX_SVID_TTL`]. [`start`] calls it before anything
/// else; it is public so a caller can check its flags earlier.
pub fn check_svid_ttl(ttl: Duration) -> Result<(), StartError> {
    if ttl > MAX_SVID_TTL {
        return Err(StartError::SvidTtlTooLong { ttl });
    }
    Ok(())
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
    services: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, gives in-flight requests a moment, and returns.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.renewer.abort();
        self.expirer.abort();
        if let Some(s) = &self.services {
            s.abort();
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until the server stops (it only stops via [`Running::shutdown`]).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Prepares the data dir and starts serving; returns once the listener is bound.
pub async fn start(config: ControlConfig, hooks: Hooks) -> Result<Running, StartError> {
    check_svid_ttl(config.svid_ttl)?;
    // Bound before the data dir is touched: a port in use must not leave a new CA behind.
    let listener =
        TcpListener::bind(config.listen).await.map_err(|error| StartError::Listen { addr: config.listen, error })?;
    let local_addr = listener.local_addr().map_err(|error| StartError::Listen { addr: config.listen, error })?;

    // A CA given in files is checked before the data dir is touched: refused, it leaves nothing.
    let given_ca =
        config.ca_files.as_ref().map(|files| crate::mesh_ca::given(&config.trust_domain, files)).transpose()?;
    let dir = &config.data_dir;
    create_private_dir(dir)?;
    check_store_not_lost(dir)?;
    let store = Store::open(&dir.join(STORE_FILE))?;
    let recorded_td = store.trust_domain()?;
    if let Some(found) = recorded_td.as_deref().filter(|td| *td != config.trust_domain.as_str()) {
        return Err(mismatch(&config, "store", found.to_string()));
    }
    let earlier_bundle = crate::mesh_ca::earlier_bundle(dir, &config.trust_domain)?;
    let (ca, recorded_ca) = crate::mesh_ca::choose(&config, &store, given_ca)?;
    // Every SVID ends with the CA: within a few lifetimes of that, renewals give shorter and
    // shorter SVIDs, then none, and the mesh stops. Said now, while there is time to act.
    let ca_left = ca.not_after().duration_since(SystemTime::now()).unwrap_or_default();
    if ca_left < config.svid_ttl.saturating_mul(4).max(Duration::from_secs(7 * 24 * 3600)) {
        tracing::warn!(
            expires_in = ?ca_left,
            "the CA certificate expires soon; SVIDs cannot outlive it: switch the mesh to a new CA before then (docs/vm.md)"
        );
    }
    if recorded_td.is_none() {
        store.set_trust_domain(config.trust_domain.as_str())?;
    }
    let bundle = crate::mesh_ca::write_bundle(dir, earlier_bundle, &ca)?;
    let admin_token = load_or_create_admin_token(dir, recorded_ca.is_some())?;
    make_files_private(&config)?;
    let shared = Shared::load(Arc::new(store), bundle.clone())?;

    let control_id = SpiffeId::from_segments(&config.trust_domain, &["trellis", "control"])
        .map_err(|e| StartError::Svid(e.to_string()))?;
    let creds = CredentialStore::new();
    let resolver = Arc::new(OwnCert::new(creds.clone(), &config.serving_names));
    let svid_not_after = mint_own(&ca, &control_id, &creds, &resolver)?;
    let mut tls = server_config_with_resolver(
        resolver.clone(),
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
    let renewer = tokio::spawn(renew_own_svid(ctx.clone(), control_id, creds, resolver, svid_not_after));
    let expirer = tokio::spawn(expire_endpoints(shared.clone(), config.svid_ttl));
    let services =
        ctx.hooks.k8s_services.clone().map(|client| {
            tokio::spawn(crate::services::sync_loop(shared.clone(), client, crate::services::SYNC_EVERY))
        });
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(listener, Arc::new(tls), ctx, config.header_timeout, async {
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
        services,
    })
}

pub(crate) fn mismatch(config: &ControlConfig, what: &'static str, found: String) -> StartError {
    StartError::TrustDomainMismatch {
        data_dir: config.data_dir.clone(),
        what,
        found,
        configured: config.trust_domain.clone(),
    }
}

/// Creates the data dir mode 0700, or tightens an existing one to 0700 — if it is the control
/// plane's (empty, or holding its store or admin token). A directory the operator pointed at
/// that holds other things (`--data-dir .`, a home directory) keeps its mode: changing it could
/// break whatever else lives there; the files written in it are 0600 either way.
fn create_private_dir(dir: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |error| StartError::DataDir { path: dir.to_path_buf(), error };
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    }
    if !dir.is_dir() {
        return Err(err(std::io::Error::other("not a directory")));
    }
    let ours = std::fs::read_dir(dir).map_err(err)?.all(|entry| {
        entry.is_ok_and(|e| {
            let name = e.file_name();
            [STORE_FILE, ADMIN_TOKEN_FILE, BUNDLE_FILE, ca::CA_CERT_FILE, ca::CA_KEY_FILE].iter().any(|f| name == **f)
        })
    });
    if ours {
        return make_private(dir, 0o700);
    }
    tracing::warn!(dir = %dir.display(), "the data dir holds other files too; its mode is left as it is (the control plane's files in it are 0600)");
    Ok(())
}

/// Every file the control plane writes in the data dir, mode 0600, also when it already
/// existed with looser permissions (an older version, a umask, a copy).
fn make_files_private(config: &ControlConfig) -> Result<(), StartError> {
    let mut files = vec![BUNDLE_FILE, ADMIN_TOKEN_FILE, STORE_FILE];
    if config.ca_files.is_none() {
        files.extend([ca::CA_CERT_FILE, ca::CA_KEY_FILE]);
    }
    for file in files {
        let path = config.data_dir.join(file);
        if path.exists() {
            make_private(&path, 0o600)?;
        }
    }
    Ok(())
}

/// Sets `path`'s permission bits to `mode` if they differ. A path we may not chmod (not
/// ours, e.g. a Kubernetes volume's mount point owned by root with an fsGroup) is left as
/// it is with a warning: the files inside are still 0600, and refusing to start would break
/// such deployments.
fn make_private(path: &Path, mode: u32) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |error| StartError::DataDir { path: path.to_path_buf(), error };
    let current = std::fs::metadata(path).map_err(err)?.permissions().mode() & 0o7777;
    if current == mode {
        return Ok(());
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        Ok(()) => {
            // Others could read it until now (a key, the admin token): worth a warning.
            tracing::warn!(path = %path.display(), from = format!("{current:o}"), to = format!("{mode:o}"), "tightened permissions");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(path = %path.display(), mode = format!("{current:o}"), error = %e, "cannot make private (not ours); leaving as is");
            Ok(())
        }
        Err(e) => Err(err(e)),
    }
}

/// A data dir a control plane has run in (it writes its CA and admin token only after the
/// store exists) whose store is missing or empty lost its store: starting would open a new,
/// empty one — every policy gone, and the proxies, told version 0, would enforce nothing
/// but the default. Refused; the operator restores the file or says to start over.
fn check_store_not_lost(dir: &Path) -> Result<(), StartError> {
    let store = dir.join(STORE_FILE);
    let empty = match std::fs::metadata(&store) {
        Ok(m) => m.len() == 0,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(error) => return Err(StartError::DataDir { path: store, error }),
    };
    let ran_before = [ca::CA_CERT_FILE, ADMIN_TOKEN_FILE].into_iter().find(|f| dir.join(f).exists());
    match ran_before {
        Some(found) if empty => Err(StartError::StoreLost { data_dir: dir.to_path_buf(), found }),
        _ => Ok(()),
    }
}

/// The admin token in the data dir, or a new one. `ran_before`: a store from an earlier start
/// exists, so a missing token was lost or removed — the CLI's copies stop working, said loudly.
fn load_or_create_admin_token(dir: &Path, ran_before: bool) -> Result<String, StartError> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    let err = |error| StartError::DataDir { path: path.clone(), error };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => Err(err(std::io::Error::other("admin token file is empty"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = crate::tokens::mint();
            write_private(&path, format!("{token}\n").as_bytes(), 0o600).map_err(err)?;
            if ran_before {
                tracing::warn!(path = %path.display(), "admin.token was missing: created a new one; copies of the old one no longer work");
            } else {
                tracing::info!(path = %path.display(), "created the admin token");
            }
            Ok(token)
        }
        Err(e) => Err(err(e)),
    }
}

/// The control plane's own certificates, both for [`CONTROL_SVID_TTL`] and renewed together:
/// its SVID and the serving certificate for [`ControlConfig::serving_names`].
fn mint_own(
    ca: &CertificateAuthority,
    id: &SpiffeId,
    creds: &CredentialStore,
    resolver: &OwnCert,
) -> Result<SystemTime, StartError> {
    let key = WorkloadKey::generate().map_err(|e| StartError::Svid(e.to_string()))?;
    let csr = key.csr(id).map_err(|e| StartError::Svid(e.to_string()))?;
    let issued = ca.sign_csr(&csr, id, CONTROL_SVID_TTL).map_err(|e| StartError::Svid(e.to_string()))?;
    let svid = key.into_svid(issued.chain).map_err(|e| StartError::Svid(e.to_string()))?;
    creds.set(svid).map_err(|e| StartError::Svid(e.to_string()))?;
    resolver.renew_serving(ca, id)?;
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

async fn renew_own_svid(
    ctx: Arc<Ctx>,
    id: SpiffeId,
    creds: Arc<CredentialStore>,
    resolver: Arc<OwnCert>,
    not_after: SystemTime,
) {
    let mut wait = half_life_left(not_after);
    loop {
        tokio::time::sleep(wait).await;
        wait = match mint_own(&ctx.ca, &id, &creds, &resolver) {
            Ok(not_after) => half_life_left(not_after),
            Err(e) => {
                tracing::error!(error = %e, "could not renew the control plane's SVID; retrying in 60s");
                Duration::from_secs(60)
            }
        };
    }
}

/// Half of what is left of a certificate's life: when to renew it.
fn half_life_left(not_after: SystemTime) -> Duration {
    not_after.duration_since(SystemTime::now()).unwrap_or_default() / 2
}

/// Presents the control plane's serving certificate: its SPIFFE ID, which proxies and the
/// CLI check, and the DNS names and IP addresses clients that check a host name need — the
/// Kubernetes API server calling the webhook, curl or an OpenAPI client calling the API with
/// `--cacert bundle.pem`. It is issued by the same CA, lives no longer than the SVID and is
/// renewed with it; with no names at all (a caller's choice in tests), the SVID alone.
#[derive(Debug)]
struct OwnCert {
    svid: Arc<CredentialStore>,
    dns_names: Vec<String>,
    serving: arc_swap::ArcSwapOption<trellis_identity::rustls::sign::CertifiedKey>,
}

impl OwnCert {
    fn new(svid: Arc<CredentialStore>, dns_names: &[String]) -> Self {
        OwnCert { svid, dns_names: dns_names.to_vec(), serving: Default::default() }
    }

    /// A new serving certificate for the names (none without names).
    fn renew_serving(&self, ca: &CertificateAuthority, id: &SpiffeId) -> Result<(), StartError> {
        if self.dns_names.is_empty() {
            return Ok(());
        }
        let (chain, key) = ca.issue_serving_cert(&self.dns_names, id, CONTROL_SVID_TTL)?;
        let key = trellis_identity::crypto_provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| StartError::Svid(e.to_string()))?;
        self.serving.store(Some(Arc::new(trellis_identity::rustls::sign::CertifiedKey::new(chain, key))));
        Ok(())
    }
}

impl trellis_identity::rustls::server::ResolvesServerCert for OwnCert {
    fn resolve(
        &self,
        hello: trellis_identity::rustls::server::ClientHello<'_>,
    ) -> Option<Arc<trellis_identity::rustls::sign::CertifiedKey>> {
        // Whatever name is asked (none, for an IP address): the client checks the SANs.
        let _ = hello;
        self.serving.load_full().or_else(|| self.svid.certified_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each renewal of the serving certificate is a new certificate for the same names and ID,
    /// living no longer than the control plane's SVID; without names there is none.
    #[test]
    fn the_serving_certificate_is_renewed_whole() {
        let td = TrustDomain::parse("cluster.local").unwrap();
        let ca = CertificateAuthority::create_root(&td, CA_LIFETIME).unwrap();
        let id = SpiffeId::from_segments(&td, &["trellis", "control"]).unwrap();
        let resolver = OwnCert::new(CredentialStore::new(), &["trellis-control.trellis-system.svc".into()]);
        let serving = |r: &OwnCert| {
            let key = r.serving.load_full().expect("a serving certificate");
            trellis_identity::CertInfo::parse(&key.cert[0]).unwrap()
        };
        resolver.renew_serving(&ca, &id).unwrap();
        let first = serving(&resolver);
        resolver.renew_serving(&ca, &id).unwrap();
        let second = serving(&resolver);
        assert_ne!(first.serial_hex, second.serial_hex);
        assert_eq!(second.uri_sans, [id.to_string()]);
        assert!(second.not_after <= SystemTime::now() + CONTROL_SVID_TTL);

        let without = OwnCert::new(CredentialStore::new(), &[]);
        without.renew_serving(&ca, &id).unwrap();
        assert!(without.serving.load_full().is_none());
    }

    #[test]
    fn renewal_is_due_at_half_the_life_left() {
        let in_ten_hours = SystemTime::now() + Duration::from_secs(10 * 3600);
        let wait = half_life_left(in_ten_hours);
        assert!(wait <= Duration::from_secs(5 * 3600) && wait > Duration::from_secs(5 * 3600 - 60), "{wait:?}");
        assert_eq!(half_life_left(SystemTime::now() - Duration::from_secs(1)), Duration::ZERO);
    }
}
