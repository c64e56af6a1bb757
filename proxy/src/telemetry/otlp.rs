//! OTLP export: finished flows encoded straight into an `ExportTraceServiceRequest`
//! (protobuf, per `opentelemetry/proto/collector/trace/v1`) and sent over OTLP/gRPC (tonic)
//! or OTLP/HTTP (`POST <endpoint>/v1/traces`, `application/x-protobuf`).
//!
//! Why not `opentelemetry-otlp`: its exporter takes the SDK's `SpanData` and converts it to
//! the generated protobuf structs before encoding — two owned copies of every attribute,
//! dozens of allocations per span. Measured on the reference machine that path cost 44 %
//! more sidecar CPU per request with tracing on; encoding from the record into one reused
//! buffer costs a small fraction of that (numbers in `docs/telemetry.md`). The wire format
//! is checked by the end-to-end tests, which decode it with the `opentelemetry-proto` types.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use super::attrs::{Attr, Scratch, StatusCode};
use super::record::FlowRecord;
use super::{OtlpProtocol, TelemetryError};

const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// OTLP span flags: the context-has-is-remote bit, and the is-remote bit (of the parent).
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// Encodes batches of flows, reusing its buffers from batch to batch.
#[derive(Debug, Default)]
pub struct Encoder {
    scratch: Scratch,
    /// The encoded `Resource` message.
    resource: Vec<u8>,
    span: Vec<u8>,
    spans: Vec<u8>,
}

impl Encoder {
    /// Sets the resource attributes every batch carries.
    pub fn set_resource(&mut self, attrs: &[(&'static str, String)]) {
        self.resource.clear();
        for (k, v) in attrs {
            key_value(1, k, Attr::Str(v), &mut self.resource);
        }
    }

    /// One `ExportTraceServiceRequest` holding `records`, written to `out`.
    pub fn encode(&mut self, records: &[FlowRecord], out: &mut Vec<u8>) {
        self.spans.clear();
        for r in records {
            self.span.clear();
            encode_span(r, &mut self.scratch, &mut self.span);
            len_field(2, &self.span, &mut self.spans);
        }
        let mut scope = Vec::with_capacity(32);
        str_field(1, "trellis-proxy", &mut scope);
        str_field(2, env!("CARGO_PKG_VERSION"), &mut scope);
        // ScopeSpans { scope = 1, spans = 2 }.
        let scope_spans_len = field_len(scope.len()) + self.spans.len();
        // ResourceSpans { resource = 1, scope_spans = 2 }.
        let resource_spans_len = field_len(self.resource.len()) + field_len(scope_spans_len);
        out.clear();
        out.reserve(field_len(resource_spans_len));
        len_header(1, resource_spans_len, out);
        len_field(1, &self.resource, out);
        len_header(2, scope_spans_len, out);
        len_field(1, &scope, out);
        out.extend_from_slice(&self.spans);
    }
}

fn encode_span(r: &FlowRecord, scratch: &mut Scratch, b: &mut Vec<u8>) {
    len_field(1, &r.ids.trace_id.to_be_bytes(), b);
    len_field(2, &r.ids.span_id.to_be_bytes(), b);
    if let Some(state) = r.http.as_ref().and_then(|h| h.trace_state.as_ref()) {
        len_field(3, state.as_bytes(), b);
    }
    if let Some(parent) = r.ids.parent {
        len_field(4, &parent.to_be_bytes(), b);
    }
    str_field(5, r.name(), b);
    varint_field(6, r.kind() as u64, b);
    let start = nanos(r.started);
    fixed64_field(7, start, b);
    fixed64_field(8, start + r.duration.as_nanos() as u64, b);
    r.visit(scratch, |k, v| key_value(9, k, v, b));
    if let (StatusCode::Error, message) = r.status_in(scratch) {
        let message = message.unwrap_or("");
        // Status { message = 2, code = 3 }.
        len_header(15, field_len(message.len()) + 1 + encoded_len_varint(StatusCode::Error as u64), b);
        str_field(2, message, b);
        varint_field(3, StatusCode::Error as u64, b);
    }
    let sampled = u32::from(r.ids.sampled);
    let remote = if r.ids.parent.is_some() { FLAG_IS_REMOTE } else { 0 };
    encode_key(16, WireType::ThirtyTwoBit, b);
    b.put_u32_le(sampled | FLAG_HAS_IS_REMOTE | remote);
}

/// `KeyValue { key = 1, value = 2: AnyValue { string_value = 1 | int_value = 3 } }` as
/// field `tag`.
fn key_value(tag: u32, key: &str, value: Attr<'_>, b: &mut Vec<u8>) {
    let any_len = match value {
        Attr::Str(s) => field_len(s.len()),
        Attr::Int(i) => 1 + encoded_len_varint(i as u64),
    };
    len_header(tag, field_len(key.len()) + field_len(any_len), b);
    str_field(1, key, b);
    len_header(2, any_len, b);
    match value {
        Attr::Str(s) => str_field(1, s, b),
        Attr::Int(i) => varint_field(3, i as u64, b),
    }
}

/// Bytes a length-delimited field with a one-byte key and `len` bytes of payload takes.
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn len_header(tag: u32, len: usize, b: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, b);
    encode_varint(len as u64, b);
}

fn len_field(tag: u32, data: &[u8], b: &mut Vec<u8>) {
    len_header(tag, data.len(), b);
    b.extend_from_slice(data);
}

fn str_field(tag: u32, s: &str, b: &mut Vec<u8>) {
    len_field(tag, s.as_bytes(), b);
}

fn varint_field(tag: u32, v: u64, b: &mut Vec<u8>) {
    encode_key(tag, WireType::Varint, b);
    encode_varint(v, b);
}

fn fixed64_field(tag: u32, v: u64, b: &mut Vec<u8>) {
    encode_key(tag, WireType::SixtyFourBit, b);
    b.put_u64_le(v);
}

fn nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Where encoded requests go.
pub enum Transport {
    Grpc(tonic::client::Grpc<tonic::transport::Channel>),
    Http { client: Box<Client<HttpConnector, Full<Bytes>>>, url: http::Uri },
}

impl Transport {
    /// Connects lazily: must run inside the telemetry thread's runtime.
    pub fn new(endpoint: &str, protocol: OtlpProtocol, timeout: Duration) -> Result<Transport, TelemetryError> {
        let bad = |e: &dyn std::fmt::Display| TelemetryError::Exporter(format!("{endpoint}: {e}"));
        match protocol {
            OtlpProtocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
                    .map_err(|e| bad(&e))?
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect_lazy();
                Ok(Transport::Grpc(tonic::client::Grpc::new(channel)))
            }
            OtlpProtocol::Http => {
                let url = http_traces_url(endpoint).parse().map_err(|e| bad(&e))?;
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(timeout));
                connector.set_nodelay(true);
                let client = Box::new(Client::builder(TokioExecutor::new()).build(connector));
                Ok(Transport::Http { client, url })
            }
        }
    }

    /// Sends one export request; `Ok` carries what the collector said it did not take.
    pub async fn send(&mut self, body: Bytes) -> Result<Rejected, String> {
        match self {
            Transport::Grpc(grpc) => {
                grpc.ready().await.map_err(|e| {
                    format!("cannot reach the collector: {}", chain_from(e.to_string(), std::error::Error::source(&e)))
                })?;
                let path = http::uri::PathAndQuery::from_static(GRPC_PATH);
                let r = grpc.unary(tonic::Request::new(body), path, RawCodec).await;
                // The usual mistake: a collector's OTLP/HTTP port given for the default gRPC.
                let hint = "(sent as OTLP/gRPC; a collector's OTLP/HTTP endpoint, usually port 4318, needs --otlp-protocol http)";
                r.map(|answer| Rejected::from(answer.into_inner())).map_err(|s| {
                    // Status's own Display already names its source: its message, then the causes.
                    let what = chain_from(s.message().to_string(), std::error::Error::source(&s));
                    if never_connected(&s) {
                        // Nothing answered: the protocol is not the question.
                        format!("cannot connect to the collector: {what}")
                    } else {
                        format!("gRPC {:?}: {what} {hint}", s.code())
                    }
                })
            }
            Transport::Http { client, url } => {
                let req = http::Request::post(url.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(body))
                    .map_err(|e| e.to_string())?;
                let hint = "(sent as OTLP/HTTP; a collector's OTLP/gRPC endpoint, usually port 4317, needs --otlp-protocol grpc)";
                let resp = client.request(req).await.map_err(|e| {
                    let what = chain_from(e.to_string(), std::error::Error::source(&e));
                    match e.is_connect() {
                        // Nothing answered: the protocol is not the question.
                        true => format!("cannot connect to the collector at {url}: {what}"),
                        false => format!("{what} {hint}"),
                    }
                })?;
                let status = resp.status();
                // Read the (small) answer so the connection is reused, and for what it rejected.
                let answer = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                if !status.is_success() {
                    return Err(format!("HTTP {status}"));
                }
                Ok(Rejected::from(ExportResponse::decode(answer).unwrap_or_default()))
            }
        }
    }
}

/// Whether a gRPC export failed for want of a connection (refused, timed out, no address):
/// tonic wraps exactly those in a `ConnectError`, unlike a connection made and then lost.
fn never_connected(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<tonic::ConnectError>() {
            return true;
        }
        next = err.source();
    }
    false
}

/// `first`, then the causes from `source` on (`client error (Connect): tcp connect error:
/// Connection refused`): hyper's and tonic's own messages alone do not say what failed. A
/// cause whose text was already said (layers that display their inner error, or share its
/// message) is left out.
fn chain_from(first: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut said = vec![first];
    while let Some(cause) = source {
        let text = cause.to_string();
        if !said.contains(&text) {
            said.push(text);
        }
        source = cause.source();
    }
    said.join(": ")
}

/// OTLP/HTTP posts traces to `/v1/traces` under the collector's base URL.
pub fn http_traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") }
}

/// What a collector said it did not take from an export it answered with success: OTLP's
/// `partial_success` (spans refused for limits or bad data). An answer that does not decode
/// is taken as a full success — the export itself was accepted.
#[derive(Debug, Default, PartialEq)]
pub struct Rejected {
    pub spans: u64,
    pub message: String,
}

impl From<ExportResponse> for Rejected {
    fn from(answer: ExportResponse) -> Self {
        let partial = answer.partial_success.unwrap_or_default();
        Rejected { spans: partial.rejected_spans.max(0) as u64, message: partial.error_message }
    }
}

/// `ExportTraceServiceResponse`: the only field a collector answers with.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportResponse {
    #[prost(message, optional, tag = "1")]
    pub partial_success: Option<PartialSuccess>,
}

/// `ExportTracePartialSuccess`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PartialSuccess {
    #[prost(int64, tag = "1")]
    pub rejected_spans: i64,
    #[prost(string, tag = "2")]
    pub error_message: String,
}

/// A gRPC codec for a request already encoded, whose answer is decoded for its partial
/// success.
struct RawCodec;

struct RawEncoder;

struct AnswerDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportResponse;
    type Encoder = RawEncoder;
    type Decoder = AnswerDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> AnswerDecoder {
        AnswerDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for AnswerDecoder {
    type Item = ExportResponse;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<ExportResponse>, tonic::Status> {
        let answer = ExportResponse::decode(&mut *src).unwrap_or_default();
        src.advance(src.remaining());
        Ok(Some(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_url() {
        assert_eq!(http_traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
    }

    #[test]
    fn varint_lengths_match_what_is_written() {
        let mut b = Vec::new();
        key_value(9, "k", Attr::Int(-1), &mut b);
        key_value(9, "key", Attr::Str(&"v".repeat(300)), &mut b);
        // Walk the two fields back: tag, length, payload of exactly that length.
        let mut rest = &b[..];
        for _ in 0..2 {
            assert_eq!(rest[0], 9 << 3 | 2);
            rest = &rest[1..];
            let len = prost::encoding::decode_varint(&mut rest).unwrap() as usize;
            rest = &rest[len..];
        }
        assert!(rest.is_empty());
    }
}
