//! What the tests of ratelimit's global mode share: Redis, the service and
//! Envoys with the ratelimit filter (a [`World`]), the service's
//! configuration, the filter's counters, and waiting for a fresh window.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::rls::{RateLimitService, Redis};
use crate::{http, Bootstrap, Envoy, Form, Upstream, WasmFilter};

/// Redis, the service with `service_config`, and Envoys whose ratelimit
/// filter has `filter_config` (cluster `rls` is the service).
pub struct World {
    pub redis: Redis,
    pub rls: RateLimitService,
    pub envoys: Vec<Envoy>,
    pub upstream: Upstream,
}

/// A [`World`] with `envoys` Envoys (2 workers each).
pub fn world(form: Form, service_config: &str, filter_config: &str, envoys: usize) -> World {
    let redis = Redis::start();
    let rls = RateLimitService::start(redis.port(), service_config);
    let upstream = Upstream::start("backend");
    let envoys = (0..envoys)
        .map(|_| Envoy::start(&bootstrap(form, filter_config, &upstream, rls.grpc_port())))
        .collect();
    World {
        redis,
        rls,
        envoys,
        upstream,
    }
}

/// An Envoy bootstrap: the ratelimit filter with `filter_config`, route
/// `open` (`/`) to `upstream`, and the gRPC cluster `rls` on `rls_port`.
pub fn bootstrap(form: Form, filter_config: &str, upstream: &Upstream, rls_port: u16) -> String {
    Bootstrap::in_form(form)
        .wasm(WasmFilter::new("ratelimit", filter_config))
        .route("open", "/", "backend")
        .cluster("backend", upstream.port())
        .grpc_cluster("rls", rls_port)
        .yaml()
}

/// envoyproxy/ratelimit's configuration: one limit per `(rule, key header)`,
/// as `(rule, header, requests, unit)`.
pub fn service_config(limits: &[(&str, &str, u32, &str)]) -> String {
    let mut yaml = String::from("domain: mesh\ndescriptors:\n");
    for (rule, header, requests, unit) in limits {
        yaml.push_str(&format!(
            "  - key: rule\n    value: {rule}\n    descriptors:\n      - key: {header}\n        rate_limit: {{unit: {unit}, requests_per_unit: {requests}}}\n"
        ));
    }
    yaml
}

/// `mesh_ratelimit_requests_total{rule, decision}` (0 when not there yet).
pub fn decision(envoy: &Envoy, rule: &str, decision: &str) -> f64 {
    envoy
        .metric(
            "mesh_ratelimit_requests_total",
            &[("rule", rule), ("decision", decision)],
        )
        .unwrap_or(0.0)
}

/// `mesh_ratelimit_global_calls_total{rule, outcome}` (0 when not there yet).
pub fn calls(envoy: &Envoy, rule: &str, outcome: &str) -> f64 {
    envoy
        .metric(
            "mesh_ratelimit_global_calls_total",
            &[("rule", rule), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
}

/// Every outcome `mesh_ratelimit_global_calls_total` has.
pub const CALL_OUTCOMES: [&str; 7] = [
    "ok",
    "over_limit",
    "timeout",
    "unavailable",
    "error",
    "invalid",
    "not_started",
];

/// Waits, if needed, so that at least `margin` remains of the current fixed
/// window of `unit_secs` (the service's windows are aligned to the epoch).
pub fn away_from_window_end(unit_secs: u64, margin: Duration) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into =
        Duration::from_nanos((now.as_nanos() % (u128::from(unit_secs) * 1_000_000_000)) as u64);
    let left = Duration::from_secs(unit_secs) - into;
    if left < margin {
        eprintln!("waiting {left:?} for the next window");
        std::thread::sleep(left + Duration::from_millis(50));
    }
}

/// Two rules on one key, 100 ms timeout: `open` (`/allow`) fails open,
/// `closed` (`/deny`) denies.
pub const FAILURE_RULES: &str = r#"{"rules": [
    {"name": "open", "match": {"path_prefix": "/allow"}, "key": [{"header": "x-user"}],
     "global": {"service": "rls", "domain": "mesh", "timeout": "100ms", "failure_mode": "allow"}},
    {"name": "closed", "match": {"path_prefix": "/deny"}, "key": [{"header": "x-user"}],
     "global": {"service": "rls", "domain": "mesh", "timeout": "100ms", "failure_mode": "deny"}}]}"#;

/// The slowest answer a call with a 100 ms timeout may give while the
/// service is unusable: a generous bound for a loaded 2-core machine.
pub const FAILURE_ANSWER_BOUND: Duration = Duration::from_millis(1500);

/// An answer: status, body, how long it took.
pub type TimedAnswer = (u16, String, Duration);

/// [`FAILURE_RULES`]' failure decisions so far: rule `open`'s
/// `failed_open`, rule `closed`'s `failure_denied`.
pub fn failure_decisions(envoy: &Envoy) -> (f64, f64) {
    (
        decision(envoy, "open", "failed_open"),
        decision(envoy, "closed", "failure_denied"),
    )
}

/// Checks what [`FAILURE_RULES`] answered while the service was unusable:
/// every `/allow` 200 (failure_mode allow), every `/deny` the failure
/// response, each within [`FAILURE_ANSWER_BOUND`] and each counted once
/// since `before` ([`failure_decisions`]). Returns the slowest answer.
pub fn check_failure_answers(
    envoy: &Envoy,
    case: &str,
    before: (f64, f64),
    allow: &[TimedAnswer],
    deny: &[TimedAnswer],
) -> Duration {
    for (status, _, _) in allow {
        assert_eq!(*status, 200, "{case}: failure_mode allow");
    }
    for (status, body, _) in deny {
        assert_eq!(
            (*status, body.as_str()),
            (503, "rate limit service unavailable\n"),
            "{case}: failure_mode deny"
        );
    }
    let slowest = allow
        .iter()
        .chain(deny)
        .map(|a| a.2)
        .max()
        .unwrap_or_default();
    assert!(
        slowest < FAILURE_ANSWER_BOUND,
        "{case}: slowest answer {slowest:?}"
    );
    let (open, denied) = failure_decisions(envoy);
    assert_eq!(open - before.0, allow.len() as f64, "{case}");
    assert_eq!(denied - before.1, deny.len() as f64, "{case}");
    slowest
}

/// Sends one request on a fresh connection; its status, body and duration.
pub fn timed(port: u16, path: &str) -> TimedAnswer {
    let started = Instant::now();
    let r = http::get(port, path, &[("x-user", "erin")]).unwrap();
    (r.status, r.body_text(), started.elapsed())
}

/// Waits until both [`FAILURE_RULES`] answer 200 from the service again.
pub fn both_recovered(w: &World, case: &str) {
    let e = &w.envoys[0];
    // The first call after a restart may still find the old connection gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (allow, _, _) = timed(e.port(), "/allow");
        let (deny, _, _) = timed(e.port(), "/deny");
        let ok_before = calls(e, "closed", "ok");
        if allow == 200 && deny == 200 && ok_before > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{case}: not recovered ({allow}, {deny})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
