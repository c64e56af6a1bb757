//! The nftables ruleset of `trellis proxy init`, pinned as text (golden) and, where `nft` is
//! installed and permitted, checked by the kernel's own parser with `nft -c` (check mode:
//! nothing is applied).

use trellis_proxy::init::{CaptureConfig, InitError, Nft, parse_cidrs, parse_ports, ruleset};

const DEFAULT_RULESET: &str = r#"# Trellis transparent capture, installed by `trellis proxy init`.
# One transaction: create (if absent), delete, recreate, so a re-run replaces it whole.
table inet trellis
delete table inet trellis
table inet trellis {
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		meta l4proto != tcp return
		iifname "lo" return
		ip daddr 127.0.0.0/8 return
		ip6 daddr ::1 return
		fib daddr type != local return
		tcp dport { 15006, 15001, 15000 } return
		meta l4proto tcp redirect to :15006
	}
	chain output {
		type nat hook output priority -100; policy accept;
		meta l4proto != tcp return
		meta skuid 1337 return
		oifname "lo" return
		ip daddr 127.0.0.0/8 return
		ip6 daddr ::1 return
		meta l4proto tcp redirect to :15001
	}
}
"#;

const EXCLUSIONS_RULESET: &str = r#"# Trellis transparent capture, installed by `trellis proxy init`.
# One transaction: create (if absent), delete, recreate, so a re-run replaces it whole.
table inet trellis
delete table inet trellis
table inet trellis {
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		meta l4proto != tcp return
		iifname "lo" return
		ip daddr 127.0.0.0/8 return
		ip6 daddr ::1 return
		fib daddr type != local return
		tcp dport { 15006, 15001, 15000, 9090 } return
		meta l4proto tcp redirect to :15006
	}
	chain output {
		type nat hook output priority -100; policy accept;
		meta l4proto != tcp return
		meta skuid 1337 return
		oifname "lo" return
		ip daddr 127.0.0.0/8 return
		ip6 daddr ::1 return
		tcp dport { 5432, 25 } return
		ip daddr 10.96.0.0/12 return
		ip daddr 10.96.1.0/24 return
		ip daddr 169.254.169.254/32 return
		ip6 daddr fd00::/8 return
		meta l4proto tcp redirect to :15001
	}
}
"#;

/// What the injected `trellis-init` container asks for by default.
fn injected_default() -> CaptureConfig {
    CaptureConfig { exclude_inbound_ports: vec![15000], ..CaptureConfig::default() }
}

fn with_exclusions() -> CaptureConfig {
    CaptureConfig {
        exclude_inbound_ports: parse_ports("15000,9090").unwrap(),
        exclude_outbound_ports: parse_ports("5432, 25").unwrap(),
        // Overlapping networks are fine: one rule each (host bits set are refused, see below).
        exclude_outbound_cidrs: parse_cidrs("10.96.0.0/12,10.96.1.0/24,169.254.169.254,fd00::/8").unwrap(),
        ..CaptureConfig::default()
    }
}

#[test]
fn default_ruleset_is_pinned() {
    assert_eq!(ruleset(&injected_default()).unwrap(), DEFAULT_RULESET);
}

#[test]
fn exclusions_ruleset_is_pinned() {
    assert_eq!(ruleset(&with_exclusions()).unwrap(), EXCLUSIONS_RULESET);
}

#[test]
fn bad_settings_produce_no_ruleset() {
    let zero = CaptureConfig { outbound_port: 0, ..CaptureConfig::default() };
    assert!(matches!(ruleset(&zero), Err(InitError::BadPort { .. })));
    assert!(matches!(parse_cidrs("10.0.0.0/8,300.1.1.1/32"), Err(InitError::BadCidr { .. })));
    assert!(matches!(parse_ports("80,0"), Err(InitError::BadPort { .. })));
}

/// `nft -c` parses and validates the rulesets against the running kernel without applying.
#[test]
fn nft_accepts_the_rulesets() {
    let nft = Nft::system();
    for cfg in [injected_default(), with_exclusions()] {
        match nft.check(&ruleset(&cfg).unwrap()) {
            Ok(()) => {}
            Err(InitError::NftMissing { .. }) => {
                println!("skipped: nft not installed (apt-get install nftables)");
                return;
            }
            Err(InitError::NotPermitted { .. }) => {
                println!("skipped: nft -c needs CAP_NET_ADMIN (not root)");
                return;
            }
            Err(e) => panic!("{e}"),
        }
    }
}
