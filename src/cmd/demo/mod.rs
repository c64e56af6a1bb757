//! `trellis demo`: a whole mesh on loopback, narrated.
//!
//! A control plane and three sidecars run as child processes of this binary (the real
//! `trellis control run` and `trellis proxy run`), in front of three workloads built into
//! the binary (`apps.rs`). The demo applies `examples/demo/policies.yaml`, runs a scripted
//! set of flows, prints each one's decision and reason as it happens, then says where the
//! traces went and shows a denied span. With `--once` it exits (0 when every flow got the
//! decision the policy file says it should); otherwise it stays up for you to try things
//! until Ctrl-C. Every child process and temporary file is gone when it exits.

mod apps;
mod mesh;
mod report;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mesh::Mesh;
use report::{Expect, Row};

/// The policy file the demo applies (also shipped as a readable file).
pub const POLICIES: &str = include_str!("../../../examples/demo/policies.yaml");

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Run the scripted flows, print the report and exit (exit 1 if any flow surprised us).
    #[arg(long, env = "TRELLIS_DEMO_ONCE", value_parser = clap::builder::FalseyValueParser::new())]
    pub once: bool,
    /// Send spans to this OTLP/gRPC collector instead of a JSON-lines file.
    #[arg(long, env = "TRELLIS_OTLP_ENDPOINT", value_parser = trellis_proxy::config::parse_otlp_endpoint)]
    pub otlp_endpoint: Option<String>,
}

pub fn run(args: DemoArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            errln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match demo(args).await {
            Ok(code) => code,
            Err(e) => {
                errln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    say!("Trellis demo — a zero-trust mesh on loopback\n");
    // Listening from the start: a signal while the mesh starts or the flows run stops the
    // mesh and removes its files instead of leaving the children running (SIGHUP too: the
    // terminal that ran the demo was closed).
    let mut stop = std::pin::pin!(stop_signal());
    let mut mesh = tokio::select! {
        mesh = Mesh::start(args.otlp_endpoint.clone()) => mesh?,
        () = &mut stop => return Ok(interrupted()),
    };
    let (all_ok, traced) = tokio::select! {
        shown = show(&mesh, &args, started) => shown,
        () = &mut stop => {
            mesh.stop().await;
            return Ok(interrupted());
        }
    };
    if args.once {
        mesh.stop().await;
        if all_ok && !traced {
            say!(
                "\nEvery flow got the decision examples/demo/policies.yaml says it should, but no span reached the collector."
            );
            return Ok(ExitCode::FAILURE);
        }
        if all_ok {
            say!("\nEvery flow got the decision examples/demo/policies.yaml says it should.");
            return Ok(ExitCode::SUCCESS);
        }
        say!("\nSome flows did not get the expected decision (marked ✗).");
        return Ok(ExitCode::FAILURE);
    }
    report::try_it(&mesh);
    stop.await;
    say!("\nstopping the mesh…");
    mesh.stop().await;
    say!("done: all processes stopped and temporary files removed.");
    Ok(ExitCode::SUCCESS)
}

/// The mesh, the scripted flows and where their traces went; whether every flow got the
/// decision the policy file says it should, and whether spans reached the collector.
async fn show(mesh: &Mesh, args: &DemoArgs, started: Instant) -> (bool, bool) {
    say!(
        "  control plane  {}   (trust domain cluster.local, CA fingerprint {}…)",
        mesh.control_url,
        &mesh.fingerprint[..23]
    );
    for s in &mesh.sidecars {
        say!("  {:<5} sidecar  {:<18} admin http://{}   app {}", s.name, s.id_short(), s.admin, s.app_desc);
    }
    say!("  policies       {} (default deny: nothing else is allowed)\n", mesh.policy_summary);
    say!(
        "Flows (each goes app → its sidecar → mTLS → the peer's sidecar → app; started in {:.1}s):\n",
        started.elapsed().as_secs_f64()
    );
    say!("{}", Row::header());

    let mut all_ok = true;
    for row in run_flows(mesh).await {
        all_ok &= row.ok();
        say!("{}", row.line());
    }
    say!("");
    let traced = report::traces(mesh, args.otlp_endpoint.as_deref(), args.once).await;
    (all_ok, traced)
}

/// Ctrl-C, SIGTERM or SIGHUP.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => tokio::select! {
            _ = hup.recv() => {}
            () = super::wait_for_shutdown_signal() => {}
        },
        Err(_) => super::wait_for_shutdown_signal().await,
    }
}

fn interrupted() -> ExitCode {
    errln!("interrupted: the mesh is stopped and its temporary files removed");
    ExitCode::from(130)
}

/// The scripted flows, in order, each checked against what the policy file says.
async fn run_flows(mesh: &Mesh) -> Vec<Row> {
    let web_api = mesh.route("web", "api");
    let web_db = mesh.route("web", "db");
    let api_db = mesh.route("api", "db");
    let mut rows = Vec::new();
    for (method, path, expect) in [
        ("GET", "/api/items", Expect::Allow),
        ("GET", "/admin", Expect::Deny),
        ("POST", "/api/items", Expect::Deny),
        ("GET", "/api/reports", Expect::AuditDeny),
    ] {
        let outcome = apps::http_call(web_api, method, path).await;
        let reason = mesh.explain("web", "api", Some((method, path))).await;
        rows.push(Row::http("web", "api", method, path, expect, outcome, reason));
    }
    for (from, to, addr, expect) in [("api", "db", api_db, Expect::Allow), ("web", "db", web_db, Expect::Deny)] {
        let (outcome, latency) = apps::tcp_call(addr).await;
        let reason = mesh.explain(from, to, None).await;
        rows.push(Row::tcp(from, to, expect, outcome, latency, reason));
    }
    let (outcome, latency) = apps::rogue_call(mesh.inbound("api"), &mesh.bundle, &mesh.id("api")).await;
    rows.push(Row::rogue("api", outcome, latency));
    // Give the sidecars' span exporters a moment to flush before the report reads them.
    tokio::time::sleep(Duration::from_millis(50)).await;
    rows
}

/// `println!` that ignores a closed stdout (`trellis demo | head` must not panic).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
pub(crate) use say;
