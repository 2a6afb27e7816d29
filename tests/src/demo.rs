//! The demo (README command 1): `envoy/demo.yaml` in a real Envoy in front of
//! two upstream versions, and traffic that shows each filter at work. It lives
//! here so a test can run exactly what `cargo xtask demo` runs.

use std::path::Path;

use std::time::{Duration, Instant};

use crate::envoy::metric_value;
use crate::http::{self, Client};
use crate::{Envoy, Upstream};

/// Ports fixed by `envoy/demo.yaml`.
pub const LISTENER: u16 = 10000;
pub const ADMIN: u16 = 9901;
pub const UPSTREAM_V1: u16 = 8081;
pub const UPSTREAM_V2: u16 = 8082;

/// What the demo showed, for the summary and for the test that runs it.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Status codes of alice's requests to the rate-limited API.
    pub ratelimit_statuses: Vec<u16>,
    /// Status of bob's first request (his own bucket).
    pub ratelimit_other_key: u16,
    /// `mesh_ratelimit_requests_total` as scraped: (decision, count).
    pub ratelimit_stats: Vec<(String, f64)>,
    /// Failing calls to /payments before the breaker answered locally.
    pub breaker_failures_before_open: usize,
    /// Local answers while open: (status, `x-mesh-circuit`).
    pub breaker_local_answers: Vec<(u16, String)>,
    /// Requests v2 saw while the breaker was open (should be 0).
    pub breaker_upstream_calls_while_open: u64,
    /// Statuses after `open_for`, once the probes succeeded.
    pub breaker_after_recovery: Vec<u16>,
    /// 100 requests to /reviews: served by (v1, v2).
    pub canary_split: (usize, usize),
    /// `mesh_requests_total` per route as scraped.
    pub metrics_requests: Vec<(String, f64)>,
    pub summary: Vec<String>,
}

/// The running demo: upstreams and Envoy stop when it drops.
pub struct Demo {
    pub envoy: Envoy,
    pub v1: Upstream,
    pub v2: Upstream,
}

impl Demo {
    /// Where [`drive_to`] sends the traffic for this demo.
    pub fn target(&self) -> Target<'_> {
        Target {
            listener: self.envoy.port(),
            admin: self.envoy.admin_port(),
            v2: &self.v2,
        }
    }
}

/// An Envoy running `envoy/demo.yaml`, however it was started (our own
/// process, `docker compose`, `func-e run`): its listener and admin ports, and
/// the v2 upstream, whose request count shows what the breaker kept away.
pub struct Target<'a> {
    pub listener: u16,
    pub admin: u16,
    pub v2: &'a Upstream,
}

impl<'a> Target<'a> {
    /// `envoy/demo.yaml` as written: its fixed listener and admin ports.
    pub fn fixed_ports(v2: &'a Upstream) -> Target<'a> {
        Target {
            listener: LISTENER,
            admin: ADMIN,
            v2,
        }
    }
}

/// The demo's upstreams v1 and v2 on their fixed ports.
pub fn start_upstreams() -> Result<(Upstream, Upstream), String> {
    let busy = |port: u16, e: std::io::Error| {
        format!("cannot listen on 127.0.0.1:{port} ({e}); is another demo or service using it?")
    };
    let v1 = Upstream::start_on("v1", UPSTREAM_V1).map_err(|e| busy(UPSTREAM_V1, e))?;
    let v2 = Upstream::start_on("v2", UPSTREAM_V2).map_err(|e| busy(UPSTREAM_V2, e))?;
    Ok((v1, v2))
}

/// Waits until an Envoy started by someone else (a container, func-e) answers
/// `/ready` on the demo's admin port and accepts connections on its listener.
/// `exited` is asked in between and says why it never will (e.g. the container
/// stopped); its error ends the wait.
pub fn wait_until_serving(
    timeout: Duration,
    exited: &mut dyn FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = http::get(ADMIN, "/ready", &[]).is_ok_and(|r| r.status == 200);
        if ready && std::net::TcpStream::connect(("127.0.0.1", LISTENER)).is_ok() {
            return Ok(());
        }
        exited()?;
        if Instant::now() > deadline {
            return Err(format!(
                "Envoy not serving on 127.0.0.1:{LISTENER} (admin :{ADMIN}) after {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts the upstreams and Envoy with `config` (a path relative to the repository root).
pub fn start(config: &Path) -> Result<Demo, String> {
    let (v1, v2) = start_upstreams()?;
    let envoy = Envoy::start_file(config, 2).map_err(|f| {
        let problems: Vec<&str> = f
            .log
            .lines()
            .filter(|l| l.contains("][error]") || l.contains("][critical]"))
            .collect();
        format!(
            "Envoy did not start ({:?}):\n{}",
            f.status,
            problems.join("\n")
        )
    })?;
    Ok(Demo { envoy, v1, v2 })
}

/// Drives the demo traffic through our own demo Envoy, reporting progress through `say`.
pub fn drive(demo: &Demo, say: &mut dyn FnMut(&str)) -> Result<Report, String> {
    drive_to(&demo.target(), say)
}

/// Drives the demo traffic through any Envoy running `envoy/demo.yaml`.
pub fn drive_to(demo: &Target, say: &mut dyn FnMut(&str)) -> Result<Report, String> {
    let mut report = Report::default();
    let port = demo.listener;
    let io = |e: std::io::Error| format!("request failed: {e}");

    say("1. ratelimit: rule \"per-api-key\" allows 5 requests a minute per x-api-key on route \"api\"");
    let mut client = Client::new(port);
    let mut last = None;
    for _ in 0..8 {
        let r = client
            .get("/api/items", &[("x-api-key", "alice")])
            .map_err(io)?;
        report.ratelimit_statuses.push(r.status);
        last = Some(r);
    }
    let statuses: Vec<String> = report
        .ratelimit_statuses
        .iter()
        .map(u16::to_string)
        .collect();
    say(&format!(
        "   alice, 8 requests:       {}",
        statuses.join(" ")
    ));
    if let Some(r) = &last {
        say(&format!(
            "   the last answer:         {} {}, retry-after: {}, RateLimit: {}",
            r.status,
            r.body_text().trim(),
            r.header("retry-after").unwrap_or("-"),
            r.header("ratelimit").unwrap_or("-")
        ));
    }
    report.ratelimit_other_key = client
        .get("/api/items", &[("x-api-key", "bob")])
        .map_err(io)?
        .status;
    say(&format!(
        "   bob, his own bucket:     {}",
        report.ratelimit_other_key
    ));
    let scrape = prometheus(demo);
    for decision in ["allowed", "limited"] {
        let labels = [("rule", "per-api-key"), ("decision", decision)];
        let count = metric_value(&scrape, "mesh_ratelimit_requests_total", &labels).unwrap_or(0.0);
        report.ratelimit_stats.push((decision.to_string(), count));
    }
    say(&format!(
        "   /stats/prometheus:       mesh_ratelimit_requests_total{{rule=\"per-api-key\"}} allowed={} limited={}",
        report.ratelimit_stats[0].1, report.ratelimit_stats[1].1
    ));

    say("");
    circuit_breaker(demo, &mut report, say)?;
    say("");
    lb_hints(demo, &mut report, say)?;
    say("");
    metrics(demo, &mut report, say);

    let allowed = report
        .ratelimit_statuses
        .iter()
        .filter(|s| **s == 200)
        .count();
    report.summary.push(format!(
        "ratelimit        {allowed} of 8 allowed for one key, the rest answered 429; another key unaffected ({})",
        report.ratelimit_other_key
    ));
    report.summary.push(format!(
        "circuit-breaker  opened after {} failures; {} local 503s with x-mesh-circuit: open while v2 saw {} calls; closed again after open_for ({})",
        report.breaker_failures_before_open,
        report.breaker_local_answers.len(),
        report.breaker_upstream_calls_while_open,
        report.breaker_after_recovery.iter().map(u16::to_string).collect::<Vec<_>>().join(" ")
    ));
    report.summary.push(format!(
        "lb-hints         100 requests to /reviews at 90/10: v1 served {}, v2 served {}",
        report.canary_split.0, report.canary_split.1
    ));
    let total: f64 = report.metrics_requests.iter().map(|(_, v)| v).sum();
    report.summary.push(format!(
        "metrics          mesh_requests_total counted {total} requests over {} routes",
        report.metrics_requests.len()
    ));
    Ok(report)
}

fn prometheus(demo: &Target) -> String {
    http::get(demo.admin, "/stats/prometheus", &[])
        .map(|r| r.body_text())
        .unwrap_or_default()
}

fn circuit_breaker(
    demo: &Target,
    report: &mut Report,
    say: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("request failed: {e}");
    say("2. circuit-breaker: rule \"payments\" opens at 50% failures after 5 calls, for 3s, then probes twice");
    let mut client = Client::new(demo.listener);
    let fail = [("x-upstream-status", "503")];
    let mut statuses = Vec::new();
    loop {
        let r = client.get("/payments", &fail).map_err(io)?;
        if r.header("x-mesh-circuit").is_some() {
            break;
        }
        statuses.push(r.status);
        if statuses.len() > 20 {
            return Err("the breaker did not open after 20 failing calls".into());
        }
    }
    report.breaker_failures_before_open = statuses.len();
    say(&format!(
        "   v2 told to fail:         {} (then the breaker opened)",
        statuses
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let seen_before = demo.v2.requests();
    for _ in 0..5 {
        let r = client.get("/payments", &[]).map_err(io)?;
        report.breaker_local_answers.push((
            r.status,
            r.header("x-mesh-circuit").unwrap_or("-").to_string(),
        ));
    }
    report.breaker_upstream_calls_while_open = demo.v2.requests() - seen_before;
    say(&format!(
        "   while open, 5 requests:  {} x-mesh-circuit: {}; v2 saw {} of them",
        report
            .breaker_local_answers
            .iter()
            .map(|(s, _)| s.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        report
            .breaker_local_answers
            .first()
            .map(|(_, c)| c.as_str())
            .unwrap_or("-"),
        report.breaker_upstream_calls_while_open
    ));
    say("   waiting for open_for (3s) to pass ...");
    std::thread::sleep(std::time::Duration::from_secs(3));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while report.breaker_after_recovery.len() < 4 {
        let r = client.get("/payments", &[]).map_err(io)?;
        if r.status == 200 || !report.breaker_after_recovery.is_empty() {
            report.breaker_after_recovery.push(r.status);
        } else if std::time::Instant::now() > deadline {
            return Err("the breaker did not let probes through after open_for".into());
        } else {
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
    say(&format!(
        "   after open_for:          {} (2 probes succeeded: closed)",
        report
            .breaker_after_recovery
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    Ok(())
}

fn lb_hints(demo: &Target, report: &mut Report, say: &mut dyn FnMut(&str)) -> Result<(), String> {
    say("3. lb-hints: rule \"reviews-canary\" sends 90% of /reviews to v1 and 10% to v2 (smooth weighted round robin)");
    let mut client = Client::new(demo.listener);
    for _ in 0..100 {
        let r = client
            .get("/reviews", &[])
            .map_err(|e| format!("request failed: {e}"))?;
        match r.header("x-served-by") {
            Some("v1") => report.canary_split.0 += 1,
            Some("v2") => report.canary_split.1 += 1,
            other => return Err(format!("/reviews answered {} from {other:?}", r.status)),
        }
    }
    say(&format!(
        "   100 requests:            v1 served {}, v2 served {}",
        report.canary_split.0, report.canary_split.1
    ));
    let forced = client
        .get("/reviews", &[("x-mesh-force-target", "v2")])
        .map_err(|e| format!("request failed: {e}"))?;
    say(&format!(
        "   x-mesh-force-target: v2  served by {}",
        forced.header("x-served-by").unwrap_or("-")
    ));
    Ok(())
}

fn metrics(demo: &Target, report: &mut Report, say: &mut dyn FnMut(&str)) {
    say("4. metrics: RED metrics per route, method, status and cluster, from Envoy's /stats/prometheus");
    let scrape = prometheus(demo);
    let mut per_route: Vec<(String, f64)> = Vec::new();
    for line in scrape
        .lines()
        .filter(|l| l.starts_with("mesh_requests_total{"))
    {
        let route = line
            .split("route=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("-")
            .to_string();
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        match per_route.iter_mut().find(|(r, _)| *r == route) {
            Some((_, total)) => *total += value,
            None => per_route.push((route, value)),
        }
        say(&format!("   {line}"));
    }
    report.metrics_requests = per_route;
}

/// Sends the demo's traffic to `demo` (a fresh Envoy) and checks what every
/// run must show, whichever way Envoy was started: panics with the demo's
/// output otherwise.
pub fn drive_and_check(demo: &Target) {
    let mut lines = Vec::new();
    let report = drive_to(demo, &mut |l| lines.push(l.to_string()))
        .unwrap_or_else(|e| panic!("{e}\n{lines:#?}"));
    assert_each_filter_worked(&report, &lines);
}

fn assert_each_filter_worked(report: &Report, lines: &[String]) {
    assert_eq!(
        report.ratelimit_statuses,
        [200, 200, 200, 200, 200, 429, 429, 429],
        "{lines:#?}"
    );
    assert_eq!(report.ratelimit_other_key, 200, "{lines:#?}");
    assert_eq!(
        report.ratelimit_stats,
        [("allowed".to_string(), 6.0), ("limited".to_string(), 3.0)],
        "{lines:#?}"
    );
    assert_eq!(
        report.breaker_failures_before_open, 5,
        "minimum_calls 5 at 100% failures: {lines:#?}"
    );
    assert_eq!(
        report.breaker_local_answers,
        vec![(503, "open".to_string()); 5],
        "{lines:#?}"
    );
    assert_eq!(report.breaker_upstream_calls_while_open, 0, "{lines:#?}");
    assert_eq!(
        report.breaker_after_recovery, [200; 4],
        "2 probes, then closed: {lines:#?}"
    );
    assert_eq!(
        report.canary_split,
        (90, 10),
        "smooth WRR at 90/10 is exact: {lines:#?}"
    );
    let per_route: std::collections::HashMap<_, _> =
        report.metrics_requests.iter().cloned().collect();
    // 8 + 1 to /api; 100 + 1 forced to /reviews (v1 90, v2 10 + 1); /payments: 5 failures, 5 local
    // answers, 4 after recovery, plus any local answers while waiting for open_for.
    assert_eq!(per_route.get("api"), Some(&9.0), "{per_route:?}");
    // Counted under the route lb-hints routed to (the forced request went to v2).
    assert_eq!(per_route.get("reviews-v1"), Some(&90.0), "{per_route:?}");
    assert_eq!(per_route.get("reviews-v2"), Some(&11.0), "{per_route:?}");
    assert!(
        per_route.get("payments").is_some_and(|n| *n >= 14.0),
        "{per_route:?}"
    );
    assert_eq!(report.summary.len(), 4);
}
