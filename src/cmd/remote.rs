//! Flags shared by every command that talks to a control plane, and the client they build.
//!
//! The control plane defaults to `https://127.0.0.1:7443` ([`DEFAULT_CONTROL`]), a control
//! plane on the same host; one convenience more: when `--ca-bundle` or the admin token is not
//! given, the files a control plane started in the
//! same directory wrote (`./trellis-data/bundle.pem`, `./trellis-data/admin.token`) are used
//! if they exist, so `trellis control run` and `trellis token create` work side by side with
//! no flags.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use trellis_control::ControlClient;
use trellis_identity::TrustBundle;

pub const DEFAULT_CONTROL: &str = "https://127.0.0.1:7443";
pub const DEFAULT_DATA_DIR: &str = "trellis-data";

#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// Control plane URL.
    #[arg(long = "control", env = "TRELLIS_CONTROL", default_value = DEFAULT_CONTROL)]
    pub url: String,
    /// Trust bundle (PEM) to verify the control plane with [default: ./trellis-data/bundle.pem if present].
    #[arg(long, env = "TRELLIS_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// File holding the admin token [default: ./trellis-data/admin.token if present].
    #[arg(long, env = "TRELLIS_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The admin token itself (prefer the file or the environment over the command line).
    #[arg(long, env = "TRELLIS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

impl ControlArgs {
    pub fn bundle(&self) -> Result<TrustBundle> {
        let path = match &self.ca_bundle {
            Some(p) => p.clone(),
            None => {
                let local = PathBuf::from(DEFAULT_DATA_DIR).join("bundle.pem");
                if !local.exists() {
                    bail!(
                        "no trust bundle: pass --ca-bundle FILE (or set TRELLIS_CA_BUNDLE) to the control plane's bundle.pem"
                    );
                }
                local
            }
        };
        // The bundle's own error names the file.
        TrustBundle::load(&path).context("reading the trust bundle")
    }
}

impl AdminArgs {
    pub fn token(&self) -> Result<String> {
        if let (Some(_), Some(file)) = (&self.admin_token, &self.admin_token_file) {
            bail!(
                "the admin token is given twice: --admin-token (TRELLIS_ADMIN_TOKEN) and --admin-token-file {} \
                 (TRELLIS_ADMIN_TOKEN_FILE); give one",
                file.display()
            );
        }
        if let Some(t) = &self.admin_token {
            return checked_token(t.trim(), "--admin-token");
        }
        let path = match &self.admin_token_file {
            Some(p) => p.clone(),
            None => {
                let local = PathBuf::from(DEFAULT_DATA_DIR).join("admin.token");
                if !local.exists() {
                    bail!(
                        "no admin token: pass --admin-token-file FILE or set TRELLIS_ADMIN_TOKEN (the control plane writes admin.token in its data dir)"
                    );
                }
                local
            }
        };
        let token =
            std::fs::read_to_string(&path).with_context(|| format!("reading admin token {}", path.display()))?;
        if token.trim().is_empty() {
            bail!("admin token file {} is empty", path.display());
        }
        checked_token(token.trim(), &format!("admin token file {}", path.display()))
    }

    pub fn client(&self) -> Result<ControlClient> {
        Ok(ControlClient::new(&self.control.url, &self.control.bundle()?, None, None, Some(self.token()?))?)
    }
}

/// A token goes into an HTTP header: printable ASCII without spaces, as the control plane
/// writes them. Anything else is the wrong file (a PEM, a binary), said so here rather than
/// as an HTTP library's "failed to parse header value".
fn checked_token(token: &str, source: &str) -> Result<String> {
    if token.is_empty() {
        bail!("{source} is empty: give the control plane's admin token (admin.token in its data dir)");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!(
            "{source} is not an admin token (it holds spaces, line breaks or non-ASCII characters): is it the control plane's admin.token?"
        );
    }
    Ok(token.to_string())
}

/// A small runtime for one CLI call.
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    Ok(rt.block_on(f))
}

/// Parses `15m`, `1h`, `30s`, `90` (seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30s, 15m or 1h: {e}"))
}

/// A duration within `min..=max`; outside it, the message says the bounds and `why` they are
/// there (a typo like `9999999999d` would otherwise be taken as it stands).
pub fn parse_duration_within(
    s: &str,
    min: std::time::Duration,
    max: std::time::Duration,
    why: &str,
) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        let show = |d: std::time::Duration| humantime::format_duration(d).to_string();
        return Err(format!("{s:?} is outside {}..={} ({why})", show(min), show(max)));
    }
    Ok(d)
}

/// The slowloris guard, for the control plane and the proxy: zero would cut every client off
/// before its first request.
pub fn parse_header_timeout(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    parse_duration_within(
        s,
        Duration::from_millis(1),
        Duration::from_secs(3600),
        "time a client has for its request headers",
    )
}
