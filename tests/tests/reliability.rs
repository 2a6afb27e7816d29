//! Reliability in a real Envoy (2 workers): what each `failure_policy` does
//! with a refused configuration and with a dead Wasm VM (the test-only
//! `panic-probe` module panics on `x-panic: 1`), and hostile input through
//! all four filters (huge and many headers, non-UTF-8 values, 100 000
//! distinct breaker scopes and metric label values). RELIABILITY.md has the
//! figures.

use std::time::{Duration, Instant};

use mesh_testkit::http;
use mesh_testkit::{Bootstrap, Envoy, Upstream, WasmFilter};

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
        // after the reload backoff (ReloadConfig, 1 s by default); until then
        // that worker answers 503 as under FAIL_CLOSED.
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

#[test]
fn a_refused_configuration_stops_envoy_from_starting_under_every_policy() {
    for policy in POLICIES {
        let upstream = Upstream::start("backend");
        let started = Envoy::start_with(
            &Bootstrap::new()
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
            failure.log.contains(
                r#"ratelimit: rules[0].limit.per: expected a duration like "1s", got "fast""#
            ),
            "{policy}: the log must name the field:\n{}",
            failure.log
        );
        assert_eq!(upstream.requests(), 0);
    }
}
