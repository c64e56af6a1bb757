//! What the demo prints: the flow table (one row per flow, as it happens), the trace
//! summary with one denied span's attributes, and the commands to try next.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use trellis_proxy::telemetry::export::TICK;

use super::apps::HttpOutcome;
use super::mesh::Mesh;
use super::say;

/// The decision the policy file says a flow should get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Allow,
    Deny,
    AuditDeny,
    TlsRefused,
}

impl Expect {
    fn label(self) -> &'static str {
        match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
            Expect::AuditDeny => "audit-deny",
            Expect::TlsRefused => "refused",
        }
    }
}

/// One line of the flow table.
pub struct Row {
    flow: String,
    proto: &'static str,
    result: String,
    got: &'static str,
    expect: Expect,
    reason: String,
    latency: Duration,
}

impl Row {
    pub fn header() -> String {
        format!(
            "  {:<33} {:<5} {:<18} {:<11} {:>8}  {}\n  {}",
            "FLOW",
            "PROTO",
            "RESULT",
            "DECISION",
            "LATENCY",
            "REASON",
            "-".repeat(120)
        )
    }

    pub fn ok(&self) -> bool {
        self.got == self.expect.label()
    }

    pub fn line(&self) -> String {
        let mark = if self.ok() { "✓" } else { "✗" };
        format!(
            "{mark} {:<33} {:<5} {:<18} {:<11} {:>6.1}ms  {}",
            self.flow,
            self.proto,
            self.result,
            self.got,
            self.latency.as_secs_f64() * 1000.0,
            self.reason,
        )
    }

    pub fn http(
        from: &str,
        to: &str,
        method: &str,
        path: &str,
        expect: Expect,
        outcome: Result<HttpOutcome, String>,
        explained: Option<serde_json::Value>,
    ) -> Row {
        let flow = format!("{from} → {to}  {method} {path}");
        match outcome {
            Ok(o) => {
                let got = match (o.status, &explained) {
                    (403, _) if o.denied.is_some() => "deny",
                    (_, Some(d)) if d["audit"]["action"] == "deny" && o.status < 400 => "audit-deny",
                    (s, _) if s < 400 => "allow",
                    _ => "error",
                };
                let reason = match (&o.denied, got) {
                    (Some(h), _) => format!("x-trellis-denied: {h}"),
                    (None, "audit-deny") => format!(
                        "{}; audit: {}",
                        reason_of(&explained),
                        explained.as_ref().map(|d| short(&d["audit"]["reason"])).unwrap_or_default()
                    ),
                    _ => reason_of(&explained),
                };
                let result = format!("HTTP {}", o.status);
                let _ = o.body;
                Row { flow, proto: "http", result, got, expect, reason, latency: o.latency }
            }
            Err(e) => Row {
                flow,
                proto: "http",
                result: "error".into(),
                got: "error",
                expect,
                reason: e,
                latency: Duration::ZERO,
            },
        }
    }

    pub fn tcp(
        from: &str,
        to: &str,
        expect: Expect,
        outcome: Result<String, String>,
        latency: Duration,
        explained: Option<serde_json::Value>,
    ) -> Row {
        let flow = format!("{from} → {to}  connect");
        let (result, got) = match &outcome {
            Ok(banner) => (format!("\"{banner}\""), "allow"),
            Err(e) => (e.clone(), "deny"),
        };
        Row { flow, proto: "tcp", result, got, expect, reason: reason_of(&explained), latency }
    }

    pub fn rogue(to: &str, outcome: Result<(), String>, latency: Duration) -> Row {
        let flow = format!("rogue (no SVID) → {to} sidecar");
        let (result, got, reason) = match outcome {
            Ok(()) => ("answered".to_string(), "allow", "the sidecar answered a client without an SVID".to_string()),
            Err(e) => ("TLS refused".to_string(), "refused", format!("mTLS required: {}", first_words(&e, 6))),
        };
        Row { flow, proto: "tls", result, got, expect: Expect::TlsRefused, reason, latency }
    }
}

fn reason_of(explained: &Option<serde_json::Value>) -> String {
    explained.as_ref().map(|d| short(&d["reason"])).unwrap_or_else(|| "(control plane did not say)".into())
}

/// `policy api-from-web rule 0` or `default deny (no rule matched)`.
fn short(reason: &serde_json::Value) -> String {
    match reason["kind"].as_str() {
        Some("policy") => format!("policy {} rule {}", reason["policy"].as_str().unwrap_or("?"), reason["rule"]),
        Some("default") => format!("default {} (no rule matched)", reason["action"].as_str().unwrap_or("?")),
        _ => reason["message"].as_str().unwrap_or("").to_string(),
    }
}

fn first_words(s: &str, n: usize) -> String {
    s.split_whitespace().take(n).collect::<Vec<_>>().join(" ")
}

/// Where the spans went, how many, and one denied span's attributes. `once`: the demo is about
/// to stop and remove its temporary files, so the path is not one to go and look at.
/// Returns false if spans were to go to a collector and none reached it.
pub async fn traces(mesh: &Mesh, otlp: Option<&str>, once: bool) -> bool {
    if let Some(url) = otlp {
        return exported(mesh, url).await;
    }
    let spans = settled_spans(mesh).await;
    let denied = spans.iter().filter(|s| is_denied(s)).count();
    say!("Traces: {} spans ({denied} of denied flows) in {}", spans.len(), mesh.trace_file.display());
    if once {
        say!(
            "  (a temporary file, removed as the demo exits; without --once the mesh and its files stay until Ctrl-C)"
        );
    }
    if let Some(span) = spans.iter().find(|s| is_denied(s)) {
        say!("One denied span, as your tracing backend would show it:");
        say!("  name: {}   status: {}", span["name"].as_str().unwrap_or("?"), span["status"]);
        if let Some(attrs) = span["attributes"].as_object() {
            for (k, v) in attrs {
                say!("    {k:<32} {}", v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
            }
        }
    }
    true
}

/// The spans in the trace file once they have all landed. Each sidecar's telemetry thread
/// writes every [`TICK`], on its own schedule, so the first denied span to appear says only
/// that one sidecar has written (a first run once counted 2 of 17): wait until there is a
/// denied span and the count has held for three ticks, at most 3 s.
async fn settled_spans(mesh: &Mesh) -> Vec<serde_json::Value> {
    let poll = Duration::from_millis(50);
    let still_for = 3 * TICK.as_millis() / poll.as_millis();
    let mut spans = read_spans(mesh);
    let mut unchanged = 0;
    for _ in 0..60 {
        tokio::time::sleep(poll).await;
        let now = read_spans(mesh);
        unchanged = if now.len() == spans.len() && now.iter().any(is_denied) { unchanged + 1 } else { 0 };
        spans = now;
        if unchanged >= still_for {
            break;
        }
    }
    spans
}

fn is_denied(span: &serde_json::Value) -> bool {
    span["attributes"]["trellis.decision"] == "deny"
}

fn read_spans(mesh: &Mesh) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&mesh.trace_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Copy-paste commands for the running mesh.
pub fn try_it(mesh: &Mesh) {
    let data = mesh.dir.path().join("control");
    say!("\nThe mesh stays up. In another terminal:\n");
    if let Ok(exe) = std::env::current_exe() {
        say!("  alias trellis={}", exe.display());
    }
    say!("  export TRELLIS_CONTROL={}", mesh.control_url);
    say!("  export TRELLIS_CA_BUNDLE={}", data.join("bundle.pem").display());
    say!("  export TRELLIS_ADMIN_TOKEN_FILE={}\n", data.join("admin.token").display());
    say!("  # call api through web's sidecar (allowed, then denied):");
    say!("  curl -i http://{}/api/items", mesh.route("web", "api"));
    say!("  curl -i http://{}/admin\n", mesh.route("web", "api"));
    say!("  # change the policy: allow POST too, then retry");
    let file = mesh.dir.path().join("policies.yaml");
    say!("  sed -i 's/methods: \\[GET\\]/methods: [GET, POST]/' {}", file.display());
    say!("  trellis policy apply -f {}", file.display());
    say!("  curl -i -X POST http://{}/api/items\n", mesh.route("web", "api"));
    say!("  # ask why, without sending anything:");
    say!(
        "  trellis policy check --from {} --to {} --port {} --method GET --path /admin",
        super::mesh::spiffe("web"),
        super::mesh::spiffe("api"),
        mesh.api_app.port()
    );
    say!("  trellis workloads list\n");
    for s in &mesh.sidecars {
        say!("  curl http://{}/metrics     # {} sidecar", s.admin, s.name);
    }
    say!("\n  traces: {}", mesh.trace_file.display());
    say!("\nCtrl-C stops everything and removes {}.", mesh.dir.path().display());
}

/// What the sidecars' exporters say became of the spans (`/metrics`): exported, or failed to
/// reach the collector — said as it is, not assumed. Waits until every sidecar has tried
/// (exporters send every 100 ms; a collector that does not answer gets their 5 s export
/// timeout). True if the collector took spans; some failing as well is said as a warning.
async fn exported(mesh: &Mesh, url: &str) -> bool {
    let sidecars: Vec<SocketAddr> = mesh.sidecars.iter().map(|s| s.admin).collect();
    let mut counts = Vec::new();
    for _ in 0..140 {
        let admins = sidecars.clone();
        // Blocking reads of each admin port, off the runtime's workers.
        counts = tokio::task::spawn_blocking(move || {
            let both = |text: String| (metric(&text, "trellis_spans_exported_total"), metric(&text, EXPORT_FAILED));
            admins.iter().map(|a| admin_get(*a, "/metrics").map(both).unwrap_or_default()).collect()
        })
        .await
        .unwrap_or_default();
        let tried = |(done, failed): &(Option<f64>, Option<f64>)| done.unwrap_or(0.0) + failed.unwrap_or(0.0) > 0.0;
        if counts.len() == sidecars.len() && counts.iter().all(tried) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done: f64 = counts.iter().filter_map(|c| c.0).sum();
    let failed: f64 = counts.iter().filter_map(|c| c.1).sum();
    if done > 0.0 && failed == 0.0 {
        say!(
            "Traces: every flow above, allowed or denied, was exported as OpenTelemetry spans to {url} ({done} spans)."
        );
    } else if done > 0.0 {
        say!(
            "Traces: {done} spans were exported to {url}, but {failed} failed to ({EXPORT_FAILED} in each \
             sidecar's /metrics; each sidecar's log says why)."
        );
    } else {
        say!(
            "Traces: the collector at {url} did not take the spans ({failed} failed: {EXPORT_FAILED} in each \
             sidecar's /metrics; each sidecar's log says why)."
        );
    }
    done > 0.0
}

const EXPORT_FAILED: &str = "trellis_spans_dropped_total{reason=\"export_failed\"}";

/// The value of the sample `name` (with its labels, as the exposition writes them) in an
/// admin listener's `/metrics` answer.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

/// The status of a plain `GET` on an admin listener.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    admin_get(addr, path)?.get(9..12)?.parse().ok()
}

/// A plain `GET` on an admin listener: the whole answer, head and body.
fn admin_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}
