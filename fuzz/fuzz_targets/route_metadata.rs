//! mesh_shared::route_metadata on arbitrary bytes (Envoy hands the route's
//! metadata struct over in proxy-wasm's pair encoding).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_shared::route_metadata::{decode_pairs, parse};

fuzz_target!(|data: &[u8]| {
    if let Some(pairs) = decode_pairs(data) {
        assert!(pairs.len() <= data.len() / 8);
    }
    let _ = parse(Some(data));
});
