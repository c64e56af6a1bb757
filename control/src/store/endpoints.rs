//! The endpoint registry in the store: which workload (SPIFFE ID) answers at which address.
//!
//! Proxies register their addresses at bootstrap and at each renewal; outbound proxies
//! resolve a captured destination to the identity they must require through it. A claim on
//! an address another live identity holds is refused ([`Claim`]); entries nobody renewed
//! expire. Part of [`super::Store`]: the same redb database and transactions.

use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use trellis_identity::SpiffeId;

use super::{ENDPOINTS, K_ENDPOINTS_VERSION, META, Store, StoreError, bump};

/// One address in the endpoint registry: which workload answers there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoint {
    /// `ip` (any port) or `ip:port`.
    pub address: String,
    pub spiffe_id: SpiffeId,
    pub updated: u64,
    /// For a listener that hands its connections to the app on another port (`--inbound
    /// LISTEN=APP` on a VM): the app's port, the one policy judges those connections at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_port: Option<u16>,
}

/// A registered address as the API takes it: `ip`, `ip:port`, or `ip:port=APP_PORT` (see
/// [`Endpoint::app_port`]); the address part, and the app's port if given.
pub fn split_app_port(registration: &str) -> (&str, Option<u16>) {
    match registration.split_once('=') {
        Some((address, port)) => (address, port.parse().ok()),
        None => (registration, None),
    }
}

/// Who claims endpoint addresses. A workload may take an address another identity holds
/// only if that one stopped renewing it (`updated` before `fresh_after`: its SVID has expired
/// or is about to) or the claim comes from the address itself (a pod that got a recycled IP).
/// Otherwise any workload with an SVID could take over another's address: proxies calling
/// it would then require the taker's identity — a denial of service, or a man in the middle
/// for whoever can also receive that address's traffic.
#[derive(Debug, Clone, Copy)]
pub struct Claim {
    /// The address the request came from.
    pub from: std::net::IpAddr,
    pub fresh_after: u64,
    /// Register what may be claimed and leave held addresses out (logged) instead of refusing
    /// the whole claim: a renewal is about identity, and must not fail over an address.
    pub leave_out_held: bool,
}

impl Claim {
    /// Whether `id` may have `address`, given every registered entry: an entry on the same
    /// host blocks it whatever its form (`10.9.9.9`, `10.9.9.9:80`, `[::ffff:10.9.9.9]:80`
    /// are one host — callers resolve them to the same workload).
    fn check<'e>(
        &self,
        id: &SpiffeId,
        address: &str,
        entries: impl IntoIterator<Item = &'e Endpoint>,
    ) -> Result<(), StoreError> {
        let Some(host) = host_of(address) else { return Ok(()) };
        if host == self.from.to_canonical() {
            return Ok(());
        }
        let held = entries
            .into_iter()
            .find(|e| &e.spiffe_id != id && e.updated >= self.fresh_after && host_of(&e.address) == Some(host));
        match held {
            Some(holder) => {
                Err(StoreError::AddressHeld { address: address.to_string(), holder: holder.spiffe_id.clone() })
            }
            None => Ok(()),
        }
    }
}

/// Registers `addresses` for `id` inside `txn` under `claim`'s rules: returns the registry
/// version and whether any address is new or changed hands. An error leaves `txn` to be
/// dropped uncommitted (the claim is refused whole) unless the claim leaves held addresses out.
pub(super) fn put_endpoints(
    txn: &redb::WriteTransaction,
    id: &SpiffeId,
    addresses: &[String],
    claim: &Claim,
    now: u64,
) -> Result<(u64, bool), StoreError> {
    if addresses.is_empty() {
        // Nothing to claim (a join-token bootstrap naming no address): no table scan.
        return Ok((registry_version(&txn.open_table(META)?)?, false));
    }
    let mut table = txn.open_table(ENDPOINTS)?;
    let mut changed = false;
    let existing = all_endpoints(&table)?;
    for registration in addresses {
        let (address, app_port) = split_app_port(registration);
        let current = table.get(address)?.and_then(|v| serde_json::from_slice::<Endpoint>(v.value()).ok());
        match claim.check(id, address, &existing) {
            Ok(()) => {}
            Err(e) if claim.leave_out_held => {
                tracing::warn!(spiffe_id = %id, error = %e, "address left out of the registry");
                continue;
            }
            Err(e) => return Err(e),
        }
        if let Some(old) = current.as_ref().filter(|e| &e.spiffe_id != id) {
            tracing::info!(%address, from = %old.spiffe_id, to = %id, "endpoint address moved to another workload");
            // Which identity callers require at an address is a change to the mesh: audited.
            let actor = super::Actor { principal: id.to_string(), remote: claim.from.to_canonical().to_string() };
            let version = txn.open_table(super::META)?.get(super::K_VERSION)?.map(|v| v.value()).unwrap_or(0);
            let target = format!("{address} (was {})", old.spiffe_id);
            super::append_audit(txn, &actor, "endpoint.move", &target, version)?;
        }
        changed |= current.is_none_or(|e| &e.spiffe_id != id || e.app_port != app_port);
        let entry = Endpoint { address: address.to_string(), spiffe_id: id.clone(), updated: now, app_port };
        let json = serde_json::to_vec(&entry).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        table.insert(address, json.as_slice())?;
    }
    let version = if changed { bump(txn, K_ENDPOINTS_VERSION)? } else { registry_version(&txn.open_table(META)?)? };
    Ok((version, changed))
}

/// Every registered endpoint (a registration checks its claim against all of them).
fn all_endpoints(table: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Vec<Endpoint>, StoreError> {
    let mut out = Vec::new();
    for row in table.iter()? {
        let (_, json) = row?;
        out.push(serde_json::from_slice(json.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?);
    }
    Ok(out)
}

/// The registry's version as last bumped (0 before the first registration).
fn registry_version(meta: &impl ReadableTable<&'static str, u64>) -> Result<u64, StoreError> {
    Ok(meta.get(K_ENDPOINTS_VERSION)?.map(|v| v.value()).unwrap_or(0))
}

/// The host of an endpoint address (`ip` or `ip:port`), IPv4-mapped IPv6 as IPv4.
fn host_of(address: &str) -> Option<std::net::IpAddr> {
    let ip = address.parse::<std::net::IpAddr>().or_else(|_| address.parse::<std::net::SocketAddr>().map(|s| s.ip()));
    ip.ok().map(|ip| ip.to_canonical())
}

impl Store {
    /// Records that `addresses` are served by `id` as of now; returns the registry version
    /// (bumped only when an address changed hands, is new, or names another app port). Every call refreshes `updated`,
    /// which [`Store::expire_endpoints`] reads: proxies register at bootstrap and at each
    /// renewal. A refresh that changes no owner is committed without an fsync — losing it in
    /// a crash only makes the entry look one renewal older.
    pub fn register_endpoints(&self, id: &SpiffeId, addresses: &[String], claim: &Claim) -> Result<u64, StoreError> {
        self.bootstrap(None, id, addresses, claim)
    }

    /// Removes the endpoints nobody registered since `cutoff` (unix seconds) and returns the
    /// registry version (bumped if anything went) with what was removed.
    pub fn expire_endpoints(&self, cutoff: u64) -> Result<(u64, Vec<Endpoint>), StoreError> {
        let txn = self.db.begin_write()?;
        let result = {
            let mut table = txn.open_table(ENDPOINTS)?;
            let stale: Vec<Endpoint> = all_endpoints(&table)?.into_iter().filter(|e| e.updated < cutoff).collect();
            for entry in &stale {
                table.remove(entry.address.as_str())?;
            }
            let version = if stale.is_empty() {
                registry_version(&txn.open_table(META)?)?
            } else {
                bump(&txn, K_ENDPOINTS_VERSION)?
            };
            (version, stale)
        };
        txn.commit()?;
        Ok(result)
    }

    /// The registry and its version, read consistently.
    pub fn endpoints(&self) -> Result<(u64, Vec<Endpoint>), StoreError> {
        let txn = self.db.begin_read()?;
        let version = registry_version(&txn.open_table(META)?)?;
        Ok((version, all_endpoints(&txn.open_table(ENDPOINTS)?)?))
    }
}
