//! The results: what one run measured (`Report`), the ratios and targets
//! taken from it, and its tables as markdown (`target/bench/results.md`;
//! `json` writes the same as results.json).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::callgrind::{Hostcalls, PerCase};
use super::memory::{Memory, WorkerMemory};
use super::sizes::{kib, Size};
use super::wrk::{Sample, Throughput};
use super::{json, median, BASELINE, CHAIN, CHAIN_FLOOR, HOSTCALLS_PER_REQUEST, NOOP, SUITE};

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) command: String,
    pub(crate) settings: String,
    pub(crate) envoy_version: String,
    pub(crate) wrk_version: String,
    pub(crate) load_before: String,
    pub(crate) load_after: String,
    pub(crate) elapsed: Duration,
    pub(crate) sizes: Vec<Size>,
    pub(crate) startup: Vec<(String, Result<Vec<f64>, String>)>,
    pub(crate) throughput: Vec<Throughput>,
    pub(crate) memory: Vec<(String, Result<Memory, String>)>,
    /// Memory with `memory::WORKERS` workers, per case.
    pub(crate) worker_memory: PerCase<WorkerMemory>,
    pub(crate) valgrind_version: String,
    /// Envoy instructions per request, per case (callgrind).
    pub(crate) instructions: PerCase<f64>,
    pub(crate) hostcalls: Option<Result<Hostcalls, String>>,
}

/// One case against another.
#[derive(Serialize)]
pub(crate) struct Ratio {
    /// Requests/s ratio: what issue 8 asks for.
    #[serde(serialize_with = "json::three_decimals")]
    pub(crate) rps: f64,
    /// The same from Envoy's CPU time per request (base / case): steadier
    /// than requests/s when other processes compete for the cores.
    #[serde(serialize_with = "json::three_decimals")]
    pub(crate) cpu: f64,
    #[serde(serialize_with = "json::three_decimals")]
    pub(crate) extra_cpu_us: f64,
}

/// Medians over the rounds of one case (and the range of requests/s).
#[derive(Clone, Copy, Serialize)]
pub(crate) struct Medians {
    #[serde(serialize_with = "json::three_decimals")]
    pub(crate) rps: f64,
    #[serde(serialize_with = "json::three_decimals")]
    pub(crate) p50_us: f64,
    #[serde(serialize_with = "json::three_decimals")]
    pub(crate) p99_us: f64,
    #[serde(rename = "cpu_us_per_request", serialize_with = "json::three_decimals")]
    pub(crate) cpu_us: f64,
    #[serde(skip)]
    pub(crate) rps_min: f64,
    #[serde(skip)]
    pub(crate) rps_max: f64,
}

impl Medians {
    pub(crate) fn of(samples: &[Sample]) -> Medians {
        let col = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
        let rps = col(|s| s.rps);
        Medians {
            rps: median(&rps),
            p50_us: median(&col(|s| s.p50_us)),
            p99_us: median(&col(|s| s.p99_us)),
            cpu_us: median(&col(|s| s.cpu_us_per_request)),
            rps_min: rps.iter().copied().fold(f64::INFINITY, f64::min),
            rps_max: rps.iter().copied().fold(0.0, f64::max),
        }
    }
}

impl Report {
    pub(crate) fn medians(&self) -> BTreeMap<String, Medians> {
        self.throughput
            .iter()
            .filter_map(|t| Some((t.case.clone(), Medians::of(t.result.as_ref().ok()?))))
            .collect()
    }

    /// `case` against `base` from the same run.
    pub(crate) fn versus(
        medians: &BTreeMap<String, Medians>,
        case: &str,
        base: &str,
    ) -> Option<Ratio> {
        let (c, b) = (medians.get(case)?, medians.get(base)?);
        Some(Ratio {
            rps: c.rps / b.rps,
            cpu: b.cpu_us / c.cpu_us,
            extra_cpu_us: c.cpu_us - b.cpu_us,
        })
    }

    /// Instructions per request of `case` against `base`: base / case, like
    /// a throughput ratio (1.00 = costs the same; 0.50 = twice the work).
    pub(crate) fn instruction_ratio(&self, case: &str, base: &str) -> Option<f64> {
        Some(self.instructions_of(base)? / self.instructions_of(case)?)
    }

    /// Instructions per request of `case`, if callgrind counted them.
    pub(crate) fn instructions_of(&self, case: &str) -> Option<f64> {
        self.instructions
            .iter()
            .find(|(c, _)| c == case)
            .and_then(|(_, r)| r.as_ref().ok().copied())
    }

    pub(crate) fn markdown(&self) -> String {
        let m = self.medians();
        let mut s = String::new();
        let _ = writeln!(s, "Command: `{}`  ", self.command);
        let _ = writeln!(
            s,
            "Envoy {}, {}; {}  \nLoad average before / after: {} / {}; whole run {:.0} s.\n",
            self.envoy_version,
            self.wrk_version,
            self.settings,
            self.load_before,
            self.load_after,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(s, "### Throughput and latency (medians over the rounds)\n");
        let _ = writeln!(
            s,
            "| case | req/s | range over rounds | x router | x noop | p50 ms | p99 ms | Envoy CPU µs/req | +µs vs router | x router (CPU) | x noop (CPU) |"
        );
        let _ = writeln!(
            s,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for t in &self.throughput {
            match m.get(&t.case) {
                Some(x) => {
                    let vs = |base: &str, f: fn(&Ratio) -> String| {
                        Self::versus(&m, &t.case, base).map_or("-".into(), |r| f(&r))
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {:.0} | {:.0}-{:.0} | {} | {} | {:.2} | {:.2} | {:.1} | {} | {} | {} |",
                        t.case,
                        x.rps,
                        x.rps_min,
                        x.rps_max,
                        vs(BASELINE, |r| format!("{:.2}", r.rps)),
                        vs(NOOP, |r| format!("{:.2}", r.rps)),
                        x.p50_us / 1000.0,
                        x.p99_us / 1000.0,
                        x.cpu_us,
                        vs(BASELINE, |r| format!("{:+.1}", r.extra_cpu_us)),
                        vs(BASELINE, |r| format!("{:.2}", r.cpu)),
                        vs(NOOP, |r| format!("{:.2}", r.cpu)),
                    );
                }
                None => {
                    let why = t.result.as_ref().err().map_or("", String::as_str);
                    let _ = writeln!(
                        s,
                        "| {} | not available: {} | | | | | | | | | |",
                        t.case,
                        why.replace('|', "/")
                    );
                }
            }
        }
        if let Some(r) = Self::versus(&m, CHAIN, CHAIN_FLOOR) {
            let _ = writeln!(
                s,
                "\n{CHAIN} against {CHAIN_FLOOR}: x{:.2} requests/s, x{:.2} by CPU time, {:+.1} µs Envoy CPU per request.",
                r.rps, r.cpu, r.extra_cpu_us
            );
        }
        self.instructions_markdown(&mut s);
        self.own_work_markdown(&mut s);
        let _ = writeln!(
            s,
            "\n### What the filters did: their non-zero counters after the rounds\n"
        );
        for t in self.throughput.iter().filter(|t| !t.counters.is_empty()) {
            let _ = writeln!(s, "- `{}`: `{}`", t.case, t.counters.join("`, `"));
        }
        let _ = writeln!(s, "\n### Module sizes\n");
        let _ = writeln!(
            s,
            "| module | as built | dist/ (shipped) | as built + wasm-opt (the build's passes) |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: |");
        for z in &self.sizes {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                z.module,
                z.as_built.map_or("missing".into(), kib),
                z.dist.map_or("missing".into(), kib),
                z.optimized.as_ref().map_or_else(|e| e.clone(), |b| kib(*b))
            );
        }
        let _ = writeln!(
            s,
            "\n### Time from starting Envoy to the first answered request (median of 3)\n"
        );
        let _ = writeln!(s, "| case | ms | runs |");
        let _ = writeln!(s, "| --- | ---: | --- |");
        for (case, r) in &self.startup {
            match r {
                Ok(ms) => {
                    let runs: Vec<String> = ms.iter().map(|v| format!("{v:.0}")).collect();
                    let _ = writeln!(s, "| {case} | {:.0} | {} |", median(ms), runs.join(", "));
                }
                Err(why) => {
                    let _ = writeln!(s, "| {case} | not available: {} | |", why.replace('|', "/"));
                }
            }
        }
        let _ = writeln!(
            s,
            "\n### Envoy resident memory, a new key on every request\n"
        );
        let _ = writeln!(
            s,
            "| case | requests | RSS at start | RSS after | growth | filter stats |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: |");
        for (case, r) in &self.memory {
            match r {
                Ok(x) => {
                    let _ = writeln!(
                        s,
                        "| {case} | {} | {:.1} MiB | {:.1} MiB | {:+.1} MiB | {} |",
                        x.requests,
                        x.rss_start_kib as f64 / 1024.0,
                        x.rss_after_kib as f64 / 1024.0,
                        (x.rss_after_kib as f64 - x.rss_start_kib as f64) / 1024.0,
                        x.filter_stats
                    );
                }
                Err(why) => {
                    let _ = writeln!(
                        s,
                        "| {case} | not available: {} | | | | |",
                        why.replace('|', "/")
                    );
                }
            }
        }
        self.worker_memory_markdown(&mut s);
        let _ = writeln!(s, "\n### Targets\n");
        let _ = writeln!(
            s,
            "Judged by Envoy instructions per request (callgrind, deterministic); \
             \"not available\" when callgrind did not run or the case was not measured.\n"
        );
        let _ = writeln!(s, "| target | measured | met |");
        let _ = writeln!(s, "| --- | --- | --- |");
        for (what, stands, met) in self.targets() {
            let met = match met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            };
            let _ = writeln!(s, "| {what} | {stands} | {met} |");
        }
        s
    }

    fn instructions_markdown(&self, s: &mut String) {
        if self.instructions.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "\n### Envoy instructions per request (callgrind, {})\n",
            self.valgrind_version
        );
        let _ = writeln!(
            s,
            "| case | instructions/request | + vs router | + vs noop | x router | x noop |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: |");
        let of = |name: &str| self.instructions_of(name);
        for (case, r) in &self.instructions {
            match r {
                Ok(i) => {
                    let plus =
                        |base: &str| of(base).map_or("-".into(), |b| format!("{:+.0}", i - b));
                    let ratio = |base: &str| {
                        self.instruction_ratio(case, base)
                            .map_or("-".into(), |r| format!("{r:.2}"))
                    };
                    let _ = writeln!(
                        s,
                        "| {case} | {i:.0} | {} | {} | {} | {} |",
                        plus(BASELINE),
                        plus(NOOP),
                        ratio(BASELINE),
                        ratio(NOOP)
                    );
                }
                Err(why) => {
                    let _ = writeln!(
                        s,
                        "| {case} | not available: {} | | | | |",
                        why.replace('|', "/")
                    );
                }
            }
        }
        if let (Some(chain), Some(floor)) = (of(CHAIN), of(CHAIN_FLOOR)) {
            let _ = writeln!(
                s,
                "\n{CHAIN} against {CHAIN_FLOOR}: x{:.2} by instructions, {:+.0} instructions per request.",
                floor / chain,
                chain - floor
            );
        }
        if let (Some(suite), Some(chain)) = (of(SUITE), of(CHAIN)) {
            let _ = writeln!(
                s,
                "\n{SUITE} against {CHAIN}: {:+.0} instructions per request ({:+.1}%).",
                suite - chain,
                100.0 * (suite - chain) / chain
            );
        }
        match &self.hostcalls {
            None => {}
            Some(Err(why)) => {
                let _ = writeln!(s, "\nHost-call prices not available: {why}");
            }
            Some(Ok(h)) => {
                let noop = of(NOOP);
                let _ = writeln!(
                    s,
                    "\n### What one host call costs (filters/hostcall-cost, {HOSTCALLS_PER_REQUEST} calls per request, minus none)\n"
                );
                let _ = writeln!(s, "A request making no call: {:.0} instructions.\n", h.base);
                let _ = writeln!(
                    s,
                    "| host call | instructions per call | share of a noop request |"
                );
                let _ = writeln!(s, "| --- | ---: | ---: |");
                for (call, cost) in &h.costs {
                    let share = noop.map_or("-".into(), |n| format!("{:.1}%", 100.0 * cost / n));
                    let _ = writeln!(s, "| `{call}` | {cost:.0} | {share} |");
                }
            }
        }
    }

    fn worker_memory_markdown(&self, s: &mut String) {
        if self.worker_memory.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "\n### Envoy resident memory with {} workers, after warm-up\n",
            super::memory::WORKERS
        );
        let _ = writeln!(
            s,
            "VmRSS from /proc/<pid>/status: all the process holds, V8's own mappings \
             (generated code, Wasm memories) included; Envoy's allocator stats \
             (`server.memory_allocated`, `server.memory_heap_size`) for comparison, \
             which do not see V8's mappings.\n"
        );
        let _ = writeln!(
            s,
            "| case | VmRSS | + vs router | allocator: allocated | allocator: heap |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: |");
        let router = self
            .worker_memory
            .iter()
            .find(|(c, _)| c == BASELINE)
            .and_then(|(_, r)| r.as_ref().ok().map(|m| m.rss_kib));
        let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
        for (case, r) in &self.worker_memory {
            match r {
                Ok(m) => {
                    let plus = router.map_or("-".into(), |b| {
                        format!("{:+.1} MiB", (m.rss_kib as f64 - b as f64) / 1024.0)
                    });
                    let _ = writeln!(
                        s,
                        "| {case} | {} | {plus} | {} | {} |",
                        mib(m.rss_kib),
                        mib(m.allocated_kib),
                        mib(m.heap_kib)
                    );
                }
                Err(why) => {
                    let _ = writeln!(
                        s,
                        "| {case} | not available: {} | | | |",
                        why.replace('|', "/")
                    );
                }
            }
        }
    }
}
