//! Core tests: every transition, both windows, slow calls, consecutive
//! failures, scopes, the bounded table, and the half-open permit properties.

use super::*;
use mesh_shared::request::FakeRequest;
use mesh_shared::store::MemoryStore;
use mesh_shared::Attribute;
use proptest::prelude::*;
use std::sync::Arc;

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const T0: u64 = 1_700_000_000 * SEC;

fn breaker(json: &str) -> (CircuitBreaker, MemoryStore) {
    let cb = CircuitBreaker::new(Config::parse(json.as_bytes(), "t").unwrap());
    let s = MemoryStore::new();
    cb.create_tables(&s, T0);
    (cb, s)
}

fn route(name: &str) -> FakeRequest {
    FakeRequest::new().with(Attribute::Route, name)
}

fn upstream(code: u32, ms: u64) -> Response<'static> {
    Response {
        code: Some(code),
        details: Some(b"via_upstream"),
        duration_nanos: Some(ms * MS),
    }
}

/// Sends one request at `now` that the upstream answers with `code` after
/// `ms`; returns the verdict (outcome already reported if it passed).
fn call(
    cb: &CircuitBreaker,
    s: &MemoryStore,
    req: FakeRequest,
    now: u64,
    code: u32,
    ms: u64,
) -> Verdict {
    let v = cb.check(&mut req.clone(), s, now);
    if let Some(c) = v.change() {
        cb.apply(s, c);
    }
    if let Verdict::Pass { call, .. } = &v {
        let outcome = cb.classify(call, upstream(code, ms));
        if let Some(c) = cb.finish(s, call, outcome, now + ms * MS) {
            cb.apply(s, &c);
        }
    }
    v
}

fn passed(v: &Verdict) -> bool {
    matches!(v, Verdict::Pass { .. })
}

const PAYMENTS: &str = r#"{"rules": [{
    "name": "payments", "match": {"route": "payments"},
    "window": {"kind": "count", "size": 20}, "minimum_calls": 10, "failure_rate_percent": 50,
    "open_for": "10s", "half_open_calls": 3}]}"#;

#[test]
fn closed_opens_after_minimum_calls_at_the_failure_rate() {
    let (cb, s) = breaker(PAYMENTS);
    for i in 0..9 {
        assert!(passed(&call(&cb, &s, route("payments"), T0 + i, 503, 1)));
    }
    let rule = &cb.config.rules[0];
    assert_eq!(
        rule.table.summary(&s).worst(),
        CircuitState::Closed,
        "9 calls < minimum_calls"
    );
    assert!(passed(&call(&cb, &s, route("payments"), T0 + 10, 503, 1)));
    assert_eq!(rule.table.summary(&s).worst(), CircuitState::Open);
    match call(&cb, &s, route("payments"), T0 + SEC, 200, 1) {
        Verdict::Reject {
            state,
            retry_after_secs,
            ..
        } => {
            assert_eq!(state, CircuitState::Open);
            assert_eq!(retry_after_secs, 10, "ceil of the 9s and a bit left");
        }
        v => panic!("expected a rejection, got {v:?}"),
    }
}

#[test]
fn below_the_failure_rate_stays_closed() {
    let (cb, s) = breaker(PAYMENTS);
    // 9 failures in 20 calls: 45% < 50%, for ever.
    for i in 0..200u64 {
        // Spread so that no prefix of 10 or more calls reaches 50% either.
        let failing = [2, 4, 6, 8, 11, 13, 15, 17, 19].contains(&(i % 20));
        let code = if failing { 500 } else { 200 };
        assert!(
            passed(&call(&cb, &s, route("payments"), T0 + i, code, 1)),
            "call {i}"
        );
    }
    // Statuses outside failure_when are successes.
    for i in 0..20 {
        assert!(passed(&call(
            &cb,
            &s,
            route("payments"),
            T0 + 1000 + i,
            404,
            1
        )));
    }
}

#[test]
fn the_count_window_forgets_old_calls() {
    let (cb, s) = breaker(
        r#"{"rules": [{"name": "w", "window": {"kind": "count", "size": 10}, "minimum_calls": 10, "failure_rate_percent": 60}]}"#,
    );
    // 5 failures, then 10 successes push them out; then 5 failures: 50% < 60%.
    let mut now = T0;
    for code in [500; 5].iter().chain(&[200; 10]).chain(&[500; 5]) {
        now += 1;
        assert!(passed(&call(&cb, &s, route("r"), now, *code, 1)));
    }
    // One more failure: 6 of the last 10.
    assert!(passed(&call(&cb, &s, route("r"), now + 1, 500, 1)));
    assert!(!passed(&call(&cb, &s, route("r"), now + 2, 200, 1)));
}

#[test]
fn the_time_window_forgets_old_calls() {
    let (cb, s) = breaker(
        r#"{"rules": [{"name": "w", "window": {"kind": "time", "size": "10s"}, "minimum_calls": 4, "failure_rate_percent": 50}]}"#,
    );
    // 3 failures, then 11s later 1 failure and 2 successes: the old ones are out (1/3).
    for i in 0..3 {
        assert!(passed(&call(&cb, &s, route("r"), T0 + i * MS, 500, 1)));
    }
    let later = T0 + 11 * SEC;
    for code in [500, 200, 200] {
        assert!(passed(&call(&cb, &s, route("r"), later, code, 1)));
    }
    assert!(
        passed(&call(&cb, &s, route("r"), later + MS, 200, 1)),
        "1 of 4 failed"
    );
    // Within the window, failures add up: 1 + 2 of 6 calls = 50%.
    assert!(passed(&call(&cb, &s, route("r"), later + 5 * SEC, 500, 1)));
    assert!(passed(&call(&cb, &s, route("r"), later + 6 * SEC, 500, 1)));
    assert!(!passed(&call(&cb, &s, route("r"), later + 7 * SEC, 200, 1)));
}

#[test]
fn slow_calls_trip_the_slow_call_rate() {
    let (cb, s) = breaker(
        r#"{"rules": [{"name": "slow", "window": {"kind": "count", "size": 10}, "minimum_calls": 4,
            "slow_call": {"duration": "500ms", "rate_percent": 75}}]}"#,
    );
    let v = cb.check(&mut route("r"), &s, T0);
    let Verdict::Pass { call: c, .. } = v else {
        panic!()
    };
    assert_eq!(cb.classify(&c, upstream(200, 499)), Outcome::Success);
    // Slow means longer than the duration (Resilience4j's `>`).
    let at = |nanos: u64| Response {
        duration_nanos: Some(nanos),
        ..upstream(200, 0)
    };
    assert_eq!(cb.classify(&c, at(500 * MS)), Outcome::Success);
    assert_eq!(cb.classify(&c, at(500 * MS + 1)), Outcome::Slow);
    assert_eq!(cb.classify(&c, upstream(200, 501)), Outcome::Slow);
    assert_eq!(
        cb.classify(&c, upstream(503, 900)),
        Outcome::Failure { slow: true }
    );
    for (i, ms) in [600, 10, 700].iter().enumerate() {
        assert!(passed(&call(&cb, &s, route("r"), T0 + i as u64, 200, *ms)));
    }
    // 3 of 4 slow (75%), all successful.
    assert!(passed(&call(&cb, &s, route("r"), T0 + 10, 200, 800)));
    assert!(!passed(&call(&cb, &s, route("r"), T0 + 11, 200, 1)));
}

#[test]
fn consecutive_failures_open_before_minimum_calls() {
    let (cb, s) =
        breaker(r#"{"rules": [{"name": "c", "consecutive_failures": 3, "minimum_calls": 100}]}"#);
    let codes = [500, 500, 200, 500, 500];
    for (i, code) in codes.iter().enumerate() {
        assert!(passed(&call(&cb, &s, route("r"), T0 + i as u64, *code, 1)));
    }
    assert!(
        passed(&call(&cb, &s, route("r"), T0 + 10, 500, 1)),
        "third in a row"
    );
    assert!(!passed(&call(&cb, &s, route("r"), T0 + 11, 200, 1)));
}

/// Opens the PAYMENTS breaker at T0 (open until T0 + 10s + a bit).
fn opened() -> (CircuitBreaker, MemoryStore) {
    let (cb, s) = breaker(PAYMENTS);
    for i in 0..10 {
        call(&cb, &s, route("payments"), T0 + i, 500, 0);
    }
    assert!(!passed(&call(&cb, &s, route("payments"), T0 + 100, 200, 0)));
    (cb, s)
}

fn admit(cb: &CircuitBreaker, s: &MemoryStore, now: u64) -> Verdict {
    let v = cb.check(&mut route("payments"), s, now);
    if let Some(c) = v.change() {
        cb.apply(s, c);
    }
    v
}

fn report(cb: &CircuitBreaker, s: &MemoryStore, v: &Verdict, code: u32, now: u64) {
    let Verdict::Pass { call, .. } = v else {
        panic!("not admitted: {v:?}")
    };
    let outcome = cb.classify(call, upstream(code, 1));
    if let Some(c) = cb.finish(s, call, outcome, now) {
        cb.apply(s, &c);
    }
}

#[test]
fn half_open_admits_exactly_the_probes_then_closes_when_all_succeed() {
    let (cb, s) = opened();
    let after = T0 + 11 * SEC;
    let verdicts: Vec<Verdict> = (0..20).map(|i| admit(&cb, &s, after + i)).collect();
    let probes: Vec<&Verdict> = verdicts.iter().filter(|v| passed(v)).collect();
    assert_eq!(probes.len(), 3);
    assert!(
        verdicts.iter().take(3).all(passed),
        "the first three get the permits"
    );
    match &verdicts[3] {
        Verdict::Reject {
            state,
            retry_after_secs,
            ..
        } => {
            assert_eq!((*state, *retry_after_secs), (CircuitState::HalfOpen, 1));
        }
        v => panic!("{v:?}"),
    }
    assert_eq!(
        cb.config.rules[0].table.summary(&s).worst(),
        CircuitState::HalfOpen
    );
    report(&cb, &s, probes[0], 200, after + 100);
    report(&cb, &s, probes[1], 200, after + 101);
    assert!(
        !passed(&admit(&cb, &s, after + 102)),
        "two of three probes are not enough"
    );
    report(&cb, &s, probes[2], 200, after + 103);
    assert_eq!(cb.config.rules[0].table.summary(&s), Summary::default());
    for i in 0..50 {
        assert!(passed(&call(
            &cb,
            &s,
            route("payments"),
            after + 200 + i,
            200,
            1
        )));
    }
}

/// The state of the PAYMENTS breaker (its only one) as the rule's summary has it.
fn state(cb: &CircuitBreaker, s: &MemoryStore) -> CircuitState {
    cb.config.rules[0].table.summary(s).worst()
}

#[test]
fn the_probes_are_judged_by_their_failure_rate_once_all_answered() {
    // 3 probes at 50%: one failure (33%) closes, two (67%) open.
    for (codes, after_all) in [
        ([200, 502, 200], CircuitState::Closed),
        ([502, 200, 503], CircuitState::Open),
    ] {
        let (cb, s) = opened();
        let after = T0 + 11 * SEC;
        let probes: Vec<Verdict> = (0..3).map(|i| admit(&cb, &s, after + i)).collect();
        report(&cb, &s, &probes[0], codes[0], after + 10);
        report(&cb, &s, &probes[1], codes[1], after + 11);
        assert_eq!(
            state(&cb, &s),
            CircuitState::HalfOpen,
            "{codes:?}: one probe still out"
        );
        report(&cb, &s, &probes[2], codes[2], after + 12);
        assert_eq!(state(&cb, &s), after_all, "{codes:?}");
    }
}

#[test]
fn probes_are_judged_after_minimum_calls_when_that_is_fewer() {
    // As Resilience4j: minimum_calls 2 of 4 probes. Two successes close it,
    // one failure of the first two (50%) opens it.
    for (codes, after_two) in [
        ([200, 200], CircuitState::Closed),
        ([200, 500], CircuitState::Open),
    ] {
        let (cb, s) = breaker(
            r#"{"rules": [{"name": "payments", "consecutive_failures": 1, "minimum_calls": 2,
                "open_for": "10s", "half_open_calls": 4}]}"#,
        );
        call(&cb, &s, route("payments"), T0, 500, 0);
        let after = T0 + 11 * SEC;
        let probes: Vec<Verdict> = (0..4).map(|i| admit(&cb, &s, after + i)).collect();
        assert!(probes.iter().all(passed));
        report(&cb, &s, &probes[0], codes[0], after + 10);
        assert_eq!(state(&cb, &s), CircuitState::HalfOpen);
        report(&cb, &s, &probes[1], codes[1], after + 11);
        assert_eq!(state(&cb, &s), after_two, "{codes:?}");
    }
}

#[test]
fn slow_probes_count_in_the_slow_call_rate() {
    let (mut cb, s) = breaker(
        r#"{"rules": [{"name": "payments", "consecutive_failures": 1, "open_for": "10s", "half_open_calls": 2,
            "failure_rate_percent": 100, "slow_call": {"duration": "100ms", "rate_percent": 50}}]}"#,
    );
    for any_failure in [false, true] {
        if any_failure {
            cb.config.rules[0].policy.half_open_policy = HalfOpenPolicy::AnyFailure;
        }
        let start = T0 + u64::from(any_failure) * 1000 * SEC;
        call(&cb, &s, route("payments"), start, 500, 0);
        assert_eq!(state(&cb, &s), CircuitState::Open);
        let after = start + 11 * SEC;
        let probes: Vec<Verdict> = (0..2).map(|i| admit(&cb, &s, after + i)).collect();
        let Verdict::Pass { call: slow, .. } = &probes[0] else {
            panic!("{probes:?}")
        };
        // A success, but slow: 1 of 1 probes is slow (the rate waits for both).
        let outcome = cb.classify(slow, upstream(200, 150));
        assert_eq!(outcome, Outcome::Slow);
        if let Some(c) = cb.finish(&s, slow, outcome, after + 150 * MS) {
            cb.apply(&s, &c);
        }
        let expected = if any_failure {
            CircuitState::Open
        } else {
            CircuitState::HalfOpen
        };
        assert_eq!(state(&cb, &s), expected);
        if !any_failure {
            report(&cb, &s, &probes[1], 200, after + 200 * MS);
            assert_eq!(state(&cb, &s), CircuitState::Open, "1 of 2 slow: 50%");
            // Close it for the next round.
            let later = after + 11 * SEC;
            for i in 0..2 {
                let v = admit(&cb, &s, later + i);
                report(&cb, &s, &v, 200, later + 10);
            }
            assert_eq!(state(&cb, &s), CircuitState::Closed);
        }
    }
}

#[test]
fn any_failure_policy_opens_at_the_first_failing_probe() {
    let (mut cb, s) = opened();
    cb.config.rules[0].policy.half_open_policy = HalfOpenPolicy::AnyFailure;
    let after = T0 + 11 * SEC;
    let probes: Vec<Verdict> = (0..3).map(|i| admit(&cb, &s, after + i)).collect();
    report(&cb, &s, &probes[0], 200, after + 10);
    report(&cb, &s, &probes[1], 502, after + 11);
    assert_eq!(state(&cb, &s), CircuitState::Open);
    // Late probe outcomes belong to the old half-open episode: ignored.
    report(&cb, &s, &probes[2], 200, after + 12);
    match admit(&cb, &s, after + 5 * SEC) {
        Verdict::Reject {
            state,
            retry_after_secs,
            ..
        } => {
            assert_eq!(
                (state, retry_after_secs),
                (CircuitState::Open, 6),
                "5s and a bit left"
            );
        }
        v => panic!("{v:?}"),
    }
    // And half-open again after another open_for.
    assert!(passed(&admit(&cb, &s, after + 11 * SEC)));
}

#[test]
fn an_ignored_probe_gives_its_permit_back() {
    let (cb, s) = opened();
    let after = T0 + 11 * SEC;
    let probes: Vec<Verdict> = (0..3).map(|i| admit(&cb, &s, after + i)).collect();
    assert!(!passed(&admit(&cb, &s, after + 3)));
    let Verdict::Pass { call, .. } = &probes[0] else {
        panic!()
    };
    // The client went away before an answer: not the upstream's fault.
    let gone = Response {
        code: None,
        details: Some(b"downstream_remote_disconnect"),
        duration_nanos: None,
    };
    let outcome = cb.classify(call, gone);
    assert_eq!(outcome, Outcome::Ignored);
    cb.finish(&s, call, outcome, after + 4);
    assert!(
        passed(&admit(&cb, &s, after + 5)),
        "the permit is free again"
    );
    assert!(!passed(&admit(&cb, &s, after + 6)));
}

#[test]
fn calls_admitted_while_closed_do_not_count_as_probes() {
    let (cb, s) = breaker(PAYMENTS);
    let early = admit(&cb, &s, T0);
    for i in 1..11 {
        call(&cb, &s, route("payments"), T0 + i, 500, 0);
    }
    let after = T0 + 11 * SEC;
    let probes: Vec<Verdict> = (0..3).map(|i| admit(&cb, &s, after + i)).collect();
    // The straggler from the closed state reports success during half-open.
    report(&cb, &s, &early, 200, after + 5);
    for p in &probes[..2] {
        report(&cb, &s, p, 200, after + 6);
    }
    assert_eq!(
        cb.config.rules[0].table.summary(&s).worst(),
        CircuitState::HalfOpen,
        "only 2 real probes succeeded"
    );
}

#[test]
fn probes_that_never_report_reopen_the_breaker_after_the_wait() {
    let (cb, s) = opened();
    let after = T0 + 11 * SEC;
    for i in 0..3 {
        assert!(passed(&admit(&cb, &s, after + i)));
    }
    // open_for is 10s, so the wait is the default minimum, 60s.
    assert!(!passed(&admit(&cb, &s, after + 59 * SEC)));
    match admit(&cb, &s, after + 61 * SEC) {
        Verdict::Reject {
            state,
            retry_after_secs,
            ..
        } => {
            // Opened when the wait ended (after + 60s), until after + 70s.
            assert_eq!((state, retry_after_secs), (CircuitState::Open, 9));
        }
        v => panic!("{v:?}"),
    }
    assert!(
        !passed(&admit(&cb, &s, after + 70 * SEC)),
        "open_for not over yet"
    );
    assert!(
        passed(&admit(&cb, &s, after + 70 * SEC + 1)),
        "half-open again"
    );
}

#[test]
fn max_wait_in_half_open_bounds_lost_probes() {
    let (mut cb, s) = opened();
    cb.config.rules[0].policy.max_wait_in_half_open_nanos = 2 * SEC;
    let after = T0 + 11 * SEC;
    for i in 0..3 {
        assert!(passed(&admit(&cb, &s, after + i)));
    }
    assert!(!passed(&admit(&cb, &s, after + 2 * SEC - 1)));
    assert_eq!(state(&cb, &s), CircuitState::HalfOpen);
    assert!(!passed(&admit(&cb, &s, after + 2 * SEC)));
    assert_eq!(state(&cb, &s), CircuitState::Open);
    // No request for a long time: the request that finds the wait and the
    // next open_for both over probes at once (half-open -> open -> half-open).
    let (mut cb, s) = opened();
    cb.config.rules[0].policy.max_wait_in_half_open_nanos = 2 * SEC;
    assert!(passed(&admit(&cb, &s, after)));
    match cb.check(&mut route("payments"), &s, after + 13 * SEC) {
        Verdict::Pass { call, change } => {
            assert!(call.probe);
            let t = change.and_then(|c| c.transition).unwrap();
            assert_eq!(t, Transition::HalfOpened { reopened: true });
            assert!(t.opened(), "counted as an opening");
            assert_eq!(
                (t.from(), t.to()),
                (CircuitState::HalfOpen, CircuitState::HalfOpen)
            );
        }
        v => panic!("{v:?}"),
    }
}

#[test]
fn resets_and_timeouts_are_failures_unless_told_otherwise() {
    let (cb, _s) = breaker(PAYMENTS);
    let (lenient, _) = breaker(
        r#"{"rules": [{"name": "l", "failure_when": {"statuses": [500], "reset": false}}]}"#,
    );
    let c = Call {
        rule: 0,
        slot: Slot::Overflow,
        key: 1,
        generation: 0,
        probe: false,
        started: T0,
        cluster: None,
    };
    let envoy = |code: Option<u32>, details: &'static [u8], headers: bool| Response {
        code,
        details: Some(details),
        duration_nanos: headers.then_some(5 * MS),
    };
    let reset = envoy(
        Some(503),
        b"upstream_reset_before_response_started{connection_termination}",
        true,
    );
    let timeout = envoy(Some(504), b"response_timeout", true);
    let no_answer = Response {
        code: None,
        details: None,
        duration_nanos: None,
    };
    let other_filter = envoy(Some(429), b"ratelimited", true);
    for r in [reset, timeout, no_answer] {
        assert_eq!(
            cb.classify(&c, r),
            Outcome::Failure { slow: false },
            "{r:?}"
        );
        assert_eq!(lenient.classify(&c, r), Outcome::Ignored, "{r:?}");
    }
    assert_eq!(cb.classify(&c, other_filter), Outcome::Ignored);
    assert_eq!(
        lenient.classify(&c, upstream(503, 1)),
        Outcome::Success,
        "only 500 fails"
    );
    assert_eq!(
        lenient.classify(&c, upstream(500, 1)),
        Outcome::Failure { slow: false }
    );
}

#[test]
fn header_scope_keeps_tenants_apart_and_skips_requests_without_it() {
    let (cb, s) = breaker(
        r#"{"rules": [{"name": "tenants", "scope": {"header": "x-tenant"}, "consecutive_failures": 2}]}"#,
    );
    let tenant = |t: &str| FakeRequest::new().with_header("x-tenant", t);
    for i in 0..2 {
        call(&cb, &s, tenant("bad"), T0 + i, 500, 1);
    }
    assert!(!passed(&call(&cb, &s, tenant("bad"), T0 + 5, 200, 1)));
    for i in 0..10 {
        assert!(passed(&call(&cb, &s, tenant("good"), T0 + 10 + i, 200, 1)));
    }
    assert_eq!(
        cb.check(&mut FakeRequest::new(), &s, T0 + 20),
        Verdict::NoRule
    );
    let summary = cb.config.rules[0].table.summary(&s);
    assert_eq!((summary.open, summary.half_open), (1, 0));
}

#[test]
fn a_flood_of_header_values_stays_within_max_breakers() {
    let (cb, s) = breaker(
        r#"{"rules": [{"name": "tenants", "scope": {"header": "x-tenant"}, "max_breakers": 50, "consecutive_failures": 1}]}"#,
    );
    let before = s.len();
    let mut overflowed = 0;
    for i in 0..5000u32 {
        let mut req = FakeRequest::new().with_header("x-tenant", i.to_string());
        if let Verdict::Pass { call, .. } = cb.check(&mut req, &s, T0 + u64::from(i)) {
            overflowed += u32::from(call.slot == Slot::Overflow);
            cb.finish(&s, &call, Outcome::Success, T0 + u64::from(i));
        }
    }
    assert_eq!(s.len(), before, "no entry is created after configure");
    assert_eq!(cb.config.rules[0].table.stored_entries(&s), 52);
    assert!(overflowed > 4900, "{overflowed}");
    // An hour later the old breakers are idle: new tenants get slots again.
    let mut req = FakeRequest::new().with_header("x-tenant", "newcomer");
    let Verdict::Pass { call, .. } = cb.check(&mut req, &s, T0 + 3600 * SEC) else {
        panic!()
    };
    assert_ne!(call.slot, Slot::Overflow);
}

#[test]
fn overflowed_tenants_share_one_breaker() {
    let (cb, s) = breaker(
        r#"{"rules": [{"name": "t", "scope": {"header": "x-tenant"}, "max_breakers": 1, "consecutive_failures": 1}]}"#,
    );
    let tenant = |t: &str| FakeRequest::new().with_header("x-tenant", t);
    assert!(
        passed(&call(&cb, &s, tenant("a"), T0, 200, 1)),
        "a takes the only slot"
    );
    assert!(
        passed(&call(&cb, &s, tenant("b"), T0 + 1, 500, 1)),
        "b overflows and fails"
    );
    assert!(
        !passed(&call(&cb, &s, tenant("c"), T0 + 2, 200, 1)),
        "c shares b's breaker"
    );
    assert!(
        passed(&call(&cb, &s, tenant("a"), T0 + 3, 200, 1)),
        "a has its own"
    );
}

#[test]
fn cluster_scope_publishes_its_state_for_lb_hints() {
    let (cb, s) = breaker(
        r#"{"rules": [{"name": "per-cluster", "scope": "cluster", "consecutive_failures": 1, "open_for": "10s", "half_open_calls": 1}]}"#,
    );
    let cluster = |c: &str| FakeRequest::new().with(Attribute::Cluster, c);
    call(&cb, &s, cluster("v2"), T0, 500, 1);
    assert!(circuit::is_open(&s, "v2", T0 + SEC));
    assert!(!circuit::is_open(&s, "v1", T0 + SEC));
    assert!(passed(&call(&cb, &s, cluster("v1"), T0 + SEC, 200, 1)));
    // The probe succeeds: closed again, published.
    assert!(passed(&call(&cb, &s, cluster("v2"), T0 + 11 * SEC, 200, 1)));
    let status = s.get(&circuit::status_key("v2")).unwrap().0;
    assert_eq!(
        CircuitStatus::decode(&status).unwrap().state,
        CircuitState::Closed
    );
}

#[test]
fn a_route_without_a_rule_is_untouched() {
    let (cb, s) = breaker(PAYMENTS);
    let mut req = route("catalog");
    assert_eq!(cb.check(&mut req, &s, T0), Verdict::NoRule);
    assert_eq!(req.lookups, 1, "only the route name was read");
}

#[test]
fn the_rule_gauge_shows_the_worst_state() {
    let (cb, s) = breaker(
        r#"{"rules": [{"name": "t", "scope": {"header": "x-tenant"}, "consecutive_failures": 1, "open_for": "10s", "half_open_calls": 1}]}"#,
    );
    let tenant = |t: &str| FakeRequest::new().with_header("x-tenant", t);
    let table = &cb.config.rules[0].table;
    call(&cb, &s, tenant("a"), T0, 500, 1);
    call(&cb, &s, tenant("b"), T0 + 5 * SEC, 500, 1);
    assert_eq!(
        table.summary(&s),
        Summary {
            open: 2,
            half_open: 0
        }
    );
    // a goes half-open (its probe is in flight); b is still open: worst is open.
    let probe = cb.check(&mut tenant("a"), &s, T0 + 11 * SEC);
    cb.apply(&s, probe.change().unwrap());
    assert_eq!(
        table.summary(&s),
        Summary {
            open: 1,
            half_open: 1
        }
    );
    assert_eq!(table.summary(&s).worst(), CircuitState::Open);
    call(&cb, &s, tenant("b"), T0 + 16 * SEC, 200, 1);
    assert_eq!(table.summary(&s).worst(), CircuitState::HalfOpen);
}

#[test]
fn concurrent_workers_admit_exactly_the_probes() {
    for _ in 0..20 {
        let (cb, s) = opened();
        let (cb, s) = (Arc::new(cb), Arc::new(s));
        let after = T0 + 11 * SEC;
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (cb, s, barrier) = (cb.clone(), s.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..5)
                        .filter(|_| passed(&cb.check(&mut route("payments"), &*s, after)))
                        .count()
                })
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 3);
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A request arrives after this many milliseconds.
    Request(u64),
    /// The pending call at this index (modulo) finishes with this outcome.
    Finish(usize, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..3000).prop_map(Op::Request),
        (0usize..64, 0u8..4).prop_map(|(i, o)| Op::Finish(i, o)),
    ]
}

proptest! {
    /// Whatever the order of requests and outcomes: no half-open episode
    /// admits more than `half_open_calls` probes, and a breaker closes only
    /// after that many probes of the episode answered, below the failure
    /// rate (with `any_failure`: all of them succeeded).
    #[test]
    fn probes_never_exceed_the_permits_and_closing_needs_all_of_them(
        half_open_calls in 1u64..5,
        any_failure in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..300),
    ) {
        let (mut cb, s) = breaker(&format!(
            r#"{{"rules": [{{"name": "p", "window": {{"kind": "count", "size": 4}}, "minimum_calls": 2,
                "open_for": "1s", "half_open_calls": {half_open_calls}}}]}}"#
        ));
        if any_failure {
            cb.config.rules[0].policy.half_open_policy = HalfOpenPolicy::AnyFailure;
        }
        let mut now = T0;
        let mut pending: Vec<Call> = Vec::new();
        // Per half-open generation: probes admitted, successes, failures recorded.
        let mut probes: std::collections::HashMap<u32, (u64, u64, u64)> = Default::default();
        for op in ops {
            match op {
                Op::Request(ms) => {
                    now += ms * MS;
                    if let Verdict::Pass { call, .. } = cb.check(&mut route("r"), &s, now) {
                        if call.probe {
                            let e = probes.entry(call.generation).or_default();
                            e.0 += 1;
                            prop_assert!(e.0 <= half_open_calls, "{} probes admitted", e.0);
                        }
                        pending.push(call);
                    }
                }
                Op::Finish(i, o) => {
                    if pending.is_empty() {
                        continue;
                    }
                    let call = pending.remove(i % pending.len());
                    let outcome = match o {
                        0 | 1 => Outcome::Success,
                        2 => Outcome::Failure { slow: false },
                        _ => Outcome::Ignored,
                    };
                    if call.probe && outcome == Outcome::Ignored {
                        // The permit is given back: it may be claimed again.
                        if let Some(e) = probes.get_mut(&call.generation) {
                            e.0 -= 1;
                        }
                    }
                    let change = cb.finish(&s, &call, outcome, now);
                    if call.probe {
                        if let Some(e) = probes.get_mut(&call.generation) {
                            e.1 += u64::from(outcome == Outcome::Success);
                            e.2 += u64::from(outcome.is_failure());
                        }
                    }
                    if let Some(Transition::Closed) = change.and_then(|c| c.transition) {
                        let (_, ok, failed) = probes.get(&call.generation).copied().unwrap_or_default();
                        if any_failure {
                            prop_assert_eq!(ok, half_open_calls, "closed without enough successful probes");
                        } else {
                            // Judged after minimum_calls (2) probes, at most all of them.
                            let judged = half_open_calls.min(2);
                            prop_assert_eq!(ok + failed, judged, "closed before the probes were judged");
                            prop_assert!(failed * 100 < 50 * judged, "closed at {} failures", failed);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn breakers_round_trip_through_their_bytes(
        calls in proptest::collection::vec((any::<bool>(), 0u64..2000), 0..50),
        time_window in any::<bool>(),
    ) {
        let window = if time_window {
            config::Window::Time { buckets: 10, bucket_nanos: SEC }
        } else {
            config::Window::Count { size: 7 }
        };
        let json = r#"{"rules": [{"name": "x"}]}"#;
        let mut policy = Config::parse(json.as_bytes(), "t").unwrap().rules[0].policy.clone();
        policy.window = window;
        let mut b = breaker::Breaker::fresh(42, window, T0);
        let mut now = T0;
        for (fail, ms) in calls {
            now += ms * MS;
            let outcome = if fail { Outcome::Failure { slow: false } } else { Outcome::Success };
            let (admit, _, _) = b.admit(&policy, now);
            if let Admit::Call { generation, .. } = admit {
                b.record(&policy, generation, outcome, now);
            }
            let bytes = b.encode();
            prop_assert_eq!(bytes.len(), breaker::encoded_len(window));
            prop_assert_eq!(breaker::Breaker::decode(&bytes, window), Some(b.clone()));
        }
    }
}

#[test]
fn a_cluster_known_only_after_routing_is_settled_afterwards() {
    let (cb, s) = breaker(
        r#"{"rules": [{"name": "per-cluster", "scope": "cluster", "consecutive_failures": 2, "open_for": "10s", "half_open_calls": 1}]}"#,
    );
    // A filter before re-routed the request: no cluster until the router runs.
    assert_eq!(
        cb.check(&mut FakeRequest::new(), &s, T0),
        Verdict::Deferred {
            rule: 0,
            started: T0
        }
    );
    let settle = |code: u32, at: u64| {
        let (outcome, changes) = cb.settle(&s, 0, b"v2", at, upstream(code, 1), at + MS);
        for c in &changes {
            cb.apply(&s, c);
        }
        outcome
    };
    assert_eq!(settle(500, T0), Outcome::Failure { slow: false });
    assert_eq!(settle(500, T0 + 1), Outcome::Failure { slow: false });
    assert!(circuit::is_open(&s, "v2", T0 + SEC));
    // A call that slipped through while open is not counted.
    assert_eq!(settle(200, T0 + 2 * SEC), Outcome::Ignored);
    assert!(circuit::is_open(&s, "v2", T0 + 3 * SEC));
    // After open_for the first call is the probe; it succeeds: closed.
    assert_eq!(settle(200, T0 + 11 * SEC), Outcome::Success);
    let status = s.get(&circuit::status_key("v2")).unwrap().0;
    assert_eq!(
        CircuitStatus::decode(&status).unwrap().state,
        CircuitState::Closed
    );
    assert_eq!(cb.config.rules[0].table.summary(&s), Summary::default());
}

#[test]
fn a_call_re_routed_after_the_decision_is_booked_under_the_cluster_that_served_it() {
    let (cb, s) = breaker(
        r#"{"rules": [{"name": "per-cluster", "scope": "cluster", "consecutive_failures": 1, "open_for": "10s"}]}"#,
    );
    let cluster = |c: &str| FakeRequest::new().with(Attribute::Cluster, c);
    // Decided on v1 (the route before re-routing), served by v2, which failed.
    let Verdict::Pass { call: c, .. } = cb.check(&mut cluster("v1"), &s, T0) else {
        panic!()
    };
    let (outcome, changes) = cb.complete(&s, &c, Some(b"v2"), upstream(500, 1), T0 + MS);
    for ch in &changes {
        cb.apply(&s, ch);
    }
    assert_eq!(outcome, Outcome::Failure { slow: false });
    assert!(circuit::is_open(&s, "v2", T0 + SEC));
    assert!(!circuit::is_open(&s, "v1", T0 + SEC));
    assert!(passed(&call(&cb, &s, cluster("v1"), T0 + SEC, 200, 1)));
    assert!(!passed(&call(&cb, &s, cluster("v2"), T0 + SEC, 200, 1)));
    // Served by the cluster it was decided on: booked as usual.
    let Verdict::Pass { call: c, .. } = cb.check(&mut cluster("v1"), &s, T0 + 2 * SEC) else {
        panic!()
    };
    let (outcome, _) = cb.complete(&s, &c, Some(b"v1"), upstream(200, 1), T0 + 2 * SEC);
    assert_eq!(outcome, Outcome::Success);
}

#[test]
fn route_metadata_selects_a_rule_or_disables_the_filter() {
    let (cb, s) = breaker(
        r#"{"route_metadata": true, "rules": [
            {"name": "strict", "consecutive_failures": 1, "open_for": "1h"},
            {"name": "lenient", "consecutive_failures": 100, "open_for": "1h"}]}"#,
    );
    let with = |md: &[(&str, &[u8])]| {
        let mut r = route("api");
        r.route_metadata.push((
            "circuit-breaker".into(),
            mesh_shared::route_metadata::tests_encode(md),
        ));
        r
    };
    // "lenient" selected: failures do not open it.
    for _ in 0..5 {
        assert!(passed(&call(
            &cb,
            &s,
            with(&[("rule", b"lenient")]),
            T0,
            503,
            1
        )));
    }
    // Disabled: no rule applies.
    assert_eq!(
        cb.check(&mut with(&[("disabled", &[1])]), &s, T0),
        Verdict::NoRule
    );
    // No metadata: the first rule; one failure opens it.
    assert!(passed(&call(&cb, &s, route("api"), T0, 503, 1)));
    assert!(!passed(&call(&cb, &s, route("api"), T0 + SEC, 200, 1)));
}
