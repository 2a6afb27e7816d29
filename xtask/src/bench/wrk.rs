//! wrk: running it against a case, reading the result line the bench's Lua
//! script prints (`envoy/bench/keys.lua`), and the interleaved rounds.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;

use super::cases::{Case, Running};
use super::{first_line, json, Options, PATH};

pub(crate) const WARMUP_SECONDS: u32 = 2;

/// One wrk run (the keys are those of results.json's rounds).
#[derive(Clone, Copy, Default, Serialize)]
pub(crate) struct Sample {
    pub(crate) requests: u64,
    #[serde(serialize_with = "json::three_decimals")]
    pub(crate) rps: f64,
    #[serde(serialize_with = "json::three_decimals")]
    pub(crate) p50_us: f64,
    #[serde(serialize_with = "json::three_decimals")]
    pub(crate) p99_us: f64,
    #[serde(serialize_with = "json::three_decimals")]
    pub(crate) cpu_us_per_request: f64,
    #[serde(skip)]
    pub(crate) non_2xx: u64,
    pub(crate) socket_errors: u64,
}

/// How wrk loads a case: `wrk -t1 -c<connections> -d<seconds>s --latency
/// -s envoy/bench/keys.lua <url> -- <keys> [unique]`.
#[derive(Clone, Copy)]
pub(crate) struct Load {
    pub(crate) connections: u32,
    /// Distinct keys the script cycles through.
    pub(crate) keys: u32,
    pub(crate) seconds: u32,
    /// A new key on every request instead.
    pub(crate) unique: bool,
}

impl Load {
    pub(crate) fn of(opts: &Options, seconds: u32, unique: bool) -> Load {
        Load {
            connections: opts.connections,
            keys: opts.keys,
            seconds,
            unique,
        }
    }
}

/// The rounds of one case.
pub(crate) struct Throughput {
    pub(crate) case: String,
    pub(crate) description: String,
    pub(crate) file: String,
    pub(crate) result: Result<Vec<Sample>, String>,
    /// Our filters' non-zero counters after the rounds: evidence that each
    /// filter did its work (allowed, picked, recorded) on every request.
    pub(crate) counters: Vec<String>,
}

/// Every case started once and warmed up, then `--rounds` interleaved
/// rounds of wrk over all of them.
pub(crate) fn measure_throughput(
    envoy: &Path,
    wrk: &Path,
    root: &Path,
    cases: &[Case],
    opts: &Options,
) -> Vec<Throughput> {
    // Start every case once; keep them all up through the rounds.
    let mut running: Vec<Result<Running, String>> = cases
        .iter()
        .map(|case| {
            if let Some(why) = case.unavailable(root) {
                return Err(why);
            }
            let mut r = Running::start(envoy, root, case)?;
            r.wait_answering(case, Instant::now())?;
            Ok(r)
        })
        .collect();
    for (case, r) in cases.iter().zip(running.iter_mut()) {
        if let Ok(envoy) = r {
            // Warm-up (V8 tiering, buckets and stats created): not recorded.
            if let Err(e) = run(
                wrk,
                envoy,
                case.listener_port,
                Load::of(opts, WARMUP_SECONDS, false),
            ) {
                *r = Err(format!("warm-up failed: {e}"));
            }
        }
    }
    for (case, r) in cases.iter().zip(&running) {
        if let Err(why) = r {
            println!("    {:<20} not available: {why}", case.name);
        }
    }
    let mut samples: Vec<Vec<Sample>> = cases.iter().map(|_| Vec::new()).collect();
    let mut failures: Vec<Option<String>> = cases.iter().map(|_| None).collect();
    for round in 1..=opts.rounds {
        let mut line = format!("    round {round}:");
        for (i, case) in cases.iter().enumerate() {
            let Ok(envoy) = &running[i] else { continue };
            if failures[i].is_some() {
                continue;
            }
            match run(
                wrk,
                envoy,
                case.listener_port,
                Load::of(opts, opts.seconds, false),
            ) {
                Ok(s) => {
                    let _ = write!(line, " {}={:.0}", case.name, s.rps);
                    samples[i].push(s);
                }
                Err(e) => failures[i] = Some(e),
            }
        }
        println!("{line}");
    }
    cases
        .iter()
        .zip(running)
        .zip(samples.into_iter().zip(failures))
        .map(|((case, r), (s, failure))| Throughput {
            counters: if r.is_ok() {
                filter_counters(case.admin_port)
            } else {
                Vec::new()
            },
            case: case.name.clone(),
            description: case.description.clone(),
            file: format!("envoy/bench/{}.yaml", case.name),
            result: match (r, failure) {
                (Err(why), _) => Err(why),
                (Ok(_), Some(why)) => Err(why),
                (Ok(_), None) => Ok(s),
            },
        })
        .collect()
}

/// `wasmcustom.*` counters above zero, as Envoy's admin lists them (histograms,
/// which have no single value, are left out).
pub(crate) fn filter_counters(admin_port: u16) -> Vec<String> {
    mesh_testkit::http::get(admin_port, "/stats?filter=wasmcustom", &[])
        .map(|r| r.body_text())
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.rsplit_once(": ")
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                .is_some_and(|v| v > 0)
        })
        .map(str::to_string)
        .collect()
}

/// Runs wrk against the listener on `port` of `envoy` and reads its result
/// (and Envoy's CPU time meanwhile). Fails when no request completed or any
/// answer was not 2xx: a filter answering locally (429, 503) does less work,
/// and the case would not measure what it says.
pub(crate) fn run(wrk: &Path, envoy: &Running, port: u16, load: Load) -> Result<Sample, String> {
    let cpu_before = envoy.cpu_ns();
    let mut cmd = Command::new(wrk);
    cmd.current_dir(mesh_testkit::repo_root())
        .args(["-t1", "--latency", "-s", "envoy/bench/keys.lua"])
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.seconds))
        .arg(format!("http://127.0.0.1:{port}{PATH}"))
        .arg("--")
        .arg(load.keys.to_string());
    if load.unique {
        cmd.arg("unique");
    }
    let out = cmd.output().map_err(|e| format!("wrk: {e}"))?;
    let cpu_ns = envoy.cpu_ns().saturating_sub(cpu_before);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .ok_or_else(|| {
            format!(
                "wrk printed no result ({}): {}",
                out.status,
                first_line(&String::from_utf8_lossy(&out.stderr))
            )
        })?;
    let sample = parse_result(line, cpu_ns);
    if sample.requests == 0 {
        return Err("wrk completed no request".into());
    }
    if sample.non_2xx > 0 {
        return Err(format!(
            "{} of {} answers were not 2xx: the case is not measuring what it says",
            sample.non_2xx, sample.requests
        ));
    }
    Ok(sample)
}

/// The JSON object keys.lua prints after `BENCH ` (latencies in µs), with
/// Envoy's CPU time over the run; a missing field reads as 0.
pub(crate) fn parse_result(line: &str, cpu_ns: u64) -> Sample {
    let doc: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
    let field = |name: &str| {
        doc.get(name)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    let requests = field("requests") as u64;
    let duration_s = field("duration_us") / 1e6;
    Sample {
        requests,
        rps: if duration_s > 0.0 {
            requests as f64 / duration_s
        } else {
            0.0
        },
        p50_us: field("p50_us"),
        p99_us: field("p99_us"),
        cpu_us_per_request: if requests > 0 {
            cpu_ns as f64 / 1000.0 / requests as f64
        } else {
            0.0
        },
        non_2xx: field("non_2xx_3xx") as u64,
        socket_errors: field("socket_errors") as u64,
    }
}

/// wrk from Debian (`mesh_testkit::debian::ensure`: installed when missing
/// and running as root).
pub(crate) fn ensure() -> Result<PathBuf, String> {
    mesh_testkit::debian::ensure("wrk", "wrk")
}

pub(crate) fn version(wrk: &Path) -> String {
    Command::new(wrk)
        .arg("--version")
        .output()
        .map(|o| first_line(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::parse_result;

    #[test]
    fn reads_the_result_line_of_keys_lua() {
        let line = r#"{"requests": 30000, "duration_us": 2000000, "p50_us": 950, "p99_us": 2710.5, "non_2xx_3xx": 0, "socket_errors": 2}"#;
        let s = parse_result(line, 1_500_000_000);
        assert_eq!(s.requests, 30000);
        assert_eq!(s.rps, 15000.0);
        assert_eq!((s.p50_us, s.p99_us), (950.0, 2710.5));
        assert_eq!(s.cpu_us_per_request, 50.0);
        assert_eq!((s.non_2xx, s.socket_errors), (0, 2));
        let refused = parse_result(
            r#"{"requests": 10, "duration_us": 1000000, "non_2xx_3xx": 3}"#,
            0,
        );
        assert_eq!((refused.requests, refused.non_2xx), (10, 3));
        assert_eq!(parse_result("not json", 0).requests, 0);
    }
}
