//! The `trellis.dev/*` annotations that tune injection, read and checked before anything is
//! added, so a typo is reported at `trellis inject` / admission time rather than as a pod
//! whose init container crash-loops.
//!
//! Values are normalised (trimmed, duplicates dropped, CIDRs written as network/prefix) so the
//! injected arguments are the same however the annotation was spelled.

use ipnetwork::IpNetwork;
use serde_json::{Map, Value};

use super::quantity::Quantity;
use super::{
    ANNOTATION_DEFAULT_ACTION, ANNOTATION_EXCLUDE_INBOUND_PORTS, ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS, ANNOTATION_INJECT, ANNOTATION_INJECTED, ANNOTATION_OPAQUE_PORTS,
    ANNOTATION_PROXY_CPU_LIMIT, ANNOTATION_PROXY_CPU_REQUEST, ANNOTATION_PROXY_MEMORY_LIMIT,
    ANNOTATION_PROXY_MEMORY_REQUEST, ANNOTATION_REWRITE_APP_PROBES, DEFAULT_PROXY_CPU_REQUEST,
    DEFAULT_PROXY_MEMORY_LIMIT, DEFAULT_PROXY_MEMORY_REQUEST, PodError,
};

/// The capture and sniffing exceptions and the proxy resources one pod asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PodOptions {
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<String>,
    pub opaque_ports: Vec<u16>,
    pub resources: ProxyResources,
    /// Point the app's HTTP, TCP and gRPC probes at the proxy's admin port (`probes.rs`); off
    /// unless `trellis.dev/rewrite-app-probes: "true"`.
    pub rewrite_app_probes: bool,
    /// `Some("allow")` or `Some("deny")` from `trellis.dev/default-action`; unset, the proxy's
    /// own default (deny).
    pub default_action: Option<&'static str>,
}

/// The proxy container's `resources`, as quantity strings checked by [`Quantity::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProxyResources {
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for ProxyResources {
    fn default() -> Self {
        ProxyResources {
            cpu_request: DEFAULT_PROXY_CPU_REQUEST.into(),
            memory_request: DEFAULT_PROXY_MEMORY_REQUEST.into(),
            cpu_limit: None,
            memory_limit: Some(DEFAULT_PROXY_MEMORY_LIMIT.into()),
        }
    }
}

/// `metadata.annotations` of an object, if it is a map.
pub(crate) fn annotations(object: &Value) -> Option<&Map<String, Value>> {
    object.get("metadata")?.get("annotations")?.as_object()
}

/// The string value of annotation `key`; a non-string value is refused because the API server
/// refuses it too (annotations are `map[string]string`).
fn string_annotation<'a>(annotations: Option<&'a Map<String, Value>>, key: &str) -> Result<Option<&'a str>, PodError> {
    match annotations.and_then(|a| a.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(bad(key, &other.to_string(), "annotation values must be strings: quote it".into())),
    }
}

/// Every `trellis.dev/` annotation Trellis reads or writes.
const KNOWN: [&str; 12] = [
    ANNOTATION_INJECT,
    ANNOTATION_INJECTED,
    ANNOTATION_EXCLUDE_INBOUND_PORTS,
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
    ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
    ANNOTATION_OPAQUE_PORTS,
    ANNOTATION_PROXY_CPU_REQUEST,
    ANNOTATION_PROXY_CPU_LIMIT,
    ANNOTATION_PROXY_MEMORY_REQUEST,
    ANNOTATION_PROXY_MEMORY_LIMIT,
    ANNOTATION_REWRITE_APP_PROBES,
    ANNOTATION_DEFAULT_ACTION,
];

/// A `trellis.dev/` annotation Trellis does not know is a typo (`opaque-port`): refused like
/// a bad value, or the setting it meant would silently not apply.
fn check_known(annotations: Option<&Map<String, Value>>) -> Result<(), PodError> {
    let unknown = annotations
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .find(|k| k.strip_prefix("trellis.dev/").is_some() && !KNOWN.contains(&k.as_str()));
    match unknown {
        None => Ok(()),
        Some(key) => {
            let known: Vec<&str> = KNOWN.iter().filter(|k| **k != ANNOTATION_INJECTED).copied().collect();
            let value = annotations.and_then(|a| a.get(key)).and_then(Value::as_str).unwrap_or_default();
            let reason = format!("not an annotation Trellis knows (a typo?); the known ones are {}", known.join(", "));
            Err(bad(key, value, reason))
        }
    }
}

/// The `trellis.dev/` annotations on a workload's (or a CronJob's job template's) own
/// metadata that have no effect there — every one but `trellis.dev/inject`, which only a pod
/// template's are read for — as warnings naming where they belong. One the template carries
/// with the same value is not warned about: kustomize's `commonAnnotations` puts them on both.
pub(crate) fn misplaced(owner: &Value, owner_path: &str, template: Option<&Value>, template_path: &str) -> Vec<String> {
    let on_template = template.and_then(annotations);
    let at =
        |p: &str| if p.is_empty() { "metadata.annotations".to_string() } else { format!("{p}.metadata.annotations") };
    annotations(owner)
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("trellis.dev/") && k.as_str() != ANNOTATION_INJECT)
        .filter(|(k, v)| on_template.and_then(|t| t.get(k.as_str())) != Some(*v))
        .map(|(k, _)| {
            format!(
                "{}: {k} has no effect here (only {ANNOTATION_INJECT} is read on a workload); put it on {}",
                at(owner_path),
                at(template_path)
            )
        })
        .collect()
}

/// Whether `trellis.dev/inject` on this object opts it out. `enabled` and absence mean no;
/// any other value is refused, so that `disable` or `false` do not silently inject.
pub(crate) fn is_disabled(object: &Value) -> Result<bool, PodError> {
    match string_annotation(annotations(object), ANNOTATION_INJECT)? {
        None => Ok(false),
        Some(v) if v.trim().eq_ignore_ascii_case("disabled") => Ok(true),
        Some(v) if v.trim().eq_ignore_ascii_case("enabled") => Ok(false),
        Some(v) => Err(bad(ANNOTATION_INJECT, v, "expected \"enabled\" or \"disabled\"".into())),
    }
}

impl PodOptions {
    /// Reads the options from the pod (template) metadata.
    pub(crate) fn from_template(template: &Value) -> Result<Self, PodError> {
        let a = annotations(template);
        check_known(a)?;
        let ports = |key: &str| -> Result<Vec<u16>, PodError> {
            string_annotation(a, key)?.map_or(Ok(Vec::new()), |v| parse_ports(v).map_err(|r| bad(key, v, r)))
        };
        let cidrs = match string_annotation(a, ANNOTATION_EXCLUDE_OUTBOUND_CIDRS)? {
            None => Vec::new(),
            Some(v) => parse_cidrs(v).map_err(|r| bad(ANNOTATION_EXCLUDE_OUTBOUND_CIDRS, v, r))?,
        };
        Ok(PodOptions {
            exclude_inbound_ports: ports(ANNOTATION_EXCLUDE_INBOUND_PORTS)?,
            exclude_outbound_ports: ports(ANNOTATION_EXCLUDE_OUTBOUND_PORTS)?,
            exclude_outbound_cidrs: cidrs,
            opaque_ports: ports(ANNOTATION_OPAQUE_PORTS)?,
            resources: ProxyResources::from_annotations(a)?,
            // Case-insensitive, as `trellis.dev/inject: Disabled` is.
            rewrite_app_probes: match string_annotation(a, ANNOTATION_REWRITE_APP_PROBES)?.map(str::trim) {
                Some(v) if v.eq_ignore_ascii_case("true") => true,
                None => false,
                Some(v) if v.eq_ignore_ascii_case("false") => false,
                Some(v) => return Err(bad(ANNOTATION_REWRITE_APP_PROBES, v, "expected \"true\" or \"false\"".into())),
            },
            default_action: match string_annotation(a, ANNOTATION_DEFAULT_ACTION)?.map(str::trim) {
                None => None,
                Some(v) if v.eq_ignore_ascii_case("allow") => Some("allow"),
                Some(v) if v.eq_ignore_ascii_case("deny") => Some("deny"),
                Some(v) => return Err(bad(ANNOTATION_DEFAULT_ACTION, v, "expected \"allow\" or \"deny\"".into())),
            },
        })
    }
}

impl ProxyResources {
    /// The defaults, with whatever the `trellis.dev/proxy-*` annotations set. A request above
    /// its limit is refused here, naming both, because the API server would refuse the pod.
    fn from_annotations(a: Option<&Map<String, Value>>) -> Result<Self, PodError> {
        let quantity = |key: &str, default: Option<&str>| -> Result<Option<Quantity>, PodError> {
            match string_annotation(a, key)? {
                Some(v) => Quantity::parse(v).map(Some).map_err(|r| bad(key, v, r)),
                None => Ok(default.map(|d| Quantity::parse(d).expect("the default quantities parse"))),
            }
        };
        let cpu_request = quantity(ANNOTATION_PROXY_CPU_REQUEST, Some(DEFAULT_PROXY_CPU_REQUEST))?;
        let memory_request = quantity(ANNOTATION_PROXY_MEMORY_REQUEST, Some(DEFAULT_PROXY_MEMORY_REQUEST))?;
        let cpu_limit = quantity(ANNOTATION_PROXY_CPU_LIMIT, None)?;
        let memory_limit = quantity(ANNOTATION_PROXY_MEMORY_LIMIT, Some(DEFAULT_PROXY_MEMORY_LIMIT))?;
        for (limit_key, limit) in
            [(ANNOTATION_PROXY_CPU_LIMIT, &cpu_limit), (ANNOTATION_PROXY_MEMORY_LIMIT, &memory_limit)]
        {
            if let Some(l) = limit.as_ref().filter(|l| l.value == 0.0) {
                return Err(bad(limit_key, &l.text, "a limit of zero would keep the proxy from starting".into()));
            }
        }
        let given = |key: &str| a.is_some_and(|a| a.contains_key(key));
        check_request_within_limit(
            (ANNOTATION_PROXY_CPU_REQUEST, &cpu_request, given(ANNOTATION_PROXY_CPU_REQUEST)),
            (ANNOTATION_PROXY_CPU_LIMIT, &cpu_limit),
        )?;
        check_request_within_limit(
            (ANNOTATION_PROXY_MEMORY_REQUEST, &memory_request, given(ANNOTATION_PROXY_MEMORY_REQUEST)),
            (ANNOTATION_PROXY_MEMORY_LIMIT, &memory_limit),
        )?;
        let text = |q: Option<Quantity>| q.map(|q| q.text);
        Ok(ProxyResources {
            cpu_request: text(cpu_request).unwrap_or_default(),
            memory_request: text(memory_request).unwrap_or_default(),
            cpu_limit: text(cpu_limit),
            memory_limit: text(memory_limit),
        })
    }
}

/// A request above its limit is refused, naming the annotation the user wrote: the request
/// if they set it, else the limit they set below the default request.
fn check_request_within_limit(
    (request_key, request, request_given): (&str, &Option<Quantity>, bool),
    (limit_key, limit): (&str, &Option<Quantity>),
) -> Result<(), PodError> {
    match (request, limit) {
        (Some(r), Some(l)) if r.value > l.value && request_given => Err(bad(
            request_key,
            &r.text,
            format!("the request is above the limit {} ({limit_key}, or the default): raise the limit too", l.text),
        )),
        (Some(r), Some(l)) if r.value > l.value => {
            // `512m` is 0.512 bytes of memory (m is milli), a common slip for `512Mi`.
            let milli = if l.text.ends_with('m') { " (`m` is milli: did you mean `Mi`?)" } else { "" };
            let reason = format!("the limit is below the proxy's default request {} ({request_key}){milli}", r.text);
            Err(bad(limit_key, &l.text, reason))
        }
        _ => Ok(()),
    }
}

fn bad(annotation: &str, value: &str, reason: String) -> PodError {
    PodError::BadAnnotation { annotation: annotation.into(), value: value.into(), reason, at: String::new() }
}

/// The non-empty, trimmed items of a comma list.
fn items(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// `"8080, 9090,8080"` → `[8080, 9090]`; port 0 and non-numbers are refused.
pub(crate) fn parse_ports(list: &str) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for item in items(list) {
        let port: u16 = item.parse().map_err(|_| format!("{item:?} is not a port number (1-65535)"))?;
        if port == 0 {
            return Err("port 0 is not a port".into());
        }
        if !out.contains(&port) {
            out.push(port);
        }
    }
    Ok(out)
}

/// `"10.0.0.0/8, fd00::/8, 192.168.1.7"` → network/prefix strings (a bare address is /32 or
/// /128). Host bits set (`10.1.0.0/8`) are refused, as in policies: widened, a typo for a /16
/// would take a whole /8 out of the mesh.
pub(crate) fn parse_cidrs(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in items(list) {
        let net: IpNetwork = trellis_policy::parse_cidr(item).map_err(|e| e.to_string())?;
        let normal = format!("{}/{}", net.network(), net.prefix());
        if !out.contains(&normal) {
            out.push(normal);
        }
    }
    Ok(out)
}

/// `[8080, 9090]` → `"8080,9090"`, the form `trellis proxy init` and the proxy read.
pub(crate) fn join<T: ToString>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `trellis.dev/` annotation constant is one the typo check accepts: one added to
    /// `mod.rs` and forgotten in [`KNOWN`] would be refused on every pod that used it.
    #[test]
    fn every_annotation_constant_is_known() {
        let source = include_str!("mod.rs");
        let declared: Vec<&str> = source
            .lines()
            .filter(|l| l.starts_with("pub const ANNOTATION_"))
            .filter_map(|l| l.split('"').nth(1))
            .filter(|v| v.starts_with("trellis.dev/"))
            .collect();
        assert!(declared.len() >= 10, "{declared:?}");
        for value in declared {
            assert!(KNOWN.contains(&value), "{value} is declared in mod.rs but not in KNOWN");
        }
    }

    #[test]
    fn ports_are_trimmed_deduplicated_and_checked() {
        assert_eq!(parse_ports(" 8080, 9090,,8080 "), Ok(vec![8080, 9090]));
        assert_eq!(parse_ports(""), Ok(vec![]));
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("65536").is_err());
        assert!(parse_ports("http").is_err());
    }

    #[test]
    fn probe_rewriting_is_off_unless_switched_on_and_anything_else_is_refused() {
        let rewrite = |a: Value| {
            PodOptions::from_template(&serde_json::json!({ "metadata": { "annotations": a } }))
                .map(|o| o.rewrite_app_probes)
        };
        assert!(!rewrite(serde_json::json!({})).unwrap());
        assert!(rewrite(serde_json::json!({ ANNOTATION_REWRITE_APP_PROBES: "true" })).unwrap());
        assert!(!rewrite(serde_json::json!({ ANNOTATION_REWRITE_APP_PROBES: "false" })).unwrap());
        assert!(rewrite(serde_json::json!({ ANNOTATION_REWRITE_APP_PROBES: " True" })).unwrap(), "as inject: Disabled");
        let e = rewrite(serde_json::json!({ ANNOTATION_REWRITE_APP_PROBES: "no" })).unwrap_err().to_string();
        assert!(e.contains(ANNOTATION_REWRITE_APP_PROBES) && e.contains("\"true\" or \"false\""), "{e}");
    }

    #[test]
    fn the_default_action_is_allow_or_deny_and_nothing_else() {
        let action = |a: Value| {
            PodOptions::from_template(&serde_json::json!({ "metadata": { "annotations": a } }))
                .map(|o| o.default_action)
        };
        assert_eq!(action(serde_json::json!({})).unwrap(), None);
        assert_eq!(action(serde_json::json!({ ANNOTATION_DEFAULT_ACTION: " Allow " })).unwrap(), Some("allow"));
        assert_eq!(action(serde_json::json!({ ANNOTATION_DEFAULT_ACTION: "deny" })).unwrap(), Some("deny"));
        let e = action(serde_json::json!({ ANNOTATION_DEFAULT_ACTION: "permit" })).unwrap_err().to_string();
        assert!(e.contains(ANNOTATION_DEFAULT_ACTION) && e.contains("\"allow\" or \"deny\""), "{e}");
    }

    /// A misspelt `trellis.dev/` annotation would silently not apply: refused, naming it and
    /// the known ones. Other prefixes are none of Trellis' business.
    #[test]
    fn an_unknown_trellis_annotation_is_refused() {
        let options = |a: Value| PodOptions::from_template(&serde_json::json!({ "metadata": { "annotations": a } }));
        let e = options(serde_json::json!({ "trellis.dev/opaque-port": "3306" })).unwrap_err().to_string();
        assert!(e.starts_with("annotation trellis.dev/opaque-port: not an annotation Trellis knows"), "{e}");
        assert!(e.contains(ANNOTATION_OPAQUE_PORTS) && !e.contains(ANNOTATION_INJECTED), "{e}");
        let ok = serde_json::json!({ ANNOTATION_INJECTED: "0.1.0", "example.com/trellis.dev": "x", "app.kubernetes.io/x": "y" });
        assert!(options(ok).is_ok());
    }

    fn resources(annotations: Value) -> Result<ProxyResources, PodError> {
        PodOptions::from_template(&serde_json::json!({ "metadata": { "annotations": annotations } }))
            .map(|o| o.resources)
    }

    #[test]
    fn proxy_resources_default_and_follow_the_annotations() {
        assert_eq!(resources(serde_json::json!({})).unwrap(), ProxyResources::default());
        let r = resources(serde_json::json!({
            "trellis.dev/proxy-cpu-request": "250m",
            "trellis.dev/proxy-cpu-limit": " 1 ",
            "trellis.dev/proxy-memory-request": "64Mi",
            "trellis.dev/proxy-memory-limit": "1Gi",
        }))
        .unwrap();
        assert_eq!(
            r,
            ProxyResources {
                cpu_request: "250m".into(),
                memory_request: "64Mi".into(),
                cpu_limit: Some("1".into()),
                memory_limit: Some("1Gi".into()),
            }
        );
    }

    #[test]
    fn bad_proxy_resources_are_refused_naming_the_annotation() {
        let refused = |annotations: Value, key: &str, reason: &str| match resources(annotations) {
            Err(PodError::BadAnnotation { annotation, reason: r, .. }) => {
                assert_eq!(annotation, key);
                assert!(r.contains(reason), "{r}");
            }
            other => panic!("expected a refusal of {key}, got {other:?}"),
        };
        refused(
            serde_json::json!({"trellis.dev/proxy-memory-limit": "256MB"}),
            "trellis.dev/proxy-memory-limit",
            "not a Kubernetes quantity",
        );
        refused(
            serde_json::json!({"trellis.dev/proxy-cpu-request": "-1"}),
            "trellis.dev/proxy-cpu-request",
            "negative",
        );
        refused(serde_json::json!({"trellis.dev/proxy-cpu-limit": "0"}), "trellis.dev/proxy-cpu-limit", "zero");
        refused(
            serde_json::json!({"trellis.dev/proxy-memory-limit": 512}),
            "trellis.dev/proxy-memory-limit",
            "strings",
        );
        // Above the explicit limit, and above the default one.
        refused(
            serde_json::json!({"trellis.dev/proxy-cpu-request": "2", "trellis.dev/proxy-cpu-limit": "500m"}),
            "trellis.dev/proxy-cpu-request",
            "above the limit 500m",
        );
        refused(
            serde_json::json!({"trellis.dev/proxy-memory-request": "1Gi"}),
            "trellis.dev/proxy-memory-request",
            "above the limit 256Mi",
        );
        // A limit alone, below the default request: the limit is named (the user never wrote
        // the request), with the hint for the usual slip.
        refused(
            serde_json::json!({"trellis.dev/proxy-memory-limit": "512m"}),
            "trellis.dev/proxy-memory-limit",
            "below the proxy's default request 32Mi (trellis.dev/proxy-memory-request) (`m` is milli: did you mean `Mi`?)",
        );
    }

    #[test]
    fn cidrs_are_normalised_and_host_bits_refused() {
        assert_eq!(
            parse_cidrs("10.0.0.0/8, 192.168.1.7 ,fd00::/8, 10.0.0.0/8").unwrap(),
            vec!["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]
        );
        // A typo for a /16 must not take a whole /8 out of the mesh.
        let err = parse_cidrs("10.1.0.0/8").unwrap_err();
        assert!(err.contains("did you mean \"10.0.0.0/8\""), "{err}");
        assert!(parse_cidrs("fd00::1/8").is_err());
        assert!(parse_cidrs("10.0.0.0/33").is_err());
        assert!(parse_cidrs("example.com").is_err());
    }
}
