//! Tests of the policy core against an in-memory store with Envoy's semantics.

use std::sync::Arc;

use mesh_shared::circuit::{self, CircuitState, CircuitStatus};
use mesh_shared::request::FakeRequest;
use mesh_shared::store::MemoryStore;
use mesh_shared::Attribute;
use proptest::prelude::*;

use super::*;

const SECOND: u64 = 1_000_000_000;

fn balancer(rules: &str, store: &MemoryStore, now: u64) -> Balancer {
    let config = Config::parse(format!(r#"{{"rules": [{rules}]}}"#).as_bytes(), "lb").unwrap();
    let mut b = Balancer::new(config);
    b.setup(store, now);
    b
}

/// A deterministic stream of random numbers (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn target_of(pick: Pick) -> usize {
    match pick {
        Pick::Target { target, .. } => target,
        other => panic!("expected a target, got {other:?}"),
    }
}

fn counts(
    b: &Balancer,
    store: &MemoryStore,
    n: usize,
    req: impl Fn(usize) -> FakeRequest,
) -> Vec<usize> {
    let mut rng = Rng(7);
    let mut out = vec![0; b.config.rules[0].targets.len()];
    for i in 0..n {
        out[target_of(b.pick(&mut req(i), store, 0, rng.next()))] += 1;
    }
    out
}

const CANARY: &str =
    r#"{"name": "canary", "targets": [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}]"#;

#[test]
fn weighted_round_robin_is_exact_across_workers() {
    // Two workers = two balancers (per-VM memory) over one shared store.
    let store = Arc::new(MemoryStore::new());
    let rule = format!(r#"{CANARY}, "algorithm": "weighted_round_robin"}}"#);
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let store = Arc::clone(&store);
            let rule = rule.clone();
            std::thread::spawn(move || {
                let b = balancer(&rule, &store, 0);
                let mut picks = [0usize; 2];
                for i in 0..500 {
                    picks[target_of(b.pick(&mut FakeRequest::new(), &*store, 0, w * 1000 + i))] +=
                        1;
                }
                picks
            })
        })
        .collect();
    let total = workers
        .into_iter()
        .map(|h| h.join().unwrap())
        .fold([0, 0], |a, b| [a[0] + b[0], a[1] + b[1]]);
    assert_eq!(total, [900, 100]);
}

#[test]
fn round_robin_alternates_and_skips_zero_weights() {
    let store = MemoryStore::new();
    let b = balancer(
        r#"{"name": "rr", "algorithm": "round_robin", "targets": [{"name": "a", "weight": 5}, {"name": "z", "weight": 0}, {"name": "b", "weight": 1}]}"#,
        &store,
        0,
    );
    let picks: Vec<usize> = (0..4)
        .map(|i| target_of(b.pick(&mut FakeRequest::new(), &store, 0, i)))
        .collect();
    assert_eq!(picks, vec![0, 2, 0, 2]);
}

#[test]
fn weighted_random_follows_the_weights() {
    let store = MemoryStore::new();
    let b = balancer(
        &format!(r#"{CANARY}, "algorithm": "weighted_random"}}"#),
        &store,
        0,
    );
    let c = counts(&b, &store, 10_000, |_| FakeRequest::new());
    // Binomial(10000, 0.1): sd 30; 99.9% bound is about 3.3 sd.
    assert!((900..=1100).contains(&c[1]), "{c:?}");
    let b = balancer(
        r#"{"name": "u", "algorithm": "random", "targets": [{"name": "a"}, {"name": "b", "weight": 7}]}"#,
        &store,
        0,
    );
    let c = counts(&b, &store, 10_000, |_| FakeRequest::new());
    assert!(
        (4800..=5200).contains(&c[0]),
        "random ignores the weight's size: {c:?}"
    );
}

#[test]
fn zero_weights_and_single_targets() {
    let store = MemoryStore::new();
    let b = balancer(
        r#"{"name": "one", "algorithm": "random", "targets": [{"name": "only"}]}"#,
        &store,
        0,
    );
    assert_eq!(counts(&b, &store, 100, |_| FakeRequest::new()), vec![100]);
    let b = balancer(
        r#"{"name": "none", "targets": [{"name": "a", "weight": 0}, {"name": "b", "weight": 0}]}"#,
        &store,
        0,
    );
    assert_eq!(
        b.pick(&mut FakeRequest::new(), &store, 0, 1),
        Pick::NoTarget { rule: 0 }
    );
}

#[test]
fn no_matching_rule_reads_nothing_more() {
    let store = MemoryStore::new();
    let b = balancer(
        r#"{"name": "r", "match": {"route": "reviews"}, "targets": [{"name": "a"}], "sticky": {"header": "x-user"}, "override": {"header": "x-force"}}"#,
        &store,
        0,
    );
    let mut req = FakeRequest::new().with(Attribute::Route, "other");
    assert_eq!(b.pick(&mut req, &store, 0, 1), Pick::NoRule);
    assert_eq!(req.lookups, 1);
}

#[test]
fn override_names_any_configured_target_and_nothing_else() {
    let store = MemoryStore::new();
    let b = balancer(
        r#"{"name": "r", "targets": [{"name": "v1", "weight": 1}, {"name": "v2", "weight": 0}], "override": {"header": "x-force"}}"#,
        &store,
        0,
    );
    let forced = b.pick(
        &mut FakeRequest::new().with_header("x-force", "v2"),
        &store,
        0,
        1,
    );
    assert_eq!(
        forced,
        Pick::Target {
            rule: 0,
            target: 1,
            how: How::Override,
            counted: false
        }
    );
    let bogus = b.pick(
        &mut FakeRequest::new().with_header("x-force", "v3"),
        &store,
        0,
        1,
    );
    assert_eq!(target_of(bogus), 0);
}

#[test]
fn sticky_keys_always_get_the_same_target() {
    let store = MemoryStore::new();
    let b = balancer(
        &format!(r#"{CANARY}, "algorithm": "sticky", "sticky": {{"cookie": "user"}}}}"#),
        &store,
        0,
    );
    for user in 0..200 {
        let req = || FakeRequest::new().with_header("cookie", format!("a=1; user=u{user}"));
        let first = target_of(b.pick(&mut req(), &store, 0, 1));
        for r in 0..5 {
            assert_eq!(target_of(b.pick(&mut req(), &store, 0, r * 77)), first);
        }
    }
    let c = counts(&b, &store, 10_000, |i| {
        FakeRequest::new().with_header("cookie", format!("user={i}"))
    });
    assert!(
        (900..=1100).contains(&c[1]),
        "sticky follows the weights: {c:?}"
    );
}

#[test]
fn sticky_key_missing_falls_back_to_the_algorithm() {
    let store = MemoryStore::new();
    let b = balancer(
        &format!(
            r#"{CANARY}, "algorithm": "weighted_round_robin", "sticky": {{"header": "x-user"}}}}"#
        ),
        &store,
        0,
    );
    assert_eq!(
        counts(&b, &store, 1000, |_| FakeRequest::new()),
        vec![900, 100]
    );
    let p = b.pick(
        &mut FakeRequest::new().with_header("x-user", "bob"),
        &store,
        0,
        1,
    );
    assert!(matches!(
        p,
        Pick::Target {
            how: How::Sticky,
            ..
        }
    ));
}

#[test]
fn ninety_ten_to_eighty_twenty_moves_about_ten_percent_one_way() {
    let targets = |w2: u32| {
        (
            vec![
                Target {
                    name: "v1".into(),
                    cluster: "v1".into(),
                },
                Target {
                    name: "v2".into(),
                    cluster: "v2".into(),
                },
            ],
            vec![100 - w2, w2],
        )
    };
    let (t, before) = targets(10);
    let (_, after) = targets(20);
    let mut moved = 0;
    for user in 0..10_000u32 {
        let key = user.to_le_bytes();
        let a = rendezvous(&key, &t, &before).unwrap();
        let b = rendezvous(&key, &t, &after).unwrap();
        assert!(!(a == 1 && b == 0), "user {user} moved from v2 back to v1");
        moved += usize::from(a != b);
    }
    // Exactly the share that must move is 10%; Binomial sd is 30.
    assert!((900..=1100).contains(&moved), "{moved} of 10000 moved");
}

proptest! {
    #[test]
    fn raising_one_weight_moves_users_only_to_that_target(
        weights in proptest::collection::vec(0u32..100, 2..6),
        which in 0usize..6,
        raise in 1u32..100,
    ) {
        let which = which % weights.len();
        let targets: Vec<Target> = (0..weights.len())
            .map(|i| Target { name: format!("t{i}"), cluster: format!("t{i}") })
            .collect();
        let mut raised = weights.clone();
        raised[which] += raise;
        for user in 0..300u32 {
            let key = format!("user-{user}");
            let a = rendezvous(key.as_bytes(), &targets, &weights);
            let b = rendezvous(key.as_bytes(), &targets, &raised);
            // Raising `which` moves a user to `which` or nowhere; lowering it back
            // (the reverse change) moves users only away from `which`.
            prop_assert!(a == b || b == Some(which), "{a:?} -> {b:?}");
        }
    }
}

#[test]
fn least_requests_avoids_busy_targets_and_releases_on_stream_end() {
    let store = MemoryStore::new();
    let b = balancer(
        r#"{"name": "lr", "algorithm": "least_requests", "targets": [{"name": "v1"}, {"name": "v2"}]}"#,
        &store,
        0,
    );
    let first = b.pick(&mut FakeRequest::new(), &store, 0, 1);
    let Pick::Target {
        target: busy,
        counted: true,
        ..
    } = first
    else {
        panic!("{first:?}")
    };
    let other = 1 - busy;
    // While `busy` holds one request, new ones go to the other, one at a time.
    for r in 0..20 {
        let p = b.pick(&mut FakeRequest::new(), &store, 0, r * 31);
        assert_eq!(target_of(p), other);
        b.release(&store, 0, other);
    }
    b.release(&store, 0, busy);
    assert_eq!(b.in_flight(&store, 0), vec![0, 0]);
    let c = counts(&b, &store, 0, |_| FakeRequest::new());
    assert_eq!(c, vec![0, 0]);
    // Idle again: ties are broken at random, so both get traffic.
    let mut seen = [false; 2];
    for r in 0..64u64 {
        let t = target_of(b.pick(
            &mut FakeRequest::new(),
            &store,
            0,
            r.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        ));
        seen[t] = true;
        b.release(&store, 0, t);
    }
    assert_eq!(seen, [true, true]);
    // Release never goes below zero.
    b.release(&store, 0, 0);
    assert_eq!(b.in_flight(&store, 0), vec![0, 0]);
}

#[test]
fn least_requests_respects_weights() {
    let store = MemoryStore::new();
    let b = balancer(
        r#"{"name": "lr", "algorithm": "least_requests", "targets": [{"name": "big", "weight": 3}, {"name": "small", "weight": 1}]}"#,
        &store,
        0,
    );
    // Never released: the counts grow in proportion to the weights.
    for r in 0..400 {
        b.pick(&mut FakeRequest::new(), &store, 0, r);
    }
    let c = b.in_flight(&store, 0);
    assert!((299..=301).contains(&c[0]), "{c:?}");
}

fn open_circuit(store: &MemoryStore, cluster: &str, until: u64) {
    circuit::publish(
        store,
        cluster,
        CircuitStatus {
            state: CircuitState::Open,
            open_until: until,
        },
    );
}

#[test]
fn open_circuits_are_skipped_while_another_target_is_available() {
    let store = MemoryStore::new();
    let b = balancer(
        r#"{"name": "c", "avoid_open_circuits": true, "targets": [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10, "cluster": "reviews-v2"}]}"#,
        &store,
        0,
    );
    open_circuit(&store, "reviews-v2", 10 * SECOND);
    let picks = |now| {
        (0..100)
            .map(|r| target_of(b.pick(&mut FakeRequest::new(), &store, now, r)))
            .filter(|t| *t == 1)
            .count()
    };
    assert_eq!(picks(SECOND), 0, "open v2 gets nothing");
    assert_eq!(
        picks(10 * SECOND),
        10,
        "due for half-open: v2 gets its share again"
    );
    // Every target open: the circuits cannot help, the weights decide.
    open_circuit(&store, "v1", 100 * SECOND);
    open_circuit(&store, "reviews-v2", 100 * SECOND);
    assert_eq!(picks(20 * SECOND), 10);
}

#[test]
fn circuits_are_ignored_unless_asked() {
    let store = MemoryStore::new();
    let b = balancer(&format!("{CANARY}}}"), &store, 0);
    open_circuit(&store, "v2", 10 * SECOND);
    assert_eq!(
        counts(&b, &store, 100, |_| FakeRequest::new()),
        vec![90, 10]
    );
}

#[test]
fn steps_move_weights_from_the_first_configuration() {
    let store = MemoryStore::new();
    let rule = r#"{"name": "s", "targets": [{"name": "v1", "weight": 1}, {"name": "v2", "weight": 0}],
        "steps": [{"after": "10s", "weights": {"v2": 1}}, {"after": "20s", "weights": {"v1": 0}}]}"#;
    let b = balancer(rule, &store, 100 * SECOND);
    assert_eq!(b.weights_at(0, 100 * SECOND), &[1, 0]);
    assert_eq!(b.weights_at(0, 109 * SECOND), &[1, 0]);
    assert_eq!(b.weights_at(0, 110 * SECOND), &[1, 1]);
    assert_eq!(b.weights_at(0, 125 * SECOND), &[0, 1]);
    // A second worker configured later keeps the first one's start.
    let late = balancer(rule, &store, 105 * SECOND);
    assert_eq!(late.weights_at(0, 110 * SECOND), &[1, 1]);
    let picks: Vec<usize> = (0..4)
        .map(|r| target_of(late.pick(&mut FakeRequest::new(), &store, 111 * SECOND, r)))
        .collect();
    assert_eq!(picks, vec![0, 1, 0, 1]);
    assert_eq!(
        target_of(late.pick(&mut FakeRequest::new(), &store, 120 * SECOND, 1)),
        1
    );
}

#[test]
fn setup_creates_every_key_before_traffic() {
    let store = MemoryStore::new();
    balancer(
        r#"{"name": "a", "algorithm": "least_requests", "targets": [{"name": "v1"}], "steps": [{"after": "1s", "weights": {"v1": 2}}]},
           {"name": "b", "algorithm": "round_robin", "targets": [{"name": "v1"}]},
           {"name": "c", "algorithm": "weighted_random", "targets": [{"name": "v1"}]}"#,
        &store,
        0,
    );
    let mut keys: Vec<String> = store.snapshot().into_iter().map(|(k, _)| k).collect();
    keys.sort();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(
        keys[0].ends_with("inflight") && keys[1].ends_with("start") && keys[2].ends_with("seq")
    );
}

/// A configuration that `reads_clock` says is time-free picks the same
/// whatever the clock says: the module then passes 0 and skips the host call.
#[test]
fn a_pick_depends_on_the_clock_only_when_reads_clock_says_so() {
    let free = [
        format!(r#"{CANARY}, "algorithm": "sticky", "sticky": {{"header": "x-user-id"}}}}"#),
        format!(r#"{CANARY}, "algorithm": "weighted_round_robin"}}"#),
        format!(r#"{CANARY}, "steps": [{{"after": "0s", "weights": {{"v2": 50}}}}]}}"#),
    ];
    for rule in &free {
        let (early, late) = (MemoryStore::new(), MemoryStore::new());
        let (a, b) = (balancer(rule, &early, 0), balancer(rule, &late, 0));
        assert!(!a.config.reads_clock(), "{rule}");
        let mut rng = Rng(3);
        for i in 0..200 {
            let random = rng.next();
            let req = || FakeRequest::new().with_header("x-user-id", format!("u{i}"));
            let at_zero = target_of(a.pick(&mut req(), &early, 0, random));
            let at_a_day = target_of(b.pick(&mut req(), &late, 86_400 * SECOND, random));
            assert_eq!(at_zero, at_a_day, "{rule}, request {i}");
        }
    }
    let timed = [
        format!(r#"{CANARY}, "steps": [{{"after": "10s", "weights": {{"v2": 50}}}}]}}"#),
        format!(r#"{CANARY}, "avoid_open_circuits": true}}"#),
    ];
    for rule in &timed {
        assert!(
            balancer(rule, &MemoryStore::new(), 0).config.reads_clock(),
            "{rule}"
        );
    }
}
