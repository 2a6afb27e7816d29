//! Batched calls of a global rule (`max_batch` > 1), on one worker.
//!
//! Envoy's native filter makes one RLS call per request, and each call costs
//! Envoy far more than the limiting work it asks for (a gRPC stream, HTTP/2
//! frames, a second trip through the event loop). Under load, many requests
//! of a rule need a call at the same moment. So: the first request when no
//! call of the rule is in flight calls at once, alone (no added wait when the
//! traffic is light); requests that come while a call is in flight wait, and
//! all of them go in the next call, one descriptor each, once the call in
//! flight ends. The service decides each descriptor on its own
//! (envoyproxy/ratelimit answers one `DescriptorStatus` per descriptor, in
//! order), so the decisions are those of one call per request.
//!
//! A waiting request still gets its answer within `timeout` of its arrival:
//! the call in flight ends within `timeout` (Envoy's timer), and the next call
//! is given only what is left of its oldest request's `timeout`; a request
//! with less than a millisecond left is not sent but decided as a failed call.
//!
//! Pure bookkeeping: the adapter (`part.rs`) makes the calls and hands the
//! answers to the waiting streams.

use std::time::Duration;

use crate::GlobalCall;

/// A request waiting for the next call of its rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiter {
    /// The stream (its context id).
    pub stream: u32,
    pub call: GlobalCall,
    /// When it began to wait (ns).
    pub since: u64,
}

/// What a request that needs a call does.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// No call of the rule is in flight: make this one's own call now.
    CallNow(GlobalCall),
    /// It waits for the next call.
    Waits,
}

/// The next step once calls may go out.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// One call for these requests (their descriptors in this order), with
    /// the time left of the oldest one's `timeout`.
    Call(Vec<Waiter>, Duration),
    /// These waited out their `timeout`: decide them as a failed call.
    Expired(Vec<Waiter>),
}

/// One rule's calls on one worker.
#[derive(Debug, Clone)]
pub struct Batcher {
    max_batch: usize,
    timeout: Duration,
    in_flight: usize,
    /// Oldest first (a list: a queue's code costs the module more than the
    /// shifts of a few tens of waiters).
    waiting: Vec<Waiter>,
}

/// Less than this left of a `timeout` is not worth a call: proxy-wasm takes
/// the call's timeout in whole milliseconds.
const LEAST_TIME: Duration = Duration::from_millis(1);

impl Batcher {
    pub fn new(max_batch: usize, timeout: Duration) -> Batcher {
        Batcher {
            max_batch: max_batch.max(1),
            timeout,
            in_flight: 0,
            waiting: Vec::new(),
        }
    }

    /// A request of the rule needs a call. With none in flight it calls at
    /// once, even while others wait for the root's turn: so a call is in
    /// flight whenever requests wait, and they go when it ends at the latest.
    pub fn admit(&mut self, stream: u32, call: GlobalCall, now: u64) -> Admission {
        if self.in_flight == 0 {
            self.in_flight += 1;
            return Admission::CallNow(call);
        }
        self.waiting.push(Waiter {
            stream,
            call,
            since: now,
        });
        Admission::Waits
    }

    /// A call of the rule ended (answered, failed, or its stream went away);
    /// also for a call that [`Batcher::next`] gave and that would not start.
    pub fn ended(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// A waiting stream went away: it is not sent.
    pub fn leave(&mut self, stream: u32) {
        self.waiting.retain(|w| w.stream != stream);
    }

    /// Requests wait and no call is in flight to take them along when it
    /// ends: the adapter must send them ([`Batcher::next`]) soon.
    pub fn stranded(&self) -> bool {
        self.in_flight == 0 && !self.waiting.is_empty()
    }

    /// Whether requests wait.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The next call to make for the waiting requests, oldest first, at most
    /// `max_batch` per call (a call counts as in flight from here); call
    /// again until `None`, so every waiting request goes out now.
    pub fn next(&mut self, now: u64) -> Option<Next> {
        let timeout = u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX);
        let least = u64::try_from(LEAST_TIME.as_nanos()).unwrap_or(0);
        let left = |w: &Waiter| w.since.saturating_add(timeout).saturating_sub(now);
        let expired = self.waiting.iter().take_while(|w| left(w) < least).count();
        if expired > 0 {
            return Some(Next::Expired(self.waiting.drain(..expired).collect()));
        }
        let oldest = self.waiting.first()?;
        let budget = Duration::from_nanos(left(oldest));
        let n = self.waiting.len().min(self.max_batch);
        self.in_flight += 1;
        Some(Next::Call(self.waiting.drain(..n).collect(), budget))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rls::RateLimitDescriptor;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    fn call(fp: u64) -> GlobalCall {
        GlobalCall {
            rule: 0,
            fp,
            descriptor: RateLimitDescriptor::default(),
        }
    }

    fn streams(waiters: &[Waiter]) -> Vec<u32> {
        waiters.iter().map(|w| w.stream).collect()
    }

    #[test]
    fn the_first_request_calls_at_once_and_the_next_ones_go_together() {
        let mut b = Batcher::new(3, Duration::from_millis(20));
        assert_eq!(b.admit(1, call(1), 0), Admission::CallNow(call(1)));
        for s in 2..=6 {
            assert_eq!(b.admit(s, call(u64::from(s)), MS), Admission::Waits);
        }
        assert!(!b.stranded(), "the call in flight takes them along");
        b.ended();
        assert!(b.stranded());
        // 5 waiting, at most 3 per call, the time left of the oldest.
        let Some(Next::Call(first, budget)) = b.next(5 * MS) else {
            panic!()
        };
        assert_eq!(streams(&first), [2, 3, 4]);
        assert_eq!(budget, Duration::from_millis(16));
        let Some(Next::Call(second, _)) = b.next(5 * MS) else {
            panic!()
        };
        assert_eq!(streams(&second), [5, 6]);
        assert_eq!(b.next(5 * MS), None);
        // Two calls in flight: a new request waits for them.
        assert_eq!(b.admit(7, call(7), 6 * MS), Admission::Waits);
        b.ended();
        b.ended();
        assert!(b.stranded());
        // Before the root's turn, the next request calls at once (so a call
        // is in flight again, whatever happens to the root's turn).
        assert_eq!(b.admit(8, call(8), 7 * MS), Admission::CallNow(call(8)));
        assert!(!b.stranded());
    }

    #[test]
    fn a_request_that_waited_out_its_timeout_is_not_sent() {
        let mut b = Batcher::new(10, Duration::from_millis(20));
        assert!(matches!(b.admit(1, call(1), 0), Admission::CallNow(_)));
        assert_eq!(b.admit(2, call(2), MS), Admission::Waits);
        assert_eq!(b.admit(3, call(3), 15 * MS), Admission::Waits);
        b.ended();
        // At 20.5 ms, request 2 has 0.5 ms left: decided as failed, not sent.
        let Some(Next::Expired(gone)) = b.next(20 * MS + MS / 2) else {
            panic!()
        };
        assert_eq!(streams(&gone), [2]);
        let Some(Next::Call(sent, budget)) = b.next(20 * MS + MS / 2) else {
            panic!()
        };
        assert_eq!(streams(&sent), [3]);
        assert_eq!(budget, Duration::from_nanos(14 * MS + MS / 2));
    }

    #[test]
    fn a_stream_that_leaves_is_not_sent() {
        let mut b = Batcher::new(10, Duration::from_millis(20));
        assert!(matches!(b.admit(1, call(1), 0), Admission::CallNow(_)));
        b.admit(2, call(2), 0);
        b.admit(3, call(3), 0);
        b.leave(2);
        b.ended();
        let Some(Next::Call(sent, _)) = b.next(MS) else {
            panic!()
        };
        assert_eq!(streams(&sent), [3]);
    }

    #[test]
    fn max_batch_one_never_waits_without_a_call_in_flight() {
        let mut b = Batcher::new(1, Duration::from_millis(20));
        assert!(matches!(b.admit(1, call(1), 0), Admission::CallNow(_)));
        b.ended();
        assert!(matches!(b.admit(2, call(2), 0), Admission::CallNow(_)));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Arrive,
        Leave(usize),
        CallEnds,
        Flush,
        Wait(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => Just(Step::Arrive),
            1 => (0usize..50).prop_map(Step::Leave),
            2 => Just(Step::CallEnds),
            2 => Just(Step::Flush),
            2 => (0u64..30 * MS).prop_map(Step::Wait),
        ]
    }

    proptest! {
        /// Every request is sent once or decided once (or left), none twice,
        /// none stranded after a flush; no call carries more than `max_batch`;
        /// no request is sent with more than its own `timeout` left, nor
        /// after its `timeout` ran out.
        #[test]
        fn every_request_goes_out_once_in_time(
            max_batch in 1usize..6,
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            let timeout = 20 * MS;
            let mut b = Batcher::new(max_batch, Duration::from_nanos(timeout));
            let mut now = 0u64;
            let mut next_stream = 1u32;
            let mut arrived = std::collections::HashMap::new();
            let mut out = std::collections::HashSet::new();
            let mut in_flight = 0usize;
            for s in steps {
                match s {
                    Step::Arrive => {
                        let id = next_stream;
                        next_stream += 1;
                        arrived.insert(id, now);
                        if let Admission::CallNow(_) = b.admit(id, call(u64::from(id)), now) {
                            prop_assert!(out.insert(id));
                            in_flight += 1;
                        }
                    }
                    Step::Leave(i) => {
                        let id = (i as u32 % next_stream).max(1);
                        if arrived.contains_key(&id) && !out.contains(&id) {
                            b.leave(id);
                            out.insert(id);
                        }
                    }
                    Step::CallEnds => {
                        if in_flight > 0 {
                            in_flight -= 1;
                            b.ended();
                        }
                    }
                    Step::Flush => {
                        while let Some(n) = b.next(now) {
                            match n {
                                Next::Call(ws, budget) => {
                                    in_flight += 1;
                                    prop_assert!(!ws.is_empty() && ws.len() <= max_batch);
                                    for w in &ws {
                                        prop_assert!(out.insert(w.stream), "sent twice");
                                        let deadline = arrived[&w.stream] + timeout;
                                        prop_assert!(now + u64::try_from(budget.as_nanos()).unwrap() <= deadline);
                                        prop_assert!(deadline - now >= MS);
                                    }
                                }
                                Next::Expired(ws) => {
                                    for w in &ws {
                                        prop_assert!(out.insert(w.stream), "decided twice");
                                        prop_assert!(arrived[&w.stream] + timeout < now + MS);
                                    }
                                }
                            }
                        }
                        prop_assert_eq!(b.waiting(), 0);
                    }
                    Step::Wait(d) => now += d,
                }
            }
            // Whatever still waits is exactly what was neither sent nor decided.
            prop_assert_eq!(b.waiting() + out.len(), arrived.len());
        }
    }
}
