//! `trellis proxy ...`: the sidecar (`run`) and its capture rules (`init`).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use trellis_identity::TrustBundle;
use trellis_policy::Action;
use trellis_proxy::config::{
    Attestation, InboundSpec, ProxyConfig, RouteSpec, parse_app_probes, parse_inbound, parse_otlp_endpoint,
    parse_ports, parse_route, parse_sample_ratio,
};
use trellis_proxy::probes::AppProbes;
use trellis_proxy::telemetry::{FlowLogTarget, OtlpProtocol, TelemetryConfig};

use super::remote::{DEFAULT_CONTROL, parse_duration_within, parse_header_timeout};

#[derive(Debug, clap::Subcommand)]
pub enum ProxyCommand {
    /// Run the sidecar: mTLS in and out, policy on every connection and request.
    Run(Box<RunArgs>),
    /// Install nftables rules that send the pod's TCP traffic through the sidecar
    /// (run as the init container, with NET_ADMIN).
    Init(super::proxy_init::InitArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Control plane URL.
    #[arg(long, env = "TRELLIS_CONTROL", default_value = DEFAULT_CONTROL)]
    control: String,
    /// Trust bundle (PEM file) from the control plane.
    #[arg(long, env = "TRELLIS_CA_BUNDLE")]
    ca_bundle: Option<PathBuf>,
    /// The trust bundle PEM itself (what Kubernetes injection sets).
    #[arg(long, env = "TRELLIS_CA_BUNDLE_PEM", hide_env_values = true, conflicts_with = "ca_bundle")]
    ca_bundle_pem: Option<String>,
    /// A join token (single use; see `trellis token create`).
    #[arg(long, env = "TRELLIS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the join token.
    #[arg(long, env = "TRELLIS_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// A projected Kubernetes ServiceAccount token file (audience `trellis`).
    #[arg(long, env = "TRELLIS_K8S_TOKEN_FILE", conflicts_with_all = ["token", "token_file"])]
    k8s_token_file: Option<PathBuf>,
    /// Inbound listener: LISTEN=APP (forward to APP) or LISTEN (transparent). Repeatable.
    /// With no --inbound, --outbound or --route at all (transparent capture): 0.0.0.0:15006.
    #[arg(long, env = "TRELLIS_INBOUND", value_delimiter = ',', value_parser = parse_inbound)]
    inbound: Vec<InboundSpec>,
    /// Transparent outbound listener (destinations from SO_ORIGINAL_DST). With no --inbound,
    /// --outbound or --route at all (transparent capture): 127.0.0.1:15001.
    #[arg(long, env = "TRELLIS_OUTBOUND")]
    outbound: Option<SocketAddr>,
    /// Explicit outbound route LISTEN=PEER,SPIFFE_ID (VM mode). Repeatable.
    #[arg(long, env = "TRELLIS_ROUTE", value_delimiter = ';', value_parser = parse_route)]
    route: Vec<RouteSpec>,
    /// Admin listener: /live /ready /metrics /config.
    #[arg(long, env = "TRELLIS_ADMIN", default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// The app's kubelet probes to run on the admin listener at /app-health/<container>/<kind>,
    /// as JSON (written by `trellis inject`; see docs/kubernetes.md).
    #[arg(long, env = "TRELLIS_APP_PROBES", value_name = "JSON", value_parser = parse_app_probes)]
    app_probes: Option<AppProbes>,
    /// Ports never sniffed for HTTP (server-speaks-first protocols), e.g. 3306,25 (MySQL, SMTP).
    #[arg(long, env = "TRELLIS_OPAQUE_PORTS", value_parser = parse_ports, default_value = "")]
    opaque_ports: BTreeSet<u16>,
    /// Worker threads (1 = a single-threaded runtime, the smallest footprint).
    #[arg(long, env = "TRELLIS_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Ready sockets handled per poll of the event loop (a burst larger than this leaves in
    /// several waves, so the next hop starts on the first while this one reads the rest).
    #[arg(long, env = "TRELLIS_EVENTS_PER_POLL", value_name = "N", default_value_t = 12,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    events_per_poll: u16,
    /// What mesh flows no policy rule matches get (allow only while onboarding).
    #[arg(long, env = "TRELLIS_DEFAULT_ACTION", default_value = "deny", value_parser = ["deny", "allow"])]
    default_action: String,
    /// This workload's IP, registered in the control plane's endpoint registry.
    #[arg(long, env = "TRELLIS_ADVERTISE_IP")]
    advertise_ip: Option<IpAddr>,
    /// Keep the SVID here across restarts (a join token works only once).
    #[arg(long, env = "TRELLIS_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// How long to wait for a client's first bytes before treating it as opaque TCP
    /// (1ms to 1m: sniffing is meant to be short).
    #[arg(long, env = "TRELLIS_DETECT_TIMEOUT", default_value = "1s", value_parser = parse_detect_timeout)]
    detect_timeout: Duration,
    /// How long in-flight requests get to finish after SIGTERM (0 to 1h).
    #[arg(long, env = "TRELLIS_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_drain_timeout)]
    drain_timeout: Duration,
    /// At start, how long the data listeners wait for the first policy before accepting
    /// (callers wait in the listen backlog; then, with none, every flow is denied: fail
    /// closed). 0 accepts at once (0 to 10m).
    #[arg(long, env = "TRELLIS_FIRST_POLICY_TIMEOUT", default_value = "5s", value_parser = parse_first_policy_timeout)]
    first_policy_timeout: Duration,
    /// How long a client may take to send a request's headers, from their first byte (slowloris
    /// guard; 1ms to 1h). An HTTP/1.1 connection idle between requests is closed after 1h.
    #[arg(long, env = "TRELLIS_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_header_timeout)]
    header_timeout: Duration,
    /// OTLP collector to send spans to (plaintext), e.g. http://127.0.0.1:4317 for gRPC or
    /// http://127.0.0.1:4318 for HTTP (spans are posted to <URL>/v1/traces).
    #[arg(long, env = "TRELLIS_OTLP_ENDPOINT", value_parser = parse_otlp_endpoint)]
    otlp_endpoint: Option<String>,
    /// OTLP transport: grpc, or http (protobuf over HTTP).
    #[arg(long, env = "TRELLIS_OTLP_PROTOCOL", default_value = "grpc", value_parser = ["grpc", "http"],
          requires = "otlp_endpoint")]
    otlp_protocol: String,
    /// Share of allowed flows whose spans are exported, 0 to 1. Denied, audit-deny and
    /// failed flows are always exported.
    #[arg(long, env = "TRELLIS_TRACE_SAMPLE_RATIO", default_value = "1.0", value_parser = parse_sample_ratio)]
    trace_sample_ratio: f64,
    /// Without an OTLP endpoint: append spans to this file as JSON lines.
    #[arg(long, env = "TRELLIS_TRACE_FILE", conflicts_with = "otlp_endpoint")]
    trace_file: Option<PathBuf>,
    /// Structured flow log, one JSON line per flow (for SIEMs): `-` for stdout, or a file.
    #[arg(long, env = "TRELLIS_FLOW_LOG")]
    flow_log: Option<PathBuf>,
    /// Spans (and flow-log lines) waiting to be exported before new ones are dropped and
    /// counted in trellis_spans_dropped_total.
    #[arg(long, env = "TRELLIS_TRACE_QUEUE_SIZE", default_value_t = 16384,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    trace_queue_size: u32,
    /// In Kubernetes, the pod's name: the spans' `k8s.pod.name` resource attribute (`trellis
    /// inject` sets the variable from the downward API).
    #[arg(long, env = "TRELLIS_POD_NAME")]
    pod_name: Option<String>,
    /// In Kubernetes, the pod's namespace: the spans' `k8s.namespace.name`.
    #[arg(long, env = "TRELLIS_POD_NAMESPACE")]
    pod_namespace: Option<String>,
}

fn telemetry(args: &RunArgs) -> TelemetryConfig {
    TelemetryConfig {
        otlp_endpoint: args.otlp_endpoint.clone(),
        otlp_protocol: if args.otlp_protocol == "http" { OtlpProtocol::Http } else { OtlpProtocol::Grpc },
        trace_file: args.trace_file.clone(),
        sample_ratio: args.trace_sample_ratio,
        flow_log: args
            .flow_log
            .as_ref()
            .map(|p| if p.as_os_str() == "-" { FlowLogTarget::Stdout } else { FlowLogTarget::File(p.clone()) }),
        queue_size: args.trace_queue_size as usize,
        resource: [("k8s.pod.name", &args.pod_name), ("k8s.namespace.name", &args.pod_namespace)]
            .into_iter()
            .filter_map(|(key, value)| Some((key, value.clone().filter(|v| !v.is_empty())?)))
            .collect(),
    }
}

pub fn run(cmd: ProxyCommand) -> ExitCode {
    match cmd {
        ProxyCommand::Init(args) => super::proxy_init::run(args),
        ProxyCommand::Run(args) => match run_proxy(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                errln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// How the proxy's event loop runs: its threads and the ready sockets each poll hands out.
struct RuntimeShape {
    workers: usize,
    events_per_poll: u16,
}

fn config(args: RunArgs) -> Result<(ProxyConfig, RuntimeShape)> {
    let telemetry = telemetry(&args);
    let bundle_pem = match (&args.ca_bundle, args.ca_bundle_pem) {
        (Some(path), _) => {
            let pem =
                std::fs::read_to_string(path).with_context(|| format!("reading --ca-bundle {}", path.display()))?;
            // Checked here, where the file's name is known; the proxy only sees the text.
            TrustBundle::from_pem(pem.as_bytes()).with_context(|| format!("--ca-bundle {}", path.display()))?;
            pem
        }
        (None, Some(pem)) => pem,
        (None, None) => bail!("no trust bundle: pass --ca-bundle FILE (TRELLIS_CA_BUNDLE) or TRELLIS_CA_BUNDLE_PEM"),
    };
    let attestation = match (args.token, args.token_file, args.k8s_token_file) {
        (Some(t), _, _) => Attestation::JoinToken(t),
        (None, Some(path), _) => {
            let token =
                std::fs::read_to_string(&path).with_context(|| format!("reading --token-file {}", path.display()))?;
            // With a state dir an emptied file is fine (the kept SVID is used); without one the
            // control plane would only say "unknown token".
            if token.trim().is_empty() && args.state_dir.is_none() {
                bail!(
                    "--token-file {} is empty: write the join token from `trellis token create` into it",
                    path.display()
                );
            }
            Attestation::JoinToken(token)
        }
        (None, None, Some(path)) => Attestation::KubernetesTokenFile(path),
        (None, None, None) if args.state_dir.is_some() => Attestation::JoinToken(String::new()),
        (None, None, None) => {
            bail!(
                "no way to prove identity: pass --token, --token-file or --k8s-token-file (see `trellis token create`)"
            )
        }
    };
    let (inbound, outbound) = listeners(args.inbound, args.outbound, &args.route);
    if args.workers == 0 || args.workers > 64 {
        bail!("--workers must be between 1 and 64");
    }
    let config = ProxyConfig {
        control_url: args.control,
        bundle_pem,
        attestation,
        inbound,
        outbound,
        routes: args.route,
        admin: args.admin,
        opaque_ports: args.opaque_ports,
        app_probes: args.app_probes.unwrap_or_default(),
        default_action: if args.default_action == "allow" { Action::Allow } else { Action::Deny },
        advertise_ip: args.advertise_ip,
        state_dir: args.state_dir,
        detect_timeout: args.detect_timeout,
        drain_timeout: args.drain_timeout,
        first_policy_timeout: args.first_policy_timeout,
        header_timeout: args.header_timeout,
        telemetry,
    };
    Ok((config, RuntimeShape { workers: args.workers, events_per_poll: args.events_per_poll }))
}

fn run_proxy(args: RunArgs) -> Result<()> {
    let (config, shape) = config(args)?;
    let mut rt = if shape.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(shape.workers);
        b
    };
    // tokio hands out up to 1,024 ready sockets per poll. With many app connections the
    // requests (or the app's responses) arrive together, and handled in one poll they leave
    // over the one pooled peer connection as one batch; the processes on the path then take
    // turns and the CPUs idle between turns (~20% of a 2-vCPU VM at peak, benches/RESULTS.md,
    // change 15). A dozen per poll sends a burst on in waves, so the next hop starts on the
    // first while this one reads the rest; at light load a poll has fewer than that anyway.
    rt.max_io_events_per_tick(usize::from(shape.events_per_poll));
    let rt = rt.enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        trellis_proxy::run(config, async {
            super::wait_for_shutdown_signal().await;
            tracing::info!("shutdown signal received; draining (a second signal exits at once)");
            // An operator who cannot wait for the drain (Ctrl-C twice) gets out now.
            tokio::spawn(async {
                super::wait_for_shutdown_signal().await;
                tracing::warn!("second shutdown signal: exiting without finishing the drain");
                std::process::exit(130);
            });
        })
        .await
    })?;
    Ok(())
}

fn parse_detect_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_within(
        s,
        Duration::from_millis(1),
        Duration::from_secs(60),
        "protocol sniffing is meant to be short",
    )
}

fn parse_drain_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_within(s, Duration::ZERO, Duration::from_secs(3600), "time in-flight work gets after SIGTERM")
}

fn parse_first_policy_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_within(s, Duration::ZERO, Duration::from_secs(600), "time the listeners wait for a first policy")
}

/// No listener named at all is transparent capture (`trellis proxy init`'s rules): both of the
/// ports those rules redirect to. Naming any listener (a VM) binds only what is named.
fn listeners(
    inbound: Vec<InboundSpec>,
    outbound: Option<SocketAddr>,
    routes: &[RouteSpec],
) -> (Vec<InboundSpec>, Option<SocketAddr>) {
    if inbound.is_empty() && outbound.is_none() && routes.is_empty() {
        let inbound = InboundSpec { listen: SocketAddr::from(([0, 0, 0, 0], 15006)), app: None };
        return (vec![inbound], Some(SocketAddr::from(([127, 0, 0, 1], 15001))));
    }
    (inbound, outbound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_bounded() {
        assert_eq!(parse_detect_timeout("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_drain_timeout("0"), Ok(Duration::ZERO));
        for bad in [parse_detect_timeout("0"), parse_detect_timeout("9999999999d"), parse_drain_timeout("2h")] {
            assert!(bad.unwrap_err().contains("is outside"));
        }
        assert!(parse_header_timeout("0").unwrap_err().contains("is outside 1ms..=1h"));
        assert_eq!(parse_first_policy_timeout("0"), Ok(Duration::ZERO));
        assert!(parse_first_policy_timeout("11m").unwrap_err().contains("is outside"));
    }

    #[test]
    fn transparent_capture_gets_both_default_listeners_and_a_vm_only_what_it_names() {
        let (inbound, outbound) = listeners(vec![], None, &[]);
        assert_eq!(inbound, [InboundSpec { listen: "0.0.0.0:15006".parse().unwrap(), app: None }]);
        assert_eq!(outbound, Some("127.0.0.1:15001".parse().unwrap()));
        let vm =
            InboundSpec { listen: "127.0.0.1:9000".parse().unwrap(), app: Some("127.0.0.1:8080".parse().unwrap()) };
        assert_eq!(listeners(vec![vm.clone()], None, &[]), (vec![vm], None));
        let route =
            trellis_proxy::config::parse_route("127.0.0.1:9001=10.0.0.12:15006,spiffe://cluster.local/ns/a/sa/b")
                .unwrap();
        assert_eq!(listeners(vec![], None, &[route]), (vec![], None));
    }
}
