//! The targets of issue 16, judged by Envoy instructions per request
//! (deterministic; see BENCHMARKS.md), and what each filter's own work is:
//! its cost over the no-op filter minus the priced host calls it makes.

use std::fmt::Write as _;

use super::report::Report;
use super::sizes::kib;
use super::{
    BASELINE, CHAIN, CHAIN_FLOOR, NOOP, STUB_BYTES, SUITE, TARGET_CHAIN_VS_FOUR_NOOP,
    TARGET_OWN_WORK, TARGET_RATELIMIT_OVER_ROUTER, TARGET_SIZE_BYTES, TARGET_SUITE,
    TARGET_SUITE_SIZE_BYTES,
};

/// A kind of host call as the pricer names it, how many times, and why.
pub(crate) type HostCall = (&'static str, u32, &'static str);

/// The host calls each filter makes on a request of the bench traffic in its
/// bench configuration (`envoy/bench/<filter>.yaml`): (call as the pricer
/// names it, times, why). Checked call by call against callgrind's count
/// (target/bench/hostcall-counts.md, `hostcall_counts`; BENCHMARKS.md "Host
/// calls cut"); keep in step with the filters: a call added or removed there
/// changes the "own work" figures.
pub(crate) const FILTER_HOSTCALLS: &[(&str, &[HostCall])] = &[
    (
        "ratelimit",
        &[
            // No route read: the rule applies to every request, as its native
            // peer (`native-ratelimit-keyed`) does.
            ("request_header", 1, "`x-api-key`, the key"),
            ("current_time", 1, "clock"),
            ("shared_get", 1, "key shard (256 B)"),
            ("shared_set", 1, "key shard, CAS"),
            ("counter_increment", 1, "`decision=allowed`"),
            // `headers: draft` adds RateLimit headers to rejections only
            // (`headers_on_allowed` is off): none on the bench's requests.
        ],
    ),
    (
        "circuit-breaker",
        &[
            ("route_name", 1, "the rule matches routes, `scope: route`"),
            ("current_time", 2, "clock, request and response"),
            ("shared_get", 2, "breaker slot: admit, then record"),
            ("shared_set", 1, "record the outcome, CAS"),
            // `response.code_details` only for a failure status or none.
            ("response_code", 1, "`response.code`"),
            ("counter_increment", 1, "`outcome=success`"),
        ],
    ),
    (
        "lb-hints",
        &[
            ("route_name", 1, "the rule matches a route"),
            ("request_header", 1, "`x-user-id`, the sticky key"),
            // No clock: no steps, analysis or `avoid_open_circuits` (`Config::reads_clock`).
            ("set_request_header", 1, "`x-mesh-target`"),
            ("clear_route_cache", 1, "re-route on the header"),
            ("counter_increment", 1, "`mesh_lb_picks_total`"),
        ],
    ),
    (
        "metrics",
        &[
            ("current_time", 2, "start and end"),
            (
                "route_name",
                2,
                "request time (in-flight gauge) and `on_log` (a filter after it may re-route)",
            ),
            (
                "request_headers_all",
                1,
                "`:method` and `x-tenant` in one call (`HeaderPlan`)",
            ),
            ("response_code", 1, "`response.code`, for the status class"),
            (
                "counter_increment",
                3,
                "in-flight +1 / -1, `mesh_requests_total`",
            ),
            (
                "histogram_record",
                3,
                "duration, request bytes, response bytes",
            ),
        ],
    ),
];

/// One filter's instructions per request: over the no-op filter, what its
/// host calls cost at this run's prices, and the rest (its own work).
pub(crate) struct OwnWork {
    pub(crate) filter: &'static str,
    pub(crate) calls: &'static [HostCall],
    pub(crate) over_noop: f64,
    pub(crate) priced: f64,
}

impl OwnWork {
    pub(crate) fn own(&self) -> f64 {
        self.over_noop - self.priced
    }
}

impl Report {
    /// Each filter's own work, when callgrind counted it and the noop case
    /// and priced every call it makes.
    pub(crate) fn own_work(&self) -> Vec<OwnWork> {
        let Some(Ok(prices)) = &self.hostcalls else {
            return Vec::new();
        };
        let price = |call: &str| {
            prices
                .costs
                .iter()
                .find(|(c, _)| c == call)
                .map(|(_, p)| *p)
        };
        FILTER_HOSTCALLS
            .iter()
            .filter_map(|&(filter, calls)| {
                let over_noop = self.instructions_of(filter)? - self.instructions_of(NOOP)?;
                let priced = calls
                    .iter()
                    .map(|&(call, n, _)| Some(price(call)? * f64::from(n)))
                    .sum::<Option<f64>>()?;
                Some(OwnWork {
                    filter,
                    calls,
                    over_noop,
                    priced,
                })
            })
            .collect()
    }

    /// Each target: (what, where we stand, met?); `None` when not measured.
    ///
    /// Throughput targets are judged by instructions per request: with one
    /// saturated worker requests/s is the inverse of the cost per request,
    /// and the instruction count is that cost without the machine's noise.
    pub(crate) fn targets(&self) -> Vec<(String, String, Option<bool>)> {
        let mut out = Vec::new();
        let of = |case: &str| self.instructions_of(case);
        let not_available = || "not available".to_string();
        let own = self.own_work();
        for &(filter, _) in FILTER_HOSTCALLS {
            let what = format!(
                "{filter}'s own work (over noop, minus its priced host calls) <= {TARGET_OWN_WORK:.0} instructions"
            );
            out.push(match own.iter().find(|o| o.filter == filter) {
                Some(o) => (
                    what,
                    format!(
                        "{:.0} ({:+.0} over noop, {:.0} priced)",
                        o.own(),
                        o.over_noop,
                        o.priced
                    ),
                    Some(o.own() <= TARGET_OWN_WORK),
                ),
                None => (what, not_available(), None),
            });
        }
        let what = format!(
            "ratelimit within {TARGET_RATELIMIT_OVER_ROUTER:.0} instructions of {BASELINE}"
        );
        out.push(match (of("ratelimit"), of(BASELINE)) {
            (Some(r), Some(b)) => (
                what,
                format!("{:+.0}", r - b),
                Some(r - b <= TARGET_RATELIMIT_OVER_ROUTER),
            ),
            _ => (what, not_available(), None),
        });
        let what = format!("{SUITE} <= {TARGET_SUITE:.0} instructions per request");
        out.push(match of(SUITE) {
            Some(s) => {
                let chain = of(CHAIN).map_or(String::new(), |c| format!(" ({CHAIN}: {c:.0})"));
                (what, format!("{s:.0}{chain}"), Some(s <= TARGET_SUITE))
            }
            None => (what, not_available(), None),
        });
        let what = format!("{CHAIN} >= {TARGET_CHAIN_VS_FOUR_NOOP:.2} x {CHAIN_FLOOR}");
        out.push(match self.instruction_ratio(CHAIN, CHAIN_FLOOR) {
            Some(r) => (
                what,
                format!("{r:.2} by instructions"),
                Some(r >= TARGET_CHAIN_VS_FOUR_NOOP),
            ),
            None => (what, not_available(), None),
        });
        for s in self.sizes.iter().filter(|s| s.module != NOOP) {
            // What ships and what the cases load: dist/ (the build drops the
            // unused stream-callback exports before wasm-opt, which the
            // bench's own wasm-opt copy of the as-built module keeps).
            let limit = if s.module == "suite" {
                TARGET_SUITE_SIZE_BYTES
            } else {
                TARGET_SIZE_BYTES
            };
            let what = format!("{}.wasm <= {} KiB", s.module, limit / 1024);
            let shipped = s.dist.or(s.optimized.as_ref().ok().copied());
            out.push(match shipped.filter(|b| *b >= STUB_BYTES) {
                Some(b) => (what, kib(b), Some(b <= limit)),
                None => (what, not_available(), None),
            });
        }
        out
    }

    /// The table of each filter's host calls, priced, against its cost.
    pub(crate) fn own_work_markdown(&self, s: &mut String) {
        let own = self.own_work();
        if own.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "\n### Each filter's own work: its cost over noop minus its host calls at these prices\n"
        );
        let _ = writeln!(
            s,
            "| filter | host calls per request | priced | measured over noop | own work (rest) |"
        );
        let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: |");
        for o in &own {
            let calls: Vec<String> = o
                .calls
                .iter()
                .map(|(call, n, why)| match n {
                    1 => format!("`{call}`: {why}"),
                    n => format!("`{call}` x{n}: {why}"),
                })
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:+.0} | {:+.0} |",
                o.filter,
                calls.join("; "),
                o.priced,
                o.over_noop,
                o.own()
            );
        }
    }
}
