//! Tests of the policy core: local rules, and global rules with the call's
//! outcome supplied (the service itself runs in the Envoy tests).

use super::*;
use mesh_shared::request::FakeRequest;
use mesh_shared::store::MemoryStore;
use mesh_shared::Attribute;

const NOW: u64 = 1_700_000_000 * 1_000_000_000;

impl RateLimiter {
    /// `check` for rules that decide locally.
    fn check_local(&self, req: &mut dyn Request, store: &dyn SharedStore, now: u64) -> Verdict {
        match self.check(req, store, now) {
            Check::Done(v) => v,
            Check::Ask(call) => panic!("unexpected call {call:?}"),
        }
    }
}

fn limiter(json: &str) -> (RateLimiter, MemoryStore) {
    let l = RateLimiter::new(Config::parse(json.as_bytes(), "t").unwrap());
    let s = MemoryStore::new();
    l.create_tables(&s);
    (l, s)
}

fn api_key(k: &str) -> FakeRequest {
    FakeRequest::new()
        .with(Attribute::Path, "/api/x")
        .with_header("x-api-key", k)
}

const KEYED: &str = r#"{"rules": [
    {"name": "per-key", "match": {"path_prefix": "/api"}, "key": [{"header": "x-api-key"}],
     "limit": {"requests": 2, "per": "1h"}},
    {"name": "per-ip", "key": ["client_ip"], "limit": {"requests": 1, "per": "1h"}}
]}"#;

#[test]
fn first_matching_rule_applies_and_keys_are_independent() {
    let (l, s) = limiter(KEYED);
    let labels = |k: &str| -> Vec<&str> {
        (0..3)
            .map(|_| l.check_local(&mut api_key(k), &s, NOW).label())
            .collect()
    };
    assert_eq!(labels("a"), ["allowed", "allowed", "limited"]);
    assert_eq!(labels("b"), ["allowed", "allowed", "limited"]);
}

#[test]
fn missing_key_skips_to_the_next_rule() {
    let (l, s) = limiter(KEYED);
    let mut req = FakeRequest::new()
        .with(Attribute::Path, "/api/x")
        .with(Attribute::ClientIp, "10.0.0.1");
    assert_eq!(l.check_local(&mut req.clone(), &s, NOW).rule(), Some(1));
    assert!(l.check_local(&mut req, &s, NOW).rejects());
    // Neither key present: no rule applies.
    assert_eq!(
        l.check_local(&mut FakeRequest::new(), &s, NOW),
        Verdict::NoRule
    );
}

#[test]
fn missing_key_deny_and_static() {
    let (l, s) = limiter(
        r#"{"rules": [{"name": "d", "match": {"path_prefix": "/d"}, "key": [{"header": "k"}], "on_missing_key": "deny", "limit": {"requests": 5, "per": "1s"}},
                      {"name": "s", "key": [{"header": "k"}], "on_missing_key": {"static": "anon"}, "limit": {"requests": 1, "per": "1h"}}]}"#,
    );
    let mut d = FakeRequest::new().with(Attribute::Path, "/d");
    assert_eq!(
        l.check_local(&mut d, &s, NOW),
        Verdict::DeniedMissingKey { rule: 0 }
    );
    let mut anon = FakeRequest::new().with(Attribute::Path, "/x");
    assert_eq!(l.check_local(&mut anon.clone(), &s, NOW).label(), "allowed");
    assert_eq!(
        l.check_local(&mut anon, &s, NOW).label(),
        "limited",
        "anonymous requests share one bucket"
    );
}

#[test]
fn shadow_counts_but_never_rejects() {
    let (l, s) = limiter(
        r#"{"rules": [{"name": "sh", "shadow": true, "limit": {"requests": 1, "per": "1h"}}]}"#,
    );
    let v: Vec<Verdict> = (0..3)
        .map(|_| l.check_local(&mut FakeRequest::new(), &s, NOW))
        .collect();
    assert_eq!(v[0].label(), "allowed");
    assert_eq!(v[1].label(), "shadow_limited");
    assert!(!v[1].rejects() && !v[2].rejects());
}

#[test]
fn a_rule_scoped_to_a_route_leaves_others_alone() {
    let (l, s) = limiter(
        r#"{"rules": [{"name": "r", "match": {"route": "limited"}, "limit": {"requests": 1, "per": "1h"}}]}"#,
    );
    let route = |r: &str| FakeRequest::new().with(Attribute::Route, r);
    for _ in 0..5 {
        assert_eq!(l.check_local(&mut route("open"), &s, NOW), Verdict::NoRule);
    }
    assert_eq!(
        l.check_local(&mut route("limited"), &s, NOW).label(),
        "allowed"
    );
    assert_eq!(
        l.check_local(&mut route("limited"), &s, NOW).label(),
        "limited"
    );
}

#[test]
fn headers_in_each_style() {
    let (l, s) = limiter(
        r#"{"headers_on_allowed": true, "rules": [{"name": "h", "limit": {"requests": 10, "per": "1m", "burst": 2}}]}"#,
    );
    let ok = l.check_local(&mut FakeRequest::new(), &s, NOW);
    assert_eq!(
        l.headers(&ok),
        vec![
            ("ratelimit-policy", "\"h\";q=10;w=60".to_string()),
            ("ratelimit", "\"h\";r=1;t=6".to_string())
        ]
    );
    l.check_local(&mut FakeRequest::new(), &s, NOW);
    let limited = l.check_local(&mut FakeRequest::new(), &s, NOW);
    assert_eq!(
        l.headers(&limited),
        vec![
            ("retry-after", "6".to_string()),
            ("ratelimit-policy", "\"h\";q=10;w=60".to_string()),
            ("ratelimit", "\"h\";r=0;t=12".to_string())
        ]
    );

    let (x, s) = limiter(
        r#"{"headers": "x-ratelimit", "rules": [{"name": "h", "limit": {"requests": 1, "per": "1m"}}]}"#,
    );
    let ok = x.check_local(&mut FakeRequest::new(), &s, NOW);
    assert!(
        x.headers(&ok).is_empty(),
        "allowed answers carry headers only when asked"
    );
    let limited = x.check_local(&mut FakeRequest::new(), &s, NOW);
    assert_eq!(
        x.headers(&limited),
        vec![
            ("retry-after", "60".to_string()),
            ("x-ratelimit-limit", "1".to_string()),
            ("x-ratelimit-remaining", "0".to_string()),
            ("x-ratelimit-reset", "60".to_string())
        ]
    );
}

#[test]
fn route_metadata_selects_a_rule_or_disables_the_filter() {
    let (l, s) = limiter(
        r#"{"route_metadata": true, "rules": [
            {"name": "strict", "limit": {"requests": 1, "per": "1h"}},
            {"name": "gold", "limit": {"requests": 3, "per": "1h"}}]}"#,
    );
    let with = |md: Vec<u8>| {
        let mut r = FakeRequest::new();
        r.route_metadata.push(("ratelimit".into(), md));
        r
    };
    let gold = mesh_shared::route_metadata::tests_encode(&[("rule", b"gold")]);
    let labels: Vec<&str> = (0..4)
        .map(|_| l.check_local(&mut with(gold.clone()), &s, NOW).label())
        .collect();
    assert_eq!(labels, ["allowed", "allowed", "allowed", "limited"]);
    let off = mesh_shared::route_metadata::tests_encode(&[("disabled", &[1])]);
    assert_eq!(l.check_local(&mut with(off), &s, NOW), Verdict::NoRule);
    // No metadata: the first matching rule, as usual.
    assert_eq!(
        l.check_local(&mut FakeRequest::new(), &s, NOW).rule(),
        Some(0)
    );
    // Without route_metadata the filter never reads it.
    let (plain, s2) =
        limiter(r#"{"rules": [{"name": "strict", "limit": {"requests": 1, "per": "1h"}}]}"#);
    let mut req = with(mesh_shared::route_metadata::tests_encode(&[(
        "disabled",
        &[1],
    )]));
    assert_eq!(plain.check_local(&mut req, &s2, NOW).rule(), Some(0));
    assert_eq!(req.lookups, 0);
}

#[test]
fn only_what_a_rule_needs_is_fetched() {
    let (l, s) = limiter(
        r#"{"rules": [{"name": "r", "match": {"route": "a"}, "key": [{"header": "x"}], "limit": {"requests": 1, "per": "1s"}}]}"#,
    );
    let mut req = FakeRequest::new()
        .with(Attribute::Route, "b")
        .with_header("x", "1");
    l.check_local(&mut req, &s, NOW);
    assert_eq!(
        req.lookups, 1,
        "the key must not be read when the match fails"
    );
}

// ---- global rules ----

use crate::rls::{Code, DescriptorStatus, ProtoDuration, RateLimit, RateLimitResponse, Unit};
use proptest::prelude::*;
use prost::Message;

const GLOBAL: &str = r#"{"max_keys": 64, "rules": [
    {"name": "strict", "match": {"path_prefix": "/strict"}, "key": [{"header": "x-user"}],
     "global": {"service": "rls", "domain": "mesh", "failure_mode": "deny",
                "failure_response": {"status": 503, "body": "down\n"}}},
    {"name": "trial", "match": {"path_prefix": "/trial"}, "shadow": true,
     "global": {"service": "rls", "domain": "mesh"}},
    {"name": "per-user", "key": [{"header": "x-user"}], "limit": {"requests": 3, "per": "1h"},
     "global": {"service": "rls", "domain": "mesh", "failure_mode": "allow"}}
]}"#;

fn user(u: &str) -> FakeRequest {
    FakeRequest::new().with_header("x-user", u)
}

fn ask(l: &RateLimiter, req: &mut FakeRequest, s: &MemoryStore, now: u64) -> GlobalCall {
    match l.check(req, s, now) {
        Check::Ask(call) => call,
        Check::Done(v) => panic!("expected a call, got {v:?}"),
    }
}

fn answer(code: Code, remaining: u32, reset_secs: i64) -> Vec<u8> {
    RateLimitResponse {
        overall_code: code as i32,
        statuses: vec![DescriptorStatus {
            code: code as i32,
            current_limit: Some(RateLimit {
                requests_per_unit: 100,
                unit: Unit::Minute as i32,
                name: String::new(),
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(ProtoDuration {
                seconds: reset_secs,
                nanos: 0,
            }),
        }],
    }
    .encode_to_vec()
}

#[test]
fn a_global_rule_asks_with_the_rule_and_key_as_descriptor() {
    let (l, s) = limiter(GLOBAL);
    let call = ask(&l, &mut user("alice"), &s, NOW);
    assert_eq!(call.rule, 2);
    let entries: Vec<(String, String)> = call
        .descriptor
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    assert_eq!(
        entries,
        [
            ("rule".to_string(), "per-user".to_string()),
            ("x-user".to_string(), "alice".to_string())
        ]
    );
    let ok = l.conclude(
        &call,
        CallOutcome::Answered(&answer(Code::Ok, 99, 30)),
        &s,
        NOW,
    );
    assert_eq!(ok.label(), "allowed");
    assert!(!ok.rejects());
}

#[test]
fn the_local_pre_check_rejects_before_any_call() {
    let (l, s) = limiter(GLOBAL);
    for _ in 0..3 {
        let call = ask(&l, &mut user("bob"), &s, NOW);
        l.conclude(
            &call,
            CallOutcome::Answered(&answer(Code::Ok, 50, 30)),
            &s,
            NOW,
        );
    }
    match l.check(&mut user("bob"), &s, NOW) {
        Check::Done(v) => assert_eq!(v.label(), "limited"),
        Check::Ask(_) => panic!("over the local limit: no call"),
    }
}

#[test]
fn over_limit_is_remembered_for_the_key_until_the_reset() {
    let (l, s) = limiter(GLOBAL);
    let call = ask(&l, &mut user("carol"), &s, NOW);
    let v = l.conclude(
        &call,
        CallOutcome::Answered(&answer(Code::OverLimit, 0, 20)),
        &s,
        NOW,
    );
    assert_eq!(v.label(), "global_limited");
    assert!(v.rejects());
    assert_eq!(
        l.headers(&v),
        vec![
            ("retry-after", "20".to_string()),
            ("ratelimit-policy", "\"per-user\";q=100;w=60".to_string()),
            ("ratelimit", "\"per-user\";r=0;t=20".to_string()),
        ]
    );
    // Remembered: decided with no call, same policy, the time left.
    let later = NOW + 5_000_000_000;
    match l.check(&mut user("carol"), &s, later) {
        Check::Done(
            v @ Verdict::GlobalLimited {
                remembered: true, ..
            },
        ) => assert_eq!(
            l.headers(&v),
            vec![
                ("retry-after", "15".to_string()),
                ("ratelimit-policy", "\"per-user\";q=100;w=60".to_string()),
                ("ratelimit", "\"per-user\";r=0;t=15".to_string()),
            ]
        ),
        other => panic!("{other:?}"),
    }
    // Another key still asks; after the reset carol asks again.
    assert!(matches!(
        l.check(&mut user("dave"), &s, later),
        Check::Ask(_)
    ));
    assert!(matches!(
        l.check(&mut user("carol"), &s, NOW + 20_000_000_000),
        Check::Ask(_)
    ));
}

#[test]
fn failures_follow_the_failure_mode() {
    let (l, s) = limiter(GLOBAL);
    let call = ask(&l, &mut user("erin"), &s, NOW);
    let open = l.conclude(&call, CallOutcome::Failed, &s, NOW);
    assert_eq!(open, Verdict::GlobalFailedOpen { rule: 2 });
    assert_eq!(open.label(), "failed_open");
    assert!(!open.rejects());

    let mut strict = user("erin").with(Attribute::Path, "/strict");
    let call = ask(&l, &mut strict, &s, NOW);
    for outcome in [
        CallOutcome::Failed,
        CallOutcome::Answered(b"\x08"),
        CallOutcome::Answered(&answer(Code::Unknown, 0, 0)),
    ] {
        let denied = l.conclude(&call, outcome, &s, NOW);
        assert_eq!(denied.label(), "failure_denied");
        assert!(denied.rejects());
        assert_eq!(l.response(&denied).status, 503);
        assert_eq!(l.response(&denied).body, "down\n");
    }
    // A rejection over the limit keeps the configured response.
    let limited = l.conclude(
        &call,
        CallOutcome::Answered(&answer(Code::OverLimit, 0, 9)),
        &s,
        NOW,
    );
    assert_eq!(l.response(&limited).status, 429);
}

#[test]
fn shadow_never_rejects_even_when_remembered() {
    let (l, s) = limiter(GLOBAL);
    let mut trial = FakeRequest::new().with(Attribute::Path, "/trial");
    let call = ask(&l, &mut trial.clone(), &s, NOW);
    let v = l.conclude(
        &call,
        CallOutcome::Answered(&answer(Code::OverLimit, 0, 30)),
        &s,
        NOW,
    );
    assert_eq!(v.label(), "shadow_limited");
    assert!(!v.rejects());
    match l.check(&mut trial, &s, NOW + 1) {
        Check::Done(v) => {
            assert_eq!(v.label(), "shadow_limited");
            assert!(!v.rejects());
        }
        Check::Ask(_) => panic!("remembered"),
    }
}

proptest! {
    /// Whatever the service answers, concluding never panics, and only an
    /// OVER_LIMIT or a failure under `deny` rejects.
    #[test]
    fn any_answer_concludes(bytes in proptest::collection::vec(any::<u8>(), 0..48), strict in any::<bool>()) {
        let (l, s) = limiter(GLOBAL);
        let mut req = user("zed");
        if strict {
            req = req.with(Attribute::Path, "/strict");
        }
        let call = ask(&l, &mut req, &s, NOW);
        let v = l.conclude(&call, CallOutcome::Answered(&bytes), &s, NOW);
        let _ = l.headers(&v);
        match v {
            Verdict::GlobalLimited { .. } => prop_assert!(v.rejects()),
            Verdict::GlobalFailureDenied { .. } => prop_assert!(strict && v.rejects()),
            Verdict::GlobalAllowed { .. } | Verdict::GlobalFailedOpen { .. } => prop_assert!(!v.rejects()),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}

/// A time per rule that only goes up, as the adapter's gauges in Envoy.
#[derive(Default)]
struct Gauges(std::cell::RefCell<std::collections::HashMap<usize, u64>>);

impl RememberedUntil for Gauges {
    fn get(&self, rule: usize) -> Option<u64> {
        Some(self.0.borrow().get(&rule).copied().unwrap_or(0))
    }
    fn raise(&self, rule: usize, secs: u64) {
        let mut gauges = self.0.borrow_mut();
        let g = gauges.entry(rule).or_insert(0);
        *g = (*g).max(secs);
    }
}

#[test]
fn the_remembered_table_is_read_only_while_the_hint_says_it_may_hold_something() {
    let (l, s) = limiter(GLOBAL);
    let g = Gauges::default();
    // Rule "strict": global only, no local limit in the way.
    let user = |u: &str| user(u).with(Attribute::Path, "/strict");
    let over = answer(Code::OverLimit, 0, 20);
    // Remembered behind the hint's back: a request that trusts it does not look.
    let call = ask(&l, &mut user("carol"), &s, NOW);
    l.conclude(&call, CallOutcome::Answered(&over), &s, NOW);
    assert!(matches!(
        l.check_with(&mut user("carol"), &s, &g, NOW + 1),
        Check::Ask(_)
    ));
    // Remembered through it: the hint covers the reset, and the key is rejected.
    l.conclude_with(&call, CallOutcome::Answered(&over), &s, &g, NOW);
    assert_eq!(g.get(0), Some(NOW / 1_000_000_000 + 20));
    assert!(matches!(
        l.check_with(&mut user("carol"), &s, &g, NOW + 1),
        Check::Done(Verdict::GlobalLimited {
            remembered: true,
            ..
        })
    ));
    assert!(matches!(
        l.check_with(&mut user("dave"), &s, &g, NOW + 1),
        Check::Ask(_)
    ));
    assert!(matches!(
        l.check_with(&mut user("carol"), &s, &g, NOW + 20_000_000_000),
        Check::Ask(_)
    ));
}

proptest! {
    /// Kept by `conclude`, the hint never changes a decision: the same
    /// requests and answers decide the same with it as with a table read
    /// on every request.
    #[test]
    fn the_hint_never_changes_a_decision(
        steps in proptest::collection::vec((0u8..4, any::<bool>(), 1i64..30, 0u64..8_000_000_000), 1..60),
    ) {
        let (l, always) = limiter(GLOBAL);
        let hinted = MemoryStore::new();
        l.create_tables(&hinted);
        let g = Gauges::default();
        let mut now = NOW;
        for (u, over, reset, step) in steps {
            now += step;
            let name = format!("u{u}");
            let plain = l.check(&mut user(&name), &always, now);
            let with_hint = l.check_with(&mut user(&name), &hinted, &g, now);
            prop_assert_eq!(&plain, &with_hint);
            if let Check::Ask(call) = plain {
                let bytes = answer(if over { Code::OverLimit } else { Code::Ok }, 0, reset);
                let a = l.conclude(&call, CallOutcome::Answered(&bytes), &always, now);
                let b = l.conclude_with(&call, CallOutcome::Answered(&bytes), &hinted, &g, now);
                prop_assert_eq!(a, b);
            }
        }
    }
}
