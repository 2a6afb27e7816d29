//! mesh_shared::spec::parse (serde_json under every configuration) on arbitrary
//! bytes, read into a plain JSON value: any nesting, any size.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mesh_shared::spec::parse::<serde_json::Value>(data);
});
