//! Building the modules (`cargo xtask build`) and their sizes: as built, as
//! shipped in dist/, and after wasm-opt with the build's passes
//! (`build::WASM_OPT_PASSES`: `-Oz` and the rest, as `cargo xtask build` runs it).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::{first_line, json};
use crate::build::{self, Toolchain};

/// The filters and the no-op module into dist/ with `cargo xtask build`
/// (unless `--no-build`: then dist/ and the last build are used as they are).
/// Returns cargo's target folder of the build (holding the as-built modules).
pub(crate) fn build_modules(build_filters: bool) -> Result<PathBuf, String> {
    if build_filters {
        return build::build_all().map(|toolchain| toolchain.target_dir());
    }
    println!("    --no-build: using dist/*.wasm and the last build as they are");
    let rustup = Toolchain::Rustup.target_dir();
    Ok(if rustup.join(build::TARGET).is_dir() {
        rustup
    } else {
        Toolchain::Debian.target_dir()
    })
}

/// wasm-opt as `cargo xtask build` finds or installs it.
pub(crate) fn wasm_opt(root: &Path) -> Result<PathBuf, String> {
    build::wasm_opt(root)
        .ok_or_else(|| "wasm-opt unavailable (npm could not install binaryen)".to_string())
}

#[derive(Serialize)]
pub(crate) struct Size {
    pub(crate) module: String,
    /// As cargo built it (before any wasm-opt).
    #[serde(rename = "as_built_bytes")]
    pub(crate) as_built: Option<u64>,
    /// What ships: dist/<module>.wasm (`cargo xtask build` runs wasm-opt when it can).
    #[serde(rename = "dist_bytes")]
    pub(crate) dist: Option<u64>,
    /// The as-built module after wasm-opt with the build's passes (null in results.json when it failed).
    #[serde(rename = "wasm_opt_bytes", serialize_with = "json::ok_or_null")]
    pub(crate) optimized: Result<u64, String>,
}

/// Sizes of each module as built, as shipped in dist/, and after
/// wasm-opt with the build's passes; copies of the as-built and optimized modules go to
/// target/bench/{as-built,wasm-opt}/ (the `*-as-built` / `*-wasm-opt` cases load them).
pub(crate) fn measure_sizes(root: &Path, out_dir: &Path, built_dir: &Path) -> Vec<Size> {
    let (raw_dir, opt_dir) = (out_dir.join("as-built"), out_dir.join("wasm-opt"));
    let _ = fs::create_dir_all(&raw_dir);
    let _ = fs::create_dir_all(&opt_dir);
    let tool = wasm_opt(root);
    let size = |p: &Path| fs::metadata(p).ok().map(|m| m.len());
    std::iter::once("noop")
        .chain(build::FILTERS.iter().copied())
        .map(|module| {
            let file = format!("{module}.wasm");
            let built = built_dir
                .join(build::TARGET)
                .join("release")
                .join(file.replace('-', "_"));
            let (raw, output) = (raw_dir.join(&file), opt_dir.join(&file));
            let _ = fs::remove_file(&raw);
            let _ = fs::remove_file(&output);
            let as_built = size(&built).filter(|_| fs::copy(&built, &raw).is_ok());
            let optimized = match (&tool, as_built) {
                (Err(e), _) => Err(e.clone()),
                (_, None) => Err("not built".into()),
                (Ok(tool), Some(_)) => Command::new(tool)
                    .args(build::WASM_OPT_PASSES)
                    .args(build::WASM_OPT_FEATURES)
                    .arg(&raw)
                    .arg("-o")
                    .arg(&output)
                    .output()
                    .map_err(|e| e.to_string())
                    .and_then(|o| {
                        if o.status.success() {
                            fs::metadata(&output)
                                .map(|m| m.len())
                                .map_err(|e| e.to_string())
                        } else {
                            Err(first_line(&String::from_utf8_lossy(&o.stderr)))
                        }
                    }),
            };
            let dist = size(&mesh_testkit::dist_dir().join(&file));
            let show = |b: Option<u64>| b.map_or("missing".into(), kib);
            println!(
                "    {module:<16} as built {:>10}   dist/ {:>10}   wasm-opt: {}",
                show(as_built),
                show(dist),
                optimized.as_ref().map_or_else(|e| e.clone(), |b| kib(*b))
            );
            Size {
                module: module.to_string(),
                as_built,
                dist,
                optimized,
            }
        })
        .collect()
}

pub(crate) fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}
