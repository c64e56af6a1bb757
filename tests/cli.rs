//! The binary's front door: help, version, and clear refusals of bad usage.

use std::process::Command;

mod support;
use support::assert_refused;

fn trellis() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
}

#[test]
fn version_and_help() {
    let out = trellis().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("trellis {}", env!("CARGO_PKG_VERSION")));
    let out = trellis().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("zero-trust") && help.contains("policy"), "{help}");
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let out = trellis().arg("frobnicate").output().unwrap();
    assert_refused(&out, Some(2), "frobnicate");
}

#[test]
fn a_bad_log_filter_is_a_usage_error_naming_it() {
    let out = trellis().args(["--log", "trellis_proxy=loud", "policy", "validate", "-f", "-"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--log") && stderr.contains("trellis_proxy=loud"), "{stderr}");
    let out = trellis()
        .args(["policy", "validate", "-f", "-"])
        .env("TRELLIS_LOG", "warn,trellis_proxy=chatty")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    // A mistyped level: tracing's syntax reads a bare word as a crate name, which would turn
    // every log line off without a word.
    for bad in ["inf", "verbose", "warn,nonsense"] {
        let out = trellis().args(["--log", bad, "policy", "validate", "-f", "-"]).output().unwrap();
        assert_refused(&out, Some(2), "is not a level");
    }
    let ok = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo/policies.yaml");
    let out = trellis().args(["--log", "WARN,trellis_proxy=debug", "policy", "validate", "-f", ok]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Every variable `trellis inject` gives the proxy container is one `trellis proxy run` reads
/// (a variable it ignores would be a setting that silently does nothing).
#[test]
fn every_injected_variable_is_one_the_proxy_reads() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("control/tests/fixtures/inject");
    let injected = std::fs::read_to_string(fixtures.join("app-probes.expected.yaml")).unwrap();
    let help = trellis().args(["proxy", "run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let names: Vec<&str> = injected.lines().filter_map(|l| l.trim().strip_prefix("- name: TRELLIS_")).collect();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        assert!(
            help.contains(&format!("[env: TRELLIS_{name}")),
            "TRELLIS_{name} is injected but `proxy run` does not read it"
        );
    }
}

/// `trellis inject -f DIR`, as `kubectl apply -f DIR`: every manifest file in it (YAML and
/// JSON alike), joined; one bad file and nothing is printed.
#[test]
fn inject_reads_a_directory_of_manifests() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("control/tests/fixtures/inject");
    let dir = tempfile::tempdir().unwrap();
    for name in ["pod.yaml", "kubectl-get.json", "job.yaml"] {
        std::fs::copy(fixtures.join(name), dir.path().join(name)).unwrap();
    }
    std::fs::write(dir.path().join("README.md"), "not a manifest").unwrap();
    let inject = || {
        trellis()
            .arg("inject")
            .arg("-f")
            .arg(dir.path())
            .arg("--ca-bundle")
            .arg(fixtures.join("bundle.pem"))
            .output()
            .unwrap()
    };
    let out = inject();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8_lossy(&out.stdout);
    let each: String = ["job", "kubectl-get", "pod"]
        .iter()
        .map(|n| std::fs::read_to_string(fixtures.join(format!("{n}.expected.yaml"))).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    assert_eq!(yaml, each, "the files' own injections, in name order");

    std::fs::write(dir.path().join("z-bad.yaml"), "kind: [").unwrap();
    let out = inject();
    assert_refused(&out, Some(2), "z-bad.yaml");
    assert!(out.stdout.is_empty());

    // Valid JSON, but an array of objects is not a manifest kubectl applies: refused, not
    // passed through uninjected.
    std::fs::remove_file(dir.path().join("z-bad.yaml")).unwrap();
    std::fs::write(dir.path().join("z-array.json"), "[{\"apiVersion\": \"v1\", \"kind\": \"Pod\"}]").unwrap();
    let out = inject();
    assert_refused(&out, Some(2), "z-array.json: document 1: a sequence of documents");
    assert!(out.stdout.is_empty());
}

/// `trellis inject` as an operator runs it: the proxy resources annotations land in the
/// proxy container, and a bad one is refused naming it, with nothing printed to apply.
#[test]
fn inject_sizes_the_proxy_from_annotations_and_refuses_bad_ones() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("control/tests/fixtures/inject");
    let bundle = fixtures.join("bundle.pem");
    let manifest = std::fs::read_to_string(fixtures.join("gateway-resources.yaml")).unwrap();
    let inject = |yaml: &str| {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("in.yaml");
        std::fs::write(&file, yaml).unwrap();
        trellis().arg("inject").arg("-f").arg(&file).arg("--ca-bundle").arg(&bundle).output().unwrap()
    };

    let out = inject(&manifest);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in ["cpu: 500m", "memory: 128Mi", "cpu: \"2\"", "memory: 1Gi"] {
        assert!(stdout.contains(line), "{line} missing from:\n{stdout}");
    }

    for (from, to, reason) in [
        ("\"1Gi\"", "\"1GB\"", "not a Kubernetes quantity"),
        ("\"128Mi\"", "\"2Gi\"", "above the limit 1Gi"),
        ("\"500m\"", "\"-500m\"", "negative"),
    ] {
        let out = inject(&manifest.replacen(from, to, 1));
        assert_eq!(out.status.code(), Some(2), "{to}");
        assert!(out.stdout.is_empty(), "{to}: printed a manifest anyway");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("gateway") && stderr.contains("trellis.dev/proxy-") && stderr.contains(reason),
            "{stderr}"
        );
    }
}

/// A probe that cannot pass once its port is captured is injected anyway, with a warning
/// on stderr naming the document, the container, the probe and the way out.
#[test]
fn inject_warns_of_probes_that_fail_in_the_mesh() {
    let bundle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("control/tests/fixtures/inject/bundle.pem");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 443}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers:\n  - name: web\n    image: web\n\
         \x20   readinessProbe: {httpGet: {path: /, port: 8443, scheme: HTTPS}}\n",
    )
    .unwrap();
    let out = trellis().arg("inject").arg("-f").arg(&file).arg("--ca-bundle").arg(&bundle).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("trellis-proxy"), "injected anyway");
    assert!(
        stderr.contains(&format!(
            "{}: document 2: container \"web\" readinessProbe: an HTTPS probe of port 8443",
            file.display()
        )) && stderr.contains("trellis.dev/exclude-inbound-ports"),
        "{stderr}"
    );

    // In a List, what is said of an item names the item — a note, a warning or an error.
    let item = |annotations: &str, host_network: bool| {
        format!(
            "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: p, annotations: {{{annotations}}}}}\n  spec:\n    hostNetwork: {host_network}\n    containers: [{{name: a, image: a, readinessProbe: {{grpc: {{port: 9000}}}}}}]\n"
        )
    };
    let list = |items: &str| format!("apiVersion: v1\nkind: List\nitems:\n{}{items}", item("", false));
    let run = |yaml: String| {
        std::fs::write(&file, yaml).unwrap();
        trellis().arg("inject").arg("-f").arg(&file).arg("--ca-bundle").arg(&bundle).output().unwrap()
    };
    let out = run(list(&item("", true)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("document 1 items[0]: container \"a\" readinessProbe: a grpc probe"), "{stderr}");
    assert!(stderr.contains("document 1 items[1]: not injected: uses hostNetwork"), "{stderr}");
    let out = run(list(&item("trellis.dev/opaque-port: \"1\"", false)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("items[1].metadata.annotations: annotation trellis.dev/opaque-port: not an annotation"),
        "{stderr}"
    );
}

#[test]
fn boolean_flags_read_their_variables_as_operators_write_them() {
    // Any value but a false one is true: a dry run prints the rules instead of installing them.
    for v in ["1", "yes", "true", "on", "TRUE"] {
        let out = trellis().args(["proxy", "init"]).env("TRELLIS_DRY_RUN", v).output().unwrap();
        assert!(out.status.success(), "{v}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("# Trellis transparent capture"), "{v}");
    }
    // False ones, and an empty value (as env files leave it), are false: a native sidecar.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("control/tests/fixtures/inject");
    let manifest = fixtures.join("gateway-resources.yaml");
    let inject = |v: &str| {
        let out = trellis()
            .arg("inject")
            .arg("-f")
            .arg(&manifest)
            .arg("--ca-bundle")
            .arg(fixtures.join("bundle.pem"))
            .env("TRELLIS_CLASSIC_SIDECAR", v)
            .output()
            .unwrap();
        assert!(out.status.success(), "{v}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).contains("restartPolicy: Always")
    };
    for v in ["", "0", "false", "no", "off"] {
        assert!(inject(v), "TRELLIS_CLASSIC_SIDECAR={v:?} gave a classic sidecar");
    }
    assert!(!inject("1"), "TRELLIS_CLASSIC_SIDECAR=1 gave a native sidecar");
}

/// `--k8s-api` points the Kubernetes integration at an API server from outside the cluster:
/// it needs `--k8s-attestation`, and credentials that are missing are named at start.
#[test]
fn the_kubernetes_api_flags_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let run = |extra: &[&str]| {
        let out = trellis()
            .args(["control", "run", "--data-dir", &data, "--listen", "127.0.0.1:0"])
            .args(extra)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["--k8s-api", "https://127.0.0.1:6443"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--k8s-attestation"), "{err}");
    let creds = dir.path().join("no-such-dir");
    let creds = creds.display().to_string();
    let (code, err) = run(&["--k8s-attestation", "--k8s-api", "https://127.0.0.1:6443", "--k8s-credentials", &creds]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("--k8s-api") && err.contains("no-such-dir/ca.crt"), "{err}");
}

/// A zero `--header-timeout` would cut off every client before its first request: refused.
#[test]
fn a_zero_header_timeout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = trellis()
        .args(["control", "run", "--listen", "127.0.0.1:0", "--header-timeout", "0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_refused(&out, Some(2), "--header-timeout");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing created");
    // The proxy's too, and its other timeouts are bounded (a typo like 9999999999d is refused).
    for (flag, value) in [("--header-timeout", "0"), ("--detect-timeout", "9999999999d"), ("--drain-timeout", "2h")] {
        let out =
            trellis().args(["proxy", "run", "--token", "t", "--ca-bundle", "/dev/null", flag, value]).output().unwrap();
        assert_refused(&out, Some(2), flag);
    }
    // No ready sockets per poll would serve nothing; past tokio's 1,024 is no limit at all.
    for value in ["0", "5000", "many"] {
        let out = trellis()
            .args(["proxy", "run", "--token", "t", "--ca-bundle", "/dev/null", "--events-per-poll", value])
            .output()
            .unwrap();
        assert_refused(&out, Some(2), &format!("invalid value '{value}' for '--events-per-poll <N>'"));
    }
}

/// What a proxy would refuse at startup (and crash-loop on) is refused where it is written:
/// by `trellis inject`, and by `trellis control run --webhook` before it serves — with the
/// webhook's `failurePolicy: Ignore`, a setting refused per request would let every pod start
/// without its sidecar, silently.
#[test]
fn injection_settings_a_proxy_would_refuse_are_refused_up_front() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("control/tests/fixtures/inject");
    for (flag, value, says) in [
        ("--control", "https://", "bad control plane URL"),
        ("--control", "https://a b:7443", "bad control plane URL"),
        ("--control", "https://h:7443/path", "bad control plane URL"),
        ("--image", "UPPER CASE!", "whitespace"),
    ] {
        let out = trellis()
            .args(["inject", "-f"])
            .arg(fixtures.join("pod.yaml"))
            .arg("--ca-bundle")
            .arg(fixtures.join("bundle.pem"))
            .args([flag, value])
            .output()
            .unwrap();
        assert_refused(&out, Some(2), says);
        assert!(out.stdout.is_empty(), "{flag} {value}: printed a manifest");
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (flag, value, says) in [
        ("--inject-image", "", "the image is empty"),
        ("--inject-control", "not a url", "must start with https://"),
        ("--webhook-dns-name", "bad_name!", "not a DNS name"),
        ("--webhook-dns-name", "", "not a DNS name"),
    ] {
        let out = trellis()
            .args(["control", "run", "--webhook", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .args([flag, value])
            .output()
            .unwrap();
        assert_refused(&out, None, says);
        assert!(!data.exists(), "{flag} {value:?}: a refused start left the data dir");
    }
}

/// A route requiring an identity from another trust domain could never be satisfied by any
/// peer: refused at start, before anything is asked of the control plane.
#[test]
fn a_route_to_another_trust_domain_is_refused_at_start() {
    let bundle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("control/tests/fixtures/inject/bundle.pem");
    let out = trellis()
        .args(["proxy", "run", "--token", "t", "--admin", "127.0.0.1:0", "--control", "https://127.0.0.1:9"])
        .arg("--ca-bundle")
        .arg(&bundle)
        .args(["--route", "127.0.0.1:0=127.0.0.1:1,spiffe://other.td/ns/a/sa/b"])
        .output()
        .unwrap();
    assert_refused(&out, None, "is in trust domain other.td, but this mesh's (the CA bundle's) is cluster.local");
}

/// A listener address that cannot be had is named with its flag: taken by another process,
/// or given to two of the proxy's own flags (which would otherwise read as "in use").
#[test]
fn a_listener_address_that_cannot_be_had_names_its_flag() {
    let bundle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("control/tests/fixtures/inject/bundle.pem");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    let free = support::addr(support::free_port()).to_string();
    let inbound = format!("{free}=127.0.0.1:1");
    let cases = [
        (vec!["--admin", taken.as_str()], format!("--admin {taken}: cannot listen there")),
        (
            vec!["--admin", free.as_str(), "--inbound", inbound.as_str()],
            format!("--inbound {free} is also given as --admin"),
        ),
    ];
    for (args, says) in cases {
        let out = trellis()
            .args(["proxy", "run", "--token", "t", "--control", "https://127.0.0.1:9"])
            .arg("--ca-bundle")
            .arg(&bundle)
            .args(&args)
            .output()
            .unwrap();
        assert_refused(&out, None, &says);
    }
}
