//! `trellis`: the one binary. Parses flags, wires the crates together, and holds no logic
//! of its own: each subcommand lives in `cmd/` and calls into `trellis-identity`,
//! `trellis-policy`, `trellis-control` or `trellis-proxy`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Debug, Parser)]
#[command(
    name = "trellis",
    version,
    about = "Trellis: a zero-trust service-mesh sidecar proxy",
    long_about = "Trellis: a zero-trust service-mesh sidecar proxy.\n\n\
        Sidecars talk only over mutual TLS with SPIFFE identities issued by a small control plane; \
        every connection and HTTP request is checked against policy; every flow becomes a span."
)]
struct Cli {
    /// Log filter: a level (`error`, `warn`, `info`, `debug`, `trace`, `off`) and optional
    /// per-crate levels, e.g. `info` or `warn,trellis_proxy=debug`.
    #[arg(long, global = true, env = "TRELLIS_LOG", default_value = "info", value_parser = parse_log_filter)]
    log: tracing_subscriber::filter::Targets,

    #[command(subcommand)]
    command: Command,
}

/// A log filter. A bare word is a level: `tracing`'s own syntax would read `inf` as "every
/// level of the crate `inf`", turning all of Trellis' logging off without a word.
fn parse_log_filter(s: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    // What is checked is what is parsed: tracing does not trim (`" info"` would name a crate)
    // and reads an empty directive as `error`.
    let directives: Vec<String> = s
        .split(',')
        .map(|d| d.split('=').map(str::trim).collect::<Vec<_>>().join("="))
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(format!("no level given; one of {}, optionally with crate=level", LEVELS.join(", ")));
    }
    let is_level = |l: &str| LEVELS.iter().any(|level| level.eq_ignore_ascii_case(l));
    for directive in &directives {
        // `crate=` would be read as errors only for that crate, `=debug` as every crate.
        let ok = match directive.split_once('=') {
            Some((target, level)) => !target.is_empty() && is_level(level),
            None => is_level(directive),
        };
        if !ok {
            return Err(format!("{directive:?} is not a level ({}) or crate=level", LEVELS.join(", ")));
        }
    }
    directives.join(",").parse().map_err(|e| format!("{e}"))
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane.
    #[command(subcommand)]
    Control(cmd::control::ControlCommand),
    /// Create join tokens that bootstrap a workload's identity.
    #[command(subcommand)]
    Token(cmd::token::TokenCommand),
    /// Validate, apply, inspect and check policies.
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCommand),
    /// List the proxies connected to the control plane.
    #[command(subcommand)]
    Workloads(cmd::workloads::WorkloadsCommand),
    /// Run the sidecar proxy, or install its transparent-capture rules.
    #[command(subcommand)]
    Proxy(cmd::proxy::ProxyCommand),
    /// Add the Trellis sidecar to Kubernetes manifests (prints them to stdout).
    Inject(cmd::inject::InjectArgs),
    /// A whole mesh on loopback, narrated: control plane, three sidecars, scripted flows.
    Demo(cmd::demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cmd::init_logging(cli.log);
    cmd::raise_fd_limit();
    match cli.command {
        Command::Control(c) => cmd::control::run(c),
        Command::Token(c) => cmd::token::run(c),
        Command::Policy(c) => cmd::policy::run(c),
        Command::Workloads(c) => cmd::workloads::run(c),
        Command::Proxy(c) => cmd::proxy::run(c),
        Command::Inject(args) => cmd::inject::run(args),
        Command::Demo(args) => cmd::demo::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_log_filter;
    use tracing_subscriber::filter::LevelFilter;

    #[test]
    fn a_log_filter_is_read_as_written_around_spaces_and_commas() {
        let level = |s: &str, target: &str| parse_log_filter(s).unwrap().would_enable(target, &tracing::Level::INFO);
        assert!(level(" info ", "trellis_proxy"));
        assert!(level("info,", "trellis_proxy"), "a trailing comma is not an error-only filter");
        let f = parse_log_filter("warn, trellis_proxy = debug").unwrap();
        assert!(f.would_enable("trellis_proxy", &tracing::Level::DEBUG));
        assert!(!f.would_enable("hyper", &tracing::Level::INFO));
        assert_eq!(parse_log_filter("OFF").unwrap().default_level(), Some(LevelFilter::OFF));
        for bad in ["", " , ", "inf", "warn,nonsense", "trellis_proxy=", "=debug", "trellis_proxy=loud"] {
            assert!(parse_log_filter(bad).is_err(), "{bad:?}");
        }
    }
}
