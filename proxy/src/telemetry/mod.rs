//! Telemetry (docs/telemetry.md): one span per connection (opaque or HTTP), per HTTP request and
//! per refused TLS handshake, in both directions, allowed or denied; and an optional
//! JSON-lines flow log.
//!
//! Where it sits in the flow: the data path builds a [`FlowRecord`] when a flow finishes —
//! in `inbound`/`outbound` for opaque connections and handshakes, in [`conn`] for HTTP
//! connections, in the HTTP `TraceLayer` (`layers.rs`) for requests — and hands it to [`Telemetry::finish`], which decides whether
//! it is exported (denials, would-be denials and failures always; allowed flows when their
//! trace is sampled) and queues it without waiting ([`queue`]). A dedicated thread
//! ([`export`]) turns records into OpenTelemetry spans ([`attrs`]) and sends them
//! (OTLP/gRPC or OTLP/HTTP, [`otlp`]; or a JSON-lines file, [`jsonl`]) and writes the flow
//! log.
//!
//! With neither an exporter nor a flow log configured, [`Telemetry`] is off: no ids, no
//! records, no `traceparent` handling — the data path only checks an `Option`.

pub mod attrs;
pub mod body;
pub mod conn;
pub mod context;
pub mod export;
pub mod jsonl;
pub mod otlp;
pub mod queue;
pub mod record;

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use trellis_identity::SpiffeId;

use crate::metrics::Metrics;
pub use conn::{HttpConnSpan, Metered};
pub use context::{SpanIds, TraceParent};
use export::{ExportCounters, Plan, SinkSpec, Worker};
use queue::Queue;
pub use record::{ConnFacts, Direction, FlowRecord, HttpFacts, RecordPath, Started, Verdict};

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`).
    Grpc,
    /// OTLP/HTTP with protobuf bodies, `POST <endpoint>/v1/traces`.
    Http,
}

/// Where the flow log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowLogTarget {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// OTLP collector base URL (`http://host:port`).
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    /// Spans as JSON lines, when there is no OTLP endpoint.
    pub trace_file: Option<PathBuf>,
    /// Share of allowed flows exported (0..=1); denials are always exported.
    pub sample_ratio: f64,
    pub flow_log: Option<FlowLogTarget>,
    /// Records waiting for the telemetry thread, per queue, before new ones are dropped.
    pub queue_size: usize,
    /// More resource attributes for the spans (in Kubernetes: `k8s.pod.name`,
    /// `k8s.namespace.name`, from the downward API variables `trellis inject` sets).
    pub resource: Vec<(&'static str, String)>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            trace_file: None,
            sample_ratio: 1.0,
            flow_log: None,
            queue_size: 16384,
            resource: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    // The io::Error is the source, shown once by whoever prints the chain.
    #[error("{flag}: cannot open {path}")]
    Open {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("telemetry thread: {0}")]
    Thread(String),
}

/// How an L4 flow ended.
#[derive(Debug, Clone)]
pub struct ConnOutcome {
    pub verdict: Verdict,
    /// Client → server bytes.
    pub sent: u64,
    /// Server → client bytes.
    pub received: u64,
    pub error: Option<Cow<'static, str>>,
}

impl ConnOutcome {
    /// A flow that carried no bytes (denied, refused, or failed before connecting).
    pub fn empty(verdict: Verdict, error: Option<Cow<'static, str>>) -> Self {
        ConnOutcome { verdict, sent: 0, received: 0, error }
    }
}

/// The data path's handle on telemetry; cheap to check when off.
#[derive(Debug, Default)]
pub struct Telemetry {
    active: Option<Arc<Active>>,
}

#[derive(Debug)]
pub struct Active {
    sample_threshold: u64,
    spans: Option<Arc<Queue>>,
    flows: Option<Arc<Queue>>,
    identity: Arc<OnceLock<SpiffeId>>,
    worker: Worker,
}

impl Telemetry {
    /// Opens the outputs and starts the telemetry thread; off when nothing is configured.
    pub fn start(config: &TelemetryConfig, metrics: &Metrics) -> Result<Telemetry, TelemetryError> {
        let span_sink = match (&config.otlp_endpoint, &config.trace_file) {
            (Some(endpoint), _) => Some(SinkSpec::Otlp { endpoint: endpoint.clone(), protocol: config.otlp_protocol }),
            (None, Some(path)) => Some(SinkSpec::File(open_append("--trace-file", path)?)),
            (None, None) => None,
        };
        let flow_out: Option<Box<dyn std::io::Write + Send>> = match &config.flow_log {
            Some(FlowLogTarget::Stdout) => {
                Some(Box::new(std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout())))
            }
            Some(FlowLogTarget::File(path)) => Some(open_append("--flow-log", path)?),
            None => None,
        };
        if span_sink.is_none() && flow_out.is_none() {
            tracing::info!(
                "telemetry off: no --otlp-endpoint, --trace-file or --flow-log; flows are counted in /metrics only"
            );
            return Ok(Telemetry::default());
        }
        let identity = Arc::new(OnceLock::new());
        let spans = span_sink.is_some().then(|| Queue::new(config.queue_size, metrics.spans_dropped_queue_full()));
        let flows = flow_out.is_some().then(|| Queue::new(config.queue_size, metrics.flow_log_dropped("queue_full")));
        let plan = Plan {
            spans: span_sink.zip(spans.clone()),
            flows: flow_out.zip(flows.clone()),
            identity: identity.clone(),
            resource: config.resource.clone(),
            counters: ExportCounters {
                exported: metrics.spans_exported.clone(),
                export_failed: metrics.spans_dropped_export_failed(),
                rejected: metrics.spans_rejected(),
                flow_lines_lost: metrics.flow_log_dropped("write_failed"),
            },
        };
        let worker = Worker::spawn(plan)?;
        let sample_threshold = context::ratio_threshold(config.sample_ratio);
        Ok(Telemetry { active: Some(Arc::new(Active { sample_threshold, spans, flows, identity, worker })) })
    }

    /// `Some` when flows are being recorded.
    pub fn active(&self) -> Option<&Arc<Active>> {
        self.active.as_ref()
    }

    pub fn is_on(&self) -> bool {
        self.active.is_some()
    }

    /// The workload's identity, for the exported resource.
    pub fn set_identity(&self, id: SpiffeId) {
        if let Some(a) = &self.active {
            let _ = a.identity.set(id);
        }
    }

    /// The ids for a new span (a child of `parent`, or a new trace), when recording.
    pub fn new_span(&self, parent: Option<TraceParent>) -> Option<SpanIds> {
        self.active.as_ref().map(|a| a.new_span(parent))
    }

    pub fn finish(&self, record: FlowRecord) {
        if let Some(a) = &self.active {
            a.finish(record);
        }
    }

    /// Records an L4 flow (a connection, or a refused handshake) that began at `started`;
    /// `facts` is only called when recording.
    pub fn connection(&self, facts: impl FnOnce() -> Arc<ConnFacts>, started: Started, outcome: ConnOutcome) {
        let Some(a) = &self.active else { return };
        a.finish(FlowRecord {
            ids: a.new_span(None),
            facts: facts(),
            protocol: "tcp",
            http: None,
            started: started.at,
            duration: started.mono.elapsed(),
            verdict: outcome.verdict,
            bytes_sent: outcome.sent,
            bytes_received: outcome.received,
            error: outcome.error,
        });
    }

    /// Sends what is still queued, for at most `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        if let Some(a) = &self.active {
            a.worker.shutdown(timeout).await;
        }
    }
}

impl Active {
    pub fn new_span(&self, parent: Option<TraceParent>) -> SpanIds {
        SpanIds::new(parent, self.sample_threshold)
    }

    /// Queues the record for export (if it must be, or its trace is sampled) and for the
    /// flow log (if it is a decided flow). Never waits.
    pub fn finish(&self, record: FlowRecord) {
        let export = self.spans.as_ref().filter(|_| record.ids.sampled || record.must_export());
        // An HTTP connection's span summarizes flows the log already has a line for each of.
        let flows = self.flows.as_ref().filter(|_| !matches!(record.verdict, Verdict::HttpConnection { .. }));
        match (export, flows) {
            (Some(s), Some(f)) => {
                f.push(record.clone());
                s.push(record);
            }
            (Some(q), None) | (None, Some(q)) => q.push(record),
            (None, None) => {}
        }
    }
}

fn open_append(flag: &'static str, path: &PathBuf) -> Result<Box<dyn std::io::Write + Send>, TelemetryError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| TelemetryError::Open { flag, path: path.clone(), source })?;
    Ok(Box::new(std::io::BufWriter::with_capacity(256 * 1024, file)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::SystemTime;

    pub fn sample_record() -> FlowRecord {
        FlowRecord {
            ids: SpanIds::new(None, 0),
            facts: Arc::new(ConnFacts {
                direction: Direction::Inbound,
                peer: "127.0.0.1:1".parse().unwrap(),
                client: None,
                server_port: 80,
                source: None,
                destination: None,
            }),
            protocol: "tcp",
            http: None,
            started: SystemTime::now(),
            duration: Duration::from_millis(1),
            verdict: Verdict::NoPolicy,
            bytes_sent: 0,
            bytes_received: 0,
            error: None,
        }
    }

    #[tokio::test]
    async fn trace_file_gets_denials_and_sampled_flows_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spans.jsonl");
        let config = TelemetryConfig { trace_file: Some(path.clone()), sample_ratio: 0.0, ..Default::default() };
        let metrics = Metrics::new();
        let t = Telemetry::start(&config, &metrics).unwrap();
        t.finish(sample_record());
        let mut allowed = sample_record();
        allowed.verdict = Verdict::Forwarded;
        t.finish(allowed);
        t.shutdown(Duration::from_secs(5)).await;
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert_eq!(lines[0]["attributes"]["trellis.decision"], "deny");
        assert_eq!(lines[0]["status"]["code"], "error");
        assert_eq!(metrics.spans_exported.get(), 1);
    }

    #[test]
    fn nothing_configured_is_off() {
        let t = Telemetry::start(&TelemetryConfig::default(), &Metrics::new()).unwrap();
        assert!(!t.is_on());
        assert!(t.new_span(None).is_none());
    }
}
