//! Canary analysis against an in-memory store with Envoy's semantics and a
//! clock moved by hand; "workers" are balancers sharing one store.

use mesh_shared::clock::{Clock, ManualClock};
use mesh_shared::request::FakeRequest;
use mesh_shared::store::MemoryStore;
use proptest::prelude::*;

use crate::canary::{Phase, State, Verdict};
use crate::{Balancer, Config, How, Pick};
use mesh_shared::outcome::Outcome;

const SECOND: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const T0: u64 = 1_000 * SECOND;

/// 90/10 -> 50/50 at 10s -> 0/100 at 20s; 5s intervals of at least 5 calls.
fn rule(algorithm: &str, analysis: &str) -> String {
    format!(
        r#"{{"name": "rollout", "algorithm": "{algorithm}", "sticky": {{"header": "x-user"}},
            "override": {{"header": "x-force"}},
            "targets": [{{"name": "v1", "weight": 90}}, {{"name": "v2", "weight": 10}}],
            "steps": [{{"after": "10s", "weights": {{"v1": 50, "v2": 50}}}},
                      {{"after": "20s", "weights": {{"v1": 0, "v2": 100}}}}],
            "analysis": {{"canary": "v2", "interval": "5s", "min_calls": 5 {analysis}}}}}"#
    )
}

fn balancer(rule: &str, store: &MemoryStore, now: u64) -> Balancer {
    let config = Config::parse(format!(r#"{{"rules": [{rule}]}}"#).as_bytes(), "lb").unwrap();
    let mut b = Balancer::new(config);
    b.setup(store, now);
    b
}

/// One request at `now`: picks, and if the canary got it, reports `outcome`
/// (when the answer comes `latency` later). Returns the target and the
/// changes the request made.
fn request(
    b: &Balancer,
    store: &MemoryStore,
    clock: &ManualClock,
    user: Option<&str>,
    outcome: Outcome,
) -> (usize, Vec<crate::canary::Change>) {
    let mut req = FakeRequest::new();
    if let Some(u) = user {
        req = req.with_header("x-user", u);
    }
    let (pick, _, change) = b.pick_judged(&mut req, store, clock.now_nanos(), clock.now_nanos());
    let mut changes: Vec<_> = change.into_iter().collect();
    let Pick::Target { target, .. } = pick else {
        panic!("expected a target, got {pick:?}");
    };
    if b.judges(&pick) {
        changes.extend(b.record(store, 0, outcome, clock.now_nanos()));
    }
    (target, changes)
}

/// Requests every 100ms for `secs`; the canary's calls fail when `fails(n)`
/// holds for its n-th call. Returns how many reached each target.
fn drive(
    b: &Balancer,
    store: &MemoryStore,
    clock: &ManualClock,
    secs: u64,
    mut outcome_of: impl FnMut(u64) -> Outcome,
) -> [u64; 2] {
    let mut served = [0u64; 2];
    let mut canary_calls = 0;
    for _ in 0..secs * 10 {
        let outcome = outcome_of(canary_calls);
        let (t, _) = request(b, store, clock, None, outcome);
        served[t] += 1;
        if t == 1 {
            canary_calls += 1;
        }
        clock.advance(std::time::Duration::from_millis(100));
    }
    served
}

#[test]
fn judging_an_interval() {
    let store = MemoryStore::new();
    let b = balancer(
        &rule(
            "weighted_round_robin",
            r#", "max_failure_rate_percent": 10, "slow_call": "500ms", "max_slow_rate_percent": 20"#,
        ),
        &store,
        T0,
    );
    let a = b.config.rules[0].analysis.as_ref().unwrap();
    assert_eq!(a.judge(4, 4, 4), Verdict::Inconclusive, "below min_calls");
    assert_eq!(a.judge(0, 0, 0), Verdict::Inconclusive);
    assert_eq!(a.judge(10, 1, 2), Verdict::Passed, "at the maxima");
    assert_eq!(a.judge(10, 2, 0), Verdict::Failed, "20% failures > 10%");
    assert_eq!(a.judge(10, 0, 3), Verdict::Failed, "30% slow > 20%");
    let state = State {
        step: 1,
        calls: 7,
        ..State::new(T0)
    };
    assert_eq!(State::decode(&state.encode()), Some(state));
    assert_eq!(State::decode(b"short"), None);
}

#[test]
fn a_healthy_canary_walks_through_every_step_then_is_promoted() {
    let (store, clock) = (MemoryStore::new(), ManualClock::at(T0));
    let b = balancer(&rule("weighted_round_robin", ""), &store, T0);
    let weights = |b: &Balancer| {
        let s = b.canary(&store, 0).unwrap();
        (
            s.phase,
            b.config.rules[0].schedule[s.step as usize].weights.clone(),
        )
    };
    // 0-10s at 90/10: a v2 call every second, 10 per interval.
    let first = drive(&b, &store, &clock, 10, |_| Outcome::Success);
    assert_eq!(first, [90, 10]);
    assert_eq!(weights(&b), (Phase::Progressing, vec![90, 10]));
    // The step at 10s applies with the first request at 10s (two intervals passed).
    request(&b, &store, &clock, None, Outcome::Success);
    assert_eq!(weights(&b), (Phase::Progressing, vec![50, 50]));
    drive(&b, &store, &clock, 10, |_| Outcome::Success);
    request(&b, &store, &clock, None, Outcome::Success);
    assert_eq!(weights(&b), (Phase::Promoted, vec![0, 100]));
    assert_eq!(b.canary(&store, 0).unwrap().step, 2);
}

#[test]
fn a_failing_canary_rolls_back_at_the_end_of_the_interval_and_stays_there() {
    let (store, clock) = (MemoryStore::new(), ManualClock::at(T0));
    let b = balancer(&rule("weighted_round_robin", ""), &store, T0);
    // 3 of every 10 canary calls fail (30% > 5%).
    let (mut rolled_back_at, mut canary_calls) = (None, 0u64);
    for _ in 0..60u64 {
        let outcome = if canary_calls % 10 < 3 {
            Outcome::Failure { slow: false }
        } else {
            Outcome::Success
        };
        let (t, changes) = request(&b, &store, &clock, None, outcome);
        canary_calls += u64::from(t == 1);
        if changes.iter().any(|c| c.rolled_back()) {
            rolled_back_at = Some(clock.now_nanos() - T0);
            let judged = changes.iter().find_map(|c| c.judged).unwrap();
            assert_eq!(judged, (Verdict::Failed, 5, 3, 0));
        }
        clock.advance(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        rolled_back_at,
        Some(5 * SECOND),
        "the first request after 5s"
    );
    assert_eq!(b.canary(&store, 0).unwrap().phase, Phase::RolledBack);
    // From then on: no canary call, at any step time, whatever the algorithm;
    // override still reaches it.
    let served = drive(&b, &store, &clock, 60, |_| Outcome::Success);
    assert_eq!(served, [600, 0]);
    let mut forced = FakeRequest::new().with_header("x-force", "v2");
    let pick = b.pick(&mut forced, &store, clock.now_nanos(), 1);
    assert!(matches!(
        pick,
        Pick::Target {
            target: 1,
            how: How::Override,
            ..
        }
    ));
    assert!(!b.judges(&pick), "override calls are not judged");
    // Another worker, or a reload of the same rule, sees the rollback.
    let again = balancer(&rule("weighted_round_robin", ""), &store, clock.now_nanos());
    assert_eq!(again.canary(&store, 0).unwrap().phase, Phase::RolledBack);
    // A changed rule starts over.
    let changed = balancer(
        &rule("weighted_round_robin", r#", "failure_limit": 1"#),
        &store,
        clock.now_nanos(),
    );
    assert_eq!(
        changed.canary(&store, 0).unwrap(),
        State::new(clock.now_nanos())
    );
}

#[test]
fn sticky_users_of_the_canary_move_when_it_rolls_back() {
    let (store, clock) = (MemoryStore::new(), ManualClock::at(T0));
    let b = balancer(&rule("sticky", ""), &store, T0);
    let users: Vec<String> = (0..200).map(|u| format!("user-{u}")).collect();
    let on_canary: Vec<&String> = users
        .iter()
        .filter(|u| {
            request(
                &b,
                &store,
                &clock,
                Some(u),
                Outcome::Failure { slow: false },
            )
            .0 == 1
        })
        .collect();
    assert!(
        on_canary.len() >= 5,
        "{} users on the canary",
        on_canary.len()
    );
    clock.advance(std::time::Duration::from_secs(5));
    request(&b, &store, &clock, Some("user-0"), Outcome::Success);
    assert_eq!(b.canary(&store, 0).unwrap().phase, Phase::RolledBack);
    for u in &users {
        assert_eq!(
            request(&b, &store, &clock, Some(u), Outcome::Success).0,
            0,
            "{u}"
        );
    }
}

#[test]
fn an_interval_with_too_few_calls_neither_advances_nor_fails() {
    let (store, clock) = (MemoryStore::new(), ManualClock::at(T0));
    let b = balancer(&rule("weighted_round_robin", ""), &store, T0);
    // 4 failing canary calls per 5s interval, for 30s: always below min_calls.
    for _ in 0..6 {
        for _ in 0..4 {
            b.record(
                &store,
                0,
                Outcome::Failure { slow: false },
                clock.now_nanos(),
            );
        }
        clock.advance(std::time::Duration::from_secs(5));
    }
    request(&b, &store, &clock, None, Outcome::Success);
    let s = b.canary(&store, 0).unwrap();
    assert_eq!(
        (s.phase, s.step, s.failed_intervals, s.passed_since_step),
        (Phase::Progressing, 0, 0, 0)
    );
}

#[test]
fn slow_calls_roll_back_like_failures() {
    let (store, clock) = (MemoryStore::new(), ManualClock::at(T0));
    let b = balancer(
        &rule(
            "round_robin",
            r#", "slow_call": "200ms", "max_slow_rate_percent": 10"#,
        ),
        &store,
        T0,
    );
    let slow = b.classify(
        0,
        mesh_shared::outcome::Response {
            code: Some(200),
            details: Some(b"via_upstream"),
            duration_nanos: Some(300 * MS),
        },
    );
    assert_eq!(slow, Outcome::Slow);
    drive(&b, &store, &clock, 6, |_| slow);
    assert_eq!(b.canary(&store, 0).unwrap().phase, Phase::RolledBack);
}

#[test]
fn a_failure_within_the_limit_holds_the_step_until_an_interval_passes() {
    let (store, clock) = (MemoryStore::new(), ManualClock::at(T0));
    let b = balancer(&rule("round_robin", r#", "failure_limit": 1"#), &store, T0);
    // Interval 0-5s passes, 5-10s fails (within the limit), 10-15s passes.
    drive(&b, &store, &clock, 5, |_| Outcome::Success);
    drive(&b, &store, &clock, 5, |_| Outcome::Failure { slow: false });
    request(&b, &store, &clock, None, Outcome::Success);
    let s = b.canary(&store, 0).unwrap();
    assert_eq!(
        (s.phase, s.step, s.failed_intervals),
        (Phase::Progressing, 0, 1)
    );
    assert!(
        clock.now_nanos() - T0 >= 10 * SECOND,
        "the step's after has passed"
    );
    drive(&b, &store, &clock, 5, |_| Outcome::Success);
    request(&b, &store, &clock, None, Outcome::Success);
    assert_eq!(
        b.canary(&store, 0).unwrap().step,
        1,
        "after a passed interval"
    );
    // A second failed interval is one more than the limit.
    drive(&b, &store, &clock, 5, |_| Outcome::Failure { slow: false });
    request(&b, &store, &clock, None, Outcome::Success);
    assert_eq!(b.canary(&store, 0).unwrap().phase, Phase::RolledBack);
}

/// One event of a run with two workers.
#[derive(Debug, Clone)]
struct Event {
    worker: usize,
    /// Milliseconds after the previous event.
    wait_ms: u64,
    outcome: Outcome,
}

fn event() -> impl Strategy<Value = Event> {
    (
        0..2usize,
        prop_oneof![0..50u64, 0..2_000u64, 4_000..12_000u64],
        prop_oneof![
            6 => Just(Outcome::Success),
            1 => Just(Outcome::Failure { slow: false }),
            1 => Just(Outcome::Slow),
            1 => Just(Outcome::Ignored),
        ],
    )
        .prop_map(|(worker, wait_ms, outcome)| Event {
            worker,
            wait_ms,
            outcome,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Two workers on one store: every interval is judged at most once, by the
    /// first request after it; its counts are exactly the calls recorded in
    /// it; steps advance one at a time and only after a passed interval;
    /// promotion and rollback are final; after a rollback no pick reaches the
    /// canary.
    #[test]
    fn two_workers_agree_and_each_interval_is_judged_once(
        events in proptest::collection::vec(event(), 1..300),
        algorithm in prop_oneof![Just("weighted_round_robin"), Just("round_robin"), Just("random"), Just("sticky"), Just("least_requests")],
        limit in 0..3u64,
    ) {
        let (store, clock) = (MemoryStore::new(), ManualClock::at(T0));
        let analysis = format!(r#", "failure_limit": {limit}, "max_failure_rate_percent": 20, "slow_call": "1s", "max_slow_rate_percent": 30"#);
        let workers = [
            balancer(&rule(algorithm, &analysis), &store, T0),
            balancer(&rule(algorithm, &analysis), &store, T0),
        ];
        let interval = 5 * SECOND;
        let (mut counted, mut failed, mut slow) = (0u64, 0u64, 0u64);
        let mut last = State::new(T0);
        let mut judged_starts = Vec::new();
        for (n, e) in events.iter().enumerate() {
            clock.advance(std::time::Duration::from_millis(e.wait_ms));
            let now = clock.now_nanos();
            let b = &workers[e.worker];
            let user = format!("u{n}");
            let (target, changes) = request(b, &store, &clock, Some(&user), e.outcome);
            if last.phase == Phase::RolledBack {
                prop_assert_eq!(target, 0, "a canary pick after the rollback");
            }
            let canary_call = target == 1 && e.outcome != Outcome::Ignored;
            for c in &changes {
                prop_assert_eq!(c.before, last, "each change starts from the state all workers saw");
                if let Some((verdict, calls, failures, slows)) = c.judged {
                    prop_assert!(now >= c.before.interval_start + interval);
                    prop_assert!(!judged_starts.contains(&c.before.interval_start));
                    judged_starts.push(c.before.interval_start);
                    // The call that closed the interval counts in the next one.
                    prop_assert_eq!((calls, failures, slows), (counted, failed, slow));
                    counted = 0; failed = 0; slow = 0;
                    let expected = workers[0].config.rules[0].analysis.as_ref().unwrap().judge(calls, failures, slows);
                    prop_assert_eq!(verdict, expected);
                }
                prop_assert!(c.after.step == c.before.step || c.after.step == c.before.step + 1);
                if c.after.step > c.before.step {
                    prop_assert!(c.before.passed_since_step > 0 || c.judged.is_some_and(|j| j.0 == Verdict::Passed));
                }
                if c.before.phase != Phase::Progressing {
                    prop_assert_eq!(c.after.phase, c.before.phase);
                }
                last = c.after;
            }
            if canary_call && last.phase == Phase::Progressing {
                counted += 1;
                failed += u64::from(e.outcome.is_failure());
                slow += u64::from(e.outcome.is_slow());
            }
            prop_assert_eq!(workers[1 - e.worker].canary(&store, 0), Some(last));
            if last.phase == Phase::Progressing {
                prop_assert_eq!(last.calls, counted);
            }
        }
    }
}
