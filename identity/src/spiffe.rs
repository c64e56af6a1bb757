//! SPIFFE IDs and trust domains, parsed exactly as the SPIFFE ID specification says.
//!
//! Every identity in Trellis (a certificate's URI SAN, a policy selector, a join token's
//! binding) goes through [`SpiffeId::parse`], so the grammar lives here and nowhere else:
//!
//! - the scheme is exactly `spiffe://` (lowercase);
//! - the trust domain is non-empty, at most 255 bytes, of `[a-z0-9._-]` only — so no
//!   port, userinfo or uppercase;
//! - the path is empty or a sequence of `/segment`, each segment non-empty, not `.` or
//!   `..`, of `[A-Za-z0-9._-]` only — so no percent-encoding, query, fragment or
//!   trailing slash;
//! - the whole ID is at most 2048 bytes.

use std::fmt;
use std::str::FromStr;

/// Longest trust domain name the spec allows (it must fit a DNS name).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID (as a URI) the spec requires implementations to handle.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("SPIFFE ID has no trust domain")]
    MissingTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("trust domain must not carry a port")]
    Port,
    #[error("trust domain must not carry userinfo")]
    UserInfo,
    #[error("SPIFFE ID must not carry a query")]
    Query,
    #[error("SPIFFE ID must not carry a fragment")]
    Fragment,
    #[error("SPIFFE ID must not be percent-encoded")]
    PercentEncoded,
    #[error("trust domain contains {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed")]
    BadTrustDomainChar(char),
    #[error("path segment contains {0:?}; only letters, digits, '.', '-' and '_' are allowed")]
    BadPathChar(char),
    #[error("path has an empty segment")]
    EmptySegment,
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    #[error("path must not end with '/'")]
    TrailingSlash,
    #[error("a trust domain has no path: {0:?} names a workload; give only its trust domain, {1:?}")]
    TrustDomainWithPath(String, String),
}

/// A SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Box<str>);

impl TrustDomain {
    /// Parses a bare trust domain name (`cluster.local`) or a trust-domain SPIFFE ID
    /// (`spiffe://cluster.local`).
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.starts_with(SCHEME) {
            let id = SpiffeId::parse(s)?;
            // Taking `x.y` from `spiffe://x.y/ns/a` would hide a mistake (a workload's ID
            // where the mesh's trust domain was meant).
            if !id.path().is_empty() {
                return Err(SpiffeIdError::TrustDomainWithPath(s.into(), id.trust_domain_str().into()));
            }
            return Ok(id.trust_domain());
        }
        validate_trust_domain(s)?;
        Ok(TrustDomain(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID naming the trust domain itself (`spiffe://td`).
    pub fn id(&self) -> SpiffeId {
        SpiffeId { uri: format!("{SCHEME}{}", self.0).into(), td_end: SCHEME.len() + self.0.len() }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A SPIFFE ID: `spiffe://<trust-domain>[/<segment>...]`.
///
/// Stored as its canonical URI string so comparing, hashing and printing are free, and shared
/// (`Arc`) so cloning one, which the proxy does per connection and per request, is free too.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: std::sync::Arc<str>,
    /// Byte offset where the trust domain ends and the path starts.
    td_end: usize,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        // Query, fragment and percent-encoding are named before character checks so the
        // error says what the caller actually did wrong.
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if rest.contains('%') {
            return Err(SpiffeIdError::PercentEncoded);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(SpiffeId { uri: s.into(), td_end: SCHEME.len() + td.len() })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service-account>`, the Kubernetes workload form.
    pub fn workload(trust_domain: &TrustDomain, namespace: &str, service_account: &str) -> Result<Self, SpiffeIdError> {
        Self::from_segments(trust_domain, &["ns", namespace, "sa", service_account])
    }

    /// Builds `spiffe://<td>/<seg>/<seg>...`, validating each segment.
    pub fn from_segments(trust_domain: &TrustDomain, segments: &[&str]) -> Result<Self, SpiffeIdError> {
        let mut uri = String::with_capacity(SCHEME.len() + trust_domain.0.len() + 32);
        uri.push_str(SCHEME);
        uri.push_str(&trust_domain.0);
        for seg in segments {
            validate_segment(seg)?;
            uri.push('/');
            uri.push_str(seg);
        }
        if uri.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(SpiffeId { uri: uri.into(), td_end: SCHEME.len() + trust_domain.0.len() })
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().into())
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[self.td_end..]
    }

    /// The path's segments, in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path().split('/').skip(1)
    }

    /// The `ns` and `sa` of a Kubernetes-form ID (`/ns/<ns>/sa/<sa>`), if it is one.
    pub fn namespace(&self) -> Option<&str> {
        let mut segs = self.segments();
        match (segs.next(), segs.next()) {
            (Some("ns"), Some(ns)) => Some(ns),
            _ => None,
        }
    }

    /// True when `self` is `prefix` or lies below it on a segment boundary.
    pub fn is_under(&self, prefix: &SpiffeId) -> bool {
        match self.uri.strip_prefix(&*prefix.uri) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.uri
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        TrustDomain::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    // `user:pw@host` is userinfo, not a port, so '@' is looked for first.
    if td.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            ':' => return Err(SpiffeIdError::Port),
            '@' => return Err(SpiffeIdError::UserInfo),
            '?' => return Err(SpiffeIdError::Query),
            '#' => return Err(SpiffeIdError::Fragment),
            '%' => return Err(SpiffeIdError::PercentEncoded),
            other => return Err(SpiffeIdError::BadTrustDomainChar(other)),
        }
    }
    Ok(())
}

/// `path` is empty or starts with '/'.
fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    path[1..].split('/').try_for_each(validate_segment)
}

fn validate_segment(seg: &str) -> Result<(), SpiffeIdError> {
    if seg.is_empty() {
        return Err(SpiffeIdError::EmptySegment);
    }
    if seg == "." || seg == ".." {
        return Err(SpiffeIdError::DotSegment);
    }
    for c in seg.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
            '?' => return Err(SpiffeIdError::Query),
            '#' => return Err(SpiffeIdError::Fragment),
            '%' => return Err(SpiffeIdError::PercentEncoded),
            other => return Err(SpiffeIdError::BadPathChar(other)),
        }
    }
    Ok(())
}

/// Is `s` a valid single path segment (for namespaces and service accounts)?
pub fn is_valid_segment(s: &str) -> bool {
    validate_segment(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::SpiffeIdError::*;
    use super::*;

    #[test]
    fn valid_ids() {
        let long_td = "a".repeat(255);
        let long_id = format!("spiffe://td/{}", "a".repeat(2048 - "spiffe://td/".len()));
        let cases = [
            "spiffe://cluster.local/ns/shop/sa/api",
            "spiffe://example.org",
            "spiffe://example.org/service",
            "spiffe://example.org/a/b/c/d/e",
            "spiffe://trust_domain-1.example/path",
            "spiffe://1.2.3.4/workload",
            "spiffe://td/UPPER/Case_Mixed-09.x",
            "spiffe://td/...",
            "spiffe://td/.hidden",
            "spiffe://td/a..b",
            "spiffe://td/-_-",
            "spiffe://td/ns/default/sa/default",
            "spiffe://xn--bcher-kva.example/p",
            "spiffe://td/trellis/control",
            &format!("spiffe://{long_td}/p"),
            &long_id,
        ];
        for case in cases {
            let id = SpiffeId::parse(case).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(id.to_string(), case, "round trip");
        }
    }

    #[test]
    fn invalid_ids() {
        let long_td = "a".repeat(256);
        let too_long = format!("spiffe://td/{}", "a".repeat(2049 - "spiffe://td/".len()));
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("cluster.local/ns/a", WrongScheme),
            ("http://example.org/a", WrongScheme),
            ("SPIFFE://example.org/a", WrongScheme),
            ("spiffe:example.org/a", WrongScheme),
            ("spiffe:/example.org/a", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///path", MissingTrustDomain),
            ("spiffe://Example.org/a", BadTrustDomainChar('E')),
            ("spiffe://exa mple.org/a", BadTrustDomainChar(' ')),
            ("spiffe://ex*ample/a", BadTrustDomainChar('*')),
            ("spiffe://example.org:8080/a", Port),
            ("spiffe://user@example.org/a", UserInfo),
            ("spiffe://user:pw@example.org/a", UserInfo),
            ("spiffe://example.org/a?x=1", Query),
            ("spiffe://example.org?x=1", Query),
            ("spiffe://example.org/a#frag", Fragment),
            ("spiffe://example.org/a%20b", PercentEncoded),
            ("spiffe://ex%41mple.org/a", PercentEncoded),
            ("spiffe://example.org/", TrailingSlash),
            ("spiffe://example.org/a/", TrailingSlash),
            ("spiffe://example.org//a", EmptySegment),
            ("spiffe://example.org/a//b", EmptySegment),
            ("spiffe://example.org/./a", DotSegment),
            ("spiffe://example.org/a/..", DotSegment),
            ("spiffe://example.org/a/../b", DotSegment),
            ("spiffe://example.org/a b", BadPathChar(' ')),
            ("spiffe://example.org/a*", BadPathChar('*')),
            ("spiffe://example.org/a:b", BadPathChar(':')),
            ("spiffe://example.org/a@b", BadPathChar('@')),
            ("spiffe://example.org/ünï", BadPathChar('ü')),
            ("spiffe://example.org/a\\b", BadPathChar('\\')),
            (&format!("spiffe://{long_td}/p"), TrustDomainTooLong),
            (&too_long, TooLong),
        ];
        for (case, want) in cases {
            assert_eq!(SpiffeId::parse(case).as_ref(), Err(want), "{case:?}");
        }
    }

    #[test]
    fn parts() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap();
        assert_eq!(id.trust_domain_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/api");
        assert_eq!(id.segments().collect::<Vec<_>>(), ["ns", "shop", "sa", "api"]);
        assert_eq!(id.namespace(), Some("shop"));
        let td = SpiffeId::parse("spiffe://cluster.local").unwrap();
        assert_eq!(td.path(), "");
        assert_eq!(td.segments().count(), 0);
        assert_eq!(td.namespace(), None);
    }

    #[test]
    fn workload_constructor_validates() {
        let td = TrustDomain::parse("cluster.local").unwrap();
        let id = SpiffeId::workload(&td, "shop", "api").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/api");
        assert_eq!(id, SpiffeId::parse(id.as_str()).unwrap());
        assert_eq!(SpiffeId::workload(&td, "", "api"), Err(EmptySegment));
        assert_eq!(SpiffeId::workload(&td, "a/b", "api"), Err(BadPathChar('/')));
        assert_eq!(SpiffeId::workload(&td, "..", "api"), Err(DotSegment));
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(TrustDomain::parse("cluster.local").unwrap().as_str(), "cluster.local");
        assert_eq!(TrustDomain::parse("spiffe://cluster.local").unwrap().as_str(), "cluster.local");
        assert_eq!(
            TrustDomain::parse("spiffe://x.y/ns/a").unwrap_err(),
            SpiffeIdError::TrustDomainWithPath("spiffe://x.y/ns/a".into(), "x.y".into())
        );
        assert_eq!(TrustDomain::parse(""), Err(MissingTrustDomain));
        assert_eq!(TrustDomain::parse("Cluster"), Err(BadTrustDomainChar('C')));
        assert_eq!(TrustDomain::parse("td:80"), Err(Port));
        assert_eq!(TrustDomain::parse("td").unwrap().id().as_str(), "spiffe://td");
    }

    #[test]
    fn is_under_respects_segment_boundaries() {
        let p = SpiffeId::parse("spiffe://td/ns/shop").unwrap();
        assert!(SpiffeId::parse("spiffe://td/ns/shop/sa/a").unwrap().is_under(&p));
        assert!(SpiffeId::parse("spiffe://td/ns/shop").unwrap().is_under(&p));
        assert!(!SpiffeId::parse("spiffe://td/ns/shopping/sa/a").unwrap().is_under(&p));
        assert!(!SpiffeId::parse("spiffe://td2/ns/shop/sa/a").unwrap().is_under(&p));
    }

    #[test]
    fn serde_round_trip_and_rejects_bad() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://td/a\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"spiffe://td/a\"");
        let err = serde_json::from_str::<SpiffeId>("\"spiffe://td/a/\"").unwrap_err();
        assert!(err.to_string().contains("must not end with '/'"), "{err}");
    }
}
