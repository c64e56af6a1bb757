//! Fuzz target: arbitrary bytes → parse + validate → JSON round trip → compile → evaluate a few
//! flows built from what the policies mention, with the compiled and the reference evaluator,
//! which must agree. Also checks `normalize_path` invariants on the input read as a path.
//! Any panic, disagreement or broken invariant is a finding.

#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use trellis_policy::{
    Action, Defaults, EgressFlow, Flow, HttpRequest, Policy, PolicySnapshot, SpiffeId, SpiffePattern, normalize_path,
    reference,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    check_path(text);
    let Ok(policies) = trellis_policy::parse_documents(text) else { return };
    let json = serde_json::to_string(&policies).expect("policies serialize");
    let back: Vec<Policy> = serde_json::from_str(&json).expect("serialized policies read back");
    assert_eq!(back, policies, "JSON round trip");
    for defaults in [Defaults::default(), Defaults { mesh: Action::Allow, egress: Action::Allow }] {
        let Ok(snapshot) = PolicySnapshot::compile(1, policies.clone(), defaults) else { return };
        evaluate_flows(&snapshot, &policies, defaults, text);
    }
});

/// A normalized path starts with '/', has no `//`, no dot segments, and normalizes to itself.
fn check_path(raw: &str) {
    let Ok(normal) = normalize_path(raw) else { return };
    assert!(normal.starts_with('/'), "{raw:?} -> {normal:?}");
    assert!(!normal.contains("//"), "{raw:?} -> {normal:?}");
    assert!(normal.split('/').all(|s| s != "." && s != ".."), "{raw:?} -> {normal:?}");
    assert_eq!(normalize_path(&normal).ok().as_deref(), Some(&*normal), "idempotent for {raw:?}");
}

fn evaluate_flows(snapshot: &PolicySnapshot, policies: &[Policy], defaults: Defaults, text: &str) {
    let ids = identities(policies);
    let ips: [IpAddr; 3] =
        ["10.1.2.3".parse().unwrap(), "::ffff:192.168.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
    let paths = ["/api/x", "/a/../admin", text];
    for dest in &ids {
        for source in ids.iter().map(Some).chain([None]) {
            for (i, ip) in ips.iter().enumerate() {
                let http = match i {
                    0 => None,
                    _ => Some(HttpRequest { method: "GET", path: paths[(i + dest.as_str().len()) % paths.len()] }),
                };
                for port in [80, 8080, 9050] {
                    let flow = Flow { source, source_ip: *ip, destination: dest, port, http };
                    assert_eq!(snapshot.evaluate(&flow), reference::evaluate(policies, defaults, &flow), "{flow:?}");
                }
                let egress = EgressFlow { source: dest, destination_ip: *ip, port: 443 };
                assert_eq!(
                    snapshot.evaluate_egress(&egress),
                    reference::evaluate_egress(policies, defaults, &egress),
                    "{egress:?}"
                );
            }
        }
    }
}

/// A few identities the policies mention (selectors, and IDs just below prefixes), plus one
/// fixed workload: flows between them are the ones most likely to match something.
fn identities(policies: &[Policy]) -> Vec<SpiffeId> {
    let mut out = vec![SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap()];
    for p in policies.iter().take(3) {
        match p.selector() {
            SpiffePattern::Exact(id) => out.push(id.clone()),
            SpiffePattern::Prefix(base) => {
                if let Ok(id) = SpiffeId::parse(&format!("{base}/ns/x")) {
                    out.push(id);
                }
            }
            SpiffePattern::Any => {}
        }
    }
    out.truncate(4);
    out
}
