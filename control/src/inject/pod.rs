//! Injecting one pod template (`metadata` + `spec`): the skip rules, then removal of any
//! Trellis-owned objects from an earlier injection and insertion of fresh ones, so the result
//! depends only on the user's fields and the [`InjectConfig`] — which is what makes
//! re-injection byte-identical. Fields Trellis does not own are never reordered.

use serde_json::{Map, Value, json};

use super::annotations::{PodOptions, annotations, is_disabled};
use super::containers::{init_container, proxy_container, token_volume};
use super::probes::{failing_probes, probes_for_proxy};
use super::{
    ADMIN_PORT, ANNOTATION_INJECTED, INBOUND_PORT, INIT_CONTAINER_NAME, InjectConfig, OUTBOUND_PORT, Outcome,
    PROXY_CONTAINER_NAME, PROXY_UID, PodError, SkipReason, TOKEN_VOLUME_NAME, VERSION,
};

/// Lets `kubectl logs/exec` pick the app, not the proxy, when the proxy is `containers[0]`.
const ANNOTATION_DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// Injects `template` (a Pod, or a workload's `spec.template`) unless it opts out or its
/// enclosing workload did (`owner_disabled`). `path` names the template in error messages
/// (e.g. `spec.template`; empty for a Pod).
pub(crate) fn inject_template(
    owner_disabled: bool,
    template: &mut Value,
    cfg: &InjectConfig,
    path: &str,
) -> Result<Outcome, PodError> {
    let metadata = if path.is_empty() { "metadata".to_string() } else { format!("{path}.metadata") };
    inject_located(owner_disabled, template, cfg, path).map_err(|e| e.in_metadata(&metadata))
}

fn inject_located(
    owner_disabled: bool,
    template: &mut Value,
    cfg: &InjectConfig,
    path: &str,
) -> Result<Outcome, PodError> {
    if !template.is_object() {
        return Err(malformed(path, "", "expected a pod template (a map)"));
    }
    let skip = if owner_disabled || is_disabled(template)? {
        Some(SkipReason::Disabled)
    } else if template.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true) {
        Some(SkipReason::HostNetwork)
    } else {
        None
    };
    if let Some(reason) = skip {
        // What the manifest now says is what runs: a sidecar left in a pod that opts out (or
        // its init container's capture rules in the node's network, with hostNetwork) is not.
        if is_injected(template) {
            remove_injection(template, path)?;
            return Ok(Outcome::Removed(reason));
        }
        return Ok(Outcome::Skipped(reason));
    }
    let opts = PodOptions::from_template(template)?;
    check_conflicts(template, path)?;
    let (first_app, warnings) = edit_spec(template, cfg, &opts, path)?;
    set_annotations(template, cfg, first_app, path)?;
    Ok(Outcome::Injected { warnings })
}

/// What the app must not share with the proxy, refused rather than injected into a pod that
/// would not work or not be protected: the proxy's uid (the capture rules let its traffic
/// pass uncaptured, so an app running as it would bypass the mesh), the proxy's ports (same
/// network namespace), and the token volume's name (the user's volume would be replaced).
fn check_conflicts(template: &Value, path: &str) -> Result<(), PodError> {
    let spec = &template["spec"];
    let pod_uid = spec["securityContext"]["runAsUser"].as_u64();
    // The pod's uid matters only for a container that does not set its own.
    let inherits =
        ["initContainers", "containers"].iter().flat_map(|l| spec[*l].as_array().into_iter().flatten()).any(|c| {
            !is_named(c, INIT_CONTAINER_NAME)
                && !is_named(c, PROXY_CONTAINER_NAME)
                && c["securityContext"]["runAsUser"].is_null()
        });
    if pod_uid == Some(u64::from(PROXY_UID)) && inherits {
        return Err(conflict(path, "spec.securityContext.runAsUser", uid_reason()));
    }
    let injected = is_injected(template);
    for list in ["initContainers", "containers"] {
        let Some(containers) = spec[list].as_array() else { continue };
        for (i, c) in containers.iter().enumerate() {
            if is_named(c, INIT_CONTAINER_NAME) || is_named(c, PROXY_CONTAINER_NAME) {
                if injected {
                    continue;
                }
                // Not ours (no earlier injection): replacing it would delete the user's container.
                let reason = format!(
                    "the container names {INIT_CONTAINER_NAME:?} and {PROXY_CONTAINER_NAME:?} are Trellis'; \
                     rename this container"
                );
                return Err(conflict(path, &format!("spec.{list}[{i}].name"), reason));
            }
            if c["securityContext"]["runAsUser"].as_u64() == Some(u64::from(PROXY_UID)) {
                return Err(conflict(path, &format!("spec.{list}[{i}].securityContext.runAsUser"), uid_reason()));
            }
            for (j, port) in c["ports"].as_array().into_iter().flatten().enumerate() {
                let n = port["containerPort"].as_u64();
                if let Some(n) = n.filter(|n| [ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT].map(u64::from).contains(n)) {
                    let reason = format!(
                        "port {n} is the Trellis proxy's ({ADMIN_PORT} admin, {INBOUND_PORT} inbound, \
                         {OUTBOUND_PORT} outbound) and the two would clash in the pod; move the app to another port"
                    );
                    return Err(conflict(path, &format!("spec.{list}[{i}].ports[{j}].containerPort"), reason));
                }
            }
        }
    }
    for (i, v) in spec["volumes"].as_array().into_iter().flatten().enumerate() {
        if is_named(v, TOKEN_VOLUME_NAME) && !injected {
            let reason = format!(
                "the volume name {TOKEN_VOLUME_NAME:?} is Trellis' (the proxy's ServiceAccount token); \
                 rename this volume"
            );
            return Err(conflict(path, &format!("spec.volumes[{i}].name"), reason));
        }
    }
    Ok(())
}

fn uid_reason() -> String {
    format!(
        "uid {PROXY_UID} is the Trellis proxy's: traffic from it is not captured, so the app would bypass the mesh; \
         run the app as another user"
    )
}

fn conflict(path: &str, field: &str, reason: String) -> PodError {
    malformed(path, field, &reason)
}

/// Whether the template carries `trellis.dev/injected` (the webhook skips such pods).
pub(crate) fn is_injected(template: &Value) -> bool {
    annotations(template).is_some_and(|a| a.contains_key(ANNOTATION_INJECTED))
}

/// Takes an earlier injection out: the proxy and init containers, the token volume (and the
/// lists if that leaves them empty), the `injected` mark; probes it rewrote are restored.
fn remove_injection(template: &mut Value, path: &str) -> Result<(), PodError> {
    let spec = object_field(template, "spec", path)?;
    let _ = probes_for_proxy(spec, false, &[]);
    for (list, ours) in [
        ("containers", &[PROXY_CONTAINER_NAME][..]),
        ("initContainers", &[INIT_CONTAINER_NAME, PROXY_CONTAINER_NAME][..]),
        ("volumes", &[TOKEN_VOLUME_NAME][..]),
    ] {
        if let Some(items) = spec.get_mut(list).and_then(Value::as_array_mut) {
            items.retain(|item| !ours.iter().any(|name| is_named(item, name)));
            if items.is_empty() && list != "containers" {
                spec.shift_remove(list);
            }
        }
    }
    if let Some(metadata) = template.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = metadata.get_mut("annotations").and_then(Value::as_object_mut);
        if annotations.is_some_and(|a| {
            a.shift_remove(ANNOTATION_INJECTED);
            a.is_empty()
        }) {
            metadata.shift_remove("annotations");
        }
    }
    Ok(())
}

/// Adds the containers and the volume; returns the name of the first app container and the
/// app probes that will fail in the mesh.
fn edit_spec(
    template: &mut Value,
    cfg: &InjectConfig,
    opts: &PodOptions,
    path: &str,
) -> Result<(String, Vec<String>), PodError> {
    let spec = object_field(template, "spec", path)?;
    // Before the old proxy container goes: it holds the probes an earlier injection rewrote.
    let probes = probes_for_proxy(spec, opts.rewrite_app_probes, &opts.exclude_inbound_ports);
    let warnings = failing_probes(spec, opts.rewrite_app_probes, &opts.exclude_inbound_ports);
    let containers = list_field(spec, "containers", path, "spec")?;
    containers.retain(|c| !is_named(c, PROXY_CONTAINER_NAME));
    let first_app = match containers.first().map(|c| c.get("name")) {
        Some(Some(Value::String(name))) => name.clone(),
        Some(Some(Value::Bool(b))) => {
            let reason = format!(
                "read as the boolean {b}, not a name: YAML 1.1 (which Kubernetes reads) takes y, n, yes, no, on, \
                 off, true and false as booleans; quote it"
            );
            return Err(malformed(path, "spec.containers[0].name", &reason));
        }
        Some(Some(other)) => return Err(malformed(path, "spec.containers[0].name", &format!("{other} is not a name"))),
        _ => return Err(malformed(path, "spec.containers", "a pod needs at least one named container")),
    };
    if cfg.classic_sidecar {
        containers.insert(0, proxy_container(cfg, opts, false, &probes));
    }

    // Where a human would put it: just before `containers`.
    let before_containers = spec.keys().position(|k| k == "containers").unwrap_or(spec.len());
    ensure_list(spec, "initContainers", before_containers);
    let inits = list_field(spec, "initContainers", path, "spec")?;
    inits.retain(|c| !is_named(c, INIT_CONTAINER_NAME) && !is_named(c, PROXY_CONTAINER_NAME));
    let mut ours = vec![init_container(cfg, opts)];
    if !cfg.classic_sidecar {
        ours.push(proxy_container(cfg, opts, true, &probes));
    }
    inits.splice(0..0, ours);

    let end = spec.len();
    ensure_list(spec, "volumes", end);
    let volumes = list_field(spec, "volumes", path, "spec")?;
    match volumes.iter_mut().find(|v| is_named(v, TOKEN_VOLUME_NAME)) {
        Some(existing) => *existing = token_volume(),
        None => volumes.push(token_volume()),
    }
    Ok((first_app, warnings))
}

/// Marks the template injected (in place if it already was, so the key keeps its position).
fn set_annotations(template: &mut Value, cfg: &InjectConfig, first_app: String, path: &str) -> Result<(), PodError> {
    let template_map = template.as_object_mut().ok_or_else(|| malformed(path, "", "expected a map"))?;
    ensure_map(template_map, "metadata", 0);
    let metadata = object_field(template, "metadata", path)?;
    let end = metadata.len();
    ensure_map(metadata, "annotations", end);
    let annotations = object_in(metadata, "annotations", path, "metadata")?;
    annotations.insert(ANNOTATION_INJECTED.into(), json!(VERSION));
    if cfg.classic_sidecar && !annotations.contains_key(ANNOTATION_DEFAULT_CONTAINER) {
        annotations.insert(ANNOTATION_DEFAULT_CONTAINER.into(), json!(first_app));
    }
    Ok(())
}

/// Creates `key` as an empty list at position `at` if it is absent, or empties it if null.
fn ensure_list(map: &mut Map<String, Value>, key: &str, at: usize) {
    match map.get_mut(key) {
        None => {
            map.shift_insert(at, key.into(), json!([]));
        }
        Some(v) if v.is_null() => *v = json!([]),
        Some(_) => {}
    }
}

/// Creates `key` as an empty map at position `at` if it is absent, or empties it if null.
fn ensure_map(map: &mut Map<String, Value>, key: &str, at: usize) {
    match map.get_mut(key) {
        None => {
            map.shift_insert(at, key.into(), json!({}));
        }
        Some(v) if v.is_null() => *v = json!({}),
        Some(_) => {}
    }
}

fn is_named(item: &Value, name: &str) -> bool {
    item.get("name").and_then(Value::as_str) == Some(name)
}

fn object_field<'a>(template: &'a mut Value, key: &str, path: &str) -> Result<&'a mut Map<String, Value>, PodError> {
    template.get_mut(key).and_then(Value::as_object_mut).ok_or_else(|| malformed(path, key, "expected a map"))
}

fn object_in<'a>(
    map: &'a mut Map<String, Value>,
    key: &str,
    path: &str,
    parent: &str,
) -> Result<&'a mut Map<String, Value>, PodError> {
    map.get_mut(key)
        .and_then(Value::as_object_mut)
        .ok_or_else(|| malformed(path, &format!("{parent}.{key}"), "expected a map"))
}

fn list_field<'a>(
    map: &'a mut Map<String, Value>,
    key: &str,
    path: &str,
    parent: &str,
) -> Result<&'a mut Vec<Value>, PodError> {
    map.get_mut(key)
        .and_then(Value::as_array_mut)
        .ok_or_else(|| malformed(path, &format!("{parent}.{key}"), "expected a list"))
}

fn malformed(path: &str, field: &str, reason: &str) -> PodError {
    let field = match (path.is_empty(), field.is_empty()) {
        (true, _) => field.to_string(),
        (false, true) => path.to_string(),
        (false, false) => format!("{path}.{field}"),
    };
    PodError::Malformed { field, reason: reason.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: Value) -> Value {
        json!({ "metadata": { "name": "p" }, "spec": spec })
    }

    fn refused(template: Value) -> String {
        match check_conflicts(&template, "") {
            Err(e) => e.to_string(),
            Ok(()) => panic!("accepted {template}"),
        }
    }

    #[test]
    fn an_app_running_as_the_proxys_uid_is_refused() {
        let e = refused(pod(json!({ "securityContext": { "runAsUser": 1337 }, "containers": [{ "name": "a" }] })));
        assert!(e.starts_with("spec.securityContext.runAsUser: uid 1337") && e.contains("bypass the mesh"), "{e}");
        let e = refused(pod(json!({ "containers": [{ "name": "a" }, { "name": "b",
            "securityContext": { "runAsUser": 1337 } }] })));
        assert!(e.starts_with("spec.containers[1].securityContext.runAsUser: uid 1337"), "{e}");
        let e = refused(pod(json!({ "initContainers": [{ "name": "i", "securityContext": { "runAsUser": 1337 } }],
            "containers": [{ "name": "a" }] })));
        assert!(e.starts_with("spec.initContainers[0]"), "{e}");
        // The pod's uid when every app container sets its own: none runs as 1337.
        let ok = pod(json!({ "securityContext": { "runAsUser": 1337 }, "containers": [{ "name": "a",
            "securityContext": { "runAsUser": 1000 } }] }));
        assert!(check_conflicts(&ok, "").is_ok());
        // Another uid, or the proxy's own containers (of an earlier injection), are fine.
        let mut ok = pod(json!({ "securityContext": { "runAsUser": 1000 }, "containers": [{ "name": "a" },
            { "name": "trellis-proxy", "securityContext": { "runAsUser": 1337 } }] }));
        ok["metadata"]["annotations"] = json!({ ANNOTATION_INJECTED: VERSION });
        assert!(check_conflicts(&ok, "").is_ok());
    }

    /// A user's own container named like Trellis' would be replaced (deleted) by injection.
    #[test]
    fn a_users_container_named_like_ours_is_refused_unless_injected_before() {
        for (list, name) in [("initContainers", "trellis-init"), ("containers", "trellis-proxy")] {
            let mut spec = json!({ "containers": [{ "name": "app" }] });
            spec[list] = json!([{ "name": name, "image": "mycorp/setup" }]);
            if list == "containers" {
                spec[list].as_array_mut().unwrap().insert(0, json!({ "name": "app" }));
            }
            let e = refused(pod(spec));
            assert!(
                e.contains(".name: the container names \"trellis-init\" and \"trellis-proxy\" are Trellis'"),
                "{e}"
            );
        }
    }

    #[test]
    fn an_app_port_the_proxy_uses_is_refused() {
        for port in [15000, 15001, 15006] {
            let e = refused(pod(json!({ "containers": [{ "name": "a",
                "ports": [{ "containerPort": 8080 }, { "containerPort": port }] }] })));
            assert!(e.starts_with("spec.containers[0].ports[1].containerPort: port"), "{e}");
            assert!(e.contains(&port.to_string()), "{e}");
        }
        let ok = pod(json!({ "containers": [{ "name": "a", "ports": [{ "containerPort": 15002 }] }] }));
        assert!(check_conflicts(&ok, "").is_ok());
    }

    #[test]
    fn a_users_volume_named_like_the_token_volume_is_refused_unless_injected_before() {
        let spec = json!({ "volumes": [{ "name": "data" }, { "name": "trellis-token", "emptyDir": {} }],
            "containers": [{ "name": "a" }] });
        let e = refused(pod(spec.clone()));
        assert!(e.starts_with("spec.volumes[1].name: the volume name \"trellis-token\""), "{e}");
        let mut injected = pod(spec);
        injected["metadata"]["annotations"] = json!({ ANNOTATION_INJECTED: VERSION });
        assert!(check_conflicts(&injected, "").is_ok());
    }
}
