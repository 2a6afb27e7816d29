//! mesh_shared::json::parse on arbitrary bytes (every configuration goes through it).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mesh_shared::json::parse(data);
});
