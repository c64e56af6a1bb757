//! `trellis control run`: the control plane.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use trellis_control::server::Hooks;
use trellis_control::{ControlConfig, start};
use trellis_identity::TrustDomain;

use super::remote::{DEFAULT_DATA_DIR, parse_duration, parse_header_timeout};

#[derive(Debug, clap::Subcommand)]
pub enum ControlCommand {
    /// Run the control plane: CA, SVID issuance, policy store, watch push, admin API.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Where the CA, bundle.pem, admin.token and the store live (created on first start).
    #[arg(long, env = "TRELLIS_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Address the HTTPS API listens on.
    #[arg(long, env = "TRELLIS_LISTEN", default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// SPIFFE trust domain of this mesh.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = "cluster.local", value_parser = TrustDomain::parse)]
    pub trust_domain: TrustDomain,
    /// Lifetime of the SVIDs issued to proxies (renewed at half-life); at most 30 days.
    #[arg(long, env = "TRELLIS_SVID_TTL", default_value = "1h", value_parser = parse_duration)]
    pub svid_ttl: Duration,
    /// How long an API client may take to send a request's headers, stay silent in the middle
    /// of a body, or leave an HTTP/1.1 connection idle between requests (slowloris guard).
    #[arg(long, env = "TRELLIS_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_header_timeout)]
    pub header_timeout: Duration,
    /// Use this CA certificate (PEM chain up to the root) instead of creating one.
    #[arg(long, env = "TRELLIS_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM).
    #[arg(long, env = "TRELLIS_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Accept Kubernetes projected ServiceAccount tokens, verified with the TokenReview API
    /// (in-cluster config), and issue spiffe://<td>/ns/<namespace>/sa/<serviceaccount>; list
    /// Services for the proxies (calls to a ClusterIP reach its endpoints in the mesh).
    #[arg(long, env = "TRELLIS_K8S_ATTESTATION", value_parser = clap::builder::FalseyValueParser::new())]
    pub k8s_attestation: bool,
    /// With --k8s-attestation, outside the cluster: the API server's URL (https://host:port),
    /// instead of the in-cluster KUBERNETES_SERVICE_HOST/PORT.
    #[arg(long, env = "TRELLIS_K8S_API", requires = "k8s_attestation", value_name = "URL")]
    k8s_api: Option<String>,
    /// With --k8s-api: a directory holding `token` (a bearer token, re-read on each call) and
    /// `ca.crt` (the API server's CA), laid out as a pod's service account directory.
    #[arg(long, env = "TRELLIS_K8S_CREDENTIALS", requires = "k8s_api", value_name = "DIR")]
    k8s_credentials: Option<PathBuf>,
    /// Serve the sidecar-injection admission webhook at POST /inject.
    #[arg(long, env = "TRELLIS_WEBHOOK", value_parser = clap::builder::FalseyValueParser::new())]
    pub webhook: bool,
    /// DNS name the API server calls the webhook by (its serving certificate carries it).
    #[arg(long, env = "TRELLIS_WEBHOOK_DNS_NAME", default_value = "trellis-control.trellis-system.svc")]
    pub webhook_dns_name: Vec<String>,
    /// Another DNS name or IP address the API's certificate carries (repeatable), for clients
    /// that check the host name they call, such as curl with `--cacert bundle.pem`:
    /// `localhost` and the --listen address (127.0.0.1 and ::1 for an unspecified one) are
    /// always in it.
    #[arg(long, env = "TRELLIS_TLS_SAN", value_name = "NAME|IP", value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// Image the webhook injects.
    #[arg(long, env = "TRELLIS_INJECT_IMAGE")]
    pub inject_image: Option<String>,
    /// Control plane URL the injected proxies use.
    #[arg(long, env = "TRELLIS_INJECT_CONTROL", default_value = "https://trellis-control.trellis-system.svc:7443")]
    pub inject_control: String,
}

pub fn run(cmd: ControlCommand) -> ExitCode {
    let ControlCommand::Run(args) = cmd;
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: RunArgs) -> Result<()> {
    if args.svid_ttl < Duration::from_secs(10) {
        anyhow::bail!("--svid-ttl must be at least 10s");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        let hooks = hooks(&args)?;
        let serving_names = serving_names(&args)?;
        let config = ControlConfig {
            data_dir: args.data_dir,
            listen: args.listen,
            trust_domain: args.trust_domain.clone(),
            svid_ttl: args.svid_ttl,
            ca_files: args.ca_cert.zip(args.ca_key),
            serving_names,
            header_timeout: args.header_timeout,
        };
        let running = start(config, hooks).await?;
        // A closed stdout (`| head -1`) must not take the control plane down: ignore write errors.
        let banner = format!(
            "trellis control plane listening on {}\n  trust domain:    {}\n  CA fingerprint:  SHA256 {}\n  trust bundle:    {}\n  admin token:     {}\n",
            running.url,
            running.trust_domain,
            running.ca_fingerprint,
            running.bundle_path.display(),
            running.admin_token_path.display()
        );
        let mut out = std::io::stdout().lock();
        let _ = std::io::Write::write_all(&mut out, banner.as_bytes()).and_then(|()| std::io::Write::flush(&mut out));
        drop(out);
        super::wait_for_shutdown_signal().await;
        tracing::info!("shutting down");
        running.shutdown().await;
        Ok(())
    })
}

/// The names the API's serving certificate carries besides its SPIFFE ID: the webhook's DNS
/// names (with the webhook on), `localhost`, the listen address and `--tls-san`.
fn serving_names(args: &RunArgs) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    if args.webhook {
        for name in &args.webhook_dns_name {
            trellis_identity::pki_types::DnsName::try_from(name.as_str()).map_err(|_| {
                anyhow::anyhow!("--webhook-dns-name {name:?} is not a DNS name the API server could call")
            })?;
            names.push(name.clone());
        }
    }
    names.push("localhost".into());
    match args.listen.ip() {
        ip if ip.is_unspecified() => names.extend(["127.0.0.1".into(), "::1".into()]),
        ip => names.push(ip.to_string()),
    }
    for san in &args.tls_san {
        let san = san.trim();
        let is_ip = san.parse::<std::net::IpAddr>().is_ok();
        if !is_ip && trellis_identity::pki_types::DnsName::try_from(san).is_err() {
            anyhow::bail!("--tls-san {san:?} is neither a DNS name nor an IP address");
        }
        names.push(san.to_ascii_lowercase());
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    Ok(names)
}

/// Kubernetes attestation and the injection webhook, when asked for.
fn hooks(args: &RunArgs) -> Result<Hooks> {
    let mut hooks = Hooks { release_memory: Some(trellis_proxy::trim::release_free_memory), ..Hooks::default() };
    if args.k8s_attestation {
        let reviewer = match &args.k8s_api {
            Some(url) => {
                let dir =
                    args.k8s_credentials.as_deref().unwrap_or(Path::new(trellis_control::kube::SERVICE_ACCOUNT_DIR));
                trellis_control::kube::TokenReviewer::at_url(url, dir).context("--k8s-api")?
            }
            None => trellis_control::kube::TokenReviewer::in_cluster()
                .context("--k8s-attestation needs the in-cluster config (or --k8s-api)")?,
        };
        // The same client lists Services, so calls to a ClusterIP reach the mesh.
        hooks.k8s_services = Some(reviewer.clone());
        hooks.k8s_attest = Some(trellis_control::hooks::k8s_attestation(reviewer, args.trust_domain.clone()));
    }
    if args.webhook {
        // Refused here, not on every admission request: with the webhook's `failurePolicy:
        // Ignore`, a bad setting would let every pod start without its sidecar, silently.
        let image = args.inject_image.clone().unwrap_or_else(trellis_control::inject::default_image);
        trellis_control::inject::check_settings(&image, &args.inject_control)
            .context("--inject-image / --inject-control")?;
        hooks.webhook = Some(trellis_control::hooks::injection_webhook(
            args.inject_image.clone(),
            Some(args.inject_control.clone()),
        ));
    }
    Ok(hooks)
}
