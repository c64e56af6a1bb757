//! `trellis policy apply|get|list|delete` and the live `policy check`: the control plane's
//! policy API from the command line, printed the way kubectl users expect.
//!
//! A file is validated locally before it is sent, so a bad file gets the same field-path
//! errors as `policy validate` without a round trip (the control plane validates again).
//! Exit codes: 0 done, 2 bad input or a failed call.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use trellis_control::api::CheckRequest;

use super::out::{Output, structured};
use super::policy::{CheckArgs, DefaultAction, PolicySourceArgs, fail, load_text, no_documents};
use super::remote::{AdminArgs, block_on};

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Policy file, YAML or JSON, several documents allowed; `-` reads standard input; a
    /// directory applies every `*.yaml`, `*.yml` and `*.json` in it together, or nothing.
    #[arg(short = 'f', long = "file", value_name = "FILE", env = "TRELLIS_POLICY_FILE")]
    pub file: PathBuf,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// The policy's `metadata.name`.
    #[arg(value_parser = policy_name)]
    pub name: String,
    /// Output format: `yaml` (re-appliable as it is) or `json`; `text` is read as `yaml`, as
    /// `TRELLIS_OUTPUT` is shared with the commands that print text.
    #[arg(short, long, value_enum, default_value = "yaml", env = "TRELLIS_OUTPUT")]
    pub output: Output,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format: `text` (a table), `json` or `yaml` (the same fields as the JSON).
    #[arg(short, long, value_enum, default_value = "text", env = "TRELLIS_OUTPUT")]
    pub output: Output,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The policy's `metadata.name`.
    #[arg(value_parser = policy_name)]
    pub name: String,
    #[command(flatten)]
    pub admin: AdminArgs,
}

fn client(admin: &AdminArgs) -> Result<trellis_control::ControlClient, ExitCode> {
    admin.client().map_err(|e| fail(format_args!("{e:#}")))
}

fn call<T>(f: impl std::future::Future<Output = Result<T, trellis_control::ClientError>>) -> Result<T, ExitCode> {
    match block_on(f) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(fail(e)),
        Err(e) => Err(fail(format_args!("{e:#}"))),
    }
}

pub fn apply(args: &ApplyArgs) -> Result<ExitCode, ExitCode> {
    let (text, policies) = load_text(&PolicySourceArgs { file: args.file.clone() })?;
    if policies.is_empty() {
        return Err(no_documents(&args.file));
    }
    let client = client(&args.admin)?;
    let outcome = match block_on(client.apply_policies(text)) {
        Ok(Ok(outcome)) => outcome,
        // Sent, and no answer came back (the control plane went away mid-request): it may have
        // committed the apply or not, and saying only "request failed" would suggest it did not.
        Ok(Err(e @ trellis_control::ClientError::Http(_))) => {
            return Err(fail(format_args!(
                "{e}: if the request reached the control plane, the apply may have been committed; `trellis policy list` shows the current version"
            )));
        }
        Ok(Err(e)) => return Err(fail(e)),
        Err(e) => return Err(fail(format_args!("{e:#}"))),
    };
    for (names, verb) in
        [(&outcome.created, "created"), (&outcome.configured, "configured"), (&outcome.unchanged, "unchanged")]
    {
        for name in names {
            outln!("policy/{name} {verb}");
        }
    }
    outln!("version {}", outcome.version);
    Ok(ExitCode::SUCCESS)
}

/// A name no policy can have is said so here, not answered "not found" by the control plane.
fn policy_name(s: &str) -> Result<String, String> {
    trellis_policy::check_name(s).map(str::to_owned)
}

pub fn get(args: &GetArgs) -> Result<ExitCode, ExitCode> {
    let client = client(&args.admin)?;
    let policy = call(client.get_policy(&args.name))?;
    // A policy's human form is its YAML, which `apply` takes back as it is.
    structured(&policy, args.output, true).map_err(fail)?;
    Ok(ExitCode::SUCCESS)
}

pub fn list(args: &ListArgs) -> Result<ExitCode, ExitCode> {
    let client = client(&args.admin)?;
    let list = call(client.list_policies())?;
    if args.output != Output::Text {
        structured(&list, args.output, true).map_err(fail)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!("{:<32} {:<20} {:<6} {:<8} {:>5}  SELECTOR", "NAME", "KIND", "ACTION", "MODE", "RULES");
    for p in &list.policies {
        outln!("{:<32} {:<20} {:<6} {:<8} {:>5}  {}", p.name, p.kind, p.action, p.mode, p.rules, p.selector);
    }
    outln!("version {}", list.version);
    Ok(ExitCode::SUCCESS)
}

pub fn delete(args: &DeleteArgs) -> Result<ExitCode, ExitCode> {
    let client = client(&args.admin)?;
    let out = call(client.delete_policy(&args.name))?;
    outln!("policy/{} deleted", args.name);
    outln!("version {}", out["version"]);
    Ok(ExitCode::SUCCESS)
}

/// The live decision, as the control plane's JSON (same shape as `--output json` offline).
pub fn check_live(args: &CheckArgs) -> Result<serde_json::Value, ExitCode> {
    let f = &args.flow;
    let req = CheckRequest {
        from: f.from.clone(),
        source_ip: Some(f.source_ip.to_string()),
        to: f.to.clone(),
        port: f.port,
        method: f.method.clone(),
        path: f.path.clone(),
        to_address: f.to_address.map(|a| a.to_string()),
        default: Some(match args.default {
            DefaultAction::Allow => "allow".into(),
            DefaultAction::Deny => "deny".into(),
        }),
    };
    let client = client(&args.control)?;
    let resp = call(client.check(&req))?;
    let address = req.to_address.unwrap_or_default();
    // Said on stderr, so the decision stays the one line on stdout scripts read.
    let at = |listener: &str| match resp.port {
        Some(port) if !listener.ends_with(&format!(":{port}")) => format!(", at its app's port {port}"),
        _ => String::new(),
    };
    match (&resp.resolved, &resp.endpoint) {
        (Some(id), Some(endpoint)) => errln!(
            "{address} is a Service; judged as its endpoint {endpoint}, {id}{}; policy version {}",
            at(endpoint),
            resp.version
        ),
        (Some(id), None) => {
            errln!("{address} is {id} (endpoint registry){}; policy version {}", at(&address), resp.version)
        }
        (None, _) if !address.is_empty() => {
            errln!(
                "{address} is not in the mesh's endpoint registry: judged as egress; policy version {}",
                resp.version
            )
        }
        _ => {}
    }
    Ok(resp.decision)
}
