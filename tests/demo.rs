//! `trellis demo --once` as a newcomer runs it (issue #8): exit 0, every scripted flow got
//! the decision examples/demo/policies.yaml says it should, traces were written and a
//! denied span shown, and nothing is left behind.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

#[test]
fn demo_once_runs_every_flow_as_the_policy_says_and_cleans_up() {
    // Settings left in the caller's shell (a sourced proxy.env, say) are not the demo's.
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["demo", "--once"])
        .env("TRELLIS_DEFAULT_ACTION", "allow")
        .env("TRELLIS_TRUST_DOMAIN", "prod.example")
        .env("TRELLIS_TOKEN_FILE", "/nonexistent/token")
        .env("TRELLIS_OUTBOUND", "127.0.0.1:1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");

    let expected = [
        ("web → api  GET /api/items", "allow", "policy api-from-web rule 0"),
        ("web → api  GET /admin", "deny", "x-trellis-denied: default-deny"),
        ("web → api  POST /api/items", "deny", "x-trellis-denied: default-deny"),
        ("web → api  GET /api/reports", "audit-deny", "audit: policy retire-reports rule 0"),
        ("api → db  connect", "allow", "policy db-from-api rule 0"),
        ("web → db  connect", "deny", "default deny"),
        ("rogue (no SVID) → api sidecar", "refused", "mTLS required"),
    ];
    for (flow, decision, reason) in expected {
        let line = stdout.lines().find(|l| l.contains(flow)).unwrap_or_else(|| panic!("no row for {flow}:\n{stdout}"));
        assert!(line.starts_with('✓'), "{line}");
        assert!(line.split_whitespace().any(|w| w == decision), "{flow}: expected {decision}: {line}");
        assert!(line.contains(reason), "{flow}: expected reason {reason}: {line}");
    }
    assert!(!stdout.contains('✗'), "{stdout}");

    // Where the traces went, and a denied span's attributes.
    let traces = stdout.lines().find(|l| l.starts_with("Traces:")).expect("a traces line");
    assert!(traces.contains("of denied flows"), "{traces}");
    assert!(stdout.contains("trellis.decision") && stdout.contains("deny"), "{stdout}");
    // Counted once every sidecar has written, not at the first denied span: each denied row
    // above (GET /admin, POST /api/items, web → db) has its span in the count.
    let denied: usize = traces
        .split_once(" spans (")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no denied count in {traces}"));
    assert!(denied >= 3, "one span per denied flow at least: {traces}");

    // Nothing left behind: the temporary dir is gone and no demo process survives.
    let dir = traces.rsplit(" in ").next().and_then(|p| std::path::Path::new(p.trim()).parent()).expect("trace path");
    assert!(!dir.exists(), "{} was left behind", dir.display());
    let survivors = Command::new("pgrep").args(["-f", &dir.display().to_string()]).output().unwrap();
    assert!(survivors.stdout.is_empty(), "demo processes survived: {}", String::from_utf8_lossy(&survivors.stdout));
}

/// With `--otlp-endpoint`, the demo says what became of the spans: exported to a real OTLP
/// receiver (OTLP/gRPC, as the demo sends; the spans arrive there), or — with no collector listening — that none reached it,
/// and exits 1, instead of claiming an export that did not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_once_says_whether_spans_reached_the_collector() {
    let receiver = support::otlp::Receiver::grpc(std::time::Duration::ZERO).await;
    let run = |url: String| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_trellis"))
                .args(["demo", "--once", "--otlp-endpoint", &url])
                .output()
                .unwrap()
        })
    };
    let out = run(receiver.url()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let traces = stdout.lines().find(|l| l.starts_with("Traces:")).expect("a traces line");
    assert!(traces.contains("was exported") && traces.contains(&receiver.url()), "{traces}");
    assert!(receiver.spans().iter().any(|s| s.str("trellis.decision") == "deny"), "no denied span arrived");

    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", nobody.local_addr().unwrap());
    drop(nobody);
    let out = run(url.clone()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let traces = stdout.lines().find(|l| l.starts_with("Traces:")).expect("a traces line");
    assert!(traces.contains("did not take the spans") && traces.contains(&url), "{traces}");
    assert!(stdout.contains("no span reached the collector"), "{stdout}");

    // Not a URL: refused before a mesh is started.
    let out = run("nope".into()).await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty() && String::from_utf8_lossy(&out.stderr).contains("--otlp-endpoint"));
}

/// Closing the terminal (SIGHUP) while the demo runs its flows or waits stops the mesh:
/// every process it started is gone and its temporary dir (the CA key, the admin token)
/// removed.
#[test]
fn a_hangup_stops_the_demo_and_everything_it_started() {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let started = lines.by_ref().map_while(Result::ok).any(|l| l.starts_with("Flows ("));
    assert!(started, "the demo never started its flows");
    std::thread::spawn(move || lines.for_each(drop));

    let pid = nix::unistd::Pid::from_raw(demo.id() as i32);
    let children: Vec<u32> =
        String::from_utf8(Command::new("pgrep").args(["-P", &pid.to_string()]).output().unwrap().stdout)
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
    assert_eq!(children.len(), 4, "a control plane and three sidecars: {children:?}");
    let dir: PathBuf = children
        .iter()
        .filter_map(|c| std::fs::read(format!("/proc/{c}/cmdline")).ok())
        .flat_map(|cmd| cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect::<Vec<_>>())
        .find(|a| a.contains("trellis-demo-") && a.ends_with("/control"))
        .map(|d| PathBuf::from(d).parent().unwrap().to_path_buf())
        .expect("the control plane's --data-dir");
    let mode = std::os::unix::fs::PermissionsExt::mode(&dir.metadata().unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "{} holds the CA key and is mode {mode:o}", dir.display());

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = demo.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on SIGHUP");
        std::thread::sleep(Duration::from_millis(20));
    };
    // 130 when the flows were still running, 0 when it was already waiting for a signal.
    assert!(matches!(status.code(), Some(0 | 130)), "{status:?}");
    assert!(!dir.exists(), "{} was left behind", dir.display());
    for c in children {
        assert!(!std::path::Path::new(&format!("/proc/{c}")).exists(), "process {c} survived the demo");
    }
}
