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

/// Every other kept run (a directory under `benches/load/results/`) is, like the main one,
/// what the harness renders from its kept data — so a renderer change cannot leave a report
/// RESULTS.md links to saying something its data no longer does.
#[test]
fn every_kept_report_is_a_fresh_render_of_its_data() {
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/load/results");
    let mut kept: Vec<_> =
        std::fs::read_dir(&results).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    kept.sort();
    assert!(!kept.is_empty(), "no kept run besides the main one in {}", results.display());
    for run in kept {
        let out = tempfile::tempdir().unwrap();
        let json = run.join("results.json");
        let Some(o) = run_sh(&["--render", json.to_str().unwrap(), "--out", out.path().to_str().unwrap()]) else {
            return;
        };
        assert!(o.status.success(), "{}: {}", run.display(), String::from_utf8_lossy(&o.stderr));
        let fresh = std::fs::read_to_string(out.path().join("results.md")).unwrap();
        assert!(
            fresh == std::fs::read_to_string(run.join("results.md")).unwrap(),
            "{} is stale: re-render it",
            run.display()
        );
    }
}

/// A goal that names a pair that was not measured is "not measured", never "met" against
/// the other pair (re-rendering the kept report without its HAProxy rounds).
#[test]
fn a_goal_is_not_judged_without_the_pairs_it_names() {
    let kept = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/load/results/results.json");
    let mut results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(kept).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.json");
    std::fs::write(&whole, results.to_string()).unwrap();
    let Some(o) = run_sh(&["--render", whole.to_str().unwrap(), "--out", dir.path().join("a").to_str().unwrap()])
    else {
        return;
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(dir.path().join("a/results.md")).unwrap();
    // The kept report is what the harness renders from the kept data, byte for byte.
    let kept_md = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/load/results/results.md");
    assert!(md == std::fs::read_to_string(kept_md).unwrap(), "benches/load/results/results.md is stale: re-render it");
    let peak = md.lines().find(|l| l.starts_with("| trellis peak rps")).expect("the peak goal's row");
    assert!(peak.contains(" vs ") && (peak.contains("**met**") || peak.contains("**missed**")), "{peak}");

    for scenario in results["scenarios"].as_object_mut().unwrap().values_mut() {
        scenario["targets"].as_object_mut().unwrap().remove("haproxy");
    }
    let partial = dir.path().join("partial.json");
    std::fs::write(&partial, results.to_string()).unwrap();
    let o = run_sh(&["--render", partial.to_str().unwrap(), "--out", dir.path().join("b").to_str().unwrap()]).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(dir.path().join("b/results.md")).unwrap();
    let peak = md.lines().find(|l| l.starts_with("| trellis peak rps")).expect("the peak goal's row");
    assert!(peak.contains("not measured: haproxy (http1)") && !peak.contains("met"), "{peak}");
    let bulk = md.lines().find(|l| l.starts_with("| bulk")).expect("the bulk goal's row");
    assert!(bulk.contains("not measured: haproxy (bulk)"), "{bulk}");
}

/// The relay is a reference, not judged: a round disturbed only while the relay was measured
/// still counts for Trellis and the peers (the kept report with one relay round marked
/// disturbed renders the same rounds and goals).
#[test]
fn a_disturbed_relay_round_does_not_drop_the_others() {
    let kept = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/load/results/results.json");
    let mut results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(kept).unwrap()).unwrap();
    let round = &mut results["scenarios"]["http1"]["targets"]["relay"]["rounds"][0];
    assert!(round.is_object(), "the kept report measured the relay");
    round["disturbed"] = serde_json::Value::Bool(true);
    round["other_cpu_cores"] = serde_json::json!(0.9);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay-disturbed.json");
    std::fs::write(&file, results.to_string()).unwrap();
    let Some(o) = run_sh(&["--render", file.to_str().unwrap(), "--out", dir.path().to_str().unwrap()]) else {
        return;
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    let trellis = md.lines().find(|l| l.starts_with("| trellis | ")).expect("scenario 1's trellis row");
    assert!(trellis.contains("rounds 1, 2, 3 of 3 (clean)"), "{trellis}");
    let peak = md.lines().find(|l| l.starts_with("| trellis peak rps")).expect("the peak goal's row");
    assert!(!peak.contains("disturbed"), "{peak}");
}

/// The added-p99 goal says when the p99s it is computed from moved by more than 2× between
/// the rounds kept (a busy host), and still gives its judgement: the kept report's rounds
/// (direct 0.184–0.220 ms) carry no warning; with one direct round at 1.2 ms the row warns.
#[test]
fn an_added_p99_from_rounds_that_moved_is_called_noise() {
    let kept = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/load/results/results.json");
    let mut results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(kept).unwrap()).unwrap();
    let goal = |results: &serde_json::Value, name: &str| -> Option<String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(name);
        std::fs::write(&file, results.to_string()).unwrap();
        let o = run_sh(&["--render", file.to_str().unwrap(), "--out", dir.path().to_str().unwrap()])?;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
        Some(md.lines().find(|l| l.starts_with("| added p99 at 2,000 rps")).expect("the p99 goal's row").to_string())
    };
    let Some(quiet) = goal(&results, "kept.json") else { return };
    assert!(!quiet.contains("noise") && quiet.contains("**missed**"), "{quiet}");

    results["scenarios"]["rate"]["targets"]["direct"]["rounds"][2]["p99_ms"] = serde_json::json!(1.2);
    let noisy = goal(&results, "moved.json").unwrap();
    assert!(noisy.contains("⚠ p99 moved more than 2× between rounds (direct 0.184–1.200 ms)"), "{noisy}");
    assert!(noisy.contains("**met**") || noisy.contains("**missed**"), "the judgement is still given: {noisy}");
}
