//! Reading a policy file: text → value trees → documents → validated [`Policy`] values.
//!
//! Flow: [`parse_documents`] checks the size limit, reads the text as JSON (when it starts
//! with `{` or `[`) or as a YAML stream (`---` separated), splits what it read into policy
//! documents (a JSON array, a YAML top-level list and a kubectl `kind: List` each hold several),
//! validates every document (`validate/`), then checks what spans documents: duplicate names
//! and the rule limit. Any error refuses the whole file.

use std::cell::Cell;

use serde::de::DeserializeSeed;

use crate::error::{ValidationError, ValidationErrors};
use crate::limits::{MAX_ALIASES, MAX_DEPTH, MAX_DOCUMENTS, MAX_INPUT_BYTES, MAX_NODES, MAX_RULES};
use crate::model::Policy;
use crate::tree::{Value, ValueSeed};
use crate::validate::{self, Checker, Path};

/// Reads every policy document in `text` (YAML or JSON), reporting all problems at once.
///
/// Text whose first non-blank character is `{` or `[` is read as JSON, anything else as YAML.
/// Accepted shapes: one or more YAML documents separated by `---`; a JSON object; a JSON
/// array (or YAML list) of documents; a kubectl `kind: List` whose `items` are documents.
/// Empty YAML documents are skipped. On any error nothing is returned: a file is accepted or
/// refused whole.
pub fn parse_documents(text: &str) -> Result<Vec<Policy>, ValidationErrors> {
    if text.len() > MAX_INPUT_BYTES {
        return Err(ValidationErrors::one(ValidationError::input(format!(
            "input is {} bytes; the limit is {MAX_INPUT_BYTES} bytes (32 MiB)",
            text.len()
        ))));
    }
    let roots = read_values(text).map_err(|m| ValidationErrors::one(ValidationError::input(m)))?;
    let mut errors = ValidationErrors::default();
    let docs = split_documents(&roots, &mut errors);
    if docs.len() > MAX_DOCUMENTS {
        return Err(ValidationErrors::one(ValidationError::input(format!(
            "{} policy documents; the limit is {MAX_DOCUMENTS}",
            docs.len()
        ))));
    }
    let mut policies = Vec::with_capacity(docs.len());
    for (i, doc) in docs.iter().enumerate() {
        if let Some(p) = validate::document(doc, i + 1, &mut errors) {
            policies.push(p);
        }
    }
    check_duplicate_names(&docs, &mut errors);
    check_rule_count(&policies, &mut errors);
    if errors.is_empty() { Ok(policies) } else { Err(errors) }
}

fn read_values(text: &str) -> Result<Vec<Value>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let start = text.trim_start();
    if start.is_empty() {
        return Ok(Vec::new());
    }
    // Text that starts like JSON is JSON: YAML would read many broken JSON files (a missing
    // value, a trailing comma) as something else, and hide the mistake.
    if start.starts_with(['{', '[']) {
        return read_json(text).map(|v| vec![v]).map_err(|e| format!("invalid JSON: {e}"));
    }
    read_yaml(text).map_err(|e| format!("invalid YAML: {}", yaml_message(&e)))
}

/// serde-saphyr's message, less its advice to the programmer.
fn yaml_message(e: &serde_saphyr::Error) -> String {
    e.to_string().replace(", set DuplicateKeyPolicy in Options if acceptable", "")
}

fn read_json(text: &str) -> Result<Value, serde_json::Error> {
    let nodes_left = Cell::new(MAX_NODES);
    let mut de = serde_json::Deserializer::from_str(text);
    let value = ValueSeed { nodes_left: Some(&nodes_left) }.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

fn read_yaml(text: &str) -> Result<Vec<Value>, serde_saphyr::Error> {
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_nodes: MAX_NODES,
            // Each node is at most a start and an end event; documents add two each.
            max_events: 2 * MAX_NODES + 2 * MAX_DOCUMENTS + 2,
            max_depth: MAX_DEPTH,
            max_documents: MAX_DOCUMENTS,
            max_aliases: MAX_ALIASES,
            max_anchors: MAX_ALIASES,
            max_total_scalar_bytes: MAX_INPUT_BYTES,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 100_000,
            max_replay_stack_depth: 16,
        },
        with_snippet: false,
    };
    serde_saphyr::from_multiple_with_options::<Value>(text, options)
}

/// Splits top-level values into policy documents: lists and `kind: List` are opened one level.
fn split_documents<'v>(roots: &'v [Value], errors: &mut ValidationErrors) -> Vec<&'v Value> {
    let mut docs = Vec::new();
    for root in roots {
        match root {
            Value::Seq(items) => docs.extend(items),
            Value::Map(_) if root.get("kind").and_then(Value::as_str) == Some("List") => {
                let label = format!("#{}", docs.len() + 1);
                docs.extend(list_items(root, label, errors));
            }
            other => docs.push(other),
        }
    }
    docs
}

/// The `items` of a kubectl `kind: List` (any `apiVersion`, as kubectl writes `v1`).
fn list_items<'v>(list: &'v Value, label: String, errors: &mut ValidationErrors) -> &'v [Value] {
    let mut c = Checker::new(label, errors);
    let root = Path::root();
    let keys = ["apiVersion", "kind", "metadata", "items"];
    let Some([_, _, _, items]) = c.object(list, &root, keys, |_| None) else {
        return &[];
    };
    let path = root.key("items");
    match items {
        None => {
            c.error(&path, "required field is missing (a List holds its documents in `items`)");
            &[]
        }
        Some(v) => c.seq(v, &path).unwrap_or(&[]),
    }
}

/// Names must be unique within a file: decisions name the policy that made them.
fn check_duplicate_names(docs: &[&Value], errors: &mut ValidationErrors) {
    let mut first_seen = std::collections::HashMap::new();
    for (i, doc) in docs.iter().enumerate() {
        let Some(name) = validate::readable_name(doc) else {
            continue;
        };
        if let Some(first) = first_seen.insert(name, i + 1) {
            first_seen.insert(name, first);
            errors.push(ValidationError {
                document: name.to_owned(),
                path: "metadata.name".to_owned(),
                message: format!(
                    "duplicate policy name {name:?} (documents #{first} and #{}); names must be unique",
                    i + 1
                ),
            });
        }
    }
}

fn check_rule_count(policies: &[Policy], errors: &mut ValidationErrors) {
    let count: usize = policies.iter().map(Policy::rule_count).sum();
    if count > MAX_RULES {
        errors.push(ValidationError::input(format!("{count} rules in all; the limit is {MAX_RULES}")));
    }
}
