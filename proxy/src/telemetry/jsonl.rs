//! JSON-lines output, written on the telemetry thread:
//! - [`SpanWriter`]: `--trace-file`, one span per line (what the demo reads when no
//!   collector is configured), serialized straight from the record;
//! - [`write_flow_line`]: `--flow-log`, one flat object per flow for SIEMs.
//!
//! Field lists are documented in `docs/telemetry.md`.

use std::cell::RefCell;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::attrs::{Attr, Scratch, StatusCode};
use super::record::FlowRecord;

/// Writes spans as JSON lines.
pub struct SpanWriter {
    out: Box<dyn Write + Send>,
    scratch: RefCell<Scratch>,
    resource: Vec<(&'static str, String)>,
}

impl SpanWriter {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        SpanWriter { out, scratch: RefCell::default(), resource: Vec::new() }
    }

    pub fn set_resource(&mut self, attrs: &[(&'static str, String)]) {
        self.resource = attrs.to_vec();
    }

    /// Writes and flushes a batch.
    pub fn write(&mut self, records: &[FlowRecord]) -> std::io::Result<()> {
        for r in records {
            let (code, message) = {
                let mut scratch = self.scratch.borrow_mut();
                let (code, message) = r.status_in(&mut scratch);
                (code, message.map(str::to_string))
            };
            let line = SpanLine {
                trace_id: Hex::new(r.ids.trace_id, 32),
                span_id: Hex::new(u128::from(r.ids.span_id), 16),
                parent_span_id: r.ids.parent.map(|p| Hex::new(u128::from(p), 16)),
                trace_state: r.http.as_ref().and_then(|h| h.trace_state.as_ref()).and_then(|v| v.to_str().ok()),
                name: r.name(),
                kind: if r.kind() == 2 { "server" } else { "client" },
                start_time_unix_nano: unix_nanos(r.started),
                end_time_unix_nano: unix_nanos(r.started) + r.duration.as_nanos() as u64,
                status: StatusLine { code: if code == StatusCode::Error { "error" } else { "unset" }, message },
                attributes: Attributes { record: r, scratch: &self.scratch },
                resource: Resource(&self.resource),
            };
            serde_json::to_writer(&mut self.out, &line)?;
            self.out.write_all(b"\n")?;
        }
        self.out.flush()
    }
}

/// `{trace_id, span_id, parent_span_id, trace_state, name, kind, start_time_unix_nano,
/// end_time_unix_nano, status: {code, message}, attributes: {...}, resource: {...}}`.
#[derive(Serialize)]
struct SpanLine<'a> {
    trace_id: Hex,
    span_id: Hex,
    parent_span_id: Option<Hex>,
    trace_state: Option<&'a str>,
    name: &'static str,
    kind: &'static str,
    start_time_unix_nano: u64,
    end_time_unix_nano: u64,
    status: StatusLine,
    attributes: Attributes<'a>,
    resource: Resource<'a>,
}

#[derive(Serialize)]
struct StatusLine {
    code: &'static str,
    message: Option<String>,
}

struct Attributes<'a> {
    record: &'a FlowRecord,
    scratch: &'a RefCell<Scratch>,
}

impl Serialize for Attributes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        let mut result = Ok(());
        self.record.visit(&mut self.scratch.borrow_mut(), |k, v| {
            if result.is_ok() {
                result = match v {
                    Attr::Str(s) => m.serialize_entry(k, s),
                    Attr::Int(i) => m.serialize_entry(k, &i),
                };
            }
        });
        result?;
        m.end()
    }
}

/// A trace or span id as lowercase hex, formatted without allocating.
struct Hex {
    buf: [u8; 32],
    len: usize,
}

impl Hex {
    fn new(v: u128, digits: usize) -> Hex {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [b'0'; 32];
        for (i, slot) in buf[..digits].iter_mut().enumerate() {
            *slot = DIGITS[(v >> (4 * (digits - 1 - i)) & 0xf) as usize];
        }
        Hex { buf, len: digits }
    }
}

impl Serialize for Hex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(std::str::from_utf8(&self.buf[..self.len]).unwrap_or(""))
    }
}

struct Resource<'a>(&'a [(&'static str, String)]);

impl Serialize for Resource<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// One `--flow-log` line: a flat object per flow.
#[derive(Serialize)]
struct FlowLine<'a> {
    time: String,
    duration_ms: f64,
    direction: &'static str,
    decision: &'static str,
    protocol: &'static str,
    source_spiffe_id: Option<&'a str>,
    destination_spiffe_id: Option<&'a str>,
    peer_address: String,
    peer_port: u16,
    client_address: Option<String>,
    server_port: u16,
    method: Option<&'a str>,
    path: Option<&'a str>,
    status_code: Option<u16>,
    policy: Option<&'a str>,
    rule: Option<i64>,
    policy_version: Option<u64>,
    reason: Option<&'a str>,
    audit: Option<&'a str>,
    error: Option<&'a str>,
    bytes_sent: u64,
    bytes_received: u64,
    trace_id: String,
    span_id: String,
}

/// Writes one flow-log line, newline included.
pub fn write_flow_line(out: &mut dyn Write, r: &FlowRecord) -> std::io::Result<()> {
    let f = &r.facts;
    let (mut reason, mut audit) = (String::new(), String::new());
    let e = r.explain(&mut reason, &mut audit);
    let http = r.http.as_ref();
    let line = FlowLine {
        time: rfc3339(r.started),
        // Whole microseconds, in milliseconds: `2.874524`, not binary float noise `2.8745239999999996`.
        duration_ms: r.duration.as_micros() as f64 / 1000.0,
        direction: f.direction.label(),
        decision: r.verdict.label(),
        protocol: r.protocol,
        source_spiffe_id: f.source.as_ref().map(|s| s.as_str()),
        destination_spiffe_id: f.destination.as_ref().map(|s| s.as_str()),
        peer_address: f.peer.ip().to_string(),
        peer_port: f.peer.port(),
        client_address: f.client.map(|c| c.to_string()),
        server_port: f.server_port,
        method: http.map(|h| h.method.as_str()),
        path: http.map(|h| h.path.as_str()),
        status_code: http.map(|h| h.status).filter(|s| *s != 0),
        policy: e.policy,
        rule: e.rule,
        policy_version: e.version,
        reason: e.reason,
        audit: e.audit,
        error: r.error_type(),
        bytes_sent: r.bytes_sent,
        bytes_received: r.bytes_received,
        trace_id: format!("{:032x}", r.ids.trace_id),
        span_id: format!("{:016x}", r.ids.span_id),
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

/// `2024-05-01T12:34:56.789Z` (UTC, milliseconds), without a date-time dependency.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    format!("{y:04}-{m:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}.{:03}Z", d.subsec_millis())
}

/// Days since 1970-01-01 → (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn hex_ids() {
        let j = |h: Hex| serde_json::to_string(&h).unwrap();
        assert_eq!(j(Hex::new(0xab, 16)), "\"00000000000000ab\"");
        assert_eq!(j(Hex::new(u128::MAX, 32)), format!("\"{}\"", "f".repeat(32)));
    }

    #[test]
    fn a_flow_lines_duration_is_whole_microseconds_in_milliseconds() {
        let mut r = crate::telemetry::tests::sample_record();
        r.duration = Duration::from_nanos(2_874_524_999);
        let mut out = Vec::new();
        write_flow_line(&mut out, &r).unwrap();
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["duration_ms"].to_string(), "2874.524");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_123); // leap year, end of Feb
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    }
}
