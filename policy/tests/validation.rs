//! Every validation error: each test checks that the message names the document, the field
//! path and the problem, and that a file with any error is refused whole.

use trellis_policy::{ValidationError, ValidationErrors, parse_documents};

/// An AuthorizationPolicy named `name` with `spec` (YAML lines indented by 2 under `spec:`).
fn authz(name: &str, spec: &str) -> String {
    format!("apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

fn egress(name: &str, spec: &str) -> String {
    format!("apiVersion: trellis.dev/v1alpha1\nkind: EgressPolicy\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

fn errors_of(text: &str) -> ValidationErrors {
    match parse_documents(text) {
        Ok(p) => panic!("expected errors, got {} policies from:\n{text}", p.len()),
        Err(e) => e,
    }
}

/// Asserts that `text` is refused with an error on `document`/`path` whose message contains
/// `needle`, and that its one-line form names all three.
#[track_caller]
fn assert_error(text: &str, document: &str, path: &str, needle: &str) {
    let errors = errors_of(text);
    let found = errors.iter().find(|e| e.document == document && e.path == path && e.message.contains(needle));
    let Some(e) = found else {
        panic!("no error {document:?} {path:?} containing {needle:?} in:\n{errors}\n--- for:\n{text}");
    };
    let line = e.to_string();
    assert!(line.contains(path), "{line}");
    assert!(line.contains(document.trim_start_matches('#')), "{line}");
    assert!(!line.contains('\n'), "one line: {line:?}");
}

const SEL: &str = "  selector: spiffe://td/ns/shop/sa/api\n";

fn with_rules(rules: &str) -> String {
    format!("{SEL}  rules:\n{rules}")
}

#[test]
fn bad_spiffe_patterns() {
    let t = authz("p", "  selector: spiffe://td/*/api\n");
    assert_error(&t, "p", "spec.selector", "'*' is only allowed");
    let t = authz("p", &with_rules("  - from:\n    - identity: spiffe://td/ns/a*\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].identity", "'*' is only allowed");
    let t = authz("p", &with_rules("  - from:\n    - identity: http://td/ns/a\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].identity", "invalid SPIFFE ID");
    let t = authz("p", &with_rules("  - from:\n    - identity: spiffe://td/ns/a/\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].identity", "must not end with '/'");
}

#[test]
fn bad_namespace() {
    let t = authz("p", &with_rules("  - from:\n    - namespace: a/b\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].namespace", "invalid namespace");
    let t = authz("p", &with_rules("  - from:\n    - namespace: ''\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].namespace", "must not be empty");
}

#[test]
fn bad_cidrs() {
    let t = authz("p", &with_rules("  - {}\n  - from:\n    - ipBlock: 10.0.0.0/33\n"));
    assert_error(&t, "p", "spec.rules[1].from[0].ipBlock", "invalid CIDR");
    let t = authz("p", &with_rules("  - from:\n    - ipBlock: ten\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].ipBlock", "invalid CIDR \"ten\"");
    let t = authz("p", &with_rules("  - from:\n    - ipBlock: 10.1.0.0/8\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].ipBlock", "host bits set; did you mean \"10.0.0.0/8\"");
    let t = authz("p", &with_rules("  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/99]}\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].ipBlock.except[0]", "invalid CIDR");
    let t = authz("p", &with_rules("  - from:\n    - ipBlock: {except: [10.0.0.0/16]}\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].ipBlock.cidr", "required field is missing");
    let t = authz("p", &with_rules("  - from:\n    - ipBlock: 7\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].ipBlock", "expected a CIDR string or a map");
}

#[test]
fn except_must_be_inside_its_block() {
    let t = authz("p", &with_rules("  - from:\n    - ipBlock: 10.0.0.0/8\n      except: [11.0.0.0/16]\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].except[0]", "except 11.0.0.0/16 is not inside ipBlock 10.0.0.0/8");
    let t = authz(
        "p",
        &with_rules("  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 192.168.0.0/16]}\n"),
    );
    assert_error(&t, "p", "spec.rules[0].from[0].ipBlock.except[1]", "not inside ipBlock");
    let t = authz("p", &with_rules("  - from:\n    - ipBlock: 10.0.0.0/8\n      except: ['::1/128']\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].except[0]", "not inside ipBlock");
    let t = authz("p", &with_rules("  - from:\n    - identity: '*'\n      except: [10.0.0.0/8]\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].except", "except needs an ipBlock");
    let t = authz("p", &with_rules("  - from:\n    - ipBlock: {cidr: 10.0.0.0/8}\n      except: [10.1.0.0/16]\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].except", "given both here and inside ipBlock");
}

#[test]
fn bad_ports() {
    let rules = "  - to:\n    - ports: [0, \"9100-9000\", 70000, http, true, \"0-5\", -3]\n";
    let t = authz("p", &with_rules(rules));
    let p = "spec.rules[0].to[0].ports";
    assert_error(&t, "p", &format!("{p}[0]"), "port 0 is not a valid port");
    assert_error(&t, "p", &format!("{p}[1]"), "port range 9100-9000 is reversed");
    assert_error(&t, "p", &format!("{p}[2]"), "port 70000 is out of range");
    assert_error(&t, "p", &format!("{p}[3]"), "invalid port \"http\"");
    assert_error(&t, "p", &format!("{p}[4]"), "expected a port number or a \"LOW-HIGH\" range string, found a boolean");
    assert_error(&t, "p", &format!("{p}[5]"), "port 0 is not a valid port");
    assert_error(&t, "p", &format!("{p}[6]"), "invalid port \"-3\"");
    assert_eq!(errors_of(&t).len(), 7, "every bad port is reported");
}

#[test]
fn duplicate_names() {
    let a = authz("dup", SEL);
    let t = format!("{a}---\n{a}");
    assert_error(&t, "dup", "metadata.name", "duplicate policy name \"dup\" (documents #1 and #2)");
    // Across kinds too: decisions name policies by name alone.
    let t = format!("{a}---\n{}", egress("dup", SEL));
    assert_error(&t, "dup", "metadata.name", "duplicate policy name");
}

#[test]
fn selectors() {
    assert_error(&authz("p", "  selector: ''\n"), "p", "spec.selector", "must not be empty");
    assert_error(&authz("p", "  action: DENY\n"), "p", "spec.selector", "required field is missing");
    assert_error(&authz("p", "  selector: 5\n"), "p", "spec.selector", "expected a string, found an integer");
}

#[test]
fn bad_action_and_mode() {
    let t = authz("p", &format!("{SEL}  action: allow\n"));
    assert_error(&t, "p", "spec.action", "invalid action \"allow\" (expected ALLOW or DENY)");
    let t = authz("p", &format!("{SEL}  mode: dry-run\n"));
    assert_error(&t, "p", "spec.mode", "invalid mode \"dry-run\" (expected enforce or audit)");
    let t = egress("p", &format!("{SEL}  action: REJECT\n"));
    assert_error(&t, "p", "spec.action", "invalid action");
}

#[test]
fn bad_methods() {
    let t = authz("p", &with_rules("  - to:\n    - methods: ['', 'GE T', get, '*', PROPFIND]\n"));
    let p = "spec.rules[0].to[0].methods";
    assert_error(&t, "p", &format!("{p}[0]"), "must not be empty");
    assert_error(&t, "p", &format!("{p}[1]"), "not an HTTP method token");
    assert_error(&t, "p", &format!("{p}[2]"), "must be written \"GET\"");
    assert_error(&t, "p", &format!("{p}[3]"), "omit `methods` to match any method");
    assert_eq!(errors_of(&t).len(), 4);
}

#[test]
fn bad_paths() {
    let t = authz("p", &with_rules("  - to:\n    - paths: [api/*, /api/*/x, /a/../b, /a?b, '/a%2Fb', /ok/*]\n"));
    let p = "spec.rules[0].to[0].paths";
    assert_error(&t, "p", &format!("{p}[0]"), "must start with '/'");
    assert_error(&t, "p", &format!("{p}[1]"), "'*' is only allowed at the end");
    assert_error(&t, "p", &format!("{p}[2]"), "not normalized and can never match; write \"/b\"");
    assert_error(&t, "p", &format!("{p}[3]"), "must not contain a query");
    assert_error(&t, "p", &format!("{p}[4]"), "encoded '/' in path");
    assert_eq!(errors_of(&t).len(), 5);
}

#[test]
fn unknown_fields() {
    let t = authz("p", &format!("{SEL}  selectr: x\n"));
    assert_error(&t, "p", "spec.selectr", "unknown field \"selectr\" (expected one of: selector, action, mode, rules)");
    let t = authz("p", &with_rules("  - from:\n    - identity: '*'\n      principal: x\n"));
    assert_error(&t, "p", "spec.rules[0].from[0].principal", "unknown field");
    let t = format!("{}status: {{}}\n", authz("p", SEL));
    assert_error(&t, "p", "status", "unknown field \"status\"");
    let t = authz("p", &format!("{SEL}  from: []\n"));
    assert_error(&t, "p", "spec.from", "belong inside a rule");
}

#[test]
fn wrong_api_version_and_kind() {
    let t = authz("p", SEL).replace("trellis.dev/v1alpha1", "security.istio.io/v1");
    assert_error(&t, "p", "apiVersion", "unsupported apiVersion \"security.istio.io/v1\"");
    let t = authz("p", SEL).replace("AuthorizationPolicy", "NetworkPolicy");
    assert_error(&t, "p", "kind", "unknown kind \"NetworkPolicy\"");
    let t = authz("p", SEL).replace("kind: AuthorizationPolicy\n", "");
    assert_error(&t, "p", "kind", "required field is missing");
}

#[test]
fn wrong_value_types() {
    let t = authz("p", &format!("{SEL}  rules: {{}}\n"));
    assert_error(&t, "p", "spec.rules", "expected a list, found a map");
    let t = authz("p", &with_rules("  - from:\n"));
    assert_error(&t, "p", "spec.rules[0].from", "expected a list, found null");
    let t = authz("p", &with_rules("  - from: [identity]\n"));
    assert_error(&t, "p", "spec.rules[0].from[0]", "expected a map, found a string");
    let t = authz("p", "  [a, b]\n");
    assert_error(&t, "p", "spec", "expected a map, found a list");
    assert_error("[1, 2]", "#2", "", "expected a map, found an integer");
}

#[test]
fn egress_to_entries_take_no_http_or_identity() {
    let t = egress("e", &with_rules("  - to:\n    - ipBlock: 0.0.0.0/0\n      methods: [GET]\n      paths: [/x]\n"));
    assert_error(&t, "e", "spec.rules[0].to[0].methods", "not allowed in an EgressPolicy `to` entry");
    assert_error(&t, "e", "spec.rules[0].to[0].paths", "not allowed in an EgressPolicy `to` entry");
    let t = egress("e", &with_rules("  - to:\n    - identity: spiffe://td/x\n"));
    assert_error(&t, "e", "spec.rules[0].to[0].identity", "destinations outside the mesh have no identity");
    let t = egress("e", &with_rules("  - from:\n    - identity: spiffe://td/x\n"));
    assert_error(&t, "e", "spec.rules[0].from", "`from` is not allowed in an EgressPolicy");
}

#[test]
fn authorization_to_entries_take_no_ip_block() {
    let t = authz("p", &with_rules("  - to:\n    - ipBlock: 10.0.0.0/8\n      ports: [80]\n"));
    assert_error(&t, "p", "spec.rules[0].to[0].ipBlock", "ipBlock is not allowed in an AuthorizationPolicy `to` entry");
}

#[test]
fn empty_lists_and_entries() {
    let t = authz("p", &with_rules("  - from: []\n"));
    assert_error(&t, "p", "spec.rules[0].from", "must not be an empty list; omit it to match any source");
    let t = authz("p", &with_rules("  - to: [{}]\n"));
    assert_error(&t, "p", "spec.rules[0].to[0]", "entry has no condition");
    let t = authz("p", &with_rules("  - from: [{}]\n"));
    assert_error(&t, "p", "spec.rules[0].from[0]", "entry has no condition");
    let t = authz("p", &with_rules("  - to:\n    - ports: []\n"));
    assert_error(&t, "p", "spec.rules[0].to[0].ports", "must not be an empty list");
    let t = egress("e", &with_rules("  - to: [{}]\n"));
    assert_error(&t, "e", "spec.rules[0].to[0]", "entry has no condition");
    // A misspelt condition is reported as itself, without the advice to widen the rule.
    for (rules, at) in [
        ("  - from: [{identiy: 'spiffe://td/a'}]\n", "spec.rules[0].from[0]"),
        ("  - to: [{port: [1]}]\n", "spec.rules[0].to[0]"),
    ] {
        let errors = errors_of(&authz("p", &with_rules(rules)));
        assert!(errors.iter().any(|e| e.path.starts_with(at) && e.message.contains("unknown field")), "{errors}");
        assert!(!errors.iter().any(|e| e.message.contains("entry has no condition")), "{errors}");
    }
}

#[test]
fn metadata_problems() {
    let t = authz("p", SEL).replace("  name: p\n", "  namespace: shop\n");
    assert_error(&t, "#1", "metadata.name", "required field is missing");
    let t = authz("Bad_Name", SEL);
    assert_error(&t, "Bad_Name", "metadata.name", "invalid name \"Bad_Name\"");
    let t = authz("p", SEL).replace("  name: p\n", "  name: p\n  namespace: Shop.x\n");
    assert_error(&t, "p", "metadata.namespace", "invalid namespace");
    let t = authz("p", SEL).replace("  name: p\n", "  name: p\n  labels: {app: 1}\n");
    assert_error(&t, "p", "metadata.labels.app", "expected a string, found an integer");
    let t = authz("p", SEL).replace("  name: p\n", "  name: p\n  uid: x\n");
    assert_error(&t, "p", "metadata.uid", "unknown field");
    let long = "a".repeat(254);
    assert_error(&authz(&long, SEL), "#1", "metadata.name", "invalid name");
}

#[test]
fn json_duplicate_keys_and_syntax() {
    let t = r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"AuthorizationPolicy",
        "metadata":{"name":"j"},"spec":{"selector":"*","selector":"*"}}"#;
    assert_error(t, "j", "spec.selector", "duplicate key");
    let e = errors_of("{\"apiVersion\": }");
    assert_eq!(e.len(), 1);
    assert!(e.errors()[0].to_string().starts_with("input: invalid JSON: "), "{e}");
    assert!(e.errors()[0].message.contains("line 1"), "{e}");
    let e = errors_of("a: [\n");
    assert!(e.errors()[0].to_string().starts_with("input: invalid YAML: "), "{e}");
    let e = errors_of("a: 1\na: 2\n");
    assert_eq!(e.errors()[0].message, "invalid YAML: duplicate mapping key: a at line 2, column 1");
}

#[test]
fn all_errors_are_reported_at_once_and_nothing_is_returned() {
    let good = authz("good", SEL);
    let bad1 = authz("bad-one", &format!("{SEL}  action: PERMIT\n  mode: loud\n"));
    let unnamed = authz("x", "  selector: '**'\n").replace("  name: x\n", "  name: 7\n");
    let t = format!("{good}---\n{bad1}---\n{unnamed}");
    let errors = errors_of(&t);
    let lines: Vec<String> = errors.iter().map(ValidationError::to_string).collect();
    assert_eq!(
        lines,
        [
            "document \"bad-one\": spec.action: invalid action \"PERMIT\" (expected ALLOW or DENY)",
            "document \"bad-one\": spec.mode: invalid mode \"loud\" (expected enforce or audit)",
            "document #3: metadata.name: expected a string, found an integer",
            "document #3: spec.selector: '*' is only allowed as the whole pattern (\"*\") or as a final \"/*\"",
        ]
    );
    assert_eq!(errors.to_string().lines().count(), 4);
}

#[test]
fn list_documents_are_checked_item_by_item() {
    let t = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: trellis.dev/v1alpha1\n  kind: AuthorizationPolicy\n  metadata: {name: a}\n  spec: {selector: '*', action: NOPE}\n";
    assert_error(t, "a", "spec.action", "invalid action");
    assert_error("kind: List\n", "#1", "items", "required field is missing");
    let nested = "kind: List\nitems:\n- kind: List\n  items: []\n";
    assert_error(nested, "#1", "kind", "only be the top-level document");
}

#[test]
fn too_many_errors_are_counted_not_kept() {
    let rules = "  - to:\n    - ports: [0]\n".repeat(1_500);
    let errors = errors_of(&authz("p", &with_rules(&rules)));
    assert_eq!(errors.len(), 1_500);
    assert_eq!(errors.errors().len(), trellis_policy::limits::MAX_REPORTED_ERRORS);
    assert_eq!(errors.omitted(), 500);
    assert!(errors.to_string().ends_with("... and 500 more errors"));
}
