//! The validator's toolbox: field paths that cost nothing until an error is printed, and a
//! [`Checker`] that reads typed values out of a [`Value`] tree while recording every problem.
//!
//! Each `Checker` method returns `Option<T>`: `Some` when the value is good, `None` after
//! recording why not. Callers validate all siblings before combining them, so one bad field
//! never hides another.

use std::fmt;

use crate::error::{ValidationError, ValidationErrors};
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
            Seg::Key(k) if matches!(self.parent.map(|p| p.seg), None | Some(Seg::Root)) => f.write_str(k),
            Seg::Key(k) => write!(f, ".{k}"),
            Seg::Index(i) => write!(f, "[{i}]"),
        }
    }
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
            message: message.to_string(),
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
