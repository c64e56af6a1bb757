//! The proxy's configuration: what `trellis proxy run` parsed, in types the data plane uses.
//!
//! The binary fills a [`ProxyConfig`] from flags and environment; nothing in here reads
//! either. Parsing helpers for the flag syntaxes (`LISTEN[=APP]`, `LISTEN=PEER,SPIFFE_ID`)
//! live here so the tests and the CLI share them.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use trellis_identity::SpiffeId;
use trellis_policy::Action;

/// One inbound listener: mTLS from peers, forwarded to the local app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboundSpec {
    pub listen: SocketAddr,
    /// The app's address; `None` = transparent (the original destination port, on loopback).
    pub app: Option<SocketAddr>,
}

/// One explicit outbound route (VM mode): plaintext from the app, mTLS to `peer`, which
/// must prove it is `identity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteSpec {
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    pub identity: SpiffeId,
}

/// How the proxy proves who it is the first time.
#[derive(Debug, Clone)]
pub enum Attestation {
    JoinToken(String),
    /// A file holding a projected Kubernetes ServiceAccount token (re-read on each use: the
    /// kubelet rotates it).
    KubernetesTokenFile(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub control_url: String,
    /// The trust bundle PEM (from `--ca-bundle FILE` or `TRELLIS_CA_BUNDLE_PEM`).
    pub bundle_pem: String,
    pub attestation: Attestation,
    pub inbound: Vec<InboundSpec>,
    pub outbound: Option<SocketAddr>,
    pub routes: Vec<RouteSpec>,
    pub admin: SocketAddr,
    /// Ports never sniffed for HTTP: app ports inbound, destination (or route) ports outbound.
    pub opaque_ports: BTreeSet<u16>,
    /// The app's kubelet probes, served on the admin listener (`probes.rs`).
    pub app_probes: crate::probes::AppProbes,
    pub default_action: Action,
    /// Registered in the control plane's endpoint registry (with the inbound ports).
    pub advertise_ip: Option<IpAddr>,
    /// Where to keep the SVID across restarts (a join token works only once).
    pub state_dir: Option<PathBuf>,
    pub detect_timeout: Duration,
    pub drain_timeout: Duration,
    /// How long the data listeners wait for the first policy before accepting anyway.
    pub first_policy_timeout: Duration,
    /// Time a client has to send a request's headers (slowloris guard).
    pub header_timeout: Duration,
    /// Spans, export and flow log.
    pub telemetry: crate::telemetry::TelemetryConfig,
}

impl ProxyConfig {
    pub fn is_opaque(&self, port: u16) -> bool {
        self.opaque_ports.contains(&port)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// An empty item of a list (`TRELLIS_ROUTE="a;b;"`, `TRELLIS_INBOUND="a,,b"`).
    #[error("an empty {0} (a separator at the end of the list, or two in a row?)")]
    Empty(&'static str),
    #[error("{0:?}: expected LISTEN or LISTEN=APP with addresses like 0.0.0.0:15006=127.0.0.1:8080")]
    Inbound(String),
    #[error(
        "{0:?}: expected LISTEN=PEER,SPIFFE_ID, e.g. 127.0.0.1:9001=10.0.0.12:15006,spiffe://cluster.local/ns/prod/sa/db"
    )]
    Route(String),
    #[error("{spec:?}: {reason}")]
    RouteIdentity { spec: String, reason: String },
    /// LISTEN or PEER is not an IP:PORT; `which` names it, `value` is what was given.
    #[error(
        "{spec:?}: {which} {value:?} must be an IP:PORT like 10.0.0.12:15006 (hostnames are not resolved: the peer \
         is dialed at exactly this address and must prove the SPIFFE ID)"
    )]
    RouteAddress { spec: String, which: &'static str, value: String },
    #[error("{0:?} is not a port list like 5432,6379 or 9000-9010")]
    Ports(String),
    #[error("{spec:?}: {reason}")]
    OtlpEndpoint { spec: String, reason: &'static str },
    #[error("{0:?} is not a sample ratio: expected a number from 0 to 1, like 0.1")]
    SampleRatio(String),
}

/// `http://HOST:PORT[/PATH]`, the OTLP collector's base URL. Plaintext only: Trellis builds
/// no TLS stack for the collector (one rustls provider, for the mesh), so a collector
/// behind TLS is reached through a local agent.
pub fn parse_otlp_endpoint(s: &str) -> Result<String, SpecError> {
    let err = |reason| SpecError::OtlpEndpoint { spec: s.to_string(), reason };
    let uri: http::Uri = s.trim().parse().map_err(|_| err("not a URL like http://127.0.0.1:4317"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(err(
                "TLS to the collector is not supported; use http:// (a collector or agent on this host or node)",
            ));
        }
        _ => return Err(err("expected an http:// URL like http://127.0.0.1:4317")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(err("the URL has no host"));
    }
    if uri.query().is_some() {
        return Err(err("the URL must not have a query"));
    }
    if uri.authority().and_then(|a| trellis_control::client::authority_port(a, 80)).is_none() {
        return Err(err("the port is not a number from 1 to 65535"));
    }
    // OTLP carries no credentials in the URL, and `/config` shows the endpoint as given.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(err("the URL must not carry credentials (user:password@)"));
    }
    Ok(s.trim().trim_end_matches('/').to_string())
}

/// A ratio in `0..=1`.
pub fn parse_sample_ratio(s: &str) -> Result<f64, SpecError> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(SpecError::SampleRatio(s.to_string())),
    }
}

pub fn parse_inbound(s: &str) -> Result<InboundSpec, SpecError> {
    if s.trim().is_empty() {
        return Err(SpecError::Empty("inbound listener"));
    }
    let err = || SpecError::Inbound(s.to_string());
    match s.split_once('=') {
        Some((listen, app)) => Ok(InboundSpec {
            listen: listen.trim().parse().map_err(|_| err())?,
            app: Some(app.trim().parse().map_err(|_| err())?),
        }),
        None => Ok(InboundSpec { listen: s.trim().parse().map_err(|_| err())?, app: None }),
    }
}

pub fn parse_route(s: &str) -> Result<RouteSpec, SpecError> {
    if s.trim().is_empty() {
        return Err(SpecError::Empty("route"));
    }
    let err = || SpecError::Route(s.to_string());
    let (listen, rest) = s.split_once('=').ok_or_else(err)?;
    let (peer, id) = rest.split_once(',').ok_or_else(err)?;
    let identity = SpiffeId::parse(id.trim())
        .map_err(|e| SpecError::RouteIdentity { spec: s.to_string(), reason: e.to_string() })?;
    let addr = |which: &'static str, value: &str| {
        value.trim().parse().map_err(|_| SpecError::RouteAddress {
            spec: s.to_string(),
            which,
            value: value.trim().to_string(),
        })
    };
    Ok(RouteSpec { listen: addr("LISTEN", listen)?, peer: addr("PEER", peer)?, identity })
}

/// `5432,6379,9000-9010`.
/// `--app-probes`: the JSON `trellis inject` writes (`probes.rs`).
pub fn parse_app_probes(s: &str) -> Result<crate::probes::AppProbes, String> {
    crate::probes::parse(s)
}

pub fn parse_ports(s: &str) -> Result<BTreeSet<u16>, SpecError> {
    let err = || SpecError::Ports(s.to_string());
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u16>().map_err(|_| err())?, b.parse::<u16>().map_err(|_| err())?),
            None => {
                let p = part.parse::<u16>().map_err(|_| err())?;
                (p, p)
            }
        };
        if lo == 0 || lo > hi {
            return Err(err());
        }
        out.extend(lo..=hi);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_specs() {
        assert_eq!(
            parse_inbound("0.0.0.0:15006=127.0.0.1:8080").unwrap(),
            InboundSpec { listen: "0.0.0.0:15006".parse().unwrap(), app: Some("127.0.0.1:8080".parse().unwrap()) }
        );
        assert_eq!(parse_inbound("0.0.0.0:15006").unwrap().app, None);
        assert!(parse_inbound("15006=8080").is_err());
        assert!(parse_inbound("0.0.0.0:15006=").is_err());
        assert_eq!(parse_inbound(" "), Err(SpecError::Empty("inbound listener")));
        assert_eq!(parse_route(""), Err(SpecError::Empty("route")));
    }

    #[test]
    fn route_specs() {
        let r = parse_route("127.0.0.1:9001=10.0.0.12:15006,spiffe://cluster.local/ns/prod/sa/db").unwrap();
        assert_eq!(r.peer, "10.0.0.12:15006".parse().unwrap());
        assert_eq!(r.identity.as_str(), "spiffe://cluster.local/ns/prod/sa/db");
        assert!(matches!(parse_route("127.0.0.1:9001=10.0.0.12:15006"), Err(SpecError::Route(_))));
        let by_name = parse_route("127.0.0.1:27301=localhost:27006,spiffe://cluster.local/ns/shop/sa/api").unwrap_err();
        assert!(matches!(by_name, SpecError::RouteAddress { which: "PEER", .. }), "{by_name:?}");
        let text = by_name.to_string();
        assert!(
            text.contains("PEER \"localhost:27006\" must be an IP:PORT") && text.contains("not resolved"),
            "{text}"
        );
        let listen = parse_route("27301=10.0.0.12:15006,spiffe://cluster.local/ns/shop/sa/api").unwrap_err();
        assert!(matches!(listen, SpecError::RouteAddress { which: "LISTEN", .. }), "{listen:?}");
        assert!(matches!(
            parse_route("127.0.0.1:9001=10.0.0.12:15006,spiffe://x/a/"),
            Err(SpecError::RouteIdentity { .. })
        ));
    }

    #[test]
    fn otlp_endpoints_and_ratios() {
        assert_eq!(parse_otlp_endpoint("http://127.0.0.1:4317/").unwrap(), "http://127.0.0.1:4317");
        assert_eq!(parse_otlp_endpoint("http://otel:4318/base").unwrap(), "http://otel:4318/base");
        for bad in [
            "https://otel:4317",
            "otel:4317",
            "ftp://x",
            "http://",
            "not a url",
            "http://x:1/?a=b",
            "http://u:p@x:1",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:abc",
            "http://127.0.0.1:",
            "http://127.0.0.1:0",
        ] {
            assert!(matches!(parse_otlp_endpoint(bad), Err(SpecError::OtlpEndpoint { .. })), "{bad}");
        }
        assert_eq!(parse_sample_ratio("0.25").unwrap(), 0.25);
        assert_eq!(parse_sample_ratio("1").unwrap(), 1.0);
        for bad in ["1.5", "-0.1", "NaN", "half", ""] {
            assert!(parse_sample_ratio(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn port_lists() {
        assert_eq!(parse_ports("5432, 9000-9002").unwrap().into_iter().collect::<Vec<_>>(), [5432, 9000, 9001, 9002]);
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("9-3").is_err());
        assert!(parse_ports("http").is_err());
        assert!(parse_ports("").unwrap().is_empty());
    }
}
