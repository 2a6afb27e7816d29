//! Reliability in a real Envoy (2 workers): what each `failure_policy` does
//! with a refused configuration and with a dead Wasm VM (the test-only
//! `panic-probe` module panics on `x-panic: 1`), and hostile input through
//! all four filters (huge and many headers, non-UTF-8 values, 100 000
//! distinct breaker scopes and metric label values). RELIABILITY.md has the
//! figures.

use std::time::{Duration, Instant};

use mesh_testkit::http::{self, Client};
use mesh_testkit::{both_forms, Bootstrap, Envoy, Form, Upstream, WasmFilter};

const POLICIES: [&str; 3] = ["FAIL_CLOSED", "FAIL_OPEN", "FAIL_RELOAD"];

/// Envoy with one panic-probe filter under `policy`, in front of one upstream.
fn probe_envoy(policy: &str) -> (Envoy, Upstream) {
    let upstream = Upstream::start("backend");
    let envoy = Envoy::start(
        &Bootstrap::new()
            .wasm(WasmFilter::new("panic-probe", "").failure_policy(policy))
            .route("default", "/", "backend")
            .cluster("backend", upstream.port())
            .yaml(),
    );
    (envoy, upstream)
}

/// One GET on a fresh connection (so it may land on either worker).
fn fresh_get(port: u16, headers: &[(&str, &str)]) -> std::io::Result<http::Response> {
    http::get(port, "/", headers)
}

/// A request the probe let through: the upstream answered and the filter ran.
fn probed(r: &std::io::Result<http::Response>) -> bool {
    r.as_ref().is_ok_and(|r| {
        r.status == 200
            && r.header("x-served-by") == Some("backend")
            && r.header("x-panic-probe") == Some("passed")
    })
}

/// Panics VMs (one `x-panic: 1` request on a fresh connection at a time)
/// until 20 fresh requests in a row satisfy `dead`: then every worker's VM
/// has failed. Returns the answers the panicking requests got.
fn kill_every_vm(
    port: u16,
    mut dead: impl FnMut(&std::io::Result<http::Response>) -> bool,
) -> Vec<String> {
    let mut answers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = fresh_get(port, &[("x-panic", "1")]);
        answers.push(match &r {
            Ok(r) => format!("{} {}", r.status, r.body_text().trim()),
            Err(e) => format!("error: {e}"),
        });
        if (0..20).all(|_| dead(&fresh_get(port, &[]))) {
            return answers;
        }
        assert!(
            Instant::now() < deadline,
            "VMs still alive after {} panics",
            answers.len()
        );
    }
}

fn panic_lines(envoy: &Envoy) -> usize {
    envoy
        .log()
        .lines()
        .filter(|l| l.contains("panic-probe: panic:"))
        .count()
}

// Chain only: a failure of the panic-probe module, not of ours.
#[test]
fn fail_closed_a_dead_vm_answers_503_for_ever_and_the_upstream_sees_nothing() {
    let (envoy, upstream) = probe_envoy("FAIL_CLOSED");
    assert!(probed(&fresh_get(envoy.port(), &[])));
    let panicking = kill_every_vm(envoy.port(), |r| r.as_ref().is_ok_and(|r| r.status == 503));
    eprintln!("FAIL_CLOSED: the panicking requests got {panicking:?}");
    let before = upstream.requests();
    for i in 0..200 {
        let r = fresh_get(envoy.port(), &[]).unwrap();
        assert_eq!(r.status, 503, "request {i} after the VMs died: {r:?}");
    }
    assert_eq!(
        upstream.requests(),
        before,
        "a dead filter must not pass traffic"
    );
    assert!(panic_lines(&envoy) >= 2, "the panic hook logs each panic");
}

// Chain only: a failure of the panic-probe module, not of ours.
#[test]
fn fail_open_a_dead_vm_is_skipped_and_traffic_flows_without_the_filter() {
    let (envoy, upstream) = probe_envoy("FAIL_OPEN");
    assert!(probed(&fresh_get(envoy.port(), &[])));
    let skipped = |r: &std::io::Result<http::Response>| {
        r.as_ref().is_ok_and(|r| {
            r.status == 200
                && r.header("x-served-by") == Some("backend")
                && r.header("x-panic-probe").is_none()
        })
    };
    let panicking = kill_every_vm(envoy.port(), skipped);
    eprintln!("FAIL_OPEN: the panicking requests got {panicking:?}");
    let before = upstream.requests();
    for i in 0..200 {
        let r = fresh_get(envoy.port(), &[]);
        assert!(skipped(&r), "request {i} after the VMs died: {r:?}");
    }
    assert_eq!(upstream.requests(), before + 200);
    assert!(panic_lines(&envoy) >= 2);
}

/// Wasm VMs Envoy has created for workers so far (its debug log line).
fn vms_created(envoy: &Envoy) -> usize {
    envoy
        .log()
        .lines()
        .filter(|l| l.contains("Thread-Local Wasm created"))
        .count()
}

// Chain only: a failure of the panic-probe module, not of ours.
#[test]
fn fail_reload_a_dead_vm_is_recreated_and_the_filter_runs_again() {
    let (envoy, upstream) = probe_envoy("FAIL_RELOAD");
    for round in 0..5 {
        let created = vms_created(&envoy);
        let r = fresh_get(envoy.port(), &[("x-panic", "1")]);
        assert_eq!(
            r.unwrap().status,
            503,
            "round {round}: the panicking request"
        );
        // Envoy recreates the dead VM on a request that reaches its worker
        // after a reload backoff (about 1 s seen here); until then that
        // worker answers 503 as under FAIL_CLOSED.
        let died = Instant::now();
        let mut answers = Vec::new();
        loop {
            let r = fresh_get(envoy.port(), &[]);
            let ok = probed(&r);
            answers.push(r.as_ref().map(|r| r.status).unwrap_or(0));
            assert!(ok || answers.last() == Some(&503), "round {round}: {r:?}");
            if ok && vms_created(&envoy) > created {
                break;
            }
            assert!(
                died.elapsed() < Duration::from_secs(60),
                "round {round}: no new VM within a minute: {answers:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(vms_created(&envoy), created + 1, "round {round}");
        let failed = answers.iter().filter(|s| **s == 503).count();
        eprintln!(
            "FAIL_RELOAD round {round}: new VM after {:?}; meanwhile {failed} of {} requests got 503",
            died.elapsed(),
            answers.len()
        );
        // Recovered: every request finds a working filter.
        for i in 0..20 {
            let r = fresh_get(envoy.port(), &[]);
            assert!(
                probed(&r),
                "round {round}, request {i} after recovery: {r:?}"
            );
        }
    }
    assert_eq!(panic_lines(&envoy), 5, "each x-panic request killed a VM");
    assert!(upstream.requests() >= 100);
}

/// A ratelimit configuration Envoy's wasm filter refuses (`on_configure` false).
const BAD_RATELIMIT: &str =
    r#"{"rules": [{"name": "a", "limit": {"requests": 1, "per": "fast"}}]}"#;

both_forms!(a_refused_configuration_stops_envoy_from_starting_under_every_policy);
fn a_refused_configuration_stops_envoy_from_starting_under_every_policy(form: Form) {
    for policy in POLICIES {
        let upstream = Upstream::start("backend");
        let started = Envoy::start_with(
            &Bootstrap::in_form(form)
                .wasm(WasmFilter::new("ratelimit", BAD_RATELIMIT).failure_policy(policy))
                .route("default", "/", "backend")
                .cluster("backend", upstream.port())
                .yaml(),
            2,
        );
        let failure = match started {
            Ok(envoy) => panic!(
                "{policy}: Envoy started with a refused plugin; it answers {:?}",
                fresh_get(envoy.port(), &[]).map(|r| r.status)
            ),
            Err(f) => f,
        };
        assert!(
            failure.status.is_some_and(|s| !s.success()),
            "{policy}: {:?}",
            failure.status
        );
        assert!(
            failure.log.contains(&form.error_line(
                r#"ratelimit: rules[0].limit.per: expected a duration like "1s", got "fast""#
            )),
            "{policy}: the log must name the field:\n{}",
            failure.log
        );
        assert_eq!(upstream.requests(), 0);
    }
}

// ---- Hostile input through all four filters ----

const RATELIMIT: &str = r#"{"rules": [{"name": "per-api-key", "match": {"path_prefix": "/api"},
    "key": [{"header": "x-api-key"}], "limit": {"requests": 1, "per": "1h"}}], "max_keys": 1000}"#;
const CIRCUIT_BREAKER: &str = r#"{"rules": [{"name": "tenants", "scope": {"header": "x-tenant"},
    "window": {"kind": "count", "size": 20}, "minimum_calls": 10, "open_for": "1h"}],
    "max_breakers": 1000}"#;
const LB_HINTS: &str = r#"{"rules": [{"name": "reviews", "match": {"path_prefix": "/reviews"},
    "header": "x-mesh-target", "targets": [{"name": "v1", "weight": 1}, {"name": "v2", "weight": 1}],
    "algorithm": "sticky", "sticky": {"header": "x-user-id"}}]}"#;
const METRICS: &str = r#"{"labels": {"custom": [{"name": "tenant", "header": "x-tenant"}]},
    "max_series": 1000}"#;

/// All four filters (metrics, ratelimit, lb-hints, circuit-breaker, each
/// reading a client-controlled header) in front of upstreams v1 and v2.
struct AllFour {
    envoy: Envoy,
    v1: Upstream,
    v2: Upstream,
}

fn all_four(form: Form) -> AllFour {
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    let envoy = Envoy::start(
        &Bootstrap::in_form(form)
            .stat_tags(&["tenant"])
            .all_four(METRICS, RATELIMIT, LB_HINTS, CIRCUIT_BREAKER)
            .reviews_routes()
            .route("default", "/", "v1")
            .cluster("v1", v1.port())
            .cluster("v2", v2.port())
            .yaml(),
    );
    AllFour { envoy, v1, v2 }
}

/// Lines of Envoy's log that mention a panic (our hook logs `<filter>: panic:`).
fn log_panics(envoy: &Envoy) -> Vec<String> {
    envoy
        .log()
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("panic"))
        .map(String::from)
        .collect()
}

fn send(client: &mut Client, path: &str, headers: &[(&str, &[u8])]) -> http::Response {
    client
        .request("GET", path, headers, b"")
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

both_forms!(huge_many_and_non_utf8_headers_pass_all_four_filters_without_harm);
fn huge_many_and_non_utf8_headers_pass_all_four_filters_without_harm(form: Form) {
    let s = all_four(form);
    let mut c = Client::new(s.envoy.port());
    // Just under Envoy's default 60 KiB for all request headers together.
    let huge = vec![b'k'; 50 * 1024];
    let non_utf8: Vec<u8> = (0x80..=0xff).collect();
    let many: Vec<(String, Vec<u8>)> = (0..90)
        .map(|i| (format!("x-filler-{i}"), b"v".to_vec()))
        .collect();
    let too_many: Vec<(String, Vec<u8>)> = (0..150)
        .map(|i| (format!("x-filler-{i}"), b"v".to_vec()))
        .collect();
    let warm = s.envoy.rss_kib();
    for round in 0..100 {
        for name in ["x-api-key", "x-tenant", "x-user-id"] {
            for path in ["/api", "/reviews"] {
                let value = format!("{round}-").into_bytes();
                let big: Vec<u8> = value.iter().chain(&huge).copied().collect();
                let r = send(&mut c, path, &[(name, &big)]);
                assert!(
                    matches!(r.status, 200 | 429),
                    "{path} {name} of 50 KiB: {}",
                    r.status
                );
                let odd: Vec<u8> = value.iter().chain(&non_utf8).copied().collect();
                let r = send(&mut c, path, &[(name, &odd), ("x-tenant", &odd)]);
                assert!(
                    matches!(r.status, 200 | 429),
                    "{path} {name} non-UTF-8: {}",
                    r.status
                );
            }
        }
        let h: Vec<(&str, &[u8])> = many
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .chain([("x-tenant", &b"many"[..])])
            .collect();
        assert_eq!(send(&mut c, "/reviews", &h).status, 200, "90 headers");
    }
    // Past Envoy's own limits the codec refuses before any filter runs.
    let over = vec![b'k'; 70 * 1024];
    let r = Client::new(s.envoy.port())
        .request("GET", "/", &[("x-tenant", &over)], b"")
        .unwrap();
    assert_eq!(r.status, 431, "70 KiB of headers");
    let h: Vec<(&str, &[u8])> = too_many
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    let r = Client::new(s.envoy.port())
        .request("GET", "/", &h, b"")
        .unwrap();
    assert_eq!(r.status, 431, "150 headers");

    // The proxy keeps answering, every filter still does its job.
    let mut c = Client::new(s.envoy.port());
    let first = send(&mut c, "/api", &[("x-api-key", b"fresh")]);
    let second = send(&mut c, "/api", &[("x-api-key", b"fresh")]);
    assert_eq!(
        (first.status, second.status),
        (200, 429),
        "ratelimit still limits"
    );
    let r = send(&mut c, "/reviews", &[("x-user-id", b"alice")]);
    assert!(
        matches!(r.header("x-served-by"), Some("v1" | "v2")),
        "{r:?}"
    );
    assert!(s.v1.requests() + s.v2.requests() > 0);
    let after = s.envoy.rss_kib();
    eprintln!(
        "hostile headers: Envoy RSS {warm} KiB before, {after} KiB after 1 300 hostile requests"
    );
    assert!(
        after < warm + 16 * 1024,
        "RSS grew from {warm} KiB to {after} KiB"
    );
    // The metrics filter wrote the non-UTF-8 tenant of round 0 as a
    // sanitised label value: "0-", then '_' for each byte, cut at 64 bytes.
    let sanitised = format!("tenant=\"0-{}\"", "_".repeat(62));
    let scrape = s.envoy.prometheus();
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("mesh_requests_total{") && l.contains(&sanitised)),
        "no series with {sanitised}"
    );
    assert_eq!(log_panics(&s.envoy), Vec::<String>::new());
}

both_forms!(a_hundred_thousand_tenants_leave_breakers_and_label_sets_bounded);
fn a_hundred_thousand_tenants_leave_breakers_and_label_sets_bounded(form: Form) {
    let s = all_four(form);
    let send_range = |from: usize, to: usize| {
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let port = s.envoy.port();
                std::thread::spawn(move || {
                    let mut c = Client::new(port);
                    for i in (from + t..to).step_by(8) {
                        let tenant = format!("tenant-{i}");
                        let r = c.get("/", &[("x-tenant", &tenant)]).unwrap();
                        assert_eq!(r.status, 200, "{tenant}");
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    };
    send_range(0, 20_000);
    let warm = s.envoy.rss_kib();
    send_range(20_000, 100_000);
    let after = s.envoy.rss_kib();
    let overflow = s
        .envoy
        .metric("mesh_circuit_overflow_total", &[("rule", "tenants")])
        .unwrap_or(0.0);
    let scrape = s.envoy.prometheus();
    let tenant_series = scrape
        .lines()
        .filter(|l| l.starts_with("mesh_requests_total{") && l.contains("tenant=\"tenant-"))
        .count();
    let folded = s
        .envoy
        .metric("mesh_series_overflow_total", &[])
        .unwrap_or(0.0);
    eprintln!(
        "100k tenants: Envoy RSS {warm} KiB after 20k, {after} KiB after 100k; \
         breaker overflow {overflow}; {tenant_series} tenant series; {folded} folded"
    );
    // Bounded: 1000 breaker slots and 1000 label sets, whatever the cardinality.
    assert!(overflow > 90_000.0, "{overflow}");
    assert!(tenant_series <= 1000, "{tenant_series}");
    assert!(folded > 90_000.0, "{folded}");
    assert!(
        after < warm + 8 * 1024,
        "RSS grew from {warm} KiB to {after} KiB"
    );
    assert_eq!(
        s.v1.requests(),
        100_000,
        "every request reached the upstream"
    );
    assert_eq!(log_panics(&s.envoy), Vec::<String>::new());
}
