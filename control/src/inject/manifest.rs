//! Manifests in and out: multi-document YAML (`---`), JSON (one or more values), and
//! `kind: List`; and, per document, where the pod template of each workload kind lives.
//!
//! Documents are read into `serde_json::Value` with key order preserved and written back as
//! YAML, so fields Trellis does not own keep their order. Comments and anchors do not survive
//! (anchors are expanded); YAML 1.1 octal such as `defaultMode: 0644` is read the way the
//! Kubernetes API reads it (420) rather than as decimal 644.

use serde_json::Value;

use super::annotations::{is_disabled, misplaced};
use super::pod::inject_template;
use super::{InjectConfig, InjectError, Outcome, PodError};

/// The output of [`inject_manifests`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// Every input document, injected where it is a workload, as YAML.
    pub yaml: String,
    /// What happened to each document, in input order.
    pub outcomes: Vec<Outcome>,
}

/// Injects every workload in `input` (YAML or JSON, any number of documents) and returns the
/// result as YAML. Nothing is returned unless every document was read and injected.
pub fn inject_manifests(input: &str, cfg: &InjectConfig) -> Result<Injected, InjectError> {
    let mut docs = parse_manifests(input)?;
    for (index, doc) in docs.iter().enumerate() {
        not_an_object(doc).map_or(Ok(()), |reason| Err(InjectError::NotAnObject { document: index + 1, reason }))?;
    }
    let mut outcomes = Vec::with_capacity(docs.len());
    for (index, doc) in docs.iter_mut().enumerate() {
        let outcome = inject_document(doc, cfg).map_err(|error| InjectError::Pod {
            document: index + 1,
            kind: str_at(doc, &["kind"]).unwrap_or("?").to_string(),
            name: str_at(doc, &["metadata", "name"]).unwrap_or("").to_string(),
            error: Box::new(error),
        })?;
        outcomes.push(outcome);
    }
    Ok(Injected { yaml: to_yaml(&docs)?, outcomes })
}

/// Injects one document in place: a Pod, a workload's pod template, or each item of a
/// `List`. Anything else is left as it is ([`Outcome::NotAWorkload`]).
pub fn inject_document(doc: &mut Value, cfg: &InjectConfig) -> Result<Outcome, PodError> {
    inject_at(doc, cfg, "")
}

fn inject_at(doc: &mut Value, cfg: &InjectConfig, path: &str) -> Result<Outcome, PodError> {
    let api_version = str_at(doc, &["apiVersion"]).unwrap_or("");
    let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
    let kind = str_at(doc, &["kind"]).unwrap_or("");
    let prefix = |p: &str| if path.is_empty() { p.to_string() } else { format!("{path}.{p}") };
    match (group, kind) {
        ("", "Pod") => inject_template(false, doc, cfg, path),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("", "ReplicationController")
        | ("batch", "Job") => {
            let disabled = is_disabled(doc).map_err(|e| e.in_metadata(&prefix("metadata")))?;
            let template_path = prefix("spec.template");
            let misplaced = misplaced(doc, path, doc.pointer("/spec/template"), &template_path);
            let outcome =
                inject_template(disabled, child(doc, &["spec", "template"], &template_path)?, cfg, &template_path)?;
            Ok(with_warnings(outcome, misplaced))
        }
        ("batch", "CronJob") => {
            let disabled = is_disabled(doc).map_err(|e| e.in_metadata(&prefix("metadata")))?;
            let (job_path, template_path) = (prefix("spec.jobTemplate"), prefix("spec.jobTemplate.spec.template"));
            let template = doc.pointer("/spec/jobTemplate/spec/template");
            let mut misplaced = misplaced(doc, path, template, &template_path);
            if let Some(job) = doc.pointer("/spec/jobTemplate") {
                misplaced.extend(super::annotations::misplaced(job, &job_path, template, &template_path));
            }
            let job = child(doc, &["spec", "jobTemplate"], &job_path)?;
            let disabled = disabled || is_disabled(job).map_err(|e| e.in_metadata(&format!("{job_path}.metadata")))?;
            let outcome =
                inject_template(disabled, child(job, &["spec", "template"], &template_path)?, cfg, &template_path)?;
            Ok(with_warnings(outcome, misplaced))
        }
        (_, k) if k.ends_with("List") && doc.get("items").is_some() => inject_items(doc, cfg, &prefix("items")),
        _ => Ok(Outcome::NotAWorkload),
    }
}

/// Adds `warnings` to an injected template's own (a template left out needs none).
fn with_warnings(outcome: Outcome, mut warnings: Vec<String>) -> Outcome {
    match outcome {
        Outcome::Injected { warnings: own } => {
            warnings.extend(own);
            Outcome::Injected { warnings }
        }
        other => other,
    }
}

/// Why `doc` is not a Kubernetes object — a mapping with a string `apiVersion` and `kind` —
/// or `None` if it is. Passing anything else through would let `inject -f x | kubectl apply`
/// succeed with workloads left uninjected (a JSON array of Deployments) or fail far from here.
fn not_an_object(doc: &Value) -> Option<String> {
    let what = match doc {
        Value::Object(_) => None,
        Value::Array(_) => Some("a sequence of documents (wrap them in `kind: List` as `items`)"),
        Value::String(_) => Some("a string"),
        Value::Number(_) => Some("a number"),
        Value::Bool(_) => Some("a boolean"),
        Value::Null => Some("null"),
    };
    if let Some(what) = what {
        return Some(format!("{what}, not a Kubernetes object (a mapping with apiVersion and kind)"));
    }
    let missing: Vec<&str> = ["apiVersion", "kind"]
        .into_iter()
        .filter(|key| doc.get(*key).and_then(Value::as_str).is_none_or(|v| v.trim().is_empty()))
        .collect();
    (!missing.is_empty()).then(|| format!("not a Kubernetes object: no {} (a non-empty string)", missing.join(" or ")))
}

fn inject_items(doc: &mut Value, cfg: &InjectConfig, path: &str) -> Result<Outcome, PodError> {
    let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) else {
        return match doc.get("items") {
            Some(Value::Null) => Ok(Outcome::List(Vec::new())),
            _ => Err(PodError::Malformed { field: path.to_string(), reason: "expected a list".into() }),
        };
    };
    let mut outcomes = Vec::with_capacity(items.len());
    for (i, item) in items.iter_mut().enumerate() {
        let field = format!("{path}[{i}]");
        if let Some(reason) = not_an_object(item) {
            return Err(PodError::Malformed { field, reason });
        }
        outcomes.push(inject_at(item, cfg, &field)?);
    }
    Ok(Outcome::List(outcomes))
}

/// The map at `keys` under `doc`, which a workload of this kind must have.
fn child<'a>(doc: &'a mut Value, keys: &[&str], path: &str) -> Result<&'a mut Value, PodError> {
    let mut at = doc;
    for key in keys {
        at = at.get_mut(*key).filter(|v| v.is_object()).ok_or_else(|| PodError::Malformed {
            field: path.to_string(),
            reason: "missing (a workload needs a pod template)".into(),
        })?;
    }
    Ok(at)
}

fn str_at<'a>(doc: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().try_fold(doc, |at, key| at.get(*key))?.as_str()
}

/// Reads every document of `input`: JSON if it starts with `{` or `[` (one or more values,
/// as `kubectl get -o json` prints), YAML otherwise. Empty documents are dropped.
pub fn parse_manifests(input: &str) -> Result<Vec<Value>, InjectError> {
    let input = input.strip_prefix('\u{feff}').unwrap_or(input);
    if input.trim_start().starts_with(['{', '[']) {
        return parse_json(input);
    }
    let mut options = YAML_LIMITS.options();
    // Kubernetes reads manifests as YAML 1.1: `0644` is octal (a file mode).
    options.legacy_octal_numbers = true;
    options.ignore_binary_tag_for_string = true;
    serde_saphyr::from_multiple_with_options::<Value>(input, options).map_err(|e| {
        let line = e.location().map(|l| l.line()).filter(|l| *l > 0);
        let message = trellis_policy::yaml::message(&e, &YAML_LIMITS);
        InjectError::Yaml { document: document_at(input, line.unwrap_or(1)), line, message }
    })
}

/// What a manifest stream may hold. Far above real output (`kubectl get pods -A -o yaml` of
/// a 30,000-pod cluster, a large `helm template`): only there to bound a hostile input's
/// memory and stack. serde-saphyr's defaults (250,000 values, 1,024 documents) refused a
/// 3,000-pod List that the same tool reads as JSON.
const YAML_LIMITS: trellis_policy::yaml::Limits = trellis_policy::yaml::Limits {
    nodes: 8_000_000,
    // serde-saphyr's default: reading nests a stack frame per level, and 128 levels
    // overflowed the 2 MiB stack of a test thread in a debug build. Real manifests, CRD
    // schemas included, stay far below.
    depth: 64,
    documents: 100_000,
    aliases: 50_000,
    scalar_bytes: 256 << 20,
    alias_replay_events: 1_000_000,
    alias_nesting: 64,
};

fn parse_json(input: &str) -> Result<Vec<Value>, InjectError> {
    serde_json::Deserializer::from_str(input)
        .into_iter::<Value>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| InjectError::Json { line: e.line(), column: e.column(), message: e.to_string() })
}

/// The 1-based index of the document holding `line`: the `---` markers before it, not
/// counting one that opens the stream before any content.
fn document_at(input: &str, line: u64) -> usize {
    let mut document = 1;
    let mut seen_content = false;
    for text in input.lines().take(usize::try_from(line.saturating_sub(1)).unwrap_or(usize::MAX)) {
        let is_marker = text == "---" || text.starts_with("--- ") || text.starts_with("---\t");
        if is_marker {
            if seen_content {
                document += 1;
            }
            seen_content = true;
        } else if !text.trim().is_empty() && !text.trim_start().starts_with('#') && !text.starts_with('%') {
            seen_content = true;
        }
    }
    document
}

/// Writes `docs` as YAML documents separated by `---`.
pub fn to_yaml(docs: &[Value]) -> Result<String, InjectError> {
    serde_saphyr::to_string_multiple(docs).map_err(|e| InjectError::Serialize(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_index_counts_separators_not_a_leading_one() {
        let text = "---\na: 1\n---\nb: 2\n---\n# c\nc: 3\n";
        assert_eq!(document_at(text, 2), 1);
        assert_eq!(document_at(text, 4), 2);
        assert_eq!(document_at(text, 7), 3);
        assert_eq!(document_at("a: 1\n---\nb: [\n", 3), 2);
    }

    #[test]
    fn yaml_errors_name_the_document_and_line() {
        let err = parse_manifests("a: 1\n---\nkind: Pod\nmetadata:\n  name: [x\n  y: 2\n").unwrap_err();
        match err {
            InjectError::Yaml { document, line, .. } => {
                assert_eq!(document, 2);
                assert!(line.is_some());
            }
            other => panic!("{other:?}"),
        }
    }

    /// `kubectl get pods -A -o yaml` of a large cluster: one List of thousands of pods
    /// (serde-saphyr's default of 250,000 values refused 3,000 pods), and more documents than its 1,024.
    #[test]
    fn large_real_outputs_are_read_and_limits_are_named() {
        let pod = "- apiVersion: v1\n  kind: Pod\n  metadata: {name: p, labels: {a: b, c: d}}\n  spec:\n    containers:\n    - {name: app, image: nginx, ports: [{containerPort: 80}], env: [{name: A, value: b}]}\n";
        let list = format!("apiVersion: v1\nkind: List\nitems:\n{}", pod.repeat(8_000));
        let docs = parse_manifests(&list).unwrap();
        assert_eq!(docs[0]["items"].as_array().unwrap().len(), 8_000);
        let many = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n".repeat(2_000);
        assert_eq!(parse_manifests(&many).unwrap().len(), 2_000);

        let too_deep = format!("a: {}1{}\n", "[".repeat(65), "]".repeat(65));
        let err = parse_manifests(&too_deep).unwrap_err().to_string();
        assert!(err.starts_with("document 1: YAML not read: nested deeper than 64 levels (the limit)"), "{err}");
        let err = parse_manifests("a: 1\na: 2\n").unwrap_err().to_string();
        assert_eq!(err, "document 1: YAML not read: duplicate mapping key: a at line 2, column 1");
    }

    #[test]
    fn octal_modes_are_read_as_kubernetes_reads_them() {
        let docs = parse_manifests("mode: 0644\nquoted: \"0644\"\n").unwrap();
        assert_eq!(docs[0]["mode"], 420);
        assert_eq!(docs[0]["quoted"], "0644");
    }
}
