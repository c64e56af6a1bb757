//! HTTP pieces both directions share: the response body type, the Trellis headers,
//! hop-by-hop header handling (RFC 9110 §7.6.1), generated error responses, and the request
//! target the inbound sends to its app (the hyper server settings are in [`crate::serve`]).

use std::borrow::Cow;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use trellis_policy::normalize_path;

use crate::conns::Revocable;
use crate::peer_h2::PeerBody;

/// Responses are either relayed (from an app: `Incoming`, or [`Revocable`] while its
/// request may still be revoked; from a peer sidecar over the pooled connection:
/// [`PeerBody`]) or generated here (`Full`).
pub type RespBody = Either<Either<Incoming, PeerBody>, Either<Full<Bytes>, Revocable>>;

/// An app's response body to the inbound: from an HTTP/1.1 connection (hyper's) or an
/// HTTP/2 one (`h2`'s, [`crate::app::AppClient::send_h2`]).
pub type AppBody = Either<Incoming, PeerBody>;

/// A body relayed as hyper received it: the answer to an upgrade (from an app or a peer,
/// each on its own connection). An app's ordinary response is [`revocable`].
pub fn relayed(body: Incoming) -> RespBody {
    Either::Left(Either::Left(body))
}

/// An app's response to a request a policy change may still revoke (the inbound's).
pub fn revocable(body: Revocable) -> RespBody {
    Either::Right(Either::Right(body))
}

/// A peer sidecar's response body from the pooled connection, relayed.
pub fn from_peer(body: PeerBody) -> RespBody {
    Either::Left(Either::Right(body))
}

/// Request bodies, counted for the request's span as they stream through.
pub type ReqBody = crate::telemetry::body::Counted<Incoming>;
/// What the HTTP stacks answer: the response body that finishes the request's span.
pub type TracedBody = crate::telemetry::body::Traced<RespBody>;

/// The verified SPIFFE ID of the caller, set by the inbound sidecar for the app.
pub const PEER_ID: HeaderName = HeaderName::from_static("x-trellis-peer-id");
/// Why a request was refused (on 403s).
pub const DENIED: HeaderName = HeaderName::from_static("x-trellis-denied");
/// Why the proxy could not forward (on 502/503/504s it generates).
pub const ERROR: HeaderName = HeaderName::from_static("x-trellis-error");
/// On an allowed response from an inbound sidecar: the audit-mode policy that would deny
/// the request (same format as `x-trellis-denied`). The outbound sidecar reads it for its
/// span and metrics and removes it; the app never sees it.
pub const AUDIT: HeaderName = HeaderName::from_static("x-trellis-audit");
/// Marks a request the outbound sidecar carried over HTTP/2 although the app spoke
/// HTTP/1.x, so the inbound sidecar speaks HTTP/1.1 to its app again.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-trellis-orig-proto");

/// The h2c upgrade's settings (RFC 7540 §3.2.1): connection-specific, so hop-by-hop even
/// when `Connection` does not name it.
pub const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Not `Trailer`: it announces the trailer fields end to end (RFC 9110 §6.6.2), and hyper's
/// HTTP/1.1 server and client write only the trailers it names (RFC 2616 listed a `Trailers`
/// here; RFC 9110 §7.6.1 does not).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HTTP2_SETTINGS,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers: the fixed set, whatever `Connection` names, and `TE`
/// except `TE: trailers` (which gRPC needs end to end over HTTP/2, and without which hyper
/// writes no trailers to an HTTP/1.1 client).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these: one pass over the names instead of a hashed
    // removal per hop-by-hop header, on every request and response, both directions.
    if !headers.keys().any(|n| *n == header::TE || HOP_BY_HOP.contains(n)) {
        return;
    }
    // The values are cloned (they share their bytes) and each token removed by its text:
    // HeaderMap looks a `&str` up without building a `HeaderName`, so the usual
    // `Connection: keep-alive` costs no allocation. Names that are not valid match nothing.
    let mut values = headers.get_all(header::CONNECTION).iter();
    let first = values.next().cloned();
    let rest: Vec<HeaderValue> = values.cloned().collect();
    for value in first.iter().chain(&rest) {
        for name in value.to_str().unwrap_or_default().split(',') {
            headers.remove(name.trim());
        }
    }
    // With Transfer-Encoding, Content-Length means nothing (RFC 9112 §6.3): the body was
    // framed by its chunks, and relayed with a stale length it would be cut or hang.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    let te_trailers = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(header::TE);
    }
}

/// Whether a message's `Transfer-Encoding` names a coding other than `chunked` (`gzip,
/// chunked`): hyper decodes the chunks only, and the sidecars re-frame the body, so the
/// other coding would be silently lost — the receiver would read gzip as plain bytes. RFC
/// 9112 §6.1: a request gets `501`; an app's response, `502`.
pub fn other_transfer_coding(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .any(|v| v.to_str().map_or(true, |v| v.split(',').any(|c| !c.trim().eq_ignore_ascii_case("chunked"))))
}

/// Removes the headers only Trellis may set from an app's response, so an app cannot make
/// its answer look like a sidecar's denial, audit finding or failure.
pub fn strip_trellis_headers(headers: &mut HeaderMap) {
    if headers.keys().any(|n| n.as_str().starts_with("x-trellis-")) {
        headers.remove(DENIED);
        headers.remove(AUDIT);
        headers.remove(ERROR);
    }
}

/// Is this an HTTP/1.1 WebSocket upgrade: `Connection: upgrade` and an `Upgrade` that offers
/// `websocket` and nothing else? Only these are carried as upgrades. Any other `Upgrade`
/// (h2c above all) is forwarded as an ordinary request with its hop-by-hop headers removed,
/// as RFC 9110 §7.8 lets a server ignore it: carrying it would turn one authorized request
/// into a tunnel the policy never sees again (h2c smuggling). An offer that lists websocket
/// beside another protocol is not carried either, since the app could pick the other one.
pub fn is_websocket_upgrade<B>(req: &http::Request<B>) -> bool {
    // Checked first: most requests have no `Upgrade`, and this is one hashed lookup.
    req.headers().contains_key(header::UPGRADE)
        && req.version() == http::Version::HTTP_11
        && offers_only_websocket(req.headers())
        && has_token(req.headers(), header::CONNECTION, "upgrade")
}

/// Does `Upgrade` name exactly one protocol, `websocket` (case-insensitive, RFC 6455 §4.1)?
/// Also what a `101` must say before an upgraded connection is spliced.
pub fn offers_only_websocket(headers: &HeaderMap) -> bool {
    let mut protocols = headers
        .get_all(header::UPGRADE)
        .iter()
        // A value that is not visible ASCII matches nothing, and so is no WebSocket offer.
        .flat_map(|v| v.to_str().unwrap_or("\0").split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty());
    matches!((protocols.next(), protocols.next()), (Some(p), None) if p.eq_ignore_ascii_case("websocket"))
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// A response generated by the proxy itself.
pub fn generated(status: StatusCode, header: (HeaderName, &str), body: String) -> Response<RespBody> {
    let mut r = Response::new(Either::Right(Either::Left(Full::new(Bytes::from(body)))));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(header.1) {
        h.insert(header.0, v);
    }
    r
}

/// A 403 for a request policy refused, naming why.
pub fn forbidden(reason_header: &str, reason_text: &str) -> Response<RespBody> {
    generated(StatusCode::FORBIDDEN, (DENIED, reason_header), format!("denied by trellis policy: {reason_text}\n"))
}

/// Why this proxy could not forward a request, as `label: detail`, for the request's span
/// (the `x-trellis-error` header carries the label only).
#[derive(Debug, Clone)]
pub struct ProxyFailure(pub String);

/// A 502/503/504 the proxy answers when it cannot forward.
pub fn proxy_error(status: StatusCode, label: &str, detail: &str) -> Response<RespBody> {
    let mut r = generated(status, (ERROR, label), format!("trellis: {detail}\n"));
    r.extensions_mut().insert(ProxyFailure(format!("{label}: {detail}")));
    r
}

/// The `431` for a request whose header block is over the limit
/// ([`crate::serve::over_header_limit`]), from either sidecar. To an HTTP/1.x client it also
/// closes the connection: a request body that may follow was not read, and a client whose
/// headers are this large gains nothing from the connection (hyper's own `431`, for a head it
/// cannot buffer, closes it too).
pub fn header_too_large(client: Version) -> Response<RespBody> {
    let max = crate::serve::MAX_HEADER_LIST;
    let detail = format!("the request's header block reaches the {max}-byte limit (as HTTP/2 counts it)");
    let mut r = proxy_error(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, HEADER_TOO_LARGE, &detail);
    if client < Version::HTTP_2 {
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The `x-trellis-error` label of [`header_too_large`].
pub const HEADER_TOO_LARGE: &str = "header_too_large";

/// The absolute URI the inbound sends to its app: the caller's authority (the request target's
/// — an absolute-form target's replaces `Host`, RFC 9112 §3.2.2 — else `Host`, else the app's
/// address) and the path the policy judged (normalized) with the
/// original query. The parts are reused, and re-parsed only when normalizing changed the
/// path: this runs for every request.
pub fn app_uri(uri: Uri, host: Option<&HeaderValue>, app: SocketAddr) -> Uri {
    let normalized = match normalize_path(uri.path()) {
        Ok(Cow::Owned(path)) => Some(match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        }),
        _ => None,
    };
    let mut parts = uri.into_parts();
    if let Some(full) = normalized {
        parts.path_and_query = Some(full.parse().unwrap_or_else(|_| PathAndQuery::from_static("/")));
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    let from_host = || host.and_then(|h| Authority::try_from(h.as_bytes()).ok());
    let authority = parts.authority.take().or_else(from_host).or_else(|| Authority::try_from(app.to_string()).ok());
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = authority;
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// What is wrong with a request's `Host`, for a `400`: RFC 9112 §3.2 has a server refuse an
/// HTTP/1.1 request without one, and any request with more than one (which would the app
/// believe?); RFC 9113 §8.3.1 calls an HTTP/2 request whose `Host` names another authority
/// than its `:authority` malformed. Each decides where the request goes, or what the app
/// thinks was asked, so a sidecar must not pick one of two answers for it.
pub fn host_problem<B>(req: &http::Request<B>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some("the request has more than one Host header");
    }
    match (req.version(), host, req.uri().authority()) {
        (Version::HTTP_11, None, _) => Some("an HTTP/1.1 request must have a Host header"),
        (Version::HTTP_2, Some(host), Some(authority))
            if !host.as_bytes().eq_ignore_ascii_case(authority.as_str().as_bytes()) =>
        {
            Some("the Host header names another authority than :authority")
        }
        _ => None,
    }
}

/// Removes every `x-trellis-peer-id` a client wrote — under any spelling a CGI-style app
/// reads as the same (`x_trellis_peer_id`: WSGI, PHP and CGI fold `_` and `-` into
/// `HTTP_X_TRELLIS_PEER_ID`, and would see the client's copy first) — from a request's
/// headers (before the verified one is set) or its trailers.
pub fn remove_peer_id(headers: &mut HeaderMap) {
    headers.remove(PEER_ID);
    if headers.keys().any(is_peer_id_alias) {
        let aliases: Vec<HeaderName> = headers.keys().filter(|n| is_peer_id_alias(n)).cloned().collect();
        for alias in aliases {
            headers.remove(alias);
        }
    }
}

/// `x-trellis-peer-id` with any of its dashes written as underscores.
fn is_peer_id_alias(name: &HeaderName) -> bool {
    const OURS: &[u8] = b"x-trellis-peer-id";
    let (name, ours) = (name.as_str().as_bytes(), OURS);
    name.len() == ours.len() && name.iter().zip(ours).all(|(a, b)| a == b || (*a == b'_' && *b == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_doubled_or_contradicting_host_is_named() {
        let req = |version: Version, uri: &str, hosts: &[&str]| {
            let mut b = http::Request::builder().version(version).uri(uri);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).unwrap()
        };
        assert_eq!(host_problem(&req(Version::HTTP_11, "/x", &["a"])), None);
        assert_eq!(host_problem(&req(Version::HTTP_10, "/x", &[])), None, "HTTP/1.0 needs none");
        assert_eq!(host_problem(&req(Version::HTTP_2, "http://a/x", &[])), None);
        assert_eq!(host_problem(&req(Version::HTTP_2, "http://a/x", &["A"])), None, "case-insensitive");
        assert!(host_problem(&req(Version::HTTP_11, "/x", &[])).unwrap().contains("must have a Host"));
        assert!(host_problem(&req(Version::HTTP_11, "http://a/x", &[])).is_some(), "absolute-form too (MUST)");
        assert!(host_problem(&req(Version::HTTP_11, "/x", &["a", "b"])).unwrap().contains("more than one"));
        assert!(host_problem(&req(Version::HTTP_2, "http://a/x", &["b"])).unwrap().contains(":authority"));
    }

    #[test]
    fn every_spelling_of_the_peer_header_a_cgi_app_folds_together_is_an_alias() {
        assert_eq!(PEER_ID.as_str(), "x-trellis-peer-id");
        for alias in ["x_trellis_peer_id", "x-trellis_peer-id", "x_trellis-peer-id", "x-trellis-peer-id"] {
            assert!(is_peer_id_alias(&HeaderName::from_static(alias)), "{alias}");
        }
        for other in ["x-trellis-peer-ids", "x-trellis-peer", "x-trellis-peer-io", "x-trellis-audit"] {
            assert!(!is_peer_id_alias(&HeaderName::from_static(other)), "{other}");
        }
    }

    fn app() -> SocketAddr {
        "127.0.0.1:8080".parse().unwrap()
    }

    #[test]
    fn app_uri_forwards_the_normalized_path_with_the_original_query() {
        let host = HeaderValue::from_static("api.shop");
        let uri = app_uri("/api/./v1/../items?x=%2e%2e".parse().unwrap(), Some(&host), app());
        assert_eq!(uri.to_string(), "http://api.shop/api/items?x=%2e%2e");
        let unchanged = app_uri("/api/items?id=1".parse().unwrap(), Some(&host), app());
        assert_eq!(unchanged.to_string(), "http://api.shop/api/items?id=1");
    }

    #[test]
    fn app_uri_falls_back_to_the_targets_authority_then_the_app_address() {
        let absolute = app_uri("http://api.shop:81/x".parse().unwrap(), None, app());
        assert_eq!(absolute.to_string(), "http://api.shop:81/x");
        let bad_host = HeaderValue::from_static("not a host");
        let fallback = app_uri("/x".parse().unwrap(), Some(&bad_host), app());
        assert_eq!(fallback.to_string(), "http://127.0.0.1:8080/x");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret-Hop, not a name"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-second-line"));
        h.insert("x-second-line", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
        strip_hop_by_hop(&mut h);
        assert!(h.contains_key(header::TE), "TE: trailers survives for gRPC");
        assert!(h.contains_key(header::TRAILER), "Trailer is end to end: hyper's HTTP/1.1 writes only what it names");
    }

    #[test]
    fn a_431_closes_an_http1_connection_and_says_why() {
        let h1 = header_too_large(Version::HTTP_11);
        assert_eq!(h1.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(h1.headers()[ERROR], "header_too_large");
        assert_eq!(h1.headers()[header::CONNECTION], "close");
        assert!(h1.extensions().get::<ProxyFailure>().is_some_and(|f| f.0.starts_with("header_too_large: ")));
        let h2 = header_too_large(Version::HTTP_2);
        assert_eq!(h2.headers()[ERROR], "header_too_large");
        assert!(!h2.headers().contains_key(header::CONNECTION), "no connection-specific header on HTTP/2");
    }

    #[test]
    fn only_websocket_is_an_upgrade() {
        let req = |connection: &str, upgrade: &[&str]| {
            let mut b = http::Request::builder().header(header::CONNECTION, connection);
            for u in upgrade {
                b = b.header(header::UPGRADE, *u);
            }
            b.body(()).unwrap()
        };
        assert!(is_websocket_upgrade(&req("keep-alive, Upgrade", &["websocket"])));
        assert!(is_websocket_upgrade(&req("upgrade", &["WebSocket"])), "tokens are case-insensitive");
        let plain = http::Request::builder().header(header::UPGRADE, "websocket").body(()).unwrap();
        assert!(!is_websocket_upgrade(&plain), "no Connection: upgrade");
        assert!(!is_websocket_upgrade(&req("Upgrade, HTTP2-Settings", &["h2c"])));
        assert!(!is_websocket_upgrade(&req("Upgrade", &["websocket, h2c"])), "the app could pick h2c");
        assert!(!is_websocket_upgrade(&req("Upgrade", &["websocket", "h2c"])));
        assert!(!is_websocket_upgrade(&req("Upgrade", &["TLS/1.2"])));
        let mut h2 = req("Upgrade", &["websocket"]);
        *h2.version_mut() = http::Version::HTTP_2;
        assert!(!is_websocket_upgrade(&h2), "HTTP/2 has no Upgrade");
    }

    #[test]
    fn an_h2c_upgrade_offer_is_stripped_whole() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade, HTTP2-Settings"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(HTTP2_SETTINGS, HeaderValue::from_static("AAMAAABkAARAAAAAAAIAAAAA"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-keep"]);
        // Even when Connection does not name it.
        let mut h = HeaderMap::new();
        h.insert(HTTP2_SETTINGS, HeaderValue::from_static("AAMAAABkAARAAAAAAAIAAAAA"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }
}
