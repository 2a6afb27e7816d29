//! The breakers of one rule in Envoy shared data: a fixed table of
//! `max_breakers` slots, one shared-data entry each, updated with CAS.
//!
//! Envoy never deletes shared-data entries, so one entry per header value
//! would grow without bound under a hostile header. Instead a key lives in
//! one of [`PROBES`] slots picked by its fingerprint: its own slot if it has
//! one, else the first free one (never used, or a breaker idle long enough
//! that forgetting it loses nothing that matters, see [`Breaker::is_idle`]).
//! A key that finds every candidate slot held by live breakers shares the
//! rule's overflow breaker with the other such keys, so memory stays bounded
//! and those calls are still protected, as one group.
//!
//! Every slot, the overflow breaker and the per-rule summary are created at
//! configure time ([`BreakerTable::create`]); after that, entries change only
//! through CAS, so no update is lost to the unconditional first write that
//! Envoy's shared data has.

use mesh_shared::circuit::CircuitState;
use mesh_shared::store::{ensure, update, Exhausted, SharedStore, Step};

use crate::breaker::{encoded_len, Admit, Breaker, Outcome, Transition};
use crate::config::{Policy, Window};

/// Slots a key may live in (fewer if the table is smaller).
pub const PROBES: u64 = 4;
/// CAS attempts before giving up on one request (then the filter fails open).
const MAX_ATTEMPTS: u32 = 64;
/// Key of the overflow breaker; real keys are mapped above it.
const OVERFLOW_KEY: u64 = 1;
/// A closed breaker without calls for this long (at least) may give its slot away.
const MIN_IDLE_NANOS: u64 = 60_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerTable {
    prefix: String,
    max_breakers: u64,
    window: Window,
    idle_nanos: u64,
}

/// Where a call's breaker lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Index(u64),
    Overflow,
}

/// Which breaker a call belongs to, and in which of its generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub slot: Slot,
    pub key: u64,
    pub generation: u32,
}

/// What the table decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub slot: Slot,
    /// The key fingerprint as stored (to check the slot still holds it later).
    pub key: u64,
    pub admit: Admit,
    pub transition: Option<Transition>,
    /// The state of a breaker whose slot this key took over.
    pub evicted: Option<CircuitState>,
}

/// How many breakers of the rule are open and half-open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub open: u32,
    pub half_open: u32,
}

impl Summary {
    /// The rule's state gauge: the worst state of its breakers (open, then
    /// half-open, then closed).
    pub fn worst(&self) -> CircuitState {
        if self.open > 0 {
            CircuitState::Open
        } else if self.half_open > 0 {
            CircuitState::HalfOpen
        } else {
            CircuitState::Closed
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = self.open.to_le_bytes().to_vec();
        out.extend_from_slice(&self.half_open.to_le_bytes());
        out
    }

    fn decode(bytes: Option<&[u8]>) -> Summary {
        let word = |i: usize| {
            bytes
                .and_then(|b| b.get(i..i + 4))
                .and_then(|w| w.try_into().ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0)
        };
        Summary {
            open: word(0),
            half_open: word(4),
        }
    }

    fn count(&mut self, state: CircuitState, delta: i32) {
        let field = match state {
            CircuitState::Open => &mut self.open,
            CircuitState::HalfOpen => &mut self.half_open,
            CircuitState::Closed => return,
        };
        *field = field.saturating_add_signed(delta);
    }
}

enum Probe {
    Mine(Admission),
    Free,
    Taken,
}

impl BreakerTable {
    /// `prefix` must be unique per rule and configuration (see the config).
    pub fn new(prefix: String, max_breakers: u64, window: Window) -> BreakerTable {
        let window_nanos = match window {
            Window::Count { .. } => 0,
            Window::Time {
                buckets,
                bucket_nanos,
            } => buckets.saturating_mul(bucket_nanos),
        };
        BreakerTable {
            prefix,
            max_breakers: max_breakers.max(1),
            window,
            idle_nanos: window_nanos.max(MIN_IDLE_NANOS),
        }
    }

    pub fn max_breakers(&self) -> u64 {
        self.max_breakers
    }

    fn key_of(&self, slot: Slot) -> String {
        match slot {
            Slot::Index(i) => format!("{}{i}", self.prefix),
            Slot::Overflow => format!("{}overflow", self.prefix),
        }
    }

    fn summary_key(&self) -> String {
        format!("{}summary", self.prefix)
    }

    /// Creates every slot, the overflow breaker and the summary (configure time).
    pub fn create(&self, store: &dyn SharedStore, now: u64) {
        let free = vec![0; encoded_len(self.window)];
        for i in 0..self.max_breakers {
            ensure(store, &self.key_of(Slot::Index(i)), &free);
        }
        ensure(
            store,
            &self.key_of(Slot::Overflow),
            &Breaker::fresh(OVERFLOW_KEY, self.window, now).encode(),
        );
        ensure(store, &self.summary_key(), &Summary::default().encode());
    }

    fn decode(&self, bytes: Option<&[u8]>, now: u64) -> Breaker {
        bytes
            .and_then(|b| Breaker::decode(b, self.window))
            .unwrap_or_else(|| Breaker::fresh(0, self.window, now))
    }

    /// Admits or rejects one request of the key with fingerprint `fp`.
    pub fn admit(
        &self,
        store: &dyn SharedStore,
        policy: &Policy,
        fp: u64,
        now: u64,
    ) -> Result<Admission, Exhausted> {
        // 0 marks a free slot and 1 the overflow breaker.
        let key = fp.max(OVERFLOW_KEY + 1);
        let probes = PROBES.min(self.max_breakers);
        let start = key % self.max_breakers;
        let slot_of = |i: u64| Slot::Index((start + i) % self.max_breakers);
        // First pass: the key's own breaker, remembering free slots.
        let mut free = Vec::new();
        for i in 0..probes {
            match self.try_slot(store, policy, slot_of(i), key, now, false)? {
                Probe::Mine(a) => return Ok(a),
                Probe::Free => free.push(slot_of(i)),
                Probe::Taken => {}
            }
        }
        // Second pass: take the first free slot still free (every worker
        // tries them in the same order, so racing workers meet in one slot).
        for slot in free {
            if let Probe::Mine(a) = self.try_slot(store, policy, slot, key, now, true)? {
                return Ok(a);
            }
        }
        match self.try_slot(store, policy, Slot::Overflow, OVERFLOW_KEY, now, true)? {
            Probe::Mine(a) => Ok(a),
            // Unreachable: a claiming probe of the overflow breaker always gets it.
            Probe::Free | Probe::Taken => Err(Exhausted),
        }
    }

    fn try_slot(
        &self,
        store: &dyn SharedStore,
        policy: &Policy,
        slot: Slot,
        key: u64,
        now: u64,
        claim: bool,
    ) -> Result<Probe, Exhausted> {
        let (probe, _) = update(store, &self.key_of(slot), MAX_ATTEMPTS, |bytes| {
            let mut b = self.decode(bytes, now);
            let mut evicted = None;
            let claimed = b.key != key;
            if claimed {
                let free = b.key != OVERFLOW_KEY && (b.key == 0 || b.is_idle(now, self.idle_nanos));
                if !free {
                    return Step::Keep(Probe::Taken);
                }
                if !claim {
                    return Step::Keep(Probe::Free);
                }
                if b.key != 0 {
                    evicted = Some(b.state);
                }
                b = Breaker::fresh(key, self.window, now);
            }
            let (admit, changed, transition) = b.admit(policy, now);
            let admission = Admission {
                slot,
                key,
                admit,
                transition,
                evicted,
            };
            if changed || claimed {
                Step::Write(b.encode(), Probe::Mine(admission))
            } else {
                Step::Keep(Probe::Mine(admission))
            }
        })?;
        Ok(probe)
    }

    /// Records the outcome of a call admitted into `slot` for `key` in
    /// `generation`; returns the transition it caused, if any.
    pub fn record(
        &self,
        store: &dyn SharedStore,
        policy: &Policy,
        ticket: Ticket,
        outcome: Outcome,
        now: u64,
    ) -> Result<Option<Transition>, Exhausted> {
        let (transition, _) = update(store, &self.key_of(ticket.slot), MAX_ATTEMPTS, |bytes| {
            let mut b = self.decode(bytes, now);
            if b.key != ticket.key {
                // The slot was given to another key since: the call is forgotten.
                return Step::Keep(None);
            }
            match b.record(policy, ticket.generation, outcome, now) {
                (true, t) => Step::Write(b.encode(), t),
                (false, t) => Step::Keep(t),
            }
        })?;
        Ok(transition)
    }

    /// Counts a breaker moving from `from` to `to` in the rule's summary and
    /// returns the new summary.
    pub fn note(
        &self,
        store: &dyn SharedStore,
        from: CircuitState,
        to: CircuitState,
    ) -> Result<Summary, Exhausted> {
        let (summary, _) = update(store, &self.summary_key(), MAX_ATTEMPTS, |bytes| {
            let mut s = Summary::decode(bytes);
            s.count(from, -1);
            s.count(to, 1);
            Step::Write(s.encode(), s)
        })?;
        Ok(summary)
    }

    pub fn summary(&self, store: &dyn SharedStore) -> Summary {
        Summary::decode(
            store
                .get(&self.summary_key())
                .as_ref()
                .map(|(b, _)| b.as_slice()),
        )
    }

    /// Entries this table stored (the memory bound: slots + overflow + summary).
    pub fn stored_entries(&self, store: &dyn SharedStore) -> u64 {
        (0..self.max_breakers)
            .filter(|i| store.get(&self.key_of(Slot::Index(*i))).is_some())
            .count() as u64
            + u64::from(store.get(&self.key_of(Slot::Overflow)).is_some())
            + u64::from(store.get(&self.summary_key()).is_some())
    }
}
