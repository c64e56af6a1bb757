//! Micro-benchmarks of the policy engine (`cargo bench --bench policy`): decision time at
//! 10, 1,000 and 100,000 identity rules (goal: ≤ 200 ns p50 at 100,000), compile time for
//! 100,000 rules (goal: ≤ 1 s), and parse + validate time for a 100,000-rule YAML file.
//!
//! The rule sets are the worst shape for a naive evaluator: every rule is an ALLOW from a
//! distinct source identity to the same destination, so a scan would touch all of them.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use trellis_policy::{
    Action, AuthorizationPolicy, AuthorizationRule, AuthorizationSpec, Defaults, Flow, HttpRequest, Metadata, Mode,
    Policy, PolicySnapshot, Source, SpiffeId, SpiffePattern, parse_documents,
};

const DESTINATION: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn source_id(i: usize) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://cluster.local/ns/team{}/sa/client{i}", i % 100)).unwrap()
}

fn policy(name: String, rules: Vec<AuthorizationRule>) -> Policy {
    Policy::Authorization(AuthorizationPolicy {
        metadata: Metadata { name, ..Metadata::default() },
        spec: AuthorizationSpec {
            selector: SpiffePattern::Exact(SpiffeId::parse(DESTINATION).unwrap()),
            action: Action::Allow,
            mode: Mode::Enforce,
            rules,
        },
    })
}

fn rule(i: usize) -> AuthorizationRule {
    let from = vec![Source { identity: Some(SpiffePattern::Exact(source_id(i))), ..Source::default() }];
    AuthorizationRule { from, to: Vec::new() }
}

/// One policy holding `n` rules.
fn one_policy(n: usize) -> Vec<Policy> {
    vec![policy("allow-api".into(), (0..n).map(rule).collect())]
}

/// `n` policies of one rule each, all selecting the same destination.
fn many_policies(n: usize) -> Vec<Policy> {
    (0..n).map(|i| policy(format!("allow-{i}"), vec![rule(i)])).collect()
}

fn decide(c: &mut Criterion) {
    let destination = SpiffeId::parse(DESTINATION).unwrap();
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let stranger = SpiffeId::parse("spiffe://cluster.local/ns/team7/sa/stranger").unwrap();
    let mut group = c.benchmark_group("decision");
    for (shape, n, policies) in [
        ("rules", 10, one_policy(10)),
        ("rules", 1_000, one_policy(1_000)),
        ("rules", 100_000, one_policy(100_000)),
        ("policies", 100_000, many_policies(100_000)),
    ] {
        let snapshot = PolicySnapshot::compile(1, policies, Defaults::default()).unwrap();
        let matching = source_id(n / 2);
        for (case, source) in [("match", &matching), ("no-match", &stranger)] {
            let flow = Flow { source: Some(source), source_ip: ip, destination: &destination, port: 8080, http: None };
            group.bench_with_input(BenchmarkId::new(format!("{shape}/{case}"), n), &flow, |b, flow| {
                b.iter(|| snapshot.evaluate(black_box(flow)))
            });
        }
        if n == 100_000 && shape == "rules" {
            let http = Some(HttpRequest { method: "GET", path: "/api/v1/items/42?x=1" });
            let flow = Flow { source: Some(&matching), source_ip: ip, destination: &destination, port: 8080, http };
            group.bench_with_input(BenchmarkId::new("rules/match-http", n), &flow, |b, flow| {
                b.iter(|| snapshot.evaluate(black_box(flow)))
            });
        }
    }
    group.finish();
}

fn compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    for (shape, policies) in [("rules", one_policy(100_000)), ("policies", many_policies(100_000))] {
        group.bench_with_input(BenchmarkId::new(shape, 100_000), &policies, |b, policies| {
            b.iter(|| PolicySnapshot::compile(1, black_box(policies.clone()), Defaults::default()).unwrap())
        });
    }
    group.finish();
}

/// A 100,000-rule YAML file (about 8 MB), read and validated.
fn parse(c: &mut Criterion) {
    let mut text = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-api\nspec:\n  selector: {DESTINATION}\n  rules:\n"
    );
    for i in 0..100_000 {
        text.push_str(&format!("  - from:\n    - identity: {}\n    to:\n    - ports: [8080]\n", source_id(i)));
    }
    let mut group = c.benchmark_group("parse");
    group.sample_size(10);
    group.bench_function(BenchmarkId::new("yaml-rules", 100_000), |b| {
        b.iter(|| parse_documents(black_box(&text)).unwrap())
    });
    let json = serde_json::to_string(&parse_documents(&text).unwrap()).unwrap();
    group.bench_function(BenchmarkId::new("json-rules", 100_000), |b| {
        b.iter(|| parse_documents(black_box(&json)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, decide, compile, parse);
criterion_main!(benches);
