//! W3C Trace Context (`traceparent`): parsed from a request, continued or started, and
//! injected into the request the proxy forwards.
//!
//! Only `traceparent` is interpreted. `tracestate` belongs to the trace it arrived with: it
//! is passed on untouched (and recorded as the span's `trace_state`) when the trace is
//! continued, and removed when a new trace starts (the W3C rule: a vendor that could not
//! parse `traceparent` must not pass `tracestate`).

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The trace a request arrived in: the caller's span, and whether it sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceParent {
    /// The request's `traceparent`, if it carries exactly one valid one.
    pub fn from_headers(headers: &HeaderMap) -> Option<TraceParent> {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let first = values.next()?;
        if values.next().is_some() {
            return None;
        }
        Self::parse(first.as_bytes())
    }

    /// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, lowercase, ids not all zero.
    /// Future versions may append fields after the flags; version `ff` is invalid.
    pub fn parse(v: &[u8]) -> Option<TraceParent> {
        if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let version = hex(&v[0..2])? as u8;
        if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
            return None;
        }
        let trace_id = hex(&v[3..35])?;
        let span_id = hex(&v[36..52])? as u64;
        let flags = hex(&v[53..55])? as u8;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceParent { trace_id, span_id, sampled: flags & 1 == 1 })
    }
}

/// Lowercase hex digits only (the spec forbids uppercase), at most 32 of them.
fn hex(s: &[u8]) -> Option<u128> {
    s.iter().try_fold(0u128, |acc, &c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u128::from(d))
    })
}

/// Longest `tracestate` recorded on a span (W3C: 32 members; vendors keep at least 512
/// characters). A longer one is still passed on untouched, just not recorded.
const MAX_TRACE_STATE: usize = 4096;

/// The request's `tracestate` as one value (several header lines are one list, joined by
/// commas), copied so the span does not hold the connection's read buffer.
pub fn trace_state(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(TRACESTATE).iter();
    let first = values.next()?;
    let mut joined = first.as_bytes().to_vec();
    for v in values {
        joined.push(b',');
        joined.extend_from_slice(v.as_bytes());
    }
    if joined.len() > MAX_TRACE_STATE {
        return None;
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// The identity of one span the proxy records, and where it hangs in its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: u128,
    pub span_id: u64,
    /// The caller's span when the trace was continued from a `traceparent`.
    pub parent: Option<u64>,
    /// Sampled: the caller sampled, or the trace id falls within the sample ratio.
    pub sampled: bool,
}

impl SpanIds {
    /// A child of `parent`, or the root of a new trace.
    pub fn new(parent: Option<TraceParent>, sample_threshold: u64) -> SpanIds {
        let trace_id = parent.map(|p| p.trace_id).unwrap_or_else(nonzero_u128);
        let sampled = parent.is_some_and(|p| p.sampled) || ratio_sampled(trace_id, sample_threshold);
        SpanIds { trace_id, span_id: nonzero_u64(), parent: parent.map(|p| p.span_id), sampled }
    }

    /// This span as the `traceparent` of the request forwarded on its behalf.
    pub fn traceparent(&self) -> HeaderValue {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
        for (i, slot) in buf[3..35].iter_mut().enumerate() {
            *slot = DIGITS[(self.trace_id >> (124 - 4 * i) & 0xf) as usize];
        }
        for (i, slot) in buf[36..52].iter_mut().enumerate() {
            *slot = DIGITS[(self.span_id >> (60 - 4 * i) & 0xf) as usize];
        }
        if self.sampled {
            buf[54] = b'1';
        }
        // Always valid: the buffer holds only ASCII digits, letters and dashes.
        let mut v = HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static(""));
        // A value that changes on every request must not enter the HTTP/2 HPACK table
        // between sidecars: it would evict the headers that repeat, and every request would
        // then re-send them as literals.
        v.set_sensitive(true);
        v
    }

    /// Replaces the request's trace headers with this span's.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if self.parent.is_none() {
            headers.remove(TRACESTATE);
        }
        headers.insert(TRACEPARENT, self.traceparent());
    }
}

/// The OpenTelemetry `TraceIdRatioBased` rule: the low 64 bits of the trace id, shifted
/// right once, below `ratio × 2^63`. Deterministic, so every sidecar on a request's path
/// with the same ratio makes the same choice.
pub fn ratio_sampled(trace_id: u128, threshold: u64) -> bool {
    ((trace_id as u64) >> 1) < threshold
}

/// The threshold [`ratio_sampled`] compares against (`ratio` in 0..=1).
pub fn ratio_threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        1 << 63
    } else if ratio > 0.0 {
        (ratio * (1u64 << 63) as f64) as u64
    } else {
        0
    }
}

fn nonzero_u128() -> u128 {
    loop {
        let v: u128 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_valid_and_rejects_invalid() {
        let p = TraceParent::parse(TP.as_bytes()).unwrap();
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert!(p.sampled);
        let bad = [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // v00 is exact
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        ];
        for b in bad {
            assert_eq!(TraceParent::parse(b.as_bytes()), None, "{b}");
        }
        // A later version with extra fields is read for what version 00 defines.
        assert!(TraceParent::parse(format!("01{}-extra", &TP[2..]).as_bytes()).is_some());
    }

    #[test]
    fn continues_and_formats() {
        let parent = TraceParent::parse(TP.as_bytes()).unwrap();
        let ids = SpanIds::new(Some(parent), 0);
        assert_eq!(ids.trace_id, parent.trace_id);
        assert_eq!(ids.parent, Some(parent.span_id));
        assert!(ids.sampled, "a sampled caller keeps the trace sampled");
        let header = ids.traceparent();
        let back = TraceParent::parse(header.as_bytes()).unwrap();
        assert_eq!((back.trace_id, back.span_id, back.sampled), (ids.trace_id, ids.span_id, true));
        let root = SpanIds::new(None, ratio_threshold(1.0));
        assert!(root.sampled && root.parent.is_none() && root.trace_id != 0);
        assert!(!SpanIds::new(None, ratio_threshold(0.0)).sampled);
    }

    #[test]
    fn multiple_traceparents_are_ignored_and_new_traces_drop_tracestate() {
        let mut h = HeaderMap::new();
        h.append(TRACEPARENT, HeaderValue::from_static(TP));
        h.append(TRACEPARENT, HeaderValue::from_static(TP));
        assert_eq!(TraceParent::from_headers(&h), None);
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=1"));
        SpanIds::new(None, 0).inject(&mut h);
        assert!(!h.contains_key(TRACESTATE));
        assert_eq!(h.get_all(TRACEPARENT).iter().count(), 1);
    }

    #[test]
    fn tracestate_lines_are_one_list_and_an_oversized_one_is_not_recorded() {
        let mut h = HeaderMap::new();
        assert_eq!(trace_state(&h), None);
        h.append(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        h.append(TRACESTATE, HeaderValue::from_static("rojo=00f067aa"));
        assert_eq!(trace_state(&h).unwrap(), "congo=t61rcWkgMzE,rojo=00f067aa");
        let huge = format!("v={}", "x".repeat(MAX_TRACE_STATE));
        h.insert(TRACESTATE, HeaderValue::from_str(&huge).unwrap());
        assert_eq!(trace_state(&h), None);
    }

    #[test]
    fn ratio_is_deterministic_and_proportional() {
        let t = ratio_threshold(0.25);
        let hits =
            (0..10_000u128).filter(|i| ratio_sampled(i.wrapping_mul(0x9e3779b97f4a7c15_f39cc0605cedc835), t)).count();
        assert!((2_000..3_000).contains(&hits), "{hits}");
        assert!(ratio_sampled(u128::MAX, ratio_threshold(1.0)));
    }
}
