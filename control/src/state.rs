//! The control plane's in-memory view of the store, and the hub that tells watchers about
//! changes.
//!
//! Each domain is one immutable value swapped whole: [`PolicyState`] (version, policies, the
//! compiled snapshot and each policy's pre-serialized JSON) and [`Registry`] (the endpoint
//! registry and its JSON). A change is written to the [`Store`] first, then the matching
//! value is rebuilt from it and swapped, then watchers are woken. Watchers read whatever
//! is current when they wake, so a burst of changes coalesces into one push per watcher.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use trellis_identity::{SpiffeId, TrustBundle};
use trellis_policy::{Defaults, Policy, PolicySnapshot};

use crate::api::{EndpointEntry, ServiceEntry, WorkloadStatus};
use crate::store::{Endpoint, Store, StoreError, now_unix};

/// The stored policies at one version.
#[derive(Debug)]
pub struct PolicyState {
    pub snapshot: PolicySnapshot,
    /// `(policy, its JSON)`, in snapshot order; JSON is serialized once per version, not
    /// once per watcher.
    pub json: Vec<(Policy, String)>,
}

impl PolicyState {
    pub fn build(version: u64, policies: Vec<Policy>) -> Result<Self, StoreError> {
        let json = policies
            .iter()
            .map(|p| serde_json::to_string(p).map(|j| (p.clone(), j)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let snapshot = PolicySnapshot::compile(version, policies, Defaults::default())
            .map_err(|e| StoreError::Rejected(e.to_string()))?;
        Ok(PolicyState { snapshot, json })
    }

    pub fn version(&self) -> u64 {
        self.snapshot.version()
    }

    /// The JSON array of the policies that select `id` (what its proxy enforces).
    pub fn selecting_json(&self, id: &SpiffeId) -> String {
        let mut out = String::from("[");
        for (policy, json) in &self.json {
            if policy.selects(id) {
                if out.len() > 1 {
                    out.push(',');
                }
                out.push_str(json);
            }
        }
        out.push(']');
        out
    }
}

/// The endpoint registry at one version.
#[derive(Debug)]
pub struct Registry {
    pub version: u64,
    pub endpoints: Vec<Endpoint>,
    pub json: String,
}

impl Registry {
    pub fn build(version: u64, endpoints: Vec<Endpoint>) -> Self {
        let entries: Vec<EndpointEntry> = endpoints
            .iter()
            .map(|e| EndpointEntry { address: e.address.clone(), spiffe_id: e.spiffe_id.clone() })
            .collect();
        let json = serde_json::to_string(&entries).unwrap_or_else(|_| "[]".into());
        Registry { version, endpoints, json }
    }

    /// The workload at `addr`, or registered for its whole IP.
    pub fn resolve(&self, addr: std::net::SocketAddr) -> Option<&SpiffeId> {
        self.endpoint(addr).map(|e| &e.spiffe_id)
    }

    /// The registry entry that answers for `addr`: its own, or its whole IP's. Looked up in
    /// the canonical text the registry stores (`[fd00::5]:80`; IPv4-mapped IPv6 as IPv4).
    pub fn endpoint(&self, addr: std::net::SocketAddr) -> Option<&Endpoint> {
        let ip = addr.ip().to_canonical();
        let (exact, host) = (std::net::SocketAddr::new(ip, addr.port()).to_string(), ip.to_string());
        self.endpoints.iter().find(|e| e.address == exact).or_else(|| self.endpoints.iter().find(|e| e.address == host))
    }
}

/// The Kubernetes service table at one version (0: none received yet, nothing to push).
#[derive(Debug, Default)]
pub struct ServiceTable {
    pub version: u64,
    pub entries: Vec<ServiceEntry>,
    pub json: String,
}

impl ServiceTable {
    pub fn build(version: u64, entries: Vec<ServiceEntry>) -> Self {
        let json = serde_json::to_string(&entries).unwrap_or_else(|_| "[]".into());
        ServiceTable { version, entries, json }
    }
}

/// Why an ack was not recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("no such watch session for this identity")]
    NoSession,
    /// A proxy can only enforce a version it was sent, and the snapshot is swapped before
    /// watchers are woken, so a higher one is a bug or a lie; recording it would make
    /// `workloads list` show a version that does not exist.
    #[error("version {version} is ahead of the current policy version {current}; ack the version you were sent")]
    Ahead { version: u64, current: u64 },
}

/// Everything request handlers share.
#[derive(Debug)]
pub struct Shared {
    pub store: Arc<Store>,
    pub policy: ArcSwap<PolicyState>,
    pub registry: ArcSwap<Registry>,
    /// Kubernetes Services (derived from the cluster, not stored: `crate::services`).
    pub services: ArcSwap<ServiceTable>,
    pub bundle: ArcSwap<TrustBundle>,
    changes: watch::Sender<u64>,
    sessions: Mutex<Sessions>,
    /// Held across a reload's store read and swap, so two reloads racing cannot leave the
    /// older snapshot in place (read v5, read v6, store v6, store v5).
    reloading: Mutex<()>,
}

#[derive(Debug, Default)]
struct Sessions {
    /// The last session number given. Numbered from the start time in milliseconds, so a
    /// number is not given again after a restart (logs, acks in flight across it); still
    /// well inside the integers JSON clients read exactly (2^53).
    next: u64,
    live: HashMap<u64, WorkloadStatus>,
    /// The serial of the SVID each session's proxy connected with, so a renewal (on another
    /// connection) updates the session of the proxy that renewed, not its replicas'.
    serials: HashMap<u64, String>,
    /// How to end each session not yet told to end ([`MAX_SESSIONS_PER_SVID`]).
    enders: HashMap<u64, Arc<Notify>>,
}

/// At most this many watch sessions of one proxy, told apart by its SVID (each proxy has its
/// own key and certificate; replicas share an identity and, on loopback or one VM, an address,
/// never a certificate). A proxy holds one session (two for a moment while it reconnects);
/// without a bound one SVID could open sessions until the control plane's memory ran out
/// (~40 KB each). Past it the *oldest* ends rather than the new one being refused: after a
/// network fault the old sessions are the dead ones, and a proxy must never be locked out.
pub const MAX_SESSIONS_PER_SVID: usize = 4;

impl Sessions {
    /// Tells the oldest sessions of the SVID of serial `serial` to end until `keep` remain.
    fn end_oldest_over(&mut self, serial: &str, keep: usize) {
        let mut same: Vec<u64> = self
            .serials
            .iter()
            .filter(|(session, s)| s.as_str() == serial && self.enders.contains_key(session))
            .map(|(session, _)| *session)
            .collect();
        if same.len() <= keep {
            return;
        }
        same.sort_unstable();
        for session in &same[..same.len() - keep] {
            if let Some(end) = self.enders.remove(session) {
                tracing::warn!(
                    serial,
                    session,
                    "more than {MAX_SESSIONS_PER_SVID} watch sessions of one SVID: ending the oldest"
                );
                end.notify_one();
            }
        }
    }

    fn starting_now() -> Self {
        let millis =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Sessions { next: millis, ..Sessions::default() }
    }
}

impl Shared {
    pub fn load(store: Arc<Store>, bundle: TrustBundle) -> Result<Arc<Self>, StoreError> {
        let (version, policies) = store.policies()?;
        let policy = PolicyState::build(version, policies)?;
        let (rv, endpoints) = store.endpoints()?;
        let (changes, _) = watch::channel(0);
        Ok(Arc::new(Shared {
            store,
            policy: ArcSwap::from_pointee(policy),
            registry: ArcSwap::from_pointee(Registry::build(rv, endpoints)),
            services: ArcSwap::from_pointee(ServiceTable::default()),
            bundle: ArcSwap::from_pointee(bundle),
            changes,
            sessions: Mutex::new(Sessions::starting_now()),
            reloading: Mutex::default(),
        }))
    }

    /// Re-reads policies from the store, swaps the snapshot and wakes watchers.
    pub fn reload_policies(&self) -> Result<(), StoreError> {
        let _serial = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let (version, policies) = self.store.policies()?;
        if version >= self.policy.load().version() {
            self.policy.store(Arc::new(PolicyState::build(version, policies)?));
        }
        self.notify();
        Ok(())
    }

    /// After a registration that left the registry at `version`: reloads it only if that is
    /// newer than what proxies were sent (a renewal that changed no owner reads nothing).
    pub fn registry_at(&self, version: u64) -> Result<(), StoreError> {
        if version > self.registry.load().version { self.reload_registry() } else { Ok(()) }
    }

    pub fn reload_registry(&self) -> Result<(), StoreError> {
        let _serial = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let (version, endpoints) = self.store.endpoints()?;
        if version > self.registry.load().version {
            self.registry.store(Arc::new(Registry::build(version, endpoints)));
            self.notify();
        }
        Ok(())
    }

    /// Swaps in a new service table if it differs from the current one, and wakes watchers;
    /// true if it did.
    pub fn set_services(&self, entries: Vec<ServiceEntry>) -> bool {
        let current = self.services.load();
        if current.version > 0 && current.entries == entries {
            return false;
        }
        self.services.store(Arc::new(ServiceTable::build(current.version + 1, entries)));
        self.notify();
        true
    }

    fn notify(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A new watch session for a proxy; dropped with the returned guard.
    pub fn open_session(self: &Arc<Self>, id: SpiffeId, address: String, svid: Option<(u64, String)>) -> SessionGuard {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, serial)) = &svid {
            s.end_oldest_over(serial, MAX_SESSIONS_PER_SVID - 1);
        }
        s.next += 1;
        let session = s.next;
        let svid_expires_at = svid.as_ref().map(|(expires, _)| *expires);
        if let Some((_, serial)) = svid {
            s.serials.insert(session, serial);
        }
        let now = now_unix();
        s.live.insert(
            session,
            WorkloadStatus {
                session,
                spiffe_id: id,
                address,
                connected_since: now,
                last_seen: now,
                acked_version: None,
                svid_expires_at,
            },
        );
        let ended = Arc::new(Notify::new());
        s.enders.insert(session, ended.clone());
        SessionGuard { shared: self.clone(), session, ended }
    }

    /// Records an ack. Refused if the session is unknown or belongs to someone else, or if
    /// `version` is above the current policy version.
    /// Records that `session`'s proxy enforces `version`; returns the version recorded, the
    /// highest acked on the session: a session's events are sent in order, so a lower ack is
    /// one that travelled slower than a later one (a proxy acks each on its own connection),
    /// and taking it would show an up-to-date proxy as lagging until the next change.
    pub fn ack(&self, session: u64, id: &SpiffeId, version: u64) -> Result<u64, AckError> {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match s.live.get_mut(&session) {
            Some(w) if &w.spiffe_id == id => {
                let current = self.policy.load().version();
                if version > current {
                    return Err(AckError::Ahead { version, current });
                }
                let recorded = w.acked_version.map_or(version, |acked| acked.max(version));
                w.acked_version = Some(recorded);
                w.last_seen = now_unix();
                Ok(recorded)
            }
            _ => Err(AckError::NoSession),
        }
    }

    /// A proxy renewed the SVID of serial `old`: its session shows the new expiry.
    pub fn svid_renewed(&self, old: &str, new: String, expires_at: u64) {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let Sessions { live, serials, .. } = &mut *s;
        for (session, serial) in serials.iter_mut().filter(|(_, serial)| serial.as_str() == old) {
            if let Some(w) = live.get_mut(session) {
                w.svid_expires_at = Some(expires_at);
                w.last_seen = now_unix();
            }
            serial.clone_from(&new);
        }
    }

    pub fn touch(&self, session: u64) {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = s.live.get_mut(&session) {
            w.last_seen = now_unix();
        }
    }

    pub fn workloads(&self) -> Vec<WorkloadStatus> {
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = s.live.values().cloned().collect();
        out.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id).then(a.session.cmp(&b.session)));
        out
    }
}

/// Removes its session from the connected list when the watch stream ends.
#[derive(Debug)]
pub struct SessionGuard {
    shared: Arc<Shared>,
    pub session: u64,
    /// Notified when a newer session of the same proxy pushes this one out.
    pub ended: Arc<Notify>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut s = self.shared.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.live.remove(&self.session);
        s.serials.remove(&self.session);
        s.enders.remove(&self.session);
    }
}
