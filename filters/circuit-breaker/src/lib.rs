//! mesh-filters circuit-breaker: closed / open / half-open breakers per route,
//! upstream cluster or header value, with Resilience4j semantics, shared by
//! all Envoy workers.
//!
//! The policy core ([`CircuitBreaker::check`], [`CircuitBreaker::finish`]) is
//! plain Rust: it sees the request through [`mesh_shared::Request`], the
//! shared store through [`mesh_shared::SharedStore`] and time as a number, so
//! it is tested natively. `filter.rs` is the thin proxy-wasm adapter (wasm32 only).

pub mod breaker;
pub mod config;
pub mod spec;
pub mod table;

#[cfg(target_arch = "wasm32")]
pub mod part;
// The module's entry points; off when the suite links this crate for its part.
#[cfg(all(target_arch = "wasm32", feature = "module"))]
mod filter;

use mesh_shared::circuit::{self, CircuitState, CircuitStatus};
use mesh_shared::hash::hash64;
use mesh_shared::outcome;
use mesh_shared::route_metadata::RouteChoice;
use mesh_shared::{Request, SharedStore};

pub use breaker::{Admit, Outcome, Transition};
pub use config::{Config, HalfOpenPolicy, Policy, Rule, Scope};
pub use table::{Slot, Summary, Ticket};

/// A call let through to the upstream; its outcome must be reported with [`CircuitBreaker::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub rule: usize,
    pub slot: Slot,
    pub key: u64,
    pub generation: u32,
    /// A half-open probe.
    pub probe: bool,
    /// When the request started (clock nanoseconds).
    pub started: u64,
    /// The cluster of a `scope: "cluster"` rule's breaker, as seen when the call started.
    pub cluster: Option<String>,
}

impl Call {
    /// The cluster whose published status this call's breaker owns: none for
    /// the overflow breaker, which stands for many clusters.
    fn published_cluster(&self) -> Option<String> {
        self.cluster.clone().filter(|_| self.slot != Slot::Overflow)
    }
}

/// A state change to report: stats, the rule's summary, the published cluster status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub rule: usize,
    pub transition: Option<Transition>,
    /// The state of a breaker whose slot was given to another key.
    pub evicted: Option<CircuitState>,
    pub cluster: Option<String>,
}

impl Change {
    fn is_empty(&self) -> bool {
        self.transition.is_none() && self.evicted.is_none()
    }
}

/// What the filter must do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No rule applies.
    NoRule,
    /// Let it through and report the outcome.
    Pass { call: Call, change: Option<Change> },
    /// Answer locally.
    Reject {
        rule: usize,
        state: CircuitState,
        retry_after_secs: u64,
        change: Option<Change>,
    },
    /// Shared data stayed contended past the retry budget: let it through untracked.
    FailedOpen { rule: usize },
    /// A `scope: "cluster"` rule applies but the cluster is not known yet: a
    /// filter before this one re-routed the request, and Envoy resolves the
    /// new route only in the router. Let it through; [`CircuitBreaker::settle`]
    /// books it under the cluster that served it.
    Deferred { rule: usize, started: u64 },
}

impl Verdict {
    pub fn change(&self) -> Option<&Change> {
        match self {
            Verdict::Pass { change, .. } | Verdict::Reject { change, .. } => change.as_ref(),
            _ => None,
        }
    }
}

pub use mesh_shared::outcome::{is_upstream_trouble, Response};

/// A cluster name as text (Envoy's names are ASCII; anything else is not a name).
fn text(bytes: &[u8]) -> String {
    std::str::from_utf8(bytes).unwrap_or_default().to_string()
}

/// The compiled configuration and the decision procedures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitBreaker {
    pub config: Config,
}

impl CircuitBreaker {
    pub fn new(config: Config) -> Self {
        CircuitBreaker { config }
    }

    /// Creates every rule's breaker table (configure time).
    pub fn create_tables(&self, store: &dyn SharedStore, now: u64) {
        for rule in &self.config.rules {
            rule.table.create(store, now);
        }
    }

    /// Decides for one request: the first rule whose match holds and whose
    /// scope value is present applies.
    pub fn check(&self, req: &mut dyn Request, store: &dyn SharedStore, now: u64) -> Verdict {
        let route = RouteChoice::of(req, "circuit-breaker", self.config.route_metadata);
        for (index, rule) in self.config.rules.iter().enumerate() {
            if !route.allows(&rule.name) || !rule.matcher.matches(req) {
                continue;
            }
            let source = rule.scope.source();
            let Some(value) = source.read(req) else {
                if rule.scope == Scope::Cluster {
                    return Verdict::Deferred {
                        rule: index,
                        started: now,
                    };
                }
                continue;
            };
            let cluster = (rule.scope == Scope::Cluster).then(|| text(value));
            let fp = hash64(&[value]);
            let Ok(adm) = rule.table.admit(store, &rule.policy, fp, now) else {
                return Verdict::FailedOpen { rule: index };
            };
            let change = Change {
                rule: index,
                transition: adm.transition,
                evicted: adm.evicted,
                // The overflow breaker stands for many clusters: publish nothing for it.
                cluster: cluster.clone().filter(|_| adm.slot != Slot::Overflow),
            };
            let change = (!change.is_empty()).then_some(change);
            return match adm.admit {
                Admit::Call { generation, probe } => Verdict::Pass {
                    call: Call {
                        rule: index,
                        slot: adm.slot,
                        key: adm.key,
                        generation,
                        probe,
                        started: now,
                        cluster,
                    },
                    change,
                },
                Admit::Reject {
                    state,
                    retry_after_nanos,
                } => Verdict::Reject {
                    rule: index,
                    state,
                    retry_after_secs: retry_after_nanos.div_ceil(1_000_000_000).max(1),
                    change,
                },
            };
        }
        Verdict::NoRule
    }

    /// What a finished call was, per the rule's `failure_when` and `slow_call`.
    pub fn classify(&self, call: &Call, response: Response<'_>) -> Outcome {
        let Some(rule) = self.config.rules.get(call.rule) else {
            return Outcome::Ignored;
        };
        let policy = &rule.policy;
        let slow_nanos = policy.slow_call.map(|s| s.duration_nanos);
        outcome::classify(&policy.failure_when, slow_nanos, response)
    }

    /// Records the outcome of `call`; returns the state change it caused.
    pub fn finish(
        &self,
        store: &dyn SharedStore,
        call: &Call,
        outcome: Outcome,
        now: u64,
    ) -> Option<Change> {
        let rule = self.config.rules.get(call.rule)?;
        let transition = rule
            .table
            .record(
                store,
                &rule.policy,
                Ticket {
                    slot: call.slot,
                    key: call.key,
                    generation: call.generation,
                },
                outcome,
                now,
            )
            .ok()??;
        Some(Change {
            rule: call.rule,
            transition: Some(transition),
            evicted: None,
            cluster: call.published_cluster(),
        })
    }

    /// Classifies and records a finished call. `served_by` is the cluster that
    /// served it (read in the response phase, only for `scope: "cluster"`):
    /// if a filter re-routed the request after this one decided, the call is
    /// taken back from the breaker it was admitted to (as if ignored) and
    /// booked under the cluster that really served it.
    pub fn complete(
        &self,
        store: &dyn SharedStore,
        call: &Call,
        served_by: Option<&[u8]>,
        response: Response<'_>,
        now: u64,
    ) -> (Outcome, Vec<Change>) {
        match (call.cluster.as_deref(), served_by) {
            (Some(admitted), Some(served)) if admitted.as_bytes() != served => {
                let mut changes: Vec<Change> = self
                    .finish(store, call, Outcome::Ignored, now)
                    .into_iter()
                    .collect();
                let (outcome, more) =
                    self.settle(store, call.rule, served, call.started, response, now);
                changes.extend(more);
                (outcome, changes)
            }
            _ => {
                let outcome = self.classify(call, response);
                let change = self.finish(store, call, outcome, now);
                (outcome, change.into_iter().collect())
            }
        }
    }

    /// Books a call of a [`Verdict::Deferred`] rule once the cluster that
    /// served it is known: admits and records it at once. The breaker could
    /// not stop the call, so a call it would have refused (open, or no
    /// half-open permit left) is not counted; other filters (lb-hints with
    /// `avoid_open_circuits`) steer around the published open state.
    pub fn settle(
        &self,
        store: &dyn SharedStore,
        rule_index: usize,
        cluster: &[u8],
        started: u64,
        response: Response<'_>,
        now: u64,
    ) -> (Outcome, Vec<Change>) {
        let mut changes = Vec::new();
        let Some(rule) = self.config.rules.get(rule_index) else {
            return (Outcome::Ignored, changes);
        };
        let Ok(adm) = rule
            .table
            .admit(store, &rule.policy, hash64(&[cluster]), started.max(now))
        else {
            return (Outcome::Ignored, changes);
        };
        let call = Call {
            rule: rule_index,
            slot: adm.slot,
            key: adm.key,
            generation: 0,
            probe: false,
            started,
            cluster: Some(text(cluster)),
        };
        let change = Change {
            rule: rule_index,
            transition: adm.transition,
            evicted: adm.evicted,
            cluster: call.published_cluster(),
        };
        if !change.is_empty() {
            changes.push(change);
        }
        let Admit::Call { generation, probe } = adm.admit else {
            return (Outcome::Ignored, changes);
        };
        let call = Call {
            generation,
            probe,
            ..call
        };
        let outcome = self.classify(&call, response);
        changes.extend(self.finish(store, &call, outcome, now));
        (outcome, changes)
    }

    /// Books a change in the rule's summary and publishes a cluster breaker's
    /// new status; returns the rule's summary (for the state gauge).
    pub fn apply(&self, store: &dyn SharedStore, change: &Change) -> Option<Summary> {
        let rule = self.config.rules.get(change.rule)?;
        let mut summary = None;
        if let Some(old) = change.evicted {
            summary = rule.table.note(store, old, CircuitState::Closed).ok();
        }
        if let Some(t) = change.transition {
            summary = rule.table.note(store, t.from(), t.to()).ok();
            if let Some(cluster) = &change.cluster {
                let open_until = match t {
                    Transition::Opened { until, .. } => until,
                    _ => 0,
                };
                circuit::publish(
                    store,
                    cluster,
                    CircuitStatus {
                        state: t.to(),
                        open_until,
                    },
                );
            }
        }
        summary
    }

    /// The local answer's headers for a rejection.
    pub fn reject_headers(
        state: CircuitState,
        retry_after_secs: u64,
    ) -> [(&'static str, String); 2] {
        let state = match state {
            CircuitState::HalfOpen => "half-open",
            _ => "open",
        };
        [
            ("retry-after", retry_after_secs.to_string()),
            ("x-mesh-circuit", state.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests;
