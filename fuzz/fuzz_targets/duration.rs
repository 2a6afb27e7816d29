//! mesh_shared::duration::parse_duration on arbitrary text; what it accepts,
//! format_duration writes back so that it parses to the same duration.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_shared::duration::{format_duration, parse_duration};

fuzz_target!(|text: &str| {
    if let Ok(d) = parse_duration(text) {
        let written = format_duration(d);
        assert_eq!(parse_duration(&written), Ok(d), "{text:?} -> {written:?}");
    }
});
