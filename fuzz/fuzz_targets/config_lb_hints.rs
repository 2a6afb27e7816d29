//! lb-hints' configuration parser on arbitrary bytes; a configuration it
//! accepts must also set up its shared keys and pick for one request.
#![no_main]
use lb_hints::{Balancer, Config};
use libfuzzer_sys::fuzz_target;
use mesh_shared::request::FakeRequest;
use mesh_shared::store::MemoryStore;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = Config::parse(data, "fuzz") else {
        return;
    };
    let mut balancer = Balancer::new(config);
    let store = MemoryStore::new();
    balancer.setup(&store, mesh_fuzz::T0);
    let _ = balancer.pick(
        &mut FakeRequest::new(),
        &store,
        mesh_fuzz::T0,
        0x9e37_79b9_7f4a_7c15,
    );
});
