//! The admission webhook with real `admission.k8s.io/v1` AdmissionReview JSON (as the API
//! server sends it for a ReplicaSet-created pod, defaults filled in): patched pods equal what
//! `trellis inject` writes, skipped pods get no patch, bad bodies are errors and never panics.

use std::path::Path;

use base64::Engine;
use serde_json::{Value, json};
use trellis_control::inject::{self, InjectConfig, WebhookError};

fn config() -> InjectConfig {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject");
    let bundle = std::fs::read_to_string(dir.join("bundle.pem")).expect("bundle.pem");
    InjectConfig::new(bundle).expect("valid bundle")
}

fn review() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject/admission/pod-create.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture is JSON")
}

fn answer(review: &Value) -> Value {
    let body = serde_json::to_vec(review).expect("encode");
    let out = inject::admission_review(&body, &config()).expect("answered");
    let out: Value = serde_json::from_slice(&out).expect("response is JSON");
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    assert_eq!(out["response"]["uid"], review["request"]["uid"]);
    out["response"].clone()
}

fn assert_allowed_unpatched(response: &Value) {
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none() && response.get("patchType").is_none(), "{response}");
}

#[test]
fn a_pod_is_patched_to_what_trellis_inject_writes() {
    let review = review();
    let response = answer(&review);
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("patch is a string"))
        .expect("patch is base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("patch is a JSONPatch");

    let mut admitted = review["request"]["object"].clone();
    json_patch::patch(&mut admitted, &patch).expect("patch applies to the original pod");

    // The same pod through `trellis inject` (as YAML, the CLI's path).
    let as_yaml = inject::to_yaml(&[review["request"]["object"].clone()]).expect("yaml");
    let cli = inject::inject_manifests(&as_yaml, &config()).expect("inject");
    let cli = inject::parse_manifests(&cli.yaml).expect("parse");
    assert_eq!(admitted, cli[0]);

    let inits = admitted["spec"]["initContainers"].as_array().expect("initContainers");
    assert_eq!(inits[0]["name"], "trellis-init");
    assert_eq!(inits[1]["name"], "trellis-proxy");
    assert_eq!(admitted["metadata"]["annotations"]["trellis.dev/injected"], inject::VERSION);
    assert_eq!(admitted["metadata"]["annotations"]["trellis.dev/exclude-inbound-ports"], "9090");
}

/// An app probe that will fail in the mesh is admitted with a warning `kubectl` shows; a pod
/// with none gets no `warnings` at all.
#[test]
fn probes_that_fail_in_the_mesh_come_back_as_warnings() {
    assert!(answer(&review()).get("warnings").is_none());
    let mut review = review();
    review["request"]["object"]["spec"]["containers"][0]["readinessProbe"] =
        json!({ "httpGet": { "path": "/healthz", "port": 8443, "scheme": "HTTPS" } });
    let response = answer(&review);
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let warnings = response["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = warnings[0].as_str().unwrap();
    assert!(w.starts_with("trellis: container ") && w.contains("an HTTPS probe of port 8443"), "{w}");
}

#[test]
fn skipped_namespaces_are_allowed_unchanged() {
    for namespace in ["kube-system", "kube-public", "trellis-system"] {
        let mut review = review();
        review["request"]["namespace"] = json!(namespace);
        review["request"]["object"]["metadata"]["namespace"] = json!(namespace);
        assert_allowed_unpatched(&answer(&review));
    }
    // The list is the config's: an operator can add to it.
    let mut cfg = config();
    cfg.skip_namespaces.push("shop".into());
    let out = inject::admission_review(&serde_json::to_vec(&review()).unwrap(), &cfg).expect("answered");
    let out: Value = serde_json::from_slice(&out).unwrap();
    assert_allowed_unpatched(&out["response"]);
}

#[test]
fn disabled_host_network_and_injected_pods_are_allowed_unchanged() {
    let mut disabled = review();
    disabled["request"]["object"]["metadata"]["annotations"]["trellis.dev/inject"] = json!("disabled");
    assert_allowed_unpatched(&answer(&disabled));

    let mut host = review();
    host["request"]["object"]["spec"]["hostNetwork"] = json!(true);
    assert_allowed_unpatched(&answer(&host));

    let mut injected = review();
    injected["request"]["object"]["metadata"]["annotations"]["trellis.dev/injected"] = json!("0.0.9");
    assert_allowed_unpatched(&answer(&injected));
}

#[test]
fn other_operations_and_kinds_are_allowed_unchanged() {
    let mut update = review();
    update["request"]["operation"] = json!("UPDATE");
    assert_allowed_unpatched(&answer(&update));

    let mut service = review();
    service["request"]["kind"] = json!({ "group": "", "version": "v1", "kind": "Service" });
    service["request"]["object"] = json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": "s" } });
    assert_allowed_unpatched(&answer(&service));
}

#[test]
fn an_invalid_trellis_annotation_is_refused_with_the_reason() {
    let mut review = review();
    review["request"]["object"]["metadata"]["annotations"]["trellis.dev/exclude-outbound-cidrs"] = json!("10.0.0.0/33");
    let response = answer(&review);
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().expect("message");
    assert!(message.contains("trellis.dev/exclude-outbound-cidrs") && message.contains("10.0.0.0/33"), "{message}");
    assert_eq!(response["status"]["code"], 400);
}

#[test]
fn malformed_bodies_are_errors() {
    let cfg = config();
    let err = |body: &[u8]| inject::admission_review(body, &cfg).expect_err("must be refused");
    assert!(matches!(err(b""), WebhookError::NotJson(_)));
    assert!(matches!(err(b"{\"kind\": \"AdmissionReview\""), WebhookError::NotJson(_)));
    assert!(matches!(err(&[0xff, 0xfe, 0x00]), WebhookError::NotJson(_)));
    assert!(matches!(err(b"[]"), WebhookError::WrongKind { .. }));

    let mut v1beta1 = review();
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    assert!(matches!(err(&serde_json::to_vec(&v1beta1).unwrap()), WebhookError::WrongKind { .. }));

    let mut no_request = review();
    no_request.as_object_mut().unwrap().remove("request");
    assert!(matches!(err(&serde_json::to_vec(&no_request).unwrap()), WebhookError::Missing("request")));

    let mut no_object = review();
    no_object["request"].as_object_mut().unwrap().remove("object");
    assert!(matches!(err(&serde_json::to_vec(&no_object).unwrap()), WebhookError::Missing("request.object")));

    let mut object_not_a_map = review();
    object_not_a_map["request"]["object"] = json!("pod");
    assert!(matches!(err(&serde_json::to_vec(&object_not_a_map).unwrap()), WebhookError::Missing("request.object")));

    let mut no_uid = review();
    no_uid["request"].as_object_mut().unwrap().remove("uid");
    assert!(matches!(err(&serde_json::to_vec(&no_uid).unwrap()), WebhookError::Missing("request.uid")));
}

/// Every truncation of a real review, and pods with odd shapes, get an answer or an error.
#[test]
fn no_body_makes_it_panic() {
    let cfg = config();
    let body = serde_json::to_vec(&review()).unwrap();
    for end in 0..body.len() {
        let _ = inject::admission_review(&body[..end], &cfg);
    }
    let odd_specs = [
        json!(null),
        json!({}),
        json!({ "containers": null }),
        json!({ "containers": "app" }),
        json!({ "containers": [] }),
        json!({ "containers": [{ "name": "a" }], "initContainers": 3 }),
        json!({ "containers": [{ "name": "a" }], "volumes": {} }),
        json!({ "containers": [{ "name": "a" }], "hostNetwork": "yes" }),
    ];
    for spec in odd_specs {
        let mut review = review();
        review["request"]["object"]["spec"] = spec.clone();
        let response = answer(&review);
        assert!(response["allowed"].is_boolean(), "{spec}: {response}");
    }
}
