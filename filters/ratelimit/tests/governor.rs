//! The `governor` crate as the oracle of our GCRA: both decide the same
//! random arrival traces (governor on its `FakeRelativeClock`), and must give
//! the same allow/deny for every request and, for a denied one, the same
//! earliest retry, to the nanosecond.
//!
//! How the quotas correspond: ours is `requests` per `per` with `burst`;
//! governor's is an interval per cell (`Quota::with_period`, or
//! `Quota::per_second/per_minute/per_hour(n)`: the unit divided by n) and a
//! burst (`allow_burst`, default n). The interval is `per / requests`, the
//! burst is ours as given: burst does not stretch the period (as with
//! governor's recommended constructors; only its deprecated `Quota::new`
//! divides the period by the burst instead). One deliberate difference: when
//! `per` is not a whole number of nanoseconds per request, governor rounds
//! the interval down (a little looser than asked) and we round it up (never
//! looser); `intervals_round_up_where_governor_rounds_down` pins that.

// A test: a failed unwrap is a failed test, not a dead Wasm VM.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, FakeRelativeClock, Reference};
use governor::{Quota, RateLimiter};
use proptest::prelude::*;
use ratelimit::Gcra;

const SEC: u64 = 1_000_000_000;

/// A unit governor has a constructor for, or any period.
#[derive(Debug, Clone, Copy)]
enum Per {
    Second,
    Minute,
    Hour,
    Nanos(u64),
}

impl Per {
    fn nanos(self) -> u64 {
        match self {
            Per::Second => SEC,
            Per::Minute => 60 * SEC,
            Per::Hour => 3600 * SEC,
            Per::Nanos(n) => n,
        }
    }
}

fn per() -> impl Strategy<Value = Per> {
    prop_oneof![
        Just(Per::Second),
        Just(Per::Minute),
        Just(Per::Hour),
        (1u64..=1000).prop_map(Per::Nanos),
        (1u64..=366 * 86_400 * SEC).prop_map(Per::Nanos),
    ]
}

/// Governor's quota for ours: its own per-unit constructor where the unit
/// divides evenly (so that correspondence is checked too), else the interval.
fn quota(requests: u32, per: Per, burst: u32, ours: &Gcra) -> Quota {
    let n = NonZeroU32::new(requests).unwrap();
    let b = NonZeroU32::new(burst).unwrap();
    let by_unit = match per {
        _ if !per.nanos().is_multiple_of(u64::from(requests)) => None,
        Per::Second => Some(Quota::per_second(n)),
        Per::Minute => Some(Quota::per_minute(n)),
        Per::Hour => Some(Quota::per_hour(n)),
        Per::Nanos(_) => None,
    };
    let q = by_unit
        .unwrap_or_else(|| Quota::with_period(Duration::from_nanos(ours.emission())).unwrap())
        .allow_burst(b);
    assert_eq!(
        q.replenish_interval(),
        Duration::from_nanos(ours.emission()),
        "the intervals differ"
    );
    q
}

/// A gap between two requests: the same instant (or a nanosecond or two
/// later), one interval (one nanosecond either side), anything up to a few
/// intervals, or a long idle time (up to a day).
fn gap() -> impl Strategy<Value = (u8, u64)> {
    prop_oneof![
        4 => (Just(0u8), 0u64..3),
        4 => (Just(1u8), 0u64..3),
        4 => (Just(2u8), any::<u64>()),
        1 => (Just(3u8), 0u64..=86_400 * SEC),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn decides_every_request_as_governor_does(
        requests in 1u32..=10_000,
        per in per(),
        burst in prop_oneof![Just(None), (1u32..=1_000).prop_map(Some)],
        gaps in proptest::collection::vec(gap(), 1..300),
    ) {
        let burst = burst.unwrap_or(requests);
        let ours = Gcra::new(u64::from(requests), Duration::from_nanos(per.nanos()), u64::from(burst));
        let clock = FakeRelativeClock::default();
        let theirs = RateLimiter::direct_with_clock(quota(requests, per, burst, &ours), clock.clone());
        let start = clock.now();
        // Our clock is absolute; governor's starts where the limiter was made.
        let base = 1_700_000_000 * SEC;
        let e = ours.emission();
        let mut elapsed = 0u64;
        let mut tat = None;
        for (i, (kind, n)) in gaps.into_iter().enumerate() {
            let step = match kind {
                0 => n,
                1 => (e + n).saturating_sub(1),
                2 => n % (3 * e),
                _ => n,
            };
            clock.advance(Duration::from_nanos(step));
            elapsed += step;
            let d = ours.decide(tat, base + elapsed);
            tat = Some(d.tat);
            match theirs.check() {
                Ok(()) => prop_assert!(d.allowed, "request {}: governor allows, we deny", i),
                Err(not_until) => {
                    prop_assert!(!d.allowed, "request {}: governor denies, we allow", i);
                    let retry = not_until.wait_time_from(clock.now());
                    prop_assert_eq!(retry, Duration::from_nanos(d.retry_after), "request {}: earliest retry", i);
                    let earliest = not_until.earliest_possible().duration_since(start);
                    prop_assert_eq!(u64::from(earliest), elapsed + d.retry_after);
                }
            }
        }
    }

    #[test]
    fn intervals_round_up_where_governor_rounds_down(requests in 1u32..=1_000_000) {
        let n = NonZeroU32::new(requests).unwrap();
        for (unit, theirs) in [
            (SEC, Quota::per_second(n)),
            (60 * SEC, Quota::per_minute(n)),
            (3600 * SEC, Quota::per_hour(n)),
        ] {
            let ours = Gcra::new(u64::from(requests), Duration::from_nanos(unit), u64::from(requests));
            let theirs = u64::try_from(theirs.replenish_interval().as_nanos()).unwrap();
            let exact = unit.is_multiple_of(u64::from(requests));
            prop_assert_eq!(ours.emission(), theirs + u64::from(!exact));
        }
    }
}
