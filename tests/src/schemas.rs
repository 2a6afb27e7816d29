//! The filters' JSON Schemas (2020-12), generated from their spec types and
//! committed as `schemas/<filter>.schema.json`. `cargo xtask schemas` writes
//! them; `tests/tests/schemas.rs` fails when a committed one is stale.

use std::path::PathBuf;

/// The modules with a configuration schema: all of them.
pub const FILTERS: [&str; 5] = crate::MODULES;

/// The schema of `filter` as generated now, pretty-printed with a final newline.
pub fn generated(filter: &str) -> Option<String> {
    let schema = match filter {
        "ratelimit" => ratelimit::spec::schema(),
        "circuit-breaker" => circuit_breaker::spec::schema(),
        "lb-hints" => lb_hints::spec::schema(),
        "metrics" => metrics::spec::schema(),
        "suite" => suite::schema(),
        _ => return None,
    };
    serde_json::to_string_pretty(&schema)
        .ok()
        .map(|text| text + "\n")
}

/// Where the committed schema of `filter` lives.
pub fn committed_path(filter: &str) -> PathBuf {
    crate::repo_root()
        .join("schemas")
        .join(format!("{filter}.schema.json"))
}

/// Writes every schema (`cargo xtask schemas`).
pub fn write_all() -> Result<(), String> {
    for filter in FILTERS {
        let text = generated(filter).ok_or_else(|| format!("no schema for {filter}"))?;
        let path = committed_path(filter);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("    wrote {}", path.display());
    }
    Ok(())
}
