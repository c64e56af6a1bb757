//! The telemetry thread: every [`TICK`] it takes what the data path queued ([`Queue`]),
//! sends spans to the exporter in batches and writes flow-log lines. Exports run here,
//! never on the data path.
//!
//! Why not the SDK's `BatchSpanProcessor`: it counts the spans it drops only in an internal
//! log line, and `trellis_spans_dropped_total` must count them; it samples when a span
//! starts, while Trellis decides at the end (a denial is known only then, and denials are
//! always exported); and it wakes its thread per span. Why not its exporters: see
//! [`super::otlp`].

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;
use trellis_identity::SpiffeId;

use super::jsonl::{SpanWriter, write_flow_line};
use super::otlp::{Encoder, Rejected, Transport};
use super::queue::{Item, Queue};
use super::{OtlpProtocol, TelemetryError};

/// Spans sent in one export call at most.
const MAX_BATCH: usize = 512;
/// How often the queues are emptied: spans reach the exporter within about this long.
pub const TICK: Duration = Duration::from_millis(100);
/// How long one export may take before its spans count as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed export, batches are dropped unencoded for this long before the next
/// try, so an unreachable collector costs almost nothing.
const FAILURE_BACKOFF: Duration = Duration::from_secs(1);

/// Where spans go.
pub enum SinkSpec {
    Otlp { endpoint: String, protocol: OtlpProtocol },
    File(Box<dyn std::io::Write + Send>),
}

enum Sink {
    Otlp { encoder: Box<Encoder>, transport: Transport, buf: Vec<u8> },
    File(SpanWriter),
}

impl Sink {
    /// Builds the exporter; must run inside the telemetry thread's runtime (tonic's lazy
    /// channel spawns its worker there).
    fn build(spec: SinkSpec) -> Result<Sink, TelemetryError> {
        match spec {
            SinkSpec::File(out) => Ok(Sink::File(SpanWriter::new(out))),
            SinkSpec::Otlp { endpoint, protocol } => Ok(Sink::Otlp {
                encoder: Box::default(),
                transport: Transport::new(&endpoint, protocol, EXPORT_TIMEOUT)?,
                buf: Vec::new(),
            }),
        }
    }

    async fn export(&mut self, batch: &[Item]) -> Result<Rejected, String> {
        match self {
            Sink::Otlp { encoder, transport, buf } => {
                encoder.encode(batch, buf);
                let body = Bytes::copy_from_slice(buf);
                match tokio::time::timeout(EXPORT_TIMEOUT + Duration::from_secs(1), transport.send(body)).await {
                    Ok(r) => r,
                    Err(_) => Err("export timed out".into()),
                }
            }
            Sink::File(w) => w.write(batch).map(|()| Rejected::default()).map_err(|e| e.to_string()),
        }
    }

    fn set_resource(&mut self, attrs: &[(&'static str, String)]) {
        match self {
            Sink::Otlp { encoder, .. } => encoder.set_resource(attrs),
            Sink::File(w) => w.set_resource(attrs),
        }
    }
}

/// Counters the telemetry thread moves.
#[derive(Clone, Debug)]
pub struct ExportCounters {
    pub exported: Counter,
    pub export_failed: Counter,
    /// Spans the collector answered it did not take (OTLP's partial success).
    pub rejected: Counter,
    /// Flow-log lines a failed write lost.
    pub flow_lines_lost: Counter,
}

/// What the telemetry thread is given to run.
pub struct Plan {
    pub spans: Option<(SinkSpec, Arc<Queue>)>,
    pub flows: Option<(Box<dyn std::io::Write + Send>, Arc<Queue>)>,
    pub identity: Arc<OnceLock<SpiffeId>>,
    /// Resource attributes beyond [`resource`]'s own.
    pub resource: Vec<(&'static str, String)>,
    pub counters: ExportCounters,
}

/// The running telemetry thread.
#[derive(Debug)]
pub struct Worker {
    stop: CancellationToken,
    done: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl Worker {
    /// Starts the thread and waits until the exporter is built (so a bad endpoint fails
    /// the proxy's start, not its first export).
    pub fn spawn(plan: Plan) -> Result<Worker, TelemetryError> {
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let token = stop.clone();
        std::thread::Builder::new()
            .name("trellis-telemetry".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => return drop(ready_tx.send(Err(TelemetryError::Thread(e.to_string())))),
                };
                rt.block_on(run(plan, token, ready_tx));
                let _ = done_tx.send(());
            })
            .map_err(|e| TelemetryError::Thread(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Worker { stop, done: std::sync::Mutex::new(Some(done_rx)) }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TelemetryError::Thread("telemetry thread exited while starting".into())),
        }
    }

    /// Sends what is queued, waiting at most `timeout`; says so if that was not enough.
    pub async fn shutdown(&self, timeout: Duration) {
        self.stop.cancel();
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(done) = done
            && tokio::time::timeout(timeout, done).await.is_err()
        {
            tracing::warn!(
                ?timeout,
                "spans still being exported at exit were lost: the collector did not answer in time"
            );
        }
    }
}

async fn run(plan: Plan, stop: CancellationToken, ready: std::sync::mpsc::Sender<Result<(), TelemetryError>>) {
    let Plan { spans, flows, identity, resource, counters } = plan;
    let mut flows =
        flows.map(|(out, queue)| (FlowLog { out, failing: false, lost: counters.flow_lines_lost.clone() }, queue));
    let mut spans = match spans {
        Some((spec, queue)) => match Sink::build(spec) {
            Ok(sink) => Some((SpanLoop::new(sink, identity, resource, counters, queue.capacity()), queue)),
            Err(e) => return drop(ready.send(Err(e))),
        },
        None => None,
    };
    let _ = ready.send(Ok(()));
    let mut buf: Vec<Item> = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = stop.cancelled() => true,
        };
        if let Some((log, queue)) = flows.as_mut() {
            queue.take(&mut buf);
            log.write(&mut buf);
        }
        if let Some((span_loop, queue)) = spans.as_mut() {
            queue.take(&mut buf);
            span_loop.send(&mut buf).await;
        }
        if stopping {
            if let Some((span_loop, _)) = spans.as_mut() {
                span_loop.give_up();
            }
            return;
        }
    }
}

/// The flow log's writer, and whether its last write failed (logged once, and once more
/// when writing works again, as span export failures are).
struct FlowLog {
    out: Box<dyn std::io::Write + Send>,
    failing: bool,
    lost: Counter,
}

impl FlowLog {
    /// Writes `buf`'s lines and empties it. A failed write (a full disk, EIO) counts the
    /// batch's lines as lost: a buffered writer may have taken some of them, but nothing
    /// says they reached the file.
    fn write(&mut self, buf: &mut Vec<Item>) {
        let n = buf.len() as u64;
        match write_flow_lines(&mut self.out, buf) {
            Ok(()) if n > 0 && std::mem::take(&mut self.failing) => tracing::info!("flow log writes recovered"),
            Ok(()) => {}
            Err(e) => {
                self.lost.inc_by(n);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(error = %e, "cannot write the flow log; lines are lost until it works again");
                }
            }
        }
        buf.clear();
    }
}

struct SpanLoop {
    sink: Sink,
    identity: Arc<OnceLock<SpiffeId>>,
    extra_resource: Vec<(&'static str, String)>,
    counters: ExportCounters,
    resource_set: bool,
    /// Set after a failed export: until then, batches are dropped without an attempt.
    hold_until: Option<Instant>,
    /// The collector's last answer rejected spans (or warned).
    rejecting: bool,
    /// Denied and failed flows no export has delivered yet, sent first once one works: they
    /// are always exported (DESIGN §7), so a collector's outage delays them rather than
    /// losing them. At most `retain` (the queue's size); past that they count as failed.
    retained: Vec<Item>,
    retain: usize,
}

impl SpanLoop {
    fn new(
        sink: Sink,
        identity: Arc<OnceLock<SpiffeId>>,
        extra_resource: Vec<(&'static str, String)>,
        counters: ExportCounters,
        retain: usize,
    ) -> Self {
        let (hold_until, rejecting, resource_set) = (None, false, false);
        let retained = Vec::new();
        SpanLoop { sink, identity, extra_resource, counters, resource_set, hold_until, rejecting, retained, retain }
    }

    fn holding(&self) -> bool {
        self.hold_until.is_some_and(|t| Instant::now() < t)
    }

    /// Exports what earlier exports could not deliver and everything in `buf`, batch by
    /// batch, and empties `buf`.
    async fn send(&mut self, buf: &mut Vec<Item>) {
        if !self.retained.is_empty() && !self.holding() {
            buf.splice(0..0, self.retained.drain(..));
        }
        for batch in buf.chunks(MAX_BATCH) {
            if self.holding() || !self.export(batch).await {
                self.keep_for_later(batch);
            }
        }
        buf.clear();
    }

    /// Keeps an undelivered batch's denied and failed flows (up to the bound) and counts
    /// the rest as lost.
    fn keep_for_later(&mut self, batch: &[Item]) {
        let room = self.retain.saturating_sub(self.retained.len());
        let before = self.retained.len();
        self.retained.extend(batch.iter().filter(|r| r.must_export()).take(room).cloned());
        let kept = (self.retained.len() - before) as u64;
        self.counters.export_failed.inc_by(batch.len() as u64 - kept);
    }

    /// At exit: what is still kept is lost, and said so.
    fn give_up(&mut self) {
        if !self.retained.is_empty() {
            let n = self.retained.len();
            tracing::warn!(spans = n, "denied or failed flows' spans could not be exported before exit");
            self.counters.export_failed.inc_by(n as u64);
            self.retained.clear();
        }
    }

    /// Sends one batch; `false` if it did not reach the collector (its spans are not counted
    /// yet: the caller keeps or drops them).
    async fn export(&mut self, batch: &[Item]) -> bool {
        if !self.resource_set
            && let Some(id) = self.identity.get()
        {
            let mut attrs = resource(id).to_vec();
            attrs.extend(self.extra_resource.iter().cloned());
            self.sink.set_resource(&attrs);
            self.resource_set = true;
        }
        let n = batch.len() as u64;
        match self.sink.export(batch).await {
            Ok(rejected) => {
                let refused = rejected.spans.min(n);
                self.counters.exported.inc_by(n - refused);
                self.counters.rejected.inc_by(refused);
                if self.hold_until.take().is_some() {
                    tracing::info!("span export recovered");
                }
                // Logged when it starts, and again when it stops; counted every time.
                if (refused > 0 || !rejected.message.is_empty()) != self.rejecting {
                    self.rejecting = !self.rejecting;
                    match self.rejecting {
                        true => {
                            tracing::warn!(spans = refused, of = n, reason = %rejected.message, "the collector rejected spans")
                        }
                        false => tracing::info!("the collector takes every span again"),
                    }
                }
                true
            }
            Err(e) => {
                if self.hold_until.replace(Instant::now() + FAILURE_BACKOFF).is_none() {
                    tracing::warn!(error = %e, "span export failed; dropping allowed flows' spans (keeping denials, up to the queue's size) until it recovers");
                }
                false
            }
        }
    }
}

/// `service.name = trellis-proxy`, its version, and the workload's SPIFFE ID.
pub fn resource(id: &SpiffeId) -> [(&'static str, String); 3] {
    [
        ("service.name", "trellis-proxy".to_string()),
        ("service.version", env!("CARGO_PKG_VERSION").to_string()),
        ("trellis.workload.spiffe_id", id.as_str().to_string()),
    ]
}

fn write_flow_lines(out: &mut Box<dyn std::io::Write + Send>, buf: &mut Vec<Item>) -> std::io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    for r in buf.drain(..) {
        write_flow_line(out, &r)?;
    }
    out.flush()
}
