//! `trellis-proxy`: the sidecar data plane (`trellis proxy run`, `trellis proxy init`),
//! DESIGN.md §5.
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

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("trust bundle: {0}")]
    Bundle(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("control plane: {0}")]
    Control(#[from] trellis_control::ClientError),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("TLS: {0}")]
    Tls(#[from] trellis_identity::TlsError),
    #[error("telemetry: {0}")]
    Telemetry(#[from] telemetry::TelemetryError),
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

async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr).await.map_err(|source| ProxyError::Listen { addr, source })
}

async fn bind_all(config: &ProxyConfig) -> Result<Listeners, ProxyError> {
    let admin = bind(config.admin).await?;
    let mut inbound = Vec::new();
    for spec in &config.inbound {
        inbound.push((spec.clone(), bind(spec.listen).await?));
    }
    let outbound = match config.outbound {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let mut routes = Vec::new();
    for r in &config.routes {
        routes.push((r.clone(), bind(r.listen).await?));
    }
    Ok(Listeners { admin, inbound, outbound, routes })
}

/// Runs the sidecar until `shutdown` resolves, then drains for up to the drain timeout.
pub async fn run(config: ProxyConfig, shutdown: impl Future<Output = ()>) -> Result<(), ProxyError> {
    let bundle = TrustBundle::from_pem(config.bundle_pem.as_bytes()).map_err(|e| ProxyError::Bundle(e.to_string()))?;
    let listeners = bind_all(&config).await?;
    let anon = ControlClient::new(&config.control_url, &bundle, None, None, None)?;
    let creds = CredentialStore::new();
    let metrics = metrics::Metrics::new();
    let telemetry = telemetry::Telemetry::start(&config.telemetry, &metrics)?;
    let authed = ControlClient::new(&config.control_url, &bundle, None, Some(creds.clone()), None)?;
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
        pools: pool::PeerPools::default(),
        app: app::AppClients::default(),
    });
    tokio::spawn(admin::serve(state.clone(), listeners.admin));
    tokio::spawn(trim::trim_loop(state.clone()));
    tokio::pin!(shutdown);

    tokio::select! {
        r = svid::obtain(&state, &anon) => r?,
        () = &mut shutdown => {
            state.shutdown.cancel();
            return Ok(());
        }
    }
    let id = state.id().ok_or_else(|| ProxyError::Bootstrap("no SVID".into()))?;
    let td = id.trust_domain();
    state.telemetry.set_identity(id);
    state.tls.store(Some(Arc::new(TlsState::new(bundle, td, state.creds.clone())?)));
    tokio::spawn(svid::renew_loop(state.clone(), authed.clone(), anon));
    tokio::spawn(link::watch_loop(state.clone(), authed));
    for (spec, l) in listeners.inbound {
        tracing::info!(listen = %spec.listen, app = ?spec.app, "inbound listener");
        tokio::spawn(inbound::serve(state.clone(), spec, l));
    }
    if let Some(l) = listeners.outbound {
        tracing::info!(listen = ?l.local_addr().ok(), "transparent outbound listener");
        tokio::spawn(outbound::serve_transparent(state.clone(), l));
    }
    for (route, l) in listeners.routes {
        tracing::info!(listen = %route.listen, peer = %route.peer, id = %route.identity, "outbound route");
        tokio::spawn(outbound::serve_route(state.clone(), route, l));
    }
    tracing::info!(identity = ?state.id(), "proxy running");
    shutdown.await;
    drain(&state).await;
    state.telemetry.shutdown(TELEMETRY_FLUSH).await;
    Ok(())
}

/// Stops accepting and waits for open connections to finish, up to the drain timeout.
async fn drain(state: &ProxyState) {
    state.shutdown.cancel();
    let deadline = Instant::now() + state.config.drain_timeout;
    tracing::info!(timeout = ?state.config.drain_timeout, "draining");
    while Instant::now() < deadline {
        let open: i64 = ["inbound", "outbound"]
            .iter()
            .map(|d| state.metrics.open_connections.get_or_create(&metrics::DirectionLabels { direction: d }).get())
            .sum();
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tracing::info!("drained");
}
