//! `cargo xtask soak [minutes] [requests per second]`: mixed traffic through
//! all four filters in one Envoy (2 workers) at a fixed rate, for 10 minutes
//! unless told; reports per minute the requests sent, errors, p50/p99 latency
//! and Envoy's RSS. Not part of `cargo xtask test` (RELIABILITY.md has a run).
//!
//! An error is a transport failure or an answer the configuration cannot
//! explain: /api answers 200 or 429 (rate limited), /payments 200 or 503
//! (the upstream was told to fail, or the tenant's breaker is open),
//! /reviews 200 from v1 or v2.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_testkit::http::{Client, Response};
use mesh_testkit::{Bootstrap, Envoy, Upstream};

const DEFAULT_MINUTES: u64 = 10;
const DEFAULT_RATE: u64 = 200;
/// Client threads; each sends its share of the schedule on one keep-alive connection.
const CLIENTS: u64 = 8;
/// API keys, tenants: enough distinct values to fill tables and label budgets.
const API_KEYS: u64 = 5_000;
const TENANTS: u64 = 2_000;

const RATELIMIT: &str = r#"{"rules": [{"name": "per-api-key", "match": {"path_prefix": "/api"},
    "key": [{"header": "x-api-key"}], "limit": {"requests": 5, "per": "1s"}}], "max_keys": 1000}"#;
const CIRCUIT_BREAKER: &str = r#"{"rules": [{"name": "payments", "match": {"path_prefix": "/payments"},
    "scope": {"header": "x-tenant"}, "window": {"kind": "count", "size": 20}, "minimum_calls": 10,
    "failure_rate_percent": 50, "open_for": "5s", "half_open_calls": 2}], "max_breakers": 500}"#;
const LB_HINTS: &str = r#"{"rules": [{"name": "reviews", "match": {"path_prefix": "/reviews"},
    "header": "x-mesh-target", "targets": [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}],
    "algorithm": "weighted_round_robin"}]}"#;
const METRICS: &str =
    r#"{"labels": {"custom": [{"name": "tenant", "header": "x-tenant"}]}, "max_series": 500}"#;

/// One minute of results.
#[derive(Default, Clone)]
struct Minute {
    sent: u64,
    errors: u64,
    latencies_us: Vec<u64>,
    rss_kib: u64,
}

pub fn run(args: &[String]) -> Result<(), String> {
    let number = |i: usize, default: u64| -> Result<u64, String> {
        args.get(i).map_or(Ok(default), |a| {
            a.parse().map_err(|_| {
                format!("usage: cargo xtask soak [minutes] [requests per second]; got {a}")
            })
        })
    };
    let minutes = number(0, DEFAULT_MINUTES)?.max(1);
    let rate = number(1, DEFAULT_RATE)?.max(1);
    crate::build::build_all()?;
    let v1 = Upstream::start("v1");
    let v2 = Upstream::start("v2");
    let envoy = Envoy::start_with(
        &Bootstrap::new()
            .stat_tags(&["tenant"])
            .all_four(METRICS, RATELIMIT, LB_HINTS, CIRCUIT_BREAKER)
            .reviews_routes()
            .route("api", "/api", "v1")
            .route("payments", "/payments", "v2")
            .route("default", "/", "v1")
            .cluster("v1", v1.port())
            .cluster("v2", v2.port())
            .yaml(),
        2,
    )
    .map_err(|f| format!("Envoy did not start ({:?}):\n{}", f.status, f.log))?;
    println!(
        "==> soak: {minutes} min at {rate} req/s through metrics, ratelimit, lb-hints, circuit-breaker (Envoy RSS at start {} KiB)",
        envoy.rss_kib()
    );

    let results = Arc::new(Mutex::new(vec![Minute::default(); minutes as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now() + Duration::from_millis(200);
    let total = minutes * 60 * rate;
    let port = envoy.port();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (results, stop) = (Arc::clone(&results), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut client = Client::new(port);
                for i in (k..total).step_by(CLIENTS as usize) {
                    // Request i is due at start + i / rate.
                    let due = start + Duration::from_micros(i * 1_000_000 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let sent = Instant::now();
                    let ok = one_request(&mut client, i);
                    let took = sent.elapsed().as_micros() as u64;
                    let minute = (i / rate / 60) as usize;
                    if let Ok(mut r) = results.lock() {
                        if let Some(m) = r.get_mut(minute) {
                            m.sent += 1;
                            m.errors += u64::from(!ok);
                            m.latencies_us.push(took);
                        }
                    }
                }
            })
        })
        .collect();

    // RSS at the end of each minute, and progress.
    for minute in 0..minutes as usize {
        let end = start + Duration::from_secs(60 * (minute as u64 + 1));
        if let Some(wait) = end.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let rss = envoy.rss_kib();
        if let Ok(mut r) = results.lock() {
            if let Some(m) = r.get_mut(minute) {
                m.rss_kib = rss;
                println!(
                    "    minute {:>2}: {} sent so far this minute, {} errors, RSS {rss} KiB",
                    minute + 1,
                    m.sent,
                    m.errors
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }

    let log = envoy.log();
    let panics = log.lines().filter(|l| l.contains("panic")).count();
    let results = results.lock().map_err(|_| "results lock poisoned")?.clone();
    println!("\n| minute | requests | errors | p50 ms | p99 ms | Envoy RSS KiB |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    let (mut sent, mut errors) = (0, 0);
    for (i, m) in results.iter().enumerate() {
        let mut lat = m.latencies_us.clone();
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .map_or(0.0, |us| *us as f64 / 1000.0)
        };
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {} |",
            i + 1,
            m.sent,
            m.errors,
            pct(0.50),
            pct(0.99),
            m.rss_kib
        );
        sent += m.sent;
        errors += m.errors;
    }
    let stat = |name: &str, labels: &[(&str, &str)]| envoy.metric(name, labels).unwrap_or(0.0);
    println!(
        "\ntotal: {sent} requests, {errors} errors; upstream v1 saw {}, v2 saw {}; log lines with \"panic\": {panics}",
        v1.requests(),
        v2.requests()
    );
    println!(
        "ratelimit allowed {} limited {}; breaker opened {} times, rejected {}; lb-hints picks v1 {} v2 {}",
        stat("mesh_ratelimit_requests_total", &[("rule", "per-api-key"), ("decision", "allowed")]),
        stat("mesh_ratelimit_requests_total", &[("rule", "per-api-key"), ("decision", "limited")]),
        stat("mesh_circuit_opened_total", &[("rule", "payments")]),
        stat("mesh_circuit_rejected_total", &[("rule", "payments")]),
        stat("mesh_lb_picks_total", &[("rule", "reviews"), ("target", "v1")]),
        stat("mesh_lb_picks_total", &[("rule", "reviews"), ("target", "v2")]),
    );
    if errors > 0 || panics > 0 || sent < total * 99 / 100 {
        return Err(format!(
            "soak failed: {errors} errors, {panics} panic lines, {sent} of {total} requests sent"
        ));
    }
    Ok(())
}

/// Sends request `i` of the mix; whether its answer is one the configuration explains.
fn one_request(client: &mut Client, i: u64) -> bool {
    // A cheap scramble so keys and tenants do not march in step with the mix.
    let r = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11;
    let tenant = format!("tenant-{}", r % TENANTS);
    match i % 3 {
        0 => {
            // One key in ten is the hot one: it gets limited.
            let key = if r.is_multiple_of(10) {
                "hot".to_string()
            } else {
                format!("key-{}", r % API_KEYS)
            };
            let answer = client.get("/api/items", &[("x-api-key", &key), ("x-tenant", &tenant)]);
            matches!(
                answer,
                Ok(Response {
                    status: 200 | 429,
                    ..
                })
            )
        }
        1 => {
            // One payment in ten is from tenant "flaky", which fails 60% of
            // its calls (its breaker opens, probes, opens again); the other
            // tenants fail one call in a hundred.
            let (tenant, fail) = if r.is_multiple_of(10) {
                ("flaky".to_string(), (r / 10) % 5 < 3)
            } else {
                (tenant, (r / 10).is_multiple_of(100))
            };
            let status = if fail { "503" } else { "200" };
            let answer = client.get(
                "/payments",
                &[("x-tenant", &tenant), ("x-upstream-status", status)],
            );
            match answer {
                Ok(a) if a.status == 200 => !fail,
                Ok(a) if a.status == 503 => fail || a.header("x-mesh-circuit").is_some(),
                _ => false,
            }
        }
        _ => {
            let answer = client.get("/reviews", &[("x-tenant", &tenant)]);
            answer.is_ok_and(|a| {
                a.status == 200 && matches!(a.header("x-served-by"), Some("v1" | "v2"))
            })
        }
    }
}
