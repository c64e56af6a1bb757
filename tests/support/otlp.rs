//! A real OTLP trace receiver inside the test: OTLP/gRPC (the `opentelemetry-proto`
//! generated `TraceService` server, served by hyper over HTTP/2) and OTLP/HTTP protobuf
//! (`POST /v1/traces`, decoded with `prost`). Received spans are flattened into [`Span`]s.
//! A receiver can be made slow (`delay` per export) to test that exports never hold up
//! the data path.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use serde_json::Value as Json;
use tokio::net::TcpListener;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: String,
    /// OTLP `SpanKind`: 2 = SERVER, 3 = CLIENT.
    pub kind: i32,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// The W3C `tracestate` of the span's trace (empty when none).
    pub trace_state: String,
    /// OTLP `StatusCode`: 0 = unset, 1 = ok, 2 = error.
    pub status_code: i32,
    pub status_message: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attrs: BTreeMap<String, Json>,
    pub resource: BTreeMap<String, Json>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&Json> {
        self.attrs.get(key)
    }

    pub fn str(&self, key: &str) -> &str {
        self.attrs.get(key).and_then(Json::as_str).unwrap_or("")
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        self.attrs.get(key).and_then(Json::as_i64)
    }
}

#[derive(Clone, Default)]
struct Store {
    spans: Arc<Mutex<Vec<Span>>>,
    exports: Arc<AtomicUsize>,
    delay: Duration,
    /// Answer every export with a partial success rejecting all its spans.
    rejecting: Arc<std::sync::atomic::AtomicBool>,
}

impl Store {
    /// Takes the request's spans, and answers as the collector does.
    async fn take(&self, req: ExportTraceServiceRequest) -> ExportTraceServiceResponse {
        self.exports.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let spans = flatten(req);
        let n = spans.len() as i64;
        if self.rejecting.load(Ordering::SeqCst) {
            let partial = ExportTracePartialSuccess { rejected_spans: n, error_message: "over the span limit".into() };
            return ExportTraceServiceResponse { partial_success: Some(partial) };
        }
        self.spans.lock().unwrap().extend(spans);
        ExportTraceServiceResponse { partial_success: None }
    }
}

/// A running receiver.
pub struct Receiver {
    pub addr: SocketAddr,
    store: Store,
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.take(request.into_inner()).await))
    }
}

impl Receiver {
    /// OTLP/gRPC on a free loopback port.
    pub async fn grpc(delay: Duration) -> Receiver {
        Receiver::grpc_on("127.0.0.1:0".parse().unwrap(), delay).await
    }

    /// OTLP/gRPC on `addr` (a collector that comes up where the proxies were told it is).
    pub async fn grpc_on(addr: SocketAddr, delay: Duration) -> Receiver {
        let store = Store { delay, ..Store::default() };
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(store.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Receiver { addr, store }
    }

    /// OTLP/HTTP (protobuf) on a free loopback port.
    pub async fn http(delay: Duration) -> Receiver {
        let store = Store { delay, ..Store::default() };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = store.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(http_export(&st, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Receiver { addr, store }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.store.spans.lock().unwrap().clone()
    }

    /// From now on, answer every export with a partial success rejecting all its spans
    /// (as a collector over its limits does), keeping none.
    pub fn reject_everything(&self) {
        self.store.rejecting.store(true, Ordering::SeqCst);
    }

    /// Export calls received so far.
    pub fn exports(&self) -> usize {
        self.store.exports.load(Ordering::SeqCst)
    }

    /// Waits for a span matching `pred`.
    pub async fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Span) -> bool) -> Span {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.spans().into_iter().find(|s| pred(s)) {
                return s;
            }
            if Instant::now() > deadline {
                let names: Vec<String> = self.spans().iter().map(describe).collect();
                panic!("no span for {what} within {timeout:?}; received:\n{}", names.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A one-line summary of a span, for failure messages.
pub fn describe(s: &Span) -> String {
    format!("{} kind={} trace={} parent={:?} attrs={:?}", s.name, s.kind, s.trace_id, s.parent_span_id, s.attrs)
}

async fn http_export(st: &Store, req: http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
    let ok_path = req.method() == http::Method::POST && req.uri().path() == "/v1/traces";
    let protobuf = req.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v == "application/x-protobuf");
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let (status, reply) = match (ok_path && protobuf, ExportTraceServiceRequest::decode(body)) {
        (true, Ok(decoded)) => (http::StatusCode::OK, st.take(decoded).await),
        _ => (http::StatusCode::BAD_REQUEST, ExportTraceServiceResponse { partial_success: None }),
    };
    let reply = reply.encode_to_vec();
    let mut resp = http::Response::new(Full::new(Bytes::from(reply)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-protobuf"));
    resp
}

fn flatten(req: ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource = attrs(rs.resource.map(|r| r.attributes).unwrap_or_default());
        for ss in rs.scope_spans {
            for s in ss.spans {
                let status = s.status.unwrap_or_default();
                out.push(Span {
                    name: s.name,
                    kind: s.kind,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    trace_state: s.trace_state.clone(),
                    status_code: status.code,
                    status_message: status.message,
                    start_unix_nano: s.start_time_unix_nano,
                    end_unix_nano: s.end_time_unix_nano,
                    attrs: attrs(s.attributes),
                    resource: resource.clone(),
                });
            }
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attrs(kvs: Vec<KeyValue>) -> BTreeMap<String, Json> {
    kvs.into_iter().map(|kv| (kv.key, kv.value.map(value).unwrap_or(Json::Null))).collect()
}

fn value(v: AnyValue) -> Json {
    match v.value {
        Some(any_value::Value::StringValue(s)) => Json::String(s),
        Some(any_value::Value::IntValue(i)) => Json::from(i),
        Some(any_value::Value::BoolValue(b)) => Json::Bool(b),
        Some(any_value::Value::DoubleValue(d)) => Json::from(d),
        other => Json::String(format!("{other:?}")),
    }
}
