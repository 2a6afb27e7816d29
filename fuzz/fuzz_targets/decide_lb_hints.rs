//! lb-hints' core (`Balancer::pick` / `release`) fed arbitrary requests
//! (sticky keys, override and routing headers), random numbers and circuit
//! states over time, against configurations with every algorithm and steps.
#![no_main]
use lb_hints::{Balancer, Config, Pick};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use mesh_fuzz::{pick, Event, MS, T0};
use mesh_shared::circuit::{publish, CircuitState, CircuitStatus};
use mesh_shared::store::MemoryStore;

const CONFIGS: &[&str] = &[
    r#"{"rules": [
        {"name": "canary", "match": {"path_prefix": "/r"}, "header": "x-mesh-target",
         "targets": [{"name": "v1", "weight": 90, "cluster": "c1"}, {"name": "v2", "weight": 10, "cluster": "c2"}],
         "algorithm": "weighted_round_robin", "override": {"header": "x-mesh-force-target"},
         "steps": [{"after": "1s", "weights": {"v2": 50}}, {"after": "3s", "weights": {"v1": 0, "v2": 100}}],
         "avoid_open_circuits": true},
        {"name": "sticky", "targets": [{"name": "a", "weight": 1}, {"name": "b", "weight": 2}, {"name": "c", "weight": 0}],
         "algorithm": "weighted_random", "sticky": {"header": "x-user-id"}, "no_target": "pass"}]}"#,
    r#"{"rules": [
        {"name": "least", "match": {"methods": ["GET"]}, "targets": [{"name": "v1", "cluster": "c1"}, {"name": "v2", "cluster": "c2"}],
         "algorithm": "least_requests", "avoid_open_circuits": true},
        {"name": "rr", "targets": [{"name": "x", "weight": 3}, {"name": "y", "weight": 1}],
         "algorithm": "round_robin", "sticky": {"cookie": "session"}},
        {"name": "random", "targets": [{"name": "only", "weight": 1}], "algorithm": "random"}]}"#,
];

#[derive(Arbitrary, Debug)]
struct Step {
    event: Event,
    /// Before the request: publish this state for cluster c1 or c2.
    circuit: Option<(bool, u8, u32)>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    config: u8,
    steps: Vec<Step>,
}

fuzz_target!(|input: Input| {
    let config = Config::parse(pick(CONFIGS, input.config).as_bytes(), "fuzz").unwrap();
    let mut balancer = Balancer::new(config);
    let store = MemoryStore::new();
    balancer.setup(&store, T0);
    let mut now = T0;
    let mut counted = Vec::new();
    for step in input.steps.iter().take(64) {
        now += u64::from(step.event.advance_ms) * MS;
        if let Some((first, state, open_ms)) = step.circuit {
            let state = match state % 3 {
                0 => CircuitState::Closed,
                1 => CircuitState::Open,
                _ => CircuitState::HalfOpen,
            };
            let status = CircuitStatus {
                state,
                open_until: now + u64::from(open_ms) * MS,
            };
            publish(&store, if first { "c1" } else { "c2" }, status);
        }
        let req = &mut step.event.req.build("lb-hints");
        match balancer.pick(req, &store, now, step.event.random) {
            Pick::Target {
                rule,
                target,
                counted: true,
                ..
            } => {
                assert!(target < balancer.config.rules[rule].targets.len());
                if step.event.finish_now {
                    balancer.release(&store, rule, target);
                } else {
                    counted.push((rule, target));
                }
            }
            Pick::Target { rule, target, .. } => {
                assert!(target < balancer.config.rules[rule].targets.len());
            }
            Pick::NoRule | Pick::NoTarget { .. } => {}
        }
    }
    for (rule, target) in counted {
        balancer.release(&store, rule, target);
    }
    // Every counted pick was released: nothing may stay in flight.
    for rule in 0..balancer.config.rules.len() {
        assert!(balancer.in_flight(&store, rule).iter().all(|n| *n == 0));
    }
});
