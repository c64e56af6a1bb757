//! The proxy's hot state: one immutable snapshot per domain, swapped whole.
//!
//! - [`PolicyView`]: the compiled policy snapshot and whether the control plane has sent
//!   one yet (before it has, everything is denied: fail closed);
//! - [`Registry`]: the endpoint registry (address → SPIFFE ID) and the Kubernetes service
//!   table (ClusterIP:port → endpoints) for transparent outbound;
//! - [`TlsState`]: the rustls server config and the per-peer client configs, rebuilt
//!   together whenever the trust bundle changes (the SVID itself rotates underneath them
//!   through the shared `CredentialStore`).
//!
//! Readers `load()` a snapshot once per connection or request and use it throughout, so a
//! swap never splits a decision between two versions.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use trellis_identity::rustls::{ClientConfig, ServerConfig};
use trellis_identity::{ClientAuth, CredentialStore, SpiffeId, TlsError, TrustBundle, TrustDomain};
use trellis_policy::{Action, Defaults, PolicySnapshot};

use crate::config::ProxyConfig;
use crate::conns::{ConnTracker, Tracked, TrackedFlow};
use crate::metrics::Metrics;

/// ALPN a Trellis outbound offers for a raw TCP tunnel, so the peer's inbound never sniffs
/// (server-speaks-first protocols must not wait out a detect timeout).
pub const ALPN_OPAQUE: &[u8] = b"trellis.opaque";
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The protocol an outbound connection to a peer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerProtocol {
    /// Pooled, multiplexed HTTP/2 between sidecars.
    H2,
    /// One HTTP/1.1 exchange that will upgrade (WebSocket and friends).
    Http1,
    /// A byte tunnel.
    Opaque,
}

impl PeerProtocol {
    fn alpn(self) -> &'static [u8] {
        match self {
            PeerProtocol::H2 => ALPN_H2,
            PeerProtocol::Http1 => ALPN_HTTP11,
            PeerProtocol::Opaque => ALPN_OPAQUE,
        }
    }
}

/// The policy being enforced.
#[derive(Debug)]
pub struct PolicyView {
    pub snapshot: PolicySnapshot,
    /// False until the control plane's first push: until then the snapshot is empty and
    /// denies everything, whatever `--default-action` says.
    pub applied: bool,
}

impl PolicyView {
    pub fn fail_closed() -> Self {
        PolicyView {
            snapshot: PolicySnapshot::empty(Defaults { mesh: Action::Deny, egress: Action::Deny }),
            applied: false,
        }
    }
}

/// Who answers at which address, as the control plane last said: the endpoint registry and
/// the Kubernetes service table, in one snapshot.
#[derive(Debug, Default)]
pub struct Registry {
    pub version: u64,
    exact: HashMap<SocketAddr, SpiffeId>,
    by_ip: HashMap<IpAddr, SpiffeId>,
    /// The service table as the control plane sent it: a Service's virtual `ip:port` → its
    /// ready endpoints (`podIP:targetPort`), kept to resolve again when the registry changes.
    service_table: HashMap<SocketAddr, Vec<SocketAddr>>,
    /// The same, resolved: each Service's endpoints in the mesh and the identity there;
    /// Services with none are left out (their calls are egress).
    services: HashMap<SocketAddr, Vec<(SocketAddr, SpiffeId)>>,
    pub services_version: u64,
    /// Spreads new connections to a Service over its endpoints.
    next: AtomicUsize,
}

impl Registry {
    pub fn new(version: u64, entries: impl IntoIterator<Item = (String, SpiffeId)>) -> Self {
        let mut r = Registry { version, ..Registry::default() };
        for (address, id) in entries {
            if let Ok(sa) = address.parse::<SocketAddr>() {
                r.exact.insert(sa, id);
            } else if let Ok(ip) = address.parse::<IpAddr>() {
                r.by_ip.insert(ip, id);
            }
        }
        r
    }

    /// A service table as the watch stream carries it (`ip:port` → `ip:port`s); entries
    /// that are not addresses are skipped.
    pub fn parse_services<'a>(
        services: impl IntoIterator<Item = (&'a str, &'a [String])>,
    ) -> HashMap<SocketAddr, Vec<SocketAddr>> {
        services
            .into_iter()
            .filter_map(|(vip, endpoints)| {
                let endpoints = endpoints.iter().filter_map(|e| e.parse().ok()).collect();
                Some((vip.parse().ok()?, endpoints))
            })
            .collect()
    }

    /// This registry with the service table `table` of `version`, each Service's endpoints
    /// resolved against the registry once, here.
    pub fn with_services(mut self, version: u64, table: HashMap<SocketAddr, Vec<SocketAddr>>) -> Self {
        self.services_version = version;
        self.services = table
            .iter()
            .filter_map(|(vip, endpoints)| {
                let meshed: Vec<(SocketAddr, SpiffeId)> =
                    endpoints.iter().filter_map(|e| Some((*e, self.resolve(*e)?.clone()))).collect();
                (!meshed.is_empty()).then_some((*vip, meshed))
            })
            .collect();
        self.service_table = table;
        self
    }

    /// The next snapshot after an update bringing a new registry, a new service table, or
    /// both; what the update does not bring is carried over from this one.
    pub fn updated(
        &self,
        endpoints: Option<Registry>,
        services: Option<(u64, HashMap<SocketAddr, Vec<SocketAddr>>)>,
    ) -> Registry {
        let base = endpoints.unwrap_or_else(|| Registry {
            version: self.version,
            exact: self.exact.clone(),
            by_ip: self.by_ip.clone(),
            ..Registry::default()
        });
        let (version, table) = services.unwrap_or_else(|| (self.services_version, self.service_table.clone()));
        base.with_services(version, table)
    }

    /// The mesh workload at `addr`, if it is in the mesh.
    pub fn resolve(&self, addr: SocketAddr) -> Option<&SpiffeId> {
        self.exact.get(&addr).or_else(|| self.by_ip.get(&addr.ip()))
    }

    /// Where a connection to `addr` goes in the mesh, and the identity it must prove: the
    /// workload at `addr`, or — `addr` being a Service — one of its endpoints in the mesh,
    /// taken in turn. `None`: outside the mesh (egress).
    pub fn target(&self, addr: SocketAddr) -> Option<(SocketAddr, &SpiffeId)> {
        if let Some(id) = self.resolve(addr) {
            return Some((addr, id));
        }
        let endpoints = self.services.get(&addr)?;
        let (ep, id) = &endpoints[self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len()];
        Some((*ep, id))
    }

    /// Other endpoints in the mesh of the Service at `vip` than `failed`, at most `n`, for a
    /// call whose endpoint could not be reached (it went away since the last table).
    pub fn alternatives(&self, vip: SocketAddr, failed: SocketAddr, n: usize) -> Vec<(SocketAddr, SpiffeId)> {
        let endpoints = self.services.get(&vip).map(Vec::as_slice).unwrap_or_default();
        endpoints.iter().filter(|(a, _)| *a != failed).take(n).cloned().collect()
    }

    /// Services with at least one endpoint in the mesh.
    pub fn services_len(&self) -> usize {
        self.services.len()
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// rustls configs for one trust bundle.
pub struct TlsState {
    pub bundle: TrustBundle,
    pub server: Arc<ServerConfig>,
    trust_domain: TrustDomain,
    creds: Arc<CredentialStore>,
    clients: Mutex<HashMap<(SpiffeId, PeerProtocol), Arc<ClientConfig>>>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState").field("bundle", &self.bundle).finish_non_exhaustive()
    }
}

impl TlsState {
    pub fn new(bundle: TrustBundle, trust_domain: TrustDomain, creds: Arc<CredentialStore>) -> Result<Self, TlsError> {
        let mut server = trellis_identity::server_config(
            creds.clone(),
            &bundle,
            std::slice::from_ref(&trust_domain),
            ClientAuth::Required,
        )?;
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec(), ALPN_OPAQUE.to_vec()];
        // Peers resume sessions with tickets instead of a full handshake each time.
        server.ticketer = trellis_identity::rustls::crypto::ring::Ticketer::new().map_err(TlsError::Config)?;
        server.send_tls13_tickets = 2;
        Ok(TlsState { bundle, server: Arc::new(server), trust_domain, creds, clients: Mutex::new(HashMap::new()) })
    }

    /// The client config that requires the peer to be `expected`, cached per peer so TLS
    /// sessions resume.
    pub fn client(&self, expected: &SpiffeId, protocol: PeerProtocol) -> Result<Arc<ClientConfig>, TlsError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&(expected.clone(), protocol)) {
            return Ok(c.clone());
        }
        let mut cfg = trellis_identity::client_config(Some(self.creds.clone()), &self.bundle, expected.clone())?;
        cfg.alpn_protocols = vec![protocol.alpn().to_vec()];
        let cfg = Arc::new(cfg);
        clients.insert((expected.clone(), protocol), cfg.clone());
        Ok(cfg)
    }

    /// Drops the per-peer client configs and with them their TLS session caches, so no
    /// later connection resumes a session made with a previous SVID (a resumed session
    /// shows the peer the certificate of the handshake it resumes).
    pub fn forget_sessions(&self) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
}

/// How the link to the control plane is doing, for `/config` and `/ready`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlStatus {
    pub connected: bool,
    pub session: Option<u64>,
    pub last_error: Option<String>,
    pub reconnects: u64,
    pub acked_version: Option<u64>,
}

/// Everything the data path shares.
pub struct ProxyState {
    pub config: ProxyConfig,
    pub creds: Arc<CredentialStore>,
    pub policy: ArcSwap<PolicyView>,
    pub registry: ArcSwap<Registry>,
    /// Set once the first SVID is in hand (its trust domain is what the verifiers accept).
    pub tls: ArcSwapOption<TlsState>,
    pub control: Mutex<ControlStatus>,
    pub metrics: Metrics,
    pub telemetry: crate::telemetry::Telemetry,
    pub conns: Arc<ConnTracker>,
    /// Cancelled on SIGTERM: listeners stop accepting and connections start draining.
    pub shutdown: CancellationToken,
    /// Cancelled when the first policy is applied (a token, so a late waiter sees it too).
    pub first_policy: CancellationToken,
    pub pools: crate::pool::PeerPools,
    pub app: crate::app::AppClients,
}

impl std::fmt::Debug for ProxyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyState").finish_non_exhaustive()
    }
}

/// Logs a failed accept at most once a second, with how many went unlogged: out of file
/// descriptors, every retry fails (~50 a second per listener), and the log would fill with
/// the same line while the condition lasts.
fn accept_failed(e: &std::io::Error, direction: &'static str) {
    static THROTTLE: OncePerSecond = OncePerSecond::new();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if let Some(unlogged) = THROTTLE.admit(now) {
        tracing::warn!(error = %e, direction, unlogged, "accept failed (retrying; at most one such line a second)");
    }
}

/// Lets one event a second through, counting the others.
struct OncePerSecond {
    last: std::sync::atomic::AtomicU64,
    unlogged: std::sync::atomic::AtomicU64,
}

impl OncePerSecond {
    const fn new() -> Self {
        OncePerSecond { last: std::sync::atomic::AtomicU64::new(0), unlogged: std::sync::atomic::AtomicU64::new(0) }
    }

    /// `Some(events held back since the last one admitted)` for the first event of second
    /// `now`, `None` for the others.
    fn admit(&self, now: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.last.swap(now, Relaxed) == now {
            self.unlogged.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.unlogged.swap(0, Relaxed))
    }
}

impl ProxyState {
    /// The listener's next connection, with `TCP_NODELAY` set, or `None` once the proxy shuts
    /// down. A failed accept (out of file descriptors, a connection reset while queued) is
    /// logged and retried after a pause rather than ending the listener.
    pub async fn accept(&self, listener: &TcpListener, direction: &'static str) -> Option<(TcpStream, SocketAddr)> {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, remote)) => {
                        let _ = tcp.set_nodelay(true);
                        return Some((tcp, remote));
                    }
                    Err(e) => {
                        accept_failed(&e, direction);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
                () = self.shutdown.cancelled() => return None,
            }
        }
    }

    /// Registers a connection allowed by the snapshot of version `decided_by`. A policy change
    /// applied between that decision and this registration rechecked the open connections
    /// without this one (on a multi-threaded runtime, or across an await), so it is judged
    /// again here when the snapshot has moved on.
    pub fn track(&self, flow: TrackedFlow, cancel: CancellationToken, decided_by: u64) -> Tracked {
        let tracked = self.conns.track(flow, cancel);
        self.recheck_if_moved(&tracked, decided_by);
        tracked
    }

    /// [`ProxyState::track`] for a flow carried by the connection of `family` (an HTTP
    /// request in flight).
    pub fn track_in(&self, family: u64, flow: TrackedFlow, cancel: CancellationToken, decided_by: u64) -> Tracked {
        let tracked = self.conns.track_in(family, flow, cancel);
        self.recheck_if_moved(&tracked, decided_by);
        tracked
    }

    /// [`ProxyState::track`]'s recheck, for a registration updated with a newer decision.
    pub fn recheck_if_moved(&self, tracked: &Tracked, decided_by: u64) {
        let view = self.policy.load();
        if view.snapshot.version() != decided_by && tracked.recheck(&view.snapshot) {
            self.metrics.connections_revoked.inc();
        }
    }

    /// This proxy's own identity (present once the SVID is issued).
    pub fn id(&self) -> Option<SpiffeId> {
        self.creds.id()
    }

    pub fn ready(&self) -> Result<(), &'static str> {
        if self.shutdown.is_cancelled() {
            return Err("draining: the proxy is shutting down");
        }
        let not_after = self.creds.current().map(|c| c.svid.not_after());
        readiness(not_after, self.policy.load().applied, SystemTime::now())
    }

    pub fn control_status(&self) -> ControlStatus {
        self.control.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update_control(&self, f: impl FnOnce(&mut ControlStatus)) {
        f(&mut self.control.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Ready means an SVID that still works and a policy to enforce (DESIGN §5). An expired
/// SVID fails every handshake, so a pod whose renewal failed must leave the Service's
/// endpoints rather than take traffic it can only refuse.
fn readiness(svid_not_after: Option<SystemTime>, policy_applied: bool, now: SystemTime) -> Result<(), &'static str> {
    match svid_not_after {
        None => return Err("no SVID yet"),
        Some(t) if t <= now => return Err("the SVID has expired and could not be renewed"),
        Some(_) => {}
    }
    if !policy_applied {
        return Err("no policy received from the control plane yet");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_are_logged_once_a_second_with_the_count_held_back() {
        let t = OncePerSecond::new();
        assert_eq!(t.admit(100), Some(0));
        assert_eq!((t.admit(100), t.admit(100)), (None, None));
        assert_eq!(t.admit(101), Some(2));
        assert_eq!(t.admit(105), Some(0));
    }

    #[test]
    fn ready_needs_a_current_svid_and_a_policy() {
        let now = SystemTime::now();
        let later = now + Duration::from_secs(60);
        assert_eq!(readiness(Some(later), true, now), Ok(()));
        assert_eq!(readiness(None, true, now), Err("no SVID yet"));
        assert_eq!(readiness(Some(later), false, now), Err("no policy received from the control plane yet"));
        let expired = readiness(Some(now - Duration::from_secs(1)), true, now);
        assert_eq!(expired, Err("the SVID has expired and could not be renewed"));
        assert!(readiness(Some(now), true, now).is_err(), "expiring this instant");
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_service_address_goes_to_its_meshed_endpoints_in_turn() {
        let api = id("spiffe://td/ns/shop/sa/api");
        let registry = Registry::new(
            3,
            [
                ("10.244.1.5".to_string(), api.clone()),
                ("10.244.2.7:8080".to_string(), api.clone()),
                ("10.244.9.1".to_string(), id("spiffe://td/ns/shop/sa/db")),
            ],
        )
        .with_services(
            1,
            Registry::parse_services([
                ("10.96.0.10:80", &["10.244.1.5:8080".into(), "10.244.3.3:8080".into(), "10.244.2.7:8080".into()][..]),
                ("10.96.0.11:80", &["10.244.3.3:8080".into()][..]),
                ("10.96.0.12:80", &[][..]),
                ("not an address", &["10.244.1.5:8080".into()][..]),
            ]),
        );
        let picks: Vec<SocketAddr> = (0..4).map(|_| registry.target(addr("10.96.0.10:80")).unwrap().0).collect();
        let (a, b) = (addr("10.244.1.5:8080"), addr("10.244.2.7:8080"));
        assert_eq!(picks, [a, b, a, b], "in turn, the endpoint outside the mesh left out");
        assert_eq!(registry.target(addr("10.96.0.10:80")).unwrap().1, &api);
        assert_eq!(registry.target(addr("10.96.0.11:80")), None, "no endpoint in the mesh: egress");
        assert_eq!(registry.target(addr("10.96.0.12:80")), None);
        assert_eq!(registry.target(addr("10.96.0.10:443")), None, "a port the Service does not have");
        let db = registry.target(addr("10.244.9.1:5432")).unwrap();
        assert_eq!((db.0, db.1.as_str()), (addr("10.244.9.1:5432"), "spiffe://td/ns/shop/sa/db"), "a workload itself");
        assert_eq!((registry.services_len(), registry.services_version), (1, 1));
        let others = registry.alternatives(addr("10.96.0.10:80"), addr("10.244.1.5:8080"), 2);
        assert_eq!(others, [(addr("10.244.2.7:8080"), api.clone())]);
        assert!(registry.alternatives(addr("10.96.0.11:80"), addr("10.244.1.5:8080"), 2).is_empty());
    }

    /// The registry and the service table arrive apart: each update keeps the other, and a
    /// Service is resolved again when its endpoint's workload registers later.
    #[test]
    fn an_update_carries_over_what_it_does_not_bring() {
        let api = id("spiffe://td/ns/shop/sa/api");
        let vip = addr("10.96.0.10:80");
        let table = || Some((4, Registry::parse_services([("10.96.0.10:80", &["10.244.1.5:8080".to_string()][..])])));
        let empty = Registry::default();
        let services_first = empty.updated(None, table());
        assert_eq!(services_first.target(vip), None, "its endpoint is not in the mesh yet");
        let registered = Registry::new(7, [("10.244.1.5".to_string(), api.clone())]);
        let both = services_first.updated(Some(registered), None);
        assert_eq!(both.target(vip), Some((addr("10.244.1.5:8080"), &api)), "resolved again");
        assert_eq!((both.version, both.services_version), (7, 4));
        let newer_table = both.updated(None, Some((5, Registry::parse_services([]))));
        assert_eq!((newer_table.version, newer_table.len()), (7, 1), "the registry carried over");
        assert_eq!(newer_table.target(vip), None, "the Service is gone");
    }
}
