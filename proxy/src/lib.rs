//! `trellis-proxy`: the sidecar data plane (`trellis proxy run`, `trellis proxy init`);
//! docs/architecture.md (proxy).
//!
//! A connection's path reads top to bottom, one file per direction:
//! - [`inbound`]: accept → TLS (mTLS required) → identify the peer → detect → authorize
//!   ([`authz`]) → forward to the app (TCP tunnel, or per-request HTTP through [`layers`]);
//! - [`outbound`]: accept from the app → find the destination (route or original
//!   destination + endpoint registry) → mTLS to the peer sidecar (pooled HTTP/2, [`pool`])
//!   or egress policy for addresses outside the mesh.
//!
//! Around the data path: [`svid`] keeps the identity (bootstrap, renewal), [`link`] follows
//! the control plane's watch stream into the hot [`state`], [`conns`] closes connections a
//! new policy revokes, [`admin`] serves `/live`, `/ready`, `/metrics`, `/config`,
//! [`telemetry`] records a span (and a flow-log line) for every flow and exports them off
//! the data path, [`trim`] gives memory back to the system after a connection spike, and
//! [`init`] writes the transparent-capture rules for `trellis proxy init`.

pub mod admin;
pub mod app;
pub mod authz;
pub mod config;
pub mod conns;
pub mod head_timer;
pub mod http;
pub mod inbound;
pub mod init;
pub mod io;
pub mod layers;
pub mod link;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod peer_h2;
pub mod pool;
pub mod probes;
pub mod serve;
pub mod sniff;
pub mod state;
pub mod svid;
pub mod telemetry;
pub mod trim;
pub mod tunnel;
pub mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trellis_control::ControlClient;
use trellis_identity::{CredentialStore, TrustBundle};

pub use config::ProxyConfig;
use state::{PolicyView, ProxyState, Registry, TlsState};

/// Why the sidecar could not start. A wrapped cause is the error's `source()` and is not
/// repeated in its message: the binary prints the chain (`{:#}`), so each cause shows once.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The CA bundle is not usable; the message says why (the binary names the file).
    #[error("{0}")]
    Bundle(String),
    #[error("{flag} {addr}: cannot listen there")]
    Listen {
        flag: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} {addr} is also given as {other}: each listener needs an address of its own")]
    ListenTwice { flag: &'static str, other: &'static str, addr: SocketAddr },
    #[error("control plane")]
    Control(#[from] trellis_control::ClientError),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("TLS")]
    Tls(#[from] trellis_identity::TlsError),
    #[error("telemetry")]
    Telemetry(#[from] telemetry::TelemetryError),
    /// A route requires an identity the mesh's CA can never vouch for.
    #[error(
        "--route {listen}: {identity} is in trust domain {route_td}, but this mesh's (the CA bundle's) is {mesh_td}: \
         no peer could ever prove it"
    )]
    ForeignRoute { listen: SocketAddr, identity: String, route_td: String, mesh_td: String },
}

/// The control-plane client for `bundle`. A bundle whose root carries no SPIFFE URI SAN
/// names no trust domain, and `proxy run` has no flag to give one: say what the bundle
/// should have been rather than the client's generic advice.
fn control_client(
    config: &ProxyConfig,
    bundle: &TrustBundle,
    creds: Option<Arc<CredentialStore>>,
) -> Result<ControlClient, ProxyError> {
    ControlClient::new(&config.control_url, bundle, None, creds, None).map_err(|e| match e {
        trellis_control::ClientError::NoTrustDomain => ProxyError::Bundle(
            "the CA bundle's root has no spiffe:// URI SAN, so it names no trust domain: pass the control plane's \
             bundle.pem (its data directory has it)"
                .into(),
        ),
        other => other.into(),
    })
}

/// How long spans still queued at exit get to reach the exporter.
const TELEMETRY_FLUSH: Duration = Duration::from_secs(3);

/// The listeners, bound before anything else so a bad address fails at once.
struct Listeners {
    admin: TcpListener,
    inbound: Vec<(config::InboundSpec, TcpListener)>,
    outbound: Option<TcpListener>,
    routes: Vec<(config::RouteSpec, TcpListener)>,
}

async fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr).await.map_err(|source| ProxyError::Listen { flag, addr, source })
}

async fn bind_all(config: &ProxyConfig) -> Result<Listeners, ProxyError> {
    check_distinct(config)?;
    let admin = bind("--admin", config.admin).await?;
    let mut inbound = Vec::new();
    for spec in &config.inbound {
        inbound.push((spec.clone(), bind("--inbound", spec.listen).await?));
    }
    let outbound = match config.outbound {
        Some(a) => Some(bind("--outbound", a).await?),
        None => None,
    };
    let mut routes = Vec::new();
    for r in &config.routes {
        routes.push((r.clone(), bind("--route", r.listen).await?));
    }
    Ok(Listeners { admin, inbound, outbound, routes })
}

/// Two flags naming one address would otherwise fail as "address in use", as if something
/// else held it.
fn check_distinct(config: &ProxyConfig) -> Result<(), ProxyError> {
    let mut seen: Vec<(&'static str, SocketAddr)> = vec![("--admin", config.admin)];
    let rest = config.inbound.iter().map(|s| ("--inbound", s.listen));
    let rest = rest
        .chain(config.outbound.map(|a| ("--outbound", a)))
        .chain(config.routes.iter().map(|r| ("--route", r.listen)));
    for (flag, addr) in rest {
        // Port 0 asks the kernel for a free port: never a clash.
        if let Some((other, _)) = seen.iter().find(|(_, a)| *a == addr && addr.port() != 0) {
            return Err(ProxyError::ListenTwice { flag, other, addr });
        }
        seen.push((flag, addr));
    }
    Ok(())
}

/// Runs the sidecar until `shutdown` resolves, then drains for up to the drain timeout.
pub async fn run(config: ProxyConfig, shutdown: impl Future<Output = ()>) -> Result<(), ProxyError> {
    // The identity crate's message already starts "trust bundle: ...".
    let bundle = TrustBundle::from_pem(config.bundle_pem.as_bytes()).map_err(|e| ProxyError::Bundle(e.to_string()))?;
    if let Some(mesh) = bundle.trust_domain() {
        let foreign = config.routes.iter().find(|r| r.identity.trust_domain_str() != mesh.as_str());
        if let Some(r) = foreign {
            return Err(ProxyError::ForeignRoute {
                listen: r.listen,
                identity: r.identity.to_string(),
                route_td: r.identity.trust_domain_str().to_string(),
                mesh_td: mesh.to_string(),
            });
        }
    }
    let listeners = bind_all(&config).await?;
    let anon = control_client(&config, &bundle, None)?;
    let creds = CredentialStore::new();
    let metrics = metrics::Metrics::new();
    let telemetry = telemetry::Telemetry::start(&config.telemetry, &metrics)?;
    let authed = control_client(&config, &bundle, Some(creds.clone()))?;
    let state = Arc::new(ProxyState {
        config,
        creds,
        policy: ArcSwap::from_pointee(PolicyView::fail_closed()),
        registry: ArcSwap::from_pointee(Registry::default()),
        tls: ArcSwapOption::empty(),
        control: Mutex::default(),
        metrics,
        telemetry,
        conns: Arc::default(),
        shutdown: CancellationToken::new(),
        first_policy: CancellationToken::new(),
        pools: pool::PeerPools::default(),
        app: app::AppClients::default(),
    });
    tokio::spawn(admin::serve(state.clone(), listeners.admin));
    tokio::spawn(trim::trim_loop(state.clone()));
    tokio::pin!(shutdown);

    let origin = tokio::select! {
        r = svid::obtain(&state, &anon, &bundle) => r?,
        () = &mut shutdown => {
            state.shutdown.cancel();
            return Ok(());
        }
    };
    let id = state.id().ok_or_else(|| ProxyError::Bootstrap("no SVID".into()))?;
    let td = id.trust_domain();
    state.telemetry.set_identity(id.clone());
    state.tls.store(Some(Arc::new(TlsState::new(bundle, td, state.creds.clone())?)));
    tokio::spawn(svid::renew_loop(state.clone(), authed.clone(), anon, origin));
    tokio::spawn(link::watch_loop(state.clone(), authed));
    if !first_policy(&state, &mut shutdown).await {
        return Ok(());
    }
    for (spec, l) in listeners.inbound {
        let app = spec.app.map_or_else(
            || "the original destination (the address and port the caller dialled)".into(),
            |a| a.to_string(),
        );
        tracing::info!(listen = %spec.listen, %app, "inbound listener");
        tokio::spawn(inbound::serve(state.clone(), spec, l));
    }
    if let Some(l) = listeners.outbound {
        let listen = l.local_addr().map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
        tracing::info!(%listen, "transparent outbound listener");
        tokio::spawn(outbound::serve_transparent(state.clone(), l));
    }
    for (route, l) in listeners.routes {
        tracing::info!(listen = %route.listen, peer = %route.peer, id = %route.identity, "outbound route");
        tokio::spawn(outbound::serve_route(state.clone(), route, l));
    }
    tracing::info!(identity = %id, "proxy running");
    shutdown.await;
    drain(&state).await;
    state.telemetry.shutdown(TELEMETRY_FLUSH).await;
    Ok(())
}

/// Waits, up to `--first-policy-timeout`, for the first policy before the data listeners accept:
/// the watch stream brings it (and the endpoint registry) a few milliseconds after the SVID,
/// and a connection taken in between would be denied for no policy — an app starting with
/// its sidecar saw resets, and a mesh peer was judged as egress. Callers wait in the listen
/// backlog meanwhile. With no control plane answering, the listeners accept after the wait
/// and deny everything (fail closed, with its own reason) rather than leave callers hanging.
/// `false` when the proxy was told to stop meanwhile.
async fn first_policy(state: &ProxyState, shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>) -> bool {
    if state.config.first_policy_timeout.is_zero() {
        return true;
    }
    tokio::select! {
        biased;
        () = state.first_policy.cancelled() => true,
        () = tokio::time::sleep(state.config.first_policy_timeout) => {
            tracing::warn!(
                waited = ?state.config.first_policy_timeout,
                "no policy from the control plane yet; accepting connections and denying them until one arrives (fail closed)"
            );
            true
        }
        () = shutdown.as_mut() => {
            state.shutdown.cancel();
            false
        }
    }
}

/// Stops accepting and waits for open connections to finish, up to the drain timeout.
async fn drain(state: &ProxyState) {
    state.shutdown.cancel();
    let deadline = Instant::now() + state.config.drain_timeout;
    tracing::info!(timeout = ?state.config.drain_timeout, "draining");
    let mut open = state.metrics.open_connections_total();
    while open > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
        open = state.metrics.open_connections_total();
    }
    if open == 0 && Instant::now() < deadline {
        tracing::info!("drained");
    } else if open == 0 {
        // Each connection also stops itself at the deadline, and may beat this loop to it.
        tracing::warn!(timeout = ?state.config.drain_timeout, "drain timeout reached; connections still open were cut off");
    } else {
        // Exiting now closes them, requests in flight included: say so, not "drained".
        tracing::warn!(
            open,
            timeout = ?state.config.drain_timeout,
            "drain timeout reached with {open} connection(s) still open; cutting them off, requests in flight included"
        );
    }
}
