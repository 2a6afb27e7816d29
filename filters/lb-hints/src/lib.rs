//! mesh-filters lb-hints: chooses a target (subset / version / cluster) for
//! each request by weight, stickiness or load, and hands the choice to Envoy's
//! route table through a header.
//!
//! The policy core ([`Balancer::pick`]) is plain Rust: it sees the request
//! through [`mesh_shared::Request`], the shared store through
//! [`mesh_shared::SharedStore`], time and randomness as numbers, so it is
//! tested natively. `filter.rs` is the thin proxy-wasm adapter (wasm32 only).
//!
//! Shared data per rule (all workers see the same, so shares are exact for
//! the proxy): a sequence counter for the round-robin algorithms, in-flight
//! counts for `least_requests`, the start time of the step schedule, and
//! a rule's canary analysis state (see [`canary`]).

mod analysis_config;
pub mod canary;
pub mod config;
pub mod sequence;
pub mod spec;

#[cfg(target_arch = "wasm32")]
pub mod part;
// The module's entry points; off when the suite links this crate for its part.
#[cfg(all(target_arch = "wasm32", feature = "module"))]
mod filter;

use std::cell::RefCell;

use mesh_shared::circuit;
use mesh_shared::hash::hash64;
use mesh_shared::outcome::{self, Outcome, Response};
use mesh_shared::route_metadata::RouteChoice;
use mesh_shared::store::{ensure, update, SharedStore, Step as Write};
use mesh_shared::Request;

pub use canary::{Analysis, Phase};
pub use config::{Algorithm, Config, NoTarget, Rule, Target};

/// CAS attempts before a shared counter gives up for one request (the pick
/// then falls back to `weighted_random`).
const MAX_ATTEMPTS: u32 = 64;
/// Smooth-WRR sequences for weight sets outside the schedule (targets skipped
/// for open circuits) kept per worker.
const CACHED_SEQUENCES: usize = 16;

/// What the filter must do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// No rule applies: leave the request alone.
    NoRule,
    /// Write `targets[target]` of rule `rule` into its header.
    Target {
        rule: usize,
        target: usize,
        how: How,
        /// Counted in the rule's in-flight counts: release when the stream ends.
        counted: bool,
    },
    /// No target has a weight above zero: follow the rule's `no_target`.
    NoTarget { rule: usize },
}

/// Why a target was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// The request's override header named it.
    Override,
    /// Rendezvous hashing of the request's sticky key.
    Sticky,
    /// The rule's algorithm.
    Algorithm,
    /// Shared data stayed contended: weighted random instead.
    Fallback,
}

pub struct Balancer {
    pub config: Config,
    /// Per rule: when its step schedule started (clock nanoseconds).
    starts: Vec<u64>,
    /// Per rule: the schedule's `after` offsets (what canary analysis gates).
    afters: Vec<Vec<u64>>,
    /// Per rule, per step: the smooth-WRR sequence of the step's weights.
    sequences: Vec<Vec<Vec<u8>>>,
    /// Sequences of other weight sets (with targets skipped for open circuits).
    cache: RefCell<Vec<(Vec<u32>, Vec<u8>)>>,
}

fn sequence_key(rule: &Rule) -> String {
    format!("{}seq", rule.key_prefix)
}

fn in_flight_key(rule: &Rule) -> String {
    format!("{}inflight", rule.key_prefix)
}

fn start_key(rule: &Rule) -> String {
    format!("{}start", rule.key_prefix)
}

fn canary_key(rule: &Rule) -> String {
    format!("{}canary", rule.key_prefix)
}

fn read_u64(bytes: Option<&[u8]>) -> u64 {
    bytes
        .and_then(|b| b.get(..8))
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

fn decode_counts(bytes: Option<&[u8]>, n: usize) -> Vec<u32> {
    let mut counts: Vec<u32> = bytes
        .unwrap_or_default()
        .chunks_exact(4)
        .filter_map(|c| c.try_into().ok().map(u32::from_le_bytes))
        .collect();
    counts.resize(n, 0);
    counts
}

fn encode_counts(counts: &[u32]) -> Vec<u8> {
    counts.iter().flat_map(|c| c.to_le_bytes()).collect()
}

/// A uniform number below `n` from 64 random bits.
fn below(random: u64, n: usize) -> usize {
    ((u128::from(random) * n as u128) >> 64) as usize
}

/// A target drawn with probability proportional to its weight.
fn weighted_draw(weights: &[u32], random: u64) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut point = ((u128::from(random) * u128::from(total)) >> 64) as u64;
    for (i, w) in weights.iter().enumerate() {
        let w = u64::from(*w);
        if point < w {
            return Some(i);
        }
        point -= w;
    }
    None
}

/// Weighted rendezvous hashing: every target scores `-weight / ln(u)` with
/// `u` a uniform hash of (key, target); the best score wins. A weight change
/// of one target moves users only to it (raised) or away from it (lowered).
pub fn rendezvous(key: &[u8], targets: &[Target], weights: &[u32]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, (target, w)) in targets.iter().zip(weights).enumerate() {
        if *w == 0 {
            continue;
        }
        let h = hash64(&[key, target.name.as_bytes()]);
        // Uniform in (0, 1), never 0 or 1, so ln(u) is finite and negative.
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = -f64::from(*w) / u.ln();
        if best.is_none_or(|(_, b)| score > b) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

/// The target with the fewest in-flight requests per unit of weight; ties
/// are broken by `random`.
fn least_loaded(counts: &[u32], weights: &[u32], random: u64) -> Option<usize> {
    let n = weights.len();
    let offset = below(random, n.max(1));
    let mut best: Option<usize> = None;
    for k in 0..n {
        let i = (offset + k) % n;
        let (Some(&w), Some(&c)) = (weights.get(i), counts.get(i)) else {
            continue;
        };
        if w == 0 {
            continue;
        }
        let better = match best {
            None => true,
            Some(b) => {
                let bw = u64::from(weights.get(b).copied().unwrap_or(0));
                let bc = u64::from(counts.get(b).copied().unwrap_or(0));
                // (c + 1) / w < (bc + 1) / bw, without division.
                (u64::from(c) + 1) * bw < (bc + 1) * u64::from(w)
            }
        };
        if better {
            best = Some(i);
        }
    }
    best
}

impl Balancer {
    pub fn new(config: Config) -> Balancer {
        let sequences = config
            .rules
            .iter()
            .map(|r| {
                r.schedule
                    .iter()
                    .map(|s| {
                        if r.algorithm == Algorithm::WeightedRoundRobin {
                            sequence::smooth_wrr(&s.weights)
                        } else {
                            Vec::new()
                        }
                    })
                    .collect()
            })
            .collect();
        let starts = vec![0; config.rules.len()];
        let afters = config
            .rules
            .iter()
            .map(|r| r.schedule.iter().map(|s| s.after_nanos).collect())
            .collect();
        Balancer {
            config,
            starts,
            afters,
            sequences,
            cache: RefCell::new(Vec::new()),
        }
    }

    /// Creates the rules' shared keys and reads when their schedules started.
    /// Call at configure time (see [`mesh_shared::store::ensure`]): the first
    /// configuration in the proxy sets the start, later ones (other workers,
    /// a reload with the same rule) keep it.
    pub fn setup(&mut self, store: &dyn SharedStore, now: u64) {
        for (rule, start) in self.config.rules.iter().zip(self.starts.iter_mut()) {
            if rule.algorithm.uses_sequence() {
                ensure(store, &sequence_key(rule), &0u64.to_le_bytes());
            }
            if rule.algorithm == Algorithm::LeastRequests {
                ensure(
                    store,
                    &in_flight_key(rule),
                    &encode_counts(&vec![0; rule.targets.len()]),
                );
            }
            if rule.schedule.len() > 1 {
                ensure(store, &start_key(rule), &now.to_le_bytes());
                *start = store
                    .get(&start_key(rule))
                    .map(|(b, _)| read_u64(Some(&b)))
                    .unwrap_or(now);
            }
            if rule.analysis.is_some() {
                // Intervals count from the schedule's start.
                ensure(
                    store,
                    &canary_key(rule),
                    &canary::State::new(*start).encode(),
                );
            }
        }
    }

    /// Index of the schedule step in force for `rule` at `now`.
    fn step_index(&self, rule: usize, now: u64) -> usize {
        let Some(r) = self.config.rules.get(rule) else {
            return 0;
        };
        let start = self.starts.get(rule).copied().unwrap_or(0);
        let elapsed = now.saturating_sub(start);
        r.schedule
            .iter()
            .rposition(|s| s.after_nanos <= elapsed)
            .unwrap_or(0)
    }

    /// The weights of `rule` at `now` (after its steps).
    pub fn weights_at(&self, rule: usize, now: u64) -> &[u32] {
        self.config
            .rules
            .get(rule)
            .and_then(|r| r.schedule.get(self.step_index(rule, now)))
            .map(|s| s.weights.as_slice())
            .unwrap_or_default()
    }

    pub fn pick(
        &self,
        req: &mut dyn Request,
        store: &dyn SharedStore,
        now: u64,
        random: u64,
    ) -> Pick {
        self.pick_judged(req, store, now, random).0
    }

    /// [`Balancer::pick`], with the rule's canary analysis state (for rules
    /// with `analysis`) and the change this request made to it (it closed an
    /// interval or applied a step), if any.
    pub fn pick_judged(
        &self,
        req: &mut dyn Request,
        store: &dyn SharedStore,
        now: u64,
        random: u64,
    ) -> (Pick, Option<canary::State>, Option<canary::Change>) {
        let route = RouteChoice::of(req, "lb-hints", self.config.route_metadata);
        let Some((index, _)) = self
            .config
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| route.allows(&r.name) && r.matcher.matches(req))
        else {
            return (Pick::NoRule, None, None);
        };
        let (analysed, change) = match self.canary_state(index, store, now) {
            Some((state, change)) => (Some(state), change),
            None => (None, None),
        };
        let pick = self.pick_in(req, store, now, random, index, analysed);
        (pick, analysed, change)
    }

    fn pick_in(
        &self,
        req: &mut dyn Request,
        store: &dyn SharedStore,
        now: u64,
        random: u64,
        index: usize,
        analysed: Option<canary::State>,
    ) -> Pick {
        let Some(rule) = self.config.rules.get(index) else {
            return Pick::NoRule;
        };
        let least_requests = rule.algorithm == Algorithm::LeastRequests;
        let chosen = |target: usize, how: How| {
            let counted = least_requests && self.acquire(store, rule, target);
            Pick::Target {
                rule: index,
                target,
                how,
                counted,
            }
        };

        if let Some(name) = rule.override_header.as_deref().and_then(|h| req.header(h)) {
            if let Some(t) = rule.targets.iter().position(|t| t.name.as_bytes() == name) {
                return chosen(t, How::Override);
            }
        }

        let (step, mut weights, mut skipped) = match (analysed, &rule.analysis) {
            (Some(state), Some(a)) => {
                let step = (state.step as usize).min(rule.schedule.len().saturating_sub(1));
                let of_step = rule.schedule.get(step).map(|s| s.weights.as_slice());
                let weights =
                    canary::effective_weights(of_step.unwrap_or_default(), a.canary, state.phase);
                // Rolled back: not the step's weights, so not its sequence.
                (step, weights, state.phase == Phase::RolledBack)
            }
            _ => (
                self.step_index(index, now),
                self.weights_at(index, now).to_vec(),
                false,
            ),
        };
        if rule.avoid_open_circuits {
            let open: Vec<bool> = rule
                .targets
                .iter()
                .zip(&weights)
                .map(|(t, w)| *w > 0 && circuit::is_open(store, &t.cluster, now))
                .collect();
            // Skip open targets only while another target is available.
            let available = weights.iter().zip(&open).any(|(w, o)| *w > 0 && !o);
            if available && open.iter().any(|o| *o) {
                for (w, o) in weights.iter_mut().zip(&open) {
                    if *o {
                        *w = 0;
                    }
                }
                skipped = true;
            }
        }
        if weights.iter().all(|w| *w == 0) {
            return Pick::NoTarget { rule: index };
        }

        if let Some(key) = rule.sticky.as_ref().and_then(|s| s.read(req)) {
            if let Some(t) = rendezvous(key, &rule.targets, &weights) {
                return chosen(t, How::Sticky);
            }
        }

        let picked = match rule.algorithm {
            Algorithm::RoundRobin | Algorithm::WeightedRoundRobin => {
                match self.claim_position(store, rule) {
                    Some(position) if rule.algorithm == Algorithm::RoundRobin => {
                        let eligible: Vec<usize> = (0..weights.len())
                            .filter(|i| weights.get(*i).is_some_and(|w| *w > 0))
                            .collect();
                        let slot = (position % eligible.len().max(1) as u64) as usize;
                        eligible.get(slot).copied().map(|t| (t, How::Algorithm))
                    }
                    Some(position) => self
                        .wrr_at(index, step, skipped, &weights, position)
                        .map(|t| (t, How::Algorithm)),
                    None => weighted_draw(&weights, random).map(|t| (t, How::Fallback)),
                }
            }
            Algorithm::Random => {
                let eligible: Vec<usize> = (0..weights.len())
                    .filter(|i| weights.get(*i).is_some_and(|w| *w > 0))
                    .collect();
                eligible
                    .get(below(random, eligible.len()))
                    .map(|t| (*t, How::Algorithm))
            }
            Algorithm::WeightedRandom | Algorithm::Sticky => {
                weighted_draw(&weights, random).map(|t| (t, How::Algorithm))
            }
            Algorithm::LeastRequests => {
                let n = rule.targets.len();
                let claimed = update(store, &in_flight_key(rule), MAX_ATTEMPTS, |cur| {
                    let mut counts = decode_counts(cur, n);
                    match least_loaded(&counts, &weights, random) {
                        Some(t) => {
                            if let Some(c) = counts.get_mut(t) {
                                *c = c.saturating_add(1);
                            }
                            Write::Write(encode_counts(&counts), Some(t))
                        }
                        None => Write::Keep(None),
                    }
                });
                match claimed {
                    Ok((Some(t), _)) => {
                        return Pick::Target {
                            rule: index,
                            target: t,
                            how: How::Algorithm,
                            counted: true,
                        }
                    }
                    Ok((None, _)) => None,
                    Err(_) => weighted_draw(&weights, random).map(|t| (t, How::Fallback)),
                }
            }
        };
        match picked {
            Some((t, how)) => chosen(t, how),
            None => Pick::NoTarget { rule: index },
        }
    }

    /// The canary analysis state of rule `index` (none without `analysis`),
    /// after closing an interval or applying a step that is due at `now`.
    fn canary_state(
        &self,
        index: usize,
        store: &dyn SharedStore,
        now: u64,
    ) -> Option<(canary::State, Option<canary::Change>)> {
        let rule = self.config.rules.get(index)?;
        let analysis = rule.analysis.as_ref()?;
        let afters = self.afters.get(index)?;
        let start = self.starts.get(index).copied().unwrap_or(0);
        let key = canary_key(rule);
        let read = |bytes: Option<&[u8]>| {
            bytes
                .and_then(canary::State::decode)
                .unwrap_or_else(|| canary::State::new(start))
        };
        let current = read(store.get(&key).map(|(b, _)| b).as_deref());
        if !analysis.due(&current, afters, start, now) {
            return Some((current, None));
        }
        self.change_canary(store, index, |state| {
            analysis.advance(state, afters, start, now)
        })
        .or(Some((current, None)))
    }

    /// Applies `decide` to the rule's analysis state with CAS; the state
    /// after, and the change if one was written by this call.
    fn change_canary(
        &self,
        store: &dyn SharedStore,
        index: usize,
        decide: impl Fn(canary::State) -> (canary::State, Option<(canary::Verdict, u64, u64, u64)>),
    ) -> Option<(canary::State, Option<canary::Change>)> {
        let rule = self.config.rules.get(index)?;
        let start = self.starts.get(index).copied().unwrap_or(0);
        update(store, &canary_key(rule), MAX_ATTEMPTS, |cur| {
            let before = cur
                .and_then(canary::State::decode)
                .unwrap_or_else(|| canary::State::new(start));
            let (after, judged) = decide(before);
            if after == before {
                Write::Keep((after, None))
            } else {
                let change = canary::Change {
                    before,
                    after,
                    judged,
                };
                Write::Write(after.encode(), (after, Some(change)))
            }
        })
        .ok()
        .map(|(r, _)| r)
    }

    /// Whether the outcome of `pick` is judged by its rule's canary analysis:
    /// the rule chose the canary itself (not by `override`).
    pub fn judges(&self, pick: &Pick) -> bool {
        match *pick {
            Pick::Target {
                rule, target, how, ..
            } => {
                how != How::Override
                    && self
                        .config
                        .rules
                        .get(rule)
                        .and_then(|r| r.analysis.as_ref())
                        .is_some_and(|a| a.canary == target)
            }
            _ => false,
        }
    }

    /// What a finished canary call of `rule` was (circuit-breaker's judging).
    pub fn classify(&self, rule: usize, response: Response<'_>) -> Outcome {
        match self
            .config
            .rules
            .get(rule)
            .and_then(|r| r.analysis.as_ref())
        {
            Some(a) => outcome::classify(&a.failure_when, a.slow_call_nanos, response),
            None => Outcome::Ignored,
        }
    }

    /// Counts a finished canary call of `rule` (a pick [`Balancer::judges`]);
    /// returns the change it made if it closed an interval or applied a step.
    pub fn record(
        &self,
        store: &dyn SharedStore,
        rule: usize,
        outcome: Outcome,
        now: u64,
    ) -> Option<canary::Change> {
        let analysis = self.config.rules.get(rule)?.analysis.as_ref()?;
        let afters = self.afters.get(rule)?;
        let start = self.starts.get(rule).copied().unwrap_or(0);
        let (_, change) = self.change_canary(store, rule, |state| {
            analysis.record(state, afters, start, outcome, now)
        })?;
        change
    }

    /// The canary analysis state of `rule` as the shared data holds it.
    pub fn canary(&self, store: &dyn SharedStore, rule: usize) -> Option<canary::State> {
        let r = self.config.rules.get(rule)?;
        r.analysis.as_ref()?;
        let start = self.starts.get(rule).copied().unwrap_or(0);
        let bytes = store.get(&canary_key(r)).map(|(b, _)| b);
        Some(
            bytes
                .as_deref()
                .and_then(canary::State::decode)
                .unwrap_or_else(|| canary::State::new(start)),
        )
    }

    /// Claims the next position of the rule's shared sequence.
    fn claim_position(&self, store: &dyn SharedStore, rule: &Rule) -> Option<u64> {
        update(store, &sequence_key(rule), MAX_ATTEMPTS, |cur| {
            let n = read_u64(cur);
            Write::Write(n.wrapping_add(1).to_le_bytes().to_vec(), n)
        })
        .ok()
        .map(|(n, _)| n)
    }

    /// The target at `position` of the smooth-WRR sequence of `weights`.
    fn wrr_at(
        &self,
        rule: usize,
        step: usize,
        skipped: bool,
        weights: &[u32],
        position: u64,
    ) -> Option<usize> {
        let at = |seq: &[u8]| {
            let len = seq.len() as u64;
            (len > 0)
                .then(|| seq.get((position % len) as usize).map(|t| usize::from(*t)))
                .flatten()
        };
        if !skipped {
            return at(self.sequences.get(rule)?.get(step)?);
        }
        let mut cache = self.cache.borrow_mut();
        if let Some((_, seq)) = cache.iter().find(|(w, _)| w.as_slice() == weights) {
            return at(seq);
        }
        let seq = sequence::smooth_wrr(weights);
        let result = at(&seq);
        if cache.len() >= CACHED_SEQUENCES {
            cache.remove(0);
        }
        cache.push((weights.to_vec(), seq));
        result
    }

    /// Counts one more in-flight request on `target`; false if contended.
    fn acquire(&self, store: &dyn SharedStore, rule: &Rule, target: usize) -> bool {
        self.change_in_flight(store, rule, target, true)
    }

    /// The stream of a counted pick ended (completed or reset): count it out.
    pub fn release(&self, store: &dyn SharedStore, rule: usize, target: usize) {
        if let Some(r) = self.config.rules.get(rule) {
            self.change_in_flight(store, r, target, false);
        }
    }

    fn change_in_flight(
        &self,
        store: &dyn SharedStore,
        rule: &Rule,
        target: usize,
        up: bool,
    ) -> bool {
        let n = rule.targets.len();
        update(store, &in_flight_key(rule), MAX_ATTEMPTS, |cur| {
            let mut counts = decode_counts(cur, n);
            if let Some(c) = counts.get_mut(target) {
                *c = if up {
                    c.saturating_add(1)
                } else {
                    c.saturating_sub(1)
                };
            }
            Write::Write(encode_counts(&counts), ())
        })
        .is_ok()
    }

    /// In-flight counts of `rule` as the shared data holds them.
    pub fn in_flight(&self, store: &dyn SharedStore, rule: usize) -> Vec<u32> {
        let Some(r) = self.config.rules.get(rule) else {
            return Vec::new();
        };
        let bytes = store.get(&in_flight_key(r)).map(|(b, _)| b);
        decode_counts(bytes.as_deref(), r.targets.len())
    }
}

#[cfg(test)]
mod tests;
