//! Building the filters to `dist/<filter>.wasm`.
//!
//! Two toolchains, chosen at run time:
//! - rustup's `wasm32-unknown-unknown` target (installed here with a time
//!   limit if missing: `rustup target add` has been seen to hang);
//! - otherwise Debian's `rustc-web` with its standard-library source and
//!   `-Zbuild-std`, linked by rustup's `rust-lld` (packages installed when
//!   running as root). `MESH_WASM_TOOLCHAIN=debian` forces this one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{cargo, run};

pub const FILTERS: &[&str] = &[
    "ratelimit",
    "circuit-breaker",
    "lb-hints",
    "metrics",
    "suite",
];

/// Modules built by a cargo run of their own: the suite links the filter
/// crates without their `module` feature, which a shared run would turn on
/// for it too (cargo unifies features), linking the filters' entry points twice.
const BUILT_ALONE: &[&str] = &["suite"];
/// Modules that are not filters (never packaged or pushed), built with the
/// filters so the tests and the bench configs in envoy/bench find them in dist/:
/// the panic probe of the failure-policy tests, the bench's no-op floor and
/// its host-call pricer.
pub const TEST_MODULES: &[&str] = &["panic-probe", "noop", "hostcall-cost"];
pub const TARGET: &str = "wasm32-unknown-unknown";
const DEBIAN_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "rust-web-src"];

#[derive(Clone, Copy)]
pub enum Toolchain {
    Rustup,
    Debian,
}

impl Toolchain {
    /// Cargo's target folder of this toolchain's builds (modules as built,
    /// before wasm-opt, are in `<it>/wasm32-unknown-unknown/release/`).
    pub fn target_dir(&self) -> PathBuf {
        let root = mesh_testkit::repo_root();
        match self {
            Toolchain::Rustup => root.join("target"),
            Toolchain::Debian => root.join("target/debian-wasm"),
        }
    }
}

/// Builds every filter and test module; returns the toolchain used.
pub fn build_all() -> Result<Toolchain, String> {
    let all: Vec<&str> = FILTERS.iter().chain(TEST_MODULES).copied().collect();
    build(&all)
}

/// Builds the named filters (`cargo xtask build ratelimit` builds one).
pub fn build(filters: &[&str]) -> Result<Toolchain, String> {
    if let Some(unknown) = filters
        .iter()
        .find(|f| !FILTERS.contains(f) && !TEST_MODULES.contains(f))
    {
        return Err(format!(
            "unknown filter {unknown}; the filters are {}",
            FILTERS.join(", ")
        ));
    }
    let root = mesh_testkit::repo_root();
    let toolchain = pick_toolchain()?;
    let (alone, shared): (Vec<&str>, Vec<&str>) =
        filters.iter().partition(|f| BUILT_ALONE.contains(f));
    let mut target_dir = root.join("target");
    for group in std::iter::once(shared).chain(alone.into_iter().map(|f| vec![f])) {
        if !group.is_empty() {
            target_dir = cargo_build(&root, toolchain, &group)?;
        }
    }
    let dist = mesh_testkit::dist_dir();
    std::fs::create_dir_all(&dist).map_err(|e| format!("{}: {e}", dist.display()))?;
    let wasm_opt = wasm_opt(&root);
    for filter in filters {
        let built = target_dir
            .join(TARGET)
            .join("release")
            .join(format!("{}.wasm", filter.replace('-', "_")));
        let out = dist.join(format!("{filter}.wasm"));
        let kib = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / 1024.0;
        let module = std::fs::read(&built).map_err(|e| format!("{}: {e}", built.display()))?;
        let (module, kept) =
            crate::exports::trim(&module).map_err(|e| format!("{}: {e}", built.display()))?;
        let trimmed = built.with_extension("trimmed.wasm");
        std::fs::write(&trimmed, &module).map_err(|e| format!("{}: {e}", trimmed.display()))?;
        let optimized = wasm_opt.as_ref().is_some_and(|tool| {
            Command::new(tool)
                .args(WASM_OPT_PASSES)
                .args(WASM_OPT_FEATURES)
                .arg(&trimmed)
                .arg("-o")
                .arg(&out)
                .status()
                .is_ok_and(|s| s.success())
        });
        if !optimized {
            std::fs::copy(&trimmed, &out)
                .map_err(|e| format!("{} -> {}: {e}", trimmed.display(), out.display()))?;
        }
        let mut note = if optimized {
            format!(
                " (wasm-opt {}; {:.1} KiB as built)",
                WASM_OPT_PASSES.join(" "),
                kib(&built)
            )
        } else {
            String::new()
        };
        if let Some(kept) = kept {
            note.push_str(&format!("; stream callbacks: {}", kept.join(", ")));
        }
        println!("    {:<40} {:>7.1} KiB{note}", out.display(), kib(&out));
    }
    Ok(toolchain)
}

/// One cargo build of `group` for wasm32; returns the target directory.
fn cargo_build(root: &Path, toolchain: Toolchain, group: &[&str]) -> Result<PathBuf, String> {
    let packages: Vec<String> = group
        .iter()
        .flat_map(|f| ["-p".to_string(), f.to_string()])
        .collect();
    Ok(match toolchain {
        Toolchain::Rustup => {
            println!("==> building filters with rustup's {TARGET} target");
            run(cargo()
                .current_dir(root)
                .args(["build", "--release", "--target", TARGET])
                .env(
                    "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS",
                    short_source_paths(),
                )
                .args(&packages))?;
            root.join("target")
        }
        Toolchain::Debian => {
            println!("==> building filters with Debian's rustc-web and -Zbuild-std");
            let dir = root.join("target/debian-wasm");
            debian_cargo(root)?
                .args([
                    "build",
                    "--release",
                    "--target",
                    TARGET,
                    "-Zbuild-std=std,panic_abort",
                ])
                .arg("--target-dir")
                .arg(&dir)
                .args(&packages)
                .status()
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    if s.success() {
                        Ok(())
                    } else {
                        Err(format!("Debian wasm build failed ({s})"))
                    }
                })?;
            dir
        }
    })
}

/// rustc flags that cut the builder's folders out of the source paths the
/// module keeps for panic messages (`/root/.cargo/registry/src/index...-hash/`
/// and `/rustc/<commit>/`): 1.4 KiB less in the suite, and the same module
/// whoever builds it. Space-separated, as cargo reads `*_RUSTFLAGS`.
fn short_source_paths() -> String {
    let mut flags = Vec::new();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    if let Some(Ok(indexes)) = cargo_home.map(|h| std::fs::read_dir(h.join("registry/src"))) {
        for index in indexes.flatten() {
            flags.push(format!("--remap-path-prefix={}/=", index.path().display()));
        }
    }
    let version = Command::new("rustc").arg("-vV").output();
    let version = version.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if let Some(commit) = version
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("commit-hash: "))
    {
        flags.push(format!("--remap-path-prefix=/rustc/{commit}/="));
    }
    // A path with a space would split the list: leave such a folder be.
    flags.retain(|f| !f.contains(' '));
    flags.join(" ")
}

/// `-Oz` until the module stops shrinking (`--converge`: 0.5 to 0.8 KiB less
/// than one `-Oz`, measured in BENCHMARKS.md "Sizes"). `--low-memory-unused`
/// lets binaryen fold `pointer + constant` into the access's offset (3 KiB
/// less in the suite): the two differ only when the addition wraps past 4 GiB
/// into the lowest 1 KiB, and Rust's pointer arithmetic never wraps.
pub const WASM_OPT_PASSES: &[&str] = &["-Oz", "--converge", "--low-memory-unused"];

/// The wasm features rustc emits for wasm32-unknown-unknown; binaryen must be
/// told, or it refuses the module.
pub const WASM_OPT_FEATURES: &[&str] = &[
    "--enable-bulk-memory",
    "--enable-bulk-memory-opt",
    "--enable-sign-ext",
    "--enable-nontrapping-float-to-int",
    "--enable-mutable-globals",
    "--enable-multivalue",
    "--enable-reference-types",
];
const BINARYEN: &str = "binaryen@132";

/// binaryen's `wasm-opt` (about 20% smaller modules): `$WASM_OPT`, or npm's
/// binaryen in `.tools/`, installed on first use when npm is there (Debian's
/// binaryen is too old for current rustc output). None: modules stay as built.
pub fn wasm_opt(root: &Path) -> Option<PathBuf> {
    if let Some(tool) = std::env::var_os("WASM_OPT").filter(|t| !t.is_empty()) {
        return Some(PathBuf::from(tool));
    }
    let tools = root.join(".tools");
    let tool = tools.join("node_modules/.bin/wasm-opt");
    if !tool.is_file() {
        println!("==> npm install {BINARYEN} into .tools/ (for wasm-opt)");
        let installed = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&tools)
            .arg(BINARYEN)
            .spawn()
            .ok()
            .and_then(|mut child| wait_with_timeout(&mut child, Duration::from_secs(180)));
        if installed != Some(true) || !tool.is_file() {
            println!("    npm could not install binaryen; the modules are not wasm-opt'ed");
            return None;
        }
    }
    Some(tool)
}

/// Lints the wasm-only adapter code too (it is not compiled for the host).
pub fn clippy_wasm(toolchain: &Toolchain) -> Result<(), String> {
    match toolchain {
        Toolchain::Rustup => {
            let packages: Vec<String> = FILTERS
                .iter()
                .chain(TEST_MODULES)
                .flat_map(|f| ["-p".to_string(), f.to_string()])
                .collect();
            run(cargo()
                .args(["clippy", "--quiet", "--release", "--target", TARGET])
                .args(&packages)
                .args(["--", "-D", "warnings"]))
        }
        Toolchain::Debian => {
            println!("    (skipped: Debian's rustc-web ships no clippy; the host lint still ran)");
            Ok(())
        }
    }
}

fn pick_toolchain() -> Result<Toolchain, String> {
    if std::env::var("MESH_WASM_TOOLCHAIN").is_ok_and(|v| v == "debian") {
        return ensure_debian().map(|_| Toolchain::Debian);
    }
    if rustup_has_target() {
        return Ok(Toolchain::Rustup);
    }
    println!("==> rustup target add {TARGET} (2 minutes at most)");
    let added = Command::new("rustup")
        .args(["target", "add", TARGET])
        .spawn()
        .ok()
        .and_then(|mut child| wait_with_timeout(&mut child, Duration::from_secs(120)));
    if added == Some(true) && rustup_has_target() {
        return Ok(Toolchain::Rustup);
    }
    println!("    rustup could not add the target; falling back to Debian's rustc-web");
    ensure_debian().map(|_| Toolchain::Debian)
}

fn rustup_has_target() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == TARGET)
        })
}

fn wait_with_timeout(child: &mut std::process::Child, timeout: Duration) -> Option<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status.success()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn debian_ready() -> bool {
    Path::new("/usr/bin/rustc").is_file()
        && Path::new("/usr/bin/cargo").is_file()
        && Command::new("dpkg")
            .args(["-s", "rust-web-src"])
            .output()
            .is_ok_and(|o| o.status.success())
}

fn ensure_debian() -> Result<(), String> {
    if debian_ready() {
        return Ok(());
    }
    if !is_root() {
        return Err(format!(
            "no wasm toolchain: rustup cannot add {TARGET} and the Debian packages are missing; \
             run as root or `sudo apt-get install -y --no-install-recommends {}`",
            DEBIAN_PACKAGES.join(" ")
        ));
    }
    println!("==> apt-get install {}", DEBIAN_PACKAGES.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(DEBIAN_PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Debian's cargo set up as TOOLCHAIN.md describes: its rustc, with rustup's
/// `rust-lld` on PATH (Debian's rustc has no wasm linker of its own).
fn debian_cargo(root: &Path) -> Result<Command, String> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("rustc --print sysroot: {e}"))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let lld_dir = sysroot.join("lib/rustlib/x86_64-unknown-linux-gnu/bin");
    let path = std::env::join_paths(std::iter::once(lld_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .map_err(|e| e.to_string())?;
    let mut cmd = Command::new("/usr/bin/cargo");
    cmd.current_dir(root)
        .env("PATH", path)
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    Ok(cmd)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
