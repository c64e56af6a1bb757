//! The binary's front door: help, version, and clear refusals of bad usage.

use std::process::Command;

fn trellis() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
}

#[test]
fn version_and_help() {
    let out = trellis().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("trellis {}", env!("CARGO_PKG_VERSION")));
    let out = trellis().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("zero-trust") && help.contains("policy"), "{help}");
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let out = trellis().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("frobnicate"));
}

#[test]
fn a_bad_log_filter_is_a_usage_error_naming_it() {
    let out = trellis().args(["--log", "trellis_proxy=loud", "policy", "validate", "-f", "-"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--log") && stderr.contains("trellis_proxy=loud"), "{stderr}");
    let out = trellis()
        .args(["policy", "validate", "-f", "-"])
        .env("TRELLIS_LOG", "warn,trellis_proxy=chatty")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}
