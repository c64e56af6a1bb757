//! `trellis token create`: mint a join token (printed alone on stdout).

use std::process::ExitCode;
use std::time::Duration;

use trellis_control::api::TokenRequest;
use trellis_identity::SpiffeId;

use super::remote::{AdminArgs, block_on, parse_duration};

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a single-use join token bound to one SPIFFE ID.
    Create(CreateArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The identity the token bootstraps, e.g. spiffe://cluster.local/ns/prod/sa/api.
    #[arg(long, env = "TRELLIS_SPIFFE_ID", value_parser = SpiffeId::parse)]
    pub spiffe_id: SpiffeId,
    /// How long the token stays usable: whole seconds, from 1s to 30 days (30s, 15m, 1h, 7d;
    /// a bare number is seconds; `M` is months, minutes are `m`).
    #[arg(long, env = "TRELLIS_TOKEN_TTL", default_value = "15m", value_parser = parse_ttl)]
    pub ttl: Duration,
    #[command(flatten)]
    pub admin: AdminArgs,
}

const MAX_TTL: Duration = Duration::from_secs(trellis_control::server::MAX_TOKEN_TTL);

/// A token's lifetime goes to the control plane in whole seconds; rounding `0` or `500ms` up
/// to a second would hand out a token the user did not ask for.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = parse_duration(s)?;
    if ttl.is_zero() || ttl.subsec_nanos() != 0 {
        return Err(format!("{s:?}: a token lives a whole number of seconds, at least 1s"));
    }
    // The control plane's limit, said in the flag's own terms (its API names `ttl_seconds`).
    if ttl > MAX_TTL {
        return Err(format!("{s:?} is longer than the 30 days a join token may live"));
    }
    Ok(ttl)
}

pub fn run(cmd: TokenCommand) -> ExitCode {
    let TokenCommand::Create(args) = cmd;
    let result = (|| {
        let client = args.admin.client()?;
        let req = TokenRequest { spiffe_id: args.spiffe_id, ttl_seconds: Some(args.ttl.as_secs()) };
        Ok::<_, anyhow::Error>(block_on(client.create_token(&req))??)
    })();
    match result {
        Ok(resp) => {
            outln!("{}", resp.token);
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("error: {e:#}");
            ExitCode::from(super::EXIT_ERROR)
        }
    }
}
