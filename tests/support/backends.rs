//! Real backends the sidecars forward to, running inside the test's tokio runtime.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP server that answers every request with a JSON description of it:
/// `{"method", "path", "headers": {...}}`. `/slow/<ms>` waits first; `/status/<code>` answers
/// with that status, and `/status/<code>/<value>` too if the request's `x-probe` header is
/// `<value>` (else 400); an `Upgrade` request
/// gets `101` (with the path and `x-trellis-peer-id` it saw in `x-echo-path` and
/// `x-echo-peer`) and then an echo of the upgraded bytes; `x-echo-filler: N` asks for a response
/// header `x-filler` of N bytes.
pub async fn http_echo() -> SocketAddr {
    serve_each(|tcp| async move {
        let svc = hyper::service::service_fn(|req| async move { Ok::<_, Infallible>(answer(req).await) });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        // Above HTTP/2's customary 16 KiB, for the large-header test.
        builder.http2().max_header_list_size(256 * 1024);
        let _ = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc).await;
    })
    .await
}

/// Listens on a free loopback port and runs `handle` on its own task for every connection.
async fn serve_each<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            tokio::spawn(handle(tcp));
        }
    });
    addr
}

async fn answer(mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if let Some(ms) = path.strip_prefix("/slow/").and_then(|m| m.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(rest) = path.strip_prefix("/status/") {
        let (code, want) = rest.split_once('/').map_or((rest, None), |(c, w)| (c, Some(w)));
        let got = req.headers().get("x-probe").map(|v| v.as_bytes());
        let code = match code.parse::<StatusCode>() {
            Ok(c) if want.is_none_or(|w| got == Some(w.as_bytes())) => c,
            _ => StatusCode::BAD_REQUEST,
        };
        return Response::builder().status(code).body(Full::default()).unwrap();
    }
    if req.headers().contains_key(http::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let peer = req.headers().get("x-trellis-peer-id").cloned().unwrap_or(http::HeaderValue::from_static(""));
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::UPGRADE, "websocket")
            .header("x-echo-path", req.uri().path())
            .header("x-echo-peer", peer)
            .body(Full::default())
            .unwrap();
    }
    let headers: BTreeMap<String, String> =
        req.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
    let query = req.uri().query().map(str::to_string);
    let authority = req.uri().authority().map(|a| a.to_string());
    let body = serde_json::json!({
        "method": req.method().as_str(),
        "path": path,
        "query": query,
        "authority": authority,
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    let filler = req.headers().get("x-echo-filler").and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    if let Some(n) = filler {
        resp.headers_mut().insert("x-filler", http::HeaderValue::from_str(&"f".repeat(n)).unwrap());
    }
    resp
}

/// An HTTP/1.1 and HTTP/2 server for bodies: `/bytes/N` answers N bytes (`i % 251` for
/// byte i), anything else echoes the request body. Either way the response carries the
/// trailers `x-request-bytes` (the request body's length) and, when the request had a
/// trailer `x-sum`, `x-request-sum` with its value.
pub async fn body_echo() -> SocketAddr {
    use http_body_util::BodyExt;
    serve_each(|tcp| async move {
        let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
            let path = req.uri().path().to_string();
            let got = req.into_body().collect().await?;
            let mut trailers = http::HeaderMap::new();
            if let Some(sum) = got.trailers().and_then(|t| t.get("x-sum")) {
                trailers.insert("x-request-sum", sum.clone());
            }
            let got = got.to_bytes();
            trailers.insert("x-request-bytes", got.len().into());
            let body = match path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
                None => got,
            };
            let body = Full::new(body).with_trailers(async move { Some(Ok(trailers)) });
            Ok::<_, hyper::Error>(Response::new(body))
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
    })
    .await
}

/// A TCP echo server.
pub async fn tcp_echo() -> SocketAddr {
    tcp_server(None).await
}

/// The bytes up to the end of a request head (and any after it in the same reads); `None` if
/// the client closed or failed first.
async fn read_head(tcp: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// An HTTP/1.1 app whose responses break: `/bad-chunk` answers a chunked `200` whose first
/// chunk size is not hex; `/cut` sends one good chunk, then a bad one a moment later. It reads
/// the request head and closes after answering.
pub async fn broken_chunks() -> SocketAddr {
    serve_each(|mut tcp| async move {
        let Some(head) = read_head(&mut tcp).await else { return };
        let start = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        if head.starts_with(b"GET /cut ") {
            let _ = tcp.write_all(&[&start[..], b"5\r\nhello\r\n"].concat()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tcp.write_all(b"ZZZ\r\n").await;
        } else {
            let _ = tcp.write_all(&[&start[..], b"ZZZ\r\nhello\r\n"].concat()).await;
        }
    })
    .await
}

/// An HTTP/1.1 app framing its answers oddly: `/cl-and-chunked` sends a chunked `abc` under a
/// stale `Content-Length: 50`; `/gzip-chunked` says `Transfer-Encoding: gzip, chunked`.
pub async fn odd_framing() -> SocketAddr {
    serve_each(|mut tcp| async move {
        let Some(head) = read_head(&mut tcp).await else { return };
        let answer: &[u8] = if head.starts_with(b"GET /cl-and-chunked ") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        };
        let _ = tcp.write_all(answer).await;
    })
    .await
}

/// An app that answers every request with a `Content-Length: 100000` head and 5,000 bytes of
/// body in one write, then closes at once: a response cut short.
pub async fn cut_short() -> SocketAddr {
    serve_each(|mut tcp| async move {
        if read_head(&mut tcp).await.is_none() {
            return;
        }
        let answer = [&b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n"[..], &[b'x'; 5000]].concat();
        let _ = tcp.write_all(&answer).await;
    })
    .await
}

/// A server that speaks first: it sends `banner` on accept, then echoes.
pub async fn banner_server(banner: &'static [u8]) -> SocketAddr {
    tcp_server(Some(banner)).await
}

async fn tcp_server(banner: Option<&'static [u8]>) -> SocketAddr {
    serve_each(move |mut tcp| async move {
        if let Some(b) = banner
            && tcp.write_all(b).await.is_err()
        {
            return;
        }
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    })
    .await
}

/// An HTTP/2 (prior knowledge) app that refuses the first request for each path with
/// `REFUSED_STREAM` — as a server does to streams it will not process, e.g. those racing its
/// GOAWAY — and answers later ones with 200 and `attempt N`.
pub async fn h2_refusing_first_try() -> SocketAddr {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, u32>::new()));
    serve_each(move |tcp| {
        let seen = seen.clone();
        async move {
            let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let attempt = {
                    let mut seen = seen.lock().unwrap();
                    let n = seen.entry(req.uri().path().to_string()).or_default();
                    *n += 1;
                    *n
                };
                if attempt == 1 {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                if let Ok(mut body) = respond.send_response(Response::new(()), false) {
                    let _ = body.send_data(Bytes::from(format!("attempt {attempt}")), true);
                }
            }
        }
    })
    .await
}

/// A gRPC server (h2c) answering `grpc.health.v1.Health/Check`: `SERVING` for the server as a
/// whole and `shop.Catalog`, `NOT_SERVING` for `shop.Sick`, `SERVICE_UNKNOWN` for the rest.
pub async fn grpc_health() -> SocketAddr {
    serve_each(|tcp| async move {
        let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
        // Each stream on its own task: the accept loop is what drives the connection.
        while let Some(Ok((req, respond))) = conn.accept().await {
            tokio::spawn(health_check(req, respond));
        }
    })
    .await
}

async fn health_check(req: Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
    let mut body = req.into_body();
    let mut data = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    // A 5-byte frame header, then `service` as field 1 (short names only).
    let service = data.get(7..).map(|s| String::from_utf8_lossy(s).into_owned()).unwrap_or_default();
    let status = match service.as_str() {
        "" | "shop.Catalog" => 1,
        "shop.Sick" => 2,
        _ => 3,
    };
    let head = Response::builder().header("content-type", "application/grpc").body(()).unwrap();
    let Ok(mut send) = respond.send_response(head, false) else { return };
    let _ = send.send_data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]), false);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let _ = send.send_trailers(trailers);
}

/// An HTTP/1.1 app streaming slow responses: `/…/<n>` answers `n` chunks of 1 KiB, one every
/// 100 ms (a download, a server-sent event stream), so a response can be in flight when
/// something changes.
pub async fn drip() -> SocketAddr {
    struct Drip {
        left: usize,
        tick: tokio::time::Interval,
    }
    impl hyper::body::Body for Drip {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            if self.left == 0 {
                return std::task::Poll::Ready(None);
            }
            std::task::ready!(self.tick.poll_tick(cx));
            self.left -= 1;
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(vec![b'd'; 1024])))))
        }
    }
    serve_each(|tcp| async move {
        let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
            let n = req.uri().path().rsplit('/').next().and_then(|n| n.parse().ok()).unwrap_or(1);
            let tick = tokio::time::interval(Duration::from_millis(100));
            Ok::<_, Infallible>(Response::new(Drip { left: n, tick }))
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
    })
    .await
}

/// An HTTP/1.1 app on a bare socket, as servers that are not hyper send trailers: every
/// response is chunked, `body\n` then the trailers `x-t: yes` and `x-request-sum` (the
/// request's trailer `x-sum`, or `none`). `/announced` names them in a `Trailer` header first
/// (RFC 9110 §6.6.2); anything else does not (as nginx's `add_trailer` does not). It reads one
/// request (its chunked body and trailers too), answers and closes.
pub async fn trailers_app() -> SocketAddr {
    serve_each(|mut tcp| async move {
        let Some((head, body_trailers)) = read_request(&mut tcp).await else { return };
        let sum = body_trailers
            .iter()
            .find_map(|l| l.split_once(':').filter(|(n, _)| n.trim().eq_ignore_ascii_case("x-sum")))
            .map_or("none".to_owned(), |(_, v)| v.trim().to_owned());
        let announce = match head.split_whitespace().nth(1) {
            Some("/announced") => "Trailer: x-t, x-request-sum\r\n",
            _ => "",
        };
        let answer = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n{announce}Connection: close\r\n\r\n5\r\nbody\n\r\n0\r\nx-t: yes\r\nx-request-sum: {sum}\r\n\r\n"
        );
        let _ = tcp.write_all(answer.as_bytes()).await;
    })
    .await
}

/// Reads one HTTP/1.1 request: its head, and if it is chunked its body to the end, returning
/// the trailer lines after the last chunk.
async fn read_request(tcp: &mut TcpStream) -> Option<(String, Vec<String>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Some((head, Vec::new()));
    }
    // The chunked body: size lines and data, up to the last chunk and its trailer section.
    let mut at = head_end;
    loop {
        let line_end = loop {
            if let Some(i) = buf[at..].windows(2).position(|w| w == b"\r\n") {
                break at + i;
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let size = usize::from_str_radix(String::from_utf8_lossy(&buf[at..line_end]).trim(), 16).ok()?;
        if size == 0 {
            at = line_end + 2;
            break;
        }
        while buf.len() < line_end + 2 + size + 2 {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        at = line_end + 2 + size + 2;
    }
    // The trailer section ends with an empty line.
    while !buf[at..].starts_with(b"\r\n") && !buf[at..].windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let trailers = String::from_utf8_lossy(&buf[at..]);
    Some((head, trailers.lines().take_while(|l| !l.is_empty()).map(str::to_owned).collect()))
}
