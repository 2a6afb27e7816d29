//! GCRA, the generic cell rate algorithm: a token bucket kept as one number.
//!
//! Instead of a token count and a refill timestamp, each key stores its
//! *theoretical arrival time* (TAT): the instant at which the bucket will be
//! full again. With emission interval `E = per / requests` and tolerance
//! `τ = (burst - 1) · E`, a request at `now` is admitted iff
//! `max(TAT, now) - now ≤ τ`, and admitting it moves TAT to `max(TAT, now) + E`.
//! A fresh bucket therefore admits exactly `burst` requests at one instant and
//! then one every `E`; over any interval of length `t` it admits at most
//! `burst + t / E` requests. A TAT in the past is the same as a fresh bucket,
//! which is what lets the key table reuse such slots (see `table.rs`).
//! This is the same model as the `governor` crate, and `tests/governor.rs`
//! checks it against governor itself: the same allow/deny and earliest
//! retry, to the nanosecond, for `Quota::with_period(per / requests)
//! .allow_burst(burst)` (or `per_second/per_minute/per_hour(requests)` where
//! the unit divides evenly). Burst does not stretch the period, as with those
//! constructors. One difference: where `per / requests` is not a whole number
//! of nanoseconds, governor's `per_*` round the interval down; we round it up.

use std::time::Duration;

/// The parameters of one limit, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Time one request "costs": `per / requests`, rounded up so that rounding
    /// can only make the limit stricter, never looser.
    emission: u64,
    /// How far TAT may run ahead of now: `(burst - 1) · emission`.
    tolerance: u64,
}

/// The outcome for one request, plus what the rate-limit headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// TAT to store (unchanged when the request is limited).
    pub tat: u64,
    /// Requests that would still be admitted right now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset_after: u64,
    /// Until the next request would be admitted (0 when allowed).
    pub retry_after: u64,
}

impl Gcra {
    /// `requests` per `per`, with up to `burst` at once. All must be positive.
    pub fn new(requests: u64, per: Duration, burst: u64) -> Gcra {
        let per_ns = u64::try_from(per.as_nanos()).unwrap_or(u64::MAX).max(1);
        let requests = requests.max(1);
        let emission = per_ns.div_ceil(requests);
        Gcra {
            emission,
            tolerance: emission.saturating_mul(burst.max(1) - 1),
        }
    }

    pub fn emission(&self) -> u64 {
        self.emission
    }

    pub fn tolerance(&self) -> u64 {
        self.tolerance
    }

    /// Decides for a request at `now` given the stored TAT (`None`: never seen).
    pub fn decide(&self, stored_tat: Option<u64>, now: u64) -> Decision {
        let tat = stored_tat.unwrap_or(now).max(now);
        let ahead = tat - now;
        if ahead > self.tolerance {
            return Decision {
                allowed: false,
                tat,
                remaining: 0,
                reset_after: ahead,
                retry_after: ahead - self.tolerance,
            };
        }
        let new_tat = tat.saturating_add(self.emission);
        let ahead = new_tat - now;
        let remaining = match self.tolerance.checked_sub(ahead) {
            Some(slack) => slack / self.emission + 1,
            None => 0,
        };
        Decision {
            allowed: true,
            tat: new_tat,
            remaining,
            reset_after: ahead,
            retry_after: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    /// Runs `n` requests at `now`, threading the TAT; returns how many were admitted.
    fn burst_at(g: &Gcra, tat: &mut Option<u64>, now: u64, n: u64) -> u64 {
        let mut admitted = 0;
        for _ in 0..n {
            let d = g.decide(*tat, now);
            *tat = Some(d.tat);
            admitted += u64::from(d.allowed);
        }
        admitted
    }

    #[test]
    fn fresh_bucket_admits_exactly_burst_then_one_per_interval() {
        let g = Gcra::new(10, Duration::from_secs(1), 5);
        let mut tat = None;
        let t0 = 1_000 * SEC;
        assert_eq!(burst_at(&g, &mut tat, t0, 100), 5);
        // One interval (100ms) later exactly one more.
        assert_eq!(burst_at(&g, &mut tat, t0 + SEC / 10, 100), 1);
        // Just before the next interval: none.
        assert_eq!(burst_at(&g, &mut tat, t0 + 2 * SEC / 10 - 1, 100), 0);
        assert_eq!(burst_at(&g, &mut tat, t0 + 2 * SEC / 10, 100), 1);
        // After a long pause the bucket is full again, but no fuller.
        assert_eq!(burst_at(&g, &mut tat, t0 + 100 * SEC, 100), 5);
    }

    #[test]
    fn headers_report_remaining_reset_and_retry() {
        let g = Gcra::new(100, Duration::from_secs(60), 3);
        let now = 50 * SEC;
        let d1 = g.decide(None, now);
        assert_eq!((d1.allowed, d1.remaining), (true, 2));
        assert_eq!(d1.reset_after, 600_000_000); // one emission: 0.6s
        let d2 = g.decide(Some(d1.tat), now);
        let d3 = g.decide(Some(d2.tat), now);
        assert_eq!((d3.allowed, d3.remaining), (true, 0));
        let d4 = g.decide(Some(d3.tat), now);
        assert!(!d4.allowed);
        assert_eq!(d4.tat, d3.tat, "a limited request must not move TAT");
        assert_eq!(d4.retry_after, 600_000_000);
        assert_eq!(d4.reset_after, 1_800_000_000);
    }

    #[test]
    fn rounding_never_loosens_the_limit() {
        // 3 per second: E = 333_333_334ns (rounded up).
        let g = Gcra::new(3, Duration::from_secs(1), 1);
        let mut tat = None;
        let mut admitted = 0;
        for step in 0..=3_000u64 {
            admitted += burst_at(&g, &mut tat, step * SEC / 1000, 1);
        }
        // Over [0, 3s]: at most 1 + 3*3 = 10.
        assert!(admitted <= 10, "{admitted}");
        assert!(admitted >= 9, "{admitted}");
    }

    proptest! {
        /// No sequence of calls ever admits more than `burst + elapsed * rate`.
        #[test]
        fn never_admits_more_than_burst_plus_rate(
            requests in 1u64..1000,
            per_ms in 1u64..100_000,
            burst in 1u64..200,
            gaps in proptest::collection::vec(0u64..50_000_000, 1..400),
        ) {
            let per = Duration::from_millis(per_ms);
            let g = Gcra::new(requests, per, burst);
            let start = 1_700_000_000 * SEC;
            let mut now = start;
            let mut tat = None;
            let mut admitted: u64 = 0;
            for gap in gaps {
                now += gap;
                let d = g.decide(tat, now);
                tat = Some(d.tat);
                if d.allowed {
                    admitted += 1;
                }
                let elapsed = u128::from(now - start);
                // burst + floor(elapsed * requests / per)
                let bound = u128::from(burst) + elapsed * u128::from(requests) / per.as_nanos();
                prop_assert!(u128::from(admitted) <= bound, "admitted {} > bound {}", admitted, bound);
            }
        }

        /// `remaining` is exactly how many more requests would pass right now.
        #[test]
        fn remaining_is_exact(requests in 1u64..100, burst in 1u64..50, used in 0u64..60) {
            let g = Gcra::new(requests, Duration::from_secs(1), burst);
            let now = 10 * SEC;
            let mut tat = None;
            let mut last = None;
            for _ in 0..used.max(1) {
                let d = g.decide(tat, now);
                tat = Some(d.tat);
                last = Some(d);
            }
            let claimed = last.unwrap().remaining;
            let actually = burst_at(&g, &mut tat, now, burst + 5);
            prop_assert_eq!(claimed, actually);
        }
    }
}
