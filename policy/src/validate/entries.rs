//! Validation of rules and their entries: `from` (sources), `to` (operations for
//! AuthorizationPolicy, destinations for EgressPolicy), IP blocks and ports.
//!
//! Keys that belong to the other kind of entry get a message saying where they belong, since
//! "unknown field" alone would not tell a user why `ipBlock` is refused in a `to` entry.

use ipnetwork::IpNetwork;

use super::checker::{Checker, Path};
use crate::model::{AuthorizationRule, Destination, EgressRule, Operation, Source};
use crate::pattern::{
    IpBlock, Method, PathPattern, PatternError, PortRange, SpiffePattern, check_namespace, parse_cidr,
};
use crate::tree::Value;

pub(super) fn authorization_rule(c: &mut Checker<'_>, v: &Value, path: &Path<'_>) -> Option<AuthorizationRule> {
    let [from, to] = c.object(v, path, ["from", "to"], authorization_rule_hint)?;
    let from = c.optional_list(from, &path.key("from"), "any source", source);
    let to = c.optional_list(to, &path.key("to"), "any port, method and path", operation);
    Some(AuthorizationRule { from: from?, to: to? })
}

fn authorization_rule_hint(key: &str) -> Option<&'static str> {
    match key {
        "identity" | "namespace" | "ipBlock" => Some("belongs in a `from` entry: from: [{...}]"),
        "ports" | "methods" | "paths" => Some("belongs in a `to` entry: to: [{...}]"),
        _ => None,
    }
}

pub(super) fn egress_rule(c: &mut Checker<'_>, v: &Value, path: &Path<'_>) -> Option<EgressRule> {
    let [to] = c.object(v, path, ["to"], egress_rule_hint)?;
    let to = c.optional_list(to, &path.key("to"), "any address and port", destination);
    Some(EgressRule { to: to? })
}

fn egress_rule_hint(key: &str) -> Option<&'static str> {
    match key {
        "from" => Some("`from` is not allowed in an EgressPolicy: its selector picks the sources"),
        "ipBlock" | "ports" => Some("belongs in a `to` entry: to: [{...}]"),
        _ => None,
    }
}

/// An entry with no keys at all (`{}`): only then is "no condition" the problem. Keys that are
/// all unknown (a typo: `identiy`) already have their own errors, and the hint to widen the
/// rule ("omit `from`") would point the wrong way.
fn is_empty_map(v: &Value) -> bool {
    matches!(v, Value::Map(entries) if entries.is_empty())
}

fn source(c: &mut Checker<'_>, v: &Value, path: &Path<'_>) -> Option<Source> {
    let keys = ["identity", "namespace", "ipBlock", "except"];
    let [identity, namespace, ip_block, except] = c.object(v, path, keys, source_hint)?;
    // A lone `except` gets its own, more precise error from `ip_block_field`.
    if identity.is_none() && namespace.is_none() && ip_block.is_none() && except.is_none() && is_empty_map(v) {
        c.error(path, "entry has no condition (identity, namespace or ipBlock); omit `from` to match any source");
    }
    let identity = identity.map(|v| c.parsed(v, &path.key("identity"), SpiffePattern::parse));
    let namespace =
        namespace.map(|v| c.parsed(v, &path.key("namespace"), |s| check_namespace(s).map(|()| s.to_owned())));
    let ip_block = ip_block_field(c, ip_block, except, path);
    Some(Source { identity: flip(identity)?, namespace: flip(namespace)?, ip_block: ip_block? })
}

fn source_hint(key: &str) -> Option<&'static str> {
    match key {
        "ports" | "methods" | "paths" => Some("belongs in the rule's `to` entries, not in `from`"),
        _ => None,
    }
}

fn operation(c: &mut Checker<'_>, v: &Value, path: &Path<'_>) -> Option<Operation> {
    let [ports, methods, paths] = c.object(v, path, ["ports", "methods", "paths"], operation_hint)?;
    if ports.is_none() && methods.is_none() && paths.is_none() && is_empty_map(v) {
        c.error(path, "entry has no condition (ports, methods or paths); omit `to` to match any port, method and path");
    }
    let ports = c.optional_list(ports, &path.key("ports"), "any port", port);
    let methods = c.optional_list(methods, &path.key("methods"), "any method", |c, v, p| c.parsed(v, p, Method::parse));
    let paths = c.optional_list(paths, &path.key("paths"), "any path", |c, v, p| c.parsed(v, p, PathPattern::parse));
    Some(Operation { ports: ports?, methods: methods?, paths: paths? })
}

fn operation_hint(key: &str) -> Option<&'static str> {
    match key {
        "ipBlock" | "except" => Some(
            "ipBlock is not allowed in an AuthorizationPolicy `to` entry: put the peer's ipBlock in \
             `from`; for destinations outside the mesh use an EgressPolicy",
        ),
        "identity" | "namespace" => Some("belongs in the rule's `from` entries, not in `to`"),
        _ => None,
    }
}

fn destination(c: &mut Checker<'_>, v: &Value, path: &Path<'_>) -> Option<Destination> {
    let keys = ["ipBlock", "except", "ports"];
    let [ip_block, except, ports] = c.object(v, path, keys, destination_hint)?;
    if ip_block.is_none() && ports.is_none() && except.is_none() && is_empty_map(v) {
        c.error(path, "entry has no condition (ipBlock or ports); omit `to` to match any address and port");
    }
    let ip_block = ip_block_field(c, ip_block, except, path);
    let ports = c.optional_list(ports, &path.key("ports"), "any port", port);
    Some(Destination { ip_block: ip_block?, ports: ports? })
}

fn destination_hint(key: &str) -> Option<&'static str> {
    match key {
        "methods" | "paths" => Some(
            "methods and paths are not allowed in an EgressPolicy `to` entry: egress is checked per \
             connection, without HTTP conditions",
        ),
        "identity" | "namespace" => Some(
            "identity and namespace are not allowed in an EgressPolicy `to` entry: destinations \
             outside the mesh have no identity; use ipBlock",
        ),
        _ => None,
    }
}

/// `Option<Option<T>>` from "absent / present and valid / present and invalid".
fn flip<T>(v: Option<Option<T>>) -> Option<Option<T>> {
    match v {
        None => Some(None),
        Some(Some(t)) => Some(Some(t)),
        Some(None) => None,
    }
}

/// The `ipBlock` of an entry, with the `except` that may sit beside it (string form) or inside
/// it (object form). `Some(None)` when the entry has no ipBlock.
fn ip_block_field(
    c: &mut Checker<'_>,
    ip_block: Option<&Value>,
    sibling_except: Option<&Value>,
    entry: &Path<'_>,
) -> Option<Option<IpBlock>> {
    let here = entry.key("ipBlock");
    let (cidr_value, cidr_path, except) = match (ip_block, sibling_except) {
        (None, None) => return Some(None),
        (None, Some(_)) => {
            c.error(&entry.key("except"), "except needs an ipBlock in the same entry");
            return None;
        }
        (Some(b @ Value::Map(_)), sibling) => {
            let [cidr, except] = c.object(b, &here, ["cidr", "except"], |_| None)?;
            if sibling.is_some() {
                c.error(&entry.key("except"), "except is given both here and inside ipBlock; use one");
            }
            let cidr = c.required(cidr, &here.key("cidr"));
            (cidr?, here.key("cidr"), except.map(|e| (e, here.key("except"))))
        }
        (Some(b @ Value::Str(_)), sibling) => (b, here, sibling.map(|e| (e, entry.key("except")))),
        (Some(other), _) => {
            c.error(
                &here,
                format_args!("expected a CIDR string or a map with `cidr` and `except`, found {}", other.type_name()),
            );
            return None;
        }
    };
    let cidr = c.parsed(cidr_value, &cidr_path, parse_cidr);
    let except = match &except {
        None => Some(Vec::new()),
        Some((v, p)) => except_list(c, v, p, cidr),
    };
    match IpBlock::new(cidr?, except?) {
        Ok(b) => Some(Some(b)),
        Err(e) => {
            c.error(&cidr_path, e);
            None
        }
    }
}

/// Each `except` must parse, lie inside the block's CIDR (when that parsed) and not be all of
/// it; the list must not be empty (it would read as "except something" and carve out nothing).
fn except_list(c: &mut Checker<'_>, v: &Value, path: &Path<'_>, cidr: Option<IpNetwork>) -> Option<Vec<IpNetwork>> {
    let items = c.seq(v, path)?;
    if items.is_empty() {
        c.error(path, "must not be an empty list; omit `except` to keep the whole ipBlock");
        return None;
    }
    c.each(items, path, |c, v, p| {
        let e = c.parsed(v, p, parse_cidr)?;
        if let Some(cidr) = cidr {
            match IpBlock::new(cidr, vec![e]) {
                Ok(_) => {}
                Err(PatternError::ExceptCoversBlock(..)) => {
                    c.error(
                        p,
                        format_args!("except {e} is the whole ipBlock {cidr}, so the entry could match nothing"),
                    );
                    return None;
                }
                Err(_) => {
                    c.error(p, format_args!("except {e} is not inside ipBlock {cidr}"));
                    return None;
                }
            }
        }
        Some(e)
    })
}

fn port(c: &mut Checker<'_>, v: &Value, path: &Path<'_>) -> Option<PortRange> {
    let parsed = match v {
        Value::Int(n) => PortRange::from_number(*n),
        Value::Str(s) => PortRange::parse(s),
        other => {
            c.error(
                path,
                format_args!("expected a port number or a \"LOW-HIGH\" range string, found {}", other.type_name()),
            );
            return None;
        }
    };
    match parsed {
        Ok(p) => Some(p),
        Err(e) => {
            c.error(path, e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::errors;
    use crate::parse_documents;

    fn authz(from: &str) -> String {
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\n\
             spec: {{selector: '*', rules: [{{from: [{from}]}}]}}\n"
        )
    }

    fn egress(to: &str) -> String {
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: e}}\n\
             spec: {{selector: '*', rules: [{{to: [{to}]}}]}}\n"
        )
    }

    #[test]
    fn an_empty_except_list_is_refused() {
        let msg = "must not be an empty list; omit `except` to keep the whole ipBlock";
        assert_eq!(
            errors(&authz("{ipBlock: 10.0.0.0/8, except: []}")),
            [format!("document \"p\": spec.rules[0].from[0].except: {msg}")]
        );
        assert_eq!(
            errors(&authz("{ipBlock: {cidr: 10.0.0.0/8, except: []}}")),
            [format!("document \"p\": spec.rules[0].from[0].ipBlock.except: {msg}")]
        );
        assert_eq!(
            errors(&egress("{ipBlock: 10.0.0.0/8, except: []}")),
            [format!("document \"e\": spec.rules[0].to[0].except: {msg}")]
        );
    }

    #[test]
    fn an_except_that_leaves_nothing_of_its_ip_block_is_refused() {
        assert_eq!(
            errors(&authz("{ipBlock: 10.0.0.0/8, except: [10.0.0.0/8]}")),
            ["document \"p\": spec.rules[0].from[0].except[0]: except 10.0.0.0/8 is the whole ipBlock 10.0.0.0/8, \
                 so the entry could match nothing"]
        );
        assert_eq!(
            errors(&egress("{ipBlock: {cidr: '::ffff:10.0.0.0/104', except: ['10.0.0.0/8']}}")),
            ["document \"e\": spec.rules[0].to[0].ipBlock.except[0]: except 10.0.0.0/8 is the whole ipBlock \
                 10.0.0.0/8, so the entry could match nothing"]
        );
        assert_eq!(
            errors(&authz("{ipBlock: 10.0.0.0/8, except: [10.0.0.0/9, 10.128.0.0/9]}")),
            ["document \"p\": spec.rules[0].from[0].ipBlock: ipBlock \"10.0.0.0/8\" matches no address: its except \
                 entries (10.0.0.0/9, 10.128.0.0/9) cover all of it"]
        );
        assert!(parse_documents(&authz("{ipBlock: 10.0.0.0/8, except: [10.0.0.0/9]}")).is_ok());
    }

    #[test]
    fn bad_prefix_lengths_name_the_prefix_and_its_range() {
        assert_eq!(
            errors(&authz("{ipBlock: 10.0.0.0/33}")),
            ["document \"p\": spec.rules[0].from[0].ipBlock: invalid CIDR \"10.0.0.0/33\": prefix length 33 is out \
                 of range (IPv4 prefix lengths are 0-32)"]
        );
        assert_eq!(
            errors(&egress("{ipBlock: '::/129'}")),
            ["document \"e\": spec.rules[0].to[0].ipBlock: invalid CIDR \"::/129\": prefix length 129 is out of \
                 range (IPv6 prefix lengths are 0-128)"]
        );
    }
}
