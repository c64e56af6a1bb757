//! The control-plane CLI as an operator uses it: `trellis token create`, `policy
//! apply|get|list|delete|check --control`, `workloads list`, against a real control plane.

mod support;

use support::*;

const POLICY: &str = "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: api-from-web
spec:
  selector: spiffe://cluster.local/ns/shop/sa/api
  action: ALLOW
  rules:
    - from:
        - identity: spiffe://cluster.local/ns/shop/sa/web
      to:
        - ports: [8080]
          methods: [GET]
          paths: [\"/api/*\"]
";

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn apply_list_get_delete_round_trip() {
    let control = Control::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.yaml", POLICY);

    let (code, out, err) = control.cli(&["policy", "apply", "-f", &file]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "policy/api-from-web created\nversion 1\n");
    let (_, out, _) = control.cli(&["policy", "apply", "-f", &file]);
    assert_eq!(out, "policy/api-from-web unchanged\nversion 1\n");
    let edited = write(dir.path(), "e.yaml", &POLICY.replace("8080", "9090"));
    let (_, out, _) = control.cli(&["policy", "apply", "-f", &edited]);
    assert_eq!(out, "policy/api-from-web configured\nversion 2\n");

    let (code, out, _) = control.cli(&["policy", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("api-from-web") && out.contains("AuthorizationPolicy") && out.ends_with("version 2\n"),
        "{out}"
    );
    let (code, out, _) = control.cli(&["policy", "get", "api-from-web"]);
    assert_eq!(code, 0);
    assert!(out.contains("name: api-from-web") && out.contains("9090"), "{out}");
    // What `get` prints is a valid policy file again.
    let round = write(dir.path(), "round.yaml", &out);
    let (code, _, err) = control.cli(&["policy", "validate", "-f", &round]);
    assert_eq!(code, 0, "{err}");
    // TRELLIS_OUTPUT=text (what `list` and `check` take) is YAML for `get`, not an error.
    let (code, text, _) = control.cli(&["policy", "get", "api-from-web", "-o", "text"]);
    assert_eq!((code, text.as_str()), (0, out.as_str()));
    let (code, out, _) = control.cli(&["policy", "get", "api-from-web", "-o", "json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["metadata"]["name"], "api-from-web");
    // And `yaml` (what `get` prints) is a format `list` prints too, as its JSON's fields.
    let (code, out, err) = control.cli(&["policy", "list", "-o", "yaml"]);
    assert_eq!(code, 0, "{err}");
    let (_, json, _) = control.cli(&["policy", "list", "-o", "json"]);
    let yaml: serde_json::Value = serde_saphyr::from_str(&out).unwrap();
    assert_eq!(yaml, serde_json::from_str::<serde_json::Value>(&json).unwrap());
    assert_eq!(yaml["policies"][0]["name"], "api-from-web", "{out}");

    let (code, out, _) = control.cli(&["policy", "delete", "api-from-web"]);
    assert_eq!((code, out.as_str()), (0, "policy/api-from-web deleted\nversion 3\n"));
    let (code, _, err) = control.cli(&["policy", "delete", "api-from-web"]);
    assert_eq!(code, 2);
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = control.cli(&["policy", "get", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn invalid_file_is_refused_locally_and_nothing_changes() {
    let control = Control::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.yaml", &POLICY.replace("[8080]", "[0]"));
    let (code, out, err) = control.cli(&["policy", "apply", "-f", &bad]);
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(err.contains("spec.rules[0].to[0].ports[0]") && err.contains("api-from-web"), "{err}");
    let (_, out, _) = control.cli(&["policy", "list"]);
    assert!(out.ends_with("version 0\n"), "{out}");
    let (code, _, err) = control.cli(&["policy", "apply", "-f", "/nonexistent.yaml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent.yaml"), "{err}");
}

#[test]
fn apply_a_directory_applies_all_its_files_or_nothing() {
    let control = Control::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", POLICY);
    write(
        dir.path(),
        "b.json",
        &serde_json::to_string(&serde_json::json!({
            "apiVersion": "trellis.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "db-from-api"},
            "spec": {"selector": "spiffe://cluster.local/ns/shop/sa/db", "rules": [{"to": [{"ports": [5432]}]}]}
        }))
        .unwrap(),
    );
    let path = dir.path().display().to_string();
    let (code, out, err) = control.cli(&["policy", "apply", "-f", &path]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "policy/api-from-web created\npolicy/db-from-api created\nversion 1\n");
    let (code, out, _) = control.cli(&["policy", "get", "db-from-api"]);
    assert_eq!(code, 0);
    assert!(out.contains("5432"), "{out}");

    // One bad file: nothing of the directory is applied.
    write(dir.path(), "a.yaml", &POLICY.replace("8080", "9090"));
    write(dir.path(), "c.yaml", &POLICY.replace("api-from-web", "other").replace("[8080]", "[0]"));
    let (code, out, err) = control.cli(&["policy", "apply", "-f", &path]);
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("c.yaml: document \"other\""), "{err}");
    let (_, out, _) = control.cli(&["policy", "get", "api-from-web"]);
    assert!(out.contains("8080") && !out.contains("9090"), "{out}");
}

#[test]
fn live_check_uses_the_control_planes_policies() {
    let control = Control::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    control.cli(&["policy", "apply", "-f", &write(dir.path(), "p.yaml", POLICY)]);
    let base = ["policy", "check", "--to", "spiffe://cluster.local/ns/shop/sa/api", "--port", "8080"];
    let allow =
        [&base[..], &["--from", "spiffe://cluster.local/ns/shop/sa/web", "--method", "GET", "--path", "/api/x"]]
            .concat();
    let (code, out, err) = control.cli(&allow);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "allow: policy \"api-from-web\" rule 0\n");
    let deny =
        [&base[..], &["--from", "spiffe://cluster.local/ns/shop/sa/web", "--method", "POST", "--path", "/api/x"]]
            .concat();
    let (code, out, _) = control.cli(&deny);
    assert_eq!((code, out.as_str()), (1, "deny: no rule matched (default deny)\n"));
    let json = [&deny[..], &["--output", "json"]].concat();
    let (_, out, _) = control.cli(&json);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["action"], "deny");
    // The same question offline against the same file gives the same answer.
    let file = write(dir.path(), "p2.yaml", POLICY);
    let offline = [&deny[..], &["-f", &file]].concat();
    let (code, out, _) = control.cli(&offline);
    assert_eq!((code, out.as_str()), (1, "deny: no rule matched (default deny)\n"));
    // The control plane refuses what no sidecar could receive, as the offline check does.
    let connect = [&base[..], &["--method", "CONNECT", "--path", "/api/x"]].concat();
    let (code, _, err) = control.cli(&connect);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("400") && err.contains("CONNECT request's target is host:port"), "{err}");
}

#[test]
fn wrong_or_missing_credentials_are_clear_errors() {
    let control = Control::start(&[]);
    let out = std::process::Command::new(bin())
        .args(["policy", "list", "--control", &control.url, "--ca-bundle"])
        .arg(control.bundle_path())
        .args(["--admin-token", "not-the-token"])
        .output()
        .unwrap();
    assert_refused(&out, Some(2), "invalid admin token");
    let out = std::process::Command::new(bin())
        .current_dir(tempfile::tempdir().unwrap().path())
        .args(["token", "create", "--spiffe-id", "spiffe://cluster.local/ns/a/sa/b", "--control", &control.url])
        .env_remove("TRELLIS_CA_BUNDLE")
        .output()
        .unwrap();
    assert_refused(&out, Some(2), "no trust bundle");
    // A control plane that is not there.
    let out = std::process::Command::new(bin())
        .args(["workloads", "list", "--control", &format!("https://127.0.0.1:{}", free_port()), "--ca-bundle"])
        .arg(control.bundle_path())
        .args(["--admin-token-file"])
        .arg(control.data().join("admin.token"))
        .output()
        .unwrap();
    assert_refused(&out, Some(2), "cannot connect");
    // Each mistake named by what was given, before anything is sent.
    let dir = tempfile::tempdir().unwrap();
    let pem = write(dir.path(), "bundle-as-token.pem", &std::fs::read_to_string(control.bundle_path()).unwrap());
    for (args, want) in [
        (&["policy", "list", "--admin-token", "x"][..], "the admin token is given twice"),
        (&["policy", "list", "--admin-token-file", &pem][..], "is not an admin token"),
        (&["policy", "list", "--control", &format!("{}/trellis", control.url)][..], "(no path)"),
        (
            &["token", "create", "--spiffe-id", "spiffe://cluster.local/ns/a/sa/b", "--ttl", "31d"][..],
            "longer than the 30 days",
        ),
    ] {
        let (code, _, err) = control.cli(args);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // An empty token is refused here, not sent to earn a 401.
    let out = std::process::Command::new(bin())
        .args(["policy", "list", "--control", &control.url, "--admin-token", ""])
        .arg("--ca-bundle")
        .arg(control.bundle_path())
        .env_remove("TRELLIS_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    assert_refused(&out, Some(2), "--admin-token is empty");
    let empty = write(dir.path(), "empty.token", "\n");
    let out = std::process::Command::new(bin())
        .args(["proxy", "run", "--control", &control.url, "--ca-bundle"])
        .arg(control.bundle_path())
        .args(["--token-file", &empty, "--inbound", &format!("127.0.0.1:{}=127.0.0.1:9", free_port())])
        .output()
        .unwrap();
    assert_refused(&out, None, "is empty");
    // No token at all, and a state dir with nothing usable in it: said so, not "unknown token".
    let state = tempfile::tempdir().unwrap();
    let none = std::process::Command::new(bin())
        .args(["proxy", "run", "--control", &control.url, "--ca-bundle"])
        .arg(control.bundle_path())
        .arg("--state-dir")
        .arg(state.path())
        .args(["--inbound", &format!("127.0.0.1:{}=127.0.0.1:9", free_port())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&none.stderr);
    assert_ne!(none.status.code(), Some(0), "{err}");
    assert!(err.contains("no join token given") && err.contains("no SVID is kept there"), "{err}");
}

#[test]
fn token_create_prints_only_the_token_and_workloads_list_shows_proxies() {
    let control = Control::start(&[]);
    let (code, out, _) =
        control.cli(&["token", "create", "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/api", "--ttl", "5m"]);
    assert_eq!(code, 0);
    let token = out.trim();
    assert_eq!(token.len(), 64);
    assert_eq!(out, format!("{token}\n"));
    let (code, _, err) =
        control.cli(&["token", "create", "--spiffe-id", "spiffe://cluster.local/ns/x/sa/y", "--ttl", "soon"]);
    assert_eq!(code, 2);
    assert!(err.contains("soon"), "{err}");
    for ttl in ["0", "0s", "500ms", "1s500ms"] {
        let (code, out, err) =
            control.cli(&["token", "create", "--spiffe-id", "spiffe://cluster.local/ns/x/sa/y", "--ttl", ttl]);
        assert_eq!((code, out.as_str()), (2, ""), "--ttl {ttl}: {err}");
        assert!(err.contains("whole number of seconds, at least 1s"), "{err}");
    }
    let api = Sidecar::start(
        &control,
        "spiffe://cluster.local/ns/shop/sa/api",
        &["--inbound".into(), format!("127.0.0.1:{}=127.0.0.1:9", free_port())],
    );
    let (code, out, _) = control.cli(&["workloads", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("spiffe://cluster.local/ns/shop/sa/api"), "{out}");
    // The ack travels separately from readiness; give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, out, _) = control.cli(&["workloads", "list", "-o", "json"]);
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(list[0]["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/api");
        if list[0]["acked_version"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no ack: {list}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (code, out, err) = control.cli(&["workloads", "list", "-o", "yaml"]);
    assert_eq!(code, 0, "{err}");
    let list: serde_json::Value = serde_saphyr::from_str(&out).unwrap();
    assert_eq!(list[0]["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/api", "{out}");
    drop(api);
}

/// A CA key as `openssl ecparam -genkey` writes it (SEC1, `EC PRIVATE KEY`) is refused with
/// the conversion to PKCS#8 named, not only "could not parse key pair".
#[test]
fn a_sec1_ca_key_is_refused_with_the_conversion_to_use() {
    let dir = tempfile::tempdir().unwrap();
    let (key, cert) = (dir.path().join("ca.key"), dir.path().join("ca.pem"));
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key.to_str().unwrap()]);
    openssl(&[
        "req",
        "-x509",
        "-key",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
        "-days",
        "1",
        "-subj",
        "/CN=ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=keyCertSign",
        "-addext",
        "subjectAltName=URI:spiffe://cluster.local",
    ]);
    assert!(std::fs::read_to_string(&key).unwrap().contains("BEGIN EC PRIVATE KEY"));
    let out = std::process::Command::new(bin())
        .args(["control", "run", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--ca-cert", cert.to_str().unwrap(), "--ca-key", key.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("CA key is not usable") && err.contains("openssl pkcs8 -topk8"), "{err}");
}

/// The CLI given another mesh's bundle says what to check, as the proxy does.
#[test]
fn a_bundle_that_does_not_vouch_for_the_control_plane_is_named_as_the_likely_cause() {
    let (control, other) = (Control::start(&[]), Control::start(&[]));
    let other_bundle = other.bundle_path().display().to_string();
    let (code, _, err) = control.cli(&["workloads", "list", "--ca-bundle", &other_bundle]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is --ca-bundle the control plane's bundle.pem"), "{err}");
}

/// `--control` at a plaintext port (an app's, an admin listener) is named as such, not as
/// rustls' "corrupt message of type InvalidContentType".
#[test]
fn a_control_url_at_a_plaintext_port_says_it_is_not_tls() {
    let control = Control::start(&[]);
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", plain.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut conn, _) = plain.accept().unwrap();
        let _ = conn.read(&mut [0u8; 1024]);
        let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
    });
    let (code, _, err) = control.cli(&["workloads", "list", "--control", &url]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not speak TLS") && err.contains("is --control the control plane's https port"), "{err}");
    assert!(!err.contains("InvalidContentType"), "{err}");
}

/// A client that checks host names (curl with the bundle, an OpenAPI client) can call the API
/// by the address it listens on, by `localhost`, and by each `--tls-san`, without `-k`.
#[test]
fn curl_verifies_the_api_by_address_localhost_and_tls_san() {
    let control = Control::start(&["--tls-san", "control.example,10.9.8.7"]);
    let curl = |url: &str, extra: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--fail", "-o", "/dev/null", "--cacert"])
            .arg(control.bundle_path())
            .args(extra)
            .arg(url)
            .output()
            .expect("curl runs");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let port = control.port;
    for url in [format!("https://127.0.0.1:{port}/v1/bundle"), format!("https://localhost:{port}/v1/bundle")] {
        let (ok, err) = curl(&url, &[]);
        assert!(ok, "{url}: {err}");
    }
    let resolve = format!("control.example:{port}:127.0.0.1");
    let (ok, err) = curl(&format!("https://control.example:{port}/v1/bundle"), &["--resolve", &resolve]);
    assert!(ok, "--tls-san name: {err}");
    // A name the certificate does not carry is still refused: the check is real.
    let resolve = format!("other.example:{port}:127.0.0.1");
    let (ok, err) = curl(&format!("https://other.example:{port}/v1/bundle"), &["--resolve", &resolve]);
    assert!(!ok && err.contains("other.example"), "{err}");
}

#[test]
fn a_tls_san_that_is_no_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args(["control", "run", "--listen", "127.0.0.1:0", "--tls-san", "not a name!", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_refused(&out, Some(1), "--tls-san \"not a name!\" is neither a DNS name nor an IP address");
    assert!(!dir.path().join("data").exists(), "nothing created for a refused start");
}
