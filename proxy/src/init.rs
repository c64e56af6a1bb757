//! Transparent capture for `trellis proxy init`: the nftables rules that send a pod's TCP
//! traffic through its sidecar, and the code that installs them with `nft`.
//!
//! It runs once, as the `trellis-init` init container (root, NET_ADMIN), in the pod's network
//! namespace, before the proxy and the app start. Everything lives in one `table inet trellis`
//! (IPv4 and IPv6 alike) with two NAT chains:
//! - `prerouting`: TCP arriving at the pod and addressed to it (`fib daddr type local`, never
//!   loopback: a neighbour may route a packet for any address here) is redirected to the
//!   inbound listener (15006),
//!   except the ports excluded with `--exclude-inbound-ports` (the admin port 15000 among
//!   them, so the kubelet can probe the proxy) and the proxy's own ports;
//! - `output`: TCP the pod opens is redirected to the outbound listener (15001), except
//!   connections made by the proxy's uid (1337; otherwise the proxy would capture itself),
//!   loopback traffic, and the excluded destination ports and CIDRs.
//!
//! Loopback is left alone on purpose: the proxy reaches the app over it, and an app calling
//! its own pod IP (which the kernel routes over `lo`) talks to itself without the mesh — the
//! same pod, the same identity. Only TCP is captured; DNS over UDP is untouched.
//!
//! The ruleset is applied as one `nft -f -` transaction that creates, deletes and recreates
//! the table, so re-running replaces it whole and a failure leaves the previous state.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use ipnetwork::IpNetwork;

/// The nftables table Trellis owns.
pub const TABLE: &str = "trellis";

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("bad port {value:?}: {reason}")]
    BadPort { value: String, reason: String },
    #[error("bad CIDR {value:?}: {reason}")]
    BadCidr { value: String, reason: String },
    #[error("invalid capture settings: {0}")]
    Invalid(String),
    #[error("`{program}` not found: install nftables (the Trellis image ships it)")]
    NftMissing { program: String },
    #[error(
        "not permitted to change nftables rules ({detail}): `trellis proxy init` needs CAP_NET_ADMIN in the \
         pod's network namespace (root, or the NET_ADMIN capability on the init container)"
    )]
    NotPermitted { detail: String },
    #[error("nft refused the ruleset: {stderr}")]
    NftFailed { stderr: String },
    // The cause is in the message and not also a `source`, so a chain prints it once.
    #[error("cannot run {program}: {cause}")]
    Spawn { program: String, cause: std::io::Error },
}

/// What to capture and what to leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Connections opened by this uid (the proxy's) are never redirected.
    pub proxy_uid: u32,
    /// Inbound TCP is redirected here (the proxy's inbound listener).
    pub inbound_port: u16,
    /// Outbound TCP is redirected here (the proxy's outbound listener, on 127.0.0.1).
    pub outbound_port: u16,
    /// Destination ports of inbound traffic left uncaptured (e.g. the admin port 15000).
    pub exclude_inbound_ports: Vec<u16>,
    /// Destination ports of outbound traffic left uncaptured.
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination networks of outbound traffic left uncaptured (IPv4 or IPv6).
    pub exclude_outbound_cidrs: Vec<IpNetwork>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

impl CaptureConfig {
    pub fn validate(&self) -> Result<(), InitError> {
        for (what, port) in [("inbound", self.inbound_port), ("outbound", self.outbound_port)] {
            if port == 0 {
                return Err(InitError::BadPort { value: "0".into(), reason: format!("the {what} port cannot be 0") });
            }
        }
        if self.inbound_port == self.outbound_port {
            return Err(InitError::Invalid("the inbound and outbound ports must differ".into()));
        }
        if self.proxy_uid == 0 {
            // Exempting uid 0 would exempt every root process in the pod from the mesh.
            return Err(InitError::Invalid("the proxy uid cannot be 0 (root's traffic would bypass the mesh)".into()));
        }
        if self.proxy_uid == u32::MAX {
            // (uid_t)-1 is "no uid" to the kernel: no process runs as it, so the proxy's own
            // traffic would be captured again, a loop.
            return Err(InitError::Invalid("the proxy uid cannot be 4294967295 ((uid_t)-1 is no uid)".into()));
        }
        if let Some(p) = self.exclude_inbound_ports.iter().chain(&self.exclude_outbound_ports).find(|p| **p == 0) {
            return Err(InitError::BadPort { value: p.to_string(), reason: "port 0 is not a port".into() });
        }
        Ok(())
    }
}

/// `"8080, 9090"` → ports; empty items are ignored, 0 and non-numbers refused.
pub fn parse_ports(list: &str) -> Result<Vec<u16>, InitError> {
    let mut ports = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = |reason: &str| InitError::BadPort { value: item.into(), reason: reason.into() };
        let port: u16 = item.parse().map_err(|_| bad("not a port number (1-65535)"))?;
        if port == 0 {
            return Err(bad("port 0 is not a port"));
        }
        push_unique(&mut ports, port);
    }
    Ok(ports)
}

/// `"10.0.0.0/8, fd00::/8"` → networks; a bare address is a /32 or /128; host bits set are an
/// error.
pub fn parse_cidrs(list: &str) -> Result<Vec<IpNetwork>, InitError> {
    let mut cidrs = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        // The policy's own reading: host bits set (`10.1.0.0/8`) are refused, not widened
        // to a network that would take far more out of the mesh than was written.
        let net = trellis_policy::parse_cidr(item)
            .map_err(|e| InitError::BadCidr { value: item.into(), reason: e.to_string() })?;
        push_unique(&mut cidrs, net);
    }
    Ok(cidrs)
}

fn push_unique<T: PartialEq>(items: &mut Vec<T>, item: T) {
    if !items.contains(&item) {
        items.push(item);
    }
}

/// The nftables ruleset (input for `nft -f`) for `cfg`.
pub fn ruleset(cfg: &CaptureConfig) -> Result<String, InitError> {
    cfg.validate()?;
    let mut inbound_exempt = vec![cfg.inbound_port, cfg.outbound_port];
    for port in &cfg.exclude_inbound_ports {
        push_unique(&mut inbound_exempt, *port);
    }
    let mut out = String::new();
    let w = &mut out;
    // `write!` into a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(w, "# Trellis transparent capture, installed by `trellis proxy init`.");
    let _ = writeln!(w, "# One transaction: create (if absent), delete, recreate, so a re-run replaces it whole.");
    let _ = writeln!(w, "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{");
    let _ = writeln!(w, "\tchain prerouting {{\n\t\ttype nat hook prerouting priority -100; policy accept;");
    let _ = writeln!(w, "\t\tmeta l4proto != tcp return");
    let _ = writeln!(w, "\t\tiifname \"lo\" return");
    // Only what is addressed to this pod: a packet a neighbour routed here for another
    // address (or for loopback) is not the sidecar's to take (the proxy refuses it too).
    let _ = writeln!(w, "\t\tip daddr 127.0.0.0/8 return\n\t\tip6 daddr ::1 return");
    let _ = writeln!(w, "\t\tfib daddr type != local return");
    let _ = writeln!(w, "\t\ttcp dport {} return", port_set(&inbound_exempt));
    let _ = writeln!(w, "\t\tmeta l4proto tcp redirect to :{}\n\t}}", cfg.inbound_port);
    // -100 is dstnat (`priority dstnat` is refused for output hooks by older nft).
    let _ = writeln!(w, "\tchain output {{\n\t\ttype nat hook output priority -100; policy accept;");
    let _ = writeln!(w, "\t\tmeta l4proto != tcp return");
    let _ = writeln!(w, "\t\tmeta skuid {} return", cfg.proxy_uid);
    let _ = writeln!(w, "\t\toifname \"lo\" return");
    let _ = writeln!(w, "\t\tip daddr 127.0.0.0/8 return\n\t\tip6 daddr ::1 return");
    if !cfg.exclude_outbound_ports.is_empty() {
        let _ = writeln!(w, "\t\ttcp dport {} return", port_set(&cfg.exclude_outbound_ports));
    }
    // One rule per network: an anonymous set refuses overlapping intervals.
    for net in &cfg.exclude_outbound_cidrs {
        let family = if net.is_ipv4() { "ip" } else { "ip6" };
        let _ = writeln!(w, "\t\t{family} daddr {}/{} return", net.network(), net.prefix());
    }
    let _ = writeln!(w, "\t\tmeta l4proto tcp redirect to :{}\n\t}}\n}}", cfg.outbound_port);
    Ok(out)
}

fn port_set(ports: &[u16]) -> String {
    let items: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// Builds the ruleset for `cfg` and installs it with the `nft` on `PATH`.
pub fn install(cfg: &CaptureConfig) -> Result<String, InitError> {
    let rules = ruleset(cfg)?;
    Nft::system().apply(&rules)?;
    Ok(rules)
}

/// How to run `nft`: directly, or behind a wrapper such as `ip netns exec NS` (tests).
#[derive(Debug, Clone)]
pub struct Nft {
    program: OsString,
    leading_args: Vec<OsString>,
}

impl Nft {
    /// `nft` from `PATH`.
    pub fn system() -> Self {
        Nft { program: "nft".into(), leading_args: Vec::new() }
    }

    /// `program leading_args... <nft args>`, e.g. `ip netns exec NS nft`.
    pub fn with_command(program: impl Into<OsString>, leading_args: Vec<OsString>) -> Self {
        Nft { program: program.into(), leading_args }
    }

    /// Applies `rules` atomically (`nft -f -`).
    pub fn apply(&self, rules: &str) -> Result<(), InitError> {
        self.run(&["-f", "-"], Some(rules)).map(drop)
    }

    /// Checks `rules` against the kernel without applying them (`nft -c -f -`).
    pub fn check(&self, rules: &str) -> Result<(), InitError> {
        self.run(&["-c", "-f", "-"], Some(rules)).map(drop)
    }

    /// `nft list table inet trellis`.
    pub fn list_table(&self) -> Result<String, InitError> {
        self.run(&["list", "table", "inet", TABLE], None)
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, InitError> {
        let program = self.program.to_string_lossy().into_owned();
        let mut child = Command::new(&self.program)
            .args(&self.leading_args)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => InitError::NftMissing { program: program.clone() },
                _ => InitError::Spawn { program: program.clone(), cause: source },
            })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A failed write shows up as nft's own error below.
            let _ = pipe.write_all(text.as_bytes());
        }
        let out = child.wait_with_output().map_err(|source| InitError::Spawn { program, cause: source })?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Err(classify_failure(stderr))
    }
}

fn classify_failure(stderr: String) -> InitError {
    let lower = stderr.to_lowercase();
    if lower.contains("operation not permitted") || lower.contains("permission denied") {
        InitError::NotPermitted { detail: stderr }
    } else if lower.contains("exec of \"nft\" failed") || lower.contains("nft: not found") {
        InitError::NftMissing { program: "nft".into() }
    } else {
        InitError::NftFailed { stderr }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_cidrs_are_parsed_strictly() {
        assert_eq!(parse_ports(" 15000, 9090,,15000").unwrap(), vec![15000, 9090]);
        assert!(matches!(parse_ports("0"), Err(InitError::BadPort { .. })));
        assert!(matches!(parse_ports("65536"), Err(InitError::BadPort { .. })));
        assert!(matches!(parse_ports("http"), Err(InitError::BadPort { .. })));
        let cidrs = parse_cidrs("10.0.0.0/8, fd00::/8, 192.168.1.1").unwrap();
        assert_eq!(
            cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            ["10.0.0.0/8", "fd00::/8", "192.168.1.1/32"]
        );
        assert!(matches!(parse_cidrs("10.0.0.0/33"), Err(InitError::BadCidr { .. })));
        assert!(matches!(parse_cidrs("example.com"), Err(InitError::BadCidr { .. })));
        match parse_cidrs("10.1.0.0/8") {
            Err(InitError::BadCidr { reason, .. }) => {
                assert!(reason.contains("did you mean \"10.0.0.0/8\""), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_cidrs("10.0.0.0/8, 192.168.1.7").unwrap().len(), 2);
    }

    #[test]
    fn invalid_settings_are_refused() {
        let bad = |cfg: CaptureConfig| ruleset(&cfg).is_err();
        assert!(bad(CaptureConfig { inbound_port: 0, ..CaptureConfig::default() }));
        assert!(bad(CaptureConfig { outbound_port: 15006, ..CaptureConfig::default() }));
        assert!(bad(CaptureConfig { proxy_uid: 0, ..CaptureConfig::default() }));
        assert!(bad(CaptureConfig { proxy_uid: u32::MAX, ..CaptureConfig::default() }));
        assert!(bad(CaptureConfig { exclude_outbound_ports: vec![0], ..CaptureConfig::default() }));
    }

    #[test]
    fn failures_name_their_cause() {
        let e = classify_failure("Error: Could not process rule: Operation not permitted".into());
        assert!(matches!(e, InitError::NotPermitted { .. }));
        assert!(e.to_string().contains("CAP_NET_ADMIN"));
        assert!(matches!(classify_failure("syntax error".into()), InitError::NftFailed { .. }));
        let missing = Nft::with_command("/nonexistent/nft", Vec::new()).apply("");
        assert!(matches!(missing, Err(InitError::NftMissing { .. })));
    }
}
