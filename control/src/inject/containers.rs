//! The objects injection adds to a pod spec, built as JSON values in the order a human would
//! write them: the `trellis-init` init container, the `trellis-proxy` sidecar and the
//! `trellis-token` volume. Their content is the contract with `trellis proxy init` and
//! `trellis proxy run` (flags, environment, ports, probes), so it lives in one place.

use serde_json::{Map, Value, json};

use super::annotations::{PodOptions, ProxyResources, join};
use super::probes::APP_PROBES_ENV;
use super::{
    ADMIN_PORT, INBOUND_PORT, INIT_CONTAINER_NAME, InjectConfig, OUTBOUND_PORT, PROXY_CONTAINER_NAME, PROXY_UID,
    TOKEN_VOLUME_NAME,
};

/// Where the projected token is mounted in the proxy; the file inside is `token`.
pub(crate) const TOKEN_DIR: &str = "/var/run/secrets/trellis";
/// The audience the control plane asks TokenReview to check: a token minted for Trellis is
/// useless against the API server, and the pod's default token is useless to Trellis.
pub(crate) const TOKEN_AUDIENCE: &str = "trellis";
/// One hour, the SVID lifetime; the kubelet refreshes the file at 80 % of it.
const TOKEN_EXPIRATION_SECONDS: u32 = 3600;

/// `trellis proxy init` with the pod's exclusions. It runs as root with NET_ADMIN/NET_RAW
/// only, because installing nftables rules in the pod's network namespace needs exactly that.
pub(crate) fn init_container(cfg: &InjectConfig, opts: &PodOptions) -> Value {
    let mut inbound = vec![ADMIN_PORT];
    inbound.extend(opts.exclude_inbound_ports.iter().filter(|p| **p != ADMIN_PORT));
    let mut args: Vec<String> = [
        "proxy",
        "init",
        "--proxy-uid",
        &PROXY_UID.to_string(),
        "--inbound-port",
        &INBOUND_PORT.to_string(),
        "--outbound-port",
        &OUTBOUND_PORT.to_string(),
        "--exclude-inbound-ports",
        &join(&inbound),
    ]
    .into_iter()
    .map(String::from)
    .collect();
    if !opts.exclude_outbound_ports.is_empty() {
        args.extend(["--exclude-outbound-ports".to_string(), join(&opts.exclude_outbound_ports)]);
    }
    if !opts.exclude_outbound_cidrs.is_empty() {
        args.extend(["--exclude-outbound-cidrs".to_string(), join(&opts.exclude_outbound_cidrs)]);
    }
    json!({
        "name": INIT_CONTAINER_NAME,
        "image": cfg.image,
        "args": args,
        "resources": {
            "requests": { "cpu": "10m", "memory": "16Mi" },
            "limits": { "memory": "64Mi" },
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
        },
    })
}

/// `trellis proxy run`, configured entirely through its environment. As a native sidecar
/// (`native`), it is an init container with `restartPolicy: Always`: the kubelet starts it,
/// waits for its startup probe (SVID issued and policy applied), then starts the app, and
/// stops it only after the app, so Jobs complete.
pub(crate) fn proxy_container(
    cfg: &InjectConfig,
    opts: &PodOptions,
    native: bool,
    probes: &Map<String, Value>,
) -> Value {
    let mut container = json!({
        "name": PROXY_CONTAINER_NAME,
        "image": cfg.image,
    });
    let fields = json!({
        "args": ["proxy", "run"],
        "env": proxy_env(cfg, opts, probes),
        "ports": [
            { "name": "trellis-inbound", "containerPort": INBOUND_PORT, "protocol": "TCP" },
            { "name": "trellis-admin", "containerPort": ADMIN_PORT, "protocol": "TCP" },
        ],
        // Up to 10 minutes to get an SVID and a policy before the kubelet restarts the proxy;
        // the app waits for it (native sidecar), so it never runs without the mesh.
        "startupProbe": probe("/ready", 1, 600),
        "readinessProbe": probe("/ready", 5, 3),
        "livenessProbe": probe("/live", 10, 3),
        "resources": resources(&opts.resources),
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
        },
        "volumeMounts": [{ "name": TOKEN_VOLUME_NAME, "mountPath": TOKEN_DIR, "readOnly": true }],
    });
    if let (Some(c), Value::Object(rest)) = (container.as_object_mut(), fields) {
        if native {
            c.insert("restartPolicy".into(), json!("Always"));
        }
        c.extend(rest);
    }
    container
}

/// The proxy's `resources`; a limit left unset is left out.
fn resources(r: &ProxyResources) -> Value {
    let mut limits = serde_json::Map::new();
    if let Some(cpu) = &r.cpu_limit {
        limits.insert("cpu".into(), json!(cpu));
    }
    if let Some(memory) = &r.memory_limit {
        limits.insert("memory".into(), json!(memory));
    }
    let mut resources = json!({ "requests": { "cpu": r.cpu_request, "memory": r.memory_request } });
    if !limits.is_empty() {
        resources["limits"] = Value::Object(limits);
    }
    resources
}

fn proxy_env(cfg: &InjectConfig, opts: &PodOptions, probes: &Map<String, Value>) -> Vec<Value> {
    let value = |name: &str, value: &str| json!({ "name": name, "value": value });
    let field = |name: &str, path: &str| json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": path } } });
    let mut env = vec![
        value("TRELLIS_CONTROL", &cfg.control_url),
        value("TRELLIS_CA_BUNDLE_PEM", &cfg.ca_bundle_pem),
        value("TRELLIS_K8S_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
        value("TRELLIS_INBOUND", &format!("0.0.0.0:{INBOUND_PORT}")),
        value("TRELLIS_OUTBOUND", &format!("127.0.0.1:{OUTBOUND_PORT}")),
        // On the pod IP so the kubelet can probe it; port 15000 is excluded from capture.
        value("TRELLIS_ADMIN", &format!("0.0.0.0:{ADMIN_PORT}")),
        field("TRELLIS_ADVERTISE_IP", "status.podIP"),
        // The spans' k8s.pod.name and k8s.namespace.name resource attributes.
        field("TRELLIS_POD_NAME", "metadata.name"),
        field("TRELLIS_POD_NAMESPACE", "metadata.namespace"),
    ];
    if !opts.opaque_ports.is_empty() {
        env.push(value("TRELLIS_OPAQUE_PORTS", &join(&opts.opaque_ports)));
    }
    if let Some(action) = opts.default_action {
        env.push(value("TRELLIS_DEFAULT_ACTION", action));
    }
    if !probes.is_empty() {
        // The app probes pointed at the admin port, for the proxy to run (probes.rs).
        env.push(value(APP_PROBES_ENV, &Value::Object(probes.clone()).to_string()));
    }
    env
}

fn probe(path: &str, period_seconds: u32, failure_threshold: u32) -> Value {
    json!({
        "httpGet": { "path": path, "port": ADMIN_PORT },
        "periodSeconds": period_seconds,
        "timeoutSeconds": 2,
        "failureThreshold": failure_threshold,
    })
}

/// A ServiceAccount token for audience `trellis`, refreshed by the kubelet: the proxy's
/// credential for TokenReview attestation, separate from the API token the pod may mount.
pub(crate) fn token_volume() -> Value {
    json!({
        "name": TOKEN_VOLUME_NAME,
        "projected": {
            "sources": [{
                "serviceAccountToken": {
                    "audience": TOKEN_AUDIENCE,
                    "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                    "path": "token",
                },
            }],
        },
    })
}
