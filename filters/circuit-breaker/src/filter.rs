//! The proxy-wasm adapter: the root context compiles the configuration once,
//! the http context asks the core, answers locally while a breaker is open,
//! and reports each call's outcome.

use std::rc::Rc;
use std::time::Duration;

use mesh_shared::clock::Clock;
use mesh_shared::host::{self, HostClock, HostRequest, HostStore, Metric, OutcomeCounters};
use mesh_shared::stats::stat_name;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::{Call, Change, CircuitBreaker, Config, Response, Slot, Summary, Transition, Verdict};

const FILTER: &str = "circuit-breaker";

proxy_wasm::main! {{
    host::init_logging(FILTER);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { state: None }) });
}}

/// Stat ids of one rule, defined once at configure time.
struct RuleStats {
    state: Metric,
    open_breakers: Metric,
    opened: Metric,
    rejected: Metric,
    /// `mesh_circuit_calls_total{rule, outcome}`.
    calls: OutcomeCounters,
    overflow: Metric,
}

impl RuleStats {
    fn define(rule: &str) -> RuleStats {
        let tags = [("rule", rule)];
        RuleStats {
            state: Metric::gauge(&stat_name("mesh_circuit_state", &tags)),
            open_breakers: Metric::gauge(&stat_name("mesh_circuit_open_breakers", &tags)),
            opened: Metric::counter(&stat_name("mesh_circuit_opened_total", &tags)),
            rejected: Metric::counter(&stat_name("mesh_circuit_rejected_total", &tags)),
            calls: OutcomeCounters::define("mesh_circuit_calls_total", rule),
            overflow: Metric::counter(&stat_name("mesh_circuit_overflow_total", &tags)),
        }
    }

    fn show(&self, summary: Summary) {
        self.state.record(summary.worst() as u64);
        self.open_breakers.record(u64::from(summary.open));
    }
}

struct State {
    breaker: CircuitBreaker,
    stats: Vec<RuleStats>,
}

impl State {
    /// Books a state change: summary, published cluster status, stats.
    fn report(&self, change: &Change) {
        let summary = self.breaker.apply(&HostStore, change);
        let Some(stats) = self.stats.get(change.rule) else {
            return;
        };
        if change.transition.is_some_and(Transition::opened) {
            stats.opened.add(1);
        }
        if let Some(summary) = summary {
            stats.show(summary);
        }
    }

    /// Refreshes every rule's gauges from shared data.
    fn show_all(&self) {
        for (rule, stats) in self.breaker.config.rules.iter().zip(&self.stats) {
            stats.show(rule.table.summary(&HostStore));
        }
    }
}

struct Root {
    state: Option<Rc<State>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = host::load_config(FILTER, Config::parse) else {
            return false;
        };
        let breaker = CircuitBreaker::new(config);
        breaker.create_tables(&HostStore, HostClock.now_nanos());
        let stats = breaker
            .config
            .rules
            .iter()
            .map(|r| RuleStats::define(&r.name))
            .collect();
        let state = State { breaker, stats };
        state.show_all();
        log::info!(
            "{FILTER}: configured {} rule(s)",
            state.breaker.config.rules.len()
        );
        self.state = Some(Rc::new(state));
        // Gauges are set by whichever worker changes a breaker; the tick
        // repairs the rare case of two workers setting them out of order.
        self.set_tick_period(Duration::from_secs(1));
        true
    }

    fn on_tick(&mut self) {
        if let Some(state) = &self.state {
            state.show_all();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let state = Rc::clone(self.state.as_ref()?);
        Some(Box::new(Http {
            state,
            call: None,
            deferred: None,
            replied: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    state: Rc<State>,
    /// The call let through, until its outcome is recorded.
    call: Option<Call>,
    /// A `Verdict::Deferred` call (rule, start time), until it is settled.
    deferred: Option<(usize, u64)>,
    /// We answered locally; Envoy still runs our response callbacks for it.
    replied: bool,
}

impl Http {
    fn finish(&mut self, response_headers_seen: bool) {
        let started = match (&self.call, self.deferred) {
            (Some(call), _) => call.started,
            (None, Some((_, started))) => started,
            (None, None) => return,
        };
        let state = Rc::clone(&self.state);
        let now = HostClock.now_nanos();
        let details = host::property(&["response", "code_details"]);
        let response = Response {
            code: host::response_code(),
            details: details.as_deref(),
            duration_nanos: response_headers_seen.then(|| now.saturating_sub(started)),
        };
        let (rule, outcome, changes) = match (self.call.take(), self.deferred.take()) {
            (Some(call), _) => {
                // Only a cluster breaker needs to know who served the call.
                let served_by = call
                    .cluster
                    .as_ref()
                    .and_then(|_| host::property(&["xds", "cluster_name"]));
                let (outcome, changes) =
                    state
                        .breaker
                        .complete(&HostStore, &call, served_by.as_deref(), response, now);
                (call.rule, outcome, changes)
            }
            (None, Some((rule, _))) => {
                // The router has chosen the cluster by now.
                let Some(cluster) = host::property(&["xds", "cluster_name"]) else {
                    return;
                };
                let (outcome, changes) = state
                    .breaker
                    .settle(&HostStore, rule, &cluster, started, response, now);
                (rule, outcome, changes)
            }
            (None, None) => return,
        };
        if details.as_deref() != Some(b"via_upstream") && log::log_enabled!(log::Level::Debug) {
            // Rare (Envoy's own answers, resets, timeouts): worth a line when debugging.
            let details = std::str::from_utf8(details.as_deref().unwrap_or_default());
            log::debug!(
                "{FILTER}: no upstream status, response.code_details \"{}\": {}",
                details.unwrap_or("?"),
                outcome.label().unwrap_or("ignored")
            );
        }
        if let Some(stats) = state.stats.get(rule) {
            stats.calls.count(outcome);
        }
        for change in &changes {
            state.report(change);
        }
    }
}

// The stream callbacks `impl HttpContext for Http` handles; the build drops
// the exports of the others (mesh_shared::callbacks).
mesh_shared::stream_callbacks!("request_headers", "response_headers", "log");

impl Context for Http {}

impl HttpContext for Http {
    fn on_log(&mut self) {
        // The stream ended without response headers (a reset, or the client left).
        self.finish(false);
    }

    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let state = &self.state;
        let verdict =
            state
                .breaker
                .check(&mut HostRequest::new(), &HostStore, HostClock.now_nanos());
        if let Some(change) = verdict.change() {
            state.report(change);
        }
        match verdict {
            Verdict::Pass { call, .. } => {
                if call.slot == Slot::Overflow {
                    if let Some(stats) = state.stats.get(call.rule) {
                        stats.overflow.add(1);
                    }
                }
                self.call = Some(call);
                Action::Continue
            }
            Verdict::Reject {
                rule,
                state: circuit,
                retry_after_secs,
                ..
            } => {
                if let Some(stats) = state.stats.get(rule) {
                    stats.rejected.add(1);
                }
                let headers = CircuitBreaker::reject_headers(circuit, retry_after_secs);
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                let response = &state.breaker.config.response;
                host::send_local_reply(response.status, &headers, response.body.as_bytes());
                self.replied = true;
                Action::Pause
            }
            Verdict::Deferred { rule, started } => {
                self.deferred = Some((rule, started));
                Action::Continue
            }
            Verdict::NoRule | Verdict::FailedOpen { .. } => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if !self.replied {
            self.finish(true);
        }
        Action::Continue
    }
}
