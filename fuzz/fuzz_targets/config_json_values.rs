//! Every filter's configuration parser on arbitrary JSON values (keys and
//! strings often the known ones, so deep fields are reached), as the document
//! and as one rule of it; a configuration a filter accepts must build its core.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_shared::store::MemoryStore;

fn parse_all(bytes: &[u8]) {
    if let Ok(config) = ratelimit::Config::parse(bytes, "fuzz") {
        if config.table_slots() <= 4096 {
            ratelimit::RateLimiter::new(config).create_tables(&MemoryStore::new());
        }
    }
    let _ = circuit_breaker::Config::parse(bytes, "fuzz");
    let _ = lb_hints::Config::parse(bytes, "fuzz");
    let _ = metrics::Config::parse(bytes);
}

fuzz_target!(|value: mesh_fuzz::Json| {
    let value = value.to_value();
    parse_all(value.to_string().as_bytes());
    let as_rule = serde_json::json!({ "rules": [value] });
    parse_all(as_rule.to_string().as_bytes());
});
