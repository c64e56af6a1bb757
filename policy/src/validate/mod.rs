//! The validator: turns one document of the [`Value`] tree into a typed [`Policy`], or records
//! every problem it has, each with the document's name and the field path.
//!
//! Flow: `parse.rs` reads the file into values and splits it into documents; this module
//! checks each document (this file: the document, metadata and spec levels; `entries.rs`:
//! rules and their `from`/`to` entries); `parse.rs` then checks what spans documents
//! (duplicate names, limits).

mod checker;
mod entries;

use std::collections::BTreeMap;

use crate::error::{ValidationError, ValidationErrors};
use crate::limits::{MAX_NAME_LEN, NAME_RULE};
use crate::model::{
    API_VERSION, Action, AuthorizationPolicy, AuthorizationSpec, EgressPolicy, EgressSpec, Metadata, Mode, Policy,
    PolicyKind,
};
use crate::pattern::{SpiffePattern, check_namespace, is_dns_label_text};
use crate::tree::Value;

use checker::no_hint;
pub(crate) use checker::{Checker, Path};

/// The name an error message uses for a document: its `metadata.name` when that is a
/// plausible string, else `#index`.
pub(crate) fn document_label(doc: &Value, index: usize) -> String {
    match readable_name(doc) {
        Some(name) => name.to_owned(),
        None => format!("#{index}"),
    }
}

pub(crate) fn readable_name(doc: &Value) -> Option<&str> {
    let name = doc.get("metadata")?.get("name")?.as_str()?;
    let plausible = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('#')
        && crate::error::escape_unprintable(name) == name;
    plausible.then_some(name)
}

/// Validates one document; `index` counts documents in the file from 1.
pub(crate) fn document(doc: &Value, index: usize, errors: &mut ValidationErrors) -> Option<Policy> {
    let mut c = Checker::new(document_label(doc, index), errors);
    let root = Path::root();
    let keys = ["apiVersion", "kind", "metadata", "spec"];
    let [api, kind, meta, spec] = c.object(doc, &root, keys, no_hint)?;
    let api_ok = check_api_version(&mut c, api, &root.key("apiVersion"));
    let kind = check_kind(&mut c, kind, &root.key("kind"));
    let metadata = check_metadata(&mut c, meta, &root.key("metadata"));
    let spec_path = root.key("spec");
    let spec = c.required(spec, &spec_path);
    let spec = match (kind?, spec) {
        (PolicyKind::Authorization, Some(s)) => authorization_spec(&mut c, s, &spec_path).map(Spec::Authorization),
        (PolicyKind::Egress, Some(s)) => egress_spec(&mut c, s, &spec_path).map(Spec::Egress),
        (_, None) => None,
    };
    api_ok?;
    let metadata = metadata?;
    Some(match spec? {
        Spec::Authorization(spec) => Policy::Authorization(AuthorizationPolicy { metadata, spec }),
        Spec::Egress(spec) => Policy::Egress(EgressPolicy { metadata, spec }),
    })
}

enum Spec {
    Authorization(AuthorizationSpec),
    Egress(EgressSpec),
}

/// Validates a value that must be exactly one policy document (the serde path).
pub(crate) fn single_document(doc: &Value) -> Result<Policy, ValidationErrors> {
    let mut errors = ValidationErrors::default();
    match document(doc, 1, &mut errors) {
        Some(p) if errors.is_empty() => Ok(p),
        _ if errors.is_empty() => Err(ValidationErrors::one(ValidationError::input("not a valid policy document"))),
        _ => Err(errors),
    }
}

fn check_api_version(c: &mut Checker<'_>, v: Option<&Value>, path: &Path<'_>) -> Option<()> {
    let v = c.required(v, path)?;
    let s = c.string(v, path)?;
    if s == API_VERSION {
        return Some(());
    }
    c.error(path, format_args!("unsupported apiVersion {s:?} (expected {API_VERSION:?})"));
    None
}

fn check_kind(c: &mut Checker<'_>, v: Option<&Value>, path: &Path<'_>) -> Option<PolicyKind> {
    let v = c.required(v, path)?;
    let s = c.string(v, path)?;
    match s {
        "AuthorizationPolicy" => Some(PolicyKind::Authorization),
        "EgressPolicy" => Some(PolicyKind::Egress),
        "List" => {
            c.error(path, "a List can only be the top-level document, not an item");
            None
        }
        other => {
            c.error(path, format_args!("unknown kind {other:?} (expected AuthorizationPolicy or EgressPolicy)"));
            None
        }
    }
}

fn check_metadata(c: &mut Checker<'_>, v: Option<&Value>, path: &Path<'_>) -> Option<Metadata> {
    let v = c.required(v, path)?;
    let keys = ["name", "namespace", "labels", "annotations"];
    let [name, ns, labels, annotations] = c.object(v, path, keys, no_hint)?;
    let name_path = path.key("name");
    let name = c.required(name, &name_path).and_then(|v| c.parsed(v, &name_path, |s| check_name(s).map(str::to_owned)));
    let namespace = match ns {
        None => Some(None),
        Some(v) => c.parsed(v, &path.key("namespace"), |s| check_k8s_namespace(s).map(str::to_owned)).map(Some),
    };
    let labels = string_map(c, labels, &path.key("labels"));
    let annotations = string_map(c, annotations, &path.key("annotations"));
    Some(Metadata { name: name?, namespace: namespace?, labels: labels?, annotations: annotations? })
}

/// A DNS-1123 subdomain, as Kubernetes object names are: at most 253 characters, labels of
/// lowercase letters, digits and '-' separated by single dots, each starting and ending with a
/// letter or digit (so no `a..b`, `.a`, `a.-b`).
pub fn check_name(s: &str) -> Result<&str, String> {
    let ok = s.len() <= MAX_NAME_LEN && s.split('.').all(is_dns_label_text);
    if ok { Ok(s) } else { Err(format!("invalid name {s:?}: {NAME_RULE}")) }
}

/// A DNS-1123 label, as Kubernetes namespaces are.
fn check_k8s_namespace(s: &str) -> Result<&str, String> {
    check_namespace(s).map(|()| s).map_err(|e| e.to_string())
}

fn string_map(c: &mut Checker<'_>, v: Option<&Value>, path: &Path<'_>) -> Option<BTreeMap<String, String>> {
    let Some(v) = v else {
        return Some(BTreeMap::new());
    };
    let Value::Map(entries) = v else {
        c.error(path, format_args!("expected a map of strings, found {}", v.type_name()));
        return None;
    };
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (k, v) in entries {
        let here = path.key(k);
        match c.string(v, &here) {
            Some(s) if out.insert(k.clone(), s.to_owned()).is_some() => {
                c.error(&here, "duplicate key");
                ok = false;
            }
            Some(_) => {}
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// The fields both kinds of spec share.
struct SpecCommon {
    selector: SpiffePattern,
    action: Action,
    mode: Mode,
}

fn spec_common(
    c: &mut Checker<'_>,
    [selector, action, mode]: [Option<&Value>; 3],
    path: &Path<'_>,
) -> Option<SpecCommon> {
    let sel_path = path.key("selector");
    let selector = c.required(selector, &sel_path).and_then(|v| c.parsed(v, &sel_path, SpiffePattern::parse));
    let action = match action {
        None => Some(Action::Allow),
        Some(v) => c.parsed(v, &path.key("action"), |s| match s {
            "ALLOW" => Ok(Action::Allow),
            "DENY" => Ok(Action::Deny),
            other => Err(format!("invalid action {other:?} (expected ALLOW or DENY)")),
        }),
    };
    let mode = match mode {
        None => Some(Mode::Enforce),
        Some(v) => c.parsed(v, &path.key("mode"), |s| match s {
            "enforce" => Ok(Mode::Enforce),
            "audit" => Ok(Mode::Audit),
            other => Err(format!("invalid mode {other:?} (expected enforce or audit)")),
        }),
    };
    Some(SpecCommon { selector: selector?, action: action?, mode: mode? })
}

fn spec_hint(key: &str) -> Option<&'static str> {
    match key {
        "from" | "to" => Some("`from` and `to` belong inside a rule: spec.rules[N].from / .to"),
        _ => None,
    }
}

/// `rules` may be absent or empty: a policy without rules matches nothing.
fn rules<T>(
    c: &mut Checker<'_>,
    v: Option<&Value>,
    path: &Path<'_>,
    f: impl FnMut(&mut Checker<'_>, &Value, &Path<'_>) -> Option<T>,
) -> Option<Vec<T>> {
    let Some(v) = v else {
        return Some(Vec::new());
    };
    let items = c.seq(v, path)?;
    c.each(items, path, f)
}

fn authorization_spec(c: &mut Checker<'_>, v: &Value, path: &Path<'_>) -> Option<AuthorizationSpec> {
    let keys = ["selector", "action", "mode", "rules"];
    let [selector, action, mode, rule_list] = c.object(v, path, keys, spec_hint)?;
    let common = spec_common(c, [selector, action, mode], path);
    let rules = rules(c, rule_list, &path.key("rules"), entries::authorization_rule);
    let common = common?;
    Some(AuthorizationSpec { selector: common.selector, action: common.action, mode: common.mode, rules: rules? })
}

fn egress_spec(c: &mut Checker<'_>, v: &Value, path: &Path<'_>) -> Option<EgressSpec> {
    let keys = ["selector", "action", "mode", "rules"];
    let [selector, action, mode, rule_list] = c.object(v, path, keys, spec_hint)?;
    let common = spec_common(c, [selector, action, mode], path);
    let rules = rules(c, rule_list, &path.key("rules"), entries::egress_rule);
    let common = common?;
    Some(EgressSpec { selector: common.selector, action: common.action, mode: common.mode, rules: rules? })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::parse_documents;

    fn doc(metadata: &str, spec: &str) -> String {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {metadata}\nspec: {spec}\n")
    }

    /// Every problem `parse_documents` reports for `text`, which it must refuse.
    pub(crate) fn errors(text: &str) -> Vec<String> {
        match parse_documents(text) {
            Ok(p) => panic!("accepted {p:?} from:\n{text}"),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn names_are_dns_1123_subdomains() {
        for good in ["a", "a.b", "a-b.c-d", "0", "a.0.b", &"a".repeat(MAX_NAME_LEN)] {
            assert_eq!(check_name(good), Ok(good), "{good}");
        }
        for bad in ["", "a..b", ".a", "a.", "a.-b", "a-.b", "-a", "A", "a_b", "a b", &"a".repeat(MAX_NAME_LEN + 1)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            errors(&doc("{name: a..b}", "{selector: '*'}")),
            [
                "document \"a..b\": metadata.name: invalid name \"a..b\": names are 1-253 lowercase letters, digits, '-' \
                 and '.', starting and ending with a letter or digit, with a letter or digit on each side of every '.'"
            ]
        );
    }

    #[test]
    fn metadata_and_from_namespaces_follow_the_same_rule() {
        let long = "a".repeat(70);
        for bad in ["Monitoring", long.as_str(), "a_b", "a.b", "-a", "a-"] {
            let text = doc(
                &format!("{{name: p, namespace: '{bad}'}}"),
                &format!("{{selector: '*', rules: [{{from: [{{namespace: '{bad}'}}]}}]}}"),
            );
            let rule = format!(
                "invalid namespace {bad:?}: namespaces are 1-63 lowercase letters, digits and '-', starting and \
                 ending with a letter or digit (a DNS-1123 label, as Kubernetes namespaces are)"
            );
            assert_eq!(
                errors(&text),
                [
                    format!("document \"p\": metadata.namespace: {rule}"),
                    format!("document \"p\": spec.rules[0].from[0].namespace: {rule}"),
                ]
            );
        }
        let text = doc("{name: p, namespace: shop-1}", "{selector: '*', rules: [{from: [{namespace: monitoring}]}]}");
        assert!(parse_documents(&text).is_ok());
        assert!(parse_documents(&text.replace("monitoring", &"m".repeat(63))).is_ok());
    }
}
