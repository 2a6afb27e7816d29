//! Envoy's resident memory: after a million requests with distinct keys
//! (the filters' state is bounded), and with several workers (a Wasm VM
//! per worker and plugin).

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::cases::{Case, Running};
use super::wrk::{self, Load};
use super::{Options, WARMUP_SECONDS};

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

/// Workers of the multi-worker measurement: each holds its own VM per plugin.
pub(crate) const WORKERS: u32 = 4;

/// Envoy with `WORKERS` workers, after the warm-up traffic.
#[derive(Serialize)]
pub(crate) struct WorkerMemory {
    pub(crate) concurrency: u32,
    /// VmRSS (/proc/<pid>/status): what the kernel holds for the process,
    /// V8's own mappings (code, Wasm memories) included.
    pub(crate) rss_kib: u64,
    /// Envoy's `server.memory_allocated` and `server.memory_heap_size`: its
    /// allocator's view only, which does not see memory V8 maps itself.
    pub(crate) allocated_kib: u64,
    pub(crate) heap_kib: u64,
}

/// A fresh Envoy with `WORKERS` workers, warmed up like the rounds (so every
/// worker has served requests through its VMs), then its memory.
pub(crate) fn measure_worker_memory(
    envoy: &Path,
    wrk: &Path,
    root: &Path,
    case: &Case,
    opts: &Options,
) -> Result<WorkerMemory, String> {
    if let Some(why) = case.unavailable(root) {
        return Err(why);
    }
    let mut running = Running::start_with(envoy, root, case, WORKERS)?;
    running.wait_answering(case, Instant::now())?;
    wrk::run(
        wrk,
        &running,
        case.listener_port,
        Load::of(opts, WARMUP_SECONDS + 1, false),
    )?;
    let stat = |name: &str| -> u64 {
        mesh_testkit::http::get(case.admin_port, &format!("/stats?filter=^{name}$"), &[])
            .map(|r| r.body_text())
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: "))?.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(WorkerMemory {
        concurrency: WORKERS,
        rss_kib: running.rss_kib(),
        allocated_kib: stat("server.memory_allocated") / 1024,
        heap_kib: stat("server.memory_heap_size") / 1024,
    })
}
