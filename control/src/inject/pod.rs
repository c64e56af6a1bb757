//! Injecting one pod template (`metadata` + `spec`): the skip rules, then removal of any
//! Trellis-owned objects from an earlier injection and insertion of fresh ones, so the result
//! depends only on the user's fields and the [`InjectConfig`] — which is what makes
//! re-injection byte-identical. Fields Trellis does not own are never reordered.

use serde_json::{Map, Value, json};

use super::annotations::{PodOptions, annotations, is_disabled};
use super::containers::{init_container, proxy_container, token_volume};
use super::{
    ANNOTATION_INJECTED, INIT_CONTAINER_NAME, InjectConfig, Outcome, PROXY_CONTAINER_NAME, PodError, SkipReason,
    TOKEN_VOLUME_NAME, VERSION,
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
    if !template.is_object() {
        return Err(malformed(path, "", "expected a pod template (a map)"));
    }
    if owner_disabled || is_disabled(template)? {
        return Ok(Outcome::Skipped(SkipReason::Disabled));
    }
    let spec = template.get("spec").ok_or_else(|| malformed(path, "spec", "missing"))?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(SkipReason::HostNetwork));
    }
    let opts = PodOptions::from_template(template)?;
    let first_app = edit_spec(template, cfg, &opts, path)?;
    set_annotations(template, cfg, first_app, path)?;
    Ok(Outcome::Injected)
}

/// Whether the template carries `trellis.dev/injected` (the webhook skips such pods).
pub(crate) fn is_injected(template: &Value) -> bool {
    annotations(template).is_some_and(|a| a.contains_key(ANNOTATION_INJECTED))
}

/// Adds the containers and the volume; returns the name of the first app container.
fn edit_spec(template: &mut Value, cfg: &InjectConfig, opts: &PodOptions, path: &str) -> Result<String, PodError> {
    let spec = object_field(template, "spec", path)?;
    let containers = list_field(spec, "containers", path, "spec")?;
    containers.retain(|c| !is_named(c, PROXY_CONTAINER_NAME));
    let first_app = containers
        .first()
        .and_then(|c| c.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| malformed(path, "spec.containers", "a pod needs at least one named container"))?;
    if cfg.classic_sidecar {
        containers.insert(0, proxy_container(cfg, opts, false));
    }

    // Where a human would put it: just before `containers`.
    let before_containers = spec.keys().position(|k| k == "containers").unwrap_or(spec.len());
    ensure_list(spec, "initContainers", before_containers);
    let inits = list_field(spec, "initContainers", path, "spec")?;
    inits.retain(|c| !is_named(c, INIT_CONTAINER_NAME) && !is_named(c, PROXY_CONTAINER_NAME));
    let mut ours = vec![init_container(cfg, opts)];
    if !cfg.classic_sidecar {
        ours.push(proxy_container(cfg, opts, true));
    }
    inits.splice(0..0, ours);

    let end = spec.len();
    ensure_list(spec, "volumes", end);
    let volumes = list_field(spec, "volumes", path, "spec")?;
    match volumes.iter_mut().find(|v| is_named(v, TOKEN_VOLUME_NAME)) {
        Some(existing) => *existing = token_volume(),
        None => volumes.push(token_volume()),
    }
    Ok(first_app)
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
