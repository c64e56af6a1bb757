//! `trellis inject -f FILE|-`: adds the Trellis sidecar to Kubernetes manifests and prints
//! them to stdout. The work is `trellis_control::inject`, the code the admission webhook runs.
//!
//! Everything is read and injected before anything is printed, so an error (exit 2, message
//! on stderr) never leaves half a manifest on stdout.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::out::shown;

use anyhow::Context;
use trellis_control::inject::{self, InjectConfig, Outcome, SkipReason};

#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// Manifests to inject (YAML with `---` documents, a `kind: List`, or JSON); `-` reads stdin;
    /// a directory injects each `*.yaml`, `*.yml` and `*.json` in it, in name order.
    #[arg(short = 'f', long = "filename", value_name = "FILE|-", env = "TRELLIS_INJECT_FILE")]
    pub file: PathBuf,
    /// The trust bundle (PEM) the injected proxies verify the control plane with; it is
    /// embedded in each pod spec. `trellis control run` writes it as `<data-dir>/bundle.pem`.
    #[arg(long, env = "TRELLIS_CA_BUNDLE", value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
    /// The control plane URL the injected proxies use. Its own variable, not TRELLIS_CONTROL:
    /// that one usually points at the control plane from the operator's machine, not from pods.
    #[arg(long, env = "TRELLIS_INJECT_CONTROL", default_value = inject::DEFAULT_CONTROL_URL)]
    pub control: String,
    /// Image for the init container and the proxy.
    #[arg(long, env = "TRELLIS_IMAGE", default_value_t = inject::default_image())]
    pub image: String,
    /// Run the proxy as a regular container instead of a native sidecar (Kubernetes < 1.29).
    /// Jobs then never complete on their own: the proxy keeps running after the app exits.
    #[arg(long, env = "TRELLIS_CLASSIC_SIDECAR", value_parser = clap::builder::FalseyValueParser::new())]
    pub classic_sidecar: bool,
}

pub fn run(args: InjectArgs) -> ExitCode {
    match inject_to_string(&args) {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout.write_all(output.as_bytes()).and_then(|()| stdout.flush()) {
                errln!("trellis inject: cannot write to stdout: {e}");
                return ExitCode::from(super::EXIT_ERROR);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("trellis inject: {e:#}");
            ExitCode::from(super::EXIT_ERROR)
        }
    }
}

fn inject_to_string(args: &InjectArgs) -> anyhow::Result<String> {
    let bundle_path = args.ca_bundle.as_ref().context(
        "--ca-bundle FILE (or TRELLIS_CA_BUNDLE) is required: the injected proxies verify the control plane with \
         it (the control plane writes it to <data-dir>/bundle.pem)",
    )?;
    let bundle = std::fs::read_to_string(bundle_path)
        .with_context(|| format!("cannot read the CA bundle {}", bundle_path.display()))?;
    let cfg = InjectConfig {
        image: args.image.clone(),
        control_url: args.control.clone(),
        ca_bundle_pem: bundle,
        classic_sidecar: args.classic_sidecar,
        skip_namespaces: Vec::new(),
    };
    cfg.validate().map_err(|e| match e {
        inject::InjectError::BadBundle(_) => anyhow::Error::new(e).context(bundle_path.display().to_string()),
        other => other.into(),
    })?;
    if args.file.is_dir() {
        return inject_dir(&args.file, &cfg);
    }
    let input = read_input(&args.file)?;
    let source = if args.file.as_os_str() == "-" { "<stdin>".to_string() } else { shown(&args.file) };
    let injected = inject::inject_manifests(&input, &cfg).context(source.clone())?;
    report(&source, &injected.outcomes);
    Ok(injected.yaml)
}

/// Like `kubectl apply -f DIR` (not recursive): each file injected on its own (a JSON file
/// stays JSON to its parser), their YAML joined with `---`; any error, and nothing is printed.
fn inject_dir(dir: &Path, cfg: &InjectConfig) -> anyhow::Result<String> {
    let files = super::policy::policy_files(dir).with_context(|| format!("cannot read {}", shown(dir)))?;
    if files.is_empty() {
        anyhow::bail!("{}: no *.yaml, *.yml or *.json files", shown(dir));
    }
    let mut out = String::new();
    for file in files {
        let source = shown(&file);
        let injected = inject::inject_manifests(&read_input(&file)?, cfg).context(source.clone())?;
        if injected.yaml.is_empty() {
            continue;
        }
        report(&source, &injected.outcomes);
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&injected.yaml);
    }
    Ok(out)
}

fn read_input(file: &Path) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("cannot read stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", shown(file)))
}

/// One line per skipped workload on stderr, so a silent skip is never a surprise, and one
/// per app probe that will fail in the mesh; each names its file (`source`) and document.
fn report(source: &str, outcomes: &[Outcome]) {
    let mut injected = 0;
    let (mut skipped, mut warned) = (Vec::new(), Vec::new());
    collect(outcomes, None, &mut injected, &mut skipped, &mut warned);
    for (at, warning) in &warned {
        tracing::warn!("{source}: {at}: {warning}");
    }
    for (at, reason, removed) in &skipped {
        let why = match reason {
            SkipReason::Disabled => "annotated trellis.dev/inject: disabled".to_string(),
            SkipReason::HostNetwork => "uses hostNetwork".to_string(),
            SkipReason::AlreadyInjected => "already injected".to_string(),
            SkipReason::Namespace(ns) => format!("namespace {ns} is skipped"),
        };
        if *removed {
            tracing::info!("{source}: {at}: the sidecar injected earlier was removed: {why}");
        } else {
            tracing::info!("{source}: {at}: not injected: {why}");
        }
    }
    tracing::debug!(injected, skipped = skipped.len(), "trellis inject done");
}

/// Skipped workloads: where (`document 2`, `document 1 items[5]`), why, and whether an earlier
/// injection was removed.
type Skipped = Vec<(String, SkipReason, bool)>;
/// What will not work in the mesh as written: where, warning.
type Warned = Vec<(String, String)>;

/// `list`: the document number of the `List` whose items `outcomes` are.
fn collect(
    outcomes: &[Outcome],
    list: Option<usize>,
    injected: &mut usize,
    skipped: &mut Skipped,
    warned: &mut Warned,
) {
    for (i, outcome) in outcomes.iter().enumerate() {
        let at = || match list {
            None => format!("document {}", i + 1),
            Some(document) => format!("document {document} items[{i}]"),
        };
        match outcome {
            Outcome::Injected { warnings } => {
                *injected += 1;
                warned.extend(warnings.iter().map(|w| (at(), w.clone())));
            }
            Outcome::Skipped(reason) => skipped.push((at(), reason.clone(), false)),
            Outcome::Removed(reason) => skipped.push((at(), reason.clone(), true)),
            Outcome::List(items) => collect(items, Some(i + 1), injected, skipped, warned),
            Outcome::NotAWorkload => {}
        }
    }
}
