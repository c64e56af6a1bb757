//! The admin API: join tokens, policies, live policy checks, connected workloads and the
//! audit log. Every route requires the admin token; a missing or wrong token gets 401 before
//! the body is even read, so nothing changes.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use trellis_identity::SpiffeId;
use trellis_policy::{Action, Decision, Defaults, EgressFlow, Flow, HttpRequest, PolicySnapshot, parse_documents};

use super::{ApiError, ApiResult, Conn, Ctx, MAX_POLICY_BODY, blocking, json, read_body, read_json, require_admin};
use crate::api::{
    CheckRequest, CheckResponse, ErrorBody, ErrorDetail, PolicyList, PolicySummary, TokenRequest, TokenResponse, paths,
};
use crate::store::{StoreError, TokenRecord, now_unix};
use crate::tokens;

/// Join tokens live 15 minutes unless asked otherwise, and never more than 30 days.
const DEFAULT_TOKEN_TTL: u64 = 15 * 60;
/// The longest a join token may live (the API refuses more; the CLI says so first).
pub const MAX_TOKEN_TTL: u64 = 30 * 24 * 3600;
/// Most audit entries one `GET /v1/audit` returns (`limit`'s maximum in the OpenAPI).
const MAX_AUDIT_LIMIT: usize = 10_000;

pub async fn route(ctx: &Ctx, conn: &Conn, req: Request<Incoming>) -> ApiResult {
    let actor = require_admin(ctx, conn, &req)?;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let name = path.strip_prefix(paths::POLICIES).and_then(|r| r.strip_prefix('/'));
    match (method, path.as_str(), name) {
        (Method::POST, paths::TOKENS, _) => create_token(ctx, actor, req).await,
        (Method::GET, paths::POLICIES, _) => list_policies(ctx),
        (Method::POST, paths::POLICIES, _) => apply_policies(ctx, actor, req).await,
        (Method::GET, _, Some(name)) => get_policy(ctx, name),
        (Method::DELETE, _, Some(name)) => delete_policy(ctx, actor, name.to_string()).await,
        (Method::POST, paths::CHECK, _) => check(ctx, req).await,
        (Method::GET, paths::WORKLOADS, _) => Ok(json(StatusCode::OK, &ctx.shared.workloads())),
        (Method::GET, paths::AUDIT, _) => audit(ctx, &req).await,
        // Only what `docs/api/openapi.yaml` documents: `PUT /v1/policies` used to apply too.
        (m, p, _) => Err(super::not_routed(&m, p)),
    }
}

async fn create_token(ctx: &Ctx, actor: crate::store::Actor, req: Request<Incoming>) -> ApiResult {
    let body: TokenRequest = read_json(req).await?;
    if body.spiffe_id.trust_domain_str() != ctx.trust_domain.as_str() {
        return Err(ApiError::bad_request(format!(
            "spiffe_id {} is not in this control plane's trust domain {}",
            body.spiffe_id, ctx.trust_domain
        )));
    }
    crate::workload_id::check_issuable(&body.spiffe_id)
        .map_err(|e| ApiError::bad_request(format!("no join token is minted for this ID: {e}")))?;
    let ttl = body.ttl_seconds.unwrap_or(DEFAULT_TOKEN_TTL);
    if ttl == 0 || ttl > MAX_TOKEN_TTL {
        return Err(ApiError::bad_request(format!("ttl_seconds must be between 1 and {MAX_TOKEN_TTL}")));
    }
    let token = tokens::mint();
    let now = now_unix();
    let record = TokenRecord { spiffe_id: body.spiffe_id.clone(), created: now, expires: now + ttl, used: None };
    let hash = tokens::hash(&token);
    let store = ctx.shared.store.clone();
    let rec = record.clone();
    blocking(move || store.insert_token(&hash, &rec, &actor)).await?.map_err(ApiError::internal)?;
    tracing::info!(spiffe_id = %record.spiffe_id, ttl, "join token created");
    Ok(json(StatusCode::CREATED, &TokenResponse { token, spiffe_id: record.spiffe_id, expires_at: record.expires }))
}

fn list_policies(ctx: &Ctx) -> ApiResult {
    let state = ctx.shared.policy.load();
    let policies = state
        .snapshot
        .policies()
        .iter()
        .map(|p| PolicySummary {
            name: p.name().to_string(),
            kind: p.kind().to_string(),
            selector: p.selector().to_string(),
            action: p.action().document_str().to_string(),
            mode: match p.mode() {
                trellis_policy::Mode::Enforce => "enforce",
                trellis_policy::Mode::Audit => "audit",
            }
            .to_string(),
            rules: p.rule_count(),
        })
        .collect();
    Ok(json(StatusCode::OK, &PolicyList { version: state.version(), policies }))
}

fn get_policy(ctx: &Ctx, name: &str) -> ApiResult {
    let state = ctx.shared.policy.load();
    match state.snapshot.get(name) {
        Some(p) => Ok(json(StatusCode::OK, p)),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("policy {name:?} not found"))),
    }
}

async fn apply_policies(ctx: &Ctx, actor: crate::store::Actor, req: Request<Incoming>) -> ApiResult {
    let body = read_body(req, MAX_POLICY_BODY).await?;
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("policy file is not UTF-8"))?;
    let docs = parse_documents(text).map_err(|errs| ApiError {
        status: StatusCode::BAD_REQUEST,
        headers: Vec::new(),
        body: ErrorBody {
            error: format!("policy file refused: {} problem(s); nothing was applied", errs.len()),
            details: errs
                .iter()
                .map(|e| ErrorDetail { document: e.document.clone(), path: e.path.clone(), message: e.message.clone() })
                .collect(),
        },
    })?;
    if docs.is_empty() {
        return Err(ApiError::bad_request("policy file holds no documents"));
    }
    let td = ctx.trust_domain.as_str();
    let mut problems: Vec<ErrorDetail> = docs
        .iter()
        .flat_map(|p| {
            p.foreign_patterns(td).into_iter().map(|(path, pattern)| ErrorDetail {
                document: p.name().to_string(),
                path,
                message: format!("{pattern} is not in this mesh's trust domain {td}, so it can never match"),
            })
        })
        .collect();
    // What the store would refuse of a replaced policy, told in the same answer rather than
    // after the rest is mended (the store checks again, against what it holds then).
    let current = ctx.shared.policy.load();
    problems.extend(docs.iter().filter_map(|doc| {
        let message = crate::store::same_policy(current.snapshot.get(doc.name())?, doc).err()?;
        Some(ErrorDetail { document: doc.name().to_string(), path: "metadata".to_string(), message })
    }));
    if !problems.is_empty() {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            headers: Vec::new(),
            body: ErrorBody {
                error: format!("policy file refused: {} problem(s); nothing was applied", problems.len()),
                details: problems,
            },
        });
    }
    let store = ctx.shared.store.clone();
    let outcome = blocking(move || {
        store.apply(&docs, &actor, |all| {
            PolicySnapshot::compile(0, all.to_vec(), Defaults::default()).map(|_| ()).map_err(|e| e.to_string())
        })
    })
    .await?
    .map_err(|e| match e {
        StoreError::Rejected(msg) => ApiError::bad_request(format!("policy set refused: {msg}; nothing was applied")),
        other => ApiError::internal(other),
    })?;
    ctx.shared.reload_policies().map_err(ApiError::internal)?;
    release_memory(ctx).await;
    tracing::info!(version = outcome.version, created = ?outcome.created, configured = ?outcome.configured, "policies applied");
    Ok(json(StatusCode::OK, &outcome))
}

async fn delete_policy(ctx: &Ctx, actor: crate::store::Actor, name: String) -> ApiResult {
    let store = ctx.shared.store.clone();
    let n = name.clone();
    let version = blocking(move || store.delete(&n, &actor)).await?.map_err(|e| match e {
        StoreError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
        other => ApiError::internal(other),
    })?;
    ctx.shared.reload_policies().map_err(ApiError::internal)?;
    release_memory(ctx).await;
    tracing::info!(version, policy = %name, "policy deleted");
    Ok(json(StatusCode::OK, &serde_json::json!({"version": version, "deleted": name})))
}

/// After a policy change the old set and the request's parse are garbage; give their pages
/// back (see [`super::Hooks::release_memory`]). Off the event loop: the heap walk of a large
/// set takes milliseconds.
async fn release_memory(ctx: &Ctx) {
    if let Some(release) = ctx.hooks.release_memory {
        let released = blocking(release).await.unwrap_or(false);
        tracing::debug!(released, "gave freed memory back to the system");
    }
}

async fn audit(ctx: &Ctx, req: &Request<Incoming>) -> ApiResult {
    let mut after = 0u64;
    let mut limit = 1000usize;
    let mut seen: Vec<&str> = Vec::new();
    for pair in req.uri().query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || ApiError::bad_request(format!("bad query parameter {pair:?}"));
        // `after=1&after=2` has no one meaning: refused rather than one of them silently taken.
        if seen.contains(&k) {
            return Err(ApiError::bad_request(format!("query parameter {k:?} is given twice")));
        }
        seen.push(k);
        match k {
            "after" => after = v.parse().map_err(|_| bad())?,
            // The contract says maximum 10000 and declares a 400: refuse, do not clamp.
            "limit" => {
                limit = v.parse::<usize>().map_err(|_| bad())?;
                if limit > MAX_AUDIT_LIMIT {
                    return Err(ApiError::bad_request(format!("limit {limit} is above the maximum {MAX_AUDIT_LIMIT}")));
                }
            }
            _ => return Err(bad()),
        }
    }
    let store = ctx.shared.store.clone();
    let entries = blocking(move || store.audit(after, limit)).await?.map_err(ApiError::internal)?;
    Ok(json(StatusCode::OK, &entries))
}

/// Evaluates a flow against the live policies, exactly as `trellis policy check` does
/// offline; an address in the endpoint registry is a mesh flow, any other is egress.
async fn check(ctx: &Ctx, req: Request<Incoming>) -> ApiResult {
    let q: CheckRequest = read_json(req).await?;
    let state = ctx.shared.policy.load();
    let mesh_default = match q.default.as_deref() {
        None | Some("deny") => Action::Deny,
        Some("allow") => Action::Allow,
        Some(other) => return Err(ApiError::bad_request(format!("default must be allow or deny, not {other:?}"))),
    };
    let alt;
    let snapshot = if mesh_default == Action::Deny {
        &state.snapshot
    } else {
        let defaults = Defaults { mesh: Action::Allow, ..Defaults::default() };
        alt = PolicySnapshot::compile(state.version(), state.snapshot.policies().to_vec(), defaults)
            .map_err(ApiError::internal)?;
        &alt
    };
    let source_ip = match q.source_ip.as_deref() {
        Some(s) => IpAddr::from_str(s).map_err(|_| ApiError::bad_request(format!("source_ip {s:?} is not an IP")))?,
        None => IpAddr::from([127, 0, 0, 1]),
    };
    let http = match (q.method.as_deref(), q.path.as_deref()) {
        (Some(method), Some(path)) => {
            Some(HttpRequest::checked(method, path).map_err(|e| ApiError::bad_request(e.to_string()))?)
        }
        (None, None) => None,
        _ => return Err(ApiError::bad_request("method and path go together")),
    };
    // As the CLI and policy files: no flow is to port 0, so no answer would mean anything.
    if q.port == Some(0) {
        return Err(ApiError::bad_request("port 0 is not a port a flow can go to (1-65535)"));
    }
    let (mut endpoint, mut judged_port) = (None, None);
    let (decision, resolved): (Decision, Option<SpiffeId>) = match (&q.to, q.port, &q.to_address) {
        (Some(to), Some(port), None) => {
            (snapshot.evaluate(&Flow { source: q.from.as_ref(), source_ip, destination: to, port, http }), None)
        }
        (None, None, Some(addr)) => {
            let addr = SocketAddr::from_str(addr)
                .map_err(|_| ApiError::bad_request(format!("to_address {addr:?} is not ip:port")))?;
            // One spelling per host, as the registry and the Service table store them.
            let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
            let registry = ctx.shared.registry.load();
            // A Service's address is judged as a call to its first endpoint in the mesh is: the
            // endpoint's identity, at the port it listens on.
            let services = ctx.shared.services.load();
            let service_endpoint = || {
                let vip = addr.to_string();
                let entry = services.entries.iter().find(|e| e.address == vip)?;
                entry
                    .endpoints
                    .iter()
                    .filter_map(|e| SocketAddr::from_str(e).ok())
                    .find_map(|e| registry.resolve(e).map(|id| (e, id.clone())))
            };
            let direct = registry.resolve(addr).map(|id| (addr, id.clone()));
            match direct.or_else(service_endpoint) {
                Some((at, to)) => {
                    // A VM's listener hands its connections to the app's port: judged there,
                    // as the sidecar judges them.
                    let port = registry.endpoint(at).and_then(|e| e.app_port).unwrap_or(at.port());
                    judged_port = Some(port);
                    let flow = Flow { source: q.from.as_ref(), source_ip, destination: &to, port, http };
                    endpoint = (at != addr).then(|| at.to_string());
                    (snapshot.evaluate(&flow), Some(to))
                }
                None => {
                    let from = q.from.as_ref().ok_or_else(|| {
                        ApiError::bad_request("an egress check (address outside the mesh) needs `from`")
                    })?;
                    judged_port = Some(addr.port());
                    let flow = EgressFlow { source: from, destination_ip: addr.ip(), port: addr.port() };
                    (snapshot.evaluate_egress(&flow), None)
                }
            }
        }
        _ => return Err(ApiError::bad_request("give either `to` and `port`, or `to_address`")),
    };
    let decision = serde_json::to_value(&decision).map_err(ApiError::internal)?;
    Ok(json(
        StatusCode::OK,
        &CheckResponse { version: state.version(), resolved, endpoint, port: judged_port, decision },
    ))
}
