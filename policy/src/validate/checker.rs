//! The validator's toolbox: field paths that cost nothing until an error is printed, and a
//! [`Checker`] that reads typed values out of a [`Value`] tree while recording every problem.
//!
//! Each `Checker` method returns `Option<T>`: `Some` when the value is good, `None` after
//! recording why not. Callers validate all siblings before combining them, so one bad field
//! never hides another.

use std::fmt;

use crate::error::{ValidationError, ValidationErrors, escape_unprintable};
use crate::tree::Value;

/// One step of a field path.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Root,
    Key(&'a str),
    Index(usize),
}

/// A field path as a chain of borrowed steps; rendered (`spec.rules[1].from[0]`) only when an
/// error needs it, so validating a large file does not allocate a path per field.
#[derive(Clone, Copy)]
pub(crate) struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    seg: Seg<'a>,
}

impl<'a> Path<'a> {
    pub(crate) fn root() -> Path<'static> {
        Path { parent: None, seg: Seg::Root }
    }

    pub(crate) fn key(&'a self, key: &'a str) -> Path<'a> {
        Path { parent: Some(self), seg: Seg::Key(key) }
    }

    pub(crate) fn index(&'a self, i: usize) -> Path<'a> {
        Path { parent: Some(self), seg: Seg::Index(i) }
    }
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(parent) = self.parent {
            parent.fmt(f)?;
        }
        match self.seg {
            Seg::Root => Ok(()),
            // A key from the file that is not a plain word (a control character, a '.', a
            // quote...) is written quoted and escaped, `["fo\u{1b}o"]`, so it can neither
            // forge terminal output nor read as another path.
            Seg::Key(k) if !is_plain_key(k) => write!(f, "[{k:?}]"),
            Seg::Key(k) if matches!(self.parent.map(|p| p.seg), None | Some(Seg::Root)) => f.write_str(k),
            Seg::Key(k) => write!(f, ".{k}"),
            Seg::Index(i) => write!(f, "[{i}]"),
        }
    }
}

/// Keys written bare in a path: ASCII letters, digits, '_' and '-'.
fn is_plain_key(k: &str) -> bool {
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Explains an unexpected key in a given place better than "unknown field" can.
pub(crate) type Hint = fn(&str) -> Option<&'static str>;

pub(crate) fn no_hint(_: &str) -> Option<&'static str> {
    None
}

/// Records problems for one document.
pub(crate) struct Checker<'e> {
    document: String,
    errors: &'e mut ValidationErrors,
}

impl<'e> Checker<'e> {
    pub(crate) fn new(document: String, errors: &'e mut ValidationErrors) -> Self {
        Checker { document, errors }
    }

    pub(crate) fn error(&mut self, path: &Path<'_>, message: impl fmt::Display) {
        self.errors.push(ValidationError {
            document: self.document.clone(),
            path: path.to_string(),
            message: escape_unprintable(&message.to_string()).into_owned(),
        });
    }

    /// Reads a map with exactly the keys in `allowed` (each optional), reporting unknown and
    /// repeated keys.
    pub(crate) fn object<'v, const N: usize>(
        &mut self,
        value: &'v Value,
        path: &Path<'_>,
        allowed: [&str; N],
        hint: Hint,
    ) -> Option<[Option<&'v Value>; N]> {
        let Value::Map(entries) = value else {
            self.error(path, format_args!("expected a map, found {}", value.type_name()));
            return None;
        };
        let mut slots = [None; N];
        for (key, v) in entries {
            let here = path.key(key);
            match allowed.iter().position(|a| a == key) {
                Some(i) if slots[i].is_some() => self.error(&here, "duplicate key"),
                Some(i) => slots[i] = Some(v),
                None => match hint(key) {
                    Some(h) => self.error(&here, h),
                    None => self.error(&here, unknown_field(key, &allowed)),
                },
            }
        }
        Some(slots)
    }

    pub(crate) fn required<'v>(&mut self, value: Option<&'v Value>, path: &Path<'_>) -> Option<&'v Value> {
        if value.is_none() {
            self.error(path, "required field is missing");
        }
        value
    }

    pub(crate) fn string<'v>(&mut self, value: &'v Value, path: &Path<'_>) -> Option<&'v str> {
        match value {
            Value::Str(s) => Some(s),
            other => {
                self.error(path, format_args!("expected a string, found {}", other.type_name()));
                None
            }
        }
    }

    /// A string parsed by `parse`, whose error becomes the message.
    pub(crate) fn parsed<T, E: fmt::Display>(
        &mut self,
        value: &Value,
        path: &Path<'_>,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        let s = self.string(value, path)?;
        match parse(s) {
            Ok(v) => Some(v),
            Err(e) => {
                self.error(path, e);
                None
            }
        }
    }

    pub(crate) fn seq<'v>(&mut self, value: &'v Value, path: &Path<'_>) -> Option<&'v [Value]> {
        match value {
            Value::Seq(items) => Some(items),
            other => {
                self.error(path, format_args!("expected a list, found {}", other.type_name()));
                None
            }
        }
    }

    /// Checks every item with `f` (all of them, even after a failure); `Some` if all passed.
    pub(crate) fn each<T>(
        &mut self,
        items: &[Value],
        path: &Path<'_>,
        mut f: impl FnMut(&mut Self, &Value, &Path<'_>) -> Option<T>,
    ) -> Option<Vec<T>> {
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match f(self, item, &path.index(i)) {
                Some(v) => out.push(v),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// An optional list whose absence means "any": present, it must be a non-empty list, since
    /// an empty one would read as "any" while looking like "none".
    pub(crate) fn optional_list<T>(
        &mut self,
        value: Option<&Value>,
        path: &Path<'_>,
        absent_means: &str,
        f: impl FnMut(&mut Self, &Value, &Path<'_>) -> Option<T>,
    ) -> Option<Vec<T>> {
        let Some(value) = value else {
            return Some(Vec::new());
        };
        let items = self.seq(value, path)?;
        if items.is_empty() {
            self.error(path, format_args!("must not be an empty list; omit it to match {absent_means}"));
            return None;
        }
        self.each(items, path, f)
    }
}

fn unknown_field(key: &str, allowed: &[&str]) -> String {
    format!("unknown field {key:?} (expected one of: {})", allowed.join(", "))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::parse_documents;

    fn errors(text: &str) -> Vec<String> {
        parse_documents(text).unwrap_err().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn keys_that_are_not_plain_words_are_quoted_and_escaped_in_paths() {
        let root = Path::root();
        let spec = root.key("spec");
        assert_eq!(spec.key("selector").to_string(), "spec.selector");
        assert_eq!(spec.key("fo\u{1b}]o\n").to_string(), r#"spec["fo\u{1b}]o\n"]"#);
        assert_eq!(root.key("a b").to_string(), r#"["a b"]"#);
        assert_eq!(root.key("").to_string(), r#"[""]"#);
        let labels = root.key("metadata");
        let labels = labels.key("labels");
        assert_eq!(labels.key("app.kubernetes.io/name").to_string(), r#"metadata.labels["app.kubernetes.io/name"]"#);
        assert_eq!(labels.key("x\u{202e}\"]").to_string(), r#"metadata.labels["x\u{202e}\"]"]"#);
        let rules = spec.key("rules");
        let rule = rules.index(1);
        assert_eq!(rule.key("from").index(0).to_string(), "spec.rules[1].from[0]");
    }

    #[test]
    fn a_crafted_key_cannot_inject_terminal_escapes() {
        let text = "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n\
                    spec: {selector: \"*\", \"fo\\u001b]o\\n\": 1}\n";
        assert_eq!(
            errors(text),
            [
                r#"document "a": spec["fo\u{1b}]o\n"]: unknown field "fo\u{1b}]o\n" (expected one of: selector, action, mode, rules)"#
            ]
        );
        let text = "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                    metadata: {name: a, labels: {\"\\e[2J\\r\": 1}}\nspec: {selector: \"*\"}\n";
        assert_eq!(
            errors(text),
            [r#"document "a": metadata.labels["\u{1b}[2J\r"]: expected a string, found an integer"#]
        );
    }

    #[test]
    fn messages_are_escaped_as_a_last_line_of_defence() {
        let mut all = ValidationErrors::default();
        Checker::new("a".into(), &mut all).error(&Path::root().key("x"), "bad \u{1b}[31m\nvalue \"q\" \\ é");
        assert_eq!(all.errors()[0].message, r#"bad \u{1b}[31m\nvalue "q" \ é"#);
        assert_eq!(ValidationError::input("a\u{2028}b").message, r"a\u{2028}b");
    }

    proptest! {
        /// Whatever the key, an error line is one line of printable text.
        #[test]
        fn error_lines_are_printable_whatever_the_key(key in "\\PC{0,3}[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}\\u{200b}-\\u{200f}\\u{2028}-\\u{202e}\\u{2066}-\\u{2069}]\\PC{0,3}") {
            let json = serde_json::json!({
                "apiVersion": "trellis.dev/v1alpha1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": key.clone(), "labels": {key.clone(): 1}},
                "spec": {"selector": "*", key.clone(): [key.clone()], "rules": [{"from": [{"namespace": key.clone()}]}]},
            });
            for line in errors(&json.to_string()) {
                prop_assert!(!line.chars().any(|c| c.escape_debug().nth(1).is_some() && !matches!(c, '"' | '\'' | '\\')), "{line:?}");
            }
        }
    }
}
