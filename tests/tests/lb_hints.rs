//! The lb-hints filter in a real Envoy (2 workers) in front of two real
//! upstream clusters, `v1` and `v2`, whose answers say which one served.
//!
//! The route table routes only on the routing header: `x-mesh-target: v1` to
//! cluster v1, `v2` to cluster v2, and anything else to a direct answer 421
//! `unrouted`. So every answer from an upstream proves that Envoy routed on
//! the header the filter wrote.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use mesh_testkit::http::{self, Client};
use mesh_testkit::{
    both_forms, concurrent_gets, json_string, wasm_path, Behaviour, Bootstrap, Envoy, Form, Split,
    Upstream, WasmFilter,
};

/// Envoy with one lb-hints filter configured with `config`.
fn envoy_with(form: Form, config: &str) -> Split {
    Split::start(
        Bootstrap::in_form(form),
        WasmFilter::new("lb-hints", config),
    )
}

/// Which upstream served an answer (`None`: not an upstream's answer).
fn served_by(r: &std::io::Result<http::Response>) -> Option<String> {
    let r = r.as_ref().ok()?;
    (r.status == 200).then(|| r.header("x-served-by").map(str::to_string))?
}

fn tally(responses: &[std::io::Result<http::Response>]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in responses {
        let key = served_by(r)
            .unwrap_or_else(|| format!("not served: {:?}", r.as_ref().map(|r| r.status)));
        *out.entry(key).or_default() += 1;
    }
    out
}

fn count(t: &HashMap<String, usize>, name: &str) -> usize {
    t.get(name).copied().unwrap_or(0)
}

const CANARY: &str = r#""targets": [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}]"#;

both_forms!(weighted_round_robin_serves_90_10_exactly_across_two_workers);
fn weighted_round_robin_serves_90_10_exactly_across_two_workers(form: Form) {
    let s = envoy_with(
        form,
        &format!(
            r#"{{"rules": [{{"name": "canary", "algorithm": "weighted_round_robin", {CANARY}}}]}}"#
        ),
    );
    let responses = concurrent_gets(s.envoy.port(), "/", &[], 20, 1000);
    let t = tally(&responses);
    assert_eq!((count(&t, "v1"), count(&t, "v2")), (900, 100), "{t:?}");
    assert_eq!((s.v1.requests(), s.v2.requests()), (900, 100));
    let picks = |target| {
        s.envoy.metric(
            "mesh_lb_picks_total",
            &[("rule", "canary"), ("target", target)],
        )
    };
    assert_eq!(picks("v1"), Some(900.0));
    assert_eq!(picks("v2"), Some(100.0));
}

both_forms!(weighted_random_lands_within_a_binomial_bound);
fn weighted_random_lands_within_a_binomial_bound(form: Form) {
    let s = envoy_with(
        form,
        &format!(
            r#"{{"rules": [{{"name": "canary", "algorithm": "weighted_random", {CANARY}}}]}}"#
        ),
    );
    let responses = concurrent_gets(s.envoy.port(), "/", &[], 20, 1000);
    let t = tally(&responses);
    assert_eq!(count(&t, "v1") + count(&t, "v2"), 1000, "{t:?}");
    // Binomial(1000, 0.1): mean 100, sd 9.5; two-sided 99.9% is +-3.29 sd.
    let v2 = count(&t, "v2");
    assert!((69..=131).contains(&v2), "v2 served {v2} of 1000");
}

/// Which version each of `users` reaches, asking `times` times each (from 20
/// connections at once); panics if a user reaches two versions.
fn versions_of_users(port: u16, users: usize, times: usize) -> Vec<String> {
    const CONNECTIONS: usize = 20;
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|first| {
            std::thread::spawn(move || {
                let mut client = Client::new(port);
                (first..users)
                    .step_by(CONNECTIONS)
                    .map(|u| {
                        let user = format!("user-{u}");
                        let seen: Vec<String> = (0..times)
                            .map(|_| served_by(&client.get("/", &[("x-user-id", &user)])).unwrap())
                            .collect();
                        assert!(
                            seen.iter().all(|v| *v == seen[0]),
                            "{user} reached {seen:?}"
                        );
                        (u, seen[0].clone())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut found: Vec<(usize, String)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    found.sort();
    assert_eq!(found.len(), users);
    found.into_iter().map(|(_, v)| v).collect()
}

both_forms!(sticky_users_stay_and_a_weight_change_moves_only_the_share_that_must_move);
fn sticky_users_stay_and_a_weight_change_moves_only_the_share_that_must_move(form: Form) {
    let config = |w1: u32, w2: u32| {
        format!(
            r#"{{"rules": [{{"name": "sticky", "algorithm": "sticky", "sticky": {{"header": "x-user-id"}},
                "targets": [{{"name": "v1", "weight": {w1}}}, {{"name": "v2", "weight": {w2}}}]}}]}}"#
        )
    };
    let before = {
        let s = envoy_with(form, &config(90, 10));
        versions_of_users(s.envoy.port(), 200, 5)
    };
    let after = {
        let s = envoy_with(form, &config(80, 20));
        versions_of_users(s.envoy.port(), 200, 5)
    };
    let on_v2 = before.iter().filter(|v| *v == "v2").count();
    // Binomial(200, 0.1): mean 20, sd 4.2; +-3.29 sd.
    assert!(
        (6..=34).contains(&on_v2),
        "{on_v2} of 200 users on v2 at 90/10"
    );
    let back = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| *b == "v2" && *a == "v1")
        .count();
    assert_eq!(back, 0, "nobody may move from v2 back to v1");
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    // 10% of the users must move (20); Binomial sd 4.2, so at most 20 + 14.
    assert!(moved <= 34, "{moved} of 200 users moved");
    assert!(
        moved >= 6,
        "only {moved} of 200 users moved: the weights had no effect"
    );
}

/// Sends one request on a raw connection and keeps it open; returns the
/// connection if the request is now held by `slow` (else it was answered).
fn hold_a_request_on(port: u16, slow: &Upstream, held_before: u64) -> Option<TcpStream> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if slow.in_flight() > held_before {
            return Some(conn);
        }
        if matches!(conn.read(&mut buf), Ok(n) if n > 0) {
            return None; // answered by the fast upstream
        }
    }
    panic!(
        "the request was neither answered nor held by {}",
        slow.name()
    );
}

/// Holds one request on `slow`, retrying while requests land elsewhere.
fn held_request(port: u16, slow: &Upstream) -> TcpStream {
    let held_before = slow.in_flight();
    for _ in 0..50 {
        if let Some(conn) = hold_a_request_on(port, slow, held_before) {
            return conn;
        }
    }
    panic!(
        "50 requests in a row avoided {} although both were idle",
        slow.name()
    );
}

/// Sends sequential requests until one is served by `name`; how many it took.
fn requests_until_served_by(port: u16, name: &str, limit: usize) -> Option<usize> {
    let mut client = Client::new(port);
    (1..=limit).find(|_| served_by(&client.get("/", &[])).as_deref() == Some(name))
}

both_forms!(least_requests_sends_new_requests_away_from_slow_in_flight_ones);
fn least_requests_sends_new_requests_away_from_slow_in_flight_ones(form: Form) {
    let s = envoy_with(
        form,
        r#"{"rules": [{"name": "lr", "algorithm": "least_requests", "targets": [{"name": "v1"}, {"name": "v2"}]}]}"#,
    );
    let port = s.envoy.port();
    s.v1.set_behaviour(Behaviour {
        delay: Duration::from_secs(15),
        ..Behaviour::default()
    });
    let held = held_request(port, &s.v1);
    // Every request answered while v1 still holds the slow one must go to v2.
    let mut client = Client::new(port);
    let mut checked = 0;
    for _ in 0..30 {
        let answer = client.get("/", &[]);
        if s.v1.in_flight() == 0 {
            break;
        }
        assert_eq!(served_by(&answer).as_deref(), Some("v2"));
        checked += 1;
    }
    assert!(
        checked >= 10,
        "only {checked} requests checked while v1 was busy"
    );

    // A stream that ends by reset (the client goes away) is counted out too:
    // with v1's upstream still busy, Envoy has nothing in flight to v1 again.
    drop(held);
    assert!(
        s.v1.in_flight() >= 1,
        "the slow upstream request should still be running"
    );
    // New requests to v1 answer at once (the held one keeps its 15 s delay),
    // so the check below costs no 15 s waits.
    s.v1.set_behaviour(Behaviour::default());
    assert!(
        requests_until_served_by(port, "v1", 60).is_some(),
        "v1 got nothing after the held stream was reset: its in-flight count leaked"
    );
}

both_forms!(least_requests_counts_out_upstream_resets);
fn least_requests_counts_out_upstream_resets(form: Form) {
    let s = envoy_with(
        form,
        r#"{"rules": [{"name": "lr", "algorithm": "least_requests", "targets": [{"name": "v1"}, {"name": "v2"}]}]}"#,
    );
    let port = s.envoy.port();
    s.v1.set_behaviour(Behaviour {
        reset: true,
        ..Behaviour::default()
    });
    let mut client = Client::new(port);
    let resets = (0..30)
        .filter(|_| client.get("/", &[]).map(|r| r.status).ok() == Some(503))
        .count();
    assert!(resets >= 1 && s.v1.requests() >= 1, "no request reached v1");
    s.v1.set_behaviour(Behaviour::default());
    // Had a reset leaked an in-flight count, idle v1 would never be picked again.
    assert!(
        requests_until_served_by(port, "v1", 60).is_some(),
        "v1 got nothing after {resets} resets: its in-flight count leaked"
    );
}

both_forms!(a_client_sent_routing_header_is_overwritten_and_the_override_works_when_allowed);
fn a_client_sent_routing_header_is_overwritten_and_the_override_works_when_allowed(form: Form) {
    let rule = |extra: &str| {
        format!(
            r#"{{"rules": [{{"name": "pin", "targets": [{{"name": "v1", "weight": 1}}, {{"name": "v2", "weight": 0}}]{extra}}}]}}"#
        )
    };
    let s = envoy_with(form, &rule(""));
    let mut c = Client::new(s.envoy.port());
    let answer = c.get("/", &[("x-mesh-target", "v2")]);
    assert_eq!(served_by(&answer).as_deref(), Some("v1"));
    assert_eq!(
        s.v1.seen()
            .last()
            .and_then(|r| r.header("x-mesh-target").map(<[u8]>::to_vec)),
        Some(b"v1".to_vec()),
        "the upstream sees the filter's value, not the client's"
    );
    let answer = c.get("/", &[("x-mesh-force-target", "v2")]);
    assert_eq!(
        served_by(&answer).as_deref(),
        Some("v1"),
        "no override configured"
    );
    drop(s);

    let s = envoy_with(
        form,
        &rule(r#", "override": {"header": "x-mesh-force-target"}"#),
    );
    let mut c = Client::new(s.envoy.port());
    let forced =
        |value| served_by(&Client::new(s.envoy.port()).get("/", &[("x-mesh-force-target", value)]));
    assert_eq!(
        forced("v2").as_deref(),
        Some("v2"),
        "override to a zero-weight target"
    );
    assert_eq!(
        forced("v3").as_deref(),
        Some("v1"),
        "an unknown target is ignored"
    );
    assert_eq!(
        served_by(&c.get("/", &[("x-mesh-target", "v2")])).as_deref(),
        Some("v1")
    );
}

both_forms!(routing_follows_the_header_even_after_the_route_was_resolved);
fn routing_follows_the_header_even_after_the_route_was_resolved(form: Form) {
    // Matching on the route name makes Envoy resolve the route (`unrouted`,
    // since the client sends no header) before the filter writes the header.
    let s = envoy_with(
        form,
        r#"{"rules": [{"name": "pin", "match": {"route": ["unrouted", "to-v1", "to-v2"]},
            "targets": [{"name": "v1", "weight": 0}, {"name": "v2", "weight": 1}]}]}"#,
    );
    let mut c = Client::new(s.envoy.port());
    for _ in 0..20 {
        assert_eq!(served_by(&c.get("/", &[])).as_deref(), Some("v2"));
    }
    assert_eq!(
        served_by(&c.get("/", &[("x-mesh-target", "v1")])).as_deref(),
        Some("v2"),
        "resolved as to-v1 first, re-routed after the filter's write"
    );
}

both_forms!(no_target_available_answers_as_configured);
fn no_target_available_answers_as_configured(form: Form) {
    let s = envoy_with(
        form,
        r#"{"response": {"status": 503, "body": "no version available\n"},
            "rules": [{"name": "off", "match": {"path_prefix": "/off"}, "targets": [{"name": "v1", "weight": 0}]},
                      {"name": "pass", "match": {"path_prefix": "/pass"}, "no_target": "pass", "targets": [{"name": "v1", "weight": 0}]}]}"#,
    );
    let mut c = Client::new(s.envoy.port());
    let answer = c.get("/off", &[("x-mesh-target", "v1")]).unwrap();
    assert_eq!(answer.status, 503);
    assert_eq!(answer.body_text(), "no version available\n");
    assert_eq!(answer.header("x-mesh-lb"), Some("no-target"));
    // "pass": the client's header is removed and the route table decides.
    let answer = c.get("/pass", &[("x-mesh-target", "v1")]).unwrap();
    assert_eq!(
        (answer.status, answer.body_text().as_str()),
        (421, "unrouted\n")
    );
    assert_eq!(s.v1.requests(), 0);
    assert_eq!(
        s.envoy
            .metric("mesh_lb_no_target_total", &[("rule", "off")]),
        Some(1.0)
    );
}

both_forms!(steps_move_the_share_at_the_configured_time);
fn steps_move_the_share_at_the_configured_time(form: Form) {
    // Longer than Envoy takes to load the module: the suite's took 6 s on a
    // loaded machine, so with 5 s no answer came surely before the step.
    const AFTER: Duration = Duration::from_secs(10);
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    // The step schedule starts at the first configuration, which happens
    // after `before_start` and before `Envoy::start` returns.
    let before_start = Instant::now();
    let envoy = Envoy::start(
        &Bootstrap::in_form(form).routed_by("x-mesh-target", v1.port(), v2.port())
            .wasm(WasmFilter::new(
                "lb-hints",
                r#"{"rules": [{"name": "rollout", "targets": [{"name": "v1", "weight": 1}, {"name": "v2", "weight": 0}],
                    "steps": [{"after": "10s", "weights": {"v1": 0, "v2": 1}}]}]}"#,
            ))
            .yaml(),
    );
    let ready = Instant::now();
    let mut client = Client::new(envoy.port());
    let (mut early, mut late) = (0, 0);
    let deadline = ready + AFTER + Duration::from_secs(60);
    while late < 20 && Instant::now() < deadline {
        let sent = Instant::now();
        let version = served_by(&client.get("/", &[])).unwrap();
        let answered = Instant::now();
        if answered.duration_since(before_start) < AFTER {
            assert_eq!(version, "v1", "before the step");
            early += 1;
        } else if sent.duration_since(ready) > AFTER {
            assert_eq!(version, "v2", "after the step");
            late += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(early >= 1, "no request was answered before the step");
    assert_eq!(late, 20);
}

both_forms!(bad_config_is_refused_with_the_json_path_and_envoy_does_not_start);
fn bad_config_is_refused_with_the_json_path_and_envoy_does_not_start(form: Form) {
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    let failure = Envoy::start_with(
        &Bootstrap::in_form(form).routed_by("x-mesh-target", v1.port(), v2.port())
            .wasm(WasmFilter::new(
                "lb-hints",
                r#"{"rules": [{"name": "canary", "targets": [{"name": "v1", "weight": 90}, {"name": "v2", "weight": -10}]}]}"#,
            ))
            .yaml(),
        2,
    )
    .err()
    .expect("Envoy must refuse the configuration");
    assert!(
        failure.log.contains(&form.error_line(
            "lb-hints: rules[0].targets[1].weight: expected an integer from 0 to 10000, got -10"
        )),
        "{}",
        failure.log
    );
}

/// `dist/lb-hints.wasm` with a custom section appended: the same code in a
/// different module (other bytes, so Envoy builds a separate VM for it).
fn other_module() -> std::path::PathBuf {
    let mut bytes = std::fs::read(wasm_path("lb-hints")).unwrap();
    let name = b"probe";
    let payload = b"a different module";
    bytes.push(0); // custom section
    bytes.push((1 + name.len() + payload.len()) as u8);
    bytes.push(name.len() as u8);
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(payload);
    let dir = std::env::temp_dir().join(format!("lb-hints-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb-hints-other.wasm");
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Two modules, each writing a round-robin pick (same plugin name and rule,
/// so the same shared-data keys) into its own header, with these `vm_id`s.
/// Returns the (first module's, second module's) picks of 20 requests.
fn two_modules_picks(vm_a: &str, vm_b: &str) -> Vec<(String, String)> {
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    let rule = |header: &str| {
        format!(
            r#"{{"rules": [{{"name": "rr", "algorithm": "round_robin", "header": "{header}", "targets": [{{"name": "v1"}}, {{"name": "v2"}}]}}]}}"#
        )
    };
    let first = WasmFilter::new("lb-hints", &rule("x-first"))
        .name("lb")
        .vm_id(vm_a);
    let second = WasmFilter::new("lb-hints", &rule("x-mesh-target"))
        .name("lb")
        .vm_id(vm_b);
    let other = other_module();
    let second_json = second.json().replace(
        &json_string(&wasm_path("lb-hints").to_string_lossy()),
        &json_string(&other.to_string_lossy()),
    );
    assert!(second_json.contains("lb-hints-other.wasm"));
    let envoy = Envoy::start(
        &Bootstrap::new()
            .routed_by("x-mesh-target", v1.port(), v2.port())
            .wasm(first)
            .filter_json(&second_json)
            .yaml(),
    );
    let mut c = Client::new(envoy.port());
    for _ in 0..20 {
        assert!(served_by(&c.get("/", &[])).is_some());
    }
    let mut seen: Vec<_> = v1.seen();
    seen.extend(v2.seen());
    seen.iter()
        .map(|r| {
            let h = |n| String::from_utf8_lossy(r.header(n).unwrap_or_default()).into_owned();
            (h("x-first"), h("x-mesh-target"))
        })
        .collect()
}

// Chain only: two instances of lb-hints with their own vm_ids and modules.
#[test]
fn two_modules_share_data_exactly_when_their_vm_ids_are_equal() {
    // Same vm_id: both modules claim from one counter, so each request's two
    // claims are consecutive: the first module always gets v1, the second v2.
    let shared = two_modules_picks("mesh", "mesh");
    assert_eq!(shared.len(), 20);
    assert!(
        shared.iter().all(|(a, b)| a == "v1" && b == "v2"),
        "{shared:?}"
    );
    // Different vm_ids: two counters that advance together.
    let separate = two_modules_picks("mesh-a", "mesh-b");
    assert_eq!(separate.len(), 20);
    assert!(separate.iter().all(|(a, b)| a == b), "{separate:?}");
}

/// Envoy's CORS filter, which asks for the route in every request. After a
/// Wasm filter clears the route cache, Envoy resolves the route again only
/// when a filter asks for it (the router does); until then later Wasm filters
/// read the old route's `xds.cluster_name` (probed in Envoy 1.40: with the
/// fallback route to v1, the breaker counted v2's failures as v1's; with a
/// direct-response fallback it saw no cluster at all).
const ROUTE_REFRESH: &str = r#"{"name": "envoy.filters.http.cors", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}}"#;

// Chain only: a native filter between lb-hints and the breaker.
#[test]
fn with_the_circuit_breaker_tripping_v2_everything_goes_to_v1_until_it_closes() {
    circuit_breaker_behind_lb_hints(Form::Chain, true);
}

both_forms!(with_the_circuit_breaker_directly_behind_lb_hints_too);
fn with_the_circuit_breaker_directly_behind_lb_hints_too(form: Form) {
    // Without the route refresh the breaker sees no cluster in the request
    // phase (direct-response fallback) and books each call under the cluster
    // that served it, once answered. (The suite hands the breaker lb-hints'
    // chosen cluster at once.)
    circuit_breaker_behind_lb_hints(form, false);
}

fn circuit_breaker_behind_lb_hints(form: Form, route_refresh: bool) {
    const OPEN_FOR: Duration = Duration::from_secs(6);
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    // Both filters in one vm_id (shared data is per vm_id), the breaker after
    // lb-hints; with `route_refresh`, a native filter in between makes Envoy
    // resolve the route again (see ROUTE_REFRESH).
    let chain = Bootstrap::in_form(form)
        .routed_by("x-mesh-target", v1.port(), v2.port())
        .wasm(
            WasmFilter::new(
                "lb-hints",
                r#"{"rules": [{"name": "split", "avoid_open_circuits": true,
                        "targets": [{"name": "v1", "weight": 1}, {"name": "v2", "weight": 1}]}]}"#,
            )
            .vm_id("mesh-filters"),
        );
    let chain = if route_refresh {
        chain.filter_json(ROUTE_REFRESH)
    } else {
        chain
    };
    let envoy = Envoy::start(
        &chain
            .wasm(
                WasmFilter::new(
                    "circuit-breaker",
                    r#"{"rules": [{"name": "per-cluster", "scope": "cluster", "window": {"kind": "count", "size": 10},
                        "minimum_calls": 10, "consecutive_failures": 3, "open_for": "6s", "half_open_calls": 1}]}"#,
                )
                .vm_id("mesh-filters"),
            )
            .yaml(),
    );
    let mut client = Client::new(envoy.port());
    v2.set_behaviour(Behaviour {
        status: 500,
        ..Behaviour::default()
    });
    // Weights 1:1 alternate, so v2's three failures in a row come within 6 requests.
    let mut failures = 0;
    let mut third_failure_sent = None;
    for _ in 0..6 {
        let sent = Instant::now();
        if client.get("/", &[]).unwrap().status == 500 {
            failures += 1;
            if failures == 3 {
                third_failure_sent = Some(sent);
                break;
            }
        }
    }
    let opened_after = third_failure_sent.expect("v2 did not fail three times in six requests");
    let v2_calls = v2.requests();
    // The breaker opened while answering the third failure, so it stays open
    // at least until `opened_after + OPEN_FOR`: every request answered before
    // then must go to v1, and none may meet the breaker's local answer.
    let mut while_open = 0;
    let mut v2_calls_while_open = v2_calls;
    loop {
        let answer = client.get("/", &[]).unwrap();
        if Instant::now() >= opened_after + OPEN_FOR {
            break;
        }
        assert_eq!(
            (answer.status, answer.header("x-served-by")),
            (200, Some("v1")),
            "while v2's breaker is open; stats:\n{}",
            envoy.prometheus_lines("mesh_")
        );
        while_open += 1;
        v2_calls_while_open = v2.requests();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(while_open >= 10, "only {while_open} requests while open");
    assert_eq!(
        v2_calls_while_open, v2_calls,
        "v2 was called while its breaker was open"
    );
    assert_eq!(
        envoy.metric("mesh_circuit_rejected_total", &[("rule", "per-cluster")]),
        Some(0.0),
        "lb-hints avoided v2, so the breaker never had to answer"
    );
    // v2 is healthy again: after open_for its share returns (the breaker's
    // probe succeeds and it closes), and the 1:1 split is exact again.
    v2.set_behaviour(Behaviour::default());
    // open_for is 6s; keep asking for up to 60s (a request count would race
    // with how fast the upstream answers).
    let deadline = Instant::now() + Duration::from_secs(60);
    while requests_until_served_by(envoy.port(), "v2", 100).is_none() {
        assert!(Instant::now() < deadline, "v2 never got traffic back");
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while envoy.metric("mesh_circuit_state", &[("rule", "per-cluster")]) != Some(0.0) {
        assert!(Instant::now() < deadline, "the breaker did not close");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = tally(&(0..20).map(|_| client.get("/", &[])).collect::<Vec<_>>());
    assert_eq!((count(&t, "v1"), count(&t, "v2")), (10, 10), "{t:?}");
}
