//! `istio-fetch` (tests/istio/cmd/istio-fetch): Istio's own sidecar-agent
//! Wasm fetcher as a command, for the tests that push images and want Istio
//! to pull them back (`pkg/wasm`, the agent's file cache and ECDS rewrite).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::tools::go_command;

/// The built command (`go build` once per test process; Go's build cache in
/// `.tools/go` makes a later build a link only).
pub fn fetcher() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = crate::repo_root().join("target/istio-fetch/istio-fetch");
            let result = go_command()?
                .current_dir(crate::repo_root().join("tests/istio"))
                .args(["build", "-o"])
                .arg(&out)
                .arg("./cmd/istio-fetch")
                .output()
                .map_err(|e| format!("go build istio-fetch: {e}"))?;
            if result.status.success() {
                Ok(out)
            } else {
                Err(format!(
                    "go build istio-fetch failed:\n{}",
                    String::from_utf8_lossy(&result.stderr)
                ))
            }
        })
        .clone()
}

/// Fetches `oci://<image>` exactly as the sidecar agent does and returns the
/// module it wrote, or Istio's log when the agent fell back to an RBAC filter.
pub fn fetch(image: &str, work: &std::path::Path) -> Result<Vec<u8>, String> {
    let module = work.join(format!(
        "istio-fetched-{}.wasm",
        image.replace(['/', ':', '@'], "_")
    ));
    let out = Command::new(fetcher()?)
        .arg("-o")
        .arg(&module)
        .arg(format!("oci://{image}"))
        .output()
        .map_err(|e| format!("istio-fetch: {e}"))?;
    if !out.status.success() {
        // Istio's log is long; its last lines hold the agent's error.
        let log = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = log.lines().collect();
        return Err(format!(
            "istio-fetch oci://{image} failed ({}); the last lines of Istio's log:\n{}",
            out.status,
            lines[lines.len().saturating_sub(15)..].join("\n")
        ));
    }
    std::fs::read(&module).map_err(|e| format!("{}: {e}", module.display()))
}
