//! Measures the engine at scale, for the numbers in `docs/policy.md`: builds a policy file of
//! N rules, then times parse + validate and compile, and prints the peak memory (Linux).
//!
//! `cargo run --release -p trellis-policy --example scale -- [RULES] [yaml|json] [rich]`
//! (`rich` rules carry an ipBlock, ports, methods and paths besides the identity: ~100 bytes).

use std::time::Instant;

use trellis_policy::{Defaults, PolicySnapshot, parse_documents};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rules: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let json = args.get(2).is_some_and(|s| s == "json");
    let rich = args.get(3).is_some_and(|s| s == "rich");
    let mut text = String::from(
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: big\nspec:\n  selector: spiffe://cluster.local/ns/shop/sa/api\n  rules:\n",
    );
    for i in 0..rules {
        let id = format!("spiffe://cluster.local/ns/team{}/sa/client{i}", i % 100);
        if rich {
            text.push_str(&format!(
                "  - from:\n    - identity: {id}\n      ipBlock: 10.{}.0.0/16\n    to:\n    - ports: [8080, \"9000-9100\"]\n      methods: [GET, POST]\n      paths: [\"/api/v1/*\"]\n",
                i % 256
            ));
        } else {
            text.push_str(&format!("  - from:\n    - identity: {id}\n    to:\n    - ports: [8080]\n"));
        }
    }
    if json {
        let policies = parse_documents(&text).unwrap_or_else(|e| panic!("{e}"));
        text = serde_json::to_string(&policies).unwrap_or_default();
    }
    let size = text.len();
    let started = Instant::now();
    let policies = parse_documents(&text).unwrap_or_else(|e| panic!("{e}"));
    let parsed = started.elapsed();
    drop(text);
    let started = Instant::now();
    let snapshot = PolicySnapshot::compile(1, policies, Defaults::default()).unwrap_or_else(|e| panic!("{e}"));
    let compiled = started.elapsed();
    println!(
        "{rules} rules, {:.1} MB {}: parse+validate {parsed:.2?}, compile {compiled:.2?}, peak RSS {} ({} policies)",
        size as f64 / 1e6,
        if json { "JSON" } else { "YAML" },
        peak_rss(),
        snapshot.policies().len()
    );
}

fn peak_rss() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .map(|l| l.trim_start_matches("VmHWM:").trim().to_owned())
        .unwrap_or_default()
}
