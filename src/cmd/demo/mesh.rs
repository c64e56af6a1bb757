//! Starting and stopping the demo mesh: the control plane and three sidecars as child
//! processes on free loopback ports, the workloads in-process, all in a temporary dir.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use trellis_control::ControlClient;
use trellis_control::api::{CheckRequest, TokenRequest};
use trellis_identity::{SpiffeId, TrustBundle};

use super::apps;

pub const TD: &str = "cluster.local";

pub fn spiffe(name: &str) -> String {
    format!("spiffe://{TD}/ns/demo/sa/{name}")
}

/// What to start for one workload: its inbound (listen, app), its routes (peer, listen,
/// peer's inbound) and its admin address.
struct Plan {
    name: &'static str,
    inbound: Option<(SocketAddr, SocketAddr)>,
    routes: Vec<(&'static str, SocketAddr, SocketAddr)>,
    admin: SocketAddr,
}

/// One sidecar and where its listeners are.
pub struct Sidecar {
    pub name: &'static str,
    pub admin: SocketAddr,
    /// Its mTLS inbound listener, if it fronts an app.
    pub inbound: Option<SocketAddr>,
    /// Outbound routes: peer name → local plaintext listener.
    pub routes: Vec<(&'static str, SocketAddr)>,
    pub app_desc: String,
    child: Proc,
}

impl Sidecar {
    pub fn id_short(&self) -> String {
        format!("…/sa/{}", self.name)
    }
}

pub struct Mesh {
    pub control_url: String,
    pub fingerprint: String,
    pub bundle: TrustBundle,
    pub admin_client: ControlClient,
    pub sidecars: Vec<Sidecar>,
    pub policy_summary: String,
    pub trace_file: PathBuf,
    pub api_app: SocketAddr,
    pub db_app: SocketAddr,
    // After the sidecars: fields drop in order, and the sidecars go before their control plane.
    control: Proc,
    /// Last, so it is removed after every process using it has been stopped.
    pub dir: tempfile::TempDir,
}

/// A child process that is killed when dropped, so an error or an interruption anywhere in
/// starting the mesh leaves nothing running; [`Mesh::stop`] stops them gently first.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Free loopback ports, all reserved at once so they differ from each other.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let held: Vec<StdListener> = (0..n)
        .map(|_| StdListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("finding free ports")?;
    Ok(held.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.port()).collect())
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts `trellis ARGS` with only the settings the demo gives it: a `TRELLIS_*` variable
/// left in the caller's shell (a sourced `proxy.env`, a default action, a trust domain)
/// would otherwise reach every child as a flag.
fn spawn(args: &[String], env: &[(&str, &str)], log: &std::path::Path) -> Result<Proc> {
    let exe = std::env::current_exe().context("finding the trellis binary")?;
    let stderr = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(exe);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TRELLIS_") {
            cmd.env_remove(name);
        }
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .env("TRELLIS_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map(Proc)
        .context("starting a trellis process")
}

impl Mesh {
    pub async fn start(otlp: Option<String>) -> Result<Mesh> {
        // Owner-only: it holds the CA's key and the admin token.
        let dir = tempfile::Builder::new()
            .prefix("trellis-demo-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .context("creating a temporary dir")?;
        let ports = free_ports(12)?;
        let data = dir.path().join("control");
        let control_url = format!("https://127.0.0.1:{}", ports[0]);
        let mut control = spawn(
            &[
                "control",
                "run",
                "--data-dir",
                &data.display().to_string(),
                "--listen",
                &format!("127.0.0.1:{}", ports[0]),
            ]
            .map(String::from),
            &[],
            &dir.path().join("control.log"),
        )?;
        let fingerprint = read_banner(&mut control.0, dir.path())?;
        let bundle = TrustBundle::load(&data.join("bundle.pem")).context("reading the demo's trust bundle")?;
        let token = std::fs::read_to_string(data.join("admin.token")).context("reading the admin token")?;
        let admin_client = ControlClient::new(&control_url, &bundle, None, None, Some(token))?;
        // A copy to edit and re-apply while the demo runs.
        std::fs::write(dir.path().join("policies.yaml"), super::POLICIES).context("writing the demo's policy file")?;
        let applied = admin_client.apply_policies(super::POLICIES.to_string()).await?;
        let policy_summary = format!("{} (version {})", applied.created.join(", "), applied.version);

        let api_app = apps::api_server().await?;
        let db_app = apps::db_server().await?;
        let trace_file = dir.path().join("traces.jsonl");
        let mut mesh = Mesh {
            dir,
            control_url,
            fingerprint,
            bundle,
            admin_client,
            sidecars: Vec::new(),
            policy_summary,
            trace_file,
            api_app,
            db_app,
            control,
        };
        let (api_in, db_in) = (addr(ports[1]), addr(ports[2]));
        let plan = [
            Plan { name: "db", inbound: Some((db_in, db_app)), routes: vec![], admin: addr(ports[3]) },
            Plan {
                name: "api",
                inbound: Some((api_in, api_app)),
                routes: vec![("db", addr(ports[4]), db_in)],
                admin: addr(ports[5]),
            },
            Plan {
                name: "web",
                inbound: None,
                routes: vec![("api", addr(ports[6]), api_in), ("db", addr(ports[7]), db_in)],
                admin: addr(ports[8]),
            },
        ];
        for p in plan {
            let sidecar = mesh.start_sidecar(p, db_app, otlp.as_deref()).await?;
            mesh.sidecars.push(sidecar);
        }
        for s in &mesh.sidecars {
            wait_ready(s, mesh.dir.path())?;
        }
        Ok(mesh)
    }

    async fn start_sidecar(&self, plan: Plan, db_app: SocketAddr, otlp: Option<&str>) -> Result<Sidecar> {
        let Plan { name, inbound, routes, admin } = plan;
        let id = SpiffeId::parse(&spiffe(name))?;
        let token =
            self.admin_client.create_token(&TokenRequest { spiffe_id: id, ttl_seconds: Some(300) }).await?.token;
        let mut args: Vec<String> =
            ["proxy", "run", "--control", &self.control_url, "--admin", &admin.to_string()].map(String::from).to_vec();
        args.extend(["--ca-bundle".into(), self.dir.path().join("control/bundle.pem").display().to_string()]);
        // The db speaks first: its port and every route to it are opaque (never sniffed).
        let mut opaque = vec![db_app.port()];
        if let Some((listen, app)) = inbound {
            args.extend(["--inbound".into(), format!("{listen}={app}")]);
        }
        for (peer, listen, target) in &routes {
            args.extend(["--route".into(), format!("{listen}={target},{}", spiffe(peer))]);
            if *peer == "db" {
                opaque.push(listen.port());
            }
        }
        args.extend(["--opaque-ports".into(), opaque.iter().map(u16::to_string).collect::<Vec<_>>().join(",")]);
        match otlp {
            Some(url) => args.extend(["--otlp-endpoint".into(), url.to_string()]),
            None => args.extend(["--trace-file".into(), self.trace_file.display().to_string()]),
        }
        // In the environment, not on the command line that `ps` shows everyone.
        let child = spawn(&args, &[("TRELLIS_TOKEN", &token)], &self.dir.path().join(format!("{name}.log")))?;
        let app_desc = match inbound {
            Some((_, app)) if name == "db" => format!("db (TCP, speaks first) on {app}"),
            Some((_, app)) => format!("{name} (HTTP) on {app}"),
            None => "web (HTTP client, in this process)".to_string(),
        };
        let routes = routes.into_iter().map(|(peer, listen, _)| (peer, listen)).collect();
        Ok(Sidecar { name, admin, inbound: inbound.map(|(l, _)| l), routes, app_desc, child })
    }

    pub fn sidecar(&self, name: &str) -> &Sidecar {
        self.sidecars.iter().find(|s| s.name == name).expect("demo sidecar exists")
    }

    /// `from`'s plaintext listener for calls to `to`.
    pub fn route(&self, from: &str, to: &str) -> SocketAddr {
        self.sidecar(from).routes.iter().find(|(p, _)| *p == to).map(|(_, a)| *a).expect("demo route exists")
    }

    pub fn inbound(&self, name: &str) -> SocketAddr {
        self.sidecar(name).inbound.expect("demo sidecar has an inbound listener")
    }

    pub fn id(&self, name: &str) -> SpiffeId {
        SpiffeId::parse(&spiffe(name)).expect("demo IDs are valid")
    }

    /// The decision the live policies give a flow (what the destination's sidecar enforced).
    pub async fn explain(&self, from: &str, to: &str, http: Option<(&str, &str)>) -> Option<serde_json::Value> {
        let req = CheckRequest {
            from: Some(self.id(from)),
            to: Some(self.id(to)),
            port: Some(if to == "db" { self.db_app.port() } else { self.api_app.port() }),
            method: http.map(|h| h.0.to_string()),
            path: http.map(|h| h.1.to_string()),
            ..CheckRequest::default()
        };
        self.admin_client.check(&req).await.ok().map(|r| r.decision)
    }

    /// SIGTERM to every child (sidecars first), then wait; the temp dir goes with `self`.
    pub async fn stop(&mut self) {
        for s in self.sidecars.iter_mut().rev() {
            terminate(&mut s.child.0);
        }
        terminate(&mut self.control.0);
    }
}

fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits for `trellis control run`'s banner and returns the CA fingerprint it prints.
fn read_banner(control: &mut Child, dir: &std::path::Path) -> Result<String> {
    let Some(stdout) = control.stdout.take() else { bail!("control plane has no stdout") };
    let mut lines = BufReader::new(stdout).lines();
    let mut fingerprint = None;
    for line in lines.by_ref().take(5) {
        let line = line.context("reading the control plane's banner")?;
        if let Some(fp) = line.trim().strip_prefix("CA fingerprint:") {
            fingerprint = Some(fp.trim().trim_start_matches("SHA256").trim().to_string());
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    fingerprint.ok_or_else(|| {
        let log = std::fs::read_to_string(dir.join("control.log")).unwrap_or_default();
        anyhow::anyhow!("the control plane did not start:\n{log}")
    })
}

fn wait_ready(s: &Sidecar, dir: &std::path::Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if super::report::http_status(s.admin, "/ready") == Some(200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(dir.join(format!("{}.log", s.name))).unwrap_or_default();
    bail!("the {} sidecar did not become ready:\n{log}", s.name)
}
