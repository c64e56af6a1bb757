//! End-to-end tests of `trellis policy validate|check`: the built binary, real files, exit codes
//! (0 allow / valid, 1 deny, 2 error) and what is printed where.

use std::io::Write;
use std::process::{Command, Output, Stdio};

const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

const POLICIES: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: api-from-web
spec:
  selector: spiffe://cluster.local/ns/shop/sa/api
  rules:
    - from:
        - identity: spiffe://cluster.local/ns/shop/sa/web
      to:
        - ports: [8080]
          methods: [GET]
          paths: ["/api/*"]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: block-admin
spec:
  selector: spiffe://cluster.local/ns/shop/sa/api
  action: DENY
  rules:
    - to:
        - paths: ["/admin*"]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: lb-only
spec:
  selector: spiffe://cluster.local/ns/shop/sa/web
  mode: audit
  rules:
    - from:
        - ipBlock: 10.0.0.0/8
---
apiVersion: trellis.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: web-to-psp
spec:
  selector: spiffe://cluster.local/ns/shop/sa/web
  rules:
    - to:
        - ipBlock: 203.0.113.0/24
          ports: [443]
"#;

/// The binary with no `TRELLIS_*` variables from the caller's environment.
fn trellis() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TRELLIS_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("TRELLIS_LOG", "error");
    cmd
}

fn file(content: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    f.write_all(content.as_bytes()).unwrap();
    f
}

fn run(args: &[&str]) -> Output {
    trellis().args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "stdout:\n{}\nstderr:\n{}", stdout(o), stderr(o));
}

fn check(policies: &tempfile::NamedTempFile, extra: &[&str]) -> Output {
    check_path(policies.path().to_str().unwrap(), extra)
}

fn check_path(path: &str, extra: &[&str]) -> Output {
    let mut args = vec!["policy", "check", "-f", path];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn validate_ok_lists_the_policies() {
    let f = file(POLICIES);
    let o = run(&["policy", "validate", "-f", f.path().to_str().unwrap()]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "ok: 4 policies (api-from-web, block-admin, lb-only, web-to-psp)\n");
}

#[test]
fn validate_reports_every_error_and_exits_2() {
    let bad = POLICIES.replace("ports: [8080]", "ports: [0]").replace("action: DENY", "action: deny");
    let f = file(&bad);
    let o = run(&["policy", "validate", "-f", f.path().to_str().unwrap()]);
    assert_exit(&o, 2);
    assert_eq!(stdout(&o), "");
    let err = stderr(&o);
    assert!(
        err.contains("document \"api-from-web\": spec.rules[0].to[0].ports[0]: port 0 is not a valid port"),
        "{err}"
    );
    assert!(err.contains("document \"block-admin\": spec.action: invalid action \"deny\""), "{err}");
    assert_eq!(err.lines().count(), 2, "{err}");
}

#[test]
fn validate_reads_a_directory_and_names_the_file_of_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = POLICIES.split_at(POLICIES.find("---").unwrap());
    std::fs::write(dir.path().join("a.yaml"), first).unwrap();
    std::fs::write(dir.path().join("b.yml"), second).unwrap();
    std::fs::write(dir.path().join("README.md"), "not a policy").unwrap();
    let path = dir.path().to_str().unwrap();
    let o = run(&["policy", "validate", "-f", path]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "ok: 4 policies (api-from-web, block-admin, lb-only, web-to-psp)\n");
    let o = check_path(path, &["--from", WEB, "--to", API, "--port", "8080", "--method", "GET", "--path", "/api/x"]);
    assert_exit(&o, 0);

    // A name used in two files, and a bad document: both reported, each with its file.
    std::fs::write(
        dir.path().join("c.json"),
        r#"{"apiVersion": "trellis.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "lb-only"}, "spec": {"selector": "*", "rules": [{"to": [{"ports": [0]}]}]}}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("d.yaml"), POLICIES.split("---").nth(1).unwrap()).unwrap();
    let o = run(&["policy", "validate", "-f", path]);
    assert_exit(&o, 2);
    let err = stderr(&o);
    assert!(err.contains("c.json: document \"lb-only\": spec.rules[0].to[0].ports[0]: port 0"), "{err}");
    assert!(err.contains("d.yaml: policy \"block-admin\": the name is already used in"), "{err}");
    assert_eq!(stdout(&o), "");

    let empty = tempfile::tempdir().unwrap();
    let o = run(&["policy", "validate", "-f", empty.path().to_str().unwrap()]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("no policy files (*.yaml, *.yml, *.json)"), "{}", stderr(&o));
}

/// A file name comes from the directory, not from the user: printed escaped, so a name
/// cannot fake an `ok:` line or send terminal escapes into a CI log.
#[test]
fn a_file_name_is_printed_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let name = "a\nok: 1 policy (all good)\u{1b}[8m.yaml";
    std::fs::write(dir.path().join(name), "kind: AuthorizationPolicy\n").unwrap();
    let o = run(&["policy", "validate", "-f", dir.path().to_str().unwrap()]);
    assert_exit(&o, 2);
    let err = stderr(&o);
    assert!(err.contains("a\\nok: 1 policy (all good)\\u{1b}[8m.yaml: "), "{err}");
    assert!(!err.contains('\u{1b}') && err.lines().all(|l| !l.starts_with("ok:")), "{err}");
}

#[test]
fn a_directory_is_held_to_the_limits_of_one_apply_as_a_whole() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["a", "b"] {
        let docs: Vec<String> = (0..6000)
            .map(|i| {
                format!(
                    "{{\"apiVersion\":\"trellis.dev/v1alpha1\",\"kind\":\"AuthorizationPolicy\",\
                     \"metadata\":{{\"name\":\"{file}-{i}\"}},\"spec\":{{\"selector\":\"*\",\"rules\":[]}}}}"
                )
            })
            .collect();
        std::fs::write(dir.path().join(format!("{file}.json")), format!("[{}]", docs.join(","))).unwrap();
    }
    let o = run(&["policy", "validate", "-f", dir.path().to_str().unwrap()]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("12000 policy documents; the limit is 10000"), "{}", stderr(&o));
    // Each file alone is fine.
    let o = run(&["policy", "validate", "-f", dir.path().join("a.json").to_str().unwrap()]);
    assert_exit(&o, 0);
}

#[test]
fn validate_and_check_refuse_a_file_without_policies_as_apply_does() {
    let check = ["--to", "spiffe://cluster.local/ns/shop/sa/api", "--port", "8080", "--default", "allow"];
    for text in ["", "# only a comment\n", "---\n", "[]"] {
        let f = file(text);
        let o = run(&["policy", "validate", "-f", f.path().to_str().unwrap()]);
        assert_exit(&o, 2);
        assert!(stderr(&o).contains("no policy documents"), "{text:?}: {}", stderr(&o));
        // Not a decision from no policies: that would pass a CI assertion on a truncated file.
        let o = run(&[&["policy", "check", "-f", f.path().to_str().unwrap()][..], &check].concat());
        assert_exit(&o, 2);
        assert!(stderr(&o).contains("no policy documents"), "{text:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), "");
    }
}

/// `TRELLIS_POLICY_FILE`, exported for `validate` and `apply`, does not turn a live check
/// into an offline one; a check given a file says it does not ask the control plane.
#[test]
fn check_asks_the_control_plane_unless_given_its_own_file() {
    let f = file(POLICIES);
    let path = f.path().to_str().unwrap();
    let flow = ["policy", "check", "--to", "spiffe://cluster.local/ns/shop/sa/api", "--port", "8080"];
    let check_with = |file_var: &str| {
        let control = ("TRELLIS_CONTROL", "https://127.0.0.1:1");
        trellis().args(flow).env(file_var, path).env(control.0, control.1).output().unwrap()
    };
    let o = check_with("TRELLIS_POLICY_FILE");
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("no trust bundle"), "the live path was taken: {}", stderr(&o));
    let o = check_with("TRELLIS_CHECK_FILE");
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("offline; --control https://127.0.0.1:1 is not asked"), "{}", stderr(&o));
}

#[test]
fn output_that_cannot_be_written_is_an_error_not_a_panic() {
    let f = file(POLICIES);
    let path = f.path().to_str().unwrap();
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let o = trellis().args(["policy", "validate", "-f", path]).stdout(full).output().unwrap();
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("cannot write to standard output"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    // A reader that went away: exit 2, quietly (as `| head` would leave it).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o =
        trellis().args(["policy", "check", "-f", path, "--to", API, "--port", "8080"]).stdout(writer).output().unwrap();
    assert_exit(&o, 2);
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    // stderr that cannot be written changes nothing: the errors' exit code stays 2.
    let bad = file(&POLICIES.replace("[8080]", "[0]"));
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let o = trellis().args(["policy", "validate", "-f", bad.path().to_str().unwrap()]).stderr(full).output().unwrap();
    assert_exit(&o, 2);
}

#[test]
fn validate_reads_stdin() {
    let mut child = trellis()
        .args(["policy", "validate", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(POLICIES.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_exit(&o, 0);
    assert!(stdout(&o).starts_with("ok: 4 policies"));
}

#[test]
fn validate_missing_or_unreadable_file_exits_2() {
    let o = run(&["policy", "validate", "-f", "/nonexistent/policies.yaml"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("/nonexistent/policies.yaml"), "{}", stderr(&o));
    let f = file("");
    std::fs::write(f.path(), [0xff, 0xfe, 0x00]).unwrap();
    let o = run(&["policy", "validate", "-f", f.path().to_str().unwrap()]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("not valid UTF-8"), "{}", stderr(&o));
}

#[test]
fn check_allow_exits_0() {
    let f = file(POLICIES);
    let o = check(&f, &["--from", WEB, "--to", API, "--port", "8080", "--method", "GET", "--path", "/api/items"]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "allow: policy \"api-from-web\" rule 0\n");
}

#[test]
fn check_deny_exits_1_with_the_reason() {
    let f = file(POLICIES);
    let o = check(&f, &["--from", WEB, "--to", API, "--port", "8080", "--method", "GET", "--path", "/api/../admin"]);
    assert_exit(&o, 1);
    assert_eq!(stdout(&o), "deny: policy \"block-admin\" rule 0\n");
    // No --from: an unauthenticated source.
    let o = check(&f, &["--to", API, "--port", "8080", "--method", "GET", "--path", "/api/x"]);
    assert_exit(&o, 1);
    assert_eq!(stdout(&o), "deny: no rule matched (default deny)\n");
    let o = check(&f, &["--from", WEB, "--to", API, "--port", "8080", "--method", "GET", "--path", "/api%2fx"]);
    assert_exit(&o, 1);
    assert_eq!(stdout(&o), "deny: invalid path: encoded '/' in path\n");
}

#[test]
fn check_default_and_audit_lines() {
    let f = file(POLICIES);
    let args = ["--to", WEB, "--port", "8080", "--source-ip", "192.168.1.5", "--default", "allow"];
    let o = check(&f, &args);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "allow: no rule matched (default allow)\naudit: deny: no rule matched (default deny)\n");
    let o = trellis()
        .args(["policy", "check", "-f", f.path().to_str().unwrap(), "--to", WEB, "--port", "8080"])
        .args(["--source-ip", "10.1.2.3"])
        .env("TRELLIS_DEFAULT_ACTION", "allow")
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "allow: no rule matched (default allow)\naudit: allow: policy \"lb-only\" rule 0\n");
}

#[test]
fn check_json_output_parses() {
    let f = file(POLICIES);
    let o = check(&f, &["--from", WEB, "--to", API, "--port", "8080", "--output", "json"]);
    assert_exit(&o, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["action"], "deny");
    assert_eq!(v["reason"]["kind"], "policy");
    assert_eq!(v["reason"]["policy"], "block-admin");
    assert_eq!(v["reason"]["rule"], 0);
    assert_eq!(v["audit"], serde_json::Value::Null);
    let o = trellis()
        .args(["policy", "check", "-f", f.path().to_str().unwrap(), "--to", WEB, "--port", "80"])
        .env("TRELLIS_OUTPUT", "json")
        .output()
        .unwrap();
    assert_exit(&o, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["reason"]["kind"], "default");
    assert_eq!(v["audit"]["action"], "deny", "127.0.0.1 is outside lb-only's block: {v}");
}

/// `TRELLIS_OUTPUT` is shared by every command, so `yaml` (what `policy get` prints) must be a
/// format `check` prints too: the same fields as its JSON.
#[test]
fn check_yaml_output_has_the_json_fields() {
    let f = file(POLICIES);
    let args = ["--from", WEB, "--to", API, "--port", "8080"];
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&check(&f, &[&args[..], &["-o", "json"]].concat()))).unwrap();
    let o = trellis()
        .args(["policy", "check", "-f", f.path().to_str().unwrap()])
        .args(args)
        .env("TRELLIS_OUTPUT", "yaml")
        .output()
        .unwrap();
    assert_exit(&o, 1);
    let yaml: serde_json::Value = serde_saphyr::from_str(&stdout(&o)).unwrap();
    assert_eq!(yaml, json);
    assert_eq!(yaml["reason"]["policy"], "block-admin");
}

#[test]
fn check_egress() {
    let f = file(POLICIES);
    let o = check(&f, &["--from", WEB, "--to-address", "203.0.113.7:443"]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "allow: policy \"web-to-psp\" rule 0\n");
    let o = check(&f, &["--from", WEB, "--to-address", "[2001:db8::1]:443", "--default", "allow"]);
    assert_exit(&o, 1);
    assert_eq!(stdout(&o), "deny: no rule matched (default deny)\n", "--default does not apply to egress");
}

#[test]
fn check_flag_errors_exit_2() {
    let f = file(POLICIES);
    let cases: &[&[&str]] = &[
        &["--to-address", "203.0.113.7:443"],
        &["--to", API, "--port", "8080", "--method", "GET"],
        &["--to", API, "--port", "8080", "--path", "/x"],
        &["--to", API],
        &["--port", "8080"],
        &[],
        &["--to", API, "--port", "0"],
        &["--to", API, "--port", "65536"],
        &["--to", API, "--port", "80", "--from", WEB, "--to-address", "1.2.3.4:5"],
        &["--to", API, "--port", "80", "--source-ip", "10.0.0"],
        &["--to", "spiffe://Bad/x", "--port", "80"],
        &["--to", API, "--port", "80", "--from", "web"],
        &["--from", WEB, "--to-address", "1.2.3.4"],
        &["--from", WEB, "--to-address", "1.2.3.4:0"],
        &["--to", API, "--port", "80", "--default", "maybe"],
        &["--to", API, "--port", "80", "--output", "xml"],
        &["--from", WEB, "--to-address", "1.2.3.4:5", "--port", "99"],
        &["--to", API, "--port", "80", "--method", "G T", "--path", "/"],
        &["--to", API, "--port", "80", "--method", "", "--path", "/"],
    ];
    for args in cases {
        let o = check(&f, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: stdout {} stderr {}", stdout(&o), stderr(&o));
        assert!(!stderr(&o).is_empty(), "{args:?}: says why");
        assert_eq!(stdout(&o), "", "{args:?}");
    }
}

#[test]
fn check_missing_file_and_bad_policies_exit_2() {
    let o = run(&["policy", "check", "-f", "/nonexistent.yaml", "--to", API, "--port", "80"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).starts_with("error: /nonexistent.yaml:"), "{}", stderr(&o));
    let f = file("apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {}\n");
    let o = check(&f, &["--to", API, "--port", "80"]);
    assert_exit(&o, 2);
    // Named by its file, as each file of a directory is.
    assert_eq!(
        stderr(&o),
        format!("{}: document \"x\": spec.selector: required field is missing\n", f.path().display())
    );
}

/// A name no policy can have is refused by the CLI itself (it was sent URL-encoded and
/// answered `policy "Bad%20Name" not found`).
#[test]
fn get_and_delete_refuse_names_no_policy_can_have() {
    for cmd in ["get", "delete"] {
        for name in ["Bad Name", "../policies", "a..b"] {
            let o = run(&["policy", cmd, name]);
            assert_exit(&o, 2);
            assert!(stderr(&o).contains(&format!("invalid name {name:?}")), "{cmd} {name}: {}", stderr(&o));
        }
    }
}

/// `validate --trust-domain` refuses what `apply` would for that mesh (patterns outside it can
/// never match), so a CI job that only validates catches it; without it any trust domain passes.
#[test]
fn validate_with_a_trust_domain_refuses_patterns_outside_it() {
    let foreign = POLICIES.replacen("spiffe://cluster.local/ns/shop/sa/api", "spiffe://cluster.locl/ns/shop/sa/api", 1);
    let f = file(&foreign);
    let path = f.path().to_str().unwrap();
    assert_exit(&run(&["policy", "validate", "-f", path]), 0);
    let o = run(&["policy", "validate", "-f", path, "--trust-domain", "cluster.local"]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains(&format!(
            "{path}: document \"api-from-web\": spec.selector: spiffe://cluster.locl/ns/shop/sa/api is not in trust domain cluster.local"
        )),
        "{}",
        stderr(&o)
    );
    assert_eq!(stdout(&o), "");
    assert_exit(&run(&["policy", "validate", "-f", path, "--trust-domain", "cluster.locl"]), 2);
    let ok = file(POLICIES);
    assert_exit(&run(&["policy", "validate", "-f", ok.path().to_str().unwrap(), "--trust-domain", "cluster.local"]), 0);
}

/// A CONNECT request carries `host:port`, never a path: asked about `/x`, `policy check`
/// would allow what every sidecar denies (an invalid path), so the question is refused.
#[test]
fn check_refuses_a_connect_request_with_a_path() {
    let f = file(POLICIES);
    let base = ["--from", WEB, "--to", API, "--port", "8080", "--method", "CONNECT", "--default", "allow"];
    let o = check(&f, &[&base[..], &["--path", "/api/x"]].concat());
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("CONNECT request's target is host:port, not a path"), "{}", stderr(&o));
    let o = check(&f, &[&base[..], &["--path", "api:8080"]].concat());
    assert_exit(&o, 1);
    assert!(stdout(&o).contains("invalid path"), "{}", stdout(&o));
}
