//! Shared harness for end-to-end tests: real `trellis` processes (control plane, sidecars)
//! on loopback, and small real backends (HTTP, TCP echo, server-speaks-first) in the test.
//! Every child process is killed when its handle drops, so a failing test leaves nothing.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_control::ControlClient;
use trellis_identity::TrustBundle;

pub mod backends;
pub mod mesh;
pub mod otlp;
pub mod prom;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_trellis")
}

/// Asserts that a finished command failed — with exit code `code`, or any failure when `None`
/// — and named `needle` on stderr. The whole stderr is the message when it did not.
pub fn assert_refused(out: &std::process::Output, code: Option<i32>, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    match code {
        Some(code) => assert_eq!(out.status.code(), Some(code), "{err}"),
        None => assert!(!out.status.success(), "succeeded: {err}"),
    }
    assert!(err.contains(needle), "stderr does not name {needle:?}: {err}");
}

/// A port that was free a moment ago (for listeners the test must know in advance).
///
/// Taken below the kernel's ephemeral range (32768–60999 by default), each one once per test
/// process: a port from `bind(0)` comes from that range, and between closing it and the proxy
/// binding it any outgoing connection of a concurrent test could take it as its local port (a
/// rare "Address already in use" in CI).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries run one after another; the pid spreads them anyway.
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A child process killed on drop, with its stderr in a file for post-mortems.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, args: &[String], log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(args)
            .env("TRELLIS_LOG", "info,trellis_proxy=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap();
        Proc { child, log, name: name.to_string() }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(self.pid(), sig);
    }

    /// Waits for the process to exit, returning its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} log -----\n{}", self.name, self.logs());
        }
    }
}

/// A control plane in a temporary data dir.
pub struct Control {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub url: String,
    extra: Vec<String>,
}

impl Control {
    pub fn start(extra: &[&str]) -> Control {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let proc = Self::spawn(dir.path(), port, &extra);
        Control { proc, dir, port, url: format!("https://127.0.0.1:{port}"), extra }
    }

    fn spawn(dir: &Path, port: u16, extra: &[String]) -> Proc {
        let mut args: Vec<String> = ["control", "run", "--data-dir"].map(String::from).to_vec();
        args.push(dir.join("data").display().to_string());
        args.push("--listen".into());
        args.push(format!("127.0.0.1:{port}"));
        args.extend(extra.iter().cloned());
        let mut proc = Proc::spawn("control", &args, dir);
        // The first stdout line says it is listening.
        let mut out = BufReader::new(proc.child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.contains("listening on"), "control plane did not start: {line}\n{}", proc.logs());
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        proc
    }

    /// SIGKILL, then start again on the same data dir and port.
    pub fn kill(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    pub fn restart(&mut self) {
        self.kill();
        self.proc = Self::spawn(self.dir.path(), self.port, &self.extra);
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn bundle_path(&self) -> PathBuf {
        self.data().join("bundle.pem")
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data().join("admin.token")).unwrap().trim().to_string()
    }

    pub fn client(&self) -> ControlClient {
        let bundle = TrustBundle::load(&self.bundle_path()).unwrap();
        ControlClient::new(&self.url, &bundle, None, None, Some(self.admin_token())).unwrap()
    }

    /// Runs a `trellis` CLI command against this control plane; returns (exit, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin())
            .args(args)
            .env("TRELLIS_CONTROL", &self.url)
            .env("TRELLIS_CA_BUNDLE", self.bundle_path())
            .env("TRELLIS_ADMIN_TOKEN_FILE", self.data().join("admin.token"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn token(&self, id: &str) -> String {
        let (code, out, err) = self.cli(&["token", "create", "--spiffe-id", id]);
        assert_eq!(code, 0, "token create failed: {err}");
        out.trim().to_string()
    }

    /// Applies a policy file through the admin API.
    pub async fn apply(&self, yaml: &str) -> u64 {
        self.client().apply_policies(yaml.to_string()).await.unwrap().version
    }

    pub async fn delete(&self, name: &str) {
        self.client().delete_policy(name).await.unwrap();
    }
}

/// A sidecar process.
pub struct Sidecar {
    pub proc: Proc,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts `trellis proxy run` for `id` with `args` and waits until it is ready.
    pub fn start(control: &Control, id: &str, args: &[String]) -> Sidecar {
        let s = Self::spawn(control, id, args);
        s.wait_ready(Duration::from_secs(15));
        s
    }

    pub fn spawn(control: &Control, id: &str, args: &[String]) -> Sidecar {
        Self::spawn_with_bundle(control, id, &control.bundle_path(), args)
    }

    /// [`Sidecar::spawn`] trusting `bundle` rather than the control plane's own.
    pub fn spawn_with_bundle(control: &Control, id: &str, bundle: &Path, args: &[String]) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let admin = addr(free_port());
        let token = control.token(id);
        let mut all: Vec<String> = vec![
            "proxy".into(),
            "run".into(),
            "--control".into(),
            control.url.clone(),
            "--ca-bundle".into(),
            bundle.display().to_string(),
            "--token".into(),
            token,
            "--admin".into(),
            admin.to_string(),
        ];
        all.extend(args.iter().cloned());
        let name = id.rsplit('/').next().unwrap_or("proxy").to_string();
        let proc = Proc::spawn(&format!("proxy-{name}"), &all, dir.path());
        Sidecar { proc, admin, _dir: dir }
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some((200, _)) = http_get(self.admin, "/ready") {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("sidecar {} not ready:\n{}", self.proc.name, self.proc.logs());
    }

    pub fn config(&self) -> serde_json::Value {
        let (_, body) = http_get(self.admin, "/config").expect("admin answers");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until this sidecar enforces policy `version`.
    pub fn wait_version(&self, version: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.config()["policy"]["version"] == version {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("sidecar {} never reached policy version {version}: {}", self.proc.name, self.config());
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").map(|(_, b)| b).unwrap_or_default()
    }
}

/// A one-shot plain HTTP/1.1 GET (for admin endpoints), `None` if nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, "").map(|(status, _, body)| (status, body))
}

/// A one-shot plain HTTP/1.1 request with extra header lines (each ending in `\r\n`):
/// the status, the response head and the body; `None` if nothing answers.
pub fn http_request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> Option<(u16, String, String)> {
    let mut s = StdStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    Some((status, head.to_string(), body.to_string()))
}

/// A policy allowing `from` to call `to` (on `ports`), as a YAML document.
pub fn allow(name: &str, to: &str, from: &str, extra_to: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\nspec:\n  selector: {to}\n  action: ALLOW\n  rules:\n    - from:\n        - identity: {from}\n{extra_to}---\n"
    )
}

/// An HTTP client (hyper, HTTP/1.1 keep-alive pool) for talking to outbound listeners.
pub fn http_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new())
}

pub async fn get(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    use http_body_util::BodyExt;
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.request(req.body(http_body_util::Full::default()).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

pub type Shared<T> = Arc<T>;

/// The first span in a `--trace-file` that `pred` accepts, waiting up to 10 s for it (a span is
/// written when its flow ends, and exported every 100 ms).
pub async fn wait_for_span(file: &Path, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        // A line still being written does not parse yet; it will on the next look.
        let spans = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
        if let Some(span) = spans.into_iter().find(|s| pred(s)) {
            return span;
        }
        assert!(Instant::now() < deadline, "no {what} span in {}:\n{text}", file.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Is `span` a request span (`inbound GET`, `outbound POST`, ...) for `path`?
pub fn is_request_span(span: &serde_json::Value, direction: &str, path: &str) -> bool {
    span["attributes"]["trellis.direction"] == direction
        && span["attributes"]["url.path"] == path
        && !span["name"].as_str().unwrap_or_default().ends_with("connection")
}
