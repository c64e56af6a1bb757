//! The reference evaluator: the decision semantics written as directly as possible, checking
//! every rule of every policy. It is slow (linear in the number of rules) and exists to be
//! obviously right: the property tests hold the compiled [`crate::PolicySnapshot`] to it, and
//! [`matching_rules`] explains a decision by listing every rule that matched.
//!
//! Use [`crate::PolicySnapshot`] for real traffic.

use crate::decision::{AuditOutcome, Decision, Defaults, EgressFlow, Flow, Reason};
use crate::model::{Action, AuthorizationPolicy, AuthorizationRule, Destination, Mode, Operation, Policy, Source};
use crate::path::{normalize_path, without_parameters};
use crate::pattern::in_namespace;

/// One rule that matched a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch {
    pub policy: String,
    pub rule: usize,
    pub action: Action,
    pub mode: Mode,
}

/// The normalized HTTP parts of a flow.
#[derive(Clone, Copy)]
struct Http<'a> {
    method: &'a str,
    path: &'a str,
}

impl Http<'_> {
    /// The path a DENY rule is matched against: as normalized, and without its `;` parameters.
    fn deny_paths(&self) -> Vec<String> {
        let mut paths = vec![self.path.to_owned()];
        paths.extend(without_parameters(self.path));
        paths
    }
}

/// Every rule of every AuthorizationPolicy that selects the flow's destination and matches it,
/// in (policy name, rule index) order, audit-mode ones included. Empty when the path is
/// invalid (no rule is consulted then).
pub fn matching_rules(policies: &[Policy], flow: &Flow<'_>) -> Vec<RuleMatch> {
    match flow.http {
        None => authorization_matches(policies, flow, None),
        Some(h) => match normalize_path(h.path) {
            Ok(path) => authorization_matches(policies, flow, Some(Http { method: h.method, path: &path })),
            Err(_) => Vec::new(),
        },
    }
}

/// The decision for a flow into the mesh, as [`crate::PolicySnapshot::evaluate`] must give it.
pub fn evaluate(policies: &[Policy], defaults: Defaults, flow: &Flow<'_>) -> Decision {
    let audit_selected = by_name(policies)
        .any(|p| matches!(p, Policy::Authorization(a) if a.spec.mode == Mode::Audit && p.selects(flow.destination)));
    if let Some(Err(e)) = flow.http.map(|h| normalize_path(h.path)) {
        let reason = Reason::InvalidPath(e);
        let audit = audit_selected.then(|| AuditOutcome { action: Action::Deny, reason: reason.clone() });
        return Decision { action: Action::Deny, reason, audit };
    }
    decide(&matching_rules(policies, flow), audit_selected, defaults.mesh)
}

/// The decision for a connection to outside the mesh, as
/// [`crate::PolicySnapshot::evaluate_egress`] must give it.
pub fn evaluate_egress(policies: &[Policy], defaults: Defaults, flow: &EgressFlow<'_>) -> Decision {
    let audit_selected = by_name(policies)
        .any(|p| matches!(p, Policy::Egress(e) if e.spec.mode == Mode::Audit && p.selects(flow.source)));
    decide(&egress_matching_rules(policies, flow), audit_selected, defaults.egress)
}

/// Every rule of every EgressPolicy that selects the flow's source and matches it.
pub fn egress_matching_rules(policies: &[Policy], flow: &EgressFlow<'_>) -> Vec<RuleMatch> {
    let mut out = Vec::new();
    for policy in by_name(policies) {
        let Policy::Egress(p) = policy else { continue };
        if !policy.selects(flow.source) {
            continue;
        }
        for (i, rule) in p.spec.rules.iter().enumerate() {
            if rule.to.is_empty() || rule.to.iter().any(|d| destination_matches(d, flow)) {
                out.push(rule_match(&p.metadata.name, i, p.spec.action, p.spec.mode));
            }
        }
    }
    out
}

fn by_name(policies: &[Policy]) -> impl Iterator<Item = &Policy> {
    let mut sorted: Vec<&Policy> = policies.iter().collect();
    sorted.sort_by(|a, b| a.name().cmp(b.name()));
    sorted.into_iter()
}

fn rule_match(policy: &str, rule: usize, action: Action, mode: Mode) -> RuleMatch {
    RuleMatch { policy: policy.to_owned(), rule, action, mode }
}

fn authorization_matches(policies: &[Policy], flow: &Flow<'_>, http: Option<Http<'_>>) -> Vec<RuleMatch> {
    let mut out = Vec::new();
    for policy in by_name(policies) {
        let Policy::Authorization(p) = policy else { continue };
        if !policy.selects(flow.destination) {
            continue;
        }
        for (i, rule) in p.spec.rules.iter().enumerate() {
            if rule_matches(p, rule, flow, http) {
                out.push(rule_match(&p.metadata.name, i, p.spec.action, p.spec.mode));
            }
        }
    }
    out
}

/// `from` and `to` both match; an empty list is "any"; entries are ORed.
fn rule_matches(p: &AuthorizationPolicy, rule: &AuthorizationRule, flow: &Flow<'_>, http: Option<Http<'_>>) -> bool {
    let from_ok = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, flow));
    let to_ok = rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, p.spec.action, flow.port, http));
    from_ok && to_ok
}

/// Every field present matches. Identity and namespace need an authenticated source.
fn source_matches(s: &Source, flow: &Flow<'_>) -> bool {
    let identity_ok = match &s.identity {
        None => true,
        Some(pattern) => flow.source.is_some_and(|id| pattern.matches(id)),
    };
    let namespace_ok = match &s.namespace {
        None => true,
        Some(ns) => flow.source.is_some_and(|id| in_namespace(id, flow.destination.trust_domain_str(), ns)),
    };
    let ip_ok = match &s.ip_block {
        None => true,
        Some(block) => block.contains(flow.source_ip),
    };
    identity_ok && namespace_ok && ip_ok
}

/// HTTP conditions on a non-HTTP flow match for DENY (fail safe) and not for ALLOW.
fn operation_matches(o: &Operation, action: Action, port: u16, http: Option<Http<'_>>) -> bool {
    let ports_ok = o.ports.is_empty() || o.ports.iter().any(|r| r.contains(port));
    let methods_ok = o.methods.is_empty()
        || match http {
            Some(h) => o.methods.iter().any(|m| m.as_str() == h.method),
            None => action == Action::Deny,
        };
    let paths_ok = o.paths.is_empty()
        || match http {
            Some(h) if action == Action::Deny => o.paths.iter().any(|p| h.deny_paths().iter().any(|d| p.matches(d))),
            Some(h) => o.paths.iter().any(|p| p.matches(h.path)),
            None => action == Action::Deny,
        };
    ports_ok && methods_ok && paths_ok
}

fn destination_matches(d: &Destination, flow: &EgressFlow<'_>) -> bool {
    let ip_ok = d.ip_block.as_ref().is_none_or(|b| b.contains(flow.destination_ip));
    let ports_ok = d.ports.is_empty() || d.ports.iter().any(|r| r.contains(flow.port));
    ip_ok && ports_ok
}

/// DENY beats ALLOW beats the default; the first match in (name, rule) order is the reason.
/// The audit outcome counts audit-mode matches too, and its default is always deny.
fn decide(matches: &[RuleMatch], audit_selected: bool, default: Action) -> Decision {
    let enforced = |m: &&RuleMatch| m.mode == Mode::Enforce;
    let (action, reason) = outcome(matches.iter().filter(enforced), default);
    let audit = audit_selected.then(|| {
        let (action, reason) = outcome(matches.iter(), Action::Deny);
        AuditOutcome { action, reason }
    });
    Decision { action, reason, audit }
}

fn outcome<'m>(matches: impl Iterator<Item = &'m RuleMatch> + Clone, default: Action) -> (Action, Reason) {
    for wanted in [Action::Deny, Action::Allow] {
        if let Some(m) = matches.clone().find(|m| m.action == wanted) {
            let reason = Reason::Policy { name: m.policy.as_str().into(), rule: m.rule, action: wanted };
            return (wanted, reason);
        }
    }
    (default, Reason::Default { action: default })
}
