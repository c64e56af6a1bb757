//! Errors of reading policy files ([`ValidationErrors`]) and of building a snapshot
//! ([`CompileError`]).
//!
//! Validation collects every problem in a file before giving up, so each error says which
//! document, which field, and what is wrong; the CLI prints them one per line.

use std::borrow::Cow;
use std::fmt;

use crate::limits;

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// The document's `metadata.name` when it could be read, else `#N` (N counts the policy
    /// documents of the file from 1, items of a `kind: List` and of a JSON array included);
    /// empty for problems with the file as a whole (syntax, size).
    pub document: String,
    /// The field path inside the document, like `spec.rules[1].from[0].ipBlock`; empty when
    /// the problem is the document itself.
    pub path: String,
    pub message: String,
}

impl ValidationError {
    /// A problem with the whole input rather than one document.
    pub(crate) fn input(message: impl Into<String>) -> Self {
        let message = message.into();
        let message = escape_unprintable(&message).into_owned();
        ValidationError { document: String::new(), path: String::new(), message }
    }
}

/// `s` with every character that `{:?}` would escape for being unprintable (control
/// characters, line and paragraph separators, bidirectional and other format characters)
/// replaced by its escape (`\u{1b}`, `\n`); quotes and backslashes are kept. Messages quote
/// user values with `{:?}` already; this is the last line of defence, so that no text from a
/// policy file can move the cursor, recolor or fake lines in a terminal or CI log.
pub fn escape_unprintable(s: &str) -> Cow<'_, str> {
    let unprintable = |c: char| !matches!(c, '"' | '\'' | '\\') && c.escape_debug().nth(1).is_some();
    if !s.chars().any(unprintable) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unprintable(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document.is_empty() {
            f.write_str("input: ")?;
        } else if self.document.starts_with('#') {
            write!(f, "document {}: ", self.document)?;
        } else {
            write!(f, "document {:?}: ", self.document)?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a policy file (at most [`limits::MAX_REPORTED_ERRORS`] are kept;
/// the rest are counted). A file with any error is refused whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationErrors {
    errors: Vec<ValidationError>,
    omitted: usize,
}

impl ValidationErrors {
    pub(crate) fn push(&mut self, e: ValidationError) {
        if self.errors.len() < limits::MAX_REPORTED_ERRORS {
            self.errors.push(e);
        } else {
            self.omitted += 1;
        }
    }

    pub(crate) fn one(e: ValidationError) -> Self {
        let mut all = Self::default();
        all.push(e);
        all
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// How many errors were found, including the ones not kept.
    pub fn len(&self) -> usize {
        self.errors.len() + self.omitted
    }

    pub fn errors(&self) -> &[ValidationError] {
        &self.errors
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ValidationError> {
        self.errors.iter()
    }

    /// Errors found beyond [`limits::MAX_REPORTED_ERRORS`], counted but not kept.
    pub fn omitted(&self) -> usize {
        self.omitted
    }
}

impl<'a> IntoIterator for &'a ValidationErrors {
    type Item = &'a ValidationError;
    type IntoIter = std::slice::Iter<'a, ValidationError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        if self.omitted > 0 {
            write!(f, "\n... and {} more errors", self.omitted)?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// Why a set of policies could not be compiled into a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("two policies are named {0:?}; policy names must be unique")]
    DuplicateName(String),
    #[error("invalid policy name {0:?}: {msg}", msg = limits::NAME_RULE)]
    InvalidName(String),
    #[error("{count} rules in all; the limit is {max}", max = limits::MAX_RULES)]
    TooManyRules { count: usize },
    #[error("{count} from/to entries in all; the limit is {max}", max = limits::MAX_ENTRIES)]
    TooManyEntries { count: usize },
}
