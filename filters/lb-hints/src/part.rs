//! lb-hints' adapter logic as a part (`mesh_shared::part`): the policy
//! compiles the configuration once, the stream asks the core for a target,
//! writes it into the routing header and makes Envoy pick the route again.
//! Run alone by this crate's module (`filter.rs`) and by the suite, where the
//! chosen target's cluster goes on to the breaker (`Exchange::rerouted`).

use std::cell::Cell;
use std::rc::Rc;

use mesh_shared::clock::Clock;
use mesh_shared::hash::hash64;
use mesh_shared::host::{self, HostClock, HostStore, Metric, OutcomeCounters};
use mesh_shared::outcome::Response;
use mesh_shared::part::{Exchange, Flow, Part, Policy};
use mesh_shared::request::HeaderNames;
use mesh_shared::stats::stat_name;

use crate::canary::{self, Change, Phase, Verdict};
use crate::{Balancer, Config, NoTarget, Pick};

pub const FILTER: &str = "lb-hints";

/// Stat ids of one rule, defined once at configure time.
struct RuleStats {
    /// `mesh_lb_picks_total{rule, target}`, one per target.
    picks: Vec<Metric>,
    /// `mesh_lb_no_target_total{rule}`.
    no_target: Metric,
    /// Rules with `analysis` only.
    canary: Option<CanaryStats>,
}

/// Stat ids of one rule's canary analysis.
struct CanaryStats {
    /// `mesh_lb_canary_state{rule}`: 0 progressing, 1 promoted, 2 rolled back.
    state: Metric,
    /// `mesh_lb_canary_step{rule}`: index of the step in force (0: the initial weights).
    step: Metric,
    /// `mesh_lb_canary_rollbacks_total{rule}`.
    rollbacks: Metric,
    /// `mesh_lb_canary_calls_total{rule, outcome}`.
    calls: OutcomeCounters,
    /// What this worker last wrote into the gauges (phase, step).
    shown: Cell<Option<(Phase, u32)>>,
}

impl CanaryStats {
    fn new(rule: &str) -> CanaryStats {
        CanaryStats {
            state: Metric::gauge(&stat_name("mesh_lb_canary_state", &[("rule", rule)])),
            step: Metric::gauge(&stat_name("mesh_lb_canary_step", &[("rule", rule)])),
            rollbacks: Metric::counter(&stat_name(
                "mesh_lb_canary_rollbacks_total",
                &[("rule", rule)],
            )),
            calls: OutcomeCounters::define("mesh_lb_canary_calls_total", rule),
            shown: Cell::new(None),
        }
    }

    /// Sets the gauges to `state` unless this worker already showed it.
    fn show(&self, state: &canary::State) {
        let now = (state.phase, state.step);
        if self.shown.get() != Some(now) {
            self.state.record(state.phase as u64);
            self.step.record(u64::from(state.step));
            self.shown.set(Some(now));
        }
    }
}

/// The configured filter: the balancer, its stat ids, this worker's random stream.
pub struct LbHints {
    balancer: Balancer,
    stats: Vec<RuleStats>,
    /// This worker's random stream (splitmix64 state).
    random: Cell<u64>,
    /// Whether a pick needs the clock (`Config::reads_clock`).
    reads_clock: bool,
}

impl LbHints {
    fn next_random(&self) -> u64 {
        let s = self.random.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.random.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl LbHints {
    /// Sets up the shared state and defines the stats (configure time);
    /// `context_id` (the root context's) seeds this worker's random stream.
    pub fn new(config: Config, context_id: u32) -> LbHints {
        let now = HostClock.now_nanos();
        let mut balancer = Balancer::new(config);
        balancer.setup(&HostStore, now);
        let stats: Vec<RuleStats> = balancer
            .config
            .rules
            .iter()
            .map(|r| RuleStats {
                picks: r
                    .targets
                    .iter()
                    .map(|t| {
                        Metric::counter(&stat_name(
                            "mesh_lb_picks_total",
                            &[("rule", &r.name), ("target", &t.name)],
                        ))
                    })
                    .collect(),
                no_target: Metric::counter(&stat_name(
                    "mesh_lb_no_target_total",
                    &[("rule", &r.name)],
                )),
                canary: r.analysis.as_ref().map(|_| CanaryStats::new(&r.name)),
            })
            .collect();
        for (i, s) in stats.iter().enumerate() {
            if let (Some(c), Some(state)) = (&s.canary, balancer.canary(&HostStore, i)) {
                c.show(&state);
            }
        }
        log::info!(
            "{FILTER}: configured {} rule(s)",
            balancer.config.rules.len()
        );
        // Workers configure at nearly the same instant: mix in the context id
        // so their random streams differ.
        let seed = hash64(&[&now.to_le_bytes(), &context_id.to_le_bytes()]);
        LbHints {
            reads_clock: balancer.config.reads_clock(),
            balancer,
            stats,
            random: Cell::new(seed),
        }
    }
}

impl LbHints {
    /// Books a change of a rule's analysis state: gauges, rollbacks, a log line.
    fn report(&self, rule: usize, change: &Change) {
        let Some(stats) = self.stats.get(rule).and_then(|s| s.canary.as_ref()) else {
            return;
        };
        stats.show(&change.after);
        if !change.rolled_back() {
            return;
        }
        stats.rollbacks.add(1);
        let name = self
            .balancer
            .config
            .rules
            .get(rule)
            .map(|r| r.name.as_str())
            .unwrap_or_default();
        let why = match change.judged {
            Some((Verdict::Failed, calls, failures, slow)) => {
                format!("{failures} failed and {slow} slow of {calls} calls in the interval")
            }
            _ => "failed intervals".to_string(),
        };
        log::warn!("{FILTER}: rule {name}: canary rolled back ({why}); it gets no more calls until the rule's configuration changes");
    }
}

impl Policy for LbHints {
    type Stream = LbHintsStream;

    fn request_headers(&self, names: &mut HeaderNames) {
        self.balancer.config.request_headers(names);
    }

    fn stream(self: &Rc<Self>, _ex: &mut Exchange) -> LbHintsStream {
        LbHintsStream {
            state: Rc::clone(self),
            in_flight: None,
            judged: None,
        }
    }
}

/// One request's lb-hints state.
pub struct LbHintsStream {
    state: Rc<LbHints>,
    /// (rule, target) counted in the shared in-flight counts until the stream ends.
    in_flight: Option<(usize, usize)>,
    /// (rule, start time) of a canary call whose outcome the analysis judges.
    judged: Option<(usize, u64)>,
}

impl LbHintsStream {
    /// Counts the stream out of the in-flight counts, once, whichever of
    /// `on_log` / `on_done` comes first (both run for completed and reset streams).
    fn release(&mut self) {
        if let Some((rule, target)) = self.in_flight.take() {
            self.state.balancer.release(&HostStore, rule, target);
        }
    }

    /// Judges a canary call once it answered (`headers_seen`) or ended without answer.
    fn judge(&mut self, ex: &mut Exchange, headers_seen: bool) {
        let Some((rule, started)) = self.judged.take() else {
            return;
        };
        let now = ex.now();
        let state = Rc::clone(&self.state);
        // The details only when the status alone does not tell (a failure status, or none).
        let analysis = state.balancer.config.rules.get(rule);
        let details = match analysis.and_then(|r| r.analysis.as_ref()) {
            Some(a) => ex.response_details(&a.failure_when).flatten(),
            None => None,
        };
        let response = Response {
            code: ex.response_code(),
            details: details.as_deref(),
            duration_nanos: headers_seen.then(|| now.saturating_sub(started)),
        };
        let outcome = state.balancer.classify(rule, response);
        if let Some(c) = state.stats.get(rule).and_then(|s| s.canary.as_ref()) {
            c.calls.count(outcome);
        }
        if let Some(change) = state.balancer.record(&HostStore, rule, outcome, now) {
            state.report(rule, &change);
        }
    }
}

impl Part for LbHintsStream {
    fn on_request_headers(&mut self, ex: &mut Exchange) -> Flow {
        let state = Rc::clone(&self.state);
        let balancer = &state.balancer;
        // 0 when no rule depends on the time (`Config::reads_clock`).
        let now = if state.reads_clock { ex.now() } else { 0 };
        let (pick, analysed, change) =
            balancer.pick_judged(ex, &HostStore, now, state.next_random());
        let rule_of = match pick {
            Pick::Target { rule, .. } | Pick::NoTarget { rule } => Some(rule),
            Pick::NoRule => None,
        };
        if let Some(rule) = rule_of {
            if let Some(change) = &change {
                state.report(rule, change);
            } else if let (Some(s), Some(c)) = (
                analysed,
                state.stats.get(rule).and_then(|s| s.canary.as_ref()),
            ) {
                c.show(&s);
            }
        }
        if balancer.judges(&pick) {
            if let Some(rule) = rule_of {
                self.judged = Some((rule, now));
            }
        }
        match pick {
            Pick::NoRule => Flow::Continue,
            Pick::Target {
                rule,
                target,
                counted,
                ..
            } => {
                let Some(r) = balancer.config.rules.get(rule) else {
                    return Flow::Continue;
                };
                if counted {
                    self.in_flight = Some((rule, target));
                }
                if let Some(t) = r.targets.get(target) {
                    ex.set_request_header(&r.header, Some(&t.name));
                    host::clear_route_cache();
                    ex.rerouted(Some(&t.cluster));
                }
                if let Some(m) = state.stats.get(rule).and_then(|s| s.picks.get(target)) {
                    m.add(1);
                }
                Flow::Continue
            }
            Pick::NoTarget { rule } => {
                let Some(r) = balancer.config.rules.get(rule) else {
                    return Flow::Continue;
                };
                if let Some(s) = state.stats.get(rule) {
                    s.no_target.add(1);
                }
                // A client-sent value must not steer either way.
                ex.set_request_header(&r.header, None);
                host::clear_route_cache();
                ex.rerouted(None);
                match r.no_target {
                    NoTarget::Pass => Flow::Continue,
                    NoTarget::Reject => {
                        let response = &balancer.config.response;
                        host::send_local_reply(
                            response.status,
                            &[("x-mesh-lb", "no-target")],
                            response.body.as_bytes(),
                        );
                        Flow::Answered
                    }
                }
            }
        }
    }

    fn on_response_headers(&mut self, ex: &mut Exchange) {
        self.judge(ex, true);
    }

    fn on_log(&mut self, ex: &mut Exchange) {
        // A canary call that ended without response headers (a reset).
        self.judge(ex, false);
        self.release();
    }

    fn on_done(&mut self, _ex: &mut Exchange) {
        self.release();
    }
}

/// Reads the plugin configuration (lb-hints' own module).
pub fn configure(context_id: u32) -> Option<LbHints> {
    let config = host::load_config(FILTER, Config::parse)?;
    Some(LbHints::new(config, context_id))
}
