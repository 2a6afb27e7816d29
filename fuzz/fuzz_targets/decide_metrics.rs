//! metrics' core fed arbitrary requests and statuses: request-side label
//! values (`request_key`), the status part, and the series registry with a
//! small `max_series`, whose bound must hold whatever the values.
#![no_main]
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use mesh_fuzz::metrics_host::FakeHost;
use mesh_fuzz::{pick, Event};
use mesh_shared::store::MemoryStore;
use metrics::{Budget, Config, Registry};

const CONFIGS: &[&str] = &[
    r#"{"prefix": "mesh", "labels": {"route": true, "method": true, "status_class": true, "cluster": true,
        "custom": [{"name": "tenant", "header": "x-tenant", "allowed": ["gold", "silver"], "other": "other"},
                   {"name": "user", "header": "x-user-id"}]},
      "max_series": 8}"#,
    r#"{"labels": {"route": false, "method": true, "status_code": true, "status_class": false, "cluster": false,
        "custom": [{"name": "key", "header": "x-api-key"}]},
      "duration_buckets_ms": [1, 10, 100], "max_series": 3}"#,
];

#[derive(Arbitrary, Debug)]
struct Input {
    config: u8,
    events: Vec<Event>,
}

fuzz_target!(|input: Input| {
    let config = Config::parse(pick(CONFIGS, input.config).as_bytes()).unwrap();
    let labels = config.labels.clone();
    let max_series = config.max_series;
    let mut registry = Registry::new(config.labels.clone(), Budget::new("fuzz", &config));
    let (store, mut host) = (MemoryStore::new(), FakeHost::default());
    for event in input.events.iter().take(64) {
        let key = labels.request_key(&mut event.req.build("metrics"));
        let _ = registry.gauge(&key, &store, &mut host);
        let status = labels.status_key(event.ending.code);
        let _ = registry.series(&key, status, &store, &mut host);
    }
    // Admitted label sets, plus at most one overflow gauge and one overflow series.
    let defined = host.defined.len() as u64;
    assert!(
        defined <= max_series + 2,
        "{defined} series for max_series {max_series}"
    );
});
