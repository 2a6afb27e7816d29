//! `cargo xtask bench`: what each filter costs per request through a real
//! Envoy, side by side with the baselines, in one run (BENCHMARKS.md).
//!
//! The cases are the Envoy configurations in `envoy/bench/` (one file each,
//! fixed ports, so a user can run any of them by hand); this file only runs
//! them. Every case has the same routes to the same fast local upstream (an
//! Envoy answering 200 itself, `envoy/bench/upstream.yaml`), so only the HTTP
//! filters differ. Steps:
//!
//! 1. build the filters and the no-op filter (`filters/noop`), wasm-opt
//!    copies in `target/bench/wasm-opt/`, and record the sizes;
//! 2. time from starting Envoy to its first answered request, per case;
//! 3. start one Envoy per case (`--concurrency 1`) and load each with `wrk`
//!    in interleaved rounds (A B C … A B C …), recording requests/s, latency
//!    and Envoy's CPU time per request; medians over the rounds;
//! 4. Envoy's resident memory after a million requests with distinct keys;
//! 5. Envoy's instructions per request under valgrind's callgrind, per case
//!    and per kind of host call (`filters/hostcall-cost`): deterministic
//!    counts, so the ratios do not move with the machine's load;
//! 6. write `target/bench/results.json` and `target/bench/results.md`.
//!
//! A case whose module is missing, a stub, refused by Envoy or not answering
//! 200 is reported as "not available" with the reason, and the rest still run.
//!
//! This file holds the options and the order of the steps; the rest, by concern:
//! - `cases`: a case's configuration file, one Envoy running it (`Running`),
//!   requests with the wrk script's headers, waiting until it answers;
//! - `wrk`: running wrk and reading its result line, the interleaved rounds;
//! - `callgrind`: Envoy under valgrind, instructions per case and per host call;
//! - `memory`: Envoy's resident memory (distinct keys; several workers);
//! - `sizes`: building the modules and their sizes;
//! - `hostcall_counts`: each case's host calls per request, counted by callgrind;
//! - `report`: the tables of results.md; `targets`: the targets and each
//!   filter's own work; `json`: results.json.

pub(crate) mod callgrind;
pub(crate) mod cases;
mod hostcall_counts;
mod json;
mod memory;
mod report;
mod sizes;
mod targets;
pub(crate) mod wrk;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use callgrind::{measure_instructions, Valgrind};
use cases::{measure_startup, Case, Running};
use memory::{measure_memory, measure_worker_memory, WORKERS};
use report::Report;
use sizes::{build_modules, measure_sizes};
use wrk::{measure_throughput, WARMUP_SECONDS};

pub(crate) const USAGE: &str = "usage: cargo xtask bench [--rounds N] [--seconds S] [--connections C] \
[--keys K] [--memory-requests N] [--counted-requests N] [--cases a,b,...] [--port-offset N] [--modules DIR] [--no-instructions] [--no-build]";

/// The cases in the order they run in every round; `envoy/bench/<name>.yaml`.
pub(crate) const CASES: &[&str] = &[
    "router",
    "noop",
    "native-ratelimit",
    "native-ratelimit-keyed",
    "ratelimit",
    "circuit-breaker",
    "lb-hints",
    "metrics",
    "all-four",
    "suite",
    "four-noop",
    "noop-wasm-opt",
    "ratelimit-as-built",
];
/// `envoy/bench/upstream.yaml`: the Envoy answering every case's requests.
pub(crate) const UPSTREAM: &str = "upstream";
/// What every ratio is taken against.
pub(crate) const BASELINE: &str = "router";
pub(crate) const NOOP: &str = "noop";
/// Our four filters: each compared with `noop`; `all-four` with `four-noop`.
pub(crate) const CHAIN: &str = "all-four";
pub(crate) const CHAIN_FLOOR: &str = "four-noop";
/// The four policies in one module (`filters/suite`), configured as `all-four`.
pub(crate) const SUITE: &str = "suite";
/// Cases whose start-up time is measured (module load grows with size).
pub(crate) const STARTUP_CASES: &[&str] = &[
    "router",
    "noop",
    "noop-wasm-opt",
    "ratelimit",
    "ratelimit-as-built",
    "circuit-breaker",
    "lb-hints",
    "metrics",
    "all-four",
    "suite",
];
/// Cases whose memory is measured after `--memory-requests` distinct keys:
/// all-four holds the keyed state of ratelimit and the label sets of metrics.
/// (A million requests take about three minutes through it on the 2-core
/// machine; the router alone, measured in earlier runs, grew by 1.2 MiB.)
pub(crate) const MEMORY_CASES: &[&str] = &["all-four"];
/// Cases whose memory is measured with `memory::WORKERS` workers (a VM per
/// worker and plugin): the router alone, four VMs per worker, one per worker.
pub(crate) const WORKER_MEMORY_CASES: &[&str] = &["router", "all-four", "suite"];
/// Cases that differ from `noop` / `ratelimit` only in how the module was
/// optimized: their instructions per request are not counted under callgrind.
pub(crate) const SIZE_VARIANTS: &[&str] = &["noop-wasm-opt", "ratelimit-as-built"];
/// `envoy/bench/hostcall-cost.yaml`: the host-call pricer (`filters/hostcall-cost`).
pub(crate) const HOSTCALL_CASE: &str = "hostcall-cost";
/// Calls per request when pricing a kind of host call.
pub(crate) const HOSTCALLS_PER_REQUEST: u64 = 10;

/// Targets (issue 16, by instructions per request; sizes and the chain from issue 8).
pub(crate) const TARGET_SUITE: f64 = 300_000.0;
/// A filter's cost over noop minus the priced host calls it makes.
pub(crate) const TARGET_OWN_WORK: f64 = 2_000.0;
pub(crate) const TARGET_RATELIMIT_OVER_ROUTER: f64 = 50_000.0;
pub(crate) const TARGET_CHAIN_VS_FOUR_NOOP: f64 = 0.90;
pub(crate) const TARGET_SIZE_BYTES: u64 = 200 * 1024;
/// The suite module holds all four policies: its own, larger size target (issue 14).
pub(crate) const TARGET_SUITE_SIZE_BYTES: u64 = 320 * 1024;

/// Smaller than this, a `.wasm` in dist/ is a placeholder, not a filter.
pub(crate) const STUB_BYTES: u64 = 1024;
pub(crate) const PATH: &str = "/api/items";

pub(crate) struct Options {
    pub(crate) rounds: usize,
    pub(crate) seconds: u32,
    pub(crate) connections: u32,
    pub(crate) keys: u32,
    pub(crate) memory_requests: u64,
    /// Requests counted per case under callgrind (after half as many for
    /// warm-up; the host-call pricer counts 30% as many per kind of call).
    pub(crate) counted_requests: u64,
    pub(crate) cases: Vec<String>,
    pub(crate) instructions: bool,
    pub(crate) build: bool,
    /// Added to every port of the case files (run copies under target/bench/cases/).
    pub(crate) port_offset: u16,
    /// Where the cases load the modules from instead of dist/ (relative to
    /// the repository root), e.g. a copy of dist/ built from another commit.
    pub(crate) modules: Option<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options {
            rounds: 5,
            seconds: 3,
            connections: 16,
            keys: 10_000,
            memory_requests: 1_000_000,
            counted_requests: 1000,
            cases: CASES.iter().map(|c| c.to_string()).collect(),
            instructions: true,
            build: true,
            port_offset: 0,
            modules: None,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value; {USAGE}"))
            };
            let number = |s: String| -> Result<u64, String> {
                s.parse().map_err(|_| format!("{arg}: not a number: {s}"))
            };
            match arg.as_str() {
                "--rounds" => o.rounds = number(value(arg)?)? as usize,
                "--seconds" => o.seconds = number(value(arg)?)? as u32,
                "--connections" => o.connections = number(value(arg)?)? as u32,
                "--keys" => o.keys = number(value(arg)?)? as u32,
                "--memory-requests" => o.memory_requests = number(value(arg)?)?,
                "--counted-requests" => o.counted_requests = number(value(arg)?)?.max(100),
                "--cases" => {
                    o.cases = value(arg)?.split(',').map(str::to_string).collect();
                    if let Some(bad) = o.cases.iter().find(|c| !CASES.contains(&c.as_str())) {
                        return Err(format!("unknown case {bad}; cases: {}", CASES.join(", ")));
                    }
                }
                "--port-offset" => {
                    o.port_offset = u16::try_from(number(value(arg)?)?)
                        .ok()
                        .filter(|n| *n < 1000)
                        .ok_or("--port-offset must be below 1000")?
                }
                "--modules" => o.modules = Some(value(arg)?.trim_end_matches('/').to_string()),
                "--no-build" => o.build = false,
                "--no-instructions" => o.instructions = false,
                "-h" | "--help" => return Err(USAGE.to_string()),
                other => return Err(format!("unknown argument {other}; {USAGE}")),
            }
        }
        if o.rounds < 3 {
            return Err("--rounds must be at least 3 (medians of interleaved rounds)".into());
        }
        if o.seconds == 0 || o.connections == 0 || o.keys == 0 {
            return Err("--seconds, --connections and --keys must be positive".into());
        }
        Ok(o)
    }
}

fn command_line(args: &[String]) -> String {
    std::iter::once("cargo xtask bench".to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn run(args: &[String]) -> Result<(), String> {
    let started = Instant::now();
    let opts = Options::parse(args)?;
    let root = mesh_testkit::repo_root();
    let out_dir = root.join("target/bench");
    fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let wrk = wrk::ensure()?;
    let envoy = mesh_testkit::envoy_binary()?;
    let mut report = Report {
        command: command_line(args),
        envoy_version: envoy_version(&envoy),
        wrk_version: wrk::version(&wrk),
        load_before: load_average(),
        ..Report::default()
    };

    println!("==> building");
    let built_dir = build_modules(opts.build)?;
    report.sizes = measure_sizes(&root, &out_dir, &built_dir);

    // The upstream every case routes to; it runs until the bench ends.
    let upstream_case = Case::load_for(&root, UPSTREAM, &opts)?;
    let mut upstream = Running::start(&envoy, &root, &upstream_case)?;
    upstream
        .wait_answering(&upstream_case, Instant::now())
        .map_err(|e| format!("the upstream (envoy/bench/{UPSTREAM}.yaml) did not start: {e}"))?;

    let cases: Vec<Case> = opts
        .cases
        .iter()
        .map(|name| Case::load_for(&root, name, &opts))
        .collect::<Result<_, _>>()?;

    println!("==> time from starting Envoy to its first answered request (median of 3)");
    for case in cases
        .iter()
        .filter(|c| STARTUP_CASES.contains(&c.name.as_str()))
    {
        let result = measure_startup(&envoy, &root, case);
        match &result {
            Ok(ms) => println!("    {:<20} {:>6.0} ms", case.name, median(ms)),
            Err(why) => println!("    {:<20} not available: {why}", case.name),
        }
        report.startup.push((case.name.clone(), result));
    }

    println!(
        "==> throughput: {} rounds x {} cases, wrk -t1 -c{} -d{}s, {} keys",
        opts.rounds,
        cases.len(),
        opts.connections,
        opts.seconds,
        opts.keys
    );
    report.throughput = measure_throughput(&envoy, &wrk, &root, &cases, &opts);

    println!(
        "==> memory after {} requests, each with a new key",
        opts.memory_requests
    );
    for case in cases
        .iter()
        .filter(|c| MEMORY_CASES.contains(&c.name.as_str()))
    {
        let result = measure_memory(&envoy, &wrk, &root, case, &opts);
        match &result {
            Ok(m) => println!(
                "    {:<20} {:>7} KiB at start, {:>7} KiB after {} requests",
                case.name, m.rss_start_kib, m.rss_after_kib, m.requests
            ),
            Err(why) => println!("    {:<20} not available: {why}", case.name),
        }
        report.memory.push((case.name.clone(), result));
    }

    println!("==> Envoy's resident memory with --concurrency {WORKERS}, after warm-up");
    for case in cases
        .iter()
        .filter(|c| WORKER_MEMORY_CASES.contains(&c.name.as_str()))
    {
        let result = measure_worker_memory(&envoy, &wrk, &root, case, &opts);
        match &result {
            Ok(m) => println!(
                "    {:<20} VmRSS {:>7} KiB (allocator: {} KiB allocated, {} KiB heap)",
                case.name, m.rss_kib, m.allocated_kib, m.heap_kib
            ),
            Err(why) => println!("    {:<20} not available: {why}", case.name),
        }
        report.worker_memory.push((case.name.clone(), result));
    }

    if opts.instructions {
        println!(
            "==> instructions per request under callgrind ({} requests per case after half as many for warm-up), \
             and what one host call costs (filters/hostcall-cost, {HOSTCALLS_PER_REQUEST} calls per request)",
            opts.counted_requests
        );
        match Valgrind::ensure() {
            Ok(valgrind) => {
                report.valgrind_version = valgrind.version();
                let (instructions, hostcalls) =
                    measure_instructions(&valgrind, &envoy, &root, &cases, &opts);
                report.instructions = instructions;
                report.hostcalls = Some(hostcalls);
                let counts = out_dir.join("hostcall-counts.md");
                match hostcall_counts::count(&out_dir.join("callgrind"), &opts) {
                    Ok(table) => {
                        println!("    host calls per request, counted (minus noop's):\n{table}");
                        let _ = fs::write(&counts, table);
                    }
                    Err(why) => println!("    host calls per request not counted: {why}"),
                }
            }
            Err(why) => println!("    not available: {why}"),
        }
    }

    drop(upstream);
    report.load_after = load_average();
    report.elapsed = started.elapsed();
    report.settings = format!(
        "Envoy --concurrency 1; wrk -t1 -c{} -d{}s --latency -s envoy/bench/keys.lua -- {}; {} interleaved rounds; \
         warm-up {}s per case",
        opts.connections, opts.seconds, opts.keys, opts.rounds, WARMUP_SECONDS
    );
    let json = json::render(&report)?;
    let markdown = report.markdown();
    let json_path = out_dir.join("results.json");
    let md_path = out_dir.join("results.md");
    fs::write(&json_path, &json).map_err(|e| format!("{}: {e}", json_path.display()))?;
    fs::write(&md_path, &markdown).map_err(|e| format!("{}: {e}", md_path.display()))?;
    println!("\n{markdown}");
    println!(
        "==> wrote {} and {} in {:.0?}",
        md_path.display(),
        json_path.display(),
        report.elapsed
    );
    Ok(())
}

// ---------------------------------------------------------------- helpers

pub(crate) fn envoy_version(envoy: &Path) -> String {
    Command::new(envoy)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split("version: ")
                .nth(1)
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

pub(crate) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub(crate) fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
