//! Coverage-guided fuzzing of the parsers and policy cores with cargo fuzz
//! (libFuzzer); the targets are in `fuzz/fuzz_targets/` (RELIABILITY.md).
//!
//! cargo fuzz wants nightly flags (`-Zsanitizer`, coverage passes). Only
//! stable rustup exists on our machines, so it runs with `RUSTC_BOOTSTRAP=1`
//! (checked with rustc 1.95: both `--sanitizer address` and `none` build and
//! run). We use `--sanitizer none`: the code under test is safe Rust (the only
//! `unsafe` is the wasm32-only host module), so AddressSanitizer finds nothing
//! more and costs a 4x slower build; panics, failed asserts and integer
//! overflow (debug assertions stay on) are what we hunt.

use std::path::PathBuf;
use std::process::Command;

use crate::{cargo, run as run_cmd};

/// Every fuzz target (a file in `fuzz/fuzz_targets/`).
pub const TARGETS: &[&str] = &[
    "json",
    "duration",
    "route_metadata",
    "matcher",
    "config_ratelimit",
    "config_circuit_breaker",
    "config_lb_hints",
    "config_metrics",
    "config_json_values",
    "decide_ratelimit",
    "decide_circuit_breaker",
    "decide_lb_hints",
    "decide_metrics",
];
/// Seconds per target in the test suite.
const CI_SECONDS: u32 = 4;
/// Seconds per target for `cargo xtask fuzz` without a number.
const DEFAULT_SECONDS: u32 = 60;

fn fuzz_dir() -> PathBuf {
    mesh_testkit::repo_root().join("fuzz")
}

/// `cargo fuzz` in fuzz/, allowed nightly flags on stable.
fn cargo_fuzz() -> Command {
    let mut cmd = cargo();
    cmd.current_dir(fuzz_dir())
        .env("RUSTC_BOOTSTRAP", "1")
        .arg("fuzz");
    cmd
}

/// Installs cargo-fuzz when missing (CI starts from a fresh machine).
fn ensure_cargo_fuzz() -> Result<(), String> {
    let installed = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        println!("==> cargo install --locked cargo-fuzz");
        run_cmd(cargo().args(["install", "--locked", "cargo-fuzz"]))?;
    }
    Ok(())
}

fn build() -> Result<(), String> {
    ensure_cargo_fuzz()?;
    println!("==> cargo fuzz build (libFuzzer, --sanitizer none)");
    run_cmd(cargo_fuzz().args(["build", "-O", "--sanitizer", "none"]))
}

/// Runs one target for `seconds`; returns libFuzzer's "Done N runs in S second(s)".
fn fuzz_one(target: &str, seconds: u32) -> Result<String, String> {
    let dir = fuzz_dir();
    // The corpus grows in fuzz/corpus (not committed); fuzz/seeds holds the
    // committed starting points (valid configurations and the like).
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
    let mut cmd = cargo_fuzz();
    cmd.args(["run", "-O", "--sanitizer", "none", target])
        .arg(&corpus);
    let seeds = dir.join("seeds").join(target);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    let dict = dir.join("config.dict");
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-dict={}", dict.display()))
        .arg("-print_final_stats=1");
    let out = cmd
        .output()
        .map_err(|e| format!("cargo fuzz run {target}: {e}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "fuzz target {target} failed ({}): make the input in fuzz/artifacts/{target}/ a \
             regression test in the crate concerned\n{}",
            out.status,
            tail(&log, 60)
        ));
    }
    Ok(log
        .lines()
        .rev()
        .find(|l| l.starts_with("Done "))
        .unwrap_or("(no summary)")
        .to_string())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn run_targets(targets: &[&str], seconds: u32) -> Result<(), String> {
    build()?;
    for target in targets {
        println!("==> fuzz {target} for {seconds}s");
        let summary = fuzz_one(target, seconds)?;
        println!("    {summary}");
    }
    Ok(())
}

/// The test suite's run: every target for a few seconds.
pub fn ci() -> Result<(), String> {
    run_targets(TARGETS, CI_SECONDS)
}

/// `cargo xtask fuzz [target] [seconds]`: the longer run (every target, or one;
/// 60 s each unless told). Crashes land in fuzz/artifacts/<target>/;
/// `cargo fuzz run <target> <file>` (in fuzz/, with RUSTC_BOOTSTRAP=1) replays one.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut targets: Vec<&str> = Vec::new();
    let mut seconds = DEFAULT_SECONDS;
    for arg in args {
        if let Ok(n) = arg.parse() {
            seconds = n;
        } else if let Some(t) = TARGETS.iter().find(|t| **t == arg.as_str()) {
            targets.push(t);
        } else {
            return Err(format!(
                "unknown fuzz target {arg}; the targets are {}",
                TARGETS.join(", ")
            ));
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    run_targets(&targets, seconds)
}
