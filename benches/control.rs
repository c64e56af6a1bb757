//! Control-plane load benchmark (issue #4): SVID issuance rate, apply-to-receipt latency
//! with 1,000 connected watchers, and the control plane's RSS.
//!
//! Runs the real `trellis control run` binary as a separate process and drives it from
//! here over loopback HTTPS, so its RSS is its own. Both share this machine's cores, so
//! the issuance numbers include the clients' TLS and key-generation work.
//!
//! `cargo bench --bench control` (add `-- --watchers 2000` etc. to change the scale).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use trellis_control::ControlClient;
use trellis_control::api::{RenewRequest, TokenRequest};
use trellis_identity::{
    CertificateAuthority, CredentialStore, SpiffeId, TrustBundle, TrustDomain, WorkloadKey, client_config, pem,
};

struct Args {
    watchers: usize,
    applies: usize,
    seconds: u64,
    concurrency: usize,
}

fn args() -> Args {
    let mut a = Args { watchers: 1000, applies: 20, seconds: 5, concurrency: 32 };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let next = || argv.get(i + 1).and_then(|v| v.parse().ok());
        match argv[i].as_str() {
            "--watchers" => a.watchers = next().unwrap_or(a.watchers),
            "--applies" => a.applies = next().unwrap_or(a.applies),
            "--seconds" => a.seconds = next().unwrap_or(a.seconds as usize) as u64,
            "--concurrency" => a.concurrency = next().unwrap_or(a.concurrency),
            _ => {}
        }
        i += 1;
    }
    a
}

struct ControlProc {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for ControlProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_control() -> ControlProc {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["control", "run", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .env("TRELLIS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "{line}");
    ControlProc { child, url: format!("https://127.0.0.1:{port}"), dir }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Fixture {
    ctl: ControlProc,
    bundle: TrustBundle,
    ca: CertificateAuthority,
    td: TrustDomain,
    admin: ControlClient,
}

impl Fixture {
    fn new() -> Self {
        let ctl = start_control();
        let td = TrustDomain::parse("cluster.local").unwrap();
        let bundle = TrustBundle::load(&ctl.dir.path().join("bundle.pem")).unwrap();
        let ca = CertificateAuthority::load(&td, &ctl.dir.path().join("ca.pem"), &ctl.dir.path().join("ca-key.pem"))
            .unwrap();
        let token = std::fs::read_to_string(ctl.dir.path().join("admin.token")).unwrap();
        let admin = ControlClient::new(&ctl.url, &bundle, None, None, Some(token)).unwrap();
        Fixture { ctl, bundle, ca, td, admin }
    }

    /// A credential store holding an SVID signed directly by the CA (fast setup).
    fn creds(&self, name: &str) -> Arc<CredentialStore> {
        let id = SpiffeId::workload(&self.td, "bench", name).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let issued = self.ca.sign_csr(&key.csr(&id).unwrap(), &id, Duration::from_secs(3600)).unwrap();
        CredentialStore::with(key.into_svid(issued.chain).unwrap()).unwrap()
    }

    fn client(&self, creds: Arc<CredentialStore>) -> ControlClient {
        ControlClient::new(&self.ctl.url, &self.bundle, None, Some(creds), None).unwrap()
    }
}

/// Renewals as the proxy does them: fresh key, CSR, new TLS connection per call.
async fn issuance_fresh(f: &Fixture, a: &Args) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let tasks: Vec<_> = (0..a.concurrency)
        .map(|i| {
            let client = f.client(f.creds(&format!("renew{i}")));
            let id = SpiffeId::workload(&f.td, "bench", &format!("renew{i}")).unwrap();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let key = WorkloadKey::generate().unwrap();
                    let csr_pem = pem::csr_to_pem(&key.csr(&id).unwrap());
                    client.renew(&RenewRequest { csr_pem, addresses: vec![] }).await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let start = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Signing throughput: renewals over kept-alive mTLS connections (no handshake per call).
async fn issuance_keepalive(f: &Fixture, a: &Args) -> f64 {
    let addr = f.ctl.url.trim_start_matches("https://").to_string();
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let tasks: Vec<_> = (0..a.concurrency)
        .map(|i| {
            let creds = f.creds(&format!("ka{i}"));
            let id = SpiffeId::workload(&f.td, "bench", &format!("ka{i}")).unwrap();
            let expected = SpiffeId::from_segments(&f.td, &["trellis", "control"]).unwrap();
            let mut cfg = client_config(Some(creds), &f.bundle, expected).unwrap();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            let cfg = Arc::new(cfg);
            let addr = addr.clone();
            tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
                let name = trellis_identity::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
                tokio::spawn(conn);
                let key = WorkloadKey::generate().unwrap();
                let body = serde_json::to_vec(&RenewRequest {
                    csr_pem: pem::csr_to_pem(&key.csr(&id).unwrap()),
                    addresses: vec![],
                })
                .unwrap();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let req = http::Request::post("/v1/svid/renew")
                        .header("host", "control")
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body.clone())))
                        .unwrap();
                    let resp = send.send_request(req).await.unwrap();
                    assert!(resp.status().is_success());
                    resp.into_body().collect().await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let start = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Bootstraps with join tokens (each spends a token: one durable write per issuance).
async fn issuance_bootstrap(f: &Fixture, a: &Args) -> f64 {
    let n = 400;
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        let id = SpiffeId::workload(&f.td, "boot", &format!("w{i}")).unwrap();
        tokens.push(f.admin.create_token(&TokenRequest { spiffe_id: id, ttl_seconds: None }).await.unwrap().token);
    }
    let anon = ControlClient::new(&f.ctl.url, &f.bundle, None, None, None).unwrap();
    let queue = Arc::new(tokio::sync::Mutex::new(tokens));
    let start = Instant::now();
    let tasks: Vec<_> = (0..a.concurrency)
        .map(|_| {
            let (anon, queue) = (anon.clone(), queue.clone());
            tokio::spawn(async move {
                loop {
                    let Some(token) = queue.lock().await.pop() else { break };
                    let key = WorkloadKey::generate().unwrap();
                    let req = trellis_control::api::BootstrapRequest {
                        token: Some(token),
                        k8s_token: None,
                        csr_pem: pem::csr_to_pem(&key.anonymous_csr().unwrap()),
                        addresses: vec![],
                    };
                    anon.bootstrap(&req).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// 1,000 watchers; each apply is timed from the moment it is sent to each watcher's receipt.
async fn watchers(f: &Fixture, a: &Args) -> (Vec<Duration>, u64, u64) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let mut ready = Vec::with_capacity(a.watchers);
    for i in 0..a.watchers {
        let client = f.client(f.creds(&format!("w{i}")));
        let tx = tx.clone();
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        ready.push(rrx);
        tokio::spawn(async move {
            let mut stream = client.watch().await.unwrap();
            let _ = stream.next().await.unwrap();
            let _ = rtx.send(());
            while let Ok(e) = stream.next().await {
                if tx.send((e.version, Instant::now())).is_err() {
                    return;
                }
            }
        });
    }
    for r in ready {
        r.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = rss_kib(f.ctl.child.id());
    let mut latencies = Vec::with_capacity(a.watchers * a.applies);
    for v in 0..a.applies {
        let doc = format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: everyone}}\nspec:\n  selector: \"*\"\n  rules:\n    - to:\n        - ports: [{}]\n",
            1000 + v
        );
        let sent = Instant::now();
        let version = f.admin.apply_policies(doc).await.unwrap().version;
        let mut got = 0;
        while got < a.watchers {
            let (ver, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.unwrap().unwrap();
            if ver == version {
                latencies.push(at - sent);
                got += 1;
            }
        }
    }
    let rss_after = rss_kib(f.ctl.child.id());
    latencies.sort();
    (latencies, rss_connected, rss_after)
}

fn main() {
    // `cargo bench` passes `--bench`; ignore anything we do not know.
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let f = Fixture::new();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss_idle = rss_kib(f.ctl.child.id());
        let fresh = issuance_fresh(&f, &a).await;
        let keepalive = issuance_keepalive(&f, &a).await;
        let boot = issuance_bootstrap(&f, &a).await;
        let (lat, rss_conn, rss_after) = watchers(&f, &a).await;
        let when = humantime_now();
        println!(
            "\n## Control plane load ({when}, {} watchers, {} applies, concurrency {})\n",
            a.watchers, a.applies, a.concurrency
        );
        println!("| measure | value |\n|---|---|");
        println!("| SVID renewals/s, new mTLS connection + fresh key per call | {fresh:.0} |");
        println!("| SVID renewals/s, kept-alive mTLS connections | {keepalive:.0} |");
        println!("| SVID bootstraps/s (join token spent durably each time) | {boot:.0} |");
        println!("| apply → receipt p50 ({} watchers) | {:.1} ms |", a.watchers, ms(percentile(&lat, 0.50)));
        println!("| apply → receipt p99 | {:.1} ms |", ms(percentile(&lat, 0.99)));
        println!("| apply → receipt max | {:.1} ms |", ms(percentile(&lat, 1.0)));
        println!("| control plane RSS idle | {:.1} MiB |", rss_idle as f64 / 1024.0);
        println!("| control plane RSS with {} watchers | {:.1} MiB |", a.watchers, rss_conn as f64 / 1024.0);
        println!("| control plane RSS after the applies | {:.1} MiB |", rss_after as f64 / 1024.0);
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn humantime_now() -> String {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("unix {secs}")
}
