//! The typed policy documents (docs/policy.md): what [`crate::parse_documents`] produces, what
//! [`crate::PolicySnapshot::compile`] consumes, and what the control plane stores and pushes as
//! JSON.
//!
//! Every field holds an already-validated value type, so a `Policy` is well-formed by
//! construction. Serializing writes the canonical document form; deserializing goes through the
//! same validator as [`crate::parse_documents`] (one grammar, one set of error messages), so
//! JSON written by `serde_json::to_string(&policy)` reads back to an equal `Policy`.

use std::collections::BTreeMap;
use std::fmt;

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Deserializer, Serialize};
use trellis_identity::SpiffeId;

use crate::pattern::{IpBlock, Method, PathPattern, PortRange, SpiffePattern};

/// The one `apiVersion` this crate reads and writes.
pub const API_VERSION: &str = "trellis.dev/v1alpha1";

/// A policy document of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    Authorization(AuthorizationPolicy),
    Egress(EgressPolicy),
}

/// `kind:` of a policy document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    Authorization,
    Egress,
}

impl PolicyKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            PolicyKind::Authorization => "AuthorizationPolicy",
            PolicyKind::Egress => "EgressPolicy",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a policy does to the flows its rules match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// `allow` / `deny`, the form used in decisions and CLI output.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }

    /// `ALLOW` / `DENY`, the form used in documents.
    pub fn document_str(&self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `enforce` policies decide; `audit` policies only report what they would have decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

/// `metadata:`. Only `name` matters to Trellis; the rest is kept so kubectl-style files work.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Metadata {
    /// DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253 characters.
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// `kind: AuthorizationPolicy`: who may reach the selected destinations, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub metadata: Metadata,
    pub spec: AuthorizationSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorizationSpec {
    /// Picks the destinations this policy applies to.
    pub selector: SpiffePattern,
    pub action: Action,
    pub mode: Mode,
    /// OR across rules; none matches nothing.
    pub rules: Vec<AuthorizationRule>,
}

/// A rule matches when its `from` and its `to` both match; an empty list means "any".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuthorizationRule {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
}

/// One `from` entry: every field present must match (AND).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<SpiffePattern>,
    /// Any identity strictly below `spiffe://<destination's trust domain>/ns/<namespace>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(rename = "ipBlock", skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

/// One `to` entry of an AuthorizationPolicy: every list present must match (AND); within a
/// list, any item (OR).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Operation {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<Method>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathPattern>,
}

impl Operation {
    /// Whether this entry has HTTP-only conditions.
    pub fn is_http(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty()
    }
}

/// `kind: EgressPolicy`: where the selected sources may connect outside the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    pub metadata: Metadata,
    pub spec: EgressSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EgressSpec {
    /// Picks the sources this policy applies to.
    pub selector: SpiffePattern,
    pub action: Action,
    pub mode: Mode,
    pub rules: Vec<EgressRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EgressRule {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Destination>,
}

/// One `to` entry of an EgressPolicy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Destination {
    #[serde(rename = "ipBlock", skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
}

impl Policy {
    /// The SPIFFE ID patterns (selector, `from` identities) outside `trust_domain`, as
    /// (field, pattern). A mesh has one trust domain: such a pattern can never match, and is
    /// almost always a typo (`cluster.locl`) that would leave a rule dead without a word.
    pub fn foreign_patterns(&self, trust_domain: &str) -> Vec<(String, String)> {
        let foreign = |p: &SpiffePattern| match p {
            SpiffePattern::Any => false,
            SpiffePattern::Exact(id) | SpiffePattern::Prefix(id) => id.trust_domain_str() != trust_domain,
        };
        let mut out = Vec::new();
        if foreign(self.selector()) {
            out.push(("spec.selector".to_string(), self.selector().to_string()));
        }
        if let Policy::Authorization(p) = self {
            for (i, rule) in p.spec.rules.iter().enumerate() {
                for (j, source) in rule.from.iter().enumerate() {
                    if let Some(id) = source.identity.as_ref().filter(|id| foreign(id)) {
                        out.push((format!("spec.rules[{i}].from[{j}].identity"), id.to_string()));
                    }
                }
            }
        }
        out
    }

    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    pub fn kind(&self) -> PolicyKind {
        match self {
            Policy::Authorization(_) => PolicyKind::Authorization,
            Policy::Egress(_) => PolicyKind::Egress,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Policy::Authorization(p) => &p.metadata,
            Policy::Egress(p) => &p.metadata,
        }
    }

    pub fn selector(&self) -> &SpiffePattern {
        match self {
            Policy::Authorization(p) => &p.spec.selector,
            Policy::Egress(p) => &p.spec.selector,
        }
    }

    pub fn action(&self) -> Action {
        match self {
            Policy::Authorization(p) => p.spec.action,
            Policy::Egress(p) => p.spec.action,
        }
    }

    pub fn mode(&self) -> Mode {
        match self {
            Policy::Authorization(p) => p.spec.mode,
            Policy::Egress(p) => p.spec.mode,
        }
    }

    pub fn rule_count(&self) -> usize {
        match self {
            Policy::Authorization(p) => p.spec.rules.len(),
            Policy::Egress(p) => p.spec.rules.len(),
        }
    }

    /// Whether this policy applies to `workload`: for an AuthorizationPolicy, as the
    /// destination; for an EgressPolicy, as the source. The control plane uses it to push each
    /// proxy only the policies that concern it.
    pub fn selects(&self, workload: &SpiffeId) -> bool {
        self.selector().matches(workload)
    }
}

impl Serialize for SpiffePattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for Method {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl Serialize for PathPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A single port is written as a number, a range as `"LOW-HIGH"`.
impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.low() == self.high() { s.serialize_u16(self.low()) } else { s.collect_str(self) }
    }
}

/// The string form without `except`, the object form with it.
impl Serialize for IpBlock {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.except().is_empty() {
            return s.collect_str(&self.cidr());
        }
        let except: Vec<String> = self.except().iter().map(|e| e.to_string()).collect();
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("cidr", &self.cidr().to_string())?;
        m.serialize_entry("except", &except)?;
        m.end()
    }
}

fn serialize_document<S: Serializer, T: Serialize>(
    s: S,
    kind: PolicyKind,
    metadata: &Metadata,
    spec: &T,
) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(4))?;
    m.serialize_entry("apiVersion", API_VERSION)?;
    m.serialize_entry("kind", kind.as_str())?;
    m.serialize_entry("metadata", metadata)?;
    m.serialize_entry("spec", spec)?;
    m.end()
}

impl Serialize for AuthorizationPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_document(s, PolicyKind::Authorization, &self.metadata, &self.spec)
    }
}

impl Serialize for EgressPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_document(s, PolicyKind::Egress, &self.metadata, &self.spec)
    }
}

impl Serialize for Policy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Policy::Authorization(p) => p.serialize(s),
            Policy::Egress(p) => p.serialize(s),
        }
    }
}

/// Reads one policy document through the full validator; every problem found is in the error.
impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = crate::tree::Value::deserialize(d)?;
        crate::validate::single_document(&value).map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for AuthorizationPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Policy::deserialize(d)? {
            Policy::Authorization(p) => Ok(p),
            Policy::Egress(_) => Err(serde::de::Error::custom("expected kind AuthorizationPolicy, found EgressPolicy")),
        }
    }
}

impl<'de> Deserialize<'de> for EgressPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Policy::deserialize(d)? {
            Policy::Egress(p) => Ok(p),
            Policy::Authorization(_) => {
                Err(serde::de::Error::custom("expected kind EgressPolicy, found AuthorizationPolicy"))
            }
        }
    }
}
