//! Prometheus metrics, exposed as text on the admin listener's `/metrics`.
//!
//! Label sets are bounded (direction, decision, protocol, reason): no per-identity or
//! per-path labels, so cardinality cannot grow with the mesh. Every stage of the data path
//! bumps its counter here; spans (telemetry) carry the per-flow detail.
//!
//! `decision` is `allow`, `deny`, `audit-deny` (allowed, but an audit-mode policy would deny
//! it) or `error` (never reached a decision: peer unreachable); outbound HTTP takes the
//! peer's decision from its response headers.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub direction: &'static str,
    pub decision: &'static str,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub flows: Family<FlowLabels, Counter>,
    pub request_duration: Family<DirectionLabels, Histogram>,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    pub svid_expiry: Gauge,
    pub policy_version: Gauge,
    /// Spans that never reached the exporter (`queue_full`) or that it failed to send
    /// (`export_failed`).
    pub spans_dropped: Family<ReasonLabels, Counter>,
    pub spans_exported: Counter,
    pub flow_log_dropped: Family<ReasonLabels, Counter>,
    pub detect_timeouts: Counter,
    /// Open connections (TCP tunnels, HTTP connections, upgraded WebSockets) a policy change
    /// closed because it no longer allows them.
    pub connections_revoked: Counter,
    pub open_connections: Family<DirectionLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let flows = Family::<FlowLabels, Counter>::default();
        registry.register(
            "flows",
            "Flows by direction, decision (allow, deny, audit-deny, error: nothing decided, e.g. the peer was unreachable) and protocol",
            flows.clone(),
        );
        let request_duration = Family::<DirectionLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        });
        registry.register_with_unit(
            "request_duration",
            "HTTP request latency through this proxy",
            prometheus_client::registry::Unit::Seconds,
            request_duration.clone(),
        );
        let handshake_failures = Family::<ReasonLabels, Counter>::default();
        registry.register("handshake_failures", "TLS handshakes that failed, by reason", handshake_failures.clone());
        let svid_expiry = Gauge::default();
        registry.register(
            "svid_expiry_timestamp_seconds",
            "When the current SVID expires (Unix seconds)",
            svid_expiry.clone(),
        );
        let policy_version = Gauge::default();
        registry.register("policy_version", "Version of the policy snapshot being enforced", policy_version.clone());
        let spans_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "spans_dropped",
            "Spans dropped: the export queue was full (queue_full), the export failed (export_failed) or the collector refused them (rejected)",
            spans_dropped.clone(),
        );
        // Every reason shows from the start, at 0, so alerts and dashboards see the series.
        for reason in ["queue_full", "export_failed", "rejected"] {
            let _ = spans_dropped.get_or_create(&ReasonLabels { reason });
        }
        let spans_exported = Counter::default();
        registry.register("spans_exported", "Spans the exporter accepted", spans_exported.clone());
        let flow_log_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "flow_log_dropped",
            "Flow-log lines lost: the flow-log queue was full (queue_full) or writing failed (write_failed)",
            flow_log_dropped.clone(),
        );
        for reason in ["queue_full", "write_failed"] {
            let _ = flow_log_dropped.get_or_create(&ReasonLabels { reason });
        }
        let detect_timeouts = Counter::default();
        registry.register(
            "protocol_detect_timeouts",
            "Connections treated as opaque TCP because no bytes arrived before the detect timeout",
            detect_timeouts.clone(),
        );
        let connections_revoked = Counter::default();
        registry.register(
            "connections_revoked",
            "Open connections closed because a policy change no longer allows them",
            connections_revoked.clone(),
        );
        let open_connections = Family::<DirectionLabels, Gauge>::default();
        registry.register("open_connections", "Connections currently open", open_connections.clone());
        for direction in ["inbound", "outbound"] {
            let _ = open_connections.get_or_create(&DirectionLabels { direction });
        }
        Metrics {
            registry,
            flows,
            request_duration,
            handshake_failures,
            svid_expiry,
            policy_version,
            spans_dropped,
            spans_exported,
            flow_log_dropped,
            detect_timeouts,
            connections_revoked,
            open_connections,
        }
    }

    pub fn flow(&self, direction: &'static str, decision: &'static str, protocol: &'static str) {
        self.flows.get_or_create(&FlowLabels { direction, decision, protocol }).inc();
    }

    pub fn handshake_failure(&self, reason: &'static str) {
        self.handshake_failures.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn spans_dropped_queue_full(&self) -> Counter {
        self.spans_dropped.get_or_create(&ReasonLabels { reason: "queue_full" }).clone()
    }

    pub fn spans_dropped_export_failed(&self) -> Counter {
        self.spans_dropped.get_or_create(&ReasonLabels { reason: "export_failed" }).clone()
    }

    pub fn spans_rejected(&self) -> Counter {
        self.spans_dropped.get_or_create(&ReasonLabels { reason: "rejected" }).clone()
    }

    pub fn flow_log_dropped(&self, reason: &'static str) -> Counter {
        self.flow_log_dropped.get_or_create(&ReasonLabels { reason }).clone()
    }

    /// Connections open now, both directions.
    pub fn open_connections_total(&self) -> i64 {
        ["inbound", "outbound"]
            .into_iter()
            .map(|direction| self.open_connections.get_or_create(&DirectionLabels { direction }).get())
            .sum()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The same samples in Prometheus' classic text format (0.0.4), for scrapers that do not
    /// ask for OpenMetrics. The two differ, for these metric types, only in that a counter's
    /// `# HELP` and `# TYPE` name the samples' `_total` name, and that there is no `# UNIT`
    /// and no `# EOF`; a 0.0.4 parser given OpenMetrics loses every counter's type.
    pub fn encode_classic(&self) -> String {
        classic(&self.encode())
    }
}

fn classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let directive = ["# HELP ", "# TYPE "].into_iter().find(|d| line.starts_with(d));
        match directive.map(|d| (d, line[d.len()..].split_once(' ').unwrap_or((&line[d.len()..], "")))) {
            Some((d, (name, rest))) if counters.contains(name) => {
                out.push_str(&format!("{d}{name}_total {rest}"));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Counts an open connection for as long as it lives.
pub struct OpenGuard(Gauge);

impl OpenGuard {
    pub fn new(metrics: &Metrics, direction: &'static str) -> Self {
        let g = metrics.open_connections.get_or_create(&DirectionLabels { direction }).clone();
        g.inc();
        OpenGuard(g)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn classic_text_names_each_counter_as_its_samples_do() {
        let m = Metrics::new();
        m.flow("inbound", "allow", "http1");
        m.request_duration.get_or_create(&DirectionLabels { direction: "inbound" }).observe(0.002);
        m.policy_version.set(7);
        let (open, classic) = (m.encode(), m.encode_classic());
        assert!(open.contains("# TYPE trellis_flows counter\n") && open.ends_with("# EOF\n"), "{open}");

        assert!(classic.contains("# TYPE trellis_flows_total counter\n"), "{classic}");
        assert!(classic.contains("# HELP trellis_flows_total Flows by direction"), "{classic}");
        assert!(classic.contains("# TYPE trellis_spans_dropped_total counter\n"), "{classic}");
        assert!(classic.contains("# TYPE trellis_request_duration_seconds histogram\n"), "{classic}");
        assert!(classic.contains("# TYPE trellis_policy_version gauge\n"), "{classic}");
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"), "{classic}");
        for name in classic.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")) {
            assert!(name.ends_with("_total"), "{name} in {classic}");
        }
        // The samples themselves are the same lines in both formats.
        assert_eq!(samples(&open), samples(&classic));
        assert!(
            classic.contains("trellis_flows_total{direction=\"inbound\",decision=\"allow\",protocol=\"http1\"} 1\n")
        );
    }
}
