//! The load benchmark's driver as a user runs it (`benches/load/run.sh`): bad flags are
//! one-line errors, and a saved run re-renders with each goal judged only on what was
//! measured. Nothing here measures load; `--render` starts no process.

use std::path::Path;
use std::process::{Command, Output};

fn run_sh(args: &[&str]) -> Option<Output> {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("skipped: python3 is not installed (apt-get install -y python3)");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/load/run.sh");
    // TRELLIS_BIN: the script must not run `cargo build` inside `cargo test`.
    Some(Command::new(script).args(args).env("TRELLIS_BIN", env!("CARGO_BIN_EXE_trellis")).output().unwrap())
}

/// The kept run's data (`benches/load/results/results.json`), or another kept run's.
fn kept(dir: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join("results.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The markdown report `run.sh --render` writes for `results` (None: no python3, skipped).
fn render(results: &serde_json::Value) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("results.json");
    std::fs::write(&file, results.to_string()).unwrap();
    let out = dir.path().join("out");
    let o = run_sh(&["--render", file.to_str().unwrap(), "--out", out.to_str().unwrap()])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some(std::fs::read_to_string(out.join("results.md")).unwrap())
}

/// The report's line starting with `prefix` (a goal's row, a target's row).
fn row<'a>(md: &'a str, prefix: &str) -> &'a str {
    md.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no row {prefix:?} in the report"))
}

const MAIN: &str = "benches/load/results";

#[test]
fn bad_flags_are_one_line_errors_not_tracebacks() {
    let out_dir = tempfile::tempdir().unwrap();
    let file = out_dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let under_a_file = file.join("sub").display().to_string();
    let cases: [(&[&str], &str); 7] = [
        (&["--rounds", "0"], "--rounds must be at least 1 (got 0)"),
        (&["--duration", "-5"], "--duration must be at least 1 (got -5)"),
        (&["--targets", ","], "--targets names no target"),
        (&["--targets", "relayy"], "unknown scenario/target ['relayy']"),
        (
            &["--targets", "relay", "--only", "close,bulk"],
            "no scenario in --only measures any of --targets (each is measured in: relay: http1,rate)",
        ),
        (&["--only", "http1", "--out", &under_a_file], "cannot write there"),
        (&["--render", "/nonexistent/results.json"], "not a results.json this benchmark wrote"),
    ];
    for (args, expected) in cases {
        let Some(o) = run_sh(args) else { return };
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("Traceback"), "{args:?}: {err}");
    }
}

/// A mistyped argument is said before anything is built (on a clean checkout the release
/// build takes minutes), and `--trellis-bin` is read from where the user ran the script.
#[test]
fn arguments_are_checked_before_a_build_and_paths_are_the_callers() {
    if Command::new("python3").arg("--version").output().is_err() {
        return println!("skipped: python3 is not installed (apt-get install -y python3)");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/load/run.sh");
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("cargo-was-run");
    let fake = dir.path().join("bin");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(fake.join("cargo"), format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display())).unwrap();
    std::fs::set_permissions(fake.join("cargo"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap_or_default());
    for args in [&["--bogus"][..], &["--rounds", "0"], &["--only", "http9"]] {
        let o = Command::new(&script).args(args).env_remove("TRELLIS_BIN").env("PATH", &path).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(!marker.exists(), "{args:?}: cargo was run before the arguments were checked");
    }
    let o = Command::new(&script)
        .args(["--trellis-bin", "./no-such-trellis", "--only", "http1"])
        .current_dir(dir.path())
        .env_remove("TRELLIS_BIN")
        .env("PATH", &path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let expected = format!("no trellis binary at {}/./no-such-trellis", dir.path().display());
    assert!(!o.status.success() && err.contains(&expected), "{err}");
    assert!(!marker.exists(), "a binary named on the command line needs no build");
}

/// Every other kept run (a directory under `benches/load/results/`) is, like the main one,
/// what the harness renders from its kept data — so a renderer change cannot leave a report
/// RESULTS.md links to saying something its data no longer does.
#[test]
fn every_kept_report_is_a_fresh_render_of_its_data() {
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join(MAIN);
    let mut runs: Vec<_> =
        std::fs::read_dir(&results).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    runs.sort();
    assert!(!runs.is_empty(), "no kept run besides the main one in {}", results.display());
    for run in runs {
        let Some(fresh) = render(&kept(run.to_str().unwrap())) else { return };
        let saved = std::fs::read_to_string(run.join("results.md")).unwrap();
        assert!(fresh == saved, "{} is stale: re-render it", run.display());
    }
}

/// A goal that names a pair that was not measured is "not measured", never "met" against
/// the other pair (re-rendering the kept report without its HAProxy rounds).
#[test]
fn a_goal_is_not_judged_without_the_pairs_it_names() {
    let mut results = kept(MAIN);
    let Some(md) = render(&results) else { return };
    // The kept report is what the harness renders from the kept data, byte for byte.
    let kept_md = Path::new(env!("CARGO_MANIFEST_DIR")).join(MAIN).join("results.md");
    assert!(md == std::fs::read_to_string(kept_md).unwrap(), "benches/load/results/results.md is stale: re-render it");
    let peak = row(&md, "| trellis peak rps");
    assert!(peak.contains(" vs ") && (peak.contains("**met**") || peak.contains("**missed**")), "{peak}");

    for scenario in results["scenarios"].as_object_mut().unwrap().values_mut() {
        scenario["targets"].as_object_mut().unwrap().remove("haproxy");
    }
    let md = render(&results).unwrap();
    let peak = row(&md, "| trellis peak rps");
    assert!(peak.contains("not measured: haproxy (http1)") && !peak.contains("met"), "{peak}");
    let bulk = row(&md, "| bulk");
    assert!(bulk.contains("not measured: haproxy (bulk)"), "{bulk}");
}

/// The relay is a reference, not judged: a round disturbed only while the relay was measured
/// still counts for Trellis and the peers (the kept report with one relay round marked
/// disturbed renders the same rounds and goals).
#[test]
fn a_disturbed_relay_round_does_not_drop_the_others() {
    let mut results = kept(MAIN);
    let round = &mut results["scenarios"]["http1"]["targets"]["relay"]["rounds"][0];
    assert!(round.is_object(), "the kept report measured the relay");
    round["disturbed"] = serde_json::Value::Bool(true);
    round["other_cpu_cores"] = serde_json::json!(0.9);
    let Some(md) = render(&results) else { return };
    assert!(row(&md, "| trellis | ").contains("rounds 1, 2, 3 of 3 (clean)"), "{md}");
    let peak = row(&md, "| trellis peak rps");
    assert!(!peak.contains("disturbed"), "{peak}");
}

/// The peak goal says when a pair's req/s moved by more than 1.25× between the rounds kept
/// (a drifting machine): the ratio is then as uncertain as that, and the judgement still given.
#[test]
fn a_peak_from_rounds_that_moved_says_so() {
    let mut results = kept(MAIN);
    results["scenarios"]["http1"]["targets"]["haproxy"]["rounds"][0]["rps"] = serde_json::json!(20000.0);
    let Some(md) = render(&results) else { return };
    let peak = row(&md, "| trellis peak rps");
    assert!(peak.contains("⚠ req/s moved more than 1.25× between rounds (haproxy 20,000–32,"), "{peak}");
    assert!(peak.contains("**met**") || peak.contains("**missed**"), "the judgement is still given: {peak}");
}

/// The added-p99 goal says when the p99s it is computed from moved by more than 2× between
/// the rounds kept (a busy host), and still gives its judgement: the kept report's rounds
/// (direct 0.184–0.220 ms) carry no warning; with one direct round at 1.2 ms the row warns.
#[test]
fn an_added_p99_from_rounds_that_moved_is_called_noise() {
    const GOAL: &str = "| added p99 at 2,000 rps";
    let mut results = kept(MAIN);
    let Some(quiet) = render(&results) else { return };
    let quiet = row(&quiet, GOAL);
    assert!(!quiet.contains("noise") && quiet.contains("**missed**"), "{quiet}");

    results["scenarios"]["rate"]["targets"]["direct"]["rounds"][2]["p99_ms"] = serde_json::json!(1.2);
    let noisy = render(&results).unwrap();
    let noisy = row(&noisy, GOAL);
    assert!(noisy.contains("⚠ p99 moved more than 2× between rounds (direct 0.184–1.200 ms)"), "{noisy}");
    assert!(noisy.contains("**met**") || noisy.contains("**missed**"), "the judgement is still given: {noisy}");
}
