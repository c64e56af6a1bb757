//! The decision table: every semantic rule of the crate docs, one hand-written case at a time
//! (policies, flow, expected decision line and audit line). Each case is checked against both
//! the compiled snapshot and the reference evaluator.

use trellis_policy::{
    Action, Decision, Defaults, EgressFlow, Flow, HttpRequest, PolicySnapshot, SpiffeId, parse_documents, reference,
};

const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const PROM: &str = "spiffe://cluster.local/ns/monitoring/sa/prom";

enum Input {
    Mesh {
        from: Option<&'static str>,
        ip: &'static str,
        to: &'static str,
        port: u16,
        http: Option<(&'static str, &'static str)>,
    },
    Egress {
        from: &'static str,
        ip: &'static str,
        port: u16,
    },
}

struct Case {
    name: &'static str,
    policies: String,
    default: Action,
    input: Input,
    want: &'static str,
    audit: Option<&'static str>,
}

fn doc(kind: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: trellis.dev/v1alpha1\nkind: {kind}\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

fn authz(name: &str, spec: &str) -> String {
    doc("AuthorizationPolicy", name, spec)
}

fn egress(name: &str, spec: &str) -> String {
    doc("EgressPolicy", name, spec)
}

/// A mesh flow over TCP.
fn tcp(from: Option<&'static str>, ip: &'static str, to: &'static str, port: u16) -> Input {
    Input::Mesh { from, ip, to, port, http: None }
}

/// A mesh HTTP request.
fn http(from: Option<&'static str>, to: &'static str, port: u16, method: &'static str, path: &'static str) -> Input {
    Input::Mesh { from, ip: "10.9.9.9", to, port, http: Some((method, path)) }
}

fn case(name: &'static str, policies: String, input: Input, want: &'static str) -> Case {
    Case { name, policies, default: Action::Deny, input, want, audit: None }
}

fn audited(mut c: Case, audit: &'static str) -> Case {
    c.audit = Some(audit);
    c
}

fn default_allow(mut c: Case) -> Case {
    c.default = Action::Allow;
    c
}

const ALLOW_WEB_TO_API: &str = "  selector: spiffe://cluster.local/ns/shop/sa/api\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/web\n";

fn identity_cases() -> Vec<Case> {
    vec![
        case(
            "no policies: default deny",
            String::new(),
            tcp(Some(WEB), "10.0.0.1", API, 8080),
            "deny: no rule matched (default deny)",
        ),
        default_allow(case(
            "no policies: default allow",
            String::new(),
            tcp(Some(WEB), "10.0.0.1", API, 8080),
            "allow: no rule matched (default allow)",
        )),
        case(
            "exact identity matches",
            authz("web-to-api", ALLOW_WEB_TO_API),
            tcp(Some(WEB), "10.0.0.1", API, 8080),
            "allow: policy \"web-to-api\" rule 0",
        ),
        case(
            "exact identity: other source",
            authz("web-to-api", ALLOW_WEB_TO_API),
            tcp(Some(PROM), "10.0.0.1", API, 8080),
            "deny: no rule matched (default deny)",
        ),
        case(
            "prefix identity matches below it",
            authz("shop", "  selector: '*'\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/*\n"),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "allow: policy \"shop\" rule 0",
        ),
        case(
            "prefix identity respects segment boundaries",
            authz("shop", "  selector: '*'\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/*\n"),
            tcp(Some("spiffe://cluster.local/ns/shopping/sa/web"), "10.0.0.1", API, 80),
            "deny: no rule matched (default deny)",
        ),
        case(
            "prefix identity does not match its own base",
            authz("shop", "  selector: '*'\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/*\n"),
            tcp(Some("spiffe://cluster.local/ns/shop"), "10.0.0.1", API, 80),
            "deny: no rule matched (default deny)",
        ),
        case(
            "identity * matches any authenticated source",
            authz("any", "  selector: '*'\n  rules:\n  - from:\n    - identity: '*'\n"),
            tcp(Some("spiffe://elsewhere/x"), "10.0.0.1", API, 80),
            "allow: policy \"any\" rule 0",
        ),
        case(
            "identity * does not match an unauthenticated source",
            authz("any", "  selector: '*'\n  rules:\n  - from:\n    - identity: '*'\n"),
            tcp(None, "10.0.0.1", API, 80),
            "deny: no rule matched (default deny)",
        ),
        case(
            "namespace matches identities in it",
            authz("mon", "  selector: '*'\n  rules:\n  - from:\n    - namespace: monitoring\n"),
            tcp(Some(PROM), "10.0.0.1", API, 9090),
            "allow: policy \"mon\" rule 0",
        ),
        case(
            "namespace is in the destination's trust domain",
            authz("mon", "  selector: '*'\n  rules:\n  - from:\n    - namespace: monitoring\n"),
            tcp(Some("spiffe://other.td/ns/monitoring/sa/prom"), "10.0.0.1", API, 9090),
            "deny: no rule matched (default deny)",
        ),
        case(
            "namespace follows the destination's trust domain",
            authz("mon", "  selector: '*'\n  rules:\n  - from:\n    - namespace: monitoring\n"),
            tcp(Some("spiffe://other.td/ns/monitoring/sa/prom"), "10.0.0.1", "spiffe://other.td/ns/shop/sa/api", 9090),
            "allow: policy \"mon\" rule 0",
        ),
        case(
            "namespace never matches an unauthenticated source",
            authz("mon", "  selector: '*'\n  rules:\n  - from:\n    - namespace: monitoring\n"),
            tcp(None, "10.0.0.1", API, 9090),
            "deny: no rule matched (default deny)",
        ),
    ]
}

const IP_RULE: &str = "  selector: '*'\n  rules:\n  - from:\n    - ipBlock: 10.0.0.0/8\n      except: [10.1.0.0/16]\n";

fn address_cases() -> Vec<Case> {
    vec![
        case(
            "ipBlock matches an unauthenticated source",
            authz("lan", IP_RULE),
            tcp(None, "10.2.3.4", API, 80),
            "allow: policy \"lan\" rule 0",
        ),
        case(
            "ipBlock except carves out",
            authz("lan", IP_RULE),
            tcp(None, "10.1.2.3", API, 80),
            "deny: no rule matched (default deny)",
        ),
        case(
            "IPv4-mapped IPv6 peers match IPv4 blocks",
            authz("lan", IP_RULE),
            tcp(None, "::ffff:10.2.3.4", API, 80),
            "allow: policy \"lan\" rule 0",
        ),
        case(
            "IPv6 blocks",
            authz(
                "v6",
                "  selector: '*'\n  rules:\n  - from:\n    - ipBlock: {cidr: 'fd00::/8', except: ['fd00:1::/32']}\n",
            ),
            tcp(None, "fd00:2::1", API, 80),
            "allow: policy \"v6\" rule 0",
        ),
        case(
            "fields of an entry are ANDed",
            authz(
                "both",
                "  selector: '*'\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/web\n      ipBlock: 192.168.0.0/16\n",
            ),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "deny: no rule matched (default deny)",
        ),
        case(
            "from entries are ORed",
            authz(
                "either",
                "  selector: '*'\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/x/sa/y\n    - ipBlock: 10.0.0.0/8\n",
            ),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "allow: policy \"either\" rule 0",
        ),
    ]
}

fn rule_shape_cases() -> Vec<Case> {
    vec![
        case(
            "omitted from means any source, unauthenticated included",
            authz("port-only", "  selector: '*'\n  rules:\n  - to:\n    - ports: [8080]\n"),
            tcp(None, "203.0.113.9", API, 8080),
            "allow: policy \"port-only\" rule 0",
        ),
        case(
            "a rule with neither from nor to matches every flow",
            authz("all", "  selector: '*'\n  rules:\n  - {}\n"),
            tcp(None, "1.2.3.4", API, 1),
            "allow: policy \"all\" rule 0",
        ),
        case(
            "a policy without rules matches nothing",
            authz("none", "  selector: '*'\n  action: DENY\n"),
            tcp(Some(WEB), "1.2.3.4", API, 1),
            "deny: no rule matched (default deny)",
        ),
        default_allow(case(
            "rules: [] matches nothing, even for DENY",
            authz("none", "  selector: '*'\n  action: DENY\n  rules: []\n"),
            tcp(Some(WEB), "1.2.3.4", API, 1),
            "allow: no rule matched (default allow)",
        )),
        case(
            "ports must match",
            authz("p", "  selector: '*'\n  rules:\n  - to:\n    - ports: [8080]\n"),
            tcp(Some(WEB), "10.0.0.1", API, 8081),
            "deny: no rule matched (default deny)",
        ),
        case(
            "port ranges are inclusive",
            authz("p", "  selector: '*'\n  rules:\n  - to:\n    - ports: [\"9000-9100\"]\n"),
            tcp(Some(WEB), "10.0.0.1", API, 9100),
            "allow: policy \"p\" rule 0",
        ),
        case(
            "from and to are ANDed",
            authz(
                "p",
                "  selector: '*'\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/web\n    to:\n    - ports: [443]\n",
            ),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "deny: no rule matched (default deny)",
        ),
        case(
            "to entries are ORed",
            authz("p", "  selector: '*'\n  rules:\n  - to:\n    - ports: [443]\n    - ports: [80]\n"),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "allow: policy \"p\" rule 0",
        ),
        case(
            "the first matching rule of a policy is the reason",
            authz("p", "  selector: '*'\n  rules:\n  - to:\n    - ports: [1]\n  - to:\n    - ports: [80]\n  - {}\n"),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "allow: policy \"p\" rule 1",
        ),
    ]
}

const HTTP_RULE: &str =
    "  selector: '*'\n  rules:\n  - to:\n    - methods: [GET]\n      paths: [\"/api/*\", \"/healthz\", \"/v*\"]\n";

fn http_cases() -> Vec<Case> {
    vec![
        case(
            "method and prefix path match",
            authz("h", HTTP_RULE),
            http(Some(WEB), API, 80, "GET", "/api/x/y"),
            "allow: policy \"h\" rule 0",
        ),
        case(
            "methods match case-sensitively",
            authz("h", HTTP_RULE),
            http(Some(WEB), API, 80, "get", "/api/x"),
            "deny: no rule matched (default deny)",
        ),
        case(
            "/api/* does not match /api",
            authz("h", HTTP_RULE),
            http(Some(WEB), API, 80, "GET", "/api"),
            "deny: no rule matched (default deny)",
        ),
        case(
            "/v* matches /version",
            authz("h", HTTP_RULE),
            http(Some(WEB), API, 80, "GET", "/version"),
            "allow: policy \"h\" rule 0",
        ),
        case(
            "exact path does not match with a trailing slash",
            authz("h", HTTP_RULE),
            http(Some(WEB), API, 80, "GET", "/healthz/"),
            "deny: no rule matched (default deny)",
        ),
        case(
            "dot segments cannot escape /api/*",
            authz("h", HTTP_RULE),
            http(Some(WEB), API, 80, "GET", "/api/../admin"),
            "deny: no rule matched (default deny)",
        ),
        case(
            "encoded dot segments cannot escape /api/*",
            authz("h", HTTP_RULE),
            http(Some(WEB), API, 80, "GET", "/api/%2e%2E/admin"),
            "deny: no rule matched (default deny)",
        ),
        case(
            "dot segments that stay inside still match",
            authz("h", HTTP_RULE),
            http(Some(WEB), API, 80, "GET", "/api/a/../b"),
            "allow: policy \"h\" rule 0",
        ),
        case(
            "the query is not part of the path",
            authz("h", HTTP_RULE),
            http(Some(WEB), API, 80, "GET", "/healthz?verbose=1"),
            "allow: policy \"h\" rule 0",
        ),
        case(
            "an invalid path is denied whatever the policies say",
            authz("all", "  selector: '*'\n  rules:\n  - {}\n"),
            http(Some(WEB), API, 80, "GET", "/api%2Fadmin"),
            "deny: invalid path: encoded '/' in path",
        ),
        default_allow(case(
            "an invalid path is denied even with default allow",
            String::new(),
            http(Some(WEB), API, 80, "GET", "/a\\b"),
            "deny: invalid path: '\\' in path",
        )),
        case(
            "ALLOW with HTTP conditions does not match a TCP flow",
            authz("h", HTTP_RULE),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "deny: no rule matched (default deny)",
        ),
        case(
            "DENY with HTTP conditions matches a TCP flow (fail safe)",
            format!(
                "{}{}",
                authz("all", "  selector: '*'\n  rules:\n  - {}\n"),
                authz("no-admin", "  selector: '*'\n  action: DENY\n  rules:\n  - to:\n    - paths: [/admin*]\n")
            ),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "deny: policy \"no-admin\" rule 0",
        ),
        case(
            "fail-safe DENY still needs its ports to match",
            format!(
                "{}{}",
                authz("all", "  selector: '*'\n  rules:\n  - {}\n"),
                authz(
                    "no-admin",
                    "  selector: '*'\n  action: DENY\n  rules:\n  - to:\n    - ports: [8443]\n      methods: [POST]\n"
                )
            ),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "allow: policy \"all\" rule 0",
        ),
        case(
            "DENY on an HTTP flow needs its HTTP conditions to match",
            format!(
                "{}{}",
                authz("all", "  selector: '*'\n  rules:\n  - {}\n"),
                authz("no-post", "  selector: '*'\n  action: DENY\n  rules:\n  - to:\n    - methods: [POST]\n")
            ),
            http(Some(WEB), API, 80, "GET", "/"),
            "allow: policy \"all\" rule 0",
        ),
    ]
}

fn ordering_cases() -> Vec<Case> {
    vec![
        case(
            "DENY beats ALLOW whatever the names",
            format!(
                "{}{}",
                authz("a-allow", "  selector: '*'\n  rules:\n  - {}\n"),
                authz("z-deny", "  selector: '*'\n  action: DENY\n  rules:\n  - {}\n")
            ),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "deny: policy \"z-deny\" rule 0",
        ),
        case(
            "among matching ALLOWs the first by name is the reason",
            format!(
                "{}{}",
                authz("b", "  selector: '*'\n  rules:\n  - {}\n"),
                authz("a", "  selector: '*'\n  rules:\n  - to:\n    - ports: [1]\n  - {}\n")
            ),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "allow: policy \"a\" rule 1",
        ),
        default_allow(case(
            "an enforced DENY overrides default allow",
            authz("block", "  selector: '*'\n  action: DENY\n  rules:\n  - from:\n    - namespace: shop\n"),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "deny: policy \"block\" rule 0",
        )),
        case(
            "a policy applies only to destinations its selector picks",
            authz("web-to-api", &ALLOW_WEB_TO_API.replace("sa/api", "sa/db")),
            tcp(Some(WEB), "10.0.0.1", API, 8080),
            "deny: no rule matched (default deny)",
        ),
        case(
            "prefix selectors pick destinations below them",
            authz("shop-all", "  selector: spiffe://cluster.local/ns/shop/*\n  rules:\n  - {}\n"),
            tcp(None, "10.0.0.1", API, 80),
            "allow: policy \"shop-all\" rule 0",
        ),
        case(
            "prefix selectors respect segment boundaries",
            authz("shop-all", "  selector: spiffe://cluster.local/ns/sho/*\n  rules:\n  - {}\n"),
            tcp(None, "10.0.0.1", API, 80),
            "deny: no rule matched (default deny)",
        ),
    ]
}

fn audit_cases() -> Vec<Case> {
    let audit_allow = authz("rollout", &format!("{ALLOW_WEB_TO_API}  mode: audit\n"));
    vec![
        audited(
            case(
                "audit ALLOW never allows, but says it would",
                audit_allow.clone(),
                tcp(Some(WEB), "10.0.0.1", API, 80),
                "deny: no rule matched (default deny)",
            ),
            "allow: policy \"rollout\" rule 0",
        ),
        default_allow(audited(
            case(
                "audit-deny: allowed now, denied once enforced",
                audit_allow.clone(),
                tcp(Some(PROM), "10.0.0.1", API, 80),
                "allow: no rule matched (default allow)",
            ),
            "deny: no rule matched (default deny)",
        )),
        audited(
            case(
                "audit DENY never denies",
                format!(
                    "{}{}",
                    authz("all", "  selector: '*'\n  rules:\n  - {}\n"),
                    authz("maybe-block", "  selector: '*'\n  action: DENY\n  mode: audit\n  rules:\n  - {}\n")
                ),
                tcp(Some(WEB), "10.0.0.1", API, 80),
                "allow: policy \"all\" rule 0",
            ),
            "deny: policy \"maybe-block\" rule 0",
        ),
        audited(
            case(
                "audit outcome equals the decision when no audit rule matches",
                format!("{}{}", authz("all", "  selector: '*'\n  rules:\n  - {}\n"), audit_allow.clone()),
                tcp(Some(PROM), "10.0.0.1", API, 80),
                "allow: policy \"all\" rule 0",
            ),
            "allow: policy \"all\" rule 0",
        ),
        audited(
            case(
                "the audit outcome orders enforced and audit rules together",
                format!(
                    "{}{}",
                    authz("b-enforced", "  selector: '*'\n  rules:\n  - {}\n"),
                    authz("a-audit", "  selector: '*'\n  mode: audit\n  rules:\n  - {}\n")
                ),
                tcp(Some(WEB), "10.0.0.1", API, 80),
                "allow: policy \"b-enforced\" rule 0",
            ),
            "allow: policy \"a-audit\" rule 0",
        ),
        case(
            "no audit outcome when no audit policy selects the destination",
            audit_allow.replace("sa/api\n", "sa/db\n"),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "deny: no rule matched (default deny)",
        ),
        audited(
            case(
                "an invalid path is denied in the audit outcome too",
                audit_allow,
                http(Some(WEB), API, 80, "GET", "/%zz"),
                "deny: invalid path: invalid percent-escape in path",
            ),
            "deny: invalid path: invalid percent-escape in path",
        ),
    ]
}

const PSP: &str = "  selector: spiffe://cluster.local/ns/shop/*\n  rules:\n  - to:\n    - ipBlock: 203.0.113.0/24\n      except: [203.0.113.128/25]\n      ports: [443]\n";

fn egress_cases() -> Vec<Case> {
    let eg = |from, ip, port| Input::Egress { from, ip, port };
    vec![
        case(
            "egress: no policy, default deny",
            String::new(),
            eg(WEB, "203.0.113.5", 443),
            "deny: no rule matched (default deny)",
        ),
        default_allow(case(
            "egress: --default does not apply to egress",
            String::new(),
            eg(WEB, "203.0.113.5", 443),
            "deny: no rule matched (default deny)",
        )),
        case(
            "egress: ipBlock and port allow",
            egress("psp", PSP),
            eg(WEB, "203.0.113.5", 443),
            "allow: policy \"psp\" rule 0",
        ),
        case(
            "egress: except carves out",
            egress("psp", PSP),
            eg(WEB, "203.0.113.200", 443),
            "deny: no rule matched (default deny)",
        ),
        case(
            "egress: port must match",
            egress("psp", PSP),
            eg(WEB, "203.0.113.5", 80),
            "deny: no rule matched (default deny)",
        ),
        case(
            "egress: selector picks sources",
            egress("psp", PSP),
            eg(PROM, "203.0.113.5", 443),
            "deny: no rule matched (default deny)",
        ),
        case(
            "egress: DENY beats ALLOW",
            format!(
                "{}{}",
                egress("psp", PSP),
                egress(
                    "quarantine",
                    "  selector: spiffe://cluster.local/ns/shop/sa/web\n  action: DENY\n  rules:\n  - {}\n"
                )
            ),
            eg(WEB, "203.0.113.5", 443),
            "deny: policy \"quarantine\" rule 0",
        ),
        audited(
            case(
                "egress: audit outcome",
                egress("dns", "  selector: '*'\n  mode: audit\n  rules:\n  - to:\n    - ports: [53]\n"),
                eg(WEB, "::ffff:8.8.8.8", 53),
                "deny: no rule matched (default deny)",
            ),
            "allow: policy \"dns\" rule 0",
        ),
        case(
            "egress policies do not govern mesh flows",
            egress("all", "  selector: '*'\n  rules:\n  - {}\n"),
            tcp(Some(WEB), "10.0.0.1", API, 80),
            "deny: no rule matched (default deny)",
        ),
    ]
}

fn all_cases() -> Vec<Case> {
    [
        identity_cases(),
        address_cases(),
        rule_shape_cases(),
        http_cases(),
        ordering_cases(),
        audit_cases(),
        egress_cases(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn run(case: &Case) -> (Decision, Decision) {
    let policies = parse_documents(&case.policies).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let defaults = Defaults { mesh: case.default, ..Defaults::default() };
    let snapshot = PolicySnapshot::compile(1, policies.clone(), defaults).unwrap();
    match case.input {
        Input::Mesh { from, ip, to, port, http } => {
            let from = from.map(id);
            let to = id(to);
            let flow = Flow {
                source: from.as_ref(),
                source_ip: ip.parse().unwrap(),
                destination: &to,
                port,
                http: http.map(|(method, path)| HttpRequest { method, path }),
            };
            (snapshot.evaluate(&flow), reference::evaluate(&policies, defaults, &flow))
        }
        Input::Egress { from, ip, port } => {
            let from = id(from);
            let flow = EgressFlow { source: &from, destination_ip: ip.parse().unwrap(), port };
            (snapshot.evaluate_egress(&flow), reference::evaluate_egress(&policies, defaults, &flow))
        }
    }
}

#[test]
fn decision_table() {
    let cases = all_cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let (compiled, naive) = run(case);
        let got = (compiled.to_string(), compiled.audit.as_ref().map(ToString::to_string));
        let want = (case.want.to_owned(), case.audit.map(str::to_owned));
        if got != want {
            failures.push(format!("{}: got {got:?}, want {want:?}", case.name));
        }
        if compiled != naive {
            failures.push(format!("{}: compiled {compiled:?} != reference {naive:?}", case.name));
        }
        if !case.want.starts_with(compiled.action.as_str()) {
            failures.push(format!("{}: action {} but reason {}", case.name, compiled.action, compiled));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn audit_deny_label_and_header_values() {
    let case = &audit_cases()[1];
    let (d, _) = run(case);
    assert_eq!(d.label(), "audit-deny");
    assert_eq!(d.reason.header_value(), "default-allow");
    let (d, _) = run(&ordering_cases()[0]);
    assert_eq!(d.label(), "deny");
    assert_eq!(d.reason.header_value(), "policy=z-deny; rule=0");
    let (d, _) = run(&http_cases()[9]);
    assert_eq!(d.reason.header_value(), "invalid-path");
    let (d, _) = run(&identity_cases()[0]);
    assert_eq!(d.reason.header_value(), "default-deny");
}

#[test]
fn decision_json_form_is_stable() {
    let (d, _) = run(&audit_cases()[2]);
    let v = serde_json::to_value(&d).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "action": "allow",
            "reason": {"kind": "policy", "policy": "all", "rule": 0, "action": "allow", "message": "allow: policy \"all\" rule 0"},
            "audit": {"action": "deny", "reason": {"kind": "policy", "policy": "maybe-block", "rule": 0, "action": "deny", "message": "deny: policy \"maybe-block\" rule 0"}}
        })
    );
    let (d, _) = run(&http_cases()[9]);
    let v = serde_json::to_value(&d).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "action": "deny",
            "reason": {"kind": "invalid-path", "action": "deny", "error": "encoded-slash", "message": "deny: invalid path: encoded '/' in path"},
            "audit": null
        })
    );
    let (d, _) = run(&identity_cases()[0]);
    assert_eq!(
        serde_json::to_value(&d).unwrap()["reason"],
        serde_json::json!({"kind": "default", "action": "deny", "message": "deny: no rule matched (default deny)"})
    );
}

#[test]
fn matching_rules_explains_every_match() {
    let policies = parse_documents(&format!(
        "{}{}",
        authz("b", "  selector: '*'\n  rules:\n  - {}\n  - to:\n    - ports: [80]\n"),
        authz("a", "  selector: '*'\n  action: DENY\n  mode: audit\n  rules:\n  - {}\n")
    ))
    .unwrap();
    let (web, api) = (id(WEB), id(API));
    let flow =
        Flow { source: Some(&web), source_ip: "10.0.0.1".parse().unwrap(), destination: &api, port: 80, http: None };
    let found: Vec<(String, usize)> =
        reference::matching_rules(&policies, &flow).into_iter().map(|m| (m.policy, m.rule)).collect();
    assert_eq!(found, [("a".to_owned(), 0), ("b".to_owned(), 0), ("b".to_owned(), 1)]);
}

#[test]
fn empty_snapshot_uses_the_defaults() {
    let snapshot = PolicySnapshot::empty(Defaults { mesh: Action::Allow, egress: Action::Deny });
    let (web, api) = (id(WEB), id(API));
    let flow =
        Flow { source: Some(&web), source_ip: "10.0.0.1".parse().unwrap(), destination: &api, port: 80, http: None };
    assert_eq!(snapshot.evaluate(&flow).to_string(), "allow: no rule matched (default allow)");
    let eflow = EgressFlow { source: &web, destination_ip: "1.1.1.1".parse().unwrap(), port: 443 };
    assert_eq!(snapshot.evaluate_egress(&eflow).to_string(), "deny: no rule matched (default deny)");
    assert_eq!(snapshot.version(), 0);
    assert!(snapshot.policies().is_empty());
}
