//! circuit-breaker's adapter logic as a part (`mesh_shared::part`): the
//! policy compiles the configuration once, the stream asks the core, answers
//! locally while a breaker is open, and reports each call's outcome. Run alone
//! by this crate's module (`filter.rs`) and by the suite, where lb-hints'
//! chosen cluster is the `scope: "cluster"` value (no `xds.cluster_name` read)
//! and the route it re-routes to is learnt from the calls it served.

use std::cell::{Ref, RefCell};
use std::rc::Rc;
use std::time::Duration;

use mesh_shared::clock::Clock;
use mesh_shared::hash::KeyHasher;
use mesh_shared::host::{self, HostClock, HostStore, Metric, OutcomeCounters};
use mesh_shared::part::{Exchange, Flow, Part, Policy};
use mesh_shared::request::{Attribute, HeaderNames, Request};
use mesh_shared::stats::stat_name;

use crate::{Call, Change, CircuitBreaker, Config, Response, Slot, Summary, Transition, Verdict};

pub const FILTER: &str = "circuit-breaker";

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

/// The configured filter: the breakers and their stat ids.
pub struct Breaker {
    breaker: CircuitBreaker,
    stats: Vec<RuleStats>,
    routes: LearntRoutes,
}

/// This worker's re-routes seen served: (hash of the route before and the
/// target's cluster, the route that served the call).
type LearntRoutes = RefCell<Vec<LearntRoute>>;
type LearntRoute = (u64, Option<Vec<u8>>);

/// How many re-routes a worker remembers.
const LEARNT_ROUTES: usize = 64;

impl Breaker {
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

impl Breaker {
    /// Creates the breaker tables and defines the stats (configure time).
    pub fn new(config: Config) -> Breaker {
        let breaker = CircuitBreaker::new(config);
        breaker.create_tables(&HostStore, HostClock.now_nanos());
        let stats = breaker
            .config
            .rules
            .iter()
            .map(|r| RuleStats::define(&r.name))
            .collect();
        let state = Breaker {
            breaker,
            stats,
            routes: RefCell::default(),
        };
        state.show_all();
        log::info!(
            "{FILTER}: configured {} rule(s)",
            state.breaker.config.rules.len()
        );
        state
    }
}

impl Policy for Breaker {
    type Stream = BreakerStream;

    fn request_headers(&self, names: &mut HeaderNames) {
        self.breaker.config.request_headers(names);
    }

    fn stream(self: &Rc<Self>, _ex: &mut Exchange) -> BreakerStream {
        BreakerStream {
            state: Rc::clone(self),
            call: None,
            deferred: None,
            replied: false,
            guess: None,
        }
    }

    // Gauges are set by whichever worker changes a breaker; the tick
    // repairs the rare case of two workers setting them out of order.
    fn tick_period(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }

    fn tick(&self) {
        self.show_all();
    }
}

/// One request's breaker state.
pub struct BreakerStream {
    state: Rc<Breaker>,
    /// The call let through, until its outcome is recorded.
    call: Option<Call>,
    /// A `Verdict::Deferred` call (rule, start time), until it is settled.
    deferred: Option<(usize, u64)>,
    /// We answered locally; Envoy still runs our response callbacks for it.
    replied: bool,
    /// A re-routed request whose route a rule asked for: the re-route's
    /// key (see [`Rerouted`]).
    guess: Option<u64>,
}

/// Learns the route that served a re-route; whether it was the one
/// learnt before.
fn remember(routes: &LearntRoutes, key: u64, served: Option<Vec<u8>>) -> bool {
    let Ok(mut routes) = routes.try_borrow_mut() else {
        return false;
    };
    if let Some(entry) = routes.iter_mut().find(|(k, _)| *k == key) {
        let same = entry.1 == served;
        entry.1 = served;
        return same;
    }
    if routes.len() < LEARNT_ROUTES {
        routes.push((key, served));
    }
    false
}

/// A request the suite's lb-hints re-routed, as Envoy will route it: the
/// chosen target's cluster, and the route this worker saw serve the same
/// re-route (the same route before it and the same cluster) last time, or
/// none while it has seen none. (Until the request phase ends, Envoy
/// still answers the route before the re-route, docs/suite.md.)
struct Rerouted<'a> {
    request: &'a mut Exchange,
    routes: Option<Ref<'a, Vec<LearntRoute>>>,
    /// The re-route's key, once a rule asked for the route.
    key: Option<u64>,
}

impl Request for Rerouted<'_> {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.request.header(name)
    }

    fn attribute(&mut self, attr: Attribute) -> Option<&[u8]> {
        let cluster = self.request.target_cluster().is_some();
        match attr {
            Attribute::Cluster if cluster => self.request.target_cluster().map(str::as_bytes),
            Attribute::Route if self.routes.is_some() => {
                if self.key.is_none() {
                    let mut key = KeyHasher::new();
                    key.part(self.request.target_cluster().unwrap_or_default().as_bytes());
                    key.part(self.request.attribute(Attribute::Route).unwrap_or_default());
                    self.key = Some(key.finish());
                }
                let key = self.key?;
                let (_, route) = self.routes.as_ref()?.iter().find(|(k, _)| *k == key)?;
                route.as_deref()
            }
            _ => self.request.attribute(attr),
        }
    }

    fn route_metadata(&mut self, filter: &str) -> Option<&[u8]> {
        self.request.route_metadata(filter)
    }
}

impl BreakerStream {
    /// Learns the route that served a re-routed request a rule asked the
    /// route of. Whether the call was decided on that route: if not (the
    /// first of its re-route on this worker, or the route table changed),
    /// it is not counted.
    fn learn(&mut self, ex: &mut Exchange) -> bool {
        let Some(key) = self.guess.take() else {
            return true;
        };
        ex.refresh_route();
        let served = ex.attribute(Attribute::Route).map(<[u8]>::to_vec);
        remember(&self.state.routes, key, served)
    }

    fn finish(&mut self, ex: &mut Exchange, response_headers_seen: bool) {
        let counted = self.learn(ex);
        let call = self.call.take();
        let (rule, started) = match (&call, self.deferred.take()) {
            (Some(call), _) => (call.rule, call.started),
            (None, Some(deferred)) => deferred,
            (None, None) => return,
        };
        let state = Rc::clone(&self.state);
        let now = ex.now();
        // The details only when the status alone does not tell (a failure status, or none).
        let read = match state.breaker.config.rules.get(rule) {
            Some(r) => ex.response_details(&r.policy.failure_when),
            None => None,
        };
        let details = read.as_ref().and_then(|d| d.as_deref());
        let response = match counted {
            true => Response {
                code: ex.response_code(),
                details,
                duration_nanos: response_headers_seen.then(|| now.saturating_sub(started)),
            },
            // An answer the breaker ignores: the call is taken back.
            false => Response {
                code: None,
                details: Some(b"mesh_rerouted"),
                duration_nanos: None,
            },
        };
        let (outcome, changes) = match &call {
            Some(call) => {
                // Only a cluster breaker needs to know who served the call.
                let served_by = call.cluster.as_ref().and_then(|_| ex.served_cluster());
                state
                    .breaker
                    .complete(&HostStore, call, served_by.as_deref(), response, now)
            }
            // A deferred call: the router has chosen the cluster by now.
            None => {
                let Some(cluster) = ex.served_cluster() else {
                    return;
                };
                state
                    .breaker
                    .settle(&HostStore, rule, &cluster, started, response, now)
            }
        };
        if read.is_some()
            && details != Some(&b"via_upstream"[..])
            && log::log_enabled!(log::Level::Debug)
        {
            // Rare (Envoy's own answers, resets, timeouts): worth a line when debugging.
            let details = std::str::from_utf8(details.unwrap_or_default());
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

impl Part for BreakerStream {
    fn on_log(&mut self, ex: &mut Exchange) {
        // The stream ended without response headers (a reset, or the client left).
        self.finish(ex, false);
    }

    fn on_request_headers(&mut self, ex: &mut Exchange) -> Flow {
        let state = &self.state;
        let now = ex.now();
        // After a re-route by the suite's lb-hints the rules see the route it leads to.
        let mut request = Rerouted {
            routes: (ex.route_version() != 0)
                .then(|| state.routes.try_borrow().ok())
                .flatten(),
            request: ex,
            key: None,
        };
        let verdict = state.breaker.check(&mut request, &HostStore, now);
        self.guess = request.key;
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
                Flow::Continue
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
                Flow::Answered
            }
            Verdict::Deferred { rule, started } => {
                self.deferred = Some((rule, started));
                Flow::Continue
            }
            Verdict::NoRule | Verdict::FailedOpen { .. } => Flow::Continue,
        }
    }

    fn on_response_headers(&mut self, ex: &mut Exchange) {
        if !self.replied {
            self.finish(ex, true);
        }
    }
}

/// Reads the plugin configuration (circuit-breaker's own module).
pub fn configure() -> Option<Breaker> {
    host::load_config(FILTER, Config::parse).map(Breaker::new)
}
