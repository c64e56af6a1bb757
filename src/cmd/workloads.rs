//! `trellis workloads list`: the proxies connected to the control plane.

use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use super::out::{Output, structured};
use super::remote::{AdminArgs, block_on};

#[derive(Debug, clap::Subcommand)]
pub enum WorkloadsCommand {
    /// Connected proxies: identity, address, policy version acked, SVID expiry, last seen.
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Output format: `text` (a table), `json` or `yaml` (the same fields as the JSON).
    #[arg(long, short, value_enum, env = "TRELLIS_OUTPUT", default_value = "text")]
    pub output: Output,
}

pub fn run(cmd: WorkloadsCommand) -> ExitCode {
    let WorkloadsCommand::List(args) = cmd;
    let result = (|| {
        let client = args.admin.client()?;
        Ok::<_, anyhow::Error>(block_on(client.workloads())??)
    })();
    let list = match result {
        Ok(l) => l,
        Err(e) => {
            errln!("error: {e:#}");
            return ExitCode::from(super::EXIT_ERROR);
        }
    };
    if args.output != Output::Text {
        return match structured(&list, args.output, true) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                errln!("error: {e}");
                ExitCode::from(super::EXIT_ERROR)
            }
        };
    }
    outln!("{:<52} {:<16} {:>7} {:<22} {:>9}", "IDENTITY", "ADDRESS", "ACKED", "SVID EXPIRES", "LAST SEEN");
    let now = trellis_control::store::now_unix();
    for w in list {
        let acked = w.acked_version.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        let expires = w.svid_expires_at.map(rfc3339).unwrap_or_else(|| "-".into());
        outln!(
            "{:<52} {:<16} {:>7} {:<22} {:>8}s",
            w.spiffe_id,
            w.address,
            acked,
            expires,
            now.saturating_sub(w.last_seen)
        );
    }
    ExitCode::SUCCESS
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}
