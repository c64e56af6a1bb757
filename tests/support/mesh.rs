//! The two-sidecar mesh most end-to-end tests drive: a control plane, api's sidecar in front
//! of an HTTP backend and a TCP backend (opaque), and web's sidecar with a route to each.
//!
//! web's app → web's outbound route → mTLS → api's inbound → api's backend.

use std::net::SocketAddr;

use super::{Control, Sidecar, addr, backends, free_port};

pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

pub struct Mesh {
    pub control: Control,
    pub api: Sidecar,
    pub web: Sidecar,
    /// web's route listener for api's HTTP port.
    pub http: SocketAddr,
    /// web's route listener for api's TCP port.
    pub tcp: SocketAddr,
    pub api_http_inbound: SocketAddr,
    pub api_tcp_inbound: SocketAddr,
    pub backend: SocketAddr,
    pub tcp_backend: SocketAddr,
}

/// How a test wants its mesh.
pub struct MeshOptions<'a> {
    /// Flags for `trellis control run`.
    pub control_args: &'a [&'a str],
    /// The policies to apply, given the HTTP and TCP backends' addresses.
    pub policy: &'a dyn Fn(SocketAddr, SocketAddr) -> String,
    /// What api's opaque TCP port forwards to.
    pub tcp_backend: SocketAddr,
    /// Extra flags for the sidecar named `"api"` or `"web"`.
    pub extra: &'a dyn Fn(&str) -> Vec<String>,
}

pub async fn start_mesh(o: MeshOptions<'_>) -> Mesh {
    let backend = backends::http_echo().await;
    let tcp_backend = o.tcp_backend;
    let control = Control::start(o.control_args);
    control.apply(&(o.policy)(backend, tcp_backend)).await;
    let api_http_inbound = addr(free_port());
    let api_tcp_inbound = addr(free_port());
    let mut args = vec![
        "--inbound".to_string(),
        format!("{api_http_inbound}={backend}"),
        "--inbound".to_string(),
        format!("{api_tcp_inbound}={tcp_backend}"),
        "--opaque-ports".to_string(),
        tcp_backend.port().to_string(),
    ];
    args.extend((o.extra)("api"));
    let api = Sidecar::start(&control, API, &args);
    let (http, tcp) = (addr(free_port()), addr(free_port()));
    let mut args = vec![
        "--route".to_string(),
        format!("{http}={api_http_inbound},{API}"),
        "--route".to_string(),
        format!("{tcp}={api_tcp_inbound},{API}"),
        "--opaque-ports".to_string(),
        tcp.port().to_string(),
    ];
    args.extend((o.extra)("web"));
    let web = Sidecar::start(&control, WEB, &args);
    Mesh { control, api, web, http, tcp, api_http_inbound, api_tcp_inbound, backend, tcp_backend }
}

/// A control plane and the two sidecars in front of one `app`, which web may call with GET
/// and POST: web's route → api's inbound → `app`.
pub struct AppPair {
    pub control: Control,
    pub api: Sidecar,
    pub web: Sidecar,
    /// web's route listener.
    pub route: SocketAddr,
    /// api's inbound listener.
    pub inbound: SocketAddr,
    pub app: SocketAddr,
}

impl AppPair {
    pub async fn start(app: SocketAddr) -> AppPair {
        Self::start_with(app, &[], &[]).await
    }

    /// [`AppPair::start`] with extra flags for api's and web's sidecars (`--trace-file`, say).
    pub async fn start_with(app: SocketAddr, api_args: &[String], web_args: &[String]) -> AppPair {
        let control = Control::start(&[]);
        let to = format!("      to:\n        - ports: [{}]\n          methods: [GET, POST]\n", app.port());
        control.apply(&super::allow("app-from-web", API, WEB, &to)).await;
        let inbound = addr(free_port());
        let mut args = vec!["--inbound".into(), format!("{inbound}={app}")];
        args.extend_from_slice(api_args);
        let api = Sidecar::start(&control, API, &args);
        let route = addr(free_port());
        let mut args = vec!["--route".into(), format!("{route}={inbound},{API}")];
        args.extend_from_slice(web_args);
        let web = Sidecar::start(&control, WEB, &args);
        AppPair { control, api, web, route, inbound, app }
    }

    /// Starts api's sidecar (again, after a restart) on the same inbound address.
    pub fn start_api(control: &Control, inbound: SocketAddr, app: SocketAddr) -> Sidecar {
        Sidecar::start(control, API, &["--inbound".into(), format!("{inbound}={app}")])
    }
}
