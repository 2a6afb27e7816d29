//! Debian packages the tests run for real (prometheus, docker-registry,
//! skopeo, ...): found on the machine, or installed with apt-get when the
//! tests run as root, as CI does on a fresh machine, so the test command
//! needs no manual step.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// One apt-get at a time within this test process (apt's own lock, waited
/// for below, covers other processes).
static APT: Mutex<()> = Mutex::new(());

/// The path of `binary` (looked up on PATH, then in /usr/bin and /usr/sbin),
/// installing Debian `package` first if the binary is missing.
pub fn ensure(package: &str, binary: &str) -> Result<PathBuf, String> {
    if let Some(found) = find(binary) {
        return Ok(found);
    }
    let _guard = APT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = find(binary) {
        return Ok(found);
    }
    if !is_root() {
        return Err(format!(
            "{binary} is missing: install it with `sudo apt-get install -y {package}` \
             (the tests install it themselves when run as root)"
        ));
    }
    eprintln!("{binary}: not found; apt-get install {package}");
    // A fresh machine may have no package lists yet: update once, then retry.
    if apt(&["install", "-y", "--no-install-recommends", package]).is_err() {
        apt(&["update"])?;
        apt(&["install", "-y", "--no-install-recommends", package])?;
    }
    find(binary).ok_or_else(|| format!("{binary} still missing after installing {package}"))
}

fn find(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn apt(args: &[&str]) -> Result<(), String> {
    let status = Command::new("apt-get")
        .args(["-o", "DPkg::Lock::Timeout=600", "-q"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| format!("apt-get: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("apt-get {} failed: {status}", args.join(" ")))
    }
}
