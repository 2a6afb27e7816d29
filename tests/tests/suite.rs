//! What only the suite module does, in a real Envoy (2 workers): lb-hints'
//! chosen target goes straight to the breaker (no native filter between, no
//! `xds.cluster_name` read), metrics counts the other parts' local answers,
//! and a global rate-limit call pauses the request with lb-hints and the
//! breaker running after the answer. The behaviours the suite shares with
//! the separate filters are the separate filters' tests.
//!
//! Routes: `x-mesh-target: v1` to cluster v1, `v2` to v2, anything else to a
//! direct answer 421, so every upstream answer proves lb-hints' header routed it.

use std::time::{Duration, Instant};

use mesh_testkit::http::Client;
use mesh_testkit::rls::{RateLimitService, Redis};
use mesh_testkit::{Behaviour, Bootstrap, Envoy, Split, Upstream, WasmFilter};

const BREAKER: &str = r#"{"rules": [{"name": "per-cluster", "scope": "cluster",
    "window": {"kind": "count", "size": 10}, "minimum_calls": 10, "consecutive_failures": 3,
    "open_for": "6s", "half_open_calls": 1}]}"#;

/// v1 and v2 split 1:1 by lb-hints (optionally avoiding open circuits),
/// behind the `BREAKER` rule, in the suite; v2 answers 500 from the start.
fn split_with_v2_failing(avoid_open_circuits: bool) -> (Upstream, Upstream, Envoy, Client) {
    let config = format!(
        r#"{{"lb_hints": {{"rules": [{{"name": "split", "avoid_open_circuits": {avoid_open_circuits},
            "targets": [{{"name": "v1", "weight": 1}}, {{"name": "v2", "weight": 1}}]}}]}},
           "circuit_breaker": {BREAKER}}}"#
    );
    let Split { envoy, v1, v2 } = Split::start(Bootstrap::new(), WasmFilter::new("suite", &config));
    let client = Client::new(envoy.port());
    v2.set_behaviour(Behaviour {
        status: 500,
        ..Behaviour::default()
    });
    (v1, v2, envoy, client)
}

/// Sends requests until v2 (failing with 500) has failed three times.
fn trip_v2(client: &mut Client) -> Instant {
    let mut failures = 0;
    for _ in 0..12 {
        let sent = Instant::now();
        if client.get("/", &[]).unwrap().status == 500 {
            failures += 1;
            if failures == 3 {
                return sent;
            }
        }
    }
    panic!("v2 did not fail three times in twelve requests");
}

#[test]
fn with_avoid_open_circuits_an_open_v2_gets_no_calls_and_comes_back_after_open_for() {
    const OPEN_FOR: Duration = Duration::from_secs(6);
    let (_v1, v2, envoy, mut client) = split_with_v2_failing(true);
    let opened_after = trip_v2(&mut client);
    // The breaker booked v2's failures under the cluster lb-hints chose, in
    // the request phase: the breaker of v2 is open, v1's is closed.
    assert_eq!(
        envoy.metric("mesh_circuit_open_breakers", &[("rule", "per-cluster")]),
        Some(1.0),
        "{}",
        envoy.prometheus_lines("mesh_")
    );
    let v2_calls = v2.requests();
    // The breaker opened a little after `opened_after` (when it booked the
    // third failure), so every request sent before `opened_after + OPEN_FOR`
    // finds it open; one sent after that may be the half-open probe to v2.
    // The margin covers the request's way to Envoy.
    let last_send = opened_after + OPEN_FOR - Duration::from_millis(250);
    let mut while_open = 0;
    while Instant::now() < last_send {
        let answer = client.get("/", &[]).unwrap();
        assert_eq!(
            (answer.status, answer.header("x-served-by")),
            (200, Some("v1")),
            "while v2's breaker is open; stats:\n{}",
            envoy.prometheus_lines("mesh_")
        );
        while_open += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(while_open >= 10, "only {while_open} requests while open");
    assert_eq!(v2.requests(), v2_calls, "v2 was called while open");
    assert_eq!(
        envoy.metric("mesh_circuit_rejected_total", &[("rule", "per-cluster")]),
        Some(0.0),
        "lb-hints avoided v2, so the breaker never had to answer"
    );
    // Healthy again: the half-open probe reaches v2 and the breaker closes.
    v2.set_behaviour(Behaviour::default());
    let deadline = Instant::now() + Duration::from_secs(60);
    while envoy.metric("mesh_circuit_state", &[("rule", "per-cluster")]) != Some(0.0)
        || v2.requests() == v2_calls
    {
        assert!(Instant::now() < deadline, "v2's breaker did not close");
        let _ = client.get("/", &[]);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_breaker_answers_in_the_request_phase_for_the_cluster_lb_hints_chose() {
    // Without avoid_open_circuits lb-hints keeps sending half the requests to
    // v2. In a chain the breaker cannot know the re-routed cluster before the
    // router (it books the call afterwards); in the suite it gets lb-hints'
    // choice and answers for an open v2 itself.
    let (_v1, v2, envoy, mut client) = split_with_v2_failing(false);
    trip_v2(&mut client);
    let v2_calls = v2.requests();
    let (mut v1_served, mut rejected) = (0, 0);
    for _ in 0..20 {
        let answer = client.get("/", &[]).unwrap();
        match (answer.status, answer.header("x-served-by")) {
            (200, Some("v1")) => v1_served += 1,
            (503, None) => {
                assert_eq!(answer.header("x-mesh-circuit"), Some("open"));
                rejected += 1;
            }
            other => panic!(
                "unexpected answer {other:?}; stats:\n{}",
                envoy.prometheus_lines("mesh_")
            ),
        }
    }
    assert_eq!(v2.requests(), v2_calls, "v2 was called while open");
    assert_eq!((v1_served, rejected), (10, 10), "the 1:1 split goes on");
    assert_eq!(
        envoy.metric("mesh_circuit_rejected_total", &[("rule", "per-cluster")]),
        Some(10.0)
    );
}

#[test]
fn metrics_counts_a_ratelimit_answer_with_its_status_and_duration() {
    let backend = Upstream::start("backend");
    let config = r#"{
        "metrics": {"labels": {"method": false, "cluster": false, "status_class": false, "status_code": true}},
        "ratelimit": {"rules": [{"name": "api", "limit": {"requests": 2, "per": "1h"}}]}}"#;
    let envoy = Envoy::start(
        &Bootstrap::new()
            .wasm(WasmFilter::new("suite", config))
            .route("api", "/", "backend")
            .cluster("backend", backend.port())
            .yaml(),
    );
    let mut client = Client::new(envoy.port());
    let statuses: Vec<u16> = (0..5)
        .map(|_| client.get("/", &[]).unwrap().status)
        .collect();
    assert_eq!(statuses, [200, 200, 429, 429, 429]);
    assert_eq!(backend.requests(), 2);
    let count = |code: &str| {
        envoy.metric(
            "mesh_requests_total",
            &[("route", "api"), ("response_code", code)],
        )
    };
    assert_eq!(
        (count("200"), count("429")),
        (Some(2.0), Some(3.0)),
        "{}",
        envoy.prometheus_lines("mesh_")
    );
    assert_eq!(
        envoy.metric(
            "mesh_ratelimit_requests_total",
            &[("rule", "api"), ("decision", "limited")]
        ),
        Some(3.0)
    );
    // The duration histogram of the local answers, once Envoy flushed it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let samples = envoy.metric(
            "mesh_request_duration_ms_count",
            &[("route", "api"), ("response_code", "429")],
        );
        if samples == Some(3.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "429 durations: {samples:?}\n{}",
            envoy.prometheus_lines("mesh_")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn after_a_global_rate_limit_answer_lb_hints_and_the_breaker_run() {
    let redis = Redis::start();
    let rls = RateLimitService::start(
        redis.port(),
        "domain: mesh\ndescriptors:\n  - key: rule\n    value: per-user\n    descriptors:\n      - key: x-user\n        rate_limit: {unit: hour, requests_per_unit: 3}\n",
    );
    let config = format!(
        r#"{{"ratelimit": {{"rules": [{{"name": "per-user", "key": [{{"header": "x-user"}}],
              "global": {{"service": "rls", "domain": "mesh", "timeout": "2s"}}}}]}},
           "lb_hints": {{"rules": [{{"name": "all-v2",
              "targets": [{{"name": "v1", "weight": 0}}, {{"name": "v2", "weight": 1}}]}}]}},
           "circuit_breaker": {BREAKER}}}"#
    );
    let Split { envoy, v1, v2 } = Split::start(
        Bootstrap::new().grpc_cluster("rls", rls.grpc_port()),
        WasmFilter::new("suite", &config),
    );
    let mut client = Client::new(envoy.port());
    // A fresh user per run: the service's hourly window may still hold
    // another run's counts in a reused Redis.
    let user = format!("u{}", std::process::id());
    let answers: Vec<(u16, Option<String>)> = (0..5)
        .map(|_| {
            let r = client.get("/", &[("x-user", &user)]).unwrap();
            (r.status, r.header("x-served-by").map(str::to_string))
        })
        .collect();
    let v2_served = (200, Some("v2".to_string()));
    assert_eq!(
        answers[..3],
        [v2_served.clone(), v2_served.clone(), v2_served],
        "{}",
        envoy.prometheus_lines("mesh_")
    );
    assert_eq!(answers[3].0, 429);
    assert_eq!(answers[4].0, 429);
    assert_eq!(v2.requests(), 3);
    assert_eq!(v1.requests(), 0);
    let stat = |name: &str, labels: &[(&str, &str)]| envoy.metric(name, labels).unwrap_or(0.0);
    assert_eq!(
        stat(
            "mesh_ratelimit_global_calls_total",
            &[("rule", "per-user"), ("outcome", "ok")]
        ),
        3.0
    );
    assert_eq!(
        stat(
            "mesh_lb_picks_total",
            &[("rule", "all-v2"), ("target", "v2")]
        ),
        3.0,
        "lb-hints ran only for the requests the service let through"
    );
    assert_eq!(
        stat(
            "mesh_circuit_calls_total",
            &[("rule", "per-cluster"), ("outcome", "success")]
        ),
        3.0,
        "the breaker tracked the calls lb-hints routed after the pause"
    );
}
