//! The watch stream: a long-lived `text/event-stream` response per proxy, authenticated by
//! its SVID, carrying the policies that select it, the trust bundle, the endpoint registry
//! and (in Kubernetes mode) the service table — all of them on connect, then whatever
//! changed, whenever it changes.
//!
//! One task per stream waits on the change hub; a burst of changes wakes it once, and it
//! sends the state current at that moment. A comment line every [`KEEPALIVE`] lets both
//! ends notice a dead connection. The proxy acknowledges the version it enforces with
//! `POST /v1/watch/ack` (a version above the current one is refused with 400).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis_identity::SpiffeId;

use super::{ApiError, ApiResult, Conn, Ctx, json, read_json, require_svid};
use crate::api::AckRequest;
use crate::state::{AckError, SessionGuard, Shared};

/// How often an idle stream sends a keepalive comment.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

pub async fn watch(ctx: &Ctx, conn: &Conn, req: Request<Incoming>) -> ApiResult {
    let (id, expires, serial) = require_svid(ctx, conn)?;
    drop(req);
    let guard = ctx.shared.open_session(id.clone(), conn.remote.ip().to_string(), Some((expires, serial)));
    tracing::info!(spiffe_id = %id, remote = %conn.remote, session = guard.session, "proxy connected");
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(stream_updates(ctx.shared.clone(), id, guard, tx));
    let body = StreamBody::new(ReceiverStream::new(rx)).boxed();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(body)
        .map_err(ApiError::internal)
}

/// What this stream last sent, so later events carry only changes.
#[derive(Default)]
struct Sent {
    policies: Option<String>,
    bundle: Option<String>,
    endpoints_version: Option<u64>,
    services_version: Option<u64>,
    version: Option<u64>,
}

async fn stream_updates(
    shared: Arc<Shared>,
    id: SpiffeId,
    guard: SessionGuard,
    tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
) {
    let mut changes = shared.subscribe();
    let mut sent = Sent::default();
    loop {
        changes.mark_unchanged();
        if let Some(event) = next_event(&shared, &id, guard.session, &mut sent)
            && tx.send(Ok(Frame::data(event))).await.is_err()
        {
            break;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            () = tokio::time::sleep(KEEPALIVE) => {
                if tx.send(Ok(Frame::data(Bytes::from_static(b": keepalive\n\n")))).await.is_err() {
                    break;
                }
                shared.touch(guard.session);
            }
            () = tx.closed() => break,
            () = guard.ended.notified() => {
                tracing::info!(spiffe_id = %id, session = guard.session, "session ended: newer ones of the same SVID");
                break;
            }
        }
    }
    tracing::info!(spiffe_id = %id, session = guard.session, "proxy disconnected");
}

/// The SSE frame bringing this stream up to date, or `None` if nothing it cares about changed.
fn next_event(shared: &Shared, id: &SpiffeId, session: u64, sent: &mut Sent) -> Option<Bytes> {
    let policy = shared.policy.load();
    let registry = shared.registry.load();
    let bundle_pem = shared.bundle.load().to_pem();
    let policies = policy.selecting_json(id);
    let version = policy.version();

    let mut data = format!("{{\"session\":{session},\"version\":{version}");
    let mut changed = sent.version != Some(version);
    if sent.policies.as_deref() != Some(policies.as_str()) {
        let _ = write!(data, ",\"policies\":{policies}");
        sent.policies = Some(policies);
        changed = true;
    }
    if sent.bundle.as_deref() != Some(bundle_pem.as_str()) {
        let _ = write!(data, ",\"bundle_pem\":{}", serde_json::Value::String(bundle_pem.clone()));
        sent.bundle = Some(bundle_pem);
        changed = true;
    }
    if sent.endpoints_version != Some(registry.version) {
        let _ = write!(data, ",\"endpoints_version\":{},\"endpoints\":{}", registry.version, registry.json);
        sent.endpoints_version = Some(registry.version);
        changed = true;
    }
    let services = shared.services.load();
    if services.version > 0 && sent.services_version != Some(services.version) {
        let _ = write!(data, ",\"services_version\":{},\"services\":{}", services.version, services.json);
        sent.services_version = Some(services.version);
        changed = true;
    }
    if !changed {
        return None;
    }
    sent.version = Some(version);
    data.push('}');
    Some(Bytes::from(format!("event: update\ndata: {data}\n\n")))
}

pub async fn ack(ctx: &Ctx, conn: &Conn, req: Request<Incoming>) -> ApiResult {
    let (id, _, _) = require_svid(ctx, conn)?;
    let body: AckRequest = read_json(req).await?;
    let recorded = match ctx.shared.ack(body.session, &id, body.version) {
        Ok(recorded) => recorded,
        Err(AckError::NoSession) => {
            return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no watch session {} for {id}", body.session)));
        }
        Err(e @ AckError::Ahead { .. }) => return Err(ApiError::bad_request(e.to_string())),
    };
    tracing::debug!(spiffe_id = %id, version = body.version, recorded, "proxy acked");
    Ok(json(StatusCode::OK, &serde_json::json!({"acked": recorded})))
}
