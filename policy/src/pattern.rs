//! The small value types a policy document is made of, each parsed from its text form once
//! (during validation) and matched many times (during evaluation): SPIFFE ID patterns, port
//! ranges, HTTP methods and path patterns, IP blocks.
//!
//! Each type validates in its constructor, so a value of it is always well-formed; the
//! validator turns a [`PatternError`] into a message naming the field path.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::IpNetwork;
use trellis_identity::{SpiffeId, SpiffeIdError};

use crate::path::{PathError, normalize_path};

/// Why a pattern, port, method, path or CIDR is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("must not be empty")]
    Empty,
    #[error("'*' is only allowed as the whole pattern (\"*\") or as a final \"/*\"")]
    WildcardPosition,
    #[error("invalid SPIFFE ID: {0}")]
    Spiffe(#[source] SpiffeIdError),
    #[error("invalid namespace {0:?}: {msg}", msg = crate::limits::NAMESPACE_RULE)]
    Namespace(String),
    #[error("port 0 is not a valid port (ports are 1-65535)")]
    PortZero,
    #[error("port {0} is out of range (ports are 1-65535)")]
    PortTooLarge(u64),
    #[error("port range {0}-{1} is reversed (the low port comes first)")]
    PortRangeReversed(u16, u16),
    #[error("invalid port {0:?}: expected a number like \"8080\" or a range like \"9000-9100\"")]
    BadPort(String),
    #[error("invalid HTTP method {0:?}: not an HTTP method token")]
    BadMethod(String),
    #[error("HTTP method {0:?} is longer than {max} characters, which no sidecar reads as HTTP", max = crate::limits::MAX_METHOD_LEN)]
    MethodTooLong(String),
    #[error("HTTP method {0:?} must be written {1:?}: methods match case-sensitively")]
    MethodCase(String, String),
    #[error("\"*\" is not a method: omit `methods` to match any method")]
    MethodWildcard,
    #[error("path {0:?} must start with '/'")]
    PathNotAbsolute(String),
    #[error("path {0:?}: '*' is only allowed at the end")]
    PathWildcard(String),
    #[error("path {0:?} must not contain a query ('?')")]
    PathQuery(String),
    #[error("path {0:?} can never match: requests are matched after normalization ({1})")]
    PathInvalid(String, PathError),
    #[error("path {0:?} is not normalized and can never match; write {1:?}")]
    PathNotNormal(String, String),
    #[error("invalid CIDR {0:?}: {1}")]
    BadCidr(String, String),
    #[error("CIDR {0:?} has host bits set; did you mean {1:?}?")]
    HostBits(String, String),
    #[error("except {0:?} is not inside ipBlock {1:?}")]
    ExceptOutside(String, String),
    #[error("ipBlock {0:?} matches no address: its except entries ({1}) cover all of it")]
    ExceptCoversBlock(String, String),
}

/// A SPIFFE ID pattern, as used by `selector` and `from[].identity`.
///
/// - `*`: every identity;
/// - `spiffe://td/ns/shop/*`: every identity strictly below `spiffe://td/ns/shop` on a segment
///   boundary (`spiffe://td/ns/shop/sa/x` yes; `spiffe://td/ns/shop` and
///   `spiffe://td/ns/shopping/sa/x` no);
/// - anything else: exactly that SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SpiffePattern {
    Any,
    Exact(SpiffeId),
    /// Holds the ID before the final `/*`.
    Prefix(SpiffeId),
}

impl SpiffePattern {
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s == "*" {
            return Ok(SpiffePattern::Any);
        }
        if let Some(base) = s.strip_suffix("/*") {
            if base.contains('*') {
                return Err(PatternError::WildcardPosition);
            }
            return SpiffeId::parse(base).map(SpiffePattern::Prefix).map_err(PatternError::Spiffe);
        }
        if s.contains('*') {
            return Err(PatternError::WildcardPosition);
        }
        SpiffeId::parse(s).map(SpiffePattern::Exact).map_err(PatternError::Spiffe)
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            SpiffePattern::Any => true,
            SpiffePattern::Exact(want) => want == id,
            SpiffePattern::Prefix(base) => is_strictly_under(id, base),
        }
    }
}

/// True when `id` lies strictly below `base` on a segment boundary.
pub(crate) fn is_strictly_under(id: &SpiffeId, base: &SpiffeId) -> bool {
    id.as_str().strip_prefix(base.as_str()).is_some_and(|rest| rest.starts_with('/'))
}

/// True when `source` is strictly below `spiffe://<trust_domain>/ns/<namespace>`.
pub(crate) fn in_namespace(source: &SpiffeId, trust_domain: &str, namespace: &str) -> bool {
    if source.trust_domain_str() != trust_domain {
        return false;
    }
    let mut segs = source.segments();
    segs.next() == Some("ns") && segs.next() == Some(namespace) && segs.next().is_some()
}

impl fmt::Display for SpiffePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpiffePattern::Any => f.write_str("*"),
            SpiffePattern::Exact(id) => write!(f, "{id}"),
            SpiffePattern::Prefix(base) => write!(f, "{base}/*"),
        }
    }
}

impl FromStr for SpiffePattern {
    type Err = PatternError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Checks a namespace (`from[].namespace`, `metadata.namespace`): a DNS-1123 label, as
/// Kubernetes namespaces are. A name no namespace can have (`Monitoring`, `a_b`, 64
/// characters) would make a rule that silently never matches. (A DNS-1123 label is always a
/// valid SPIFFE path segment.)
pub fn check_namespace(ns: &str) -> Result<(), PatternError> {
    if ns.is_empty() {
        return Err(PatternError::Empty);
    }
    let ok = ns.len() <= crate::limits::MAX_NAMESPACE_LEN && is_dns_label_text(ns);
    if ok { Ok(()) } else { Err(PatternError::Namespace(ns.to_owned())) }
}

/// Non-empty lowercase letters, digits and '-', starting and ending with a letter or digit
/// (a DNS-1123 label, length aside).
pub(crate) fn is_dns_label_text(s: &str) -> bool {
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let bytes = s.as_bytes();
    edge_ok(bytes.first())
        && edge_ok(bytes.last())
        && bytes.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An inclusive port range; a single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    low: u16,
    high: u16,
}

impl PortRange {
    pub fn new(low: u16, high: u16) -> Result<Self, PatternError> {
        if low == 0 {
            return Err(PatternError::PortZero);
        }
        if low > high {
            return Err(PatternError::PortRangeReversed(low, high));
        }
        Ok(PortRange { low, high })
    }

    pub fn single(port: u16) -> Result<Self, PatternError> {
        Self::new(port, port)
    }

    /// From a YAML/JSON number.
    pub fn from_number(n: i128) -> Result<Self, PatternError> {
        let port = port_number(n)?;
        Self::single(port)
    }

    /// From `"8080"` or `"9000-9100"`.
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        let bad = || PatternError::BadPort(s.to_owned());
        let (low, high) = match s.split_once('-') {
            Some((l, h)) => (l, h),
            None => (s, s),
        };
        let low = port_number(parse_digits(low).ok_or_else(bad)?)?;
        let high = port_number(parse_digits(high).ok_or_else(bad)?)?;
        Self::new(low, high)
    }

    pub fn low(&self) -> u16 {
        self.low
    }

    pub fn high(&self) -> u16 {
        self.high
    }

    pub fn contains(&self, port: u16) -> bool {
        self.low <= port && port <= self.high
    }
}

/// Parses 1 to 6 ASCII digits (enough to tell "too large" from "not a number").
fn parse_digits(s: &str) -> Option<i128> {
    if s.is_empty() || s.len() > 6 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn port_number(n: i128) -> Result<u16, PatternError> {
    match u16::try_from(n) {
        Ok(0) => Err(PatternError::PortZero),
        Ok(p) => Ok(p),
        Err(_) if n < 0 => Err(PatternError::BadPort(n.to_string())),
        Err(_) => Err(PatternError::PortTooLarge(u64::try_from(n).unwrap_or(u64::MAX))),
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high { write!(f, "{}", self.low) } else { write!(f, "{}-{}", self.low, self.high) }
    }
}

/// An HTTP method token (RFC 9110 §9.1), matched case-sensitively as HTTP says: `GET` does not
/// match a request whose method is `get`. A well-known method written in the wrong case
/// (`get`) is refused at validation, since it could never match what clients send.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Method(Box<str>);

const KNOWN_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

impl Method {
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s == "*" {
            return Err(PatternError::MethodWildcard);
        }
        if !s.bytes().all(is_tchar) {
            return Err(PatternError::BadMethod(s.to_owned()));
        }
        if s.len() > crate::limits::MAX_METHOD_LEN {
            return Err(PatternError::MethodTooLong(s.to_owned()));
        }
        let upper = s.to_ascii_uppercase();
        if upper != s && KNOWN_METHODS.contains(&upper.as_str()) {
            return Err(PatternError::MethodCase(s.to_owned(), upper));
        }
        Ok(Method(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// RFC 9110 §5.6.2 token characters, what a method is made of.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request path pattern, matched against the normalized path (see [`crate::normalize_path`]):
///
/// - `/healthz`: exactly that path (`/healthz/` does not match);
/// - `/api/*`: every path starting with `/api/` — `/api/` and `/api/x/y`, but not `/api` nor
///   `/apix`;
/// - `/api*`: every path starting with `/api` — `/api`, `/apix`, `/api/x`;
/// - `/*`: every path.
///
/// A pattern must itself be in normalized form (no `//`, no `.`/`..` segments, no escapes of
/// unreserved characters, uppercase hex), or it could never match and is refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathPattern {
    Exact(Box<str>),
    /// Holds the prefix before the final `*`.
    Prefix(Box<str>),
}

impl PathPattern {
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if !s.starts_with('/') {
            return Err(PatternError::PathNotAbsolute(s.to_owned()));
        }
        if s.contains('?') {
            return Err(PatternError::PathQuery(s.to_owned()));
        }
        let (base, prefix) = match s.strip_suffix('*') {
            Some(base) => (base, true),
            None => (s, false),
        };
        if base.contains('*') {
            return Err(PatternError::PathWildcard(s.to_owned()));
        }
        check_normal(s, base, prefix)?;
        Ok(if prefix { PathPattern::Prefix(base.into()) } else { PathPattern::Exact(base.into()) })
    }

    /// `path` must already be normalized.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => path == &**p,
            PathPattern::Prefix(p) => path.starts_with(&**p),
        }
    }
}

/// A prefix's last segment is partial, so it is checked with a character appended: `/a/.*`
/// is fine (it matches `/a/.well-known`), `/a//*` is not.
fn check_normal(s: &str, base: &str, prefix: bool) -> Result<(), PatternError> {
    let probe = if prefix { format!("{base}x") } else { base.to_owned() };
    let normal = normalize_path(&probe).map_err(|e| PatternError::PathInvalid(s.to_owned(), e))?;
    if normal == probe {
        return Ok(());
    }
    let mut suggestion = normal.into_owned();
    if prefix {
        suggestion.pop();
        suggestion.push('*');
    }
    Err(PatternError::PathNotNormal(s.to_owned(), suggestion))
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// A CIDR and the CIDRs inside it that are carved out (`except`).
///
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are read as IPv4 both in CIDRs (when the
/// prefix covers the whole `::ffff:0:0/96` part) and in the addresses being matched, so a
/// dual-stack listener's peers match IPv4 blocks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpBlock {
    cidr: IpNetwork,
    except: Vec<IpNetwork>,
}

impl IpBlock {
    pub fn new(cidr: IpNetwork, except: Vec<IpNetwork>) -> Result<Self, PatternError> {
        let cidr = canonical_net(cidr);
        let except: Vec<IpNetwork> = except.into_iter().map(canonical_net).collect();
        for e in &except {
            if !net_contains_net(&cidr, e) {
                return Err(PatternError::ExceptOutside(e.to_string(), cidr.to_string()));
            }
        }
        // A block its excepts cover entirely can match nothing: always a mistake.
        if covers(&except, &cidr) {
            let list: Vec<String> = except.iter().map(ToString::to_string).collect();
            return Err(PatternError::ExceptCoversBlock(cidr.to_string(), list.join(", ")));
        }
        Ok(IpBlock { cidr, except })
    }

    pub fn cidr(&self) -> IpNetwork {
        self.cidr
    }

    pub fn except(&self) -> &[IpNetwork] {
        &self.except
    }

    /// Whether `ip` is in the block (IPv4-mapped IPv6 addresses are read as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }
}

/// Parses one CIDR (`10.0.0.0/8`, `2001:db8::/32`, or a bare address meaning a single host),
/// refusing host bits so a typo cannot silently widen or narrow the block.
///
/// The error says which part is wrong: the address, or the prefix length (with the range
/// allowed for the address's family: 0-32 for IPv4, 0-128 for IPv6). An IPv4 netmask
/// (`10.0.0.0/255.0.0.0`) is read as its prefix length, as `ipnetwork` does.
pub fn parse_cidr(s: &str) -> Result<IpNetwork, PatternError> {
    let bad = |why: String| PatternError::BadCidr(s.to_owned(), why);
    let (addr, prefix) = match s.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (s, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| bad(format!("{addr:?} is not an IPv4 or IPv6 address")))?;
    let (family, max) = if ip.is_ipv4() { ("IPv4", 32) } else { ("IPv6", 128) };
    let range = format!("{family} prefix lengths are 0-{max}");
    let len = match prefix {
        None => max,
        Some("") => return Err(bad(format!("missing prefix length after '/' ({range})"))),
        Some(mask) if ip.is_ipv4() && mask.contains('.') => match s.parse::<IpNetwork>() {
            Ok(net) => net.prefix(),
            Err(_) => {
                return Err(bad(format!("invalid netmask {mask:?} (a netmask is contiguous ones, like 255.255.0.0)")));
            }
        },
        Some(p) if !p.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(bad(format!("prefix length {p:?} is not a number ({range})")));
        }
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(bad(format!("prefix length {p} is out of range ({range})"))),
        },
    };
    let net = IpNetwork::new(ip, len).map_err(|e| bad(e.to_string()))?;
    if net.ip() != net.network() {
        let fixed = format!("{}/{}", net.network(), net.prefix());
        return Err(PatternError::HostBits(s.to_owned(), fixed));
    }
    Ok(canonical_net(net))
}

/// First and last address of `net` as numbers (IPv4 and IPv6 alike).
fn net_range(net: &IpNetwork) -> (u128, u128) {
    match net {
        IpNetwork::V4(n) => (u32::from(n.network()).into(), u32::from(n.broadcast()).into()),
        IpNetwork::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
    }
}

/// Whether `parts` (each inside `whole`) leave no address of `whole` uncovered.
fn covers(parts: &[IpNetwork], whole: &IpNetwork) -> bool {
    let (start, end) = net_range(whole);
    let mut ranges: Vec<(u128, u128)> = parts.iter().map(net_range).collect();
    ranges.sort_unstable();
    let mut next = start; // the first address not covered yet
    for (lo, hi) in ranges {
        if lo > next {
            return false;
        }
        match hi.checked_add(1) {
            Some(after) => next = next.max(after),
            None => return true,
        }
    }
    next > end
}

fn net_contains_net(outer: &IpNetwork, inner: &IpNetwork) -> bool {
    outer.is_ipv4() == inner.is_ipv4() && inner.prefix() >= outer.prefix() && outer.contains(inner.network())
}

/// IPv4-mapped IPv6 addresses become IPv4; everything else is unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An IPv6 CIDR wholly inside `::ffff:0:0/96` becomes the IPv4 CIDR it covers.
fn canonical_net(net: IpNetwork) -> IpNetwork {
    match (net, canonical_ip(net.network())) {
        (IpNetwork::V6(v6), IpAddr::V4(v4)) if v6.prefix() >= 96 => {
            IpNetwork::new(IpAddr::V4(v4), v6.prefix() - 96).unwrap_or(net)
        }
        _ => net,
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cidr)?;
        if !self.except.is_empty() {
            let except: Vec<String> = self.except.iter().map(|e| e.to_string()).collect();
            write!(f, " except [{}]", except.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn spiffe_patterns() {
        let p = SpiffePattern::parse("spiffe://td/ns/shop/*").unwrap();
        assert!(p.matches(&id("spiffe://td/ns/shop/sa/x")));
        assert!(!p.matches(&id("spiffe://td/ns/shop")));
        assert!(!p.matches(&id("spiffe://td/ns/shopping/sa/x")));
        assert!(SpiffePattern::parse("*").unwrap().matches(&id("spiffe://x")));
        assert_eq!(SpiffePattern::parse("spiffe://td/*/x"), Err(PatternError::WildcardPosition));
        assert_eq!(SpiffePattern::parse("spiffe://td/a*"), Err(PatternError::WildcardPosition));
        assert_eq!(SpiffePattern::parse("spiffe://td/**"), Err(PatternError::WildcardPosition));
        assert!(matches!(SpiffePattern::parse("spiffe://*"), Err(PatternError::Spiffe(_))));
        assert_eq!(SpiffePattern::parse(""), Err(PatternError::Empty));
        for s in ["*", "spiffe://td/*", "spiffe://td/a/b", "spiffe://td/ns/x/*"] {
            assert_eq!(SpiffePattern::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn namespaces() {
        let a = id("spiffe://td/ns/shop/sa/a");
        assert!(in_namespace(&a, "td", "shop"));
        assert!(!in_namespace(&a, "td2", "shop"));
        assert!(!in_namespace(&id("spiffe://td/ns/shop"), "td", "shop"));
        assert!(!in_namespace(&id("spiffe://td/x/shop/sa/a"), "td", "shop"));
        assert!(check_namespace("a/b").is_err());
        assert!(check_namespace("").is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(PortRange::parse("9000-9100").unwrap().to_string(), "9000-9100");
        assert_eq!(PortRange::parse("80").unwrap().to_string(), "80");
        assert_eq!(PortRange::parse("9100-9000"), Err(PatternError::PortRangeReversed(9100, 9000)));
        assert_eq!(PortRange::parse("0"), Err(PatternError::PortZero));
        assert_eq!(PortRange::parse("65536"), Err(PatternError::PortTooLarge(65536)));
        assert_eq!(PortRange::from_number(70000), Err(PatternError::PortTooLarge(70000)));
        assert!(matches!(PortRange::from_number(-1), Err(PatternError::BadPort(_))));
        for bad in ["", "-", "80-", "-80", "8o", " 80", "1-2-3", "99999999999"] {
            assert!(matches!(PortRange::parse(bad), Err(PatternError::BadPort(_))), "{bad}");
        }
        let r = PortRange::parse("10-20").unwrap();
        assert!(r.contains(10) && r.contains(20) && !r.contains(21) && !r.contains(9));
    }

    #[test]
    fn methods() {
        assert!(Method::parse("GET").is_ok());
        assert!(Method::parse("PROPFIND").is_ok());
        assert!(Method::parse("x-custom").is_ok());
        assert!(matches!(Method::parse("get"), Err(PatternError::MethodCase(_, _))));
        assert!(matches!(Method::parse("GE T"), Err(PatternError::BadMethod(_))));
        assert!(Method::parse(&"X".repeat(crate::limits::MAX_METHOD_LEN)).is_ok());
        assert!(matches!(Method::parse(&"X".repeat(33)), Err(PatternError::MethodTooLong(_))));
        assert!(Method::parse("FOO_BAR").is_ok() && Method::parse("REPORT2").is_ok());
        assert_eq!(Method::parse(""), Err(PatternError::Empty));
        assert_eq!(Method::parse("*"), Err(PatternError::MethodWildcard));
    }

    #[test]
    fn path_patterns() {
        let p = PathPattern::parse("/api/*").unwrap();
        assert!(p.matches("/api/") && p.matches("/api/x/y"));
        assert!(!p.matches("/api") && !p.matches("/apix"));
        let p = PathPattern::parse("/api*").unwrap();
        assert!(p.matches("/api") && p.matches("/apix") && p.matches("/api/x"));
        let p = PathPattern::parse("/healthz").unwrap();
        assert!(p.matches("/healthz") && !p.matches("/healthz/"));
        assert!(PathPattern::parse("/a/.*").is_ok());
        assert!(PathPattern::parse("/*").unwrap().matches("/"));
        assert!(matches!(PathPattern::parse("api"), Err(PatternError::PathNotAbsolute(_))));
        assert!(matches!(PathPattern::parse("*"), Err(PatternError::PathNotAbsolute(_))));
        assert!(matches!(PathPattern::parse("/a/*/b"), Err(PatternError::PathWildcard(_))));
        assert!(matches!(PathPattern::parse("/a**"), Err(PatternError::PathWildcard(_))));
        assert!(matches!(PathPattern::parse("/a?b"), Err(PatternError::PathQuery(_))));
        assert_eq!(PathPattern::parse("/a/../b"), Err(PatternError::PathNotNormal("/a/../b".into(), "/b".into())));
        assert_eq!(PathPattern::parse("/a//*"), Err(PatternError::PathNotNormal("/a//*".into(), "/a/*".into())));
        assert!(matches!(PathPattern::parse("/a%2fb"), Err(PatternError::PathInvalid(_, _))));
    }

    #[test]
    fn ip_blocks() {
        let cidr = parse_cidr("10.0.0.0/8").unwrap();
        let b = IpBlock::new(cidr, vec![parse_cidr("10.1.0.0/16").unwrap()]).unwrap();
        assert!(b.contains("10.2.3.4".parse().unwrap()));
        assert!(!b.contains("10.1.3.4".parse().unwrap()));
        assert!(!b.contains("11.0.0.1".parse().unwrap()));
        assert!(matches!(
            IpBlock::new(cidr, vec![parse_cidr("11.0.0.0/16").unwrap()]),
            Err(PatternError::ExceptOutside(_, _))
        ));
        assert!(matches!(
            IpBlock::new(cidr, vec![parse_cidr("::/0").unwrap()]),
            Err(PatternError::ExceptOutside(_, _))
        ));
        assert!(matches!(parse_cidr("10.1.0.0/8"), Err(PatternError::HostBits(_, _))));
        assert!(matches!(parse_cidr("10.0.0.0/33"), Err(PatternError::BadCidr(_, _))));
        assert!(matches!(parse_cidr("nope"), Err(PatternError::BadCidr(_, _))));
        assert_eq!(parse_cidr("10.0.0.0/255.0.0.0").unwrap(), cidr);
        assert_eq!(
            IpBlock::new(cidr, vec![cidr]).unwrap_err().to_string(),
            "ipBlock \"10.0.0.0/8\" matches no address: its except entries (10.0.0.0/8) cover all of it"
        );
        assert_eq!(parse_cidr("::ffff:10.0.0.0/104").unwrap(), cidr);
        assert_eq!(parse_cidr("1.2.3.4").unwrap().prefix(), 32);
        let v6 = IpBlock::new(parse_cidr("2001:db8::/32").unwrap(), vec![]).unwrap();
        assert!(v6.contains("2001:db8::1".parse().unwrap()));
        assert_eq!(canonical_ip("::ffff:10.1.2.3".parse().unwrap()), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn cidr_errors_say_whether_the_address_or_the_prefix_is_wrong() {
        let cases = [
            (
                "10.0.0.0/33",
                "invalid CIDR \"10.0.0.0/33\": prefix length 33 is out of range (IPv4 prefix lengths are 0-32)",
            ),
            (
                "10.0.0.0/256",
                "invalid CIDR \"10.0.0.0/256\": prefix length 256 is out of range (IPv4 prefix lengths are 0-32)",
            ),
            ("::/129", "invalid CIDR \"::/129\": prefix length 129 is out of range (IPv6 prefix lengths are 0-128)"),
            (
                "10.0.0.0/abc",
                "invalid CIDR \"10.0.0.0/abc\": prefix length \"abc\" is not a number (IPv4 prefix lengths are 0-32)",
            ),
            (
                "10.0.0.0/-1",
                "invalid CIDR \"10.0.0.0/-1\": prefix length \"-1\" is not a number (IPv4 prefix lengths are 0-32)",
            ),
            (
                "10.0.0.0/+8",
                "invalid CIDR \"10.0.0.0/+8\": prefix length \"+8\" is not a number (IPv4 prefix lengths are 0-32)",
            ),
            (
                "10.0.0.0/8/9",
                "invalid CIDR \"10.0.0.0/8/9\": prefix length \"8/9\" is not a number (IPv4 prefix lengths are 0-32)",
            ),
            ("10.0.0.0/", "invalid CIDR \"10.0.0.0/\": missing prefix length after '/' (IPv4 prefix lengths are 0-32)"),
            ("fd00::/", "invalid CIDR \"fd00::/\": missing prefix length after '/' (IPv6 prefix lengths are 0-128)"),
            (
                "10.0.0.0/255.0.255.0",
                "invalid CIDR \"10.0.0.0/255.0.255.0\": invalid netmask \"255.0.255.0\" (a netmask is contiguous ones, like 255.255.0.0)",
            ),
            ("300.0.0.0/8", "invalid CIDR \"300.0.0.0/8\": \"300.0.0.0\" is not an IPv4 or IPv6 address"),
            ("ten", "invalid CIDR \"ten\": \"ten\" is not an IPv4 or IPv6 address"),
            ("/8", "invalid CIDR \"/8\": \"\" is not an IPv4 or IPv6 address"),
            ("a\u{1b}b/8", "invalid CIDR \"a\\u{1b}b/8\": \"a\\u{1b}b\" is not an IPv4 or IPv6 address"),
        ];
        for (input, want) in cases {
            assert_eq!(parse_cidr(input).unwrap_err().to_string(), want, "{input}");
        }
        assert_eq!(parse_cidr("10.0.0.0/008").unwrap().prefix(), 8);
        assert_eq!(parse_cidr("::/0").unwrap().prefix(), 0);
        assert_eq!(parse_cidr("2001:db8::/128").unwrap().prefix(), 128);
    }

    #[test]
    fn an_ip_block_its_excepts_cover_is_refused() {
        let block = |c: &str, e: &[&str]| {
            IpBlock::new(parse_cidr(c).unwrap(), e.iter().map(|e| parse_cidr(e).unwrap()).collect())
        };
        let covered = |c: &str, e: &[&str]| matches!(block(c, e), Err(PatternError::ExceptCoversBlock(_, _)));
        assert!(covered("10.0.0.0/8", &["10.0.0.0/8"]));
        assert!(covered("10.0.0.0/8", &["10.128.0.0/9", "10.0.0.0/9"]));
        assert!(covered("10.0.0.0/8", &["10.0.0.0/9", "10.0.0.0/10", "10.128.0.0/9"]));
        assert!(covered("0.0.0.0/0", &["0.0.0.0/0"]));
        assert!(covered("::/0", &["::/1", "8000::/1"]));
        assert!(covered("1.2.3.4", &["1.2.3.4/32"]));
        assert!(covered("::ffff:10.0.0.0/104", &["10.0.0.0/8"]));
        assert!(block("10.0.0.0/8", &["10.0.0.0/9"]).is_ok());
        assert!(block("10.0.0.0/8", &["10.0.0.0/9", "10.192.0.0/10"]).is_ok());
        assert!(block("10.0.0.0/8", &["10.128.0.0/9"]).is_ok());
        assert!(block("::/0", &["::/1"]).is_ok());
        assert!(block("10.0.0.0/8", &[]).is_ok());
    }

    proptest::proptest! {
        /// A block is refused as covered exactly when no address of it is left to match.
        #[test]
        fn covered_means_no_address_matches(
            base in 0u8..4,
            prefix in 28u8..=30,
            excepts in proptest::collection::vec((0u8..16, 28u8..=32), 0..5),
        ) {
            let cidr = IpNetwork::new(IpAddr::from([10, 0, 0, base * 16]), prefix).unwrap();
            let cidr = IpNetwork::new(cidr.network(), prefix).unwrap();
            let except: Vec<IpNetwork> = excepts
                .iter()
                .filter_map(|&(off, len)| IpNetwork::new(IpAddr::from([10, 0, 0, base * 16 + off]), len).ok())
                .map(|n| IpNetwork::new(n.network(), n.prefix()).unwrap())
                .filter(|e| net_contains_net(&cidr, e))
                .collect();
            let any_left = cidr.iter().any(|ip| !except.iter().any(|e| e.contains(ip)));
            match IpBlock::new(cidr, except) {
                Ok(b) => proptest::prop_assert!(any_left && cidr.iter().any(|ip| b.contains(ip))),
                Err(e) => proptest::prop_assert!(!any_left && matches!(e, PatternError::ExceptCoversBlock(_, _))),
            }
        }
    }
}
