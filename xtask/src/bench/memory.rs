//! Envoy's resident memory after a million requests with distinct keys
//! (the filters' state is bounded).

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::cases::{Case, Running};
use super::wrk::{self, Load};
use super::Options;

#[derive(Serialize)]
pub(crate) struct Memory {
    pub(crate) requests: u64,
    pub(crate) rss_start_kib: u64,
    pub(crate) rss_after_kib: u64,
    /// Stats our filters defined (`wasmcustom.*`): bounded whatever the keys.
    pub(crate) filter_stats: usize,
}

/// A fresh Envoy, then wrk with a new key per request until `memory_requests`.
pub(crate) fn measure_memory(
    envoy: &Path,
    wrk: &Path,
    root: &Path,
    case: &Case,
    opts: &Options,
) -> Result<Memory, String> {
    if let Some(why) = case.unavailable(root) {
        return Err(why);
    }
    let mut running = Running::start(envoy, root, case)?;
    running.wait_answering(case, Instant::now())?;
    let rss_start_kib = running.rss_kib();
    let mut requests = 0;
    let mut seconds = 5;
    while requests < opts.memory_requests {
        let sample = wrk::run(
            wrk,
            &running,
            case.listener_port,
            Load::of(opts, seconds, true),
        )?;
        requests += sample.requests;
        // Size the last run so the total lands just past the target.
        let left = opts.memory_requests.saturating_sub(requests) as f64;
        seconds = (left / sample.rps.max(1.0)).ceil().clamp(1.0, 30.0) as u32;
    }
    let filter_stats = mesh_testkit::http::get(case.admin_port, "/stats?filter=wasmcustom", &[])
        .map(|r| r.body_text().lines().count())
        .unwrap_or(0);
    Ok(Memory {
        requests,
        rss_start_kib,
        rss_after_kib: running.rss_kib(),
        filter_stats,
    })
}
