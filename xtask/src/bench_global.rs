//! `cargo xtask bench-global`: the ratelimit filter's global mode against
//! Envoy's native `envoy.filters.http.ratelimit`, both asking the same
//! envoyproxy/ratelimit on the same Redis with the same descriptor
//! (BENCHMARKS.md, "Global rate limiting").
//!
//! The cases are `envoy/bench/global/mesh.yaml`, `mesh-batch.yaml` (the same
//! with batched calls, `max_batch`) and `native.yaml` (fixed
//! ports of their own, so this runs next to `cargo xtask bench`; the service
//! on 127.0.0.1:18291), in front of an upstream answering 200 itself
//! (`envoy/bench/global/upstream.yaml`), run with bench.rs's pieces. Two loads:
//!
//! - (a) `under`: 10 000 keys cycling, all far under their limit
//!   (`envoy/bench/global/rls-a.yml`): every request is allowed;
//! - (b) `over`: one key over its limit (`rls-b.yml`): every request after
//!   the first is rejected.
//!
//! For each: requests/s, p50/p99 latency and Envoy's CPU time per request
//! under wrk (interleaved rounds, medians), calls to the service per request
//! (the `rls` cluster's `upstream_rq_total`, and Redis' `INCRBY`s), and
//! Envoy's instructions per request under callgrind (the requests one after
//! another, then over `--counted-connections` at once), with the router alone
//! and the no-op Wasm filter in the same layout (`global/router.yaml`,
//! `global/noop.yaml`) for the floor of any Wasm filter.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use mesh_testkit::rls::{RateLimitService, Redis};

use crate::bench::callgrind::{Counted, Valgrind};
use crate::bench::cases::{Case, Running};
use crate::bench::{self, wrk};

const USAGE: &str = "usage: cargo xtask bench-global [--rounds N] [--seconds S] [--connections C] \
                     [--counted-requests N] [--counted-connections C] [--no-instructions] [--no-build] \
                     [--case mesh|mesh-batch|native]... \
                     [--no-floor] [--port-offset N]";

/// The gRPC port the cases' `rls` cluster names.
const RLS_PORT: u16 = 18291;
const CASES: [&str; 3] = ["global/mesh", "global/mesh-batch", "global/native"];
/// The floor of a Wasm filter in the same layout: the router alone, the
/// no-op module (filters/noop), and our filter doing no limiting work (its
/// rule's key header is never sent).
const FLOOR_CASES: [&str; 3] = ["global/router", "global/noop", "global/idle"];
const PATH: &str = "/api/items";

struct Load {
    name: &'static str,
    what: &'static str,
    rls_config: &'static str,
    keys: u32,
}

const LOADS: [Load; 2] = [
    Load {
        name: "under",
        what: "(a) 10 000 keys, all under their limits",
        rls_config: "envoy/bench/global/rls-a.yml",
        keys: 10_000,
    },
    Load {
        name: "over",
        what: "(b) one abusive key, over its limit",
        rls_config: "envoy/bench/global/rls-b.yml",
        keys: 1,
    },
];

struct Options {
    rounds: usize,
    seconds: u32,
    connections: u32,
    counted_requests: u64,
    /// The counted run's connections at once, besides one after another.
    counted_connections: u32,
    instructions: bool,
    build: bool,
    /// The cases to run (default both), e.g. only `global/mesh` to profile it.
    cases: Vec<String>,
    /// Count the floor cases (router, noop) under callgrind.
    floor: bool,
    /// Added to every port of the cases and the service (two benches at once).
    port_offset: u16,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options {
            rounds: 3,
            seconds: 5,
            connections: 16,
            counted_requests: 1000,
            counted_connections: 16,
            instructions: true,
            build: true,
            cases: Vec::new(),
            floor: true,
            port_offset: 0,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut number = || -> Result<u64, String> {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("{arg} needs a number; {USAGE}"))
            };
            match arg.as_str() {
                "--rounds" => o.rounds = number()?.max(1) as usize,
                "--seconds" => o.seconds = number()?.max(1) as u32,
                "--connections" => o.connections = number()?.max(1) as u32,
                "--counted-requests" => o.counted_requests = number()?.max(100),
                "--counted-connections" => o.counted_connections = number()?.clamp(2, 64) as u32,
                "--no-instructions" => o.instructions = false,
                "--no-build" => o.build = false,
                "--no-floor" => o.floor = false,
                "--port-offset" => {
                    o.port_offset = u16::try_from(number()?).map_err(|_| USAGE.to_string())?
                }
                "--case" => match it.next().map(String::as_str) {
                    Some(c @ ("mesh" | "mesh-batch" | "native")) => {
                        o.cases.push(format!("global/{c}"))
                    }
                    _ => return Err(format!("--case needs mesh, mesh-batch or native; {USAGE}")),
                },
                _ => return Err(USAGE.to_string()),
            }
        }
        if o.cases.is_empty() {
            o.cases = CASES.iter().map(|c| c.to_string()).collect();
        }
        Ok(o)
    }
}

/// One wrk run against one case.
#[derive(Clone, Copy, Default)]
struct Sample {
    requests: u64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_request: f64,
    /// Answers other than 2xx (429 under load (b)).
    rejected: u64,
    /// Calls to the service per request (the rls cluster's requests).
    rpcs_per_request: f64,
    /// Redis INCRBYs per request (envoyproxy/ratelimit: one per descriptor asked).
    incrby_per_request: f64,
}

/// The `rls` cluster's requests so far (one per call to the service).
fn rls_requests(admin_port: u16) -> u64 {
    mesh_testkit::http::get(
        admin_port,
        "/stats?filter=^cluster\\.rls\\.upstream_rq_total$",
        &[],
    )
    .ok()
    .and_then(|r| {
        let text = r.body_text();
        text.rsplit_once(": ")?.1.trim().parse().ok()
    })
    .unwrap_or(0)
}

/// One GET with the wrk script's headers for key `k`; its status.
fn get(client: &mut mesh_testkit::http::Client, k: u64) -> Result<u16, String> {
    let key = format!("key-{k}");
    client
        .get(PATH, &[("x-api-key", key.as_str())])
        .map(|r| r.status)
        .map_err(|e| format!("GET {PATH}: {e}"))
}

/// `n` GETs over one connection, keys cycling through `keys` from `first`;
/// answers must be 200, or 429 when `rejects`.
fn send(port: u16, n: u64, keys: u32, rejects: bool, first: u64) -> Result<(), String> {
    let mut client = mesh_testkit::http::Client::new(port);
    for i in first..first + n {
        match get(&mut client, i % u64::from(keys) + 1)? {
            200 => {}
            429 if rejects => {}
            s => return Err(format!("answered {s} to GET {PATH}")),
        }
    }
    Ok(())
}

/// `n` GETs as [`send`], over `connections` connections at once (each its
/// own run of keys), as wrk's connections keep requests in flight together.
fn send_at_once(
    port: u16,
    n: u64,
    keys: u32,
    rejects: bool,
    connections: u32,
) -> Result<(), String> {
    let c = u64::from(connections);
    // The first n % c connections send one more: n in all.
    let share = move |i: u64| n / c + u64::from(i < n % c);
    let threads: Vec<_> = (0..c)
        .map(|i| {
            let first: u64 = (0..i).map(share).sum();
            std::thread::spawn(move || send(port, share(i), keys, rejects, first))
        })
        .collect();
    // Every thread is joined before an error is returned.
    let results: Vec<Result<(), String>> = threads
        .into_iter()
        .map(|t| t.join().map_err(|_| "a sender panicked".to_string())?)
        .collect();
    results.into_iter().collect()
}

/// Answering at all (the filter's 429 counts: load (b) rejects at once).
fn probe(port: u16) -> Result<(), String> {
    let mut client = mesh_testkit::http::Client::new(port);
    match get(&mut client, 1)? {
        200 | 429 => Ok(()),
        s => Err(format!("answered {s}")),
    }
}

fn wrk_run(
    wrk: &Path,
    envoy: &Running,
    case: &Case,
    load: &Load,
    redis: &Redis,
    opts: &Options,
    seconds: u32,
) -> Result<Sample, String> {
    let (cpu_before, rpcs_before, incrby_before) = (
        envoy.cpu_ns(),
        rls_requests(case.admin_port),
        redis.calls("incrby"),
    );
    let out = std::process::Command::new(wrk)
        .current_dir(mesh_testkit::repo_root())
        .args(["-t1", "--latency", "-s", "envoy/bench/keys.lua"])
        .arg(format!("-c{}", opts.connections))
        .arg(format!("-d{seconds}s"))
        .arg(format!("http://127.0.0.1:{}{PATH}", case.listener_port))
        .arg("--")
        .arg(load.keys.to_string())
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let cpu_ns = envoy.cpu_ns().saturating_sub(cpu_before);
    let rpcs = rls_requests(case.admin_port).saturating_sub(rpcs_before);
    let incrby = redis.calls("incrby").saturating_sub(incrby_before);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .ok_or_else(|| format!("wrk printed no result ({})", out.status))?;
    let field = |name: &str| -> f64 {
        line.split_once(&format!("\"{name}\": "))
            .and_then(|(_, rest)| rest.split([',', '}']).next()?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let requests = field("requests") as u64;
    if requests == 0 {
        return Err("wrk completed no request".into());
    }
    let n = requests as f64;
    let sample = Sample {
        requests,
        rps: n / (field("duration_us") / 1e6).max(1e-9),
        p50_us: field("p50_us"),
        p99_us: field("p99_us"),
        cpu_us_per_request: cpu_ns as f64 / 1000.0 / n,
        rejected: field("non_2xx_3xx") as u64,
        rpcs_per_request: rpcs as f64 / n,
        incrby_per_request: incrby as f64 / n,
    };
    let expect_rejections = load.keys == 1;
    if (sample.rejected > 0) != expect_rejections || field("socket_errors") > 0.0 {
        return Err(format!(
            "{} of {requests} answers not 2xx, {} socket errors: not the load it claims",
            sample.rejected,
            field("socket_errors")
        ));
    }
    Ok(sample)
}

/// Redis and the service with `load`'s configuration on the cases' port.
fn service(
    root: &Path,
    load: &Load,
    port_offset: u16,
) -> Result<(Redis, RateLimitService), String> {
    let config = fs::read_to_string(root.join(load.rls_config))
        .map_err(|e| format!("{}: {e}", load.rls_config))?;
    let redis = Redis::start();
    let rls = RateLimitService::start_on(redis.port(), &config, RLS_PORT + port_offset);
    Ok((redis, rls))
}

fn start(envoy: &Path, root: &Path, case: &Case) -> Result<Running, String> {
    let running = Running::start(envoy, root, case)?;
    let since = Instant::now();
    loop {
        match probe(case.listener_port) {
            Ok(()) => return Ok(running),
            Err(e) if since.elapsed() > Duration::from_secs(60) => {
                return Err(format!(
                    "{}: not answering after 60 s ({e}); see target/bench/logs/",
                    case.name
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Medians of each load and case's rounds.
fn throughput(
    envoy: &Path,
    wrk: &Path,
    root: &Path,
    cases: &[Case],
    opts: &Options,
) -> Result<Vec<(String, String, Sample)>, String> {
    let mut results = Vec::new();
    for load in &LOADS {
        let (redis, _rls) = service(root, load, opts.port_offset)?;
        let running: Vec<Running> = cases
            .iter()
            .map(|c| start(envoy, root, c))
            .collect::<Result<_, _>>()?;
        let mut samples: Vec<Vec<Sample>> = cases.iter().map(|_| Vec::new()).collect();
        for (case, r) in cases.iter().zip(&running) {
            wrk_run(wrk, r, case, load, &redis, opts, 2)?;
        }
        for round in 1..=opts.rounds {
            let mut line = format!("    {} round {round}:", load.name);
            for (i, (case, r)) in cases.iter().zip(&running).enumerate() {
                let s = wrk_run(wrk, r, case, load, &redis, opts, opts.seconds)?;
                let _ = write!(
                    line,
                    " {}={:.0} req/s {:.3} RPC/req",
                    case.name, s.rps, s.rpcs_per_request
                );
                samples[i].push(s);
            }
            println!("{line}");
        }
        for (case, s) in cases.iter().zip(samples) {
            let m = |f: fn(&Sample) -> f64| bench::median(&s.iter().map(f).collect::<Vec<_>>());
            let median = Sample {
                requests: s.iter().map(|x| x.requests).sum(),
                rps: m(|x| x.rps),
                p50_us: m(|x| x.p50_us),
                p99_us: m(|x| x.p99_us),
                cpu_us_per_request: m(|x| x.cpu_us_per_request),
                rejected: s.iter().map(|x| x.rejected).sum(),
                rpcs_per_request: m(|x| x.rpcs_per_request),
                incrby_per_request: m(|x| x.incrby_per_request),
            };
            results.push((load.name.to_string(), case.name.clone(), median));
        }
    }
    Ok(results)
}

/// Instructions per request under callgrind (and calls to the service per
/// request while counted): each case under each load, then the floor cases.
/// Envoy under valgrind takes minutes to start on a loaded machine, so the
/// Envoys of a phase start together and each serves both loads (the service
/// is restarted with the other configuration in between, on the same port).
fn instructions(
    valgrind: &Valgrind,
    envoy: &Path,
    root: &Path,
    cases: &[Case],
    opts: &Options,
) -> Result<Vec<Count>, String> {
    let dir = root.join("target/bench/callgrind-global");
    let n = opts.counted_requests;
    let start_all = |cases: &[Case], base_id: u32| -> Result<Vec<Counted>, String> {
        let started = Instant::now();
        let mut counted: Vec<Counted> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let name = c.name.replace('/', "-");
                Counted::start(
                    valgrind,
                    envoy,
                    root,
                    &c.file,
                    &dir,
                    &name,
                    base_id + i as u32,
                )
            })
            .collect::<Result<_, _>>()?;
        for (c, case) in counted.iter_mut().zip(cases) {
            let port = case.listener_port;
            c.wait_answering(Duration::from_secs(1800), || probe(port))?;
        }
        println!(
            "    {} under valgrind answering after {:.0} s",
            cases
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            started.elapsed().as_secs_f64()
        );
        Ok(counted)
    };
    let count = |counted: &mut Counted,
                 case: &Case,
                 load: Option<&Load>|
     -> Result<Count, String> {
        let port = case.listener_port;
        let (keys, rejects) = load.map_or((10_000, false), |l| (l.keys, l.keys == 1));
        // After the service's restart the first call may find the old
        // connection gone (a failure, answered 503): wait until it answers.
        let settle = Instant::now();
        while probe(port).is_err() && settle.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(200));
        }
        send(port, n / 2, keys, rejects, 0)?;
        let mut per_request = |at_once: u32| -> Result<(f64, f64), String> {
            let before = rls_requests(case.admin_port);
            let total = counted.count(|| match at_once {
                1 => send(port, n, keys, rejects, 0),
                c => send_at_once(port, n, keys, rejects, c),
            })?;
            let rpcs = rls_requests(case.admin_port).saturating_sub(before) as f64 / n as f64;
            let instr = total as f64 / n as f64;
            println!(
                "    {:<8} {:<18} {at_once:>2} connection(s) {instr:>9.0} instructions/request, {rpcs:.3} RPC/request",
                load.map_or("-", |l| l.name),
                case.name,
            );
            Ok((instr, rpcs))
        };
        Ok(Count {
            load: load.map_or("-", |l| l.name).to_string(),
            case: case.name.clone(),
            serial: per_request(1)?,
            at_once: per_request(opts.counted_connections)?,
        })
    };
    let mut out = Vec::new();
    let mut service_now = Some(service(root, &LOADS[0], opts.port_offset)?);
    let mut counted = start_all(cases, 70)?;
    for load in &LOADS {
        if load.name != LOADS[0].name {
            drop(service_now.take());
            service_now = Some(service(root, load, opts.port_offset)?);
        }
        for (c, case) in counted.iter_mut().zip(cases) {
            out.push(count(c, case, Some(load))?);
        }
    }
    drop(counted);
    drop(service_now);
    if !opts.floor {
        return Ok(out);
    }
    let floors: Vec<Case> = FLOOR_CASES
        .iter()
        .map(|name| Case::load(root, name, opts.port_offset))
        .collect::<Result<_, _>>()?;
    let mut counted = start_all(&floors, 80)?;
    for (c, case) in counted.iter_mut().zip(&floors) {
        out.push(count(c, case, None)?);
    }
    Ok(out)
}

/// One case's instructions and RPCs per request under callgrind, the
/// requests sent one after another (`serial`) and over several connections
/// at once (`at_once`).
struct Count {
    /// The load's name, `-` for a floor case.
    load: String,
    case: String,
    serial: (f64, f64),
    at_once: (f64, f64),
}

/// Goal (a) judged: each of our cases against the native filter plus a Wasm
/// filter's floor (the no-op module over the router, and our filter idle
/// over it), with the requests one after another and several at once.
fn allowance(counted: &[Count], connections: u32) -> String {
    let find = |load: &str, case: &str| counted.iter().find(|c| c.load == load && c.case == case);
    let mut out = String::from("\nGoal (a), ours <= native + floor (instructions per request):\n");
    for (mode, pick) in [
        (
            "1 connection",
            (|c: &Count| c.serial.0) as fn(&Count) -> f64,
        ),
        ("at once", |c: &Count| c.at_once.0),
    ] {
        let (Some(native), Some(router)) =
            (find("under", "global/native"), find("-", "global/router"))
        else {
            return out;
        };
        let mode = if mode == "at once" {
            format!("{connections} connections")
        } else {
            mode.to_string()
        };
        for ours in ["global/mesh", "global/mesh-batch"] {
            let Some(ours_count) = find("under", ours) else {
                continue;
            };
            for (floor_case, what) in [
                ("global/noop", "the no-op module"),
                ("global/idle", "our filter idle"),
            ] {
                let Some(floor) = find("-", floor_case) else {
                    continue;
                };
                let allowed = pick(native) + pick(floor) - pick(router);
                let o = pick(ours_count);
                let _ = writeln!(
                    out,
                    "- {mode}, {ours}, floor = {what} over the router, {:.0}: allowance {allowed:.0}, ours {o:.0}, {} by {:.0} ({:+.1}%)",
                    pick(floor) - pick(router),
                    if o <= allowed { "met" } else { "missed" },
                    (o - allowed).abs(),
                    (o - allowed) / allowed * 100.0
                );
            }
        }
    }
    out
}

pub fn run(args: &[String]) -> Result<(), String> {
    let started = Instant::now();
    let opts = Options::parse(args)?;
    let root = mesh_testkit::repo_root();
    let wrk = wrk::ensure()?;
    let envoy = mesh_testkit::envoy_binary()?;
    if opts.build {
        crate::build::build_all()?;
    }
    let load_before = bench::load_average();
    let upstream_case = Case::load(&root, "global/upstream", opts.port_offset)?;
    let _upstream = start(&envoy, &root, &upstream_case)
        .map_err(|e| format!("the upstream (envoy/bench/global/upstream.yaml): {e}"))?;
    let cases: Vec<Case> = opts
        .cases
        .iter()
        .map(|c| Case::load(&root, c, opts.port_offset))
        .collect::<Result<_, _>>()?;

    println!(
        "==> throughput: {} rounds, wrk -t1 -c{} -d{}s, loads (a) under and (b) over",
        opts.rounds, opts.connections, opts.seconds
    );
    let tput = throughput(&envoy, &wrk, &root, &cases, &opts)?;
    let counted = if opts.instructions {
        println!(
            "==> instructions per request under callgrind ({} requests after {} for warm-up)",
            opts.counted_requests,
            opts.counted_requests / 2
        );
        instructions(&Valgrind::ensure()?, &envoy, &root, &cases, &opts).unwrap_or_else(|e| {
            println!("    not available: {e}");
            Vec::new()
        })
    } else {
        Vec::new()
    };

    let mut md = format!(
        "Envoy {}, {}, `--concurrency 1`; wrk -t1 -c{} -d{}s, {} rounds (medians); load average {} before, {} after; {:.0?} in all.\n\n",
        bench::envoy_version(&envoy),
        wrk::version(&wrk),
        opts.connections,
        opts.seconds,
        opts.rounds,
        load_before,
        bench::load_average(),
        started.elapsed()
    );
    let _ = writeln!(
        md,
        "| load | case | req/s | p50 µs | p99 µs | Envoy CPU µs/req | RPCs/req (rls cluster) | Redis INCRBY/req | rejected | instructions/req (callgrind, 1 connection) | RPCs/req (idem) | instructions/req (callgrind, {c} connections) | RPCs/req (idem) |",
        c = opts.counted_connections
    );
    md.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (load, case, s) in &tput {
        let c = counted.iter().find(|c| &c.load == load && &c.case == case);
        let what = LOADS.iter().find(|l| l.name == load).map_or("", |l| l.what);
        let _ = writeln!(
            md,
            "| {what} | {case} | {:.0} | {:.0} | {:.0} | {:.1} | {:.4} | {:.4} | {} of {} | {} | {} | {} | {} |",
            s.rps,
            s.p50_us,
            s.p99_us,
            s.cpu_us_per_request,
            s.rpcs_per_request,
            s.incrby_per_request,
            s.rejected,
            s.requests,
            c.map_or("-".into(), |c| format!("{:.0}", c.serial.0)),
            c.map_or("-".into(), |c| format!("{:.4}", c.serial.1)),
            c.map_or("-".into(), |c| format!("{:.0}", c.at_once.0)),
            c.map_or("-".into(), |c| format!("{:.4}", c.at_once.1)),
        );
    }
    for c in counted.iter().filter(|c| c.load == "-") {
        let _ = writeln!(
            md,
            "| - | {} (floor) | | | | | | | | {:.0} | | {:.0} | |",
            c.case, c.serial.0, c.at_once.0
        );
    }
    md.push_str(&allowance(&counted, opts.counted_connections));
    let out = root.join("target/bench/global.md");
    let _ = fs::create_dir_all(root.join("target/bench"));
    fs::write(&out, &md).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("\n{md}\n==> wrote {}", out.display());
    Ok(())
}
