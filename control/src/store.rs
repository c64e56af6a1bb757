//! The control plane's durable store, on redb (an embedded, crash-safe B-tree database).
//!
//! Everything that must survive a restart lives here: policies and the version counter,
//! join tokens (hashed), the endpoint registry and the audit log. Every change is one redb
//! write transaction committed with immediate durability before the API answers, so a crash
//! leaves the old or the new state — never a mix — and every acknowledged change is on disk.
//! Each change appends its audit entry in the same transaction as the change itself.
//!
//! The store also records the trust domain it was created for, so a restart with another
//! `--trust-domain` is refused instead of serving a mesh whose IDs no longer match.
//!
//! Calls block on disk I/O; the API calls them from `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use trellis_identity::SpiffeId;
use trellis_policy::Policy;

mod endpoints;

use endpoints::put_endpoints;
pub use endpoints::{Claim, Endpoint, split_app_port};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
const ENDPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("endpoints");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const SETTINGS: TableDefinition<&str, &str> = TableDefinition::new("settings");

const K_VERSION: &str = "policy_version";
const K_ENDPOINTS_VERSION: &str = "endpoints_version";
const K_TRUST_DOMAIN: &str = "trust_domain";
const K_CA_FINGERPRINT: &str = "ca_fingerprint";

/// Store file name inside the data dir.
pub const STORE_FILE: &str = "trellis.redb";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(String),
    /// redb holds an exclusive lock on the file while a database is open.
    #[error("store {0} is locked: another control plane is probably using this data dir")]
    Locked(PathBuf),
    #[error("store {path}: {error}")]
    File { path: PathBuf, error: std::io::Error },
    #[error("store record is corrupt: {0}")]
    Corrupt(String),
    /// A stored policy the validator now refuses: stored by a build with looser rules (the
    /// store itself is fine). Loading it anyway could mean enforcing something no one wrote.
    #[error(
        "stored policy {name:?} does not pass this build's validation: {error}; it was stored by a build with \
         looser rules — start that build, fix the policy (trellis policy apply) or delete it, then start this one"
    )]
    Outdated { name: String, error: String },
    #[error("policy {0:?} not found")]
    NotFound(String),
    #[error("policy set rejected: {0}")]
    Rejected(String),
    #[error("join token is unknown")]
    TokenUnknown,
    #[error("join token has expired")]
    TokenExpired,
    #[error("join token has already been used")]
    TokenUsed,
    /// Another identity registered the address recently, and the claim does not come from it.
    #[error(
        "address {address} is registered to {holder}, which renewed it within the last SVID lifetime, and this \
         request does not come from that address; it can be claimed from the address itself, or once {holder} \
         stops renewing"
    )]
    AddressHeld { address: String, holder: SpiffeId },
}

/// Whether `new` may replace `old` (same name). Names are the store's key, cluster-wide:
/// `metadata.namespace` is not part of them, so a same-named policy from another namespace
/// (every namespace's `deny-all`, as Istio users write them) would silently replace the
/// first; and a different kind would swap authorization rules for egress rules. Both are
/// refused, naming what is stored.
pub(crate) fn same_policy(old: &Policy, new: &Policy) -> Result<(), String> {
    let ns = |p: &Policy| {
        p.metadata().namespace.clone().map_or_else(|| "no namespace".to_string(), |n| format!("namespace {n:?}"))
    };
    if old.metadata().namespace != new.metadata().namespace {
        return Err(format!(
            "policy {:?} is stored with {}, and this one has {}: policy names are cluster-wide \
             (metadata.namespace is not part of them), so it would replace that policy — give it another name",
            new.name(),
            ns(old),
            ns(new)
        ));
    }
    if old.kind() != new.kind() {
        return Err(format!(
            "policy {:?} is stored as an {}, and this one is an {}: delete the stored one first to replace it",
            new.name(),
            old.kind(),
            new.kind()
        ));
    }
    Ok(())
}

/// A stored policy record: JSON that does not parse is corruption; a document that parses but
/// fails validation was written under older rules.
fn stored_policy(name: &str, json: &[u8]) -> Result<Policy, StoreError> {
    match serde_json::from_slice::<Policy>(json) {
        Ok(p) => Ok(p),
        Err(e) if e.is_data() => Err(StoreError::Outdated { name: name.to_string(), error: e.to_string() }),
        Err(e) => Err(StoreError::Corrupt(format!("policy {name:?}: {e}"))),
    }
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError::Db(e.into().to_string())
    }
}

/// Who made a change, for the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Actor {
    /// `admin`, or the SPIFFE ID of a workload.
    pub principal: String,
    /// Remote address of the request.
    pub remote: String,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    pub seq: u64,
    /// Unix seconds.
    pub time: u64,
    pub actor: Actor,
    /// `policy.apply`, `policy.delete`, `token.create`, `svid.bootstrap`, `svid.renew`,
    /// `endpoint.move` (an address registered to one identity taken by another; the target
    /// says `ADDRESS (was PREVIOUS_ID)`).
    pub action: String,
    pub target: String,
    /// Policy version after the change.
    pub version: u64,
}

/// A stored join token: the hash of the secret, never the secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub spiffe_id: SpiffeId,
    pub created: u64,
    pub expires: u64,
    pub used: Option<u64>,
}

/// What an apply changed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub version: u64,
    pub created: Vec<String>,
    pub configured: Vec<String>,
    pub unchanged: Vec<String>,
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the store at `path`, creating missing tables. A new file is
    /// created mode 0600 whatever the umask: it holds the policies, token hashes and the
    /// audit log, and redb would otherwise create it world-readable (or, under umask 000,
    /// world-writable).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        create_private_file(path).map_err(|error| StoreError::File { path: path.to_path_buf(), error })?;
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked(path.to_path_buf()),
            other => other.into(),
        })?;
        let txn = db.begin_write()?;
        {
            txn.open_table(SETTINGS)?;
            txn.open_table(META)?;
            txn.open_table(POLICIES)?;
            txn.open_table(TOKENS)?;
            txn.open_table(ENDPOINTS)?;
            txn.open_table(AUDIT)?;
        }
        txn.commit()?;
        Ok(Store { db })
    }

    /// The trust domain this store was created for; `None` for a store from before it was
    /// recorded (the caller records it with [`Store::set_trust_domain`]).
    pub fn trust_domain(&self) -> Result<Option<String>, StoreError> {
        self.setting(K_TRUST_DOMAIN)
    }

    /// Records the trust domain this store serves.
    pub fn set_trust_domain(&self, trust_domain: &str) -> Result<(), StoreError> {
        self.set_setting(K_TRUST_DOMAIN, trust_domain)
    }

    /// The SHA-256 fingerprint of the CA root this store's mesh was last started with.
    pub fn ca_fingerprint(&self) -> Result<Option<String>, StoreError> {
        self.setting(K_CA_FINGERPRINT)
    }

    pub fn set_ca_fingerprint(&self, fingerprint: &str) -> Result<(), StoreError> {
        self.set_setting(K_CA_FINGERPRINT, fingerprint)
    }

    fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(SETTINGS)?.get(key)?.map(|v| v.value().to_string()))
    }

    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(SETTINGS)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    /// The current version and every stored policy, read in one consistent transaction.
    pub fn policies(&self) -> Result<(u64, Vec<Policy>), StoreError> {
        let txn = self.db.begin_read()?;
        let version = txn.open_table(META)?.get(K_VERSION)?.map(|v| v.value()).unwrap_or(0);
        let table = txn.open_table(POLICIES)?;
        let mut out = Vec::with_capacity(table.len()? as usize);
        for row in table.iter()? {
            let (name, json) = row?;
            let policy = stored_policy(name.value(), json.value())?;
            out.push(policy);
        }
        Ok((version, out))
    }

    /// Creates or replaces `docs` by name, all or nothing. `check` sees the complete
    /// resulting set before anything is written, so the store never holds a set that
    /// does not compile.
    pub fn apply(
        &self,
        docs: &[Policy],
        actor: &Actor,
        check: impl FnOnce(&[Policy]) -> Result<(), String>,
    ) -> Result<ApplyOutcome, StoreError> {
        let txn = self.db.begin_write()?;
        let outcome = {
            let mut table = txn.open_table(POLICIES)?;
            let mut merged: BTreeMap<String, Policy> = BTreeMap::new();
            for row in table.iter()? {
                let (name, json) = row?;
                let p = stored_policy(name.value(), json.value())?;
                merged.insert(name.value().to_string(), p);
            }
            let (mut created, mut configured, mut unchanged) = (vec![], vec![], vec![]);
            for doc in docs {
                match merged.insert(doc.name().to_string(), doc.clone()) {
                    None => created.push(doc.name().to_string()),
                    Some(old) if old == *doc => unchanged.push(doc.name().to_string()),
                    Some(old) => {
                        same_policy(&old, doc).map_err(StoreError::Rejected)?;
                        configured.push(doc.name().to_string());
                    }
                }
            }
            let all: Vec<Policy> = merged.into_values().collect();
            check(&all).map_err(StoreError::Rejected)?;
            if created.is_empty() && configured.is_empty() {
                // Nothing changes: no new version, no audit line, no push.
                return Ok(ApplyOutcome { version: self.version()?, created, configured, unchanged });
            }
            for doc in docs {
                let json = serde_json::to_vec(doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                table.insert(doc.name(), json.as_slice())?;
            }
            let version = bump(&txn, K_VERSION)?;
            let target = created.iter().chain(&configured).cloned().collect::<Vec<_>>().join(",");
            append_audit(&txn, actor, "policy.apply", &target, version)?;
            ApplyOutcome { version, created, configured, unchanged }
        };
        txn.commit()?;
        Ok(outcome)
    }

    /// Deletes one policy; `NotFound` if it does not exist.
    pub fn delete(&self, name: &str, actor: &Actor) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let version = {
            let mut table = txn.open_table(POLICIES)?;
            if table.remove(name)?.is_none() {
                return Err(StoreError::NotFound(name.to_string()));
            }
            let version = bump(&txn, K_VERSION)?;
            append_audit(&txn, actor, "policy.delete", name, version)?;
            version
        };
        txn.commit()?;
        Ok(version)
    }

    pub fn version(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(META)?.get(K_VERSION)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Stores a new join token under the hash of its secret.
    pub fn insert_token(&self, hash: &[u8; 32], record: &TokenRecord, actor: &Actor) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let json = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            txn.open_table(TOKENS)?.insert(hash.as_slice(), json.as_slice())?;
            let version = txn.open_table(META)?.get(K_VERSION)?.map(|v| v.value()).unwrap_or(0);
            append_audit(&txn, actor, "token.create", record.spiffe_id.as_str(), version)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Reads a token without using it, to check a CSR against its identity before the
    /// token is spent.
    pub fn peek_token(&self, hash: &[u8; 32], now: u64) -> Result<TokenRecord, StoreError> {
        let txn = self.db.begin_read()?;
        usable_token(&txn.open_table(TOKENS)?, hash, now)
    }

    /// A bootstrap's writes in one transaction: the join token (if it came with one) is spent
    /// and the workload's addresses registered together. A refused claim — including one lost
    /// to a workload that registered the address a moment earlier — commits nothing, so the
    /// token stays usable; and two concurrent bootstraps with one token cannot both succeed.
    /// Returns the registry version, as [`Store::register_endpoints`] does.
    pub fn bootstrap(
        &self,
        token: Option<(&[u8; 32], &Actor)>,
        id: &SpiffeId,
        addresses: &[String],
        claim: &Claim,
    ) -> Result<u64, StoreError> {
        let mut txn = self.db.begin_write()?;
        let now = now_unix();
        if let Some((hash, actor)) = token {
            let mut table = txn.open_table(TOKENS)?;
            let mut record = usable_token(&table, hash, now)?;
            record.used = Some(now);
            let json = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            table.insert(hash.as_slice(), json.as_slice())?;
            let version = txn.open_table(META)?.get(K_VERSION)?.map(|v| v.value()).unwrap_or(0);
            append_audit(&txn, actor, "svid.bootstrap", record.spiffe_id.as_str(), version)?;
        }
        let (version, changed) = put_endpoints(&txn, id, addresses, claim, now)?;
        if !changed && token.is_none() {
            txn.set_durability(redb::Durability::None).map_err(|e| StoreError::Db(e.to_string()))?;
        }
        txn.commit()?;
        Ok(version)
    }

    /// Audit entries with `seq > after`, oldest first, at most `limit`.
    pub fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AUDIT)?;
        let mut out = Vec::new();
        for row in table.range(after.saturating_add(1)..)?.take(limit) {
            let (_, json) = row?;
            out.push(serde_json::from_slice(json.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// Appends an audit line for an event that changes nothing else (an SVID renewal).
    pub fn record(&self, actor: &Actor, action: &str, target: &str) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        // Renewals are frequent and change no state; losing the last few in a crash is fine.
        txn.set_durability(redb::Durability::None).map_err(|e| StoreError::Db(e.to_string()))?;
        {
            let version = txn.open_table(META)?.get(K_VERSION)?.map(|v| v.value()).unwrap_or(0);
            append_audit(&txn, actor, action, target, version)?;
        }
        txn.commit()?;
        Ok(())
    }
}

/// Creates `path` empty with mode 0600 if it does not exist (redb initializes an empty
/// file); an existing file is left as it is (the data dir's startup tightens its mode).
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// The token stored under `hash`, if it exists, is unused and has not expired.
fn usable_token(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    hash: &[u8; 32],
    now: u64,
) -> Result<TokenRecord, StoreError> {
    let record: TokenRecord = match table.get(hash.as_slice())? {
        Some(v) => serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        None => return Err(StoreError::TokenUnknown),
    };
    if record.used.is_some() {
        return Err(StoreError::TokenUsed);
    }
    if record.expires <= now {
        return Err(StoreError::TokenExpired);
    }
    Ok(record)
}

fn bump(txn: &redb::WriteTransaction, key: &str) -> Result<u64, StoreError> {
    let mut meta = txn.open_table(META)?;
    let next = meta.get(key)?.map(|v| v.value()).unwrap_or(0) + 1;
    meta.insert(key, next)?;
    Ok(next)
}

fn append_audit(
    txn: &redb::WriteTransaction,
    actor: &Actor,
    action: &str,
    target: &str,
    version: u64,
) -> Result<(), StoreError> {
    let mut table = txn.open_table(AUDIT)?;
    let seq = table.last()?.map(|(k, _)| k.value()).unwrap_or(0) + 1;
    let entry = AuditEntry {
        seq,
        time: now_unix(),
        actor: actor.clone(),
        action: action.to_string(),
        target: target.to_string(),
        version,
    };
    let json = serde_json::to_vec(&entry).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    table.insert(seq, json.as_slice())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://cluster.local/ns/t/sa/{name}")).unwrap()
    }

    /// A claim no holder blocks (every entry counts as stale).
    const ANY: Claim = Claim {
        from: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        fresh_after: u64::MAX,
        leave_out_held: false,
    };

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join(STORE_FILE)).unwrap();
        (dir, store)
    }

    #[test]
    fn registering_again_refreshes_without_a_new_version_and_a_new_owner_bumps_it() {
        let (_dir, store) = open();
        let v1 = store.register_endpoints(&id("a"), &["10.0.0.1".into()], &ANY).unwrap();
        // Backdate the entry, as if registered long ago; a renewal must bring it to now.
        store.db_set_updated("10.0.0.1", 5);
        assert_eq!(store.endpoints().unwrap().1[0].updated, 5);
        assert_eq!(store.register_endpoints(&id("a"), &["10.0.0.1".into()], &ANY).unwrap(), v1);
        assert!(store.endpoints().unwrap().1[0].updated >= now_unix() - 60);
        // The address reused by another workload is a change proxies must hear about.
        let v2 = store.register_endpoints(&id("b"), &["10.0.0.1".into()], &ANY).unwrap();
        assert_eq!(v2, v1 + 1);
        assert_eq!(store.endpoints().unwrap().1[0].spiffe_id, id("b"));
        // ...and one the audit log records, with who took it from whom.
        let moved: Vec<_> = store.audit(0, 100).unwrap().into_iter().filter(|e| e.action == "endpoint.move").collect();
        assert_eq!(moved.len(), 1, "{moved:?}");
        assert_eq!(moved[0].actor.principal, id("b").to_string());
        assert_eq!(moved[0].target, format!("10.0.0.1 (was {})", id("a")));
    }

    /// An address another identity renewed recently is not taken from elsewhere; from the
    /// address itself (a recycled pod IP), or once the holder stopped renewing, it is.
    #[test]
    fn a_fresh_address_of_another_identity_is_claimed_only_from_itself() {
        let (_dir, store) = open();
        let now = now_unix();
        let claim = |from: &str| Claim { from: from.parse().unwrap(), fresh_after: now - 3600, leave_out_held: false };
        store.register_endpoints(&id("db"), &["10.9.9.9".into(), "10.9.9.8:5432".into()], &claim("10.9.9.9")).unwrap();
        let version = store.endpoints().unwrap().0;
        for address in ["10.9.9.9", "10.9.9.8:5432"] {
            let addresses = ["10.1.1.1".to_string(), address.to_string()];
            let err = store.register_endpoints(&id("evil"), &addresses, &claim("10.6.6.6")).unwrap_err();
            assert!(matches!(&err, StoreError::AddressHeld { holder, .. } if holder == &id("db")), "{err}");
        }
        // Any other spelling of a held host is the same host.
        for other_form in ["10.9.9.9:80", "[::ffff:10.9.9.9]:80", "10.9.9.8", "10.9.9.8:15006"] {
            let err = store.register_endpoints(&id("evil"), &[other_form.to_string()], &claim("10.6.6.6"));
            assert!(matches!(err, Err(StoreError::AddressHeld { .. })), "{other_form}: {err:?}");
        }
        // Refused whole: not even the free address was taken.
        assert_eq!(store.endpoints().unwrap(), (version, store.endpoints().unwrap().1));
        assert!(store.endpoints().unwrap().1.iter().all(|e| e.spiffe_id == id("db")));
        // From the address itself (IPv4-mapped too): a new pod on a recycled IP.
        store.register_endpoints(&id("new-pod"), &["10.9.9.9".into()], &claim("::ffff:10.9.9.9")).unwrap();
        // The holder stopped renewing: anyone may have it.
        store.db_set_updated("10.9.9.8:5432", now - 7200);
        store.register_endpoints(&id("other"), &["10.9.9.8:5432".into()], &claim("10.6.6.6")).unwrap();
        let owners: Vec<_> = store.endpoints().unwrap().1.into_iter().map(|e| e.spiffe_id).collect();
        assert_eq!(owners, [id("other"), id("new-pod")]);
    }

    /// A bootstrap whose claim is refused spends nothing: the token and the registry are as
    /// they were, and the same token bootstraps once the claim is allowed — only once.
    #[test]
    fn a_refused_bootstrap_claim_leaves_the_token_unspent() {
        let (_dir, store) = open();
        let now = now_unix();
        let claim = |from: &str| Claim { from: from.parse().unwrap(), fresh_after: now - 3600, leave_out_held: false };
        let actor = Actor { principal: "bootstrap".into(), remote: "10.6.6.6:1".into() };
        let hash = [7u8; 32];
        let record = TokenRecord { spiffe_id: id("evil"), created: now, expires: now + 600, used: None };
        store.insert_token(&hash, &record, &actor).unwrap();
        store.register_endpoints(&id("db"), &["10.9.9.9".into()], &claim("10.9.9.9")).unwrap();
        let before = store.endpoints().unwrap();

        let err = store.bootstrap(Some((&hash, &actor)), &id("evil"), &["10.9.9.9".into()], &claim("10.6.6.6"));
        assert!(matches!(err, Err(StoreError::AddressHeld { .. })), "{err:?}");
        assert_eq!(store.peek_token(&hash, now).unwrap().used, None);
        assert_eq!(store.endpoints().unwrap(), before);

        store.bootstrap(Some((&hash, &actor)), &id("evil"), &["10.1.1.1".into()], &claim("10.6.6.6")).unwrap();
        assert!(matches!(store.peek_token(&hash, now), Err(StoreError::TokenUsed)));
        assert!(store.endpoints().unwrap().1.iter().any(|e| e.address == "10.1.1.1" && e.spiffe_id == id("evil")));
        let again = store.bootstrap(Some((&hash, &actor)), &id("evil"), &[], &claim("10.6.6.6"));
        assert!(matches!(again, Err(StoreError::TokenUsed)), "{again:?}");
    }

    /// A join-token bootstrap that names no address spends the token and leaves the registry
    /// and its version as they were.
    #[test]
    fn a_bootstrap_with_no_address_spends_the_token_and_touches_no_endpoint() {
        let (_dir, store) = open();
        let now = now_unix();
        let actor = Actor { principal: "bootstrap".into(), remote: "10.6.6.6:1".into() };
        let hash = [9u8; 32];
        let record = TokenRecord { spiffe_id: id("web"), created: now, expires: now + 600, used: None };
        store.insert_token(&hash, &record, &actor).unwrap();
        let version = store.register_endpoints(&id("db"), &["10.9.9.9".into()], &ANY).unwrap();
        let before = store.endpoints().unwrap();
        assert_eq!(store.bootstrap(Some((&hash, &actor)), &id("web"), &[], &ANY).unwrap(), version);
        assert!(matches!(store.peek_token(&hash, now), Err(StoreError::TokenUsed)));
        assert_eq!(store.endpoints().unwrap(), before);
    }

    #[test]
    fn expiring_removes_only_entries_nobody_renewed_and_bumps_the_version_once() {
        let (_dir, store) = open();
        store.register_endpoints(&id("gone"), &["10.0.0.1".into(), "10.0.0.2:8080".into()], &ANY).unwrap();
        let v = store.register_endpoints(&id("live"), &["10.0.0.3".into()], &ANY).unwrap();
        store.db_set_updated("10.0.0.1", 100);
        store.db_set_updated("10.0.0.2:8080", 100);
        store.db_set_updated("10.0.0.3", 300);

        let (version, removed) = store.expire_endpoints(200).unwrap();
        assert_eq!(version, v + 1);
        let mut gone: Vec<_> = removed.iter().map(|e| e.address.as_str()).collect();
        gone.sort_unstable();
        assert_eq!(gone, ["10.0.0.1", "10.0.0.2:8080"]);
        let (read_version, left) = store.endpoints().unwrap();
        assert_eq!(read_version, version);
        assert_eq!(left.iter().map(|e| e.address.as_str()).collect::<Vec<_>>(), ["10.0.0.3"]);

        // Nothing stale: no new version, nothing pushed to proxies.
        assert_eq!(store.expire_endpoints(200).unwrap(), (version, vec![]));
    }

    #[test]
    fn a_new_store_file_is_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, store) = open();
        drop(store);
        let mode = std::fs::metadata(dir.path().join(STORE_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_store_open_elsewhere_is_reported_as_locked_once() {
        let (dir, _store) = open();
        let err = Store::open(&dir.path().join(STORE_FILE)).unwrap_err();
        assert!(matches!(err, StoreError::Locked(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("another control plane is probably using this data dir"), "{msg}");
        assert_eq!(msg.matches(STORE_FILE).count(), 1, "{msg}");
    }

    #[test]
    fn the_trust_domain_is_recorded_and_kept() {
        let (dir, store) = open();
        assert_eq!(store.trust_domain().unwrap(), None);
        store.set_trust_domain("cluster.local").unwrap();
        drop(store);
        let store = Store::open(&dir.path().join(STORE_FILE)).unwrap();
        assert_eq!(store.trust_domain().unwrap().as_deref(), Some("cluster.local"));
    }

    /// A record that no longer validates is named as written under older rules; bytes that
    /// are not a policy at all are corruption.
    #[test]
    fn a_stored_policy_refused_by_newer_rules_is_named_not_called_corrupt() {
        let (_dir, store) = open();
        let older = r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"AuthorizationPolicy","metadata":{"name":"a..b"},
            "spec":{"selector":"*","rules":[]}}"#;
        store.db_put_policy("a..b", older.as_bytes());
        match store.policies() {
            Err(e @ StoreError::Outdated { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("stored policy \"a..b\"") && msg.contains("looser rules"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        store.db_put_policy("a..b", b"not json");
        assert!(matches!(store.policies(), Err(StoreError::Corrupt(_))));
    }

    impl Store {
        /// Test hook: writes a raw policy record, bypassing validation.
        fn db_put_policy(&self, name: &str, json: &[u8]) {
            let txn = self.db.begin_write().unwrap();
            txn.open_table(POLICIES).unwrap().insert(name, json).unwrap();
            txn.commit().unwrap();
        }

        /// Test hook: backdates one endpoint's `updated`.
        fn db_set_updated(&self, address: &str, updated: u64) {
            let txn = self.db.begin_write().unwrap();
            {
                let mut table = txn.open_table(ENDPOINTS).unwrap();
                let mut entry: Endpoint = serde_json::from_slice(table.get(address).unwrap().unwrap().value()).unwrap();
                entry.updated = updated;
                table.insert(address, serde_json::to_vec(&entry).unwrap().as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
    }
}
