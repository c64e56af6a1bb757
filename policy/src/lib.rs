//! `trellis-policy`: the one place that decides whether a flow is allowed, and says why.
//!
//! Pure code: no I/O, no async runtime. The proxy evaluates every connection and HTTP request
//! with it, the control plane validates and stores documents with it, and `trellis policy
//! check` lets a user run it offline (in CI) before applying policies.
//!
//! # Flow
//!
//! 1. [`parse_documents`] reads a YAML or JSON file into validated [`Policy`] values, or
//!    returns every problem at once ([`ValidationErrors`]: document, field path, message).
//! 2. [`PolicySnapshot::compile`] indexes a set of policies into an immutable, versioned
//!    snapshot (`Send + Sync`, made to sit in an `ArcSwap`).
//! 3. [`PolicySnapshot::evaluate`] (flows into a mesh workload) and
//!    [`PolicySnapshot::evaluate_egress`] (connections to addresses outside the mesh) return a
//!    [`Decision`]: the action, its [`Reason`], and what audit-mode policies would have done.
//!
//! # Documents
//!
//! ```yaml
//! apiVersion: trellis.dev/v1alpha1
//! kind: AuthorizationPolicy            # or EgressPolicy
//! metadata:
//!   name: api-from-web                 # required, unique in a file and in a snapshot
//! spec:
//!   selector: spiffe://cluster.local/ns/shop/sa/api
//!   action: ALLOW                      # ALLOW (default) | DENY
//!   mode: enforce                      # enforce (default) | audit
//!   rules:
//!     - from:
//!         - identity: spiffe://cluster.local/ns/shop/sa/web
//!         - namespace: monitoring
//!         - ipBlock: 10.0.0.0/8
//!           except: [10.1.0.0/16]
//!       to:
//!         - ports: [8080, "9000-9100"]
//!           methods: [GET, HEAD]
//!           paths: ["/api/*", "/healthz"]
//! ```
//!
//! Unknown fields, kinds and `apiVersion`s are errors. An EgressPolicy has the same `spec`
//! fields, but its `selector` picks the *sources*, its rules have only `to`, and its `to`
//! entries take only `ipBlock` (with `except`) and `ports`. See `docs/policy.md` for every
//! field and error.
//!
//! # Matching
//!
//! - **Patterns** (`selector`, `from[].identity`): an exact SPIFFE ID; a prefix ending in `/*`,
//!   which matches IDs strictly below it on a segment boundary (`spiffe://td/ns/shop/*` matches
//!   `spiffe://td/ns/shop/sa/x`, not `spiffe://td/ns/shop` nor `spiffe://td/ns/shopping/sa/x`);
//!   or `*`, every workload (for `identity`: every *authenticated* source).
//! - `from[].namespace: X` matches any identity strictly below
//!   `spiffe://<destination's trust domain>/ns/X`.
//! - `from[].ipBlock` matches the peer's IP (IPv4-mapped IPv6 peers are read as IPv4), minus
//!   its `except` blocks.
//! - `to[].ports`: single ports and inclusive ranges. `to[].methods`: HTTP method tokens,
//!   matched case-sensitively (`GET` does not match `get`). `to[].paths`: exact, or a prefix
//!   ending in `*` (`/api/*` matches `/api/` and `/api/x/y` but not `/api` nor `/apix`;
//!   `/api*` matches `/api` and `/apix`), matched against the normalized path.
//! - **Composition**: OR across rules, across `from` entries and across `to` entries; AND of
//!   the fields within an entry and of `from` and `to` within a rule. An omitted `from` means
//!   any source (unauthenticated included); an omitted `to` means any port, method and path; a
//!   rule with neither matches every flow; a policy with no rules matches nothing.
//! - An **unauthenticated** source (no SPIFFE ID) never matches `identity` or `namespace`
//!   conditions, but can match `ipBlock`.
//! - **HTTP conditions on a non-HTTP flow** (a connection, opaque TCP): an ALLOW entry with
//!   `methods` or `paths` does not match; a DENY entry with them does (fail safe). The rest of
//!   the entry (`ports`) must still match.
//!
//! # Decision
//!
//! For a flow into a mesh workload, among the AuthorizationPolicies whose selector matches the
//! destination (for egress: EgressPolicies whose selector matches the source):
//!
//! 1. if the flow is an HTTP request whose path fails [`normalize_path`] → **deny**, reason
//!    "invalid path", whatever the policies say;
//! 2. any enforced DENY rule matches → **deny**;
//! 3. any enforced ALLOW rule matches → **allow**;
//! 4. otherwise the default ([`Defaults`]: deny for mesh flows unless the operator sets allow;
//!    deny for egress).
//!
//! When several rules match, the reason names the first in (policy name ascending, rule index
//! ascending) order among the rules of the winning action.
//!
//! # Audit mode
//!
//! Audit-mode policies never change the decision. When at least one audit-mode policy selects
//! the flow (its destination; for egress, its source), [`Decision::audit`] holds the outcome
//! the flow *would* get at the end of a rollout: with the audit-mode policies enforced
//! alongside the enforced ones, and the default deny (same order: DENY, then ALLOW, then
//! deny). Telemetry labels a flow `audit-deny` ([`Decision::label`]) when it is allowed now but
//! its audit outcome is deny.
//!
//! This is how a security engineer moves a workload to default deny: while the mesh default is
//! still allow (onboarding), apply its ALLOW policies with `mode: audit`; every flow they would
//! not allow shows up as `audit-deny` (allowed now by the default, denied later); fix the
//! policies until none is left, switch them to `enforce`, then set the default to deny. In a
//! default-deny mesh the audit outcome is simply "these audit policies enforced too".
//!
//! # Paths
//!
//! [`normalize_path`] strips the query, decodes escapes of unreserved characters, merges
//! repeated slashes and removes dot segments (RFC 3986 §5.2.4), and refuses ambiguous paths
//! (encoded `/` or `\`, raw `\`, NUL, control characters, non-ASCII bytes, bad escapes, `#`,
//! space, and `.`/`..` segments with `;` parameters such as `..;`). So `/api/../admin` is
//! matched (and forwarded) as `/admin` and can never slip through an `/api/*` rule. DENY path
//! rules also match the path with its `;` parameters removed, as Java servers read it, so
//! `/admin;x` cannot slip past a DENY on `/admin`.
//!
//! # Limits
//!
//! See [`limits`]: 16 MiB of input, 10,000 documents, 200,000 rules, 1,000,000 entries,
//! 4,000,000 values, nesting depth 64, 1,000 YAML aliases; over a limit is an error, never a
//! panic.

pub mod limits;
pub mod reference;
pub mod yaml;

mod decision;
mod error;
mod index;
mod model;
mod parse;
mod path;
mod pattern;
mod snapshot;
mod tree;
mod validate;

pub use decision::{AuditOutcome, Decision, Defaults, EgressFlow, Flow, HttpRequest, Reason, RequestError};
pub use error::{CompileError, ValidationError, ValidationErrors, escape_unprintable};
pub use model::{
    API_VERSION, Action, AuthorizationPolicy, AuthorizationRule, AuthorizationSpec, Destination, EgressPolicy,
    EgressRule, EgressSpec, Metadata, Mode, Operation, Policy, PolicyKind, Source,
};
pub use parse::parse_documents;
pub use path::{PathError, normalize_path};
pub use pattern::{
    IpBlock, Method, PathPattern, PatternError, PortRange, SpiffePattern, canonical_ip, is_tchar, parse_cidr,
};
pub use snapshot::PolicySnapshot;
pub use trellis_identity::SpiffeId;
pub use validate::check_name;
