//! The proxy's identity over time: bootstrap (join token, Kubernetes token, or an SVID kept
//! from a previous run), then renewal at half-life with jitter for as long as it runs.
//!
//! The private key is generated here and never leaves the process (or its state dir,
//! mode 0600). A renewal that fails keeps the current SVID in place and retries with
//! backoff; only a new SVID in hand replaces it.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use trellis_control::api::{BootstrapRequest, RenewRequest, SvidResponse};
use trellis_control::{ClientError, ControlClient};
use trellis_identity::pem::{self, write_private};
use trellis_identity::verify::SpiffeClientVerifier;
use trellis_identity::{Svid, TrustBundle, WorkloadKey};

use crate::ProxyError;
use crate::config::{Attestation, InboundSpec};
use crate::state::ProxyState;

const SVID_FILE: &str = "svid.pem";
const KEY_FILE: &str = "svid-key.pem";

/// Where the first SVID came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Issued now, with this start's addresses registered.
    Issued,
    /// Kept from an earlier run: the control plane has not heard this start's addresses.
    Kept,
}

/// Gets the first SVID: from the state dir if a valid one is there, else by attestation.
/// Transport failures are retried with backoff; a refused token is fatal (it will not
/// get better by retrying).
pub async fn obtain(state: &Arc<ProxyState>, anon: &ControlClient, bundle: &TrustBundle) -> Result<Origin, ProxyError> {
    let no_token = matches!(&state.config.attestation, Attestation::JoinToken(t) if t.trim().is_empty());
    let mut unusable = "no SVID is kept there".to_string();
    if let Some(dir) = &state.config.state_dir {
        match load_persisted(dir).map(|svid| svid.and_then(|svid| vouched_for(svid, bundle))) {
            Some(Ok(svid)) => {
                tracing::info!(spiffe_id = %svid.id(), "using the SVID kept in the state dir");
                if !no_token {
                    // A VM cloned with its state dir, or repurposed, would otherwise keep the old
                    // identity quietly: say which one stands.
                    tracing::warn!(
                        spiffe_id = %svid.id(),
                        "the join token given is not used: the SVID kept in the state dir stands, with its identity; \
                         empty the state dir to join with the token"
                    );
                }
                return install(state, svid).map(|()| Origin::Kept);
            }
            // Issued by a CA this bundle does not hold (the control plane's data was
            // rebuilt): it would be refused at every renewal, and the proxy never ready. Or
            // about to expire: too late to renew with it.
            Some(Err(why)) => {
                tracing::warn!(dir = %dir.display(), %why, "not using the SVID kept in the state dir");
                unusable = format!("the SVID kept there is not usable: {why}");
            }
            None => {}
        }
        if no_token {
            return Err(ProxyError::Bootstrap(format!(
                "no join token given, and the state dir {} cannot stand in for one: {unusable}; pass --token or \
                 --token-file (see `trellis token create`)",
                dir.display()
            )));
        }
        // Before a single-use join token is spent: an SVID that cannot be kept would need
        // a new token at the next start.
        writable(dir).map_err(|e| {
            ProxyError::Bootstrap(format!(
                "the state dir {} is not usable ({e}); nothing was asked of the control plane",
                dir.display()
            ))
        })?;
    }
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(15));
    loop {
        match bootstrap(state, anon).await {
            Ok(svid) => {
                tracing::info!(spiffe_id = %svid.id(), "SVID issued");
                return install(state, svid).map(|()| Origin::Issued);
            }
            Err(ClientError::Api { status, body }) if status.is_client_error() => {
                return Err(ProxyError::Bootstrap(format!(
                    "the control plane refused the bootstrap ({status}): {body}"
                )));
            }
            // Its message says which flags to check; retrying cannot help.
            Err(e) if e.is_untrusted_server() => return Err(ProxyError::Bootstrap(e.to_string())),
            Err(e) => {
                tracing::warn!(error = %e, "bootstrap failed; retrying");
                tokio::select! {
                    () = backoff.wait() => {}
                    () = state.shutdown.cancelled() => return Err(ProxyError::Bootstrap("shut down before an SVID was issued".into())),
                }
            }
        }
    }
}

/// A control plane whose certificate the bundle cannot vouch for will not become trusted by
/// retrying: a wrong `--ca-bundle` or `--control` is a configuration error, reported and fatal.
/// Time-related failures (clock skew, a certificate about to be renewed) and handshakes cut
/// short are retried.
async fn bootstrap(state: &ProxyState, anon: &ControlClient) -> Result<Svid, ClientError> {
    let key = WorkloadKey::generate().map_err(|e| ClientError::Local(e.to_string()))?;
    let csr = key.anonymous_csr().map_err(|e| ClientError::Local(e.to_string()))?;
    let (token, k8s_token) = match &state.config.attestation {
        Attestation::JoinToken(t) => (Some(t.trim().to_string()), None),
        Attestation::KubernetesTokenFile(path) => {
            let t = std::fs::read_to_string(path)
                .map_err(|e| ClientError::Local(format!("reading the Kubernetes token {}: {e}", path.display())))?;
            (None, Some(t.trim().to_string()))
        }
    };
    let req = BootstrapRequest { token, k8s_token, csr_pem: pem::csr_to_pem(&csr), addresses: addresses(state) };
    let resp = anon.bootstrap(&req).await?;
    into_svid(key, &resp)
}

fn into_svid(key: WorkloadKey, resp: &SvidResponse) -> Result<Svid, ClientError> {
    let chain =
        pem::certs_from_pem("SVID chain", resp.chain_pem.as_bytes()).map_err(|e| ClientError::Decode(e.to_string()))?;
    key.into_svid(chain).map_err(|e| ClientError::Decode(e.to_string()))
}

/// The addresses to put in the endpoint registry: the advertised IP for transparent
/// listeners, `ip:port=APP_PORT` for explicit ones (callers connect to the listener; policy
/// judges the connection at the app's port, and so must the control plane's `policy check`).
fn addresses(state: &ProxyState) -> Vec<String> {
    registrations(&state.config.inbound, state.config.advertise_ip)
}

/// [`addresses`], from the inbound listeners and the advertised IP. A listener on every
/// address (`0.0.0.0`, `::`) is reached at the advertised IP; one on a specific address at
/// that address — but a loopback listener only in a mesh on one host (no advertised IP, or a
/// loopback one): from other hosts nothing reaches it, and every host has a `127.0.0.1`.
/// Two listeners that come to one address: the specific one is registered, as it is the one
/// the kernel hands the connections to.
fn registrations(inbound: &[InboundSpec], advertise_ip: Option<IpAddr>) -> Vec<String> {
    let (specific, every): (Vec<&InboundSpec>, Vec<&InboundSpec>) =
        inbound.iter().partition(|spec| !spec.listen.ip().is_unspecified());
    let mut out: Vec<String> = Vec::new();
    for spec in specific.into_iter().chain(every) {
        let Some(ip) = registered_ip(spec.listen.ip(), advertise_ip) else { continue };
        let entry = match spec.app {
            None => ip.to_string(),
            Some(app) => format!("{}={}", std::net::SocketAddr::new(ip, spec.listen.port()), app.port()),
        };
        let address = entry.split('=').next().unwrap_or_default();
        if !out.iter().any(|e| e.split('=').next() == Some(address)) {
            out.push(entry);
        }
    }
    out
}

fn registered_ip(listen: IpAddr, advertise_ip: Option<IpAddr>) -> Option<IpAddr> {
    if listen.is_unspecified() {
        return advertise_ip;
    }
    if listen.is_loopback() && advertise_ip.is_some_and(|a| !a.is_loopback()) {
        return None;
    }
    Some(listen)
}

fn install(state: &ProxyState, svid: Svid) -> Result<(), ProxyError> {
    let expiry = unix_seconds(svid.not_after());
    if let Some(dir) = &state.config.state_dir {
        persist(dir, &svid);
    }
    state.creds.set(svid).map_err(|e| ProxyError::Bootstrap(e.to_string()))?;
    if let Some(tls) = state.tls.load_full() {
        tls.forget_sessions();
    }
    state.metrics.svid_expiry.set(expiry as i64);
    Ok(())
}

fn persist(dir: &Path, svid: &Svid) {
    let ok = std::fs::create_dir_all(dir)
        .and_then(|()| write_private(&dir.join(KEY_FILE), svid.key_pem().as_bytes(), 0o600))
        .and_then(|()| write_private(&dir.join(SVID_FILE), svid.chain_pem().as_bytes(), 0o644));
    if let Err(e) = ok {
        tracing::warn!(dir = %dir.display(), error = %e, "could not keep the SVID in the state dir");
    }
}

/// The kept SVID, if it chains to `bundle` with an ID in the bundle's trust domain.
fn vouched_for(svid: Svid, bundle: &TrustBundle) -> Result<Svid, String> {
    let domains = bundle.trust_domain().into_iter().collect();
    let verifier = SpiffeClientVerifier::new(bundle.root_store(), trellis_identity::crypto_provider(), domains, true)
        .map_err(|e| e.to_string())?;
    let now = trellis_identity::pki_types::UnixTime::now();
    verifier
        .verify_chain(svid.chain(), now)
        .map_err(|e| format!("it does not verify against the trust bundle: {e}"))?;
    Ok(svid)
}

/// Creates `dir` if needed and proves a file can be written there.
fn writable(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(".trellis-write-check");
    write_private(&probe, b"", 0o600)?;
    std::fs::remove_file(probe)
}

/// The SVID kept in `dir`: `None` if there is none, `Err` if it cannot be used.
fn load_persisted(dir: &Path) -> Option<Result<Svid, String>> {
    let chain = std::fs::read(dir.join(SVID_FILE)).ok()?;
    let key = std::fs::read(dir.join(KEY_FILE)).ok()?;
    let svid = match Svid::from_pem(&chain, &key) {
        Ok(svid) => svid,
        Err(e) => return Some(Err(format!("it does not load: {e}"))),
    };
    // Only worth keeping if there is time left to renew it over mTLS (done at once).
    let now = SystemTime::now();
    let at = svid.not_after().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if svid.not_after() <= now {
        return Some(Err(format!("it expired at {at} (Unix seconds)")));
    }
    if svid.not_after() <= now + KEPT_SVID_MIN_LIFE {
        let left = KEPT_SVID_MIN_LIFE.as_secs();
        return Some(Err(format!("it expires at {at} (Unix seconds), less than {left}s from now")));
    }
    Some(Ok(svid))
}

/// A kept SVID closer to its end than this is not used: too little time to renew with it.
/// A kept SVID is renewed as the proxy starts, which takes a round trip; more would refuse
/// every kept SVID under a short `--svid-ttl` (renewed at half-life, one of 30 s has 15 s left
/// at most).
const KEPT_SVID_MIN_LIFE: Duration = Duration::from_secs(5);

/// Renews at half the remaining life (±10% jitter so a fleet does not renew in lockstep),
/// forever. `client` presents the current SVID.
pub async fn renew_loop(state: Arc<ProxyState>, client: ControlClient, anon: ControlClient, origin: Origin) {
    // A kept SVID is renewed at once: the renewal registers this start's addresses (an
    // `--advertise-ip` changed since), which the control plane otherwise learns only at
    // half-life.
    let mut now = origin == Origin::Kept;
    loop {
        let Some(current) = state.creds.current() else { return };
        let at = current.svid.renew_at(current.received);
        let wait = if std::mem::take(&mut now) {
            Duration::ZERO
        } else {
            jitter(at.duration_since(SystemTime::now()).unwrap_or_default())
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = state.shutdown.cancelled() => return,
        }
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            match renew(&state, &client, &current.svid).await {
                Ok(svid) => {
                    tracing::info!(spiffe_id = %svid.id(), not_after = %unix_seconds(svid.not_after()), "SVID renewed");
                    if let Err(e) = install(&state, svid) {
                        tracing::error!(error = %e, "renewed SVID could not be installed");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "SVID renewal failed; keeping the current SVID and retrying");
                    // A Kubernetes token can attest again once the SVID itself has expired.
                    if current.svid.not_after() <= SystemTime::now()
                        && matches!(state.config.attestation, Attestation::KubernetesTokenFile(_))
                        && let Ok(svid) = bootstrap(&state, &anon).await
                    {
                        let _ = install(&state, svid);
                        break;
                    }
                }
            }
            tokio::select! {
                () = backoff.wait() => {}
                () = state.shutdown.cancelled() => return,
            }
        }
    }
}

async fn renew(state: &ProxyState, client: &ControlClient, current: &Svid) -> Result<Svid, ClientError> {
    let key = WorkloadKey::generate().map_err(|e| ClientError::Local(e.to_string()))?;
    let csr = key.csr(current.id()).map_err(|e| ClientError::Local(e.to_string()))?;
    let resp = client.renew(&RenewRequest { csr_pem: pem::csr_to_pem(&csr), addresses: addresses(state) }).await?;
    into_svid(key, &resp)
}

/// ±10%.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.9 + rand::random::<f64>() * 0.2)
}

/// Exponential backoff with full jitter.
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(start: Duration, max: Duration) -> Self {
        Backoff { next: start, max }
    }

    pub fn reset(&mut self, start: Duration) {
        self.next = start;
    }

    pub async fn wait(&mut self) {
        let d = self.next.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        self.next = (self.next * 2).min(self.max);
        tokio::time::sleep(d).await;
    }
}

/// A time as log fields show it: seconds since the epoch (`SystemTime`'s `Debug` is a struct).
fn unix_seconds(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kept SVID is used while a renewal can still be made with it (it is renewed at
    /// start): one of a short `--svid-ttl` with seconds left is, an expired one is not.
    #[test]
    fn a_kept_svid_is_used_until_seconds_before_its_end() {
        use trellis_identity::{CertificateAuthority, SpiffeId, TrustDomain, WorkloadKey};
        let td = TrustDomain::parse("cluster.local").unwrap();
        let ca = CertificateAuthority::create_root(&td, Duration::from_secs(3600)).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let kept = |ttl: u64, issued_ago: u64| {
            let dir = tempfile::tempdir().unwrap();
            let key = WorkloadKey::generate().unwrap();
            let at = SystemTime::now() - Duration::from_secs(issued_ago);
            let issued = ca.sign_csr_at(&key.csr(&id).unwrap(), &id, Duration::from_secs(ttl), at).unwrap();
            persist(dir.path(), &key.into_svid(issued.chain).unwrap());
            load_persisted(dir.path()).unwrap().map(|_| ())
        };
        assert_eq!(kept(30, 15), Ok(()), "a 30 s SVID at half-life");
        assert!(kept(30, 27).unwrap_err().contains("less than 5s from now"));
        assert!(kept(30, 60).unwrap_err().contains("it expired at"));
    }

    #[test]
    fn each_listener_is_registered_once_as_callers_reach_it() {
        let spec = |listen: &str, app: Option<&str>| InboundSpec {
            listen: listen.parse().unwrap(),
            app: app.map(|a| a.parse().unwrap()),
        };
        let inbound = [
            spec("127.0.0.1:9000", Some("127.0.0.1:1111")),
            spec("0.0.0.0:9000", Some("127.0.0.1:8080")),
            spec("0.0.0.0:15006", None),
            spec("127.0.0.1:9001", Some("127.0.0.1:9090")),
            spec("10.0.0.6:9002", Some("127.0.0.1:7070")),
            spec("[::1]:9003", Some("127.0.0.1:6060")),
        ];
        // A host of a real mesh: loopback listeners stay off the registry (nobody else reaches
        // them, and every host has a 127.0.0.1:9001); a specific address is its own.
        let ip = "10.0.0.5".parse().ok();
        assert_eq!(registrations(&inbound, ip), ["10.0.0.6:9002=7070", "10.0.0.5:9000=8080", "10.0.0.5"]);
        // No advertised IP: a listener on every address names no address of its own.
        assert_eq!(
            registrations(&inbound, None),
            ["127.0.0.1:9000=1111", "127.0.0.1:9001=9090", "10.0.0.6:9002=7070", "[::1]:9003=6060"]
        );
        // A mesh on one host, advertised at a loopback address: each listener at its own
        // address (the IPv6 one included), those on every address at the advertised one.
        let one_host = "127.0.0.2".parse().ok();
        assert_eq!(
            registrations(&inbound, one_host),
            [
                "127.0.0.1:9000=1111",
                "127.0.0.1:9001=9090",
                "10.0.0.6:9002=7070",
                "[::1]:9003=6060",
                "127.0.0.2:9000=8080",
                "127.0.0.2"
            ]
        );
        // The specific listener wins the address both would register.
        let both = [spec("0.0.0.0:9000", Some("127.0.0.1:8080")), spec("10.0.0.5:9000", Some("127.0.0.1:1111"))];
        assert_eq!(registrations(&both, ip), ["10.0.0.5:9000=1111"]);
    }
}
