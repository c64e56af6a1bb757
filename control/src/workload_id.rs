//! Which SPIFFE IDs the control plane issues to workloads.
//!
//! Checked where an identity is promised (`POST /v1/tokens`) and again where it is signed
//! (bootstrap and renewal, `server/svid.rs`), so a token or SVID minted before a rule
//! existed cannot be turned into a certificate either. Two kinds of ID are never a
//! workload's:
//!
//! - anything under `spiffe://<td>/trellis` — reserved for Trellis itself. The control
//!   plane serves as `spiffe://<td>/trellis/control` (docs/architecture.md) and proxies and the CLI
//!   accept whoever presents that ID as the control plane, so issuing it to a workload would
//!   let that workload impersonate the control plane;
//! - a trust-domain-only ID (`spiffe://<td>`, no path): the X509-SVID spec (§3.1) says a
//!   leaf's SPIFFE ID MUST have a non-root path; that ID names the trust domain (its CA
//!   carries it), not a workload.

use trellis_identity::SpiffeId;

/// The first path segment reserved for Trellis' own identities.
pub const RESERVED_SEGMENT: &str = "trellis";

/// Why an ID cannot be issued to a workload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdRefused {
    #[error(
        "{0} has no path: it names the trust domain, not a workload (an SVID's SPIFFE ID must have a path, e.g. {0}/ns/<namespace>/sa/<service-account>)"
    )]
    NoPath(SpiffeId),
    #[error(
        "{id} is under {id_root}/trellis, which is reserved for Trellis itself (the control plane is {id_root}/trellis/control); choose another path"
    )]
    Reserved { id: SpiffeId, id_root: String },
}

/// Ok when `id` may be issued to a workload.
pub fn check_issuable(id: &SpiffeId) -> Result<(), IdRefused> {
    if id.path().is_empty() {
        return Err(IdRefused::NoPath(id.clone()));
    }
    // SPIFFE paths are case-sensitive and the control plane's ID is exactly
    // `/trellis/control`, so only the exact segment is reserved.
    if id.segments().next() == Some(RESERVED_SEGMENT) {
        let id_root = format!("spiffe://{}", id.trust_domain_str());
        return Err(IdRefused::Reserved { id: id.clone(), id_root });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &str) -> Result<(), IdRefused> {
        check_issuable(&SpiffeId::parse(s).unwrap())
    }

    #[test]
    fn reserved_and_pathless_ids_are_refused() {
        for reserved in [
            "spiffe://cluster.local/trellis/control",
            "spiffe://cluster.local/trellis",
            "spiffe://cluster.local/trellis/proxy/x",
        ] {
            let err = check(reserved).unwrap_err();
            assert!(matches!(err, IdRefused::Reserved { .. }), "{reserved}: {err:?}");
            assert!(err.to_string().contains("reserved for Trellis"), "{err}");
        }
        let err = check("spiffe://cluster.local").unwrap_err();
        assert!(matches!(err, IdRefused::NoPath(_)), "{err:?}");
        assert!(err.to_string().contains("has no path"), "{err}");
    }

    #[test]
    fn workload_ids_are_accepted() {
        for ok in [
            "spiffe://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/trellisx/a",
            "spiffe://cluster.local/Trellis/control",
            "spiffe://cluster.local/ns/trellis/sa/control",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }
}
