//! The `trellis.dev/*` annotations that tune injection, read and checked before anything is
//! added, so a typo is reported at `trellis inject` / admission time rather than as a pod
//! whose init container crash-loops.
//!
//! Values are normalised (trimmed, duplicates dropped, CIDRs written as network/prefix) so the
//! injected arguments are the same however the annotation was spelled.

use ipnetwork::IpNetwork;
use serde_json::{Map, Value};

use super::{
    ANNOTATION_EXCLUDE_INBOUND_PORTS, ANNOTATION_EXCLUDE_OUTBOUND_CIDRS, ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
    ANNOTATION_INJECT, ANNOTATION_OPAQUE_PORTS, PodError,
};

/// The capture and sniffing exceptions one pod asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PodOptions {
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<String>,
    pub opaque_ports: Vec<u16>,
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
        Some(other) => Err(PodError::BadAnnotation {
            annotation: key.to_string(),
            value: other.to_string(),
            reason: "annotation values must be strings: quote it".into(),
        }),
    }
}

/// Whether `trellis.dev/inject` on this object opts it out. `enabled` and absence mean no;
/// any other value is refused, so that `disable` or `false` do not silently inject.
pub(crate) fn is_disabled(object: &Value) -> Result<bool, PodError> {
    match string_annotation(annotations(object), ANNOTATION_INJECT)? {
        None => Ok(false),
        Some(v) if v.trim().eq_ignore_ascii_case("disabled") => Ok(true),
        Some(v) if v.trim().eq_ignore_ascii_case("enabled") => Ok(false),
        Some(v) => Err(PodError::BadAnnotation {
            annotation: ANNOTATION_INJECT.into(),
            value: v.into(),
            reason: "expected \"enabled\" or \"disabled\"".into(),
        }),
    }
}

impl PodOptions {
    /// Reads the options from the pod (template) metadata.
    pub(crate) fn from_template(template: &Value) -> Result<Self, PodError> {
        let a = annotations(template);
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
        })
    }
}

fn bad(annotation: &str, value: &str, reason: String) -> PodError {
    PodError::BadAnnotation { annotation: annotation.into(), value: value.into(), reason }
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
/// /128); host bits are cleared, so `10.1.2.3/8` becomes `10.0.0.0/8`.
pub(crate) fn parse_cidrs(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in items(list) {
        let net: IpNetwork = item.parse().map_err(|e| format!("{item:?} is not a CIDR: {e}"))?;
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

    #[test]
    fn ports_are_trimmed_deduplicated_and_checked() {
        assert_eq!(parse_ports(" 8080, 9090,,8080 "), Ok(vec![8080, 9090]));
        assert_eq!(parse_ports(""), Ok(vec![]));
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("65536").is_err());
        assert!(parse_ports("http").is_err());
    }

    #[test]
    fn cidrs_are_normalised() {
        assert_eq!(
            parse_cidrs("10.1.2.3/8, 192.168.1.7 ,fd00::1/8").unwrap(),
            vec!["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]
        );
        assert!(parse_cidrs("10.0.0.0/33").is_err());
        assert!(parse_cidrs("example.com").is_err());
    }
}
