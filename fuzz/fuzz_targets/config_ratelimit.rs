//! ratelimit's configuration parser on arbitrary bytes; a configuration it
//! accepts must also build its tables and decide one request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_shared::request::FakeRequest;
use mesh_shared::store::MemoryStore;
use ratelimit::{CallOutcome, Check, Config, RateLimiter};

fuzz_target!(|data: &[u8]| {
    let Ok(config) = Config::parse(data, "fuzz") else {
        return;
    };
    // Huge tables (the default is 100 000 keys per rule) are valid but make
    // every run crawl; the table's bound is tested in the crate and in Envoy.
    if config.table_slots() > 4096 {
        return;
    }
    let limiter = RateLimiter::new(config);
    let store = MemoryStore::new();
    limiter.create_tables(&store);
    let verdict = match limiter.check(&mut FakeRequest::new(), &store, mesh_fuzz::T0) {
        Check::Done(verdict) => verdict,
        // A global rule: conclude as if the call failed.
        Check::Ask(call) => limiter.conclude(&call, CallOutcome::Failed, &store, mesh_fuzz::T0),
    };
    let _ = limiter.headers(&verdict);
    let _ = limiter.response(&verdict);
});
