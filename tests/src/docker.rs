//! A private Docker Engine for the tests: Debian's `docker.io` (installed when
//! missing and run as root), its own socket, data root, exec root and pidfile
//! in a scratch folder, `vfs` storage, no iptables rules and no bridge (the
//! containers use host networking, as `envoy/docker-compose.yaml` does). It
//! never touches a system daemon. On drop every container is removed and the
//! daemon (with the containerd it started) is stopped, also when a test fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::debian;

pub struct Docker {
    daemon: Child,
    dir: PathBuf,
    cli: PathBuf,
    compose: Vec<PathBuf>,
    legacy_builder: bool,
}

impl Docker {
    /// The daemon the tests of one process share: started by the first
    /// caller, stopped when the last holder drops it.
    pub fn shared() -> Result<Arc<Docker>, String> {
        static SHARED: Mutex<Weak<Docker>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(docker) = slot.upgrade() {
            return Ok(docker);
        }
        let docker = Arc::new(Docker::start()?);
        *slot = Arc::downgrade(&docker);
        Ok(docker)
    }

    /// Starts a daemon and waits until it answers.
    pub fn start() -> Result<Docker, String> {
        let dockerd = debian::ensure("docker.io", "dockerd")?;
        let cli = debian::ensure("docker.io", "docker")?;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mesh-docker-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = fs::File::create(dir.join("dockerd.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(dockerd);
        cmd.arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .args([
                "--storage-driver",
                "vfs",
                "--iptables=false",
                "--bridge=none",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        // Its own process group, so that what it starts (containerd) can be
        // stopped with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let daemon = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
        let mut docker = Docker {
            daemon,
            dir,
            cli,
            compose: Vec::new(),
            legacy_builder: false,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !docker
            .cli()
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            if let Ok(Some(status)) = docker.daemon.try_wait() {
                return Err(format!("dockerd exited ({status}):\n{}", docker.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("dockerd not answering:\n{}", docker.log()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        docker.compose = docker.find_compose()?;
        docker.legacy_builder = !docker.has_plugin("buildx");
        Ok(docker)
    }

    /// `docker` talking to this daemon. `docker build` uses the legacy
    /// builder when buildx is missing (Debian's docker.io has none).
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(&self.cli);
        cmd.env("DOCKER_HOST", self.host())
            .env("DOCKER_CONFIG", self.dir.join("client"));
        if self.legacy_builder {
            cmd.env("DOCKER_BUILDKIT", "0");
        }
        cmd
    }

    /// `docker compose` (the v2 plugin) where the CLI has it, else Debian's
    /// v1 `docker-compose`, talking to this daemon.
    pub fn compose(&self) -> Command {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .env("DOCKER_HOST", self.host())
            .env("DOCKER_CONFIG", self.dir.join("client"));
        cmd
    }

    /// How [`Docker::compose`] is invoked: `docker compose` or `docker-compose`.
    pub fn compose_name(&self) -> &'static str {
        if self.compose.len() > 1 {
            "docker compose"
        } else {
            "docker-compose"
        }
    }

    fn find_compose(&self) -> Result<Vec<PathBuf>, String> {
        if self.has_plugin("compose") {
            return Ok(vec![self.cli.clone(), PathBuf::from("compose")]);
        }
        Ok(vec![debian::ensure("docker-compose", "docker-compose")?])
    }

    fn has_plugin(&self, name: &str) -> bool {
        Command::new(&self.cli)
            .args([name, "version"])
            .env("DOCKER_HOST", self.host())
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn host(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }

    /// Runs a command of this daemon's, failing with its output.
    pub fn run(cmd: &mut Command) -> Result<Output, String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(format!(
                "{cmd:?} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `docker version` of the engine, the CLI and the compose tool, for the
    /// README's "tested with".
    pub fn versions(&self) -> Result<String, String> {
        let version = |cmd: &mut Command| -> Result<String, String> {
            Ok(String::from_utf8_lossy(&Self::run(cmd)?.stdout)
                .trim()
                .to_string())
        };
        let engine = version(
            self.cli()
                .args(["version", "--format", "{{.Server.Version}}"]),
        )?;
        let cli = version(
            self.cli()
                .args(["version", "--format", "{{.Client.Version}}"]),
        )?;
        let compose = version(self.compose().args(["version", "--short"]))?;
        Ok(format!(
            "Docker Engine {engine}, docker CLI {cli}, {} {compose}",
            self.compose_name()
        ))
    }

    /// A stand-in for the official `envoyproxy/envoy:<tag>` image (nothing can
    /// be pulled here), with its contract: `envoy` on PATH and an entrypoint
    /// that runs `envoy "$@"` when the first argument starts with `-` and the
    /// command as given otherwise. The image holds the Envoy binary `envoy`
    /// (a real executable, not PyPI's Python launcher), the shared objects
    /// it and `/bin/sh` need, and the entrypoint script.
    pub fn build_envoy_image(&self, envoy: &Path, image: &str) -> Result<(), String> {
        let root = self.dir.join("envoy-image");
        let _ = fs::remove_dir_all(&root);
        let put = |from: &Path, to: &str| -> Result<(), String> {
            let dest = root.join(to.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().unwrap()).map_err(|e| e.to_string())?;
            // A hard link where possible: Envoy is ~100 MiB.
            fs::hard_link(from, &dest)
                .or_else(|_| fs::copy(from, &dest).map(|_| ()))
                .map_err(|e| format!("{} -> {}: {e}", from.display(), dest.display()))
        };
        let sh = PathBuf::from("/bin/sh");
        put(envoy, "/usr/local/bin/envoy")?;
        put(
            &fs::canonicalize(&sh).map_err(|e| e.to_string())?,
            "/bin/sh",
        )?;
        for lib in shared_objects(&[envoy, &sh])? {
            let real = fs::canonicalize(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
            put(&real, &lib.to_string_lossy())?;
        }
        let entrypoint = root.join("docker-entrypoint.sh");
        fs::write(
            &entrypoint,
            "#!/bin/sh\nset -e\n# As the official image: options are for envoy.\ncase \"$1\" in -*) set -- envoy \"$@\" ;; esac\nexec \"$@\"\n",
        )
        .map_err(|e| e.to_string())?;
        fs::set_permissions(
            &entrypoint,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(|e| e.to_string())?;
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["--owner=0", "--group=0", "-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("tar: {e}"))?;
        let imported = Self::run(
            self.cli()
                .args([
                    "import",
                    "--change",
                    r#"ENTRYPOINT ["/docker-entrypoint.sh"]"#,
                ])
                .args(["--change", "ENV PATH=/usr/local/bin:/usr/bin:/bin"])
                .args(["-", image])
                .stdin(tar.stdout.take().unwrap()),
        );
        let tar_status = tar.wait().map_err(|e| e.to_string())?;
        let _ = fs::remove_dir_all(&root);
        imported?;
        if tar_status.success() {
            Ok(())
        } else {
            Err(format!("tar of the image root failed: {tar_status}"))
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// Ids of all containers, running or not.
    pub fn containers(&self) -> Vec<String> {
        self.cli()
            .args(["ps", "-aq"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The shared objects (`.so` files) `ldd` lists for these binaries (absolute paths).
fn shared_objects(binaries: &[&Path]) -> Result<Vec<PathBuf>, String> {
    let out = Docker::run(Command::new("ldd").args(binaries))?;
    let mut libs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .filter(|p| !p.to_string_lossy().ends_with(':'))
        .collect();
    libs.sort();
    libs.dedup();
    Ok(libs)
}

impl Drop for Docker {
    fn drop(&mut self) {
        let leftovers = self.containers();
        if !leftovers.is_empty() {
            let _ = self.cli().args(["rm", "-f"]).args(&leftovers).output();
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            // Few lines: what the test itself said (just above) must stay
            // in view at the end of a CI log.
            eprintln!(
                "---- dockerd log (last lines) ----\n{}",
                lines[lines.len().saturating_sub(8)..].join("\n")
            );
        }
        // SIGTERM: dockerd stops its containers and containerd, then exits.
        let pid = self.daemon.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.daemon.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Whatever is left of its process group (the daemon itself if it hung).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.daemon.wait();
        // dockerd leaves its network namespace mounted (exec/netns/default).
        for mount in mounts_under(&self.dir) {
            let _ = Command::new("umount").arg(mount).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Mount points inside `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut found: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.len()));
    found
}
