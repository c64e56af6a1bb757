//! The CLI's output. `println!` and `eprintln!` panic when their stream fails — a closed
//! pipe (`trellis policy list | head -1`), a full disk (`> /dev/full`) — and the CLI
//! must not panic: here a failed write to stdout ends the command with exit 2 and a message,
//! and a failed write to stderr is ignored (a diagnostic nobody can read must not change the
//! outcome). Every line is flushed at once so that a failure is seen where it happens.

use std::io::Write;

/// `println!` that ends the command with exit 2 if stdout cannot be written.
macro_rules! outln {
    () => { $crate::cmd::out::stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cmd::out::stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` that ends the command with exit 2 if stdout cannot be written.
macro_rules! out {
    ($($arg:tt)*) => { $crate::cmd::out::stdout(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics.
macro_rules! errln {
    ($($arg:tt)*) => { $crate::cmd::out::stderr(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Exit code for output that could not be written, as for any other error of the CLI.
const EXIT_OUTPUT: i32 = 2;

pub fn stdout(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        drop(out);
        // A reader that went away (`| head`) is the usual case and needs no message.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            stderr(format_args!("error: cannot write to standard output: {e}\n"));
        }
        std::process::exit(EXIT_OUTPUT);
    }
}

pub fn stderr(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// A path as the CLI prints it: a file name read from a directory is not the user's text, and
/// must not write terminal escapes or fake lines (`a\nok: 1 policy.yaml`) into a log.
pub fn shown(path: &std::path::Path) -> String {
    trellis_policy::escape_unprintable(&path.display().to_string()).into_owned()
}

/// `-o` / `TRELLIS_OUTPUT`: one set of formats for every command that prints a result. The
/// variable is shared, so a format one command offers must not make another fail: each
/// command prints all three, `text` being its human form (for `policy get`, the re-appliable
/// YAML).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
    Yaml,
}

/// Prints a result as JSON (`pretty`: indented, else one line) or as YAML — the machine
/// formats, the same fields either way. `text` is printed as YAML, which is `policy get`'s
/// human form; commands with a text form of their own print it instead of calling this.
pub fn structured(value: &impl serde::Serialize, format: Output, pretty: bool) -> Result<(), String> {
    let text = match format {
        Output::Json if pretty => serde_json::to_string_pretty(value).map_err(|e| e.to_string())? + "\n",
        Output::Json => serde_json::to_string(value).map_err(|e| e.to_string())? + "\n",
        Output::Yaml | Output::Text => serde_saphyr::to_string(value).map_err(|e| e.to_string())?,
    };
    out!("{text}");
    Ok(())
}
