//! circuit-breaker's `scope: "route"` behind lb-hints, in a real Envoy (2
//! workers): which route's breaker a re-routed request is counted on.
//!
//! lb-hints places users 50/50 (sticky on `x-user-id`) on v1 and v2 by
//! writing `x-mesh-target`; the route table sends `x-mesh-target: v2` to
//! route `api-v2` (cluster v2), everything else to route `api` (cluster v1).
//! Every request matches `api` before lb-hints re-routes it, and during the
//! request phase Envoy still shows that route to every Wasm filter (it
//! resolves the new one only when a filter next asks for the route: the
//! router). The breaker must still count each call on the route that served
//! it: v2 failing must open `api-v2`'s breaker only, never `api`'s, whose
//! users keep getting v1's answers.

use std::collections::BTreeMap;

use mesh_testkit::http::{Client, Response};
use mesh_testkit::{both_forms, Behaviour, Bootstrap, Envoy, Form, Upstream, WasmFilter};

const LB_HINTS: &str = r#"{"rules": [{"name": "users", "algorithm": "sticky",
    "sticky": {"header": "x-user-id"},
    "targets": [{"name": "v1", "weight": 50}, {"name": "v2", "weight": 50}]}]}"#;

/// One breaker per route; a count window of 10 calls opens at 50% failures.
const BREAKER: &str = r#"{"rules": [{"name": "per-route", "scope": "route",
    "match": {"route": ["api", "api-v2"]},
    "window": {"kind": "count", "size": 10}, "minimum_calls": 10, "failure_rate_percent": 50,
    "open_for": "1h"}]}"#;

const CORS: &str = r#"{"name": "envoy.filters.http.cors", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}}"#;

const USERS: usize = 40;

fn user(i: usize) -> String {
    format!("user-{i:02}")
}

/// An answer as the client sees it: status, `x-served-by`, `x-mesh-circuit`.
fn seen(r: &Response) -> (u16, Option<String>, Option<String>) {
    (
        r.status,
        r.header("x-served-by").map(str::to_string),
        r.header("x-mesh-circuit").map(str::to_string),
    )
}

both_forms!(a_route_breaker_counts_a_re_routed_call_on_the_route_that_served_it);
fn a_route_breaker_counts_a_re_routed_call_on_the_route_that_served_it(form: Form) {
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    let lb_hints = Bootstrap::in_form(form).wasm(WasmFilter::new("lb-hints", LB_HINTS));
    // A chain needs a native filter that asks for the route between lb-hints
    // and the breaker (docs/circuit-breaker.md); the suite learns the route.
    let lb_hints = match form {
        Form::Chain => lb_hints.filter_json(CORS),
        Form::Suite => lb_hints,
    };
    let envoy = Envoy::start(
        &lb_hints
            .wasm(WasmFilter::new("circuit-breaker", BREAKER))
            .header_route("api-v2", "/", "x-mesh-target", "v2", "v2")
            .route("api", "/", "v1")
            .cluster("v1", v1.port())
            .cluster("v2", v2.port())
            .yaml(),
    );
    let mut client = Client::new(envoy.port());
    let mut get = |i: usize| seen(&client.get("/", &[("x-user-id", &user(i))]).unwrap());

    // Where lb-hints places each user, while both versions answer 200.
    let mut on_v2 = Vec::new();
    for i in 0..USERS {
        match get(i) {
            (200, Some(by), None) if by == "v1" => {}
            (200, Some(by), None) if by == "v2" => on_v2.push(i),
            other => panic!("{}: {other:?}", user(i)),
        }
    }
    let v2_users = on_v2.len();
    assert!(
        (10..=30).contains(&v2_users),
        "{v2_users} of {USERS} users on v2"
    );

    // v2 fails every call from now on; three rounds of every user.
    v2.set_behaviour(Behaviour {
        status: 500,
        ..Behaviour::default()
    });
    let (v1_before, v2_before) = (v1.requests(), v2.requests());
    let mut answers: BTreeMap<&str, Vec<_>> = BTreeMap::new();
    for _round in 0..3 {
        for i in 0..USERS {
            let answer = get(i);
            let kind = match &answer {
                (200, Some(by), None) if by == "v1" => "v1 answered",
                (500, Some(by), None) if by == "v2" => "v2 answered",
                (503, None, Some(circuit)) if circuit == "open" => "circuit open",
                _ => "other",
            };
            let group = if on_v2.contains(&i) {
                "v2 user"
            } else {
                "v1 user"
            };
            answers
                .entry(group)
                .or_default()
                .push((kind, user(i), answer));
        }
    }
    let stats = envoy.prometheus_lines("mesh_circuit");
    let kinds = |group: &str| {
        let mut out: BTreeMap<&str, usize> = BTreeMap::new();
        for (kind, _, _) in answers.get(group).into_iter().flatten() {
            *out.entry(kind).or_default() += 1;
        }
        out
    };

    // v1's users are served by v1 throughout: `api`'s breaker never opened.
    let v1_calls = 3 * (USERS - v2_users);
    assert_eq!(
        kinds("v1 user"),
        BTreeMap::from([("v1 answered", v1_calls)]),
        "{:?}\n{stats}",
        answers.get("v1 user")
    );
    assert_eq!(v1.requests() - v1_before, v1_calls as u64);
    // `api-v2`'s breaker held the 10 successes of v2's users above; the
    // fifth failure makes its window 50% failures and opens it. From then on
    // its users get the breaker's answer, and v2 no calls.
    let v2_calls = v2.requests() - v2_before;
    assert_eq!(
        kinds("v2 user"),
        BTreeMap::from([
            ("v2 answered", v2_calls as usize),
            ("circuit open", 3 * v2_users - v2_calls as usize)
        ]),
        "{:?}\n{stats}",
        answers.get("v2 user")
    );
    assert_eq!(v2_calls, 5, "v2's calls while failing\n{stats}");
    let stat = |name: &str, outcome: Option<&str>| {
        let mut labels = vec![("rule", "per-route")];
        labels.extend(outcome.map(|o| ("outcome", o)));
        envoy.metric(name, &labels).unwrap_or(0.0)
    };
    assert_eq!(stat("mesh_circuit_open_breakers", None), 1.0, "{stats}");
    assert_eq!(stat("mesh_circuit_opened_total", None), 1.0, "{stats}");
    assert_eq!(
        stat("mesh_circuit_calls_total", Some("failure")),
        v2_calls as f64,
        "{stats}"
    );
    // The suite does not count the first call of each re-route on a worker
    // (all calls here come on one connection, so one worker): it learns
    // from it the route that serves the re-route.
    let unlearnt = match form {
        Form::Chain => 0,
        Form::Suite => 2,
    };
    assert_eq!(
        stat("mesh_circuit_calls_total", Some("success")),
        (USERS + v1_calls - unlearnt) as f64,
        "{stats}"
    );
}
