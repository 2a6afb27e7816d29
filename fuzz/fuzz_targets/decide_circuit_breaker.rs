//! circuit-breaker's core fed arbitrary requests and call endings over time:
//! `check`, then `classify` / `finish` (now or at the end of the run, so calls
//! overlap transitions) and `apply`, against configurations with every scope,
//! both windows, slow calls, consecutive failures and tiny tables (overflow).
#![no_main]
use circuit_breaker::{Call, CircuitBreaker, Config, Response, Verdict};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use mesh_fuzz::{pick, Ending, Event, MS, T0};
use mesh_shared::store::MemoryStore;

const CONFIGS: &[&str] = &[
    r#"{"rules": [
        {"name": "tenants", "match": {"path_prefix": "/t"}, "scope": {"header": "x-tenant"},
         "window": {"kind": "count", "size": 4}, "minimum_calls": 2, "failure_rate_percent": 50,
         "slow_call": {"duration": "100ms", "rate_percent": 50}, "open_for": "1s",
         "half_open_calls": 2, "max_breakers": 4},
        {"name": "routes", "scope": "route", "window": {"kind": "time", "size": "10s"},
         "minimum_calls": 3, "consecutive_failures": 2, "open_for": "500ms", "half_open_calls": 1,
         "failure_when": {"statuses": ["5xx", 429, "404"], "reset": false}, "max_breakers": 8}],
      "response": {"status": 503, "body": "circuit open\n"}}"#,
    r#"{"rules": [
        {"name": "clusters", "scope": "cluster", "window": {"kind": "count", "size": 1},
         "minimum_calls": 1, "open_for": "2s", "half_open_calls": 3, "max_breakers": 2}]}"#,
];

#[derive(Arbitrary, Debug)]
struct Input {
    config: u8,
    events: Vec<Event>,
}

fn response(ending: &Ending) -> Response<'_> {
    let details = ending.details();
    Response {
        code: ending.code,
        details: (!details.is_empty()).then_some(details),
        duration_nanos: ending.duration_ms.map(|d| u64::from(d) * MS),
    }
}

fuzz_target!(|input: Input| {
    let config = Config::parse(pick(CONFIGS, input.config).as_bytes(), "fuzz").unwrap();
    let cb = CircuitBreaker::new(config);
    let store = MemoryStore::new();
    cb.create_tables(&store, T0);
    let mut now = T0;
    let mut in_flight = Vec::new();
    let finish = |call: &Call, ending: &Ending, now: u64| {
        let outcome = cb.classify(call, response(ending));
        if let Some(change) = cb.finish(&store, call, outcome, now) {
            cb.apply(&store, &change);
        }
    };
    for event in input.events.iter().take(64) {
        now += u64::from(event.advance_ms) * MS;
        let verdict = cb.check(&mut event.req.build("circuit-breaker"), &store, now);
        if let Some(change) = verdict.change() {
            cb.apply(&store, change);
        }
        match verdict {
            Verdict::Pass { call, .. } if event.finish_now => finish(&call, &event.ending, now),
            Verdict::Pass { call, .. } => in_flight.push((call, event.ending.clone())),
            Verdict::Reject {
                state,
                retry_after_secs,
                ..
            } => {
                assert!(retry_after_secs >= 1);
                let _ = CircuitBreaker::reject_headers(state, retry_after_secs);
            }
            // NoRule, FailedOpen (and what the core may add later): nothing to report.
            _ => {}
        }
    }
    for (call, ending) in &in_flight {
        now += MS;
        finish(call, ending, now);
    }
});
