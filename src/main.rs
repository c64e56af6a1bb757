//! `trellis`: the one binary. Parses flags, wires the crates together, and holds no logic
//! of its own: each subcommand lives in `cmd/` and calls into `trellis-identity`,
//! `trellis-policy`, `trellis-control` or `trellis-proxy`. Subcommands arrive with the
//! issues that build them.

use clap::{CommandFactory, Parser};

#[derive(Debug, Parser)]
#[command(
    name = "trellis",
    version,
    about = "Trellis: a zero-trust service-mesh sidecar proxy",
    long_about = "Trellis: a zero-trust service-mesh sidecar proxy.\n\n\
        Sidecars talk only over mutual TLS with SPIFFE identities issued by a small control plane; \
        every connection and HTTP request is checked against policy; every flow becomes a span."
)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    let _ = Cli::command().print_help();
}
