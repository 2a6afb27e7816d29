//! mesh_shared::Matcher: an arbitrary `match` block, then an arbitrary request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_shared::config::parse_document;
use mesh_shared::{Matcher, Node};

fuzz_target!(|input: (String, mesh_fuzz::Req)| {
    let (config, req) = input;
    let Ok(doc) = parse_document(config.as_bytes()) else {
        return;
    };
    let Ok(matcher) = Matcher::parse(Some(&Node::root(&doc))) else {
        return;
    };
    let _ = matcher.matches(&mut req.build("matcher"));
});
