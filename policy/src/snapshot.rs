//! The compiled evaluator: an immutable, versioned [`PolicySnapshot`] that answers
//! [`PolicySnapshot::evaluate`] and [`PolicySnapshot::evaluate_egress`] without scanning every
//! policy.
//!
//! Compiling sorts the policies by name and flattens each rule into "clauses" (one per `from`
//! entry of an AuthorizationPolicy rule, one per `to` entry of an EgressPolicy rule, or one for
//! a rule without them). Each clause carries a key — (policy rank by name) << 32 | rule index —
//! so "the first matching rule in (name, rule) order" is the smallest key among the matching
//! clauses. Clauses are filed under their policy's selector, then under their most selective
//! condition (see `index.rs`). Evaluating a flow looks up the groups selecting it, collects the
//! candidate clauses from the source's identity and address, checks each fully, and keeps the
//! smallest key per (action, enforced-or-audit).
//!
//! A snapshot is `Send + Sync` and never changes; the proxy holds it in an `ArcSwap` and
//! replaces it whole when policy changes.

use std::net::IpAddr;
use std::sync::Arc;

use trellis_identity::SpiffeId;

use crate::decision::{AuditOutcome, Decision, Defaults, EgressFlow, Flow, Reason};
use crate::error::CompileError;
use crate::index::{FastMap, IdIndex, IpIndex};
use crate::limits::{MAX_ENTRIES, MAX_RULES};
use crate::model::{Action, AuthorizationPolicy, EgressPolicy, Mode, Operation, Policy};
use crate::path::{PathError, normalize_path, without_parameters};
use crate::pattern::{IpBlock, PortRange, SpiffePattern, canonical_ip, in_namespace};
use crate::validate::check_name;

/// Position of a clause in the snapshot's clause list.
type ClauseId = u32;

/// The clauses of the policies sharing one selector, indexed by the source of a flow.
#[derive(Debug, Default)]
struct AuthzGroup {
    has_audit: bool,
    by_identity: IdIndex<Vec<ClauseId>>,
    by_namespace: FastMap<Box<str>, Vec<ClauseId>>,
    by_ip: IpIndex<Vec<ClauseId>>,
    /// Clauses with no source condition at all.
    always: Vec<ClauseId>,
}

#[derive(Debug)]
struct AuthzClause {
    key: u64,
    action: Action,
    audit: bool,
    identity: Option<SpiffePattern>,
    namespace: Option<Box<str>>,
    ip_block: Option<IpBlock>,
    /// The rule's `to` entries (shared by its clauses); empty means any.
    to: Arc<[Operation]>,
}

/// The clauses of the egress policies sharing one selector, indexed by destination address.
#[derive(Debug, Default)]
struct EgressGroup {
    has_audit: bool,
    by_ip: IpIndex<Vec<ClauseId>>,
    /// Clauses without an ipBlock.
    any_address: Vec<ClauseId>,
}

#[derive(Debug)]
struct EgressClause {
    key: u64,
    action: Action,
    audit: bool,
    ip_block: Option<IpBlock>,
    ports: Box<[PortRange]>,
}

/// An immutable, compiled set of policies. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct PolicySnapshot {
    version: u64,
    defaults: Defaults,
    /// Sorted by name.
    policies: Vec<Policy>,
    names: Vec<Arc<str>>,
    authz: IdIndex<AuthzGroup>,
    authz_clauses: Vec<AuthzClause>,
    egress: IdIndex<EgressGroup>,
    egress_clauses: Vec<EgressClause>,
}

/// The smallest matching keys so far; `u64::MAX` is "none".
#[derive(Clone, Copy)]
struct Best {
    deny_enforced: u64,
    allow_enforced: u64,
    deny_all: u64,
    allow_all: u64,
}

impl Best {
    const NONE: Best =
        Best { deny_enforced: u64::MAX, allow_enforced: u64::MAX, deny_all: u64::MAX, allow_all: u64::MAX };

    /// Whether a match of this clause could change anything (skips checking the rest).
    fn could_improve(&self, key: u64, action: Action, audit: bool) -> bool {
        match (action, audit) {
            (Action::Deny, false) => key < self.deny_enforced,
            (Action::Deny, true) => key < self.deny_all,
            (Action::Allow, false) => key < self.allow_enforced,
            (Action::Allow, true) => key < self.allow_all,
        }
    }

    fn record(&mut self, key: u64, action: Action, audit: bool) {
        let (enforced, all) = match action {
            Action::Deny => (&mut self.deny_enforced, &mut self.deny_all),
            Action::Allow => (&mut self.allow_enforced, &mut self.allow_all),
        };
        *all = (*all).min(key);
        if !audit {
            *enforced = (*enforced).min(key);
        }
    }
}

fn clause_key(policy: usize, rule: usize) -> u64 {
    ((policy as u64) << 32) | rule as u64
}

impl PolicySnapshot {
    /// A snapshot with no policies: every flow gets the defaults.
    pub fn empty(defaults: Defaults) -> Self {
        PolicySnapshot {
            version: 0,
            defaults,
            policies: Vec::new(),
            names: Vec::new(),
            authz: IdIndex::default(),
            authz_clauses: Vec::new(),
            egress: IdIndex::default(),
            egress_clauses: Vec::new(),
        }
    }

    /// Compiles `policies` (of both kinds). Names must be unique and valid; the totals must be
    /// within [`MAX_RULES`] and [`MAX_ENTRIES`].
    pub fn compile(version: u64, mut policies: Vec<Policy>, defaults: Defaults) -> Result<Self, CompileError> {
        check_limits(&policies)?;
        policies.sort_by(|a, b| a.name().cmp(b.name()));
        for pair in policies.windows(2) {
            if let [a, b] = pair
                && a.name() == b.name()
            {
                return Err(CompileError::DuplicateName(a.name().to_owned()));
            }
        }
        let mut snapshot = PolicySnapshot::empty(defaults);
        snapshot.version = version;
        for (rank, policy) in policies.iter().enumerate() {
            if check_name(policy.name()).is_err() {
                return Err(CompileError::InvalidName(policy.name().to_owned()));
            }
            snapshot.names.push(policy.name().into());
            match policy {
                Policy::Authorization(p) => snapshot.add_authorization(rank, p),
                Policy::Egress(p) => snapshot.add_egress(rank, p),
            }
        }
        snapshot.policies = policies;
        Ok(snapshot)
    }

    fn add_authorization(&mut self, rank: usize, p: &AuthorizationPolicy) {
        let audit = p.spec.mode == Mode::Audit;
        let group = self.authz.entry(&p.spec.selector);
        group.has_audit |= audit;
        for (i, rule) in p.spec.rules.iter().enumerate() {
            let to: Arc<[Operation]> = rule.to.clone().into();
            let base = AuthzClause {
                key: clause_key(rank, i),
                action: p.spec.action,
                audit,
                identity: None,
                namespace: None,
                ip_block: None,
                to,
            };
            if rule.from.is_empty() {
                group.always.push(self.authz_clauses.len() as ClauseId);
                self.authz_clauses.push(base);
                continue;
            }
            for source in &rule.from {
                let id = self.authz_clauses.len() as ClauseId;
                file_authz_clause(group, id, &source.identity, source.namespace.as_deref(), source.ip_block.as_ref());
                self.authz_clauses.push(AuthzClause {
                    identity: source.identity.clone(),
                    namespace: source.namespace.as_deref().map(Into::into),
                    ip_block: source.ip_block.clone(),
                    to: base.to.clone(),
                    ..base
                });
            }
        }
    }

    fn add_egress(&mut self, rank: usize, p: &EgressPolicy) {
        let audit = p.spec.mode == Mode::Audit;
        let group = self.egress.entry(&p.spec.selector);
        group.has_audit |= audit;
        for (i, rule) in p.spec.rules.iter().enumerate() {
            let key = clause_key(rank, i);
            let clause = |ip_block: Option<IpBlock>, ports: &[PortRange]| EgressClause {
                key,
                action: p.spec.action,
                audit,
                ip_block,
                ports: ports.into(),
            };
            let mut clauses = Vec::new();
            if rule.to.is_empty() {
                clauses.push(clause(None, &[]));
            }
            for d in &rule.to {
                clauses.push(clause(d.ip_block.clone(), &d.ports));
            }
            for c in clauses {
                let id = self.egress_clauses.len() as ClauseId;
                match &c.ip_block {
                    Some(b) => group.by_ip.entry(b.cidr()).push(id),
                    None => group.any_address.push(id),
                }
                self.egress_clauses.push(c);
            }
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn defaults(&self) -> Defaults {
        self.defaults
    }

    /// The policies, sorted by name.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    pub fn get(&self, name: &str) -> Option<&Policy> {
        let i = self.policies.binary_search_by(|p| p.name().cmp(name)).ok()?;
        self.policies.get(i)
    }

    /// Decides a flow into the mesh (see the crate docs for the semantics).
    pub fn evaluate(&self, flow: &Flow<'_>) -> Decision {
        let http = match flow.http {
            None => None,
            Some(h) => match normalize_path(h.path) {
                Ok(path) => {
                    let bare = without_parameters(&path);
                    Some((h.method, path, bare))
                }
                Err(e) => return self.invalid_path(flow.destination, e),
            },
        };
        let http = http.as_ref().map(|(method, path, bare)| Http { method, path, bare: bare.as_deref() });
        let source_ip = canonical_ip(flow.source_ip);
        let dest_td = flow.destination.trust_domain_str();
        let mut best = Best::NONE;
        let mut audit_selected = false;
        self.authz.for_each_match(flow.destination, |group| {
            audit_selected |= group.has_audit;
            for_each_candidate(group, flow.source, source_ip, |id| {
                let Some(c) = self.authz_clauses.get(id as usize) else { return };
                if best.could_improve(c.key, c.action, c.audit)
                    && authz_clause_matches(c, flow.source, source_ip, dest_td, flow.port, http)
                {
                    best.record(c.key, c.action, c.audit);
                }
            });
        });
        self.decide(best, audit_selected, self.defaults.mesh)
    }

    /// Decides a connection from a mesh workload to an address outside the mesh.
    pub fn evaluate_egress(&self, flow: &EgressFlow<'_>) -> Decision {
        let ip = canonical_ip(flow.destination_ip);
        let mut best = Best::NONE;
        let mut audit_selected = false;
        self.egress.for_each_match(flow.source, |group| {
            audit_selected |= group.has_audit;
            let mut check = |id: &ClauseId| {
                let Some(c) = self.egress_clauses.get(*id as usize) else { return };
                if best.could_improve(c.key, c.action, c.audit) && egress_clause_matches(c, ip, flow.port) {
                    best.record(c.key, c.action, c.audit);
                }
            };
            group.by_ip.for_each_match(ip, |ids| ids.iter().for_each(&mut check));
            group.any_address.iter().for_each(&mut check);
        });
        self.decide(best, audit_selected, self.defaults.egress)
    }

    fn invalid_path(&self, destination: &SpiffeId, e: PathError) -> Decision {
        let mut audit_selected = false;
        self.authz.for_each_match(destination, |g| audit_selected |= g.has_audit);
        let reason = Reason::InvalidPath(e);
        let audit = audit_selected.then(|| AuditOutcome { action: Action::Deny, reason: reason.clone() });
        Decision { action: Action::Deny, reason, audit }
    }

    /// The audit outcome assumes the end state of a rollout: audit policies enforced and the
    /// default deny (see the crate docs, "Audit mode").
    fn decide(&self, best: Best, audit_selected: bool, default: Action) -> Decision {
        let (action, reason) = self.outcome(best.deny_enforced, best.allow_enforced, default);
        let audit = audit_selected.then(|| {
            let (action, reason) = self.outcome(best.deny_all, best.allow_all, Action::Deny);
            AuditOutcome { action, reason }
        });
        Decision { action, reason, audit }
    }

    fn outcome(&self, deny: u64, allow: u64, default: Action) -> (Action, Reason) {
        let (action, key) = match (deny, allow) {
            (u64::MAX, u64::MAX) => return (default, Reason::Default { action: default }),
            (u64::MAX, allow) => (Action::Allow, allow),
            (deny, _) => (Action::Deny, deny),
        };
        let Some(name) = self.names.get((key >> 32) as usize) else {
            return (default, Reason::Default { action: default });
        };
        let reason = Reason::Policy { name: name.clone(), rule: (key & u64::from(u32::MAX)) as usize, action };
        (action, reason)
    }
}

fn check_limits(policies: &[Policy]) -> Result<(), CompileError> {
    let rules: usize = policies.iter().map(Policy::rule_count).sum();
    if rules > MAX_RULES {
        return Err(CompileError::TooManyRules { count: rules });
    }
    let entries: usize = policies.iter().map(entry_count).sum();
    if entries > MAX_ENTRIES {
        return Err(CompileError::TooManyEntries { count: entries });
    }
    Ok(())
}

fn entry_count(p: &Policy) -> usize {
    match p {
        Policy::Authorization(a) => a.spec.rules.iter().map(|r| r.from.len() + r.to.len()).sum(),
        Policy::Egress(e) => e.spec.rules.iter().map(|r| r.to.len()).sum(),
    }
}

/// Files a clause under its most selective source condition: an exact or prefix identity,
/// then a namespace, then an address, then `identity: "*"`.
fn file_authz_clause(
    group: &mut AuthzGroup,
    id: ClauseId,
    identity: &Option<SpiffePattern>,
    namespace: Option<&str>,
    ip_block: Option<&IpBlock>,
) {
    match (identity, namespace, ip_block) {
        (Some(p @ (SpiffePattern::Exact(_) | SpiffePattern::Prefix(_))), _, _) => group.by_identity.entry(p).push(id),
        (_, Some(ns), _) => group.by_namespace.entry(ns.into()).or_default().push(id),
        (_, None, Some(b)) => group.by_ip.entry(b.cidr()).push(id),
        (Some(SpiffePattern::Any), None, None) => group.by_identity.entry(&SpiffePattern::Any).push(id),
        (None, None, None) => group.always.push(id),
    }
}

/// Every clause of `group` that might match a flow from this source.
fn for_each_candidate(group: &AuthzGroup, source: Option<&SpiffeId>, ip: IpAddr, mut f: impl FnMut(ClauseId)) {
    if let Some(src) = source {
        if !group.by_identity.is_empty() {
            group.by_identity.for_each_match(src, |ids| ids.iter().for_each(|&id| f(id)));
        }
        if let Some(ids) = src.namespace().and_then(|ns| group.by_namespace.get(ns)) {
            ids.iter().for_each(|&id| f(id));
        }
    }
    group.by_ip.for_each_match(ip, |ids| ids.iter().for_each(|&id| f(id)));
    group.always.iter().for_each(|&id| f(id));
}

fn authz_clause_matches(
    c: &AuthzClause,
    source: Option<&SpiffeId>,
    ip: IpAddr,
    dest_td: &str,
    port: u16,
    http: Option<Http<'_>>,
) -> bool {
    let identity_ok = match (&c.identity, source) {
        (None, _) => true,
        (Some(p), Some(src)) => p.matches(src),
        (Some(_), None) => false,
    };
    let namespace_ok = match (&c.namespace, source) {
        (None, _) => true,
        (Some(ns), Some(src)) => in_namespace(src, dest_td, ns),
        (Some(_), None) => false,
    };
    identity_ok
        && namespace_ok
        && c.ip_block.as_ref().is_none_or(|b| b.contains(ip))
        && (c.to.is_empty() || c.to.iter().any(|op| operation_matches(op, c.action, port, http)))
}

/// The HTTP parts of a request, its path normalized.
#[derive(Clone, Copy)]
struct Http<'a> {
    method: &'a str,
    path: &'a str,
    /// The path without its `;` parameters, when it has some (see [`without_parameters`]).
    bare: Option<&'a str>,
}

/// HTTP conditions on a non-HTTP flow: an ALLOW entry does not match, a DENY entry does.
/// A DENY path also matches the path without its `;` parameters (fail safe).
fn operation_matches(op: &Operation, action: Action, port: u16, http: Option<Http<'_>>) -> bool {
    if !op.ports.is_empty() && !op.ports.iter().any(|r| r.contains(port)) {
        return false;
    }
    if !op.is_http() {
        return true;
    }
    let Some(h) = http else {
        return action == Action::Deny;
    };
    let bare = h.bare.filter(|_| action == Action::Deny);
    (op.methods.is_empty() || op.methods.iter().any(|m| m.as_str() == h.method))
        && (op.paths.is_empty() || op.paths.iter().any(|p| p.matches(h.path) || bare.is_some_and(|b| p.matches(b))))
}

fn egress_clause_matches(c: &EgressClause, ip: IpAddr, port: u16) -> bool {
    c.ip_block.as_ref().is_none_or(|b| b.contains(ip))
        && (c.ports.is_empty() || c.ports.iter().any(|r| r.contains(port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::HttpRequest;

    #[test]
    fn snapshot_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PolicySnapshot>();
        assert_send_sync::<Decision>();
    }

    #[test]
    fn clause_keys_order_by_policy_then_rule() {
        assert!(clause_key(0, 5) < clause_key(1, 0));
        assert!(clause_key(3, 1) < clause_key(3, 2));
    }

    /// The audit's cases: `;` parameters and `..;` segments, which Java servers read as
    /// `/admin`, never get past a DENY on `/admin` nor out of an ALLOW on `/api/*`.
    #[test]
    fn path_parameters_cannot_slip_past_path_rules() {
        let text = "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: all}\n\
                    spec: {selector: '*', rules: [{to: [{paths: ['/*']}]}]}\n---\n\
                    apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin}\n\
                    spec: {selector: '*', action: DENY, rules: [{to: [{paths: ['/admin', '/admin/*']}]}]}\n---\n\
                    apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: api}\n\
                    spec: {selector: 'spiffe://td/api', rules: [{to: [{paths: ['/api/*']}]}]}\n";
        let policies = crate::parse_documents(text).unwrap();
        let snapshot = PolicySnapshot::compile(1, policies.clone(), Defaults::default()).unwrap();
        let web = SpiffeId::parse("spiffe://td/web").unwrap();
        let api = SpiffeId::parse("spiffe://td/api").unwrap();
        let decide = |to: &SpiffeId, path: &str| {
            let flow = Flow {
                source: Some(&web),
                source_ip: "10.0.0.1".parse().unwrap(),
                destination: to,
                port: 80,
                http: Some(HttpRequest { method: "GET", path }),
            };
            let d = snapshot.evaluate(&flow);
            assert_eq!(d, crate::reference::evaluate(&policies, Defaults::default(), &flow), "{path}");
            d.to_string()
        };
        for path in ["/admin;", "/admin;x=1/", "/admin;x/panel", "/admin%3Bx", "/;x/admin"] {
            assert_eq!(decide(&web, path), "deny: policy \"no-admin\" rule 0", "{path}");
        }
        let invalid = "deny: invalid path: '.' or '..' segment with a ';' parameter, or after a segment of only \
                       parameters, in path";
        for path in ["/x/..;/admin", "/admin/..;x/y", "/x/.;/admin", "/x/;/../admin"] {
            assert_eq!(decide(&web, path), invalid, "{path}");
        }
        assert_eq!(decide(&api, "/api/..;/admin"), invalid);
        assert_eq!(decide(&api, "/api/;/../admin"), invalid);
        // Parameters elsewhere still pass, and ALLOW rules see the path as sent.
        assert_eq!(decide(&web, "/shop;jsessionid=1/cart"), "allow: policy \"all\" rule 0");
        assert_eq!(decide(&api, "/api/items;v=2"), "allow: policy \"all\" rule 0");
    }
}
