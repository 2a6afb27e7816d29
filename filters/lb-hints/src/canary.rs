//! Canary analysis: a rule's steps advance only while its canary is healthy,
//! and the rule rolls back at once when it is not.
//!
//! Time is cut into intervals of `interval` from the rule's start. The
//! canary's calls of one interval (outcomes lb-hints routed there, judged as
//! circuit-breaker judges them) are counted in one shared-data entry; the
//! first request (pick or finished call, on any worker) that comes after the
//! interval's end closes it in the same compare-and-swap that changes the
//! entry, so exactly one worker judges each interval and all see the result.
//!
//! An interval is inconclusive below `min_calls`, failed when its failure or
//! slow-call rate is above the maximum, passed otherwise. A step applies once
//! its `after` has passed and an interval passed since the previous step (a
//! failed one starts that wait over). More than `failure_limit` failed
//! intervals roll the rule back: the canary's weight is 0 from then on. The
//! entry's key carries a hash of the rule's configuration, so a changed rule
//! starts over and an unchanged one (another worker, a reload) keeps the state.

use mesh_shared::outcome::{FailureWhen, Outcome};

/// The compiled `analysis` of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    /// Index of the canary in the rule's targets.
    pub canary: usize,
    pub interval_nanos: u64,
    /// Calls an interval needs to be judged.
    pub min_calls: u64,
    pub max_failure_rate_percent: u64,
    pub max_slow_rate_percent: u64,
    /// A call whose response headers take this long or longer is slow.
    pub slow_call_nanos: Option<u64>,
    /// Failed intervals tolerated; one more rolls back.
    pub failure_limit: u64,
    pub failure_when: FailureWhen,
}

/// Where the rollout is (the value of `mesh_lb_canary_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Progressing = 0,
    Promoted = 1,
    RolledBack = 2,
}

/// The judgement of one closed interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Failed,
    /// Fewer than `min_calls` calls.
    Inconclusive,
}

/// One rule's analysis state, as kept in shared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub phase: Phase,
    /// Index of the schedule step in force.
    pub step: u32,
    /// Start of the interval being counted (clock nanoseconds).
    pub interval_start: u64,
    pub calls: u64,
    pub failures: u64,
    pub slow: u64,
    pub failed_intervals: u64,
    /// Intervals passed since the step in force applied (or since the last failed one).
    pub passed_since_step: u64,
}

const ENCODED_LEN: usize = 1 + 4 + 8 * 6;

impl State {
    /// A rollout at step 0 whose first interval starts at `start`.
    pub fn new(start: u64) -> State {
        State {
            phase: Phase::Progressing,
            step: 0,
            interval_start: start,
            calls: 0,
            failures: 0,
            slow: 0,
            failed_intervals: 0,
            passed_since_step: 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_LEN);
        out.push(self.phase as u8);
        out.extend_from_slice(&self.step.to_le_bytes());
        for n in [
            self.interval_start,
            self.calls,
            self.failures,
            self.slow,
            self.failed_intervals,
            self.passed_since_step,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out
    }

    /// `None` for bytes that are not an encoded state.
    pub fn decode(bytes: &[u8]) -> Option<State> {
        if bytes.len() != ENCODED_LEN {
            return None;
        }
        let phase = match bytes.first()? {
            0 => Phase::Progressing,
            1 => Phase::Promoted,
            2 => Phase::RolledBack,
            _ => return None,
        };
        let step = u32::from_le_bytes(bytes.get(1..5)?.try_into().ok()?);
        let mut n = [0u64; 6];
        for (i, slot) in n.iter_mut().enumerate() {
            let at = 5 + i * 8;
            *slot = u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?);
        }
        Some(State {
            phase,
            step,
            interval_start: n[0],
            calls: n[1],
            failures: n[2],
            slow: n[3],
            failed_intervals: n[4],
            passed_since_step: n[5],
        })
    }
}

/// What an update changed, for stats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub before: State,
    pub after: State,
    /// The closed interval's judgement and its counts (calls, failures, slow).
    pub judged: Option<(Verdict, u64, u64, u64)>,
}

impl Change {
    pub fn rolled_back(&self) -> bool {
        self.after.phase == Phase::RolledBack && self.before.phase != Phase::RolledBack
    }
}

impl Analysis {
    /// The verdict on an interval's counts.
    pub fn judge(&self, calls: u64, failures: u64, slow: u64) -> Verdict {
        if calls < self.min_calls || calls == 0 {
            return Verdict::Inconclusive;
        }
        let over = |n: u64, max_percent: u64| {
            u128::from(n) * 100 > u128::from(max_percent) * u128::from(calls)
        };
        let too_slow = self.slow_call_nanos.is_some() && over(slow, self.max_slow_rate_percent);
        if over(failures, self.max_failure_rate_percent) || too_slow {
            Verdict::Failed
        } else {
            Verdict::Passed
        }
    }

    /// Whether [`Analysis::advance`] would change `state` at `now`: lets a
    /// pick skip the write on almost every request.
    pub fn due(&self, state: &State, afters: &[u64], start: u64, now: u64) -> bool {
        state.phase == Phase::Progressing
            && (now >= state.interval_start.saturating_add(self.interval_nanos)
                || self.step_due(state, afters, start, now))
    }

    fn step_due(&self, state: &State, afters: &[u64], start: u64, now: u64) -> bool {
        let next = state.step as usize + 1;
        state.passed_since_step > 0
            && afters
                .get(next)
                .is_some_and(|after| now.saturating_sub(start) >= *after)
    }

    /// Closes the interval if it ended by `now`, then applies the next step
    /// if it is due. `afters` are the schedule's offsets from `start`.
    pub fn advance(
        &self,
        mut state: State,
        afters: &[u64],
        start: u64,
        now: u64,
    ) -> (State, Option<(Verdict, u64, u64, u64)>) {
        if state.phase != Phase::Progressing {
            return (state, None);
        }
        let mut judged = None;
        let interval = self.interval_nanos.max(1);
        if now >= state.interval_start.saturating_add(interval) {
            let verdict = self.judge(state.calls, state.failures, state.slow);
            judged = Some((verdict, state.calls, state.failures, state.slow));
            match verdict {
                Verdict::Passed => state.passed_since_step += 1,
                Verdict::Failed => {
                    state.failed_intervals += 1;
                    state.passed_since_step = 0;
                    if state.failed_intervals > self.failure_limit {
                        state.phase = Phase::RolledBack;
                    }
                }
                Verdict::Inconclusive => {}
            }
            // Intervals without a single call since are inconclusive: skip them.
            let ended = (now - state.interval_start) / interval;
            state.interval_start = state.interval_start.saturating_add(ended * interval);
            state.calls = 0;
            state.failures = 0;
            state.slow = 0;
        }
        if state.phase == Phase::Progressing && self.step_due(&state, afters, start, now) {
            state.step += 1;
            state.passed_since_step = 0;
            if state.step as usize + 1 >= afters.len() {
                state.phase = Phase::Promoted;
            }
        }
        (state, judged)
    }

    /// Counts one finished canary call into the interval in progress (after
    /// closing the previous one if it ended).
    pub fn record(
        &self,
        state: State,
        afters: &[u64],
        start: u64,
        outcome: Outcome,
        now: u64,
    ) -> (State, Option<(Verdict, u64, u64, u64)>) {
        let (mut state, judged) = self.advance(state, afters, start, now);
        if state.phase == Phase::Progressing && outcome != Outcome::Ignored {
            state.calls += 1;
            state.failures += u64::from(outcome.is_failure());
            state.slow += u64::from(outcome.is_slow());
        }
        (state, judged)
    }
}

/// The weights in force: the step's, with the canary's set to 0 once rolled
/// back (every other target keeps its share; if none had one, all share evenly).
pub fn effective_weights(step_weights: &[u32], canary: usize, phase: Phase) -> Vec<u32> {
    let mut weights = step_weights.to_vec();
    if phase == Phase::RolledBack {
        if let Some(w) = weights.get_mut(canary) {
            *w = 0;
        }
        if weights.iter().all(|w| *w == 0) {
            for (i, w) in weights.iter_mut().enumerate() {
                *w = u32::from(i != canary);
            }
        }
    }
    weights
}

#[cfg(test)]
mod tests;
