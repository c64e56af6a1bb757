//! Limits on what the policy engine accepts, so that no input (a typo, a generated file, a
//! hostile document) can make it panic, run for minutes or exhaust memory. Every limit is
//! enforced with an error naming it.
//!
//! What the limits buy, measured on the project's reference machine (2 cores) in a release
//! build (`docs/policy.md` has the table): a 10 MB file of 100,000 rules parses and validates
//! in 1.3 s (YAML) or 0.2 s (JSON) with under 200 MB at peak; the worst input within the
//! limits is refused in under 2.5 s with under about 300 MB; [`MAX_RULES`] rules compile in
//! well under a second.

/// Largest policy file (or JSON body) read: 16 MiB, the control plane's limit on a policy
/// apply body, so a file `trellis policy validate` accepts can also be applied.
pub const MAX_INPUT_BYTES: usize = 16 * 1024 * 1024;

/// Most values (scalars, lists and maps) in one input. A 100,000-rule file needs 1.2 to 2 million.
pub const MAX_NODES: usize = 4_000_000;

/// Deepest nesting of lists and maps in YAML (a policy needs 8).
pub const MAX_DEPTH: usize = 64;

/// Deepest nesting of lists and maps in JSON: serde_json's fixed recursion limit (it refuses
/// the 128th level).
pub const MAX_JSON_DEPTH: usize = 127;

/// Most YAML anchors and aliases in one input: aliases can make a small file expand into a
/// huge tree ("billion laughs"); policies rarely need any.
pub const MAX_ALIASES: usize = 1_000;

/// Most policy documents in one input.
pub const MAX_DOCUMENTS: usize = 10_000;

/// Most rules in one input, and in one snapshot.
pub const MAX_RULES: usize = 200_000;

/// Most `from` and `to` entries (all rules together) in one snapshot.
pub const MAX_ENTRIES: usize = 1_000_000;

/// Errors kept in a [`crate::ValidationErrors`]; the rest are only counted.
pub const MAX_REPORTED_ERRORS: usize = 1_000;

/// Longest HTTP method a rule may name, and the longest the sidecars' protocol detection
/// reads as the start of an HTTP/1 request: a rule for a longer one could never match.
pub const MAX_METHOD_LEN: usize = 32;

/// Longest `metadata.name` (a DNS-1123 subdomain).
pub const MAX_NAME_LEN: usize = 253;

/// Longest `metadata.namespace` (a DNS-1123 label).
pub const MAX_NAMESPACE_LEN: usize = 63;

pub(crate) const NAME_RULE: &str = "names are 1-253 lowercase letters, digits, '-' and '.', \
     starting and ending with a letter or digit, with a letter or digit on each side of every '.'";

pub(crate) const NAMESPACE_RULE: &str = "namespaces are 1-63 lowercase letters, digits and '-', \
     starting and ending with a letter or digit (a DNS-1123 label, as Kubernetes namespaces are)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_limit_is_the_control_planes_apply_body_limit() {
        // control/src/server/mod.rs: MAX_POLICY_BODY = 16 * 1024 * 1024. A file larger than
        // that would validate but could never be applied (413).
        assert_eq!(MAX_INPUT_BYTES, 16_777_216);
    }
}
