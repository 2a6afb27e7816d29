//! func-e (Tetrate's Envoy launcher), built from the Go module proxy at a
//! pinned release into `.tools/go/`, with the tests' Envoy placed where func-e
//! keeps an installed version, so nothing is downloaded: func-e's data home
//! `envoy-versions/<version>/bin/envoy`, and the version selected in its
//! config home's `envoy-version`, as `func-e use <version>` leaves them.
//! Its folders live in a scratch folder (removed on drop), not in `~`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::tools;

pub const PACKAGE: &str = "github.com/tetratelabs/func-e/cmd/func-e";
pub const VERSION: &str = "v1.6.0";

/// func-e with one installed Envoy version, in its own folders.
pub struct FuncE {
    bin: PathBuf,
    dir: PathBuf,
    envoy: PathBuf,
}

impl FuncE {
    /// Builds func-e if needed and installs `envoy` (an executable, see
    /// [`crate::envoy::executable`]) as func-e's Envoy `version`.
    pub fn with_envoy(envoy: &Path, version: &str) -> Result<FuncE, String> {
        let bin = tools::go_install(PACKAGE, VERSION, "func-e")?;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mesh-func-e-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let installed = dir.join(format!("data/envoy-versions/{version}/bin/envoy"));
        let io = |e: std::io::Error| format!("{}: {e}", installed.display());
        fs::create_dir_all(installed.parent().unwrap()).map_err(io)?;
        fs::create_dir_all(dir.join("config")).map_err(io)?;
        fs::hard_link(envoy, &installed)
            .or_else(|_| fs::copy(envoy, &installed).map(|_| ()))
            .map_err(io)?;
        fs::write(dir.join("config/envoy-version"), version).map_err(io)?;
        Ok(FuncE {
            bin,
            dir,
            envoy: installed,
        })
    }

    /// The func-e binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Where the Envoy func-e runs is installed.
    pub fn installed_envoy(&self) -> &Path {
        &self.envoy
    }

    /// The environment that points func-e at these folders.
    pub fn env(&self) -> Vec<(String, PathBuf)> {
        ["CONFIG", "DATA", "STATE"]
            .iter()
            .map(|d| (format!("FUNC_E_{d}_HOME"), self.dir.join(d.to_lowercase())))
            .chain([("FUNC_E_RUNTIME_DIR".to_string(), self.dir.join("run"))])
            .collect()
    }

    /// `func-e <args>` with [`FuncE::env`].
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.envs(self.env());
        cmd
    }

    /// The func-e release built, from the binary's Go build info
    /// (`func-e --version` says `dev` for a `go install` build).
    pub fn version(&self) -> Result<String, String> {
        let out = Command::new(tools::go_binary()?)
            .args(["version", "-m"])
            .arg(&self.bin)
            .output()
            .map_err(|e| format!("go version -m: {e}"))?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some("mod")
                    && words.next() == Some(PACKAGE.trim_end_matches("/cmd/func-e")))
                .then(|| words.next().map(str::to_string))
                .flatten()
            })
            .ok_or_else(|| {
                format!(
                    "no module version in `go version -m {}`",
                    self.bin.display()
                )
            })
    }

    /// Starts `func-e <args>` from the repository root, its output in a log file.
    pub fn spawn(&self, args: &[&str]) -> Result<Running, String> {
        let log_file = self.dir.join("func-e.log");
        let log = fs::File::create(&log_file).map_err(|e| e.to_string())?;
        let mut cmd = self.command();
        cmd.current_dir(crate::repo_root())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
        Ok(Running { child, log_file })
    }
}

impl Drop for FuncE {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A running `func-e run`: interrupted on drop (func-e then stops Envoy, and
/// Envoy dies with func-e in any case: func-e sets its parent-death signal),
/// then its process group is killed, should anything remain.
pub struct Running {
    child: Child,
    log_file: PathBuf,
}

impl Running {
    /// func-e's output so far (Envoy's log included: func-e passes it on).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// `Err` with the log once func-e has exited.
    pub fn still_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("func-e exited ({status}):\n{}", self.log())),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- func-e log ----\n{}", self.log());
        }
    }
}
