//! Golden tests for `trellis inject`: every manifest in `tests/fixtures/inject/` is injected
//! and compared with its checked-in `<name>.expected.yaml`; the output is injected again and
//! must come back byte-identical; and, when `kubernetes-validate` is installed, every expected
//! output is validated against the Kubernetes schemas with `--strict`.
//!
//! Regenerate the expected files after an intended change with
//! `TRELLIS_BLESS=1 cargo test -p trellis-control --test inject_golden` and review the diff.
//! Inputs named `classic-*` are injected with `--classic-sidecar`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use trellis_control::inject::{self, InjectConfig, Outcome, SkipReason};

/// The Kubernetes version outputs are validated against: native sidecars are on by default
/// from 1.29. `TRELLIS_K8S_VERSION` overrides it.
const K8S_VERSION: &str = "1.30.0";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject")
}

fn config(classic: bool) -> InjectConfig {
    let bundle = std::fs::read_to_string(fixtures().join("bundle.pem")).expect("bundle.pem");
    let mut cfg = InjectConfig::new(bundle).expect("fixture bundle is valid");
    cfg.classic_sidecar = classic;
    cfg
}

/// Every input fixture, with its expected-output path, sorted by name.
fn cases() -> Vec<(PathBuf, PathBuf)> {
    let mut cases: Vec<_> = std::fs::read_dir(fixtures())
        .expect("fixtures dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            (name.ends_with(".yaml") || name.ends_with(".json")) && !name.ends_with(".expected.yaml")
        })
        .map(|p| {
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
            let expected = p.with_file_name(format!("{stem}.expected.yaml"));
            (p, expected)
        })
        .collect();
    cases.sort();
    cases
}

fn is_classic(input: &Path) -> bool {
    input.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("classic-"))
}

fn inject_file(input: &Path) -> inject::Injected {
    let text = std::fs::read_to_string(input).expect("read fixture");
    inject::inject_manifests(&text, &config(is_classic(input))).unwrap_or_else(|e| panic!("{}: {e}", input.display()))
}

#[test]
fn fixtures_match_their_expected_output() {
    let bless = std::env::var_os("TRELLIS_BLESS").is_some();
    let cases = cases();
    assert!(cases.len() >= 13, "fixtures missing: {cases:?}");
    let mut mismatched = Vec::new();
    for (input, expected_path) in &cases {
        let got = inject_file(input).yaml;
        if bless {
            std::fs::write(expected_path, &got).expect("write expected");
            continue;
        }
        let expected = std::fs::read_to_string(expected_path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with TRELLIS_BLESS=1)", expected_path.display()));
        if got != expected {
            eprintln!("--- {} differs; got:\n{got}", expected_path.display());
            mismatched.push(expected_path.display().to_string());
        }
    }
    assert!(mismatched.is_empty(), "outputs differ from expected (TRELLIS_BLESS=1 regenerates): {mismatched:?}");
}

#[test]
fn injecting_an_injected_manifest_changes_nothing() {
    for (input, _) in cases() {
        let once = inject_file(&input).yaml;
        let twice = inject::inject_manifests(&once, &config(is_classic(&input))).expect("re-inject").yaml;
        assert_eq!(once, twice, "{} is not idempotent", input.display());
    }
}

#[test]
fn skipped_workloads_come_out_as_they_went_in() {
    for name in ["hostnetwork-pod.yaml", "disabled.yaml"] {
        let input = fixtures().join(name);
        let injected = inject_file(&input);
        let before = inject::parse_manifests(&std::fs::read_to_string(&input).expect("read")).expect("parse");
        let after = inject::parse_manifests(&injected.yaml).expect("parse output");
        assert_eq!(before, after, "{name} changed");
        assert_eq!(injected.outcomes.iter().map(Outcome::injected_count).sum::<usize>(), 0);
    }
    let outcomes = inject_file(&fixtures().join("hostnetwork-pod.yaml")).outcomes;
    assert_eq!(outcomes, vec![Outcome::Skipped(SkipReason::HostNetwork)]);
    let outcomes = inject_file(&fixtures().join("disabled.yaml")).outcomes;
    assert_eq!(outcomes, vec![Outcome::Skipped(SkipReason::Disabled); 2]);
}

/// A manifest injected before that now opts out (`trellis.dev/inject: disabled`) or uses
/// hostNetwork comes out without the sidecar — containers, volume, mark, rewritten probes
/// restored — byte for byte as it was before injection (plus the change that opted out).
#[test]
fn opting_out_after_injection_takes_the_sidecar_out_again() {
    for (name, classic) in
        [("app-probes.yaml", false), ("deployment-multi-container.yaml", false), ("classic-deployment.yaml", true)]
    {
        let original = std::fs::read_to_string(fixtures().join(name)).unwrap();
        let injected = inject::inject_manifests(&original, &config(classic)).unwrap().yaml;
        for (opt_out, reason) in [
            ("trellis.dev/inject: disabled", inject::SkipReason::Disabled),
            ("hostNetwork", inject::SkipReason::HostNetwork),
        ] {
            let opted = |text: &str| {
                let mut docs = inject::parse_manifests(text).unwrap();
                for doc in &mut docs {
                    let Some(template) = doc.pointer_mut("/spec/template") else { continue };
                    if opt_out == "hostNetwork" {
                        template["spec"]["hostNetwork"] = serde_json::json!(true);
                    } else {
                        template["metadata"]["annotations"]["trellis.dev/inject"] = serde_json::json!("disabled");
                    }
                }
                inject::to_yaml(&docs).unwrap()
            };
            let out = inject::inject_manifests(&opted(&injected), &config(classic)).unwrap();
            assert!(
                out.outcomes.iter().any(|o| *o == inject::Outcome::Removed(reason.clone())),
                "{name}: {:?}",
                out.outcomes
            );
            // The same as opting out of the never-injected manifest, annotations aside: an
            // `annotations: {}` the injection created stays, and so does classic mode's
            // `kubectl.kubernetes.io/default-container` (a user may have set it; it names
            // an app container either way).
            let never = inject::inject_manifests(&opted(&original), &config(classic)).unwrap().yaml;
            let strip = |y: &str| {
                let mut docs = inject::parse_manifests(y).unwrap();
                for doc in &mut docs {
                    let Some(meta) = doc.pointer_mut("/spec/template/metadata").and_then(|m| m.as_object_mut()) else {
                        continue;
                    };
                    if let Some(a) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
                        a.shift_remove("kubectl.kubernetes.io/default-container");
                    }
                    if meta.get("annotations").is_some_and(|a| a.as_object().is_some_and(|a| a.is_empty())) {
                        meta.shift_remove("annotations");
                    }
                }
                inject::to_yaml(&docs).unwrap()
            };
            assert_eq!(strip(&out.yaml), strip(&never), "{name} / {opt_out}");
            assert!(!out.yaml.contains("trellis-proxy") && !out.yaml.contains("trellis.dev/injected"), "{name}");
        }
    }
}

#[test]
fn non_workloads_pass_through_and_lists_are_injected_item_by_item() {
    let injected = inject_file(&fixtures().join("multi-document.yaml"));
    assert_eq!(
        injected.outcomes,
        vec![
            Outcome::Injected { warnings: vec![] },
            Outcome::NotAWorkload,
            Outcome::NotAWorkload,
            Outcome::Injected { warnings: vec![] }
        ]
    );
    let before = inject::parse_manifests(&std::fs::read_to_string(fixtures().join("multi-document.yaml")).unwrap())
        .expect("parse");
    let after = inject::parse_manifests(&injected.yaml).expect("parse");
    assert_eq!(before[1], after[1], "the Service changed");
    assert_eq!(before[2], after[2], "the ConfigMap changed");

    let list = inject_file(&fixtures().join("list.yaml"));
    assert_eq!(
        list.outcomes,
        vec![Outcome::List(vec![
            Outcome::Injected { warnings: vec![] },
            Outcome::NotAWorkload,
            Outcome::Injected { warnings: vec![] }
        ])]
    );
}

/// The fields Trellis owns, checked by meaning rather than by bytes.
#[test]
fn injected_pod_spec_follows_the_proxy_contract() {
    let injected = inject_file(&fixtures().join("deployment-multi-container.yaml"));
    let docs = inject::parse_manifests(&injected.yaml).expect("parse");
    let template = &docs[0]["spec"]["template"];
    let spec = &template["spec"];
    let inits = spec["initContainers"].as_array().expect("initContainers");
    let names: Vec<_> = inits.iter().map(|c| c["name"].as_str().unwrap_or("")).collect();
    assert_eq!(names, ["trellis-init", "trellis-proxy", "migrate"]);
    let init_args: Vec<_> = inits[0]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(
        init_args,
        [
            "proxy",
            "init",
            "--proxy-uid",
            "1337",
            "--inbound-port",
            "15006",
            "--outbound-port",
            "15001",
            "--exclude-inbound-ports",
            "15000,9090",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32,10.96.0.0/12,fd00::/8",
        ]
    );
    assert_eq!(inits[0]["securityContext"]["capabilities"]["add"], serde_json::json!(["NET_ADMIN", "NET_RAW"]));
    let proxy = &inits[1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["args"], serde_json::json!(["proxy", "run"]));
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    let env = |name: &str| -> Value {
        proxy["env"].as_array().unwrap().iter().find(|e| e["name"] == name).cloned().unwrap_or(Value::Null)
    };
    assert_eq!(env("TRELLIS_CONTROL")["value"], "https://trellis-control.trellis-system.svc:7443");
    assert_eq!(env("TRELLIS_CA_BUNDLE_PEM")["value"], config(false).ca_bundle_pem.as_str());
    assert_eq!(env("TRELLIS_OPAQUE_PORTS")["value"], "6379");
    assert_eq!(env("TRELLIS_ADVERTISE_IP")["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    // Read by `proxy run` (--pod-name, --pod-namespace) for the spans' resource; nothing
    // the proxy does not read is injected.
    assert_eq!(env("TRELLIS_POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert_eq!(env("TRELLIS_POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace");
    assert_eq!(env("TRELLIS_SERVICE_ACCOUNT"), Value::Null);
    assert_eq!(env("TRELLIS_DEFAULT_ACTION"), Value::Null, "deny, the proxy's own default, unless annotated");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    let volumes = spec["volumes"].as_array().unwrap();
    let token = volumes.last().unwrap();
    assert_eq!(token["name"], "trellis-token");
    assert_eq!(token["projected"]["sources"][0]["serviceAccountToken"]["audience"], "trellis");
    assert_eq!(template["metadata"]["annotations"]["trellis.dev/injected"], inject::VERSION);
    // The app containers and the existing volumes are untouched and keep their order.
    assert_eq!(spec["containers"][0]["name"], "checkout");
    assert_eq!(spec["containers"][1]["name"], "log-shipper");
    assert_eq!(volumes[0]["configMap"]["defaultMode"], 0o444);
}

#[test]
fn classic_mode_puts_the_proxy_first_in_containers() {
    let injected = inject_file(&fixtures().join("classic-deployment.yaml"));
    let docs = inject::parse_manifests(&injected.yaml).expect("parse");
    let spec = &docs[0]["spec"]["template"]["spec"];
    assert_eq!(spec["containers"][0]["name"], "trellis-proxy");
    assert!(spec["containers"][0].get("restartPolicy").is_none());
    assert_eq!(spec["initContainers"][0]["name"], "trellis-init");
    assert_eq!(spec["initContainers"][1]["name"], "wait-for-db");
    assert_eq!(
        docs[0]["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "payments"
    );
}

/// Re-injecting with another configuration replaces Trellis' objects rather than adding more.
#[test]
fn reinjecting_with_a_new_config_upgrades_in_place() {
    let once = inject_file(&fixtures().join("pod.yaml")).yaml;
    let mut cfg = config(false);
    cfg.image = "registry.example.com/trellis:9.9.9".into();
    let upgraded = inject::inject_manifests(&once, &cfg).expect("re-inject").yaml;
    assert_eq!(upgraded, once.replace(&inject::default_image(), "registry.example.com/trellis:9.9.9"));
    // Native → classic moves the proxy rather than duplicating it.
    cfg.classic_sidecar = true;
    let classic = inject::inject_manifests(&upgraded, &cfg).expect("re-inject").yaml;
    let docs = inject::parse_manifests(&classic).expect("parse");
    let names = |key: &str| -> Vec<String> {
        docs[0]["spec"][key].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(names("initContainers"), ["trellis-init"]);
    assert_eq!(names("containers"), ["trellis-proxy", "shell"]);
}

/// Runs `kubernetes-validate --strict` on every expected output (List items are validated one
/// by one: the tool has no schema for `List`).
#[test]
fn expected_outputs_are_valid_kubernetes() {
    if Command::new("kubernetes-validate").arg("--version").output().is_err() {
        println!("skipped: kubernetes-validate not installed (pip install kubernetes-validate)");
        return;
    }
    let version = std::env::var("TRELLIS_K8S_VERSION").unwrap_or_else(|_| K8S_VERSION.to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    for (_, expected) in cases() {
        let text = std::fs::read_to_string(&expected).expect("read expected (bless first)");
        let mut docs = Vec::new();
        for doc in inject::parse_manifests(&text).expect("parse expected") {
            match doc.get("items").and_then(Value::as_array) {
                Some(items) if doc["kind"] == "List" => docs.extend(items.iter().cloned()),
                _ => docs.push(doc),
            }
        }
        let file = dir.path().join(expected.file_name().expect("name"));
        std::fs::write(&file, inject::to_yaml(&docs).expect("yaml")).expect("write");
        files.push(file);
    }
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", &version])
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn errors_name_the_document_and_nothing_is_returned() {
    let cfg = config(false);
    let pod = std::fs::read_to_string(fixtures().join("pod.yaml")).expect("read");

    let broken = format!("{pod}---\nkind: Pod\nmetadata:\n  name: [x\n  y: 2\n");
    match inject::inject_manifests(&broken, &cfg) {
        Err(inject::InjectError::Yaml { document: 2, line: Some(_), .. }) => {}
        other => panic!("{other:?}"),
    }

    let bad_annotation = format!(
        "{pod}---\n{}",
        pod.replace("name: debug", "name: debug2\n  annotations:\n    trellis.dev/exclude-outbound-ports: \"0\"")
    );
    match inject::inject_manifests(&bad_annotation, &cfg) {
        Err(e @ inject::InjectError::Pod { document: 2, .. }) => {
            let message = e.to_string();
            assert!(message.contains("debug2") && message.contains("exclude-outbound-ports"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    let too_much =
        pod.replace("name: debug", "name: debug\n  annotations:\n    trellis.dev/proxy-memory-request: \"512Mi\"");
    match inject::inject_manifests(&too_much, &cfg) {
        Err(e @ inject::InjectError::Pod { document: 1, .. }) => {
            let message = e.to_string();
            assert!(message.contains("proxy-memory-request") && message.contains("256Mi"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    let typo = pod.replace("name: debug", "name: debug\n  annotations:\n    trellis.dev/inject: disable");
    assert!(matches!(inject::inject_manifests(&typo, &cfg), Err(inject::InjectError::Pod { .. })));

    let no_template = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  replicas: 1\n";
    match inject::inject_manifests(no_template, &cfg) {
        Err(e @ inject::InjectError::Pod { .. }) => assert!(e.to_string().contains("spec.template"), "{e}"),
        other => panic!("{other:?}"),
    }

    assert!(matches!(inject::inject_manifests("{\"kind\": ", &cfg), Err(inject::InjectError::Json { .. })));
    // Kinds of another API group with a familiar name are not touched.
    let foreign = "apiVersion: example.com/v1\nkind: Deployment\nmetadata:\n  name: x\nspec: {}\n";
    assert_eq!(inject::inject_manifests(foreign, &cfg).expect("ok").outcomes, vec![Outcome::NotAWorkload]);
    // Empty input is empty output.
    assert_eq!(inject::inject_manifests("", &cfg).expect("ok").yaml, "");

    // What is not a Kubernetes object is refused, naming its document, rather than passed
    // through: a JSON array of Deployments would otherwise reach kubectl uninjected.
    let deployment = "{\"apiVersion\": \"apps/v1\", \"kind\": \"Deployment\", \"metadata\": {\"name\": \"d\"}}";
    for (input, document, want) in [
        (format!("[{deployment}]"), 1, "a sequence of documents"),
        ("just a string\n".to_string(), 1, "a string, not a Kubernetes object"),
        (format!("{pod}---\nfoo: bar\n"), 2, "no apiVersion or kind"),
        ("apiVersion: v1\nkind: \"\"\n".to_string(), 1, "no kind"),
        ("kind: Pod\nmetadata: {name: p}\n".to_string(), 1, "no apiVersion"),
    ] {
        match inject::inject_manifests(&input, &cfg) {
            Err(e @ inject::InjectError::NotAnObject { .. }) => {
                let text = e.to_string();
                assert!(text.starts_with(&format!("document {document}: ")) && text.contains(want), "{input}: {text}");
            }
            other => panic!("{input}: {other:?}"),
        }
    }
    // A container named `n` is YAML 1.1's `false`, as Kubernetes reads it: said so, not "no name".
    let named_n = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: n\n    image: x\n";
    let e = inject::inject_manifests(named_n, &cfg).unwrap_err().to_string();
    assert!(e.contains("spec.containers[0].name: read as the boolean false") && e.contains("quote it"), "{e}");
    let list = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: c}}\n- 42\n";
    match inject::inject_manifests(list, &cfg) {
        Err(e @ inject::InjectError::Pod { .. }) => assert!(e.to_string().contains("items[1]: a number"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_bundle_must_be_ca_certificates_only() {
    assert!(matches!(InjectConfig::new("not a pem"), Err(inject::InjectError::BadBundle(_))));
    let bundle = config(false).ca_bundle_pem;
    let with_key = format!("{bundle}-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
    assert!(matches!(InjectConfig::new(with_key), Err(inject::InjectError::BadBundle(_))));
}

/// `trellis.dev/default-action: allow` (onboarding, with ALLOW policies in audit mode) reaches
/// the proxy as `TRELLIS_DEFAULT_ACTION`.
#[test]
fn the_default_action_annotation_reaches_the_proxy() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {trellis.dev/default-action: allow}\n\
               spec:\n  containers: [{name: app, image: app}]\n";
    let injected = inject::inject_manifests(pod, &config(false)).unwrap();
    let doc = &inject::parse_manifests(&injected.yaml).unwrap()[0];
    let proxy = doc["spec"]["initContainers"].as_array().unwrap().iter().find(|c| c["args"][1] == "run").unwrap();
    let env = proxy["env"].as_array().unwrap();
    assert!(env.contains(&serde_json::json!({"name": "TRELLIS_DEFAULT_ACTION", "value": "allow"})), "{env:?}");
}

/// `trellis.dev/` settings on a workload's own metadata are not read (only a pod template's
/// are): said in a warning naming where they belong, unless the template carries the same
/// (kustomize's commonAnnotations writes both). `trellis.dev/inject` is read on both.
#[test]
fn settings_on_a_workloads_own_metadata_are_warned_about() {
    let deployment = |template_annotations: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n  annotations:\n    trellis.dev/inject: enabled\n    trellis.dev/exclude-inbound-ports: \"9090\"\nspec:\n  selector: {{matchLabels: {{app: d}}}}\n  template:\n    metadata:\n      labels: {{app: d}}\n{template_annotations}    spec:\n      containers: [{{name: app, image: nginx}}]\n"
        )
    };
    let out = inject::inject_manifests(&deployment(""), &config(false)).unwrap();
    let Outcome::Injected { warnings } = &out.outcomes[0] else { panic!("{:?}", out.outcomes) };
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("metadata.annotations: trellis.dev/exclude-inbound-ports has no effect here")
            && warnings[0].ends_with("put it on spec.template.metadata.annotations"),
        "{warnings:?}"
    );
    let both = deployment("      annotations:\n        trellis.dev/exclude-inbound-ports: \"9090\"\n");
    let out = inject::inject_manifests(&both, &config(false)).unwrap();
    assert_eq!(out.outcomes, vec![Outcome::Injected { warnings: vec![] }]);

    let cronjob = "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec:\n  schedule: \"* * * * *\"\n  jobTemplate:\n    metadata:\n      annotations: {trellis.dev/opaque-ports: \"5432\"}\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers: [{name: job, image: busybox}]\n";
    let out = inject::inject_manifests(cronjob, &config(false)).unwrap();
    let Outcome::Injected { warnings } = &out.outcomes[0] else { panic!("{:?}", out.outcomes) };
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with("spec.jobTemplate.metadata.annotations: trellis.dev/opaque-ports"), "{warnings:?}");
}
