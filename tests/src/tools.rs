//! Tools the tests run that come as Go programs (func-e, envoyproxy/ratelimit,
//! Helm, ...): built from the Go module proxy at a pinned version into the
//! project's tool folder, `.tools/go/<name>@<version>/bin`, once per machine.
//! A new pin gets a new folder, so a stale build is never picked up. Go's
//! module and build caches live in `.tools/go/` too ([`go_command`]): a run
//! caches only what it built itself, inside the repository's ignored folders.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// One `go install` at a time within this process (each is CPU-bound; two
/// test processes racing for the same folder both produce the same binary).
static GO: Mutex<()> = Mutex::new(());

/// The path of `binary`, built by `go install <package>@<version>` when it is
/// not in the tool folder yet. `package` is the Go package path of the main
/// package (e.g. `github.com/tetratelabs/func-e/cmd/func-e`); `version` a tag
/// or a commit (pin one: `@latest` is not reproducible).
pub fn go_install(package: &str, version: &str, binary: &str) -> Result<PathBuf, String> {
    let name = package.rsplit('/').next().unwrap_or(package);
    let dir = crate::repo_root()
        .join(".tools/go")
        .join(format!("{name}@{version}"))
        .join("bin");
    let path = dir.join(binary);
    if path.is_file() {
        return Ok(path);
    }
    let _guard = GO.lock().unwrap_or_else(|e| e.into_inner());
    if path.is_file() {
        return Ok(path);
    }
    eprintln!("{binary}: not built yet; go install {package}@{version}");
    let started = std::time::Instant::now();
    let out = go_command()?
        .args(["install", &format!("{package}@{version}")])
        .env("GOBIN", &dir)
        .env("CGO_ENABLED", "0")
        .output()
        .map_err(|e| format!("go install: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "go install {package}@{version} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    eprintln!("{binary}: built in {:.0?}", started.elapsed());
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "go install {package}@{version} made no {}",
            path.display()
        ))
    }
}

/// `go` with the project's caches: modules in `.tools/go/mod`, builds in
/// `.tools/go/cache` (made writable, so `rm -rf .tools` works).
pub fn go_command() -> Result<Command, String> {
    let tools = crate::repo_root().join(".tools/go");
    let mut cmd = Command::new(go_binary()?);
    cmd.env("GOMODCACHE", tools.join("mod"))
        .env("GOCACHE", tools.join("cache"))
        .env("GOFLAGS", "-modcacherw");
    Ok(cmd)
}

/// The Go toolchain: `$GO`, else `go` on PATH, else /usr/local/go/bin/go.
pub fn go_binary() -> Result<PathBuf, String> {
    if let Some(go) = std::env::var_os("GO") {
        return Ok(PathBuf::from(go));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/local/go/bin")])
        .map(|dir| dir.join("go"))
        .find(|p| p.is_file())
        .ok_or_else(|| "no Go toolchain: install Go 1.26 (or set $GO)".to_string())
}
