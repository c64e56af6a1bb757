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
use crate::limits::{MAX_ALIASES, MAX_DEPTH, MAX_DOCUMENTS, MAX_INPUT_BYTES, MAX_JSON_DEPTH, MAX_NODES, MAX_RULES};
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
            "input is {} bytes; the limit is {MAX_INPUT_BYTES} bytes ({} MiB)",
            text.len(),
            MAX_INPUT_BYTES >> 20
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
        return read_json(text).map(|v| vec![v]).map_err(|e| format!("invalid JSON: {}", json_message(&e)));
    }
    read_yaml(text).map_err(|e| format!("invalid YAML: {}", yaml_message(&e)))
}

/// serde-saphyr's message in plain words ([`crate::yaml::message`]).
fn yaml_message(e: &serde_saphyr::Error) -> String {
    crate::yaml::message(e, &YAML_LIMITS)
}

/// Each event of a YAML alias replayed, all aliases together (the "billion laughs" cap).
const MAX_ALIAS_REPLAY_EVENTS: usize = 100_000;
/// Aliases nested in aliases.
const MAX_ALIAS_NESTING: usize = 16;

const YAML_LIMITS: crate::yaml::Limits = crate::yaml::Limits {
    nodes: MAX_NODES,
    depth: MAX_DEPTH,
    documents: MAX_DOCUMENTS,
    aliases: MAX_ALIASES,
    scalar_bytes: MAX_INPUT_BYTES,
    alias_replay_events: MAX_ALIAS_REPLAY_EVENTS,
    alias_nesting: MAX_ALIAS_NESTING,
};
/// Parser events: about two per value.
#[cfg(test)]
const MAX_EVENTS: usize = YAML_LIMITS.events();

/// serde_json's message (with its line and column), its nesting limit named in plain words.
fn json_message(e: &serde_json::Error) -> String {
    let message = e.to_string();
    match message.strip_prefix("recursion limit exceeded") {
        Some(rest) => format!("nested deeper than {MAX_JSON_DEPTH} levels (the limit){rest}"),
        None => message,
    }
}

fn read_json(text: &str) -> Result<Value, serde_json::Error> {
    let nodes_left = Cell::new(MAX_NODES);
    let mut de = serde_json::Deserializer::from_str(text);
    let value = ValueSeed { nodes_left: Some(&nodes_left) }.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

fn read_yaml(text: &str) -> Result<Vec<Value>, serde_saphyr::Error> {
    serde_saphyr::from_multiple_with_options::<Value>(text, YAML_LIMITS.options())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn input_error(text: &str) -> String {
        match parse_documents(text) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => {
                assert_eq!(e.len(), 1, "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn yaml_limits_are_named_in_plain_words() {
        // Far deeper, the parser's own recursion guard fires first: the same words.
        let deep = format!("a: {}1{}\n", "[".repeat(1000), "]".repeat(1000));
        let e = input_error(&deep);
        assert!(e.starts_with("input: invalid YAML: nested deeper than 64 levels (the limit)"), "{e}");
        let nested = format!("a: {}1{}\n", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let e = input_error(&nested);
        assert!(e.starts_with("input: invalid YAML: nested deeper than 64 levels (the limit) at line 1"), "{e}");

        let e = input_error(&"a: 1\n---\n".repeat(MAX_DOCUMENTS + 1));
        assert!(e.starts_with("input: invalid YAML: more than 10000 documents (the limit) at line "), "{e}");

        let anchors: String = (0..=MAX_ALIASES).map(|i| format!("k{i}: &a{i} x\n")).collect();
        let e = input_error(&anchors);
        assert!(e.starts_with("input: invalid YAML: more than 1000 anchors (the limit) at line "), "{e}");

        let aliases = format!("k: &a x\nl: [{}]\n", vec!["*a"; MAX_ALIASES + 1].join(", "));
        let e = input_error(&aliases);
        assert!(e.starts_with("input: invalid YAML: more than 1000 aliases (the limit) at line "), "{e}");

        // 10 x 10 x ... : a few lines that expand to millions of values.
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            bomb.push_str(&format!("a{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 10].join(", ")));
        }
        let e = input_error(&bomb);
        assert!(
            e.starts_with("input: invalid YAML: aliases expand to more than 100000 events (the limit) at line "),
            "{e}"
        );

        for e in [nested, anchors, aliases, bomb].map(|t| input_error(&t)) {
            assert!(!e.contains("budget") && !e.contains('{') && !e.contains('_'), "{e}");
        }
    }

    #[test]
    fn every_budget_breach_reads_as_a_limit() {
        use serde_saphyr::budget::BudgetBreach as B;
        use serde_saphyr::{Error, Location};
        let cases = [
            (B::Depth { depth: 65 }, "nested deeper than 64 levels (the limit)"),
            (B::Nodes { nodes: MAX_NODES + 1 }, "more than 4000000 values (the limit)"),
            (B::Events { events: MAX_EVENTS + 1 }, "more than 8020002 YAML events (the limit; about two per value)"),
            (B::Documents { documents: 10_001 }, "more than 10000 documents (the limit)"),
            (B::Anchors { anchors: 1_001 }, "more than 1000 anchors (the limit)"),
            (B::Aliases { aliases: 1_001 }, "more than 1000 aliases (the limit)"),
            (
                B::ScalarBytes { total_scalar_bytes: MAX_INPUT_BYTES + 1 },
                "more than 16777216 bytes of scalar text (the limit)",
            ),
            (B::SequenceUnbalanced, "the YAML is too large or too complex (a parser limit was reached)"),
        ];
        for (breach, want) in cases {
            let e = Error::Budget { breach, location: Location::UNKNOWN };
            assert_eq!(yaml_message(&e), want);
        }
        let e = Error::AliasReplayStackDepthExceeded {
            depth: 17,
            max_depth: MAX_ALIAS_NESTING,
            location: Location::UNKNOWN,
        };
        assert_eq!(yaml_message(&e), "aliases nested more than 16 levels deep (the limit)");
    }

    #[test]
    fn syntax_errors_keep_their_line_and_column() {
        let e = input_error("a: 1\nb: [1, 2\n");
        assert!(e.starts_with("input: invalid YAML: "), "{e}");
        assert!(e.contains("line 3") || e.contains("line 2"), "{e}");
        let e = input_error("{\"a\": 1,}");
        assert!(e.starts_with("input: invalid JSON: ") && e.contains("trailing comma at line 1 column 9"), "{e}");
        let e = input_error(&format!("[{}[]]", "[],".repeat(MAX_NODES)));
        assert!(e.starts_with("input: invalid JSON: more than 4000000 values (the limit) at line 1"), "{e}");
    }
}
