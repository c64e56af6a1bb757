//! Property test: for random policy sets and random flows, the compiled snapshot and the
//! reference evaluator give the same decision — action, reason and audit outcome.
//!
//! Everything is drawn from small alphabets (2 trust domains, 3 namespaces, 3 accounts, a few
//! CIDRs, ports, methods and paths) so that rules match often and orderings collide.

use proptest::prelude::*;
use proptest::sample::select;
use trellis_policy::{
    Action, AuthorizationPolicy, AuthorizationRule, AuthorizationSpec, Defaults, Destination, EgressFlow, EgressPolicy,
    EgressRule, EgressSpec, Flow, HttpRequest, IpBlock, Metadata, Method, Mode, Operation, PathPattern, Policy,
    PolicySnapshot, PortRange, Source, SpiffeId, SpiffePattern, parse_cidr, reference,
};

const TDS: [&str; 2] = ["td1", "td2"];
const NSS: [&str; 3] = ["ns1", "ns2", "ns3"];
const SAS: [&str; 3] = ["a", "b", "c"];

fn identity() -> impl Strategy<Value = SpiffeId> {
    (select(&TDS[..]), select(&NSS[..]), select(&SAS[..]))
        .prop_map(|(td, ns, sa)| SpiffeId::parse(&format!("spiffe://{td}/ns/{ns}/sa/{sa}")).unwrap())
}

fn pattern() -> impl Strategy<Value = SpiffePattern> {
    let prefix = select(vec![
        "spiffe://td1",
        "spiffe://td2/ns",
        "spiffe://td1/ns/ns1",
        "spiffe://td2/ns/ns2",
        "spiffe://td1/ns/ns1/sa",
    ]);
    prop_oneof![
        1 => Just(SpiffePattern::Any),
        3 => identity().prop_map(SpiffePattern::Exact),
        2 => prefix.prop_map(|p| SpiffePattern::Prefix(SpiffeId::parse(p).unwrap())),
    ]
}

fn ip_block() -> impl Strategy<Value = IpBlock> {
    let blocks: Vec<(&str, Vec<&str>)> = vec![
        ("10.0.0.0/8", vec![]),
        ("10.0.0.0/8", vec!["10.1.0.0/16"]),
        ("10.1.0.0/16", vec!["10.1.2.0/24"]),
        ("10.1.2.0/24", vec![]),
        ("192.168.0.0/16", vec![]),
        ("0.0.0.0/0", vec!["8.8.8.0/24"]),
        ("fd00::/8", vec![]),
        ("::/0", vec![]),
    ];
    select(blocks).prop_map(|(cidr, except)| {
        IpBlock::new(parse_cidr(cidr).unwrap(), except.into_iter().map(|e| parse_cidr(e).unwrap()).collect()).unwrap()
    })
}

fn ports() -> impl Strategy<Value = Vec<PortRange>> {
    let one = select(vec![(80, 80), (443, 443), (8080, 8080), (9000, 9100), (1, 1024)])
        .prop_map(|(l, h)| PortRange::new(l, h).unwrap());
    prop::collection::vec(one, 0..3)
}

fn source() -> impl Strategy<Value = Source> {
    (
        prop::option::weighted(0.5, pattern()),
        prop::option::weighted(0.25, select(&NSS[..]).prop_map(str::to_owned)),
        prop::option::weighted(0.35, ip_block()),
    )
        .prop_map(|(identity, namespace, ip_block)| Source { identity, namespace, ip_block })
}

fn operation() -> impl Strategy<Value = Operation> {
    let methods = prop::collection::vec(select(vec!["GET", "POST"]).prop_map(|m| Method::parse(m).unwrap()), 0..2);
    let paths = prop::collection::vec(
        select(vec!["/api/*", "/api*", "/healthz", "/*", "/admin"]).prop_map(|p| PathPattern::parse(p).unwrap()),
        0..2,
    );
    (ports(), methods, paths).prop_map(|(ports, methods, paths)| Operation { ports, methods, paths })
}

fn authorization_rule() -> impl Strategy<Value = AuthorizationRule> {
    (prop::collection::vec(source(), 0..3), prop::collection::vec(operation(), 0..2))
        .prop_map(|(from, to)| AuthorizationRule { from, to })
}

fn egress_rule() -> impl Strategy<Value = EgressRule> {
    let dest = (prop::option::weighted(0.7, ip_block()), ports())
        .prop_map(|(ip_block, ports)| Destination { ip_block, ports });
    prop::collection::vec(dest, 0..3).prop_map(|to| EgressRule { to })
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![Just(Action::Allow), Just(Action::Deny)]
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![3 => Just(Mode::Enforce), 1 => Just(Mode::Audit)]
}

fn metadata(name: String) -> Metadata {
    Metadata { name, ..Metadata::default() }
}

/// A policy whose name starts with a random letter (so name order differs from generation
/// order); the caller makes names unique.
fn policy() -> impl Strategy<Value = (char, Policy)> {
    let authz = (pattern(), action(), mode(), prop::collection::vec(authorization_rule(), 0..4)).prop_map(
        |(selector, action, mode, rules)| {
            Policy::Authorization(AuthorizationPolicy {
                metadata: Metadata::default(),
                spec: AuthorizationSpec { selector, action, mode, rules },
            })
        },
    );
    let egress = (pattern(), action(), mode(), prop::collection::vec(egress_rule(), 0..3)).prop_map(
        |(selector, action, mode, rules)| {
            Policy::Egress(EgressPolicy {
                metadata: Metadata::default(),
                spec: EgressSpec { selector, action, mode, rules },
            })
        },
    );
    (select(vec!['a', 'b', 'c']), prop_oneof![4 => authz, 1 => egress])
}

fn policies() -> impl Strategy<Value = Vec<Policy>> {
    prop::collection::vec(policy(), 0..8).prop_map(|ps| {
        ps.into_iter()
            .enumerate()
            .map(|(i, (letter, mut p))| {
                let name = format!("{letter}-{i}");
                match &mut p {
                    Policy::Authorization(a) => a.metadata = metadata(name),
                    Policy::Egress(e) => e.metadata = metadata(name),
                }
                p
            })
            .collect()
    })
}

#[derive(Debug, Clone)]
struct TestFlow {
    source: Option<SpiffeId>,
    source_ip: std::net::IpAddr,
    destination: SpiffeId,
    port: u16,
    http: Option<(&'static str, &'static str)>,
}

fn address() -> impl Strategy<Value = std::net::IpAddr> {
    select(vec![
        "10.1.2.3",
        "10.1.9.9",
        "10.2.0.1",
        "192.168.1.1",
        "8.8.8.8",
        "1.1.1.1",
        "::ffff:10.1.2.3",
        "fd00::1",
        "2001:db8::1",
    ])
    .prop_map(|a| a.parse().unwrap())
}

fn flow() -> impl Strategy<Value = TestFlow> {
    let http = prop::option::weighted(
        0.6,
        (
            select(vec!["GET", "POST", "get"]),
            select(vec![
                "/api/x",
                "/api",
                "/apix",
                "/healthz",
                "/admin",
                "/api/../admin",
                "/a%2Fb",
                "/",
                "/healthz?x=1",
                "/api/%2e%2e/admin",
                "/admin;x=1",
                "/api/x;y",
                "/api;x/y",
                "/api/..;/admin",
            ]),
        ),
    );
    let port = select(vec![80u16, 443, 8080, 9050, 22]);
    (prop::option::weighted(0.8, identity()), address(), identity(), port, http).prop_map(
        |(source, source_ip, destination, port, http)| TestFlow { source, source_ip, destination, port, http },
    )
}

fn defaults() -> impl Strategy<Value = Defaults> {
    (action(), action()).prop_map(|(mesh, egress)| Defaults { mesh, egress })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn compiled_and_reference_agree(
        policies in policies(),
        defaults in defaults(),
        flows in prop::collection::vec(flow(), 1..6),
    ) {
        let snapshot = PolicySnapshot::compile(7, policies.clone(), defaults).unwrap();
        for f in &flows {
            let flow = Flow {
                source: f.source.as_ref(),
                source_ip: f.source_ip,
                destination: &f.destination,
                port: f.port,
                http: f.http.map(|(method, path)| HttpRequest { method, path }),
            };
            prop_assert_eq!(snapshot.evaluate(&flow), reference::evaluate(&policies, defaults, &flow), "flow {:?}", f);
            let egress = EgressFlow { source: &f.destination, destination_ip: f.source_ip, port: f.port };
            prop_assert_eq!(
                snapshot.evaluate_egress(&egress),
                reference::evaluate_egress(&policies, defaults, &egress),
                "egress flow {:?}", egress
            );
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// The JSON the control plane stores reads back to the same policies.
    #[test]
    fn json_round_trip(policies in policies()) {
        let valid: Vec<Policy> = policies.into_iter().filter(is_document_valid).collect();
        let json = serde_json::to_string(&valid).unwrap();
        let back: Vec<Policy> = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, valid);
    }
}

/// Documents refuse empty entries (an empty `from` entry reads as "any source" while looking
/// like "none"); the typed model allows them, so they are left out of the round trip.
fn is_document_valid(p: &Policy) -> bool {
    match p {
        Policy::Authorization(a) => a.spec.rules.iter().all(|r| {
            r.from.iter().all(|s| s.identity.is_some() || s.namespace.is_some() || s.ip_block.is_some())
                && r.to.iter().all(|o| !o.ports.is_empty() || o.is_http())
        }),
        Policy::Egress(e) => {
            e.spec.rules.iter().all(|r| r.to.iter().all(|d| d.ip_block.is_some() || !d.ports.is_empty()))
        }
    }
}
