//! mesh_shared::Matcher: an arbitrary `match` block, then an arbitrary request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_shared::matcher::MatchSpec;
use mesh_shared::spec::parse_fragment;
use mesh_shared::Matcher;

fuzz_target!(|input: (String, mesh_fuzz::Req)| {
    let (config, req) = input;
    let Ok(spec) = parse_fragment::<MatchSpec>(config.as_bytes()) else {
        return;
    };
    let matcher = Matcher::compile(Some(spec));
    let _ = matcher.matches(&mut req.build("matcher"));
});
