//! Reading documents: every accepted file shape, defaults, the typed model, the JSON round
//! trip the control plane relies on, and the limits.

use trellis_policy::limits::{MAX_DOCUMENTS, MAX_INPUT_BYTES, MAX_RULES};
use trellis_policy::{
    Action, AuthorizationPolicy, AuthorizationRule, AuthorizationSpec, CompileError, Defaults, EgressPolicy, Metadata,
    Mode, Policy, PolicyKind, PolicySnapshot, SpiffeId, SpiffePattern, parse_documents,
};

const FULL: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: api-from-web
  namespace: shop
  labels: {team: payments}
  annotations: {owner: "sec@example.com"}
spec:
  selector: spiffe://cluster.local/ns/shop/sa/api
  action: ALLOW
  mode: enforce
  rules:
    - from:
        - identity: spiffe://cluster.local/ns/shop/sa/web
        - namespace: monitoring
        - ipBlock: 10.0.0.0/8
          except: [10.1.0.0/16]
        - ipBlock: {cidr: "2001:db8::/32", except: ["2001:db8:1::/48"]}
      to:
        - ports: [8080, "9000-9100", "443"]
          methods: [GET, HEAD]
          paths: ["/api/*", "/healthz"]
    - {}
---
apiVersion: trellis.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: payments-to-psp
spec:
  selector: spiffe://cluster.local/ns/shop/*
  rules:
    - to:
        - ipBlock: 203.0.113.0/24
          ports: [443]
"#;

fn ok(text: &str) -> Vec<Policy> {
    parse_documents(text).unwrap_or_else(|e| panic!("{e}\n--- for:\n{text}"))
}

#[test]
fn full_example_reads_into_the_typed_model() {
    let policies = ok(FULL);
    assert_eq!(policies.len(), 2);
    let Policy::Authorization(a) = &policies[0] else { panic!("kind") };
    assert_eq!(a.metadata.name, "api-from-web");
    assert_eq!(a.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(a.metadata.labels["team"], "payments");
    assert_eq!(a.spec.rules.len(), 2);
    let rule = &a.spec.rules[0];
    assert_eq!(rule.from.len(), 4);
    assert_eq!(rule.from[1].namespace.as_deref(), Some("monitoring"));
    let block = rule.from[2].ip_block.as_ref().unwrap();
    assert_eq!(block.cidr().to_string(), "10.0.0.0/8");
    assert_eq!(block.except().len(), 1);
    let ports: Vec<String> = rule.to[0].ports.iter().map(ToString::to_string).collect();
    assert_eq!(ports, ["8080", "9000-9100", "443"]);
    assert_eq!(a.spec.rules[1], AuthorizationRule::default());
    assert_eq!(policies[1].kind(), PolicyKind::Egress);
    assert_eq!(policies[1].name(), "payments-to-psp");
}

#[test]
fn defaults_are_allow_and_enforce() {
    let p =
        ok("apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: d}\nspec: {selector: '*'}\n");
    assert_eq!(p[0].action(), Action::Allow);
    assert_eq!(p[0].mode(), Mode::Enforce);
    assert_eq!(p[0].rule_count(), 0);
}

#[test]
fn json_object_array_and_kubectl_list() {
    let one = r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"AuthorizationPolicy","metadata":{"name":"a"},"spec":{"selector":"*"}}"#;
    assert_eq!(ok(one).len(), 1);
    let two = one.replace("\"a\"", "\"b\"");
    assert_eq!(ok(&format!("[{one}, {two}]")).len(), 2);
    let list = format!(r#"{{"apiVersion":"v1","kind":"List","metadata":{{}},"items":[{one},{two}]}}"#);
    assert_eq!(ok(&list).len(), 2);
    let yaml_list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: trellis.dev/v1alpha1\n  kind: EgressPolicy\n  metadata: {name: e}\n  spec: {selector: '*'}\n";
    assert_eq!(ok(yaml_list)[0].kind(), PolicyKind::Egress);
    assert!(ok("").is_empty());
    assert!(ok("---\n---\n# nothing\n").is_empty());
    assert!(ok("\u{feff}[]").is_empty());
}

#[test]
fn ipv6_and_mapped_cidrs() {
    let p = ok(
        "apiVersion: trellis.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: e}\nspec:\n  selector: '*'\n  rules:\n  - to:\n    - ipBlock: ::1/128\n    - ipBlock: '::ffff:10.0.0.0/104'\n",
    );
    let Policy::Egress(e) = &p[0] else { panic!() };
    let cidrs: Vec<String> =
        e.spec.rules[0].to.iter().map(|d| d.ip_block.as_ref().unwrap().cidr().to_string()).collect();
    assert_eq!(cidrs, ["::1/128", "10.0.0.0/8"]);
}

#[test]
fn json_round_trip_is_lossless() {
    let policies = ok(FULL);
    let json = serde_json::to_string(&policies).unwrap();
    let back: Vec<Policy> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, policies);
    // The JSON is itself a valid policy file.
    assert_eq!(ok(&json), policies);
    let Policy::Authorization(a) = &policies[0] else { panic!() };
    let one: AuthorizationPolicy = serde_json::from_str(&serde_json::to_string(a).unwrap()).unwrap();
    assert_eq!(&one, a);
    let Policy::Egress(e) = &policies[1] else { panic!() };
    let one: EgressPolicy = serde_json::from_str(&serde_json::to_string(e).unwrap()).unwrap();
    assert_eq!(&one, e);
}

#[test]
fn serialized_form_is_canonical() {
    let policies = ok(FULL);
    let v = serde_json::to_value(&policies[0]).unwrap();
    assert_eq!(v["apiVersion"], "trellis.dev/v1alpha1");
    assert_eq!(v["kind"], "AuthorizationPolicy");
    assert_eq!(v["spec"]["action"], "ALLOW");
    assert_eq!(v["spec"]["mode"], "enforce");
    let from = &v["spec"]["rules"][0]["from"];
    assert_eq!(from[2], serde_json::json!({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}));
    assert_eq!(v["spec"]["rules"][0]["to"][0]["ports"], serde_json::json!([8080, "9000-9100", 443]));
    assert_eq!(v["spec"]["rules"][1], serde_json::json!({}));
}

#[test]
fn serde_deserialize_validates_everything() {
    let bad = r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"AuthorizationPolicy","metadata":{"name":"a"},"spec":{"selector":"spiffe://td/*/x","action":"NO"}}"#;
    let e = serde_json::from_str::<Policy>(bad).unwrap_err().to_string();
    assert!(e.contains("spec.selector") && e.contains("spec.action"), "{e}");
    let egress = r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"EgressPolicy","metadata":{"name":"a"},"spec":{"selector":"*"}}"#;
    let e = serde_json::from_str::<AuthorizationPolicy>(egress).unwrap_err().to_string();
    assert!(e.contains("expected kind AuthorizationPolicy"), "{e}");
}

#[test]
fn selects_uses_the_selector() {
    let policies = ok(FULL);
    let api = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap();
    let web = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
    assert!(policies[0].selects(&api));
    assert!(!policies[0].selects(&web));
    assert!(policies[1].selects(&web), "egress selects sources under the prefix");
}

#[test]
fn input_size_limit() {
    let big = " ".repeat(MAX_INPUT_BYTES + 1);
    let e = parse_documents(&big).unwrap_err();
    assert!(e.to_string().starts_with("input: input is 16777217 bytes; the limit is 16777216 bytes (16 MiB)"), "{e}");
    // Exactly at the limit is read (here: blank, so no documents).
    assert_eq!(parse_documents(&" ".repeat(MAX_INPUT_BYTES)).map(|p| p.len()), Ok(0));
}

#[test]
fn document_limit() {
    let doc = "{\"kind\": \"x\"}";
    let text = format!("[{}]", vec![doc; MAX_DOCUMENTS + 1].join(","));
    let e = parse_documents(&text).unwrap_err();
    assert_eq!(e.to_string(), format!("input: {} policy documents; the limit is {MAX_DOCUMENTS}", MAX_DOCUMENTS + 1));
}

#[test]
fn rule_limit_in_files_and_snapshots() {
    let rules = "  - {}\n".repeat(MAX_RULES + 1);
    let text = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: a}}\nspec:\n  selector: '*'\n  rules:\n{rules}"
    );
    let e = parse_documents(&text).unwrap_err();
    assert!(e.to_string().contains("200001 rules in all; the limit is 200000"), "{e}");

    let policy = Policy::Authorization(AuthorizationPolicy {
        metadata: Metadata { name: "a".into(), ..Metadata::default() },
        spec: AuthorizationSpec {
            selector: SpiffePattern::Any,
            action: Action::Allow,
            mode: Mode::Enforce,
            rules: vec![AuthorizationRule::default(); MAX_RULES + 1],
        },
    });
    let e = PolicySnapshot::compile(1, vec![policy], Defaults::default()).unwrap_err();
    assert_eq!(e, CompileError::TooManyRules { count: MAX_RULES + 1 });
}

#[test]
fn compile_refuses_duplicate_and_invalid_names() {
    let p = ok(FULL).remove(0);
    let e = PolicySnapshot::compile(1, vec![p.clone(), p.clone()], Defaults::default()).unwrap_err();
    assert_eq!(e, CompileError::DuplicateName("api-from-web".into()));
    let Policy::Authorization(mut a) = p else { panic!() };
    a.metadata.name = "Not Valid".into();
    let e = PolicySnapshot::compile(1, vec![Policy::Authorization(a)], Defaults::default()).unwrap_err();
    assert!(matches!(e, CompileError::InvalidName(_)));
}

#[test]
fn alias_bombs_are_refused() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = format!("*a{}", i - 1);
        text.push_str(&format!("a{i}: &a{i} [{}]\n", [prev.as_str(); 10].join(", ")));
    }
    let started = std::time::Instant::now();
    let e = parse_documents(&text).unwrap_err();
    assert!(e.to_string().starts_with("input: invalid YAML"), "{e}");
    assert!(started.elapsed().as_secs() < 5, "refused quickly");
}

#[test]
fn deep_nesting_is_refused() {
    let yaml = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let e = parse_documents(&format!("a: {yaml}\n")).unwrap_err();
    assert!(e.to_string().starts_with("input: invalid YAML"), "{e}");
    let e = parse_documents(&yaml).unwrap_err();
    assert!(e.to_string().contains("nested deeper than 127 levels (the limit) at line 1 column 128"), "{e}");
    // The limit as named: 127 levels parse (as far as nesting goes), 128 do not.
    let at = |n: usize| parse_documents(&format!("{}1{}", "[".repeat(n), "]".repeat(n))).unwrap_err().to_string();
    assert!(!at(127).contains("nested deeper"), "{}", at(127));
    assert!(at(128).contains("nested deeper than 127 levels"), "{}", at(128));
}

#[test]
fn node_budget_bounds_dense_json() {
    // 5M empty lists in ~10 MB: over the value budget, refused instead of building the tree.
    let text = format!("[{}[]]", "[],".repeat(5_000_000));
    let e = parse_documents(&text).unwrap_err();
    assert!(e.to_string().contains("more than 4000000 values"), "{e}");
}
