//! metrics' configuration parser on arbitrary bytes; a configuration it
//! accepts must also label one request and define its series.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_fuzz::metrics_host::FakeHost;
use mesh_shared::request::FakeRequest;
use mesh_shared::store::MemoryStore;
use metrics::{Budget, Config, Registry};

fuzz_target!(|data: &[u8]| {
    let Ok(config) = Config::parse(data) else {
        return;
    };
    let labels = config.labels.clone();
    let mut registry = Registry::new(config.labels.clone(), Budget::new("fuzz", &config));
    let (store, mut host) = (MemoryStore::new(), FakeHost::default());
    let key = labels.request_key(&mut FakeRequest::new());
    let _ = registry.gauge(&key, &store, &mut host);
    let _ = registry.series(&key, labels.status_key(Some(200)), &store, &mut host);
});
