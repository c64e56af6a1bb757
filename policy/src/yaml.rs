//! Reading YAML within limits, and its errors in words a user acts on. Used where Trellis
//! reads YAML a user wrote: policy files (`parse.rs`) and the manifests `trellis inject` reads
//! (the control crate; the webhook's AdmissionReviews are JSON). Pure: text in, values or a
//! message out.
//!
//! serde-saphyr guards against hostile input with a budget (values, nesting, documents,
//! aliases) and names a breach in its own debug text (`budget breached: Nodes { nodes:
//! 250001 }`), and some messages carry advice for the programmer (`set DuplicateKeyPolicy
//! in Options`). [`message`] says instead which limit was reached and what it is.

use std::borrow::Cow;

/// The limits one reader applies. Each is a ceiling on honest input, set per use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Values (scalars, sequences, mappings), all documents together.
    pub nodes: usize,
    pub depth: usize,
    pub documents: usize,
    /// Anchors, and aliases, each.
    pub aliases: usize,
    /// Bytes of scalar text, all documents together.
    pub scalar_bytes: usize,
    /// Each event of an alias replayed, all aliases together (the "billion laughs" cap).
    pub alias_replay_events: usize,
    /// Aliases nested in aliases.
    pub alias_nesting: usize,
}

impl Limits {
    /// Parser events: each node is at most a start and an end event; documents add two each.
    pub const fn events(&self) -> usize {
        2 * self.nodes + 2 * self.documents + 2
    }

    /// serde-saphyr options enforcing these limits (callers add their own reading rules).
    pub fn options(&self) -> serde_saphyr::Options {
        serde_saphyr::options! {
            budget: serde_saphyr::budget! {
                max_nodes: self.nodes,
                max_events: self.events(),
                max_depth: self.depth,
                max_documents: self.documents,
                max_aliases: self.aliases,
                max_anchors: self.aliases,
                max_total_scalar_bytes: self.scalar_bytes,
            },
            alias_limits: serde_saphyr::alias_limits! {
                max_total_replayed_events: self.alias_replay_events,
                max_replay_stack_depth: self.alias_nesting,
            },
            with_snippet: false,
        }
    }
}

/// serde-saphyr's message (with its line and column), less its advice to the programmer, and
/// with a reached limit named in plain words with its value (`nested deeper than 64 levels
/// (the limit)`).
pub fn message(e: &serde_saphyr::Error, limits: &Limits) -> String {
    e.render_with_formatter(&PlainWords(limits)).replace(", set DuplicateKeyPolicy in Options if acceptable", "")
}

struct PlainWords<'l>(&'l Limits);

impl serde_saphyr::MessageFormatter for PlainWords<'_> {
    fn format_message<'a>(&self, err: &'a serde_saphyr::Error) -> Cow<'a, str> {
        use serde_saphyr::Error;
        use serde_saphyr::budget::BudgetBreach as B;
        let l = self.0;
        let message = match err {
            Error::Budget { breach, .. } => match breach {
                B::Depth { .. } => format!("nested deeper than {} levels (the limit)", l.depth),
                B::Nodes { .. } => format!("more than {} values (the limit)", l.nodes),
                B::Events { .. } => format!("more than {} YAML events (the limit; about two per value)", l.events()),
                B::Documents { .. } => format!("more than {} documents (the limit)", l.documents),
                B::Anchors { .. } => format!("more than {} anchors (the limit)", l.aliases),
                B::Aliases { .. } => format!("more than {} aliases (the limit)", l.aliases),
                B::ScalarBytes { .. } => format!("more than {} bytes of scalar text (the limit)", l.scalar_bytes),
                B::AliasAnchorRatio { aliases, anchors } => format!(
                    "{aliases} aliases of {anchors} anchors: more than 10 uses per anchor, as in an alias bomb (the limit)"
                ),
                B::MergeKeys { .. } => "more than 10000 merge keys (`<<`) (the limit)".to_owned(),
                B::RecordedAnchorEvents { .. } => {
                    "anchors hold more than 1000000 events (the limit; aliases of aliases multiply them)".to_owned()
                }
                _ => "the YAML is too large or too complex (a parser limit was reached)".to_owned(),
            },
            Error::AliasReplayLimitExceeded { max_total_replayed_events, .. } => {
                format!("aliases expand to more than {max_total_replayed_events} events (the limit)")
            }
            Error::AliasReplayStackDepthExceeded { max_depth, .. } => {
                format!("aliases nested more than {max_depth} levels deep (the limit)")
            }
            Error::AliasExpansionLimitExceeded { max_expansions_per_anchor, .. } => {
                format!("an anchor is used more than {max_expansions_per_anchor} times (the limit)")
            }
            Error::RecursiveReferencesRequireWeakTypes { .. } => "an alias refers to its own anchor (recursion)".into(),
            Error::NonFiniteFloat { value, .. } => {
                format!("`{value}` is not a finite number (quote it if it is meant as a string)")
            }
            _ => {
                let default = serde_saphyr::DefaultMessageFormatter.format_message(err);
                // The parser's own guard against deep flow collections (`a: [[[[…`) fires
                // before the depth budget counts them: to the user it is the same limit.
                if !default.starts_with("recursion limit exceeded") {
                    return default;
                }
                format!("nested deeper than {} levels (the limit)", l.depth)
            }
        };
        Cow::Owned(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_saphyr::budget::BudgetBreach as B;
    use serde_saphyr::{Error, Location};

    const L: Limits = Limits {
        nodes: 100,
        depth: 8,
        documents: 3,
        aliases: 5,
        scalar_bytes: 1000,
        alias_replay_events: 50,
        alias_nesting: 4,
    };

    fn read(text: &str) -> Result<Vec<serde_json::Value>, String> {
        serde_saphyr::from_multiple_with_options(text, L.options()).map_err(|e| message(&e, &L))
    }

    #[test]
    fn every_budget_breach_reads_as_its_limit() {
        let cases = [
            (B::Depth { depth: 9 }, "nested deeper than 8 levels (the limit)"),
            (B::Nodes { nodes: 101 }, "more than 100 values (the limit)"),
            (B::Events { events: 209 }, "more than 208 YAML events (the limit; about two per value)"),
            (B::Documents { documents: 4 }, "more than 3 documents (the limit)"),
            (B::Anchors { anchors: 6 }, "more than 5 anchors (the limit)"),
            (B::Aliases { aliases: 6 }, "more than 5 aliases (the limit)"),
            (B::ScalarBytes { total_scalar_bytes: 1001 }, "more than 1000 bytes of scalar text (the limit)"),
            (
                B::RecordedAnchorEvents { recorded_anchor_events: 1_000_001 },
                "anchors hold more than 1000000 events (the limit; aliases of aliases multiply them)",
            ),
            (
                B::AliasAnchorRatio { aliases: 200, anchors: 2 },
                "200 aliases of 2 anchors: more than 10 uses per anchor, as in an alias bomb (the limit)",
            ),
            (B::SequenceUnbalanced, "the YAML is too large or too complex (a parser limit was reached)"),
        ];
        for (breach, want) in cases {
            assert_eq!(message(&Error::Budget { breach, location: Location::UNKNOWN }, &L), want);
        }
    }

    #[test]
    fn limits_apply_and_are_named() {
        assert_eq!(read("a: 1\n---\nb: 2\n").unwrap().len(), 2);
        let e = read("a: 1\n---\nb: 2\n---\nc: 3\n---\nd: 4\n").unwrap_err();
        assert!(e.starts_with("more than 3 documents (the limit) at line "), "{e}");
        let e = read(&format!("a: [{}]\n", vec!["1"; 120].join(", "))).unwrap_err();
        assert!(e.starts_with("more than 100 values (the limit) at line 1"), "{e}");
        let e = read(&format!("a: {}1{}\n", "[".repeat(9), "]".repeat(9))).unwrap_err();
        assert!(e.starts_with("nested deeper than 8 levels (the limit) at line 1"), "{e}");
    }

    #[test]
    fn programmer_advice_and_library_terms_stay_out() {
        let e = read("a: 1\na: 2\n").unwrap_err();
        assert!(e.starts_with("duplicate mapping key: a at line 2"), "{e}");
        assert!(!e.contains("DuplicateKeyPolicy"), "{e}");
        let e = read("a: .inf\n").unwrap_err();
        assert!(e.starts_with("`.inf` is not a finite number (quote it if it is meant as a string)"), "{e}");
        assert!(!e.contains("policy"), "{e}");
    }
}
