//! `trellis policy validate|check`: test policy files offline (in CI, before applying them),
//! or check a flow against the live policies of a control plane (`check` without `-f`).
//! `apply`, `get`, `list` and `delete` talk to the control plane (`policy_remote.rs`).
//!
//! Only flags, file reading and printing live here; parsing, validation and decisions are
//! `trellis-policy`'s. Exit codes: 0 allow (or valid), 1 deny, 2 any error (bad file, bad
//! flag, unreachable control plane; clap's own usage errors also exit 2).

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::out::{Output, shown, structured};

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use trellis_policy::limits::MAX_INPUT_BYTES;
use trellis_policy::{
    Action, Decision, Defaults, EgressFlow, Flow, HttpRequest, Policy, PolicySnapshot, SpiffeId, ValidationErrors,
    parse_documents,
};

const EXIT_DENY: u8 = 1;

/// Names printed by `validate` before the list is cut short.
const MAX_LISTED_NAMES: usize = 20;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file: prints `ok: N policies (names)`, or every problem (exit 2).
    Validate(ValidateArgs),
    /// Print the decision a policy file (`-f`) or the live control plane gives one flow and
    /// why: exit 0 allow, 1 deny, 2 error.
    Check(CheckArgs),
    /// Apply a policy file to the control plane: created, configured or unchanged per policy.
    Apply(super::policy_remote::ApplyArgs),
    /// Print one stored policy (YAML, or JSON with `-o json`).
    Get(super::policy_remote::GetArgs),
    /// List stored policies and the current version.
    List(super::policy_remote::ListArgs),
    /// Delete one stored policy.
    Delete(super::policy_remote::DeleteArgs),
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub policies: PolicySourceArgs,
    /// The mesh's trust domain: also refuse selectors and `from` identities outside it, as
    /// `policy apply` does (they could never match). Without it, any trust domain passes.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", value_name = "TD")]
    pub trust_domain: Option<trellis_identity::TrustDomain>,
}

/// A policy file.
#[derive(Debug, Args)]
pub struct PolicySourceArgs {
    /// Policy file, YAML or JSON, several documents allowed; `-` reads standard input; a
    /// directory reads its *.yaml, *.yml and *.json files.
    #[arg(short = 'f', long = "file", value_name = "FILE", env = "TRELLIS_POLICY_FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Policy file (or directory) to check against offline; without it, the live control
    /// plane answers (`--control`, `--ca-bundle`, admin token). Its own variable, not
    /// `TRELLIS_POLICY_FILE`: exported for `validate` and `apply`, that would quietly turn
    /// every live check into an offline one.
    #[arg(short = 'f', long = "file", value_name = "FILE", env = "TRELLIS_CHECK_FILE")]
    pub file: Option<PathBuf>,

    #[command(flatten)]
    pub control: super::remote::AdminArgs,

    #[command(flatten)]
    pub flow: FlowArgs,

    /// Action for a mesh flow no rule matches. Egress (`--to-address`) always defaults to deny.
    #[arg(long, value_enum, default_value = "deny", env = "TRELLIS_DEFAULT_ACTION")]
    pub default: DefaultAction,

    /// `text`: the decision line, then an `audit:` line if audit-mode policies apply.
    /// `json`: the decision as one JSON object; `yaml`: the same fields as YAML.
    #[arg(short, long, value_enum, default_value = "text", env = "TRELLIS_OUTPUT")]
    pub output: Output,
}

/// The flow to decide: a mesh flow (`--to` and `--port`, plus `--method` and `--path` for an
/// HTTP request) or an egress connection (`--to-address`).
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("destination").required(true).args(["to", "to_address"])))]
pub struct FlowArgs {
    /// The source's SPIFFE ID; omitted, the source is unauthenticated. Required for egress.
    #[arg(long, value_name = "SPIFFE_ID", env = "TRELLIS_CHECK_FROM")]
    pub from: Option<SpiffeId>,

    /// The source's IP address (matched by `ipBlock` in `from`).
    #[arg(long, value_name = "IP", default_value = "127.0.0.1", env = "TRELLIS_CHECK_SOURCE_IP")]
    pub source_ip: IpAddr,

    /// The destination workload's SPIFFE ID (a mesh flow).
    #[arg(long, value_name = "SPIFFE_ID", requires = "port", env = "TRELLIS_CHECK_TO")]
    pub to: Option<SpiffeId>,

    /// The destination application's port.
    #[arg(long, value_name = "N", requires = "to", value_parser = clap::value_parser!(u16).range(1..),
          env = "TRELLIS_CHECK_PORT")]
    pub port: Option<u16>,

    /// HTTP method of the request (with `--path`); without both, the flow is a plain connection.
    #[arg(long, value_name = "M", requires_all = ["path", "to"], env = "TRELLIS_CHECK_METHOD",
          value_parser = parse_method)]
    pub method: Option<String>,

    /// HTTP request path (with `--method`), normalized before matching.
    #[arg(long, value_name = "P", requires_all = ["method", "to"], env = "TRELLIS_CHECK_PATH")]
    pub path: Option<String>,

    /// `IP:PORT`: offline, an address outside the mesh (egress policy for `--from`); live,
    /// resolved through the endpoint registry (a mesh workload, at its app's port behind a VM
    /// sidecar's `--inbound LISTEN=APP`; a Kubernetes Service, judged as its first endpoint in
    /// the mesh; or egress if not found).
    #[arg(long, value_name = "IP:PORT", env = "TRELLIS_CHECK_TO_ADDRESS", conflicts_with_all = ["port", "method", "path"])]
    pub to_address: Option<SocketAddr>,
}

/// A request's method is an HTTP token (RFC 9110 §5.6.2): anything else never reaches a
/// policy, so checking it would answer a question no request can ask.
fn parse_method(s: &str) -> Result<String, String> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if s.is_empty() || !s.chars().all(tchar) {
        return Err(format!("{s:?} is not an HTTP method (letters, digits and !#$%&'*+-.^_`|~ only)"));
    }
    Ok(s.to_owned())
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DefaultAction {
    Allow,
    Deny,
}

pub fn run(cmd: PolicyCommand) -> ExitCode {
    let result = match cmd {
        PolicyCommand::Validate(args) => validate(&args),
        PolicyCommand::Check(args) => check(&args),
        PolicyCommand::Apply(args) => super::policy_remote::apply(&args),
        PolicyCommand::Get(args) => super::policy_remote::get(&args),
        PolicyCommand::List(args) => super::policy_remote::list(&args),
        PolicyCommand::Delete(args) => super::policy_remote::delete(&args),
    };
    result.unwrap_or_else(|code| code)
}

fn validate(args: &ValidateArgs) -> Result<ExitCode, ExitCode> {
    let policies = load(&args.policies)?;
    // What `apply` would refuse is not valid either: an empty file is more often a mistake
    // (a wrong path in CI, a template that rendered nothing) than a wish to apply nothing.
    if policies.is_empty() {
        return Err(no_documents(&args.policies.file));
    }
    if let Some(td) = &args.trust_domain {
        // Named like every other problem (a directory's own path: the policy names the file).
        let path = &args.policies.file;
        let prefix = if path == Path::new("-") { String::new() } else { format!("{}: ", shown(path)) };
        let prefix = prefix.as_str();
        let foreign: Vec<String> = policies
            .iter()
            .flat_map(|p| {
                p.foreign_patterns(td.as_str()).into_iter().map(move |(path, pattern)| {
                    format!(
                        "{prefix}document {:?}: {path}: {pattern} is not in trust domain {td}, so it can never match",
                        p.name()
                    )
                })
            })
            .collect();
        if !foreign.is_empty() {
            for line in &foreign {
                errln!("{line}");
            }
            return Err(ExitCode::from(super::EXIT_ERROR));
        }
    }
    outln!("{}", summary(&policies));
    Ok(ExitCode::SUCCESS)
}

/// `ok: 2 policies (api-from-web, block-admin)`.
fn summary(policies: &[Policy]) -> String {
    let noun = if policies.len() == 1 { "policy" } else { "policies" };
    let mut names: Vec<&str> = policies.iter().take(MAX_LISTED_NAMES).map(Policy::name).collect();
    let more = policies.len().saturating_sub(MAX_LISTED_NAMES);
    let more = format!("and {more} more");
    if policies.len() > MAX_LISTED_NAMES {
        names.push(&more);
    }
    format!("ok: {} {noun} ({})", policies.len(), names.join(", "))
}

fn check(args: &CheckArgs) -> Result<ExitCode, ExitCode> {
    let Some(file) = &args.file else {
        let decision = super::policy_remote::check_live(args)?;
        return finish(&decision, args.output);
    };
    if args.control.control.url != super::remote::DEFAULT_CONTROL {
        errln!("note: answering from {} offline; --control {} is not asked", file.display(), args.control.control.url);
    }
    let policies = load(&PolicySourceArgs { file: file.clone() })?;
    // As `validate` and `apply`: an empty file is a mistake (a wrong path in CI), and a
    // decision from no policies would make a `! trellis policy check` assertion pass.
    if policies.is_empty() {
        return Err(no_documents(file));
    }
    let mesh = match args.default {
        DefaultAction::Allow => Action::Allow,
        DefaultAction::Deny => Action::Deny,
    };
    let defaults = Defaults { mesh, ..Defaults::default() };
    let snapshot = PolicySnapshot::compile(0, policies, defaults).map_err(|e| fail(format_args!("{e}")))?;
    let decision = decide(&snapshot, &args.flow)?;
    print_decision(&decision, args.output)?;
    Ok(if decision.is_allowed() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_DENY) })
}

/// Prints a live decision (already JSON from the control plane) and picks the exit code.
fn finish(decision: &serde_json::Value, output: Output) -> Result<ExitCode, ExitCode> {
    match output {
        Output::Json | Output::Yaml => structured(decision, output, false).map_err(fail)?,
        Output::Text => {
            outln!("{}", decision["reason"]["message"].as_str().unwrap_or("(no reason given)"));
            if let Some(msg) = decision["audit"]["reason"]["message"].as_str() {
                outln!("audit: {msg}");
            }
        }
    }
    Ok(if decision["action"] == "allow" { ExitCode::SUCCESS } else { ExitCode::from(EXIT_DENY) })
}

/// clap has already enforced which flags go together; the `else` branches are defensive.
fn decide(snapshot: &PolicySnapshot, f: &FlowArgs) -> Result<Decision, ExitCode> {
    if let Some(addr) = f.to_address {
        let Some(source) = &f.from else {
            return Err(fail("--to-address needs --from: egress is checked for a source workload"));
        };
        if addr.port() == 0 {
            return Err(fail("--to-address: port 0 is not a valid port"));
        }
        let flow = EgressFlow { source, destination_ip: addr.ip(), port: addr.port() };
        return Ok(snapshot.evaluate_egress(&flow));
    }
    let (Some(destination), Some(port)) = (&f.to, f.port) else {
        return Err(fail("give --to and --port (a mesh flow) or --to-address (egress)"));
    };
    let http = match (&f.method, &f.path) {
        (Some(method), Some(path)) => Some(HttpRequest::checked(method, path).map_err(fail)?),
        (None, None) => None,
        _ => return Err(fail("--method and --path go together")),
    };
    let flow = Flow { source: f.from.as_ref(), source_ip: f.source_ip, destination, port, http };
    Ok(snapshot.evaluate(&flow))
}

fn print_decision(decision: &Decision, output: Output) -> Result<(), ExitCode> {
    match output {
        Output::Text => {
            outln!("{decision}");
            if let Some(audit) = &decision.audit {
                outln!("audit: {audit}");
            }
        }
        Output::Json | Output::Yaml => structured(decision, output, false).map_err(fail)?,
    }
    Ok(())
}

/// Reads and validates the policy file, printing every problem on failure.
pub(super) fn load(source: &PolicySourceArgs) -> Result<Vec<Policy>, ExitCode> {
    load_text(source).map(|(_, policies)| policies)
}

/// [`load`], with the text `apply` sends: the file as read, or for a directory the validated
/// policies of all its files as one JSON list (the control plane takes one text per apply,
/// and all of a directory goes in together or not at all).
pub(super) fn load_text(source: &PolicySourceArgs) -> Result<(String, Vec<Policy>), ExitCode> {
    let path = &source.file;
    if path != Path::new("-") && path.is_dir() {
        let policies = load_dir(path)?;
        let text = serde_json::to_string(&policies).map_err(|e| fail(format_args!("{}: {e}", shown(path))))?;
        if text.len() > MAX_INPUT_BYTES {
            return Err(fail(format_args!(
                "{}: the directory's policies come to {} bytes together; one apply takes at most {} MiB",
                shown(path),
                text.len(),
                MAX_INPUT_BYTES >> 20
            )));
        }
        // The limits on the whole (documents, rules) hold for what one apply sends, not per file.
        parse_documents(&text).map_err(|errors| report(Some(path), &errors))?;
        return Ok((text, policies));
    }
    let text = read_input(path).map_err(|e| fail(format_args!("{}: {e}", shown(path))))?;
    // Each problem names the file, as for a directory (stdin has no name to give).
    let named = (path != Path::new("-")).then_some(path.as_path());
    let policies = parse_documents(&text).map_err(|errors| report(named, &errors))?;
    Ok((text, policies))
}

/// Every `*.yaml`, `*.yml` and `*.json` file directly in `dir` (as `kubectl apply -f DIR`),
/// in name order. Every file's problems are printed, each prefixed with its path; a policy
/// name used in two files is an error like one used twice in a file.
fn load_dir(dir: &Path) -> Result<Vec<Policy>, ExitCode> {
    let files = policy_files(dir).map_err(|e| fail(format_args!("{}: {e}", shown(dir))))?;
    if files.is_empty() {
        return Err(fail(format_args!("{}: no policy files (*.yaml, *.yml, *.json) in this directory", shown(dir))));
    }
    let mut policies = Vec::new();
    let mut failed = false;
    let mut seen: std::collections::HashMap<String, PathBuf> = std::collections::HashMap::new();
    for file in &files {
        let text = match read_input(file) {
            Ok(text) => text,
            Err(e) => {
                errln!("error: {}: {e}", shown(file));
                failed = true;
                continue;
            }
        };
        match parse_documents(&text) {
            Err(errors) => {
                report(Some(file), &errors);
                failed = true;
            }
            Ok(found) => {
                for p in found {
                    if let Some(first) = seen.insert(p.name().to_owned(), file.clone()) {
                        errln!(
                            "{}: policy \"{}\": the name is already used in {}; names must be unique",
                            shown(file),
                            p.name(),
                            shown(&first)
                        );
                        failed = true;
                    }
                    policies.push(p);
                }
            }
        }
    }
    if failed { Err(ExitCode::from(super::EXIT_ERROR)) } else { Ok(policies) }
}

/// The `*.yaml`, `*.yml` and `*.json` files directly in `dir`, in name order (as `kubectl
/// apply -f DIR` reads a directory); `inject -f DIR` reads the same.
pub(super) fn policy_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if matches!(ext, "yaml" | "yml" | "json") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Prints every problem (prefixed with the file's path when reading a directory).
fn report(file: Option<&Path>, errors: &ValidationErrors) -> ExitCode {
    let prefix = file.map(|f| format!("{}: ", shown(f))).unwrap_or_default();
    for e in errors {
        errln!("{prefix}{e}");
    }
    if errors.omitted() > 0 {
        errln!("{prefix}... and {} more errors", errors.omitted());
    }
    ExitCode::from(super::EXIT_ERROR)
}

/// Reads at most one byte past the limit, so an endless or huge input is refused early.
fn read_input(path: &Path) -> Result<String, String> {
    let limit = MAX_INPUT_BYTES as u64 + 1;
    let mut bytes = Vec::new();
    let read = if path == Path::new("-") {
        std::io::stdin().lock().take(limit).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(limit).read_to_end(&mut bytes))
    };
    read.map_err(|e| e.to_string())?;
    if bytes.len() > MAX_INPUT_BYTES {
        return Err(format!("larger than the {} MiB limit", MAX_INPUT_BYTES >> 20));
    }
    String::from_utf8(bytes).map_err(|_| "not valid UTF-8".to_owned())
}

pub(super) fn no_documents(file: &Path) -> ExitCode {
    fail(format_args!("{}: no policy documents", shown(file)))
}

pub(super) fn fail(message: impl std::fmt::Display) -> ExitCode {
    errln!("error: {message}");
    ExitCode::from(super::EXIT_ERROR)
}
