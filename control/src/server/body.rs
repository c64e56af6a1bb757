//! Reading a request body for a handler: bounded in size and in time.
//!
//! A body over its limit is answered `413` after reading and discarding what the client
//! sends, up to [`DRAIN_MAX`]: an HTTP/1.1 server that answers and closes while request bytes
//! are still arriving gets its connection reset, and the client — still writing — sees the
//! reset, not the `413` (Python's `requests`: "EOF occurred in violation of protocol").
//! A client that stops sending mid-body is answered `408` once it has been silent for the
//! header timeout (`--header-timeout`, [`IdleTimeout`]), or when the whole body has taken
//! [`BODY_TIMEOUT`]: otherwise a declared `Content-Length` never sent held the connection
//! (and its memory) for good.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::{ApiError, MAX_BODY};

/// How long a client may be silent in the middle of a body, as in its headers: the server's
/// `--header-timeout`, put on each request (10 s when absent).
#[derive(Debug, Clone, Copy)]
pub struct IdleTimeout(pub Duration);
/// The most a whole body may take, however it trickles (16 MiB at ~140 KiB/s).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(120);
/// How much of a body over its limit is read and thrown away so the client can read the 413.
pub const DRAIN_MAX: u64 = 64 << 20;

/// Reads a request body of at most `limit` bytes.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let idle = req.extensions().get::<IdleTimeout>().map_or(Duration::from_secs(10), |t| t.0);
    let mut body = req.into_body();
    let deadline = Deadlines { idle, whole: Instant::now() + BODY_TIMEOUT };
    // A declared length over the limit is refused before a byte of it is kept.
    let declared = http_body::Body::size_hint(&body).exact();
    if declared.is_some_and(|n| n > limit as u64) {
        if declared.is_some_and(|n| n <= DRAIN_MAX) {
            drain(&mut body, deadline).await;
        }
        return Err(too_large(limit));
    }
    let mut buf = BytesMut::new();
    while let Some(data) = next_data(&mut body, deadline).await? {
        if buf.len() + data.len() > limit {
            drain(&mut body, deadline).await;
            return Err(too_large(limit));
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

/// Reads and parses a JSON body, naming what was wrong with it.
pub async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = read_body(req, MAX_BODY).await?;
    serde_json::from_slice(&body).map_err(|e| {
        // Well-formed JSON with a value the field refuses (a bad SPIFFE ID) is not "malformed".
        let what = if e.is_data() { "invalid request body" } else { "malformed JSON body" };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

/// The body's next data, `None` at its end (trailers are ignored).
async fn next_data(body: &mut Incoming, deadline: Deadlines) -> Result<Option<Bytes>, ApiError> {
    loop {
        let by = deadline.whole.min(Instant::now() + deadline.idle);
        let frame = match tokio::time::timeout_at(by, body.frame()).await {
            Err(_) => return Err(stalled(deadline.idle)),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(ApiError::bad_request(format!("could not read request body: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
}

/// Reads and discards the rest of a body, up to [`DRAIN_MAX`] bytes and the deadlines.
async fn drain(body: &mut Incoming, deadline: Deadlines) {
    let mut seen = 0u64;
    while let Ok(Some(data)) = next_data(body, deadline).await {
        seen += data.len() as u64;
        if seen > DRAIN_MAX {
            return;
        }
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than {limit} bytes"))
}

fn stalled(idle: Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        format!("the request body stopped arriving (nothing for {idle:?}, or {}s in all)", BODY_TIMEOUT.as_secs()),
    )
}

/// When a body must go on arriving.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    /// Between two of its chunks.
    idle: Duration,
    /// For all of it.
    whole: Instant,
}
