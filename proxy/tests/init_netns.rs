//! `trellis proxy init` rules in real network namespaces (root only; elsewhere the tests print
//! `skipped: <reason>` and pass).
//!
//! Two namespaces joined by a veth pair stand for a pod (10.77.0.1) and a peer (10.77.0.2 and
//! 10.77.0.3). The capture rules are installed in the pod namespace through `nft` exactly as
//! the init container does, twice, and must list identically (idempotent). Then small Python
//! servers and clients (when `python3` is present) show what the rules do: inbound TCP lands
//! on 15006 with its original destination intact, excluded inbound ports are not captured,
//! the app's outbound TCP lands on 15001, and the proxy's uid, excluded ports and excluded
//! CIDRs go straight out — so the proxy's own traffic cannot loop.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use trellis_proxy::init::{CaptureConfig, Nft, parse_cidrs, ruleset};

/// Why these tests cannot run here, if they cannot.
fn unsupported() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref() != Some("0") {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` not installed (apt-get install iproute2 nftables)"));
        }
    }
    None
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() { Ok(()) } else { Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr))) }
}

/// A pod and a peer namespace, deleted on drop.
struct Namespaces {
    pod: String,
    peer: String,
}

impl Namespaces {
    fn create(tag: &str) -> Result<Self, String> {
        let id = std::process::id();
        let ns = Namespaces { pod: format!("trellis-{tag}-pod-{id}"), peer: format!("trellis-{tag}-peer-{id}") };
        sh(&["ip", "netns", "add", &ns.pod])?;
        sh(&["ip", "netns", "add", &ns.peer])?;
        sh(&[
            "ip", "link", "add", "eth0", "netns", &ns.pod, "type", "veth", "peer", "name", "eth0", "netns", &ns.peer,
        ])?;
        for (name, addrs) in [(&ns.pod, &["10.77.0.1/24"][..]), (&ns.peer, &["10.77.0.2/24", "10.77.0.3/24"][..])] {
            for addr in addrs {
                sh(&["ip", "-n", name, "addr", "add", addr, "dev", "eth0"])?;
            }
            sh(&["ip", "-n", name, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }

    fn nft(&self) -> Nft {
        let args = ["netns", "exec", &self.pod, "nft"].map(OsString::from).to_vec();
        Nft::with_command("ip", args)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.pod]);
        let _ = sh(&["ip", "netns", "del", &self.peer]);
    }
}

fn pod_config() -> CaptureConfig {
    CaptureConfig {
        exclude_inbound_ports: vec![15000, 9090],
        exclude_outbound_ports: vec![5432],
        exclude_outbound_cidrs: parse_cidrs("10.77.0.3/32").expect("cidr"),
        ..CaptureConfig::default()
    }
}

#[test]
fn rules_apply_atomically_and_idempotently() {
    if let Some(reason) = unsupported() {
        println!("skipped: {reason}");
        return;
    }
    let ns = Namespaces::create("idem").expect("namespaces");
    let nft = ns.nft();
    let rules = ruleset(&pod_config()).expect("ruleset");
    nft.apply(&rules).expect("first run");
    let first = nft.list_table().expect("list");
    nft.apply(&rules).expect("second run");
    let second = nft.list_table().expect("list");
    assert_eq!(first, second, "a second run changed the table");
    assert!(first.contains("redirect to :15006") && first.contains("redirect to :15001"), "{first}");
    assert!(first.contains("meta skuid 1337"), "{first}");

    // Other settings replace the table whole; going back restores exactly the first state.
    nft.apply(&ruleset(&CaptureConfig::default()).expect("ruleset")).expect("other settings");
    assert!(!nft.list_table().expect("list").contains("5432"));
    nft.apply(&rules).expect("back");
    assert_eq!(nft.list_table().expect("list"), first);
}

/// Accepts on the capture ports (and one excluded app port) and answers each connection with
/// the listener's name and the connection's original destination (SO_ORIGINAL_DST).
const SERVER: &str = r#"
import socket, struct, threading, sys
def serve(name, host, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(16)
    def loop():
        while True:
            c, _ = s.accept()
            try:
                od = c.getsockopt(socket.SOL_IP, 80, 16)
                dst = "%s:%d" % (socket.inet_ntoa(od[4:8]), struct.unpack("!H", od[2:4])[0])
            except OSError:
                dst = "?"
            c.sendall(("%s %s\n" % (name, dst)).encode()); c.close()
    threading.Thread(target=loop, daemon=True).start()
serve("inbound", "0.0.0.0", 15006)
serve("outbound", "127.0.0.1", 15001)
serve("app-9090", "0.0.0.0", 9090)
print("ready", flush=True)
sys.stdin.read()
"#;

/// Connects to argv[1]:argv[2] (as uid argv[3] if given) and prints what it got.
const CLIENT: &str = r#"
import socket, os, sys, encodings.idna  # imported before setuid: the new uid may not read them
if len(sys.argv) > 3: os.setuid(int(sys.argv[3]))
try:
    c = socket.socket(); c.settimeout(3); c.connect((sys.argv[1], int(sys.argv[2])))
    print(c.recv(200).decode().strip() or "closed")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error " + str(e))
"#;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connect(ns: &str, host: &str, port: u16, uid: Option<u32>) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "python3", "-c", CLIENT, host, &port.to_string()]);
    if let Some(uid) = uid {
        cmd.arg(uid.to_string());
    }
    let out = cmd.output().expect("run client");
    String::from_utf8_lossy(&out.stdout).trim().to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn traffic_is_captured_as_the_rules_say() {
    if let Some(reason) = unsupported() {
        println!("skipped: {reason}");
        return;
    }
    if Command::new("python3").arg("-V").output().is_err() {
        println!("skipped: python3 not installed (used as the test's app and peer)");
        return;
    }
    let ns = Namespaces::create("flow").expect("namespaces");
    ns.nft().apply(&ruleset(&pod_config()).expect("ruleset")).expect("install");
    let server = Command::new("ip")
        .args(["netns", "exec", &ns.pod, "python3", "-c", SERVER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start server");
    let mut server = KillOnDrop(server);
    let mut ready = String::new();
    let stdout = server.0.stdout.take().expect("stdout");
    BufReader::new(stdout).read_line(&mut ready).expect("server output");
    assert_eq!(ready.trim(), "ready");

    // Inbound: a peer calling the pod's app port reaches the proxy's inbound listener.
    assert_eq!(connect(&ns.peer, "10.77.0.1", 8080, None), "inbound 10.77.0.1:8080");
    // An excluded inbound port reaches the app directly.
    assert_eq!(connect(&ns.peer, "10.77.0.1", 9090, None), "app-9090 10.77.0.1:9090");
    // Outbound: the app's connection to a peer reaches the proxy's outbound listener.
    assert_eq!(connect(&ns.pod, "10.77.0.2", 80, None), "outbound 10.77.0.2:80");
    // The proxy's own connections, excluded ports and CIDRs go to the peer (nothing listens: refused).
    assert_eq!(connect(&ns.pod, "10.77.0.2", 80, Some(1337)), "refused");
    assert_eq!(connect(&ns.pod, "10.77.0.2", 5432, None), "refused");
    assert_eq!(connect(&ns.pod, "10.77.0.3", 80, None), "refused");
    // Loopback is not captured: the app reaches its own listeners directly.
    assert_eq!(connect(&ns.pod, "127.0.0.1", 9090, None), "app-9090 127.0.0.1:9090");
}
