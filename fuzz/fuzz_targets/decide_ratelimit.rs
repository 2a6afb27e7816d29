//! ratelimit's core (`RateLimiter::check`) fed arbitrary header, attribute and
//! route-metadata values over time, against configurations that use every
//! key source, tiny tables (overflow) and route metadata, and global rules
//! whose calls end as OK, OVER_LIMIT (remembered for a second) or failed.
#![no_main]
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use mesh_fuzz::{pick, Event, MS, T0};
use mesh_shared::store::MemoryStore;
use ratelimit::{CallOutcome, Check, Config, RateLimiter};

/// `RateLimitResponse` bytes: OK, and OVER_LIMIT with a 1 s reset.
const OK: &[u8] = &[0x08, 0x01];
const OVER: &[u8] = &[0x08, 0x02, 0x12, 0x06, 0x08, 0x02, 0x22, 0x02, 0x08, 0x01];

const CONFIGS: &[&str] = &[
    r#"{"rules": [
        {"name": "api", "match": {"path_prefix": "/api", "methods": ["GET", "POST"]},
         "key": [{"header": "x-api-key"}, "client_ip"], "limit": {"requests": 3, "per": "1s", "burst": 2},
         "on_missing_key": "deny", "max_keys": 4},
        {"name": "tenant", "match": {"headers": {"x-tenant": {"present": true}}},
         "key": [{"cookie": "session"}, "path", "host"], "limit": {"requests": 1, "per": "250ms"},
         "on_missing_key": {"static": "anon"}, "shadow": true},
        {"name": "all", "key": ["route", "cluster", "method"], "limit": {"requests": 100, "per": "1h", "burst": 1}}],
      "headers": "draft", "headers_on_allowed": true, "max_keys": 16, "route_metadata": true}"#,
    r#"{"rules": [
        {"name": "hosts", "match": {"host": "*.example.com", "route": ["a", "b"]},
         "key": [{"header": "x-user-id"}], "limit": {"requests": 5, "per": "1m", "burst": 10}},
        {"name": "exact", "match": {"path_exact": "/login", "headers": {"x-api-key": "secret"}},
         "limit": {"requests": 1, "per": "1h"}}],
      "response": {"status": 503, "body": "slow down\n"}, "headers": "x-ratelimit", "max_keys": 2}"#,
    r#"{"rules": [
        {"name": "deny", "match": {"path_prefix": "/d"}, "key": [{"header": "x-user-id"}, "client_ip"],
         "global": {"service": "rls", "domain": "mesh", "failure_mode": "deny"}, "max_keys": 3},
        {"name": "shadow", "match": {"methods": ["POST"]}, "shadow": true,
         "global": {"service": "rls", "domain": "mesh"}},
        {"name": "both", "key": [{"cookie": "session"}], "on_missing_key": {"static": "anon"},
         "limit": {"requests": 2, "per": "1s"}, "global": {"service": "rls", "domain": "mesh"}}],
      "headers_on_allowed": true, "max_keys": 4}"#,
];

#[derive(Arbitrary, Debug)]
struct Input {
    config: u8,
    events: Vec<Event>,
}

fuzz_target!(|input: Input| {
    let config = Config::parse(pick(CONFIGS, input.config).as_bytes(), "fuzz").unwrap();
    let limiter = RateLimiter::new(config);
    let store = MemoryStore::new();
    limiter.create_tables(&store);
    let mut now = T0;
    for event in input.events.iter().take(64) {
        now += u64::from(event.advance_ms) * MS;
        let verdict = match limiter.check(&mut event.req.build("ratelimit"), &store, now) {
            Check::Done(verdict) => verdict,
            Check::Ask(call) => {
                let outcome = match event.advance_ms % 3 {
                    0 => CallOutcome::Answered(OK),
                    1 => CallOutcome::Answered(OVER),
                    _ => CallOutcome::Failed,
                };
                limiter.conclude(&call, outcome, &store, now)
            }
        };
        if let Some(rule) = verdict.rule() {
            assert!(rule < limiter.config.rules.len());
        }
        let _ = limiter.headers(&verdict);
        let _ = limiter.response(&verdict);
    }
});
