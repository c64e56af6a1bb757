//! Subcommands of the `trellis` binary, one module each.
//!
//! Their flags' doc comments are `--help` text for clap, where `<placeholder>` reads as
//! meant; rustdoc would take it for HTML, hence the allow.
#![allow(rustdoc::invalid_html_tags)]

#[macro_use]
pub mod out;

pub mod control;
pub mod demo;
pub mod inject;
pub mod policy;
pub mod policy_remote;
pub mod proxy;
pub mod proxy_init;
pub mod remote;
pub mod token;
pub mod workloads;

/// What every client command (`policy`, `token`, `workloads`, `inject`) exits with on an
/// error — bad input, a refused or failed call — as clap does for a bad flag; `policy check`
/// keeps 1 for "denied", so 2 tells a broken check from a deny.
pub const EXIT_ERROR: u8 = 2;

/// Logs go to stderr so that stdout stays parseable (`token create` prints only the token).
pub fn init_logging(filter: tracing_subscriber::filter::Targets) {
    // `Targets` (`info,trellis_proxy=debug`) rather than `EnvFilter`: the same directives
    // for what we log, without a regex engine mapped into every sidecar. Clap has already
    // refused a filter that does not parse, naming it.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(ansi);
    let _ = tracing_subscriber::registry().with(fmt).with(filter).try_init();
}

/// A proxy or control plane holds one descriptor per connection; the default soft limit
/// (often 1024) would cap it long before memory does, so raise it to the hard limit.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::debug!(error = %e, "could not raise the open-files limit");
    }
}

/// Resolves on SIGTERM (what systemd and the kubelet send) or SIGINT (Ctrl-C).
pub async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C will stop this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
