//! One breaker: its state, its sliding window, and the transitions of the
//! Resilience4j state machine, as a pure function of (state, event, time).
//!
//! A breaker lives in one shared-data entry (see `table.rs`); every change is
//! a CAS of the whole entry, so all workers see one breaker.
//!
//! `generation` grows on every transition. A call remembers the generation it
//! was admitted in, and its outcome is recorded only if the breaker is still
//! in that generation: a call admitted while closed that finishes after the
//! breaker opened does not count as a half-open probe, and a probe that
//! finishes after the breaker moved on does not count twice.

use mesh_shared::circuit::CircuitState;

use crate::config::{HalfOpenPolicy, Policy, Window};

pub use mesh_shared::outcome::Outcome;

/// A state change worth reporting (stats, the published cluster status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed -> open (thresholds crossed), half-open -> open (the probes
    /// failed, or did not all answer in time).
    Opened { from: CircuitState, until: u64 },
    /// Open -> half-open (the first request after `open_for`). `reopened`:
    /// the breaker was half-open before, its probes did not answer in time,
    /// and the `open_for` that followed had already passed at this request
    /// (half-open -> open -> half-open in one step).
    HalfOpened { reopened: bool },
    /// Half-open -> closed (the probes passed).
    Closed,
}

impl Transition {
    pub fn to(self) -> CircuitState {
        match self {
            Transition::Opened { .. } => CircuitState::Open,
            Transition::HalfOpened { .. } => CircuitState::HalfOpen,
            Transition::Closed => CircuitState::Closed,
        }
    }

    /// Whether the breaker opened (for `mesh_circuit_opened_total`).
    pub fn opened(self) -> bool {
        matches!(
            self,
            Transition::Opened { .. } | Transition::HalfOpened { reopened: true }
        )
    }

    pub fn from(self) -> CircuitState {
        match self {
            Transition::Opened { from, .. } => from,
            Transition::HalfOpened { reopened: false } => CircuitState::Open,
            Transition::HalfOpened { reopened: true } => CircuitState::HalfOpen,
            Transition::Closed => CircuitState::HalfOpen,
        }
    }
}

/// The state of one breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    /// Fingerprint of the key this breaker belongs to (0: the slot is free).
    pub key: u64,
    pub state: CircuitState,
    pub generation: u32,
    /// When the current state began.
    pub since: u64,
    /// While open: when the next request may probe.
    pub open_until: u64,
    /// When the last call was recorded (to find idle breakers).
    pub last_call: u64,
    pub consecutive_failures: u32,
    pub probes_admitted: u32,
    /// Probe outcomes recorded in this half-open episode (ignored ones are not).
    pub probe_calls: u32,
    pub probe_failures: u32,
    pub probe_slow: u32,
    pub window: WindowState,
}

/// The sliding window of a closed breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowState {
    /// A ring of the last calls: bit 0 failure, bit 1 slow, bit 2 present.
    Count { next: u32, calls: Vec<u8> },
    /// Buckets of (bucket number, calls, failures, slow calls).
    Time {
        bucket_nanos: u64,
        buckets: Vec<Bucket>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    pub epoch: u64,
    pub calls: u32,
    pub failures: u32,
    pub slow: u32,
}

const CALL_FAILED: u8 = 1;
const CALL_SLOW: u8 = 2;
const CALL_PRESENT: u8 = 4;

/// Totals over the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub calls: u64,
    pub failures: u64,
    pub slow: u64,
}

impl WindowState {
    pub fn empty(window: Window) -> WindowState {
        match window {
            Window::Count { size } => WindowState::Count {
                next: 0,
                calls: vec![0; usize::try_from(size).unwrap_or(1)],
            },
            Window::Time {
                buckets,
                bucket_nanos,
            } => WindowState::Time {
                bucket_nanos,
                buckets: vec![Bucket::default(); usize::try_from(buckets).unwrap_or(1)],
            },
        }
    }

    fn record(&mut self, failed: bool, slow: bool, now: u64) {
        match self {
            WindowState::Count { next, calls } => {
                let len = calls.len().max(1);
                let at = (*next as usize) % len;
                if let Some(slot) = calls.get_mut(at) {
                    *slot = CALL_PRESENT
                        | if failed { CALL_FAILED } else { 0 }
                        | if slow { CALL_SLOW } else { 0 };
                }
                // len <= MAX_COUNT_WINDOW: fits a u32.
                *next = ((at + 1) % len) as u32;
            }
            WindowState::Time {
                bucket_nanos,
                buckets,
            } => {
                let epoch = now / (*bucket_nanos).max(1);
                let len = buckets.len().max(1) as u64;
                // The remainder is below len, a usize.
                if let Some(b) = buckets.get_mut((epoch % len) as usize) {
                    if b.epoch != epoch {
                        *b = Bucket {
                            epoch,
                            ..Bucket::default()
                        };
                    }
                    b.calls = b.calls.saturating_add(1);
                    b.failures = b.failures.saturating_add(u32::from(failed));
                    b.slow = b.slow.saturating_add(u32::from(slow));
                }
            }
        }
    }

    pub fn totals(&self, now: u64) -> Totals {
        let mut t = Totals::default();
        match self {
            WindowState::Count { calls, .. } => {
                for c in calls.iter().filter(|c| *c & CALL_PRESENT != 0) {
                    t.calls += 1;
                    t.failures += u64::from(c & CALL_FAILED != 0);
                    t.slow += u64::from(c & CALL_SLOW != 0);
                }
            }
            WindowState::Time {
                bucket_nanos,
                buckets,
            } => {
                let current = now / (*bucket_nanos).max(1);
                let len = buckets.len() as u64;
                for b in buckets
                    .iter()
                    .filter(|b| b.epoch <= current && b.epoch + len > current)
                {
                    t.calls += u64::from(b.calls);
                    t.failures += u64::from(b.failures);
                    t.slow += u64::from(b.slow);
                }
            }
        }
        t
    }
}

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go to the upstream; report the outcome with this generation.
    Call { generation: u32, probe: bool },
    /// Answer locally; the breaker may be tried again after this many nanoseconds.
    Reject {
        state: CircuitState,
        retry_after_nanos: u64,
    },
}

impl Breaker {
    pub fn fresh(key: u64, window: Window, now: u64) -> Breaker {
        Breaker {
            key,
            state: CircuitState::Closed,
            generation: 0,
            since: now,
            open_until: 0,
            last_call: now,
            consecutive_failures: 0,
            probes_admitted: 0,
            probe_calls: 0,
            probe_failures: 0,
            probe_slow: 0,
            window: WindowState::empty(window),
        }
    }

    fn enter(&mut self, state: CircuitState, policy: &Policy, now: u64) {
        self.state = state;
        self.generation = self.generation.wrapping_add(1);
        self.since = now;
        self.probes_admitted = 0;
        self.probe_calls = 0;
        self.probe_failures = 0;
        self.probe_slow = 0;
        self.consecutive_failures = 0;
        self.open_until = if state == CircuitState::Open {
            now.saturating_add(policy.open_for_nanos)
        } else {
            0
        };
        if state == CircuitState::Closed {
            self.window = WindowState::empty(policy.window);
        }
    }

    /// Probes that did not all answer within `max_wait_in_half_open`: open
    /// again, from the instant the wait ended (as Resilience4j's timer
    /// would), so a request now may find that `open_for` over too, and a
    /// probe answering now is late.
    fn expire_half_open(&mut self, policy: &Policy, now: u64) -> Option<Transition> {
        let timed_out_at = self
            .since
            .saturating_add(policy.max_wait_in_half_open_nanos);
        if self.state != CircuitState::HalfOpen || now < timed_out_at {
            return None;
        }
        self.enter(CircuitState::Open, policy, timed_out_at);
        Some(Transition::Opened {
            from: CircuitState::HalfOpen,
            until: self.open_until,
        })
    }

    /// Decides whether a request may go through. Returns the decision,
    /// whether the breaker changed (then the caller must write it), and the
    /// transition, if any.
    pub fn admit(&mut self, policy: &Policy, now: u64) -> (Admit, bool, Option<Transition>) {
        let mut transition = self.expire_half_open(policy, now);
        let timed_out = transition.is_some();
        // Resilience4j probes only once the wait has passed (`isAfter`).
        if self.state == CircuitState::Open && now > self.open_until {
            self.enter(CircuitState::HalfOpen, policy, now);
            transition = Some(Transition::HalfOpened {
                reopened: timed_out,
            });
        }
        let mut changed = transition.is_some();
        let admit = match self.state {
            CircuitState::Closed => Admit::Call {
                generation: self.generation,
                probe: false,
            },
            CircuitState::Open => Admit::Reject {
                state: CircuitState::Open,
                retry_after_nanos: self.open_until.saturating_sub(now),
            },
            CircuitState::HalfOpen => {
                if u64::from(self.probes_admitted) < policy.half_open_calls {
                    self.probes_admitted += 1;
                    changed = true;
                    Admit::Call {
                        generation: self.generation,
                        probe: true,
                    }
                } else {
                    // The probes decide soon; nothing better to tell the client.
                    Admit::Reject {
                        state: CircuitState::HalfOpen,
                        retry_after_nanos: 1_000_000_000,
                    }
                }
            }
        };
        (admit, changed, transition)
    }

    /// Records the outcome of a call admitted in `generation`. Returns whether
    /// the breaker changed (must be written) and the transition, if any.
    pub fn record(
        &mut self,
        policy: &Policy,
        generation: u32,
        outcome: Outcome,
        now: u64,
    ) -> (bool, Option<Transition>) {
        if generation != self.generation {
            return (false, None);
        }
        if let Some(t) = self.expire_half_open(policy, now) {
            return (true, Some(t));
        }
        match self.state {
            CircuitState::Open => (false, None),
            CircuitState::HalfOpen => {
                if outcome == Outcome::Ignored {
                    self.probes_admitted = self.probes_admitted.saturating_sub(1);
                    return (true, None);
                }
                self.probe_calls = self.probe_calls.saturating_add(1);
                self.probe_failures = self
                    .probe_failures
                    .saturating_add(u32::from(outcome.is_failure()));
                self.probe_slow = self.probe_slow.saturating_add(u32::from(outcome.is_slow()));
                let verdict = match policy.half_open_policy {
                    // A slow probe fails as a failure does.
                    HalfOpenPolicy::AnyFailure if outcome != Outcome::Success => {
                        Some(CircuitState::Open)
                    }
                    HalfOpenPolicy::AnyFailure
                        if u64::from(self.probe_calls) < policy.half_open_calls =>
                    {
                        None
                    }
                    HalfOpenPolicy::AnyFailure => Some(CircuitState::Closed),
                    // As Resilience4j: judged once `minimum_calls` probes
                    // answered (capped as for the window), at most all of
                    // them (with the defaults, 100 and 10: all of them).
                    HalfOpenPolicy::Rate
                        if u64::from(self.probe_calls)
                            < minimum_calls(policy).min(policy.half_open_calls) =>
                    {
                        None
                    }
                    HalfOpenPolicy::Rate => Some(
                        if rates_reached(
                            policy,
                            u64::from(self.probe_calls),
                            u64::from(self.probe_failures),
                            u64::from(self.probe_slow),
                        ) {
                            CircuitState::Open
                        } else {
                            CircuitState::Closed
                        },
                    ),
                };
                match verdict {
                    None => (true, None),
                    Some(CircuitState::Open) => {
                        self.enter(CircuitState::Open, policy, now);
                        (
                            true,
                            Some(Transition::Opened {
                                from: CircuitState::HalfOpen,
                                until: self.open_until,
                            }),
                        )
                    }
                    Some(_) => {
                        self.enter(CircuitState::Closed, policy, now);
                        self.last_call = now;
                        (true, Some(Transition::Closed))
                    }
                }
            }
            CircuitState::Closed => {
                if outcome == Outcome::Ignored {
                    return (false, None);
                }
                let failed = outcome.is_failure();
                self.last_call = now;
                self.window.record(failed, outcome.is_slow(), now);
                self.consecutive_failures = if failed {
                    self.consecutive_failures.saturating_add(1)
                } else {
                    0
                };
                if self.should_open(policy, now) {
                    self.enter(CircuitState::Open, policy, now);
                    (
                        true,
                        Some(Transition::Opened {
                            from: CircuitState::Closed,
                            until: self.open_until,
                        }),
                    )
                } else {
                    (true, None)
                }
            }
        }
    }

    fn should_open(&self, policy: &Policy, now: u64) -> bool {
        if policy.consecutive_failures > 0
            && u64::from(self.consecutive_failures) >= policy.consecutive_failures
        {
            return true;
        }
        let t = self.window.totals(now);
        if t.calls == 0 || t.calls < minimum_calls(policy) {
            return false;
        }
        rates_reached(policy, t.calls, t.failures, t.slow)
    }

    /// Whether the slot may be given to another key: a closed breaker without
    /// calls for `idle`, or an open one whose `open_for` ended `idle` ago.
    pub fn is_idle(&self, now: u64, idle: u64) -> bool {
        match self.state {
            CircuitState::Closed => now >= self.last_call.saturating_add(idle),
            CircuitState::Open => now >= self.open_until.saturating_add(idle),
            CircuitState::HalfOpen => false,
        }
    }
}

/// The calls a window must hold before it is judged: `minimum_calls`, for a
/// count window at most its size (it can never hold more; as Resilience4j).
fn minimum_calls(policy: &Policy) -> u64 {
    match policy.window {
        Window::Count { size } => policy.minimum_calls.min(size),
        Window::Time { .. } => policy.minimum_calls,
    }
}

/// Whether `failures` or `slow` of `calls` (> 0) reach the rule's thresholds (`>=`).
fn rates_reached(policy: &Policy, calls: u64, failures: u64, slow: u64) -> bool {
    failures * 100 >= policy.failure_rate_percent * calls
        || policy
            .slow_call
            .is_some_and(|s| slow * 100 >= s.rate_percent * calls)
}

// ---- encoding ----

const HEADER: usize = 8 + 1 + 4 + 8 + 8 + 8 + 4 + 4 + 4 + 4 + 4 + 4;
const BUCKET: usize = 8 + 4 + 4 + 4;

/// Bytes of an encoded breaker with this window.
pub fn encoded_len(window: Window) -> usize {
    HEADER
        + match window {
            Window::Count { size } => usize::try_from(size).unwrap_or(0),
            Window::Time { buckets, .. } => usize::try_from(buckets).unwrap_or(0) * BUCKET,
        }
}

impl Breaker {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 64);
        out.extend_from_slice(&self.key.to_le_bytes());
        out.push(self.state as u8);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.since.to_le_bytes());
        out.extend_from_slice(&self.open_until.to_le_bytes());
        out.extend_from_slice(&self.last_call.to_le_bytes());
        out.extend_from_slice(&self.consecutive_failures.to_le_bytes());
        out.extend_from_slice(&self.probes_admitted.to_le_bytes());
        out.extend_from_slice(&self.probe_calls.to_le_bytes());
        out.extend_from_slice(&self.probe_failures.to_le_bytes());
        out.extend_from_slice(&self.probe_slow.to_le_bytes());
        match &self.window {
            WindowState::Count { next, calls } => {
                out.extend_from_slice(&next.to_le_bytes());
                out.extend_from_slice(calls);
            }
            WindowState::Time { buckets, .. } => {
                out.extend_from_slice(&0u32.to_le_bytes());
                for b in buckets {
                    out.extend_from_slice(&b.epoch.to_le_bytes());
                    out.extend_from_slice(&b.calls.to_le_bytes());
                    out.extend_from_slice(&b.failures.to_le_bytes());
                    out.extend_from_slice(&b.slow.to_le_bytes());
                }
            }
        }
        out
    }

    /// Decodes an entry written for `window`; `None` if it does not fit
    /// (never written, or written by another configuration).
    pub fn decode(bytes: &[u8], window: Window) -> Option<Breaker> {
        if bytes.len() != encoded_len(window) {
            return None;
        }
        let mut r = Reader(bytes);
        let key = r.u64()?;
        let state = match r.u8()? {
            0 => CircuitState::Closed,
            1 => CircuitState::Open,
            2 => CircuitState::HalfOpen,
            _ => return None,
        };
        let generation = r.u32()?;
        let since = r.u64()?;
        let open_until = r.u64()?;
        let last_call = r.u64()?;
        let consecutive_failures = r.u32()?;
        let probes_admitted = r.u32()?;
        let probe_calls = r.u32()?;
        let probe_failures = r.u32()?;
        let probe_slow = r.u32()?;
        let next = r.u32()?;
        let window = match window {
            Window::Count { .. } => WindowState::Count {
                next,
                calls: r.0.to_vec(),
            },
            Window::Time { bucket_nanos, .. } => {
                let mut buckets = Vec::with_capacity(r.0.len() / BUCKET);
                while !r.0.is_empty() {
                    buckets.push(Bucket {
                        epoch: r.u64()?,
                        calls: r.u32()?,
                        failures: r.u32()?,
                        slow: r.u32()?,
                    });
                }
                WindowState::Time {
                    bucket_nanos,
                    buckets,
                }
            }
        };
        Some(Breaker {
            key,
            state,
            generation,
            since,
            open_until,
            last_call,
            consecutive_failures,
            probes_admitted,
            probe_calls,
            probe_failures,
            probe_slow,
            window,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_at_checked(N)?;
        self.0 = rest;
        head.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}
