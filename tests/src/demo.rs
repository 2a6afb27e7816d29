//! The demo (README command 1): `envoy/demo.yaml` in a real Envoy in front of
//! two upstream versions, and traffic that shows each filter at work. It lives
//! here so a test can run exactly what `cargo xtask demo` runs.

use std::path::Path;

use crate::envoy::metric_value;
use crate::http::Client;
use crate::{Envoy, Upstream};

/// Ports fixed by `envoy/demo.yaml`.
pub const LISTENER: u16 = 10000;
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
    pub summary: Vec<String>,
}

/// The running demo: upstreams and Envoy stop when it drops.
pub struct Demo {
    pub envoy: Envoy,
    pub v1: Upstream,
    pub v2: Upstream,
}

/// Starts the upstreams and Envoy with `config` (a path relative to the repository root).
pub fn start(config: &Path) -> Result<Demo, String> {
    let busy = |port: u16, e: std::io::Error| {
        format!("cannot listen on 127.0.0.1:{port} ({e}); is another demo or service using it?")
    };
    let v1 = Upstream::start_on("v1", UPSTREAM_V1).map_err(|e| busy(UPSTREAM_V1, e))?;
    let v2 = Upstream::start_on("v2", UPSTREAM_V2).map_err(|e| busy(UPSTREAM_V2, e))?;
    let envoy = Envoy::start_file(config, 2)
        .map_err(|f| format!("Envoy did not start ({:?}); its log:\n{}", f.status, f.log))?;
    Ok(Demo { envoy, v1, v2 })
}

/// Drives the demo traffic, reporting progress through `say`.
pub fn drive(demo: &Demo, say: &mut dyn FnMut(&str)) -> Result<Report, String> {
    let mut report = Report::default();
    let port = demo.envoy.port();
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
    let scrape = demo.envoy.prometheus();
    for decision in ["allowed", "limited"] {
        let labels = [("rule", "per-api-key"), ("decision", decision)];
        let count = metric_value(&scrape, "mesh_ratelimit_requests_total", &labels).unwrap_or(0.0);
        report.ratelimit_stats.push((decision.to_string(), count));
    }
    say(&format!(
        "   /stats/prometheus:       mesh_ratelimit_requests_total{{rule=\"per-api-key\"}} allowed={} limited={}",
        report.ratelimit_stats[0].1, report.ratelimit_stats[1].1
    ));

    let allowed = report
        .ratelimit_statuses
        .iter()
        .filter(|s| **s == 200)
        .count();
    report.summary.push(format!(
        "ratelimit        {allowed} of 8 allowed for one key, the rest answered 429; another key unaffected ({})",
        report.ratelimit_other_key
    ));
    Ok(report)
}
