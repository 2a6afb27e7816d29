//! `target/bench/results.json`: the report, machine-readable, with every
//! round, written with serde. Numbers have three decimals (null when not
//! finite); a case that could not be measured reads
//! `{"case": …, "available": false, "reason": …}`.

use serde::{Serialize, Serializer};

use super::callgrind::Hostcalls;
use super::report::{Medians, Ratio, Report};
use super::wrk::Sample;
use super::{median, BASELINE, HOSTCALLS_PER_REQUEST, NOOP};

/// A number as results.json gives it: three decimals, null when not finite.
fn rounded(x: f64) -> Option<f64> {
    x.is_finite().then(|| (x * 1000.0).round() / 1000.0)
}

/// `serialize_with` for the `f64` fields of the result structs.
pub(crate) fn three_decimals<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    rounded(*x).serialize(s)
}

/// `serialize_with` for a result that may have failed: its value, or null.
pub(crate) fn ok_or_null<T: Serialize, S: Serializer>(
    r: &Result<T, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    r.as_ref().ok().serialize(s)
}

/// One case's entry: its name, then what was measured or why not.
#[derive(Serialize)]
struct Entry<'a, T: Serialize> {
    case: &'a str,
    #[serde(flatten)]
    outcome: Outcome<'a, T>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Outcome<'a, T: Serialize> {
    Measured(T),
    Unavailable { available: bool, reason: &'a str },
}

fn entry<'a, U, T: Serialize>(
    case: &'a str,
    result: &'a Result<U, String>,
    measured: impl FnOnce(&'a U) -> T,
) -> Entry<'a, T> {
    let outcome = match result {
        Ok(value) => Outcome::Measured(measured(value)),
        Err(why) => Outcome::Unavailable {
            available: false,
            reason: why,
        },
    };
    Entry { case, outcome }
}

#[derive(Serialize)]
struct Json<'a> {
    command: &'a str,
    settings: &'a str,
    envoy: &'a str,
    wrk: &'a str,
    load_average_before: &'a str,
    load_average_after: &'a str,
    elapsed_seconds: Option<f64>,
    cases: Vec<CaseJson<'a>>,
    sizes: &'a [super::sizes::Size],
    startup: Vec<Entry<'a, Startup>>,
    memory: Vec<Entry<'a, &'a super::memory::Memory>>,
    worker_memory: Vec<Entry<'a, &'a super::memory::WorkerMemory>>,
    valgrind: &'a str,
    instructions: Vec<Entry<'a, Instructions>>,
    hostcall_cost: Option<HostcallsJson<'a>>,
    targets: Vec<Target>,
}

/// A throughput case: its file and counters, then its medians and rounds.
#[derive(Serialize)]
struct CaseJson<'a> {
    case: &'a str,
    file: &'a str,
    description: &'a str,
    filter_counters: &'a [String],
    available: bool,
    #[serde(flatten)]
    measured: Option<Rounds<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Rounds<'a> {
    median: Medians,
    vs_router: Option<Ratio>,
    vs_noop: Option<Ratio>,
    rounds: &'a [Sample],
}

#[derive(Serialize)]
struct Startup {
    median_ms: Option<f64>,
    runs_ms: Vec<Option<f64>>,
}

#[derive(Serialize)]
struct Instructions {
    per_request: Option<f64>,
    vs_router: Option<f64>,
    vs_noop: Option<f64>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum HostcallsJson<'a> {
    Priced {
        calls_per_request: u64,
        base_per_request: Option<f64>,
        calls: Vec<Call<'a>>,
    },
    Unavailable {
        available: bool,
        reason: &'a str,
    },
}

#[derive(Serialize)]
struct Call<'a> {
    call: &'a str,
    instructions: Option<f64>,
}

#[derive(Serialize)]
struct Target {
    target: String,
    measured: String,
    met: Option<bool>,
}

fn hostcalls(h: &Result<Hostcalls, String>) -> HostcallsJson<'_> {
    match h {
        Ok(h) => HostcallsJson::Priced {
            calls_per_request: HOSTCALLS_PER_REQUEST,
            base_per_request: rounded(h.base),
            calls: h
                .costs
                .iter()
                .map(|(call, i)| Call {
                    call,
                    instructions: rounded(*i),
                })
                .collect(),
        },
        Err(why) => HostcallsJson::Unavailable {
            available: false,
            reason: why,
        },
    }
}

/// results.json of `report`.
pub(crate) fn render(report: &Report) -> Result<String, String> {
    let m = report.medians();
    let cases = report
        .throughput
        .iter()
        .map(|t| {
            let measured = match (&t.result, m.get(&t.case)) {
                (Ok(samples), Some(x)) => Some(Rounds {
                    median: *x,
                    vs_router: Report::versus(&m, &t.case, BASELINE),
                    vs_noop: Report::versus(&m, &t.case, NOOP),
                    rounds: samples,
                }),
                _ => None,
            };
            CaseJson {
                case: &t.case,
                file: &t.file,
                description: &t.description,
                filter_counters: &t.counters,
                available: measured.is_some(),
                reason: match measured {
                    Some(_) => None,
                    None => Some(t.result.as_ref().err().map_or("", String::as_str)),
                },
                measured,
            }
        })
        .collect();
    let json = Json {
        command: &report.command,
        settings: &report.settings,
        envoy: &report.envoy_version,
        wrk: &report.wrk_version,
        load_average_before: &report.load_before,
        load_average_after: &report.load_after,
        elapsed_seconds: rounded(report.elapsed.as_secs_f64()),
        cases,
        sizes: &report.sizes,
        startup: report
            .startup
            .iter()
            .map(|(case, r)| {
                entry(case, r, |ms| Startup {
                    median_ms: rounded(median(ms)),
                    runs_ms: ms.iter().map(|v| rounded(*v)).collect(),
                })
            })
            .collect(),
        memory: report
            .memory
            .iter()
            .map(|(case, r)| entry(case, r, |m| m))
            .collect(),
        worker_memory: report
            .worker_memory
            .iter()
            .map(|(case, r)| entry(case, r, |m| m))
            .collect(),
        valgrind: &report.valgrind_version,
        instructions: report
            .instructions
            .iter()
            .map(|(case, r)| {
                entry(case, r, |i| Instructions {
                    per_request: rounded(*i),
                    vs_router: report.instruction_ratio(case, BASELINE).and_then(rounded),
                    vs_noop: report.instruction_ratio(case, NOOP).and_then(rounded),
                })
            })
            .collect(),
        hostcall_cost: report.hostcalls.as_ref().map(hostcalls),
        targets: report
            .targets()
            .into_iter()
            .map(|(target, measured, met)| Target {
                target,
                measured,
                met,
            })
            .collect(),
    };
    serde_json::to_string_pretty(&json)
        .map(|s| s + "\n")
        .map_err(|e| format!("results.json: {e}"))
}
