//! `trellis proxy init`: installs the nftables capture rules in the current network namespace
//! (the pod's, when run as the `trellis-init` init container), or prints them with
//! `--dry-run`. The rules and their installation are `trellis_proxy::init`.

use std::process::ExitCode;

use trellis_proxy::init::{self, CaptureConfig};

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Connections from this uid (the proxy's) are never redirected.
    #[arg(long, env = "TRELLIS_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Inbound TCP is redirected to this port (the proxy's inbound listener).
    #[arg(long, env = "TRELLIS_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// Outbound TCP is redirected to this port (the proxy's outbound listener).
    #[arg(long, env = "TRELLIS_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Inbound destination ports left uncaptured, comma-separated (repeatable).
    #[arg(long, env = "TRELLIS_EXCLUDE_INBOUND_PORTS", value_name = "PORT,...")]
    pub exclude_inbound_ports: Vec<String>,
    /// Outbound destination ports left uncaptured, comma-separated (repeatable).
    #[arg(long, env = "TRELLIS_EXCLUDE_OUTBOUND_PORTS", value_name = "PORT,...")]
    pub exclude_outbound_ports: Vec<String>,
    /// Outbound destination networks left uncaptured, IPv4 or IPv6 CIDRs, comma-separated.
    #[arg(long, env = "TRELLIS_EXCLUDE_OUTBOUND_CIDRS", value_name = "CIDR,...")]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Print the nftables ruleset and change nothing (needs no privileges).
    #[arg(long, env = "TRELLIS_DRY_RUN", value_parser = clap::builder::FalseyValueParser::new())]
    pub dry_run: bool,
}

pub fn run(args: InitArgs) -> ExitCode {
    let (cfg, rules) = match capture_config(&args).and_then(|cfg| Ok((init::ruleset(&cfg)?, cfg))) {
        Ok((rules, cfg)) => (cfg, rules),
        Err(e) => {
            errln!("trellis proxy init: {e}");
            return ExitCode::from(2);
        }
    };
    if args.dry_run {
        out!("{rules}");
        return ExitCode::SUCCESS;
    }
    match init::Nft::system().apply(&rules) {
        Ok(()) => {
            tracing::info!(
                inbound_port = cfg.inbound_port,
                outbound_port = cfg.outbound_port,
                proxy_uid = cfg.proxy_uid,
                "transparent capture installed (nftables table inet {})",
                init::TABLE
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("trellis proxy init: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The settings from the flags; repeated flags and comma lists add up.
fn capture_config(args: &InitArgs) -> Result<CaptureConfig, init::InitError> {
    let ports = |lists: &[String]| -> Result<Vec<u16>, init::InitError> {
        let mut all = Vec::new();
        for list in lists {
            for port in init::parse_ports(list)? {
                if !all.contains(&port) {
                    all.push(port);
                }
            }
        }
        Ok(all)
    };
    let mut cidrs = Vec::new();
    for list in &args.exclude_outbound_cidrs {
        cidrs.extend(init::parse_cidrs(list)?);
    }
    Ok(CaptureConfig {
        proxy_uid: args.proxy_uid,
        inbound_port: args.inbound_port,
        outbound_port: args.outbound_port,
        exclude_inbound_ports: ports(&args.exclude_inbound_ports)?,
        exclude_outbound_ports: ports(&args.exclude_outbound_ports)?,
        exclude_outbound_cidrs: cidrs,
    })
}
