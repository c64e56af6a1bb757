//! `trellis control run`: the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use trellis_control::server::Hooks;
use trellis_control::{ControlConfig, start};
use trellis_identity::TrustDomain;

use super::remote::{DEFAULT_DATA_DIR, parse_duration};
use trellis_control::server::{ApiError, WebhookHook};

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
    /// Lifetime of the SVIDs issued to proxies (renewed at half-life).
    #[arg(long, env = "TRELLIS_SVID_TTL", default_value = "1h", value_parser = parse_duration)]
    pub svid_ttl: Duration,
    /// Use this CA certificate (PEM chain up to the root) instead of creating one.
    #[arg(long, env = "TRELLIS_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM).
    #[arg(long, env = "TRELLIS_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Accept Kubernetes projected ServiceAccount tokens, verified with the TokenReview API
    /// (in-cluster config), and issue spiffe://<td>/ns/<namespace>/sa/<serviceaccount>.
    #[arg(long, env = "TRELLIS_K8S_ATTESTATION")]
    pub k8s_attestation: bool,
    /// Serve the sidecar-injection admission webhook at POST /inject.
    #[arg(long, env = "TRELLIS_WEBHOOK")]
    pub webhook: bool,
    /// DNS name the API server calls the webhook by (its serving certificate carries it).
    #[arg(long, env = "TRELLIS_WEBHOOK_DNS_NAME", default_value = "trellis-control.trellis-system.svc")]
    pub webhook_dns_name: Vec<String>,
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
            eprintln!("error: {e:#}");
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
        let mut hooks = hooks(&args)?;
        hooks.webhook = webhook_hook(args.inject_image.clone(), args.inject_control.clone(), args.webhook);
        let config = ControlConfig {
            data_dir: args.data_dir,
            listen: args.listen,
            trust_domain: args.trust_domain.clone(),
            svid_ttl: args.svid_ttl,
            ca_files: args.ca_cert.zip(args.ca_key),
            webhook_dns_names: if args.webhook { args.webhook_dns_name } else { vec![] },
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

/// Kubernetes attestation, when asked for: a TokenReview client from the in-cluster config.
fn hooks(args: &RunArgs) -> Result<Hooks> {
    let mut hooks = Hooks::default();
    if args.k8s_attestation {
        let reviewer = std::sync::Arc::new(
            trellis_control::kube::TokenReviewer::in_cluster()
                .context("--k8s-attestation needs the in-cluster config")?,
        );
        let td = args.trust_domain.clone();
        hooks.k8s_attest = Some(std::sync::Arc::new(move |token: String| {
            let (reviewer, td) = (reviewer.clone(), td.clone());
            Box::pin(async move {
                let who = reviewer
                    .review(&token)
                    .await
                    .map_err(|e| ApiError::unauthorized(format!("Kubernetes token refused: {e}")))?;
                trellis_identity::SpiffeId::workload(&td, &who.namespace, &who.service_account)
                    .map_err(|e| ApiError::forbidden(format!("cannot name this service account as a SPIFFE ID: {e}")))
            })
        }));
    }
    Ok(hooks)
}

/// The injection webhook, using the same code as `trellis inject`; its configuration is
/// rebuilt only when the trust bundle changes.
fn webhook_hook(image: Option<String>, control: String, enabled: bool) -> Option<WebhookHook> {
    if !enabled {
        return None;
    }
    type Cached = Option<(String, std::sync::Arc<trellis_control::inject::InjectConfig>)>;
    let cache: std::sync::Mutex<Cached> = std::sync::Mutex::new(None);
    Some(std::sync::Arc::new(move |body: &[u8], bundle_pem: &str| {
        let cfg = {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            match cache.as_ref() {
                Some((pem, cfg)) if pem == bundle_pem => cfg.clone(),
                _ => {
                    let mut cfg = trellis_control::inject::InjectConfig::new(bundle_pem).map_err(|e| e.to_string())?;
                    if let Some(image) = &image {
                        cfg.image = image.clone();
                    }
                    cfg.control_url = control.clone();
                    cfg.validate().map_err(|e| e.to_string())?;
                    let cfg = std::sync::Arc::new(cfg);
                    *cache = Some((bundle_pem.to_string(), cfg.clone()));
                    cfg
                }
            }
        };
        trellis_control::inject::admission_review(body, &cfg).map_err(|e| e.to_string())
    }))
}
