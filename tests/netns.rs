//! Two "pods" in network namespaces, each with `trellis proxy init` rules and a transparent
//! sidecar running as uid 1337, and apps that know nothing of the mesh (issue #7).
//!
//! The client pod's curl connects to the server pod's IP and app port; the bytes on the
//! wire between the pods are TLS (captured with tshark), policy allows and denies as
//! written, and the proxies' own traffic is not captured again (no loop). A call to a
//! Kubernetes Service's ClusterIP reaches the server pod through the mesh: the control plane
//! lists Services from a fake API server (real ServiceList/EndpointSliceList JSON over
//! HTTPS). The node's view of the pods' probes is checked too. Needs root; elsewhere it
//! prints `skipped: <reason>` and passes.

#[path = "../control/tests/common/fake_kube.rs"]
mod fake_kube;
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";
const HOST_IP: &str = "10.78.0.1";
const CLIENT_IP: &str = "10.78.0.2";
const SERVER_IP: &str = "10.78.0.3";
/// A second replica of the server (same service account), for the Service test.
const REPLICA_IP: &str = "10.78.0.4";

fn unsupported() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "nft", "tshark", "curl", "python3", "setpriv"] {
        let found =
            Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("`{tool}` not installed (see .ci/run)"));
        }
    }
    None
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A bridge in the root namespace with one veth per pod namespace.
struct Net {
    pods: Vec<String>,
    bridge: String,
}

impl Net {
    fn create() -> Net {
        let id = std::process::id() % 100_000;
        let bridge = format!("trb{id}");
        sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
        sh(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", &bridge]);
        sh(&["ip", "link", "set", &bridge, "up"]);
        let mut pods = Vec::new();
        for (i, ip) in [CLIENT_IP, SERVER_IP, REPLICA_IP].iter().enumerate() {
            let ns = format!("trellis-e2e-{id}-{i}");
            let host_end = format!("trv{id}{i}");
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            sh(&["ip", "link", "set", &host_end, "master", &bridge, "up"]);
            sh(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            pods.push(ns);
        }
        Net { pods, bridge }
    }

    fn exec(&self, pod: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.pods[pod]]).args(args);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}

/// A process killed on drop.
struct Bg(std::process::Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl(net: &Net, pod: usize, url: &str) -> (String, String) {
    let out = net
        .exec(pod, &["curl", "-s", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", "-D", "-", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text.lines().last().unwrap_or("").to_string();
    (code, text)
}

#[test]
fn two_pods_talk_mtls_through_transparent_sidecars() {
    if let Some(why) = unsupported() {
        println!("skipped: {why}");
        return;
    }
    let net = Net::create();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (api, api_creds) = fake_cluster(&rt);
    let api_url = api.url();
    let creds = api_creds.path().display().to_string();
    let control = Control::start(&["--k8s-attestation", "--k8s-api", &api_url, "--k8s-credentials", &creds]);
    // The control plane listens on loopback; pods reach it through the bridge address.
    let relay =
        Bg(Command::new("python3").args(["-c", &relay_script(control.port)]).stdout(Stdio::null()).spawn().unwrap());
    let control_url = format!("https://{HOST_IP}:{}", control.port);
    wait_port(HOST_IP, control.port);
    let bundle = std::fs::read_to_string(control.bundle_path()).unwrap();
    let policy = allow(
        "server-from-client",
        SERVER,
        CLIENT,
        "      to:\n        - ports: [8080]\n          methods: [GET]\n          paths: [\"/ok/*\", \"/\", \"/whoami\"]\n",
    );
    rt.block_on(control.apply(&policy));

    // The server pods' app: plain HTTP on 0.0.0.0:8080, knows nothing of the mesh; each
    // replica's `/whoami` says which one answered.
    let docs = tempfile::tempdir().unwrap();
    let mut apps = Vec::new();
    for (pod, name) in [(1, "server"), (2, "replica")] {
        let dir = docs.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("whoami"), name).unwrap();
        let dir = dir.display().to_string();
        let mut app =
            net.exec(pod, &["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", &dir]);
        apps.push(Bg(app.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()));
    }
    // A second app listening on the pod IP only (not loopback), for the app probes below.
    let _pod_ip_app = Bg(net
        .exec(1, &["python3", "-m", "http.server", "8081", "--bind", SERVER_IP])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    // What `trellis inject` gives the server's proxy for two readiness probes.
    let probes =
        r#"{"app/readyz":{"port":8080,"httpGet":{"path":"/"}},"side/readyz":{"port":8081,"tcpSocket":{"port":8081}}}"#;
    let logs = tempfile::tempdir().unwrap();
    let mut sidecars = Vec::new();
    for (pod, (id, ip)) in [(CLIENT, CLIENT_IP), (SERVER, SERVER_IP), (SERVER, REPLICA_IP)].into_iter().enumerate() {
        let status = net.exec(pod, &[bin(), "proxy", "init", "--exclude-inbound-ports", "15000"]).status().unwrap();
        assert!(status.success(), "proxy init failed in pod {pod}");
        let token = control.token(id);
        let log = std::fs::File::create(logs.path().join(format!("pod{pod}.log"))).unwrap();
        let child = net
            .exec(pod, &["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", bin(), "proxy", "run"])
            .args(["--control", &control_url, "--token", &token, "--inbound", "0.0.0.0:15006"])
            .args(["--outbound", "127.0.0.1:15001", "--admin", "0.0.0.0:15000", "--advertise-ip", ip])
            .env("TRELLIS_CA_BUNDLE_PEM", &bundle)
            .env("TRELLIS_APP_PROBES", if pod == 1 { probes } else { "{}" })
            .env("TRELLIS_LOG", "info,trellis_proxy=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        sidecars.push(Bg(child));
    }
    for ip in [CLIENT_IP, SERVER_IP, REPLICA_IP] {
        wait_ready(ip, &logs);
    }

    // Capture what crosses the server pod's veth while the client app talks to it.
    let pcap = logs.path().join("wire.pcap");
    let mut capture = Command::new("tshark")
        .args(["-i", &format!("trv{}1", std::process::id() % 100_000), "-w"])
        .arg(&pcap)
        .args(["-f", "tcp port 8080"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));

    let (code, head) = curl(&net, 0, &format!("http://{SERVER_IP}:8080/"));
    assert_eq!(code, "200", "allowed request: {head}\n{}", pod_logs(&logs));
    let (code, head) = curl(&net, 0, &format!("http://{SERVER_IP}:8080/secret-plaintext-marker"));
    assert_eq!(code, "403", "{head}");
    assert!(head.to_lowercase().contains("x-trellis-denied: default-deny"), "{head}");
    let (code, _) = curl(&net, 0, &format!("http://{SERVER_IP}:8080/ok/"));
    assert_eq!(code, "404", "allowed by policy, answered by the app (no such file)");

    std::thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(capture.id() as i32), nix::sys::signal::Signal::SIGINT);
    let _ = capture.wait();
    let payload =
        Command::new("tshark").arg("-r").arg(&pcap).args(["-T", "fields", "-e", "tcp.payload"]).output().unwrap();
    let hex = String::from_utf8_lossy(&payload.stdout).replace(['\n', ':'], "");
    assert!(!hex.is_empty(), "nothing captured between the pods");
    let bytes: Vec<u8> =
        (0..hex.len() / 2).filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()).collect();
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("secret-plaintext-marker"), "the request path crossed the wire in clear text");
    assert!(!text.contains("HTTP/1.1"), "HTTP crossed the wire in clear text");
    let hellos = Command::new("tshark")
        .arg("-r")
        .arg(&pcap)
        .args(["-d", "tcp.port==8080,tls", "-Y", "tls.handshake.type == 1"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&hellos.stdout).trim().is_empty(), "no TLS ClientHello on the wire");

    // The kubelet's view, from the node: its plaintext HTTP probe of the (captured) app port
    // is answered by the proxy, any other plaintext request refused; probes rewritten to the
    // admin port reach the app through the proxy, on loopback and (for an app bound to the
    // pod IP only) on the pod IP.
    let node_curl = |url: &str| {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(node_curl(&format!("http://{SERVER_IP}:8080/")), "200", "the probe as written, answered by the proxy");
    let other = node_curl(&format!("http://{SERVER_IP}:8080/secret-plaintext-marker"));
    assert_eq!(other, "000", "plaintext that is no probe is refused (mTLS only)");
    assert_eq!(node_curl(&format!("http://{SERVER_IP}:15000/app-health/app/readyz")), "200", "{}", pod_logs(&logs));
    assert_eq!(node_curl(&format!("http://{SERVER_IP}:15000/app-health/side/readyz")), "200", "{}", pod_logs(&logs));

    // A Service: the client calls its ClusterIP (routed, but nothing answers there); its proxy
    // sends the connection to the Service's endpoint in the mesh, the server pod.
    sh(&["ip", "-n", &net.pods[0], "route", "add", "10.96.0.0/16", "dev", "eth0"]);
    wait_for_services(CLIENT_IP, &logs);
    let (code, head) = curl(&net, 0, &format!("http://{SERVICE_IP}:80/"));
    assert_eq!(code, "200", "a call to the ClusterIP: {head}\n{}", pod_logs(&logs));
    let (code, head) = curl(&net, 0, &format!("http://{SERVICE_IP}:80/secret"));
    assert_eq!(code, "403", "the server's policy decides, as for a direct call: {head}");
    // Requests on one connection are spread over the replicas, one by one; the Service's third
    // endpoint (the client pod's address, where nothing listens on 8080: a replica that just
    // went away) costs a retry on another endpoint, not an error.
    let whoami = format!("http://{SERVICE_IP}:80/whoami");
    let mut args = vec!["curl", "-sv", "--max-time", "10", "-w", " %{http_code}\n"];
    args.extend([whoami.as_str(); 6]);
    let out = net.exec(0, &args).output().unwrap();
    let (body, trace) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let answers: Vec<&str> = body.lines().collect();
    assert_eq!(answers.len(), 6, "{body}");
    assert!(answers.iter().all(|a| *a == "server 200" || *a == "replica 200"), "{body}\n{}", pod_logs(&logs));
    assert!(answers.contains(&"server 200") && answers.contains(&"replica 200"), "both replicas answered: {body}");
    assert!(trace.contains("Re-using existing connection"), "one client connection: {trace}");
    // A new connection per request reaches both replicas too (each connection's own pick and
    // its first request's used to be two turns of the round robin: always the same replica).
    let mut seen = Vec::new();
    for _ in 0..6 {
        let out = net.exec(0, &["curl", "-s", "--max-time", "10", &whoami]).output().unwrap();
        seen.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert!(seen.iter().any(|a| a == "server") && seen.iter().any(|a| a == "replica"), "{seen:?}");
    drop(api);

    // The proxies' own connections were not captured again: no loop refusals, and a
    // direct attempt to reach the outbound listener's own address is refused.
    let logs_text = pod_logs(&logs);
    assert!(!logs_text.contains("refusing the loop"), "{logs_text}");
    let (code, _) = curl(&net, 0, "http://127.0.0.1:15001/");
    assert_ne!(code, "200");

    // A neighbour routing a packet for another address through the server pod (here: for the
    // replica, via the server) is not taken by the server's sidecar, which would have relayed
    // it onward as the proxy's uid, outside capture and egress policy. Sent as uid 1337 so the
    // client's own sidecar does not capture it first.
    sh(&["ip", "-n", &net.pods[0], "route", "add", &format!("{REPLICA_IP}/32"), "via", SERVER_IP]);
    let url = format!("http://{REPLICA_IP}:8080/x");
    let args = ["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", "curl", "-s", "--connect-timeout", "2"];
    let out = net.exec(0, &args).arg(&url).output().unwrap();
    // 28: the connection timed out (the packet was dropped); 7: refused. Anything else means
    // something in the server pod accepted it.
    let code = out.status.code();
    assert!(
        matches!(code, Some(28 | 7)),
        "the server pod took a connection for another address: curl exit {code:?}\n{}",
        pod_logs(&logs)
    );
    drop(sidecars);
    drop(relay);
}

/// The Service `shop/server`: ClusterIP 10.96.0.10, port 80 → the server pod's 8080.
const SERVICE_IP: &str = "10.96.0.10";

/// A fake API server listing that Service and its EndpointSlice, and a credentials directory
/// (`token`, `ca.crt`) for the control plane to reach it.
fn fake_cluster(rt: &tokio::runtime::Runtime) -> (fake_kube::FakeApi, tempfile::TempDir) {
    let api = rt.block_on(fake_kube::start_fake_api());
    let services = serde_json::json!([{
        "metadata": { "namespace": "shop", "name": "server" },
        "spec": { "clusterIP": SERVICE_IP, "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
    }]);
    let slices = serde_json::json!([{
        "metadata": { "namespace": "shop", "name": "server-1", "labels": { "kubernetes.io/service-name": "server" } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080 }],
        "endpoints": [
            { "addresses": [SERVER_IP], "conditions": { "ready": true } },
            { "addresses": [REPLICA_IP] },
            { "addresses": [CLIENT_IP] },
        ],
    }]);
    *api.cluster.lock().unwrap() = Some((services, slices));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), fake_kube::CONTROL_PLANE_TOKEN).unwrap();
    std::fs::write(dir.path().join("ca.crt"), &api.ca_pem).unwrap();
    (api, dir)
}

/// Waits until the proxy at `ip` knows a Service with an endpoint in the mesh.
fn wait_for_services(ip: &str, logs: &tempfile::TempDir) {
    let addr: std::net::SocketAddr = format!("{ip}:15000").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some((200, body)) = http_get(addr, "/config")
            && serde_json::from_str::<serde_json::Value>(&body).unwrap()["endpoint_registry"]["services"] == 1
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the proxy at {ip} never got the service table:\n{}", pod_logs(logs));
}

fn pod_logs(dir: &tempfile::TempDir) -> String {
    (0..3).map(|i| std::fs::read_to_string(dir.path().join(format!("pod{i}.log"))).unwrap_or_default()).collect()
}

fn wait_ready(ip: &str, logs: &tempfile::TempDir) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: std::net::SocketAddr = format!("{ip}:15000").parse().unwrap();
    while Instant::now() < deadline {
        if let Some((200, _)) = http_get(addr, "/ready") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("sidecar at {ip} not ready:\n{}", pod_logs(logs));
}

fn wait_port(ip: &str, port: u16) {
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "relay did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A byte relay from the bridge address to the control plane on loopback (the harness
/// starts control planes on 127.0.0.1).
fn relay_script(port: u16) -> String {
    format!(
        r#"
import socket, threading
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d: break
            b.sendall(d)
    except Exception: pass
    finally:
        try: b.shutdown(socket.SHUT_WR)
        except Exception: pass
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{HOST_IP}", {port})); s.listen(64)
while True:
    c, _ = s.accept()
    u = socket.create_connection(("127.0.0.1", {port}))
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
"#
    )
}
