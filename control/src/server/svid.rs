//! Issuing SVIDs: bootstrap (join token or Kubernetes token + CSR) and renewal (current
//! SVID over mTLS + CSR for the same ID).
//!
//! The caller's *proof* decides the identity — the token's binding, the TokenReview result,
//! or the presented SVID — and the CSR must ask for exactly that (the CA refuses anything
//! else). A join token is spent only once a certificate has been signed for it, so a
//! malformed CSR does not burn a token, and two racing bootstraps cannot both win.
//!
//! Whatever the proof, an ID reserved for Trellis itself (`spiffe://<td>/trellis/...`, the
//! control plane's own identity) or without a path is never signed: a token minted for one
//! before that rule, or an SVID for one, gets a 403 rather than a certificate that would
//! impersonate the control plane.

use std::net::{IpAddr, SocketAddr};

use http::{Request, StatusCode};
use hyper::body::Incoming;
use trellis_identity::pem::{self, PemError};
use trellis_identity::{CsrError, SpiffeId};

use super::{ApiError, ApiResult, Conn, Ctx, blocking, json, read_json, require_svid};
use crate::api::{BootstrapRequest, RenewRequest, SvidResponse};
use crate::store::{Actor, Claim, StoreError, now_unix, split_app_port};
use crate::tokens;

pub async fn bootstrap(ctx: &Ctx, conn: &Conn, req: Request<Incoming>) -> ApiResult {
    let body: BootstrapRequest = read_json(req).await?;
    let addresses = check_addresses(&body.addresses)?;
    let actor = Actor { principal: "bootstrap".into(), remote: conn.remote.to_string() };
    let (id, token_hash) = match (&body.token, &body.k8s_token) {
        (Some(token), None) => {
            let hash = tokens::hash(token);
            let store = ctx.shared.store.clone();
            let record = blocking(move || store.peek_token(&hash, now_unix())).await?.map_err(token_error)?;
            (record.spiffe_id, Some(hash))
        }
        (None, Some(k8s)) => {
            let Some(attest) = ctx.hooks.k8s_attest.clone() else {
                return Err(ApiError::bad_request(
                    "Kubernetes attestation is not enabled on this control plane (--k8s-attestation)",
                ));
            };
            let id = attest(k8s.clone()).await.inspect_err(|e| {
                // Refused claims of identity are worth a line: a misconfigured pod, or a probe.
                tracing::info!(remote = %conn.remote, status = e.status.as_u16(), reason = %e.body.error, "Kubernetes attestation refused");
            })?;
            (id, None)
        }
        (Some(_), Some(_)) => return Err(ApiError::bad_request("send either `token` or `k8s_token`, not both")),
        (None, None) => return Err(ApiError::bad_request("missing `token` (a join token) or `k8s_token`")),
    };
    let (response, _) = sign(ctx, &body.csr_pem, &id)?;
    // The token is spent and the addresses registered in one transaction: a refused claim
    // (even one lost to a registration racing this one) leaves the token usable. A Kubernetes
    // bootstrap that names no address writes nothing.
    let joined = token_hash.is_some();
    if joined || !addresses.is_empty() {
        let (store, claim, owner) = (ctx.shared.store.clone(), claim(ctx, conn), id.clone());
        let version =
            blocking(move || store.bootstrap(token_hash.as_ref().map(|h| (h, &actor)), &owner, &addresses, &claim))
                .await?
                .map_err(bootstrap_error)?;
        // The token is spent and the certificate signed: the caller gets it even if the
        // registry cannot be re-read now (the next registration reloads it).
        if let Err(e) = ctx.shared.registry_at(version) {
            tracing::error!(error = %e, "could not reload the endpoint registry after a bootstrap");
        }
    }
    // A join token's bootstrap is audited with the token's spending; a Kubernetes one here.
    if !joined {
        let (store, target) = (ctx.shared.store.clone(), id.to_string());
        let actor = Actor { principal: "bootstrap (kubernetes token)".into(), remote: conn.remote.to_string() };
        if let Err(e) = blocking(move || store.record(&actor, "svid.bootstrap", &target)).await? {
            tracing::error!(error = %e, "could not write the audit entry of a Kubernetes bootstrap");
        }
    }
    tracing::info!(spiffe_id = %id, remote = %conn.remote, "SVID bootstrapped");
    Ok(json(StatusCode::OK, &response))
}

pub async fn renew(ctx: &Ctx, conn: &Conn, req: Request<Incoming>) -> ApiResult {
    let (id, _, old_serial) = require_svid(ctx, conn)?;
    let body: RenewRequest = read_json(req).await?;
    let addresses = check_addresses(&body.addresses)?;
    let (response, new_serial) = sign(ctx, &body.csr_pem, &id)?;
    // A renewal is about identity: an address another workload now holds is left out (and
    // logged), not a reason to let this proxy's SVID run out.
    register(ctx, &id, addresses, Claim { leave_out_held: true, ..claim(ctx, conn) }).await?;
    ctx.shared.svid_renewed(&old_serial, new_serial, response.expires_at);
    let store = ctx.shared.store.clone();
    let actor = Actor { principal: id.to_string(), remote: conn.remote.to_string() };
    let target = id.to_string();
    if let Err(e) = blocking(move || store.record(&actor, "svid.renew", &target)).await? {
        tracing::warn!(error = %e, "could not record renewal in the audit log");
    }
    tracing::debug!(spiffe_id = %id, "SVID renewed");
    Ok(json(StatusCode::OK, &response))
}

/// The SVID for `id`, and its serial (hex).
fn sign(ctx: &Ctx, csr_pem: &str, id: &SpiffeId) -> Result<(SvidResponse, String), ApiError> {
    crate::workload_id::check_issuable(id).map_err(|e| {
        tracing::warn!(spiffe_id = %id, reason = %e, "refused to sign an SVID for a reserved ID");
        ApiError::forbidden(format!("no SVID is issued for this ID: {e}"))
    })?;
    let csr =
        pem::csr_from_pem("csr_pem", csr_pem.as_bytes()).map_err(|e: PemError| ApiError::bad_request(e.to_string()))?;
    let issued = ctx.ca.sign_csr(&csr, id, ctx.svid_ttl).map_err(csr_error)?;
    let serial = trellis_identity::CertInfo::parse(&issued.chain[0]).map(|i| i.serial_hex).unwrap_or_default();
    let response = SvidResponse {
        spiffe_id: id.clone(),
        chain_pem: pem::certs_to_pem(&issued.chain),
        bundle_pem: ctx.shared.bundle.load().to_pem(),
        expires_at: issued.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    };
    Ok((response, serial))
}

async fn register(ctx: &Ctx, id: &SpiffeId, addresses: Vec<String>, claim: Claim) -> Result<(), ApiError> {
    if addresses.is_empty() {
        return Ok(());
    }
    let store = ctx.shared.store.clone();
    let owner = id.clone();
    let version =
        blocking(move || store.register_endpoints(&owner, &addresses, &claim)).await?.map_err(register_error)?;
    ctx.shared.registry_at(version).map_err(ApiError::internal)
}

/// This request's claim on addresses (see [`Claim`]): a holder that renewed within the last
/// SVID lifetime keeps its addresses against claims from elsewhere.
fn claim(ctx: &Ctx, conn: &Conn) -> Claim {
    let fresh_after = now_unix().saturating_sub(ctx.svid_ttl.as_secs());
    Claim { from: conn.remote.ip(), fresh_after, leave_out_held: false }
}

/// A refused claim is the caller's conflict; a token found spent or expired at the write is
/// what [`token_error`] says.
fn bootstrap_error(e: StoreError) -> ApiError {
    match e {
        StoreError::AddressHeld { .. } => register_error(e),
        other => token_error(other),
    }
}

fn register_error(e: StoreError) -> ApiError {
    match e {
        StoreError::AddressHeld { .. } => {
            tracing::warn!(error = %e, "refused an endpoint address claim");
            ApiError::new(StatusCode::CONFLICT, e.to_string())
        }
        other => ApiError::internal(other),
    }
}

/// Registry addresses are `ip` or `ip:port`, stored in their canonical text form.
/// Addresses a workload can be reached at: one unicast IP, with or without a port; a port
/// may name the app's port behind it (`ip:port=APP_PORT`, a VM's `--inbound LISTEN=APP`).
fn check_addresses(addresses: &[String]) -> Result<Vec<String>, ApiError> {
    // Read before any token is checked: bounded, and checked in one pass.
    if addresses.len() > MAX_ADDRESSES {
        return Err(ApiError::bad_request(format!(
            "{} addresses; a workload registers at most {MAX_ADDRESSES}",
            addresses.len()
        )));
    }
    let checked: Vec<String> = addresses
        .iter()
        .map(|a| {
            let Some((at, app_port)) = a.split_once('=') else { return check_address(a) };
            let app_port = app_port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                ApiError::bad_request(format!("address {a:?}: the app's port after `=` is not a port (1-65535)"))
            })?;
            if at.parse::<SocketAddr>().is_err() {
                return Err(ApiError::bad_request(format!("address {a:?}: an app's port follows an `ip:port`")));
            }
            Ok(format!("{}={app_port}", check_address(at)?))
        })
        .collect::<Result<_, _>>()?;
    // One address, one app behind it: two would flip the entry (and the registry version)
    // at every registration.
    let mut seen = std::collections::HashMap::new();
    for a in &checked {
        let (address, app_port) = split_app_port(a);
        if seen.insert(address, app_port).is_some_and(|before| before != app_port) {
            return Err(ApiError::bad_request(format!("address {address:?} is given with two different app ports")));
        }
    }
    Ok(checked)
}

/// Addresses one registration may name: a pod has one IP, a VM a listener or a few per app.
const MAX_ADDRESSES: usize = 256;

/// One address in its canonical form, or why it cannot be a workload's.
fn check_address(a: &str) -> Result<String, ApiError> {
    // IPv4-mapped IPv6 is written as the IPv4 address it is: one host, one spelling.
    let (ip, canonical) = if let Ok(ip) = a.parse::<IpAddr>() {
        (ip, ip.to_canonical().to_string())
    } else if let Ok(sa) = a.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(ApiError::bad_request(format!("address {a:?}: port 0 is no port")));
        }
        (sa.ip(), SocketAddr::new(sa.ip().to_canonical(), sa.port()).to_string())
    } else {
        return Err(ApiError::bad_request(format!("address {a:?} is not `ip` or `ip:port`")));
    };
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_unspecified() || ip.is_multicast() || broadcast {
        return Err(ApiError::bad_request(format!(
            "address {a:?} is not one workload's address (unspecified, multicast or broadcast)"
        )));
    }
    // Link-local addresses are no mesh workload's (and 169.254.169.254 is the cloud's metadata
    // service): claimed, callers would require the claimer's identity there instead of
    // applying egress policy.
    let link_local = match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if link_local {
        return Err(ApiError::bad_request(format!(
            "address {a:?} is link-local (169.254.0.0/16, fe80::/10): no workload's mesh address"
        )));
    }
    Ok(canonical)
}

fn token_error(e: StoreError) -> ApiError {
    match e {
        StoreError::TokenUnknown | StoreError::TokenExpired | StoreError::TokenUsed => {
            ApiError::unauthorized(e.to_string())
        }
        other => ApiError::internal(other),
    }
}

fn csr_error(e: CsrError) -> ApiError {
    match e {
        CsrError::IdMismatch { .. } | CsrError::ExtraSans(_) | CsrError::RequestsCa => {
            ApiError::forbidden(e.to_string())
        }
        CsrError::CaExpired | CsrError::Signing(_) => ApiError::internal(e),
        other => ApiError::bad_request(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::check_addresses;

    #[test]
    fn addresses_are_canonical_and_an_app_port_follows_an_ip_and_port() {
        let ok = ["10.0.0.5", "[::ffff:10.0.0.5]:8443", "10.0.0.5:15006=8080"].map(String::from);
        assert_eq!(check_addresses(&ok).unwrap(), ["10.0.0.5", "10.0.0.5:8443", "10.0.0.5:15006=8080"]);
        for (bad, says) in [
            ("10.0.0.5=8080", "follows an `ip:port`"),
            ("10.0.0.5:15006=0", "not a port"),
            ("10.0.0.5:15006=http", "not a port"),
            ("0.0.0.0:15006=8080", "not one workload's address"),
            ("169.254.169.254", "link-local"),
            ("[fe80::1]:8080", "link-local"),
            ("::ffff:169.254.1.1", "link-local"),
            ("10.0.0.5:0=8080", "port 0"),
        ] {
            let err = check_addresses(&[bad.to_string()]).unwrap_err();
            assert!(format!("{err:?}").contains(says), "{bad}: {err:?}");
        }
        let ok = ["[::1]:80=8080", "[::ffff:10.0.0.5]:15006=8080"].map(String::from);
        assert_eq!(check_addresses(&ok).unwrap(), ["[::1]:80=8080", "10.0.0.5:15006=8080"]);
        let many: Vec<String> =
            (0..=super::MAX_ADDRESSES).map(|i| format!("10.0.{}.{}", i / 250, i % 250 + 1)).collect();
        assert!(format!("{:?}", check_addresses(&many).unwrap_err()).contains("at most 256"));
        for twice in [["10.0.0.5:15006=8080", "10.0.0.5:15006=9090"], ["10.0.0.5:15006=8080", "10.0.0.5:15006"]] {
            let err = check_addresses(&twice.map(String::from)).unwrap_err();
            assert!(format!("{err:?}").contains("two different app ports"), "{err:?}");
        }
    }
}
