//! circuit-breaker's configuration parser on arbitrary bytes; a configuration
//! it accepts must also build its tables and decide one request.
#![no_main]
use circuit_breaker::{CircuitBreaker, Config};
use libfuzzer_sys::fuzz_target;
use mesh_shared::request::FakeRequest;
use mesh_shared::store::MemoryStore;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = Config::parse(data, "fuzz") else {
        return;
    };
    if config.rules.len() > 8 {
        return;
    }
    let cb = CircuitBreaker::new(config);
    let store = MemoryStore::new();
    cb.create_tables(&store, mesh_fuzz::T0);
    let _ = cb.check(&mut FakeRequest::new(), &store, mesh_fuzz::T0);
});
