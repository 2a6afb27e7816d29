//! Project tasks: `cargo xtask <task>`.
//!
//!   build   build every filter (or the ones named) to dist/<filter>.wasm, size-optimised
//!   test    build, install Envoy if needed, then lint and run the whole test suite
//!   demo    build, start Envoy with all filters in front of two upstreams, show them work
//!           (`--suite`: the same on the suite module, envoy/suite.yaml)
//!   bench   measure each filter's cost per request through a real Envoy (BENCHMARKS.md)
//!   bench-global  ratelimit's global mode against Envoy's native ratelimit filter, same RLS (BENCHMARKS.md)
//!   push    push the filters as OCI images (README "OCI images")
//!   upstreams  run the demo's upstreams v1 (:8081) and v2 (:8082) until Ctrl-C (for docker compose / func-e)
//!   schemas write schemas/<filter>.schema.json from the filters' config types
//!   envoy   print the path of the Envoy binary the tests use (installing it if needed)
//!   helm-schema  regenerate the filters' part of charts/mesh-filters/values.schema.json from schemas/
//!   helm-render  render the Helm chart with its default and ci value files into target/helm/rendered/

mod bench;
mod bench_global;
mod build;
mod demo;
mod exports;
mod fuzz;
mod oci;
mod soak;

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build") if args.len() > 1 => {
            let filters: Vec<&str> = args[1..].iter().map(String::as_str).collect();
            build::build(&filters).map(|_| ())
        }
        Some("build") => build::build_all().map(|_| ()),
        Some("test") => test(&args[1..]),
        Some("demo") => demo::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("bench-global") => bench_global::run(&args[1..]),
        Some("push") => oci::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("soak") => soak::run(&args[1..]),
        Some("upstreams") => demo::upstreams(),
        Some("schemas") => mesh_testkit::schemas::write_all(),
        Some("envoy") => mesh_testkit::envoy_binary().map(|p| println!("{}", p.display())),
        Some("helm-schema") => helm_schema(),
        Some("helm-render") => helm_render(),
        _ => Err(
            "usage: cargo xtask build | test | demo | bench | bench-global | push | upstreams | schemas | envoy \
| helm-schema | helm-render"
                .to_string(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn helm_schema() -> Result<(), String> {
    let path = mesh_testkit::helm::values_schema_path();
    if mesh_testkit::helm::write_values_schema()? {
        println!("wrote {}", path.display());
    } else {
        println!("{} is up to date", path.display());
    }
    Ok(())
}

fn helm_render() -> Result<(), String> {
    let dir = mesh_testkit::repo_root().join("target/helm/rendered");
    for path in mesh_testkit::helm::render_value_files(&dir)? {
        println!("{}", path.display());
    }
    Ok(())
}

/// Runs a command, failing with its description if it fails.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed ({status})"))
    }
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The whole suite, as CI runs it: build the filters, make sure Envoy is
/// there, check formatting and lints, then every unit, property and
/// integration test. Extra arguments go to `cargo test` (e.g. a test name).
fn test(extra: &[String]) -> Result<(), String> {
    let started = std::time::Instant::now();
    let toolchain = build::build_all()?;
    let envoy = mesh_testkit::envoy_binary()?;
    println!("==> envoy: {}", envoy.display());
    println!("==> cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    println!("==> cargo clippy (host, and the wasm adapters)");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]))?;
    build::clippy_wasm(&toolchain)?;
    fuzz::ci()?;
    // Istio's code takes minutes to build on a fresh machine: built here,
    // before the tests, a failed build or module download says so plainly.
    println!("==> go build istio-fetch (Istio's own fetcher, for the image tests)");
    mesh_testkit::istio::fetcher()?;
    println!("==> cargo test");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"])
        .args(extra)
        .env("ENVOY_BIN", &envoy);
    run(&mut cmd)?;
    println!("==> all tests passed in {:.0?}", started.elapsed());
    Ok(())
}
