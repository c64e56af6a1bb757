//! The app's kubelet probes, made to work in a meshed pod. The kubelet probes from the node
//! in plaintext, and every app port is captured to the proxy's inbound, which requires mTLS:
//! as written, an `httpGet` or `grpc` probe of an app port would fail and the pod would
//! never be ready. By default the manifest stays as written (injection keeps every field it
//! does not own) and the `httpGet` probes are handed to the proxy in `TRELLIS_APP_PROBES`: the
//! inbound answers the kubelet's plaintext request for exactly those (as Linkerd admits
//! kubelet probes). With `trellis.dev/rewrite-app-probes: "true"`, as Istio does, every
//! `httpGet`, `tcpSocket` and `grpc` probe is pointed at the proxy's admin port
//! (`/app-health/<container>/<livez|readyz|startupz>`, a port the capture rules leave alone)
//! and the proxy runs the original against the app.
//!
//! Where it sits: part of injecting one pod spec (`pod.rs`), before the old proxy container
//! is replaced: a probe rewritten by an earlier injection is first put back from that
//! container's `TRELLIS_APP_PROBES` (then rewritten again if still asked for), so
//! re-injection is byte-identical and dropping the annotation restores the originals. Probes
//! the proxy cannot run for the kubelet are left alone: `exec` (it runs in the container),
//! `HTTPS` (the app's own TLS), a `host` other than the pod, a named port the container does
//! not declare, and ports excluded from capture (they work as they are).

use serde_json::{Map, Value, json};

use super::{ADMIN_PORT, PROXY_CONTAINER_NAME};

/// The proxy's environment variable carrying the original probes (a JSON object).
pub const APP_PROBES_ENV: &str = "TRELLIS_APP_PROBES";
/// Path prefix of rewritten probes on the admin port.
pub const APP_HEALTH_PREFIX: &str = "/app-health/";

/// The probe actions the proxy can run for the kubelet.
const ACTIONS: [&str; 3] = ["httpGet", "tcpSocket", "grpc"];

/// The probe fields of a container and their names under `/app-health/<container>/`.
const KINDS: [(&str, &str); 3] =
    [("livenessProbe", "livez"), ("readinessProbe", "readyz"), ("startupProbe", "startupz")];

/// The app containers' probes the proxy must know, keyed `<container>/<kind>`, for
/// `TRELLIS_APP_PROBES`. By default the manifest is left as written (injection keeps every
/// field it does not own) and only `httpGet` probes are listed: the proxy answers the
/// kubelet's plaintext request for them on the captured port. With `rewrite` (the
/// `trellis.dev/rewrite-app-probes: "true"` annotation) every probe the proxy can run —
/// `tcpSocket` and `grpc` too — is pointed at the admin port. Either way, a probe an earlier
/// injection rewrote is first put back.
pub(crate) fn probes_for_proxy(
    spec: &mut Map<String, Value>,
    rewrite: bool,
    excluded_ports: &[u16],
) -> Map<String, Value> {
    let previous = previous_probes(spec);
    let mut given = Map::new();
    for list in PROBED {
        let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else { continue };
        for c in containers.iter_mut().filter(|c| probed_while_running(list, c)) {
            probes_of_container(c, &previous, rewrite, excluded_ports, &mut given);
        }
    }
    given
}

/// The lists whose containers the kubelet probes while the pod runs.
const PROBED: [&str; 2] = ["initContainers", "containers"];

/// The app containers, and native sidecars (init containers with `restartPolicy: Always`,
/// which the kubelet probes like app containers — and waits for their startup probe before
/// starting the next container); not the proxy itself, and not plain init containers.
fn probed_while_running(list: &str, c: &Value) -> bool {
    c["name"] != PROXY_CONTAINER_NAME && (list == "containers" || c["restartPolicy"] == "Always")
}

/// [`probes_for_proxy`] for one container.
fn probes_of_container(
    c: &mut Value,
    previous: &Map<String, Value>,
    rewrite: bool,
    excluded_ports: &[u16],
    given: &mut Map<String, Value>,
) {
    let Some(name) = c["name"].as_str().map(str::to_string) else { return };
    let declared = c["ports"].clone();
    for (field, kind) in KINDS {
        let Some(probe) = c.get_mut(field).and_then(Value::as_object_mut) else { continue };
        let key = format!("{name}/{kind}");
        if let Some(original) = previous.get(&key).filter(|_| is_rewritten(probe, &key)) {
            restore(probe, original);
        }
        let Some(entry) = original_for_proxy(probe, &declared, excluded_ports) else { continue };
        if rewrite {
            let path = format!("{APP_HEALTH_PREFIX}{key}");
            let action = ACTIONS.into_iter().find(|a| probe.contains_key(*a)).unwrap_or("httpGet");
            replace_key(probe, action, "httpGet", json!({ "path": path, "port": ADMIN_PORT }));
        } else if !probe.contains_key("httpGet") {
            continue;
        }
        given.insert(key, entry);
    }
}

/// The app's probes that will fail once their port is captured, as warnings for whoever
/// injects: `HTTPS` ones (the kubelet's TLS carries no SVID, and the proxy does not run them
/// for it: that would mean skipping the app certificate's verification), and `grpc` ones
/// unless rewritten (the kubelet speaks plaintext HTTP/2 to a listener that wants TLS).
/// Probes of excluded ports, with a `host`, or of a port the container does not declare by
/// that name are not captured or not judged. Called after [`probes_for_proxy`].
pub(crate) fn failing_probes(spec: &Map<String, Value>, rewrite: bool, excluded_ports: &[u16]) -> Vec<String> {
    let mut warnings = Vec::new();
    let lists =
        PROBED.map(|list| spec.get(list).and_then(Value::as_array).into_iter().flatten().map(move |c| (list, c)));
    for c in lists.into_iter().flatten().filter(|(list, c)| probed_while_running(list, c)).map(|(_, c)| c) {
        let name = c["name"].as_str().unwrap_or("");
        for (field, _) in KINDS {
            let Some((name_of_action, probe)) = c[field].as_object().and_then(action) else { continue };
            let https = is_https(probe);
            let failing = match name_of_action {
                "httpGet" => https,
                "grpc" => !rewrite,
                _ => false,
            };
            let Some(port) = captured_port(probe, &c["ports"], excluded_ports).filter(|_| failing) else { continue };
            warnings.push(if https {
                format!(
                    "container {name:?} {field}: an HTTPS probe of port {port} fails once the port is captured (the \
                     kubelet has no SVID); list {port} in trellis.dev/exclude-inbound-ports or probe over HTTP"
                )
            } else {
                format!(
                    "container {name:?} {field}: a grpc probe of port {port} fails once the port is captured; \
                     annotate the pod trellis.dev/rewrite-app-probes: \"true\" to have the proxy run it"
                )
            });
        }
    }
    warnings
}

/// The originals the last injection gave its proxy, from the proxy container's environment.
fn previous_probes(spec: &Map<String, Value>) -> Map<String, Value> {
    let lists = ["initContainers", "containers"].map(|l| spec.get(l).and_then(Value::as_array));
    let proxy = lists.into_iter().flatten().flatten().find(|c| c["name"] == PROXY_CONTAINER_NAME);
    let env = proxy.and_then(|p| p["env"].as_array()).into_iter().flatten();
    let value = env.filter(|e| e["name"] == APP_PROBES_ENV).find_map(|e| e["value"].as_str());
    match value.map(serde_json::from_str::<Value>) {
        Some(Ok(Value::Object(map))) => map,
        _ => Map::new(),
    }
}

/// Whether `probe` is the rewritten form of the probe `key`.
fn is_rewritten(probe: &Map<String, Value>, key: &str) -> bool {
    let get = &probe.get("httpGet");
    get.and_then(|g| g["port"].as_u64()) == Some(u64::from(ADMIN_PORT))
        && get.and_then(|g| g["path"].as_str()) == Some(&format!("{APP_HEALTH_PREFIX}{key}"))
}

/// Puts the original action (as the user wrote it) back in place.
fn restore(probe: &mut Map<String, Value>, original: &Value) {
    for action in ACTIONS {
        if let Some(v) = original.get(action) {
            replace_key(probe, "httpGet", action, v.clone());
        }
    }
}

/// What the proxy needs to run `probe` for the kubelet — the original action, its port
/// resolved to a number and its timeout — or `None` when it is not one to rewrite.
fn original_for_proxy(probe: &Map<String, Value>, declared: &Value, excluded_ports: &[u16]) -> Option<Value> {
    let (action, spec) = action(probe)?;
    // Plain HTTP only (the default scheme): the proxy does not speak the app's own TLS.
    if !spec.get("scheme").and_then(Value::as_str).unwrap_or("HTTP").eq_ignore_ascii_case("HTTP") {
        return None;
    }
    let port = captured_port(spec, declared, excluded_ports)?;
    // The kubelet's default timeout is 1 s.
    let timeout = probe.get("timeoutSeconds").and_then(Value::as_u64).unwrap_or(1);
    let mut entry = Map::new();
    entry.insert("port".into(), json!(port));
    entry.insert("timeoutSeconds".into(), json!(timeout));
    entry.insert(action.into(), spec.clone());
    Some(Value::Object(entry))
}

/// A probe's action (`httpGet`, `tcpSocket` or `grpc`) and its settings.
fn action(probe: &Map<String, Value>) -> Option<(&'static str, &Value)> {
    ACTIONS.into_iter().find_map(|a| probe.get(a).map(|spec| (a, spec)))
}

fn is_https(action: &Value) -> bool {
    action.get("scheme").and_then(Value::as_str).is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
}

/// The port an action probes, if the capture rules hand it to the proxy: on the pod itself
/// (no `host`), a number or a port the container declares, not the admin port or an
/// excluded one.
fn captured_port(action: &Value, declared: &Value, excluded_ports: &[u16]) -> Option<u16> {
    if action.get("host").is_some_and(|h| h != "") {
        return None;
    }
    let port = resolve_port(&action["port"], declared)?;
    (port != ADMIN_PORT && !excluded_ports.contains(&port)).then_some(port)
}

/// A probe's port: a number, or the name of a port the container declares.
fn resolve_port(port: &Value, declared: &Value) -> Option<u16> {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).ok().filter(|n| *n > 0);
    }
    let name = port.as_str()?;
    if let Ok(n) = name.parse::<u16>() {
        return Some(n).filter(|n| *n > 0);
    }
    let named = declared.as_array()?.iter().find(|p| p["name"] == name)?;
    named["containerPort"].as_u64().and_then(|n| u16::try_from(n).ok())
}

/// Replaces `old` with `new: value`, keeping the key's position (fields Trellis does not own
/// are never reordered).
fn replace_key(map: &mut Map<String, Value>, old: &str, new: &str, value: Value) {
    let mut rebuilt = Map::with_capacity(map.len());
    let mut placed = false;
    for (k, v) in std::mem::take(map) {
        if k == old {
            rebuilt.insert(new.to_string(), value.clone());
            placed = true;
        } else if k != new {
            rebuilt.insert(k, v);
        }
    }
    if !placed {
        rebuilt.insert(new.to_string(), value);
    }
    *map = rebuilt;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(probes: Value) -> Map<String, Value> {
        let mut c = json!({ "name": "web", "ports": [{ "name": "http", "containerPort": 8080 }] });
        c.as_object_mut().unwrap().extend(probes.as_object().unwrap().clone());
        json!({ "containers": [c] }).as_object().unwrap().clone()
    }

    fn probe<'a>(s: &'a Map<String, Value>, field: &str) -> &'a Value {
        &s["containers"][0][field]
    }

    #[test]
    fn http_tcp_and_grpc_probes_go_through_the_admin_port() {
        let mut s = spec(json!({
            "readinessProbe": { "httpGet": { "path": "/healthz", "port": "http", "httpHeaders": [{ "name": "X", "value": "1" }] }, "periodSeconds": 5 },
            "livenessProbe": { "tcpSocket": { "port": 8080 }, "timeoutSeconds": 3 },
            "startupProbe": { "grpc": { "port": 9000, "service": "shop.Catalog" }, "failureThreshold": 30 },
        }));
        let given = probes_for_proxy(&mut s, true, &[]);
        assert_eq!(
            probe(&s, "readinessProbe"),
            &json!({ "httpGet": { "path": "/app-health/web/readyz", "port": 15000 }, "periodSeconds": 5 })
        );
        assert_eq!(
            probe(&s, "livenessProbe"),
            &json!({ "httpGet": { "path": "/app-health/web/livez", "port": 15000 }, "timeoutSeconds": 3 })
        );
        assert_eq!(
            probe(&s, "startupProbe"),
            &json!({ "httpGet": { "path": "/app-health/web/startupz", "port": 15000 }, "failureThreshold": 30 })
        );
        assert_eq!(given["web/startupz"]["grpc"], json!({ "port": 9000, "service": "shop.Catalog" }));
        assert_eq!(given["web/readyz"]["port"], 8080, "the named port is resolved");
        assert_eq!(given["web/readyz"]["httpGet"]["httpHeaders"][0]["name"], "X");
        assert_eq!(given["web/readyz"]["timeoutSeconds"], 1);
        assert_eq!(given["web/livez"], json!({ "port": 8080, "timeoutSeconds": 3, "tcpSocket": { "port": 8080 } }));
        assert_eq!(given.len(), 3);
    }

    /// The default: the manifest stays as written; HTTP probes are listed for the proxy,
    /// which answers the kubelet on the captured port.
    #[test]
    fn by_default_the_probes_stay_as_written_and_http_ones_are_listed() {
        let written = json!({
            "readinessProbe": { "httpGet": { "path": "/ready", "port": "http" } },
            "livenessProbe": { "tcpSocket": { "port": 8080 } },
            "startupProbe": { "grpc": { "port": 9000 } },
        });
        let mut s = spec(written.clone());
        let given = probes_for_proxy(&mut s, false, &[]);
        assert_eq!(s, spec(written), "the app container is untouched");
        assert_eq!(given.keys().collect::<Vec<_>>(), ["web/readyz"]);
        assert_eq!(given["web/readyz"]["port"], 8080);
    }

    #[test]
    fn probes_the_proxy_cannot_run_are_left_alone() {
        let untouched = json!({
            "readinessProbe": { "httpGet": { "path": "/", "port": 8443, "scheme": "HTTPS" } },
            "livenessProbe": { "httpGet": { "path": "/", "port": "undeclared" } },
            "startupProbe": { "exec": { "command": ["true"] } },
        });
        let mut s = spec(untouched.clone());
        assert!(probes_for_proxy(&mut s, true, &[]).is_empty());
        assert_eq!(spec(untouched), s);
        let excluded = json!({ "readinessProbe": { "tcpSocket": { "port": 9090 } } });
        let mut s = spec(excluded.clone());
        assert!(probes_for_proxy(&mut s, true, &[9090]).is_empty(), "a port excluded from capture works as it is");
        assert_eq!(spec(excluded), s);
    }

    /// Probes the kubelet cannot pass once their port is captured are named, with the way
    /// out; the ones that work (HTTP, rewritten gRPC, excluded ports, a `host`) are not.
    /// A native sidecar (an init container with `restartPolicy: Always`) is probed while the
    /// pod runs, and the kubelet waits for its startup probe: its probes are the proxy's to
    /// answer as the app's are. A plain init container has none to answer.
    #[test]
    fn native_sidecars_probes_are_handled_as_the_apps() {
        let mut s = json!({
            "initContainers": [
                { "name": "migrate", "image": "m" },
                { "name": "fluentbit", "restartPolicy": "Always", "ports": [{ "name": "http", "containerPort": 2020 }],
                  "readinessProbe": { "httpGet": { "path": "/api/v1/health", "port": "http" } },
                  "startupProbe": { "grpc": { "port": 2021 } } },
            ],
            "containers": [{ "name": "app", "readinessProbe": { "httpGet": { "path": "/", "port": 8080 } } }],
        })
        .as_object()
        .unwrap()
        .clone();
        let warnings = failing_probes(&s, false, &[]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("container \"fluentbit\" startupProbe: a grpc probe of port 2021"),
            "{warnings:?}"
        );

        let given = probes_for_proxy(&mut s.clone(), false, &[]);
        assert_eq!(given.keys().collect::<Vec<_>>(), ["fluentbit/readyz", "app/readyz"]);
        assert_eq!(given["fluentbit/readyz"]["port"], 2020, "the named port resolved");

        let given = probes_for_proxy(&mut s, true, &[]);
        assert_eq!(given.keys().collect::<Vec<_>>(), ["fluentbit/readyz", "fluentbit/startupz", "app/readyz"]);
        let startup = &s["initContainers"][1]["startupProbe"];
        assert_eq!(startup["httpGet"]["path"], "/app-health/fluentbit/startupz", "{startup}");
        assert!(failing_probes(&s, true, &[]).is_empty());
    }

    #[test]
    fn probes_that_fail_in_the_mesh_are_named() {
        let s = spec(json!({
            "readinessProbe": { "httpGet": { "path": "/", "port": "http", "scheme": "HTTPS" } },
            "livenessProbe": { "grpc": { "port": 9000 } },
            "startupProbe": { "httpGet": { "path": "/", "port": 8080 } },
        }));
        let warnings = failing_probes(&s, false, &[]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("container \"web\" livenessProbe: a grpc probe of port 9000"), "{warnings:?}");
        assert!(warnings[0].contains("trellis.dev/rewrite-app-probes"), "{warnings:?}");
        assert!(
            warnings[1].starts_with("container \"web\" readinessProbe: an HTTPS probe of port 8080"),
            "{warnings:?}"
        );
        assert!(warnings[1].contains("list 8080 in trellis.dev/exclude-inbound-ports"), "{warnings:?}");

        // Rewritten, the gRPC probe is the proxy's to run; excluded, the HTTPS port is not captured.
        let mut rewritten = s.clone();
        probes_for_proxy(&mut rewritten, true, &[]);
        assert_eq!(failing_probes(&rewritten, true, &[]).len(), 1, "only the HTTPS one");
        assert!(failing_probes(&s, false, &[8080, 9000]).is_empty());
        let elsewhere =
            spec(json!({ "readinessProbe": { "httpGet": { "port": 443, "host": "10.0.0.1", "scheme": "HTTPS" } } }));
        assert!(failing_probes(&elsewhere, false, &[]).is_empty(), "a probe of another host is not captured here");
    }

    /// Re-injection restores from the proxy's environment and rewrites again: the same
    /// result; with the rewrite switched off, the originals come back.
    #[test]
    fn rewriting_again_is_the_same_and_switching_it_off_restores_the_originals() {
        let original = json!({ "livenessProbe": { "tcpSocket": { "port": 8080 }, "periodSeconds": 2 } });
        let mut s = spec(original.clone());
        let given = probes_for_proxy(&mut s, true, &[]);
        let env = json!([{ "name": APP_PROBES_ENV, "value": Value::Object(given.clone()).to_string() }]);
        s.insert("initContainers".into(), json!([{ "name": PROXY_CONTAINER_NAME, "env": env }]));
        let once = s.clone();
        assert_eq!(probes_for_proxy(&mut s, true, &[]), given);
        assert_eq!(s, once);
        assert!(probes_for_proxy(&mut s, false, &[]).is_empty());
        s.remove("initContainers");
        assert_eq!(s, spec(original));
    }
}
