//! The circuit-breaker filter in a real Envoy (2 workers) in front of a real upstream.

use std::time::{Duration, Instant};

use mesh_testkit::envoy::assert_config_refused_in;
use mesh_testkit::http::{self, Client};
use mesh_testkit::{
    both_forms, concurrent_gets, Behaviour, Bootstrap, Envoy, Form, Upstream, WasmFilter,
};

/// Envoy with one circuit-breaker filter configured with `config`; routes
/// `payments` (/payments), `timeout` (/timeout, route timeout 500ms) and
/// `open` (everything else), all to one upstream.
fn envoy_with(form: Form, config: &str) -> (Envoy, Upstream) {
    let upstream = Upstream::start("backend");
    let envoy = Envoy::start(
        &Bootstrap::in_form(form)
            .wasm(WasmFilter::new("circuit-breaker", config))
            .route("payments", "/payments", "backend")
            .route_with("timeout", "/timeout", "backend", r#""timeout": "0.5s""#)
            .route("open", "/", "backend")
            .cluster("backend", upstream.port())
            .yaml(),
    );
    (envoy, upstream)
}

fn failing() -> Behaviour {
    Behaviour {
        status: 503,
        ..Behaviour::default()
    }
}

/// The local answer of an open breaker, as a client sees it.
fn is_circuit_open(r: &http::Response) -> bool {
    r.status == 503
        && r.header("x-mesh-circuit") == Some("open")
        && r.body_text() == "circuit open\n"
}

fn from_upstream(r: &http::Response) -> bool {
    r.header("x-served-by") == Some("backend") && r.header("x-mesh-circuit").is_none()
}

fn metric(envoy: &Envoy, name: &str, rule: &str) -> Option<f64> {
    envoy.metric(name, &[("rule", rule)])
}

fn calls(envoy: &Envoy, rule: &str, outcome: &str) -> Option<f64> {
    envoy.metric(
        "mesh_circuit_calls_total",
        &[("rule", rule), ("outcome", outcome)],
    )
}

/// Waits (polling, up to a generous minute) until `condition` holds.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const PAYMENTS: &str = r#"{"rules": [{
    "name": "payments", "match": {"route": "payments"},
    "window": {"kind": "count", "size": 20}, "minimum_calls": 10, "failure_rate_percent": 50,
    "open_for": "1h", "half_open_calls": 3}]}"#;

both_forms!(a_failing_upstream_opens_the_breaker_and_the_next_100_never_reach_it);
fn a_failing_upstream_opens_the_breaker_and_the_next_100_never_reach_it(form: Form) {
    let (envoy, upstream) = envoy_with(form, PAYMENTS);
    upstream.set_behaviour(failing());
    let mut c = Client::new(envoy.port());
    for i in 0..10 {
        let r = c.get("/payments/charge", &[]).unwrap();
        assert!(from_upstream(&r) && r.status == 503, "call {i}: {r:?}");
    }
    assert_eq!(upstream.requests(), 10);
    assert_eq!(metric(&envoy, "mesh_circuit_state", "payments"), Some(1.0));
    assert_eq!(
        metric(&envoy, "mesh_circuit_opened_total", "payments"),
        Some(1.0)
    );
    assert_eq!(calls(&envoy, "payments", "failure"), Some(10.0));

    let responses = concurrent_gets(envoy.port(), "/payments/charge", &[], 10, 100);
    assert_eq!(responses.len(), 100);
    for r in &responses {
        let r = r.as_ref().unwrap();
        assert!(is_circuit_open(r), "{r:?}");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((3000..=3600).contains(&retry), "retry-after {retry}");
    }
    assert_eq!(
        upstream.requests(),
        10,
        "the upstream must see nothing while open"
    );
    assert_eq!(
        metric(&envoy, "mesh_circuit_rejected_total", "payments"),
        Some(100.0)
    );
    assert_eq!(calls(&envoy, "payments", "failure"), Some(10.0));
}

/// Opens the breaker of route `payments` (10 upstream failures), then waits
/// out `open_for` (2s) with the upstream answering 200 after `delay`.
fn open_then_wait(envoy: &Envoy, upstream: &Upstream, delay: Duration) {
    upstream.set_behaviour(failing());
    let mut c = Client::new(envoy.port());
    for _ in 0..10 {
        assert_eq!(c.get("/payments", &[]).unwrap().status, 503);
    }
    assert!(is_circuit_open(&c.get("/payments", &[]).unwrap()));
    upstream.set_behaviour(Behaviour {
        delay,
        ..Behaviour::default()
    });
    // open_for is 2s; the breaker stays open until a request comes after it.
    std::thread::sleep(Duration::from_secs(3));
}

const PROBING: &str = r#"{"rules": [{
    "name": "payments", "match": {"route": "payments"},
    "window": {"kind": "count", "size": 20}, "minimum_calls": 10, "failure_rate_percent": 50,
    "open_for": "2s", "half_open_calls": 3}]}"#;

both_forms!(half_open_lets_exactly_the_probes_through_then_closes_when_they_succeed);
fn half_open_lets_exactly_the_probes_through_then_closes_when_they_succeed(form: Form) {
    let (envoy, upstream) = envoy_with(form, PROBING);
    // The probes take 5s, so all 20 requests arrive while they are in flight.
    open_then_wait(&envoy, &upstream, Duration::from_secs(5));
    let before = upstream.requests();
    let responses = concurrent_gets(envoy.port(), "/payments", &[], 20, 20);
    let responses: Vec<http::Response> = responses.into_iter().map(Result::unwrap).collect();
    let probes = responses
        .iter()
        .filter(|r| from_upstream(r) && r.status == 200)
        .count();
    let rejected = responses
        .iter()
        .filter(|r| r.status == 503 && r.header("x-mesh-circuit").is_some())
        .count();
    assert_eq!((probes, rejected), (3, 17), "{responses:?}");
    assert_eq!(upstream.requests() - before, 3);
    // All three succeeded: closed, and traffic flows.
    assert_eq!(metric(&envoy, "mesh_circuit_state", "payments"), Some(0.0));
    upstream.set_behaviour(Behaviour::default());
    let after = concurrent_gets(envoy.port(), "/payments", &[], 4, 40);
    assert!(after.iter().all(|r| r
        .as_ref()
        .is_ok_and(|r| from_upstream(r) && r.status == 200)));
    assert_eq!(upstream.requests() - before, 43);
}

const FOUR_PROBES: &str = r#"{"rules": [{
    "name": "payments", "match": {"route": "payments"},
    "window": {"kind": "count", "size": 20}, "minimum_calls": 10, "failure_rate_percent": 50,
    "open_for": "2s", "half_open_calls": 4}]}"#;

/// Sends four requests at once, each on its own connection (Envoy spreads
/// connections over its two workers); the first `failing` get a 500 from
/// the upstream. All answer after 500ms, so all four are in flight together.
fn four_at_once(envoy: &Envoy, failing: usize) -> Vec<http::Response> {
    let port = envoy.port();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let status = if i < failing { "500" } else { "200" };
                Client::new(port)
                    .get(
                        "/payments",
                        &[
                            ("x-upstream-status", status),
                            ("x-upstream-delay-ms", "500"),
                        ],
                    )
                    .unwrap()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

both_forms!(four_probes_at_50_percent_one_failure_closes_two_open);
fn four_probes_at_50_percent_one_failure_closes_two_open(form: Form) {
    // Resilience4j's rule (the default): once all probes have answered, their
    // failure rate decides. 1 of 4 is 25% (< 50%): closed; 2 of 4: open again.
    for (failing, closes) in [(1, true), (2, false)] {
        let (envoy, upstream) = envoy_with(form, FOUR_PROBES);
        open_then_wait(&envoy, &upstream, Duration::ZERO);
        let before = upstream.requests();
        let probes = four_at_once(&envoy, failing);
        let failed = probes
            .iter()
            .filter(|r| from_upstream(r) && r.status == 500)
            .count();
        let ok = probes
            .iter()
            .filter(|r| from_upstream(r) && r.status == 200)
            .count();
        assert_eq!((failed, ok), (failing, 4 - failing), "{probes:?}");
        assert_eq!(upstream.requests() - before, 4);
        let mut c = Client::new(envoy.port());
        if closes {
            wait_until("the state gauge shows closed", || {
                metric(&envoy, "mesh_circuit_state", "payments") == Some(0.0)
            });
            for _ in 0..10 {
                let r = c.get("/payments", &[]).unwrap();
                assert!(from_upstream(&r) && r.status == 200, "{r:?}");
            }
            assert_eq!(upstream.requests() - before, 14);
            assert_eq!(
                metric(&envoy, "mesh_circuit_opened_total", "payments"),
                Some(1.0)
            );
        } else {
            wait_until("the state gauge shows open", || {
                metric(&envoy, "mesh_circuit_state", "payments") == Some(1.0)
            });
            for _ in 0..5 {
                assert!(is_circuit_open(&c.get("/payments", &[]).unwrap()));
            }
            assert_eq!(upstream.requests() - before, 4);
            assert_eq!(
                metric(&envoy, "mesh_circuit_opened_total", "payments"),
                Some(2.0)
            );
        }
    }
}

both_forms!(any_failure_policy_reopens_at_the_first_failed_probe);
fn any_failure_policy_reopens_at_the_first_failed_probe(form: Form) {
    let (envoy, upstream) = envoy_with(
        form,
        &PROBING.replace(
            r#""half_open_calls": 3"#,
            r#""half_open_calls": 3, "half_open_policy": "any_failure""#,
        ),
    );
    open_then_wait(&envoy, &upstream, Duration::ZERO);
    let mut c = Client::new(envoy.port());
    let before = upstream.requests();
    let probe = c.get("/payments", &[("x-upstream-status", "500")]).unwrap();
    assert!(from_upstream(&probe) && probe.status == 500, "{probe:?}");
    // Open again for open_for (2s): a few requests right after get the local answer.
    for _ in 0..5 {
        let r = c.get("/payments", &[]).unwrap();
        assert!(is_circuit_open(&r), "{r:?}");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=2).contains(&retry), "retry-after {retry}");
    }
    assert_eq!(upstream.requests() - before, 1);
    assert_eq!(
        metric(&envoy, "mesh_circuit_opened_total", "payments"),
        Some(2.0)
    );
    assert_eq!(metric(&envoy, "mesh_circuit_state", "payments"), Some(1.0));
}

both_forms!(upstream_resets_and_route_timeouts_count_as_failures);
fn upstream_resets_and_route_timeouts_count_as_failures(form: Form) {
    let (envoy, upstream) = envoy_with(
        form,
        r#"{"rules": [
            {"name": "resets", "match": {"route": "payments"}, "consecutive_failures": 2, "open_for": "1h"},
            {"name": "timeouts", "match": {"route": "timeout"}, "consecutive_failures": 2, "open_for": "1h"}]}"#,
    );
    let mut c = Client::new(envoy.port());
    for _ in 0..2 {
        let r = c.get("/payments", &[("x-upstream-reset", "1")]).unwrap();
        assert_eq!(r.status, 503, "Envoy answers a reset with 503: {r:?}");
        assert!(r.header("x-mesh-circuit").is_none());
    }
    assert!(is_circuit_open(&c.get("/payments", &[]).unwrap()));
    assert_eq!(calls(&envoy, "resets", "failure"), Some(2.0));

    // The route timeout is 500ms; the upstream takes 3s.
    for _ in 0..2 {
        let r = c
            .get("/timeout", &[("x-upstream-delay-ms", "3000")])
            .unwrap();
        assert_eq!(r.status, 504, "{r:?}");
    }
    assert!(is_circuit_open(&c.get("/timeout", &[]).unwrap()));
    assert_eq!(calls(&envoy, "timeouts", "failure"), Some(2.0));
    assert_eq!(upstream.requests(), 4);
}

both_forms!(a_slow_upstream_trips_the_slow_call_rule);
fn a_slow_upstream_trips_the_slow_call_rule(form: Form) {
    let (envoy, upstream) = envoy_with(
        form,
        r#"{"rules": [{"name": "slow", "window": {"kind": "count", "size": 4}, "minimum_calls": 4,
            "slow_call": {"duration": "200ms", "rate_percent": 100}, "open_for": "1h"}]}"#,
    );
    upstream.set_behaviour(Behaviour {
        delay: Duration::from_millis(400),
        ..Behaviour::default()
    });
    let mut c = Client::new(envoy.port());
    for _ in 0..4 {
        let r = c.get("/anything", &[]).unwrap();
        assert!(from_upstream(&r) && r.status == 200, "{r:?}");
    }
    assert!(is_circuit_open(&c.get("/anything", &[]).unwrap()));
    assert_eq!(calls(&envoy, "slow", "slow"), Some(4.0));
    assert_eq!(calls(&envoy, "slow", "failure"), Some(0.0));
    assert_eq!(upstream.requests(), 4);
}

both_forms!(header_scope_keeps_tenants_apart);
fn header_scope_keeps_tenants_apart(form: Form) {
    let (envoy, upstream) = envoy_with(
        form,
        r#"{"rules": [{"name": "tenants", "scope": {"header": "x-tenant"}, "consecutive_failures": 2, "open_for": "1h"}]}"#,
    );
    let mut c = Client::new(envoy.port());
    for _ in 0..2 {
        let r = c
            .get("/", &[("x-tenant", "bad"), ("x-upstream-status", "500")])
            .unwrap();
        assert!(from_upstream(&r) && r.status == 500);
    }
    assert!(is_circuit_open(
        &c.get("/", &[("x-tenant", "bad")]).unwrap()
    ));
    let good = concurrent_gets(envoy.port(), "/", &[("x-tenant", "good")], 4, 40);
    assert!(good.iter().all(|r| r
        .as_ref()
        .is_ok_and(|r| from_upstream(r) && r.status == 200)));
    // Requests without the header are not subject to the rule.
    assert!(from_upstream(&c.get("/", &[]).unwrap()));
    assert_eq!(upstream.requests(), 43);
    // One of the rule's breakers is open: the rule's state gauge shows the worst.
    assert_eq!(metric(&envoy, "mesh_circuit_state", "tenants"), Some(1.0));
    assert_eq!(
        metric(&envoy, "mesh_circuit_open_breakers", "tenants"),
        Some(1.0)
    );
}

both_forms!(a_route_without_a_rule_is_untouched);
fn a_route_without_a_rule_is_untouched(form: Form) {
    let (envoy, upstream) = envoy_with(
        form,
        r#"{"rules": [{"name": "payments", "match": {"route": "payments"}, "consecutive_failures": 1, "open_for": "1h"}]}"#,
    );
    upstream.set_behaviour(failing());
    let responses = concurrent_gets(envoy.port(), "/catalog", &[], 4, 50);
    assert!(responses.iter().all(|r| r
        .as_ref()
        .is_ok_and(|r| from_upstream(r) && r.status == 503)));
    assert_eq!(upstream.requests(), 50);
    assert_eq!(calls(&envoy, "payments", "failure"), Some(0.0));
    assert_eq!(metric(&envoy, "mesh_circuit_state", "payments"), Some(0.0));
}

both_forms!(the_state_gauge_follows_the_breaker_through_half_open);
fn the_state_gauge_follows_the_breaker_through_half_open(form: Form) {
    let (envoy, upstream) = envoy_with(form, PROBING);
    open_then_wait(&envoy, &upstream, Duration::from_secs(5));
    assert_eq!(metric(&envoy, "mesh_circuit_state", "payments"), Some(1.0));
    // A probe in flight: half-open until it answers.
    let port = envoy.port();
    let probe = std::thread::spawn(move || http::get(port, "/payments", &[]).unwrap());
    wait_until("the probe reaches the upstream", || {
        upstream.in_flight() == 1
    });
    assert_eq!(metric(&envoy, "mesh_circuit_state", "payments"), Some(2.0));
    assert_eq!(probe.join().unwrap().status, 200);
}

both_forms!(bad_config_is_refused_with_the_json_path_and_envoy_does_not_start);
fn bad_config_is_refused_with_the_json_path_and_envoy_does_not_start(form: Form) {
    let cases = [
        (
            r#"{"rules": [{"name": "a", "open_for": "soon"}]}"#,
            r#"circuit-breaker: rules[0].open_for: expected a duration like "1s", got "soon""#,
        ),
        (
            r#"{"rules": [{"name": "a", "window": {"kind": "count", "size": 0}}]}"#,
            "circuit-breaker: rules[0].window.size: expected an integer from 1 to 1000, got 0",
        ),
        (
            r#"{"rules": [{"name": "a", "failure_when": {"statuses": ["9xx"]}}]}"#,
            r#"circuit-breaker: rules[0].failure_when.statuses[0]: expected a status class like "5xx" or a status from 100 to 599, got "9xx""#,
        ),
    ];
    for (config, expected) in cases {
        assert_config_refused_in(form, "circuit-breaker", config, expected);
    }
}

both_forms!(a_probe_whose_client_goes_away_gives_its_permit_back);
fn a_probe_whose_client_goes_away_gives_its_permit_back(form: Form) {
    let (envoy, upstream) = envoy_with(
        form,
        r#"{"rules": [{"name": "payments", "match": {"route": "payments"}, "consecutive_failures": 1,
            "open_for": "2s", "half_open_calls": 1}]}"#,
    );
    upstream.set_behaviour(failing());
    let mut c = Client::new(envoy.port());
    assert!(from_upstream(&c.get("/payments", &[]).unwrap()));
    assert!(is_circuit_open(&c.get("/payments", &[]).unwrap()));
    upstream.set_behaviour(Behaviour::default());
    std::thread::sleep(Duration::from_secs(3));
    // The only probe: its client hangs up while the upstream is still working on it.
    let mut gone = std::net::TcpStream::connect(("127.0.0.1", envoy.port())).unwrap();
    std::io::Write::write_all(
        &mut gone,
        b"GET /payments HTTP/1.1\r\nhost: localhost\r\nx-upstream-delay-ms: 5000\r\n\r\n",
    )
    .unwrap();
    wait_until("the probe reaches the upstream", || {
        upstream.in_flight() == 1
    });
    let held = c.get("/payments", &[]).unwrap();
    assert_eq!(held.header("x-mesh-circuit"), Some("half-open"), "{held:?}");
    drop(gone);
    // Not the upstream's fault: the permit comes back and the next request probes.
    wait_until("a new probe is admitted", || {
        let r = c.get("/payments", &[]).unwrap();
        assert!(
            r.header("x-mesh-circuit") == Some("half-open") || from_upstream(&r),
            "{r:?}"
        );
        from_upstream(&r)
    });
    assert_eq!(metric(&envoy, "mesh_circuit_state", "payments"), Some(0.0));
    assert_eq!(calls(&envoy, "payments", "success"), Some(1.0));
    assert_eq!(calls(&envoy, "payments", "failure"), Some(1.0));
}

both_forms!(cluster_scope_keeps_clusters_apart);
fn cluster_scope_keeps_clusters_apart(form: Form) {
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    let envoy = Envoy::start(
        &Bootstrap::in_form(form)
            .wasm(WasmFilter::new(
                "circuit-breaker",
                r#"{"rules": [{"name": "per-cluster", "scope": "cluster", "consecutive_failures": 2, "open_for": "1h"}]}"#,
            ))
            .route("to-v1", "/v1", "v1")
            .route("to-v2", "/v2", "v2")
            .cluster("v1", v1.port())
            .cluster("v2", v2.port())
            .yaml(),
    );
    v2.set_behaviour(failing());
    let mut c = Client::new(envoy.port());
    for _ in 0..2 {
        assert_eq!(c.get("/v2", &[]).unwrap().header("x-served-by"), Some("v2"));
    }
    assert!(is_circuit_open(&c.get("/v2", &[]).unwrap()));
    for _ in 0..10 {
        let r = c.get("/v1", &[]).unwrap();
        assert_eq!((r.status, r.header("x-served-by")), (200, Some("v1")));
    }
    assert_eq!((v1.requests(), v2.requests()), (10, 2));
    assert_eq!(
        metric(&envoy, "mesh_circuit_open_breakers", "per-cluster"),
        Some(1.0)
    );
}

both_forms!(behind_a_re_routing_filter_outcomes_go_to_the_cluster_that_served_the_call);
/// Behind lb-hints (which re-routes by writing a header), Envoy still shows
/// this filter the route matched first (`default`, cluster v1) during the
/// request; the outcome must be booked under the cluster that served it.
/// (In the suite lb-hints hands its chosen cluster to the breaker.)
fn behind_a_re_routing_filter_outcomes_go_to_the_cluster_that_served_the_call(form: Form) {
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    let envoy = Envoy::start(
        &Bootstrap::in_form(form)
            .wasm(
                WasmFilter::new(
                    "lb-hints",
                    r#"{"rules": [{"name": "split", "avoid_open_circuits": true,
                        "targets": [{"name": "v1", "weight": 1}, {"name": "v2", "weight": 1}]}]}"#,
                )
                .vm_id("mesh-filters"),
            )
            .wasm(
                WasmFilter::new(
                    "circuit-breaker",
                    r#"{"rules": [{"name": "per-cluster", "scope": "cluster", "consecutive_failures": 2, "open_for": "1h"}]}"#,
                )
                .vm_id("mesh-filters"),
            )
            .header_route("to-v1", "/", "x-mesh-target", "v1", "v1")
            .header_route("to-v2", "/", "x-mesh-target", "v2", "v2")
            .route("default", "/", "v1")
            .cluster("v1", v1.port())
            .cluster("v2", v2.port())
            .yaml(),
    );
    v2.set_behaviour(failing());
    let mut c = Client::new(envoy.port());
    // 1:1 round robin: v2 fails twice within four requests, and its breaker opens.
    for _ in 0..4 {
        let r = c.get("/", &[]).unwrap();
        assert!(r.header("x-mesh-circuit").is_none(), "{r:?}");
    }
    assert_eq!(v2.requests(), 2);
    assert_eq!(
        metric(&envoy, "mesh_circuit_open_breakers", "per-cluster"),
        Some(1.0)
    );
    // v1's breaker (the cluster of the route seen during the request) was not
    // charged with v2's failures; lb-hints now keeps traffic off v2.
    for _ in 0..20 {
        let r = c.get("/", &[]).unwrap();
        assert_eq!(
            (r.status, r.header("x-served-by")),
            (200, Some("v1")),
            "{r:?}"
        );
    }
    assert_eq!(v2.requests(), 2);
    assert_eq!(calls(&envoy, "per-cluster", "failure"), Some(2.0));
    assert_eq!(calls(&envoy, "per-cluster", "success"), Some(22.0));
}
