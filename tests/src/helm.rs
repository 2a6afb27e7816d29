//! The Helm chart `charts/mesh-filters/`: a pinned Helm built from the Go
//! module proxy, rendering with it, and the generated part of the chart's
//! `values.schema.json` (the filters' JSON Schemas from `schemas/`, embedded
//! so that `helm install` / `helm template` check each `pluginConfig`).
//!
//! Other tests (and `cargo xtask helm-render`, into `target/helm/rendered/`)
//! get the chart's output from [`render`] / [`render_value_files`]: the
//! rendered YAML of the default values (as WasmPlugins and as
//! TrafficExtensions) and of each `charts/mesh-filters/ci/*-values.yaml`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

/// Helm's Go package and the pinned release.
pub const HELM_PACKAGE: &str = "helm.sh/helm/v3/cmd/helm";
pub const HELM_VERSION: &str = "v3.22.0";

/// The release name and namespace the renders use: with them the default
/// values give exactly the resources of `istio/` (`mesh-<filter>` in `shop`).
pub const RELEASE: &str = "mesh";
pub const NAMESPACE: &str = "shop";

/// The Helm binary, built on first use into `.tools/go/helm@<version>/bin`.
pub fn helm_binary() -> Result<PathBuf, String> {
    crate::tools::go_install(HELM_PACKAGE, HELM_VERSION, "helm")
}

/// `helm` with its own config, cache and data folders (nothing from the
/// user's `~/.config/helm` or repositories leaks in, nothing is written there).
pub fn helm_command() -> Result<Command, String> {
    let home = crate::repo_root().join("target/helm/home");
    let mut cmd = Command::new(helm_binary()?);
    cmd.env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"));
    Ok(cmd)
}

pub fn chart_dir() -> PathBuf {
    crate::repo_root().join("charts/mesh-filters")
}

pub fn values_schema_path() -> PathBuf {
    chart_dir().join("values.schema.json")
}

/// The value files the chart is tested with besides its defaults:
/// `charts/mesh-filters/ci/*-values.yaml`, sorted.
pub fn ci_value_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(chart_dir().join("ci"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// What `helm template` printed, or its exit status and stderr.
pub struct Rendered {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// `helm template mesh charts/mesh-filters --namespace shop <args>`.
pub fn template(args: &[&str]) -> Result<Rendered, String> {
    let out = helm_command()?
        .arg("template")
        .arg(RELEASE)
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE])
        .args(args)
        .output()
        .map_err(|e| format!("helm template: {e}"))?;
    Ok(Rendered {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The chart rendered with extra `helm template` arguments (none: the
/// defaults); an error carries Helm's message.
pub fn render(args: &[&str]) -> Result<String, String> {
    let out = template(args)?;
    if out.ok {
        Ok(out.stdout)
    } else {
        Err(format!("helm template {args:?} failed:\n{}", out.stderr))
    }
}

/// The renders other tests check, by name: `default`, `default-trafficextension`
/// (the defaults with `kind=TrafficExtension`) and, per ci value file, its
/// name without `-values.yaml`. Each is written to `dir/<name>.yaml`;
/// returns the written paths.
pub fn render_value_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut cases: Vec<(String, Vec<String>)> = vec![
        ("default".into(), vec![]),
        (
            "default-trafficextension".into(),
            vec!["--set".into(), "kind=TrafficExtension".into()],
        ),
    ];
    for file in ci_value_files() {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        let name = name.trim_end_matches("-values.yaml").to_string();
        cases.push((name, vec!["--values".into(), file.display().to_string()]));
    }
    let mut written = Vec::new();
    for (name, args) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let yaml = render(&args)?;
        let path = dir.join(format!("{name}.yaml"));
        fs::write(&path, yaml).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

// ---------------------------------------------------------------------------
// values.schema.json

pub fn filter_schemas_dir() -> PathBuf {
    crate::repo_root().join("schemas")
}

/// `schemas/<filter>.schema.json`, by filter name.
pub fn filter_schemas(dir: &Path) -> Result<BTreeMap<String, Value>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut schemas = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let Some(filter) = name.strip_suffix(".schema.json") else {
            continue;
        };
        let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let schema: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        schemas.insert(filter.to_string(), schema);
    }
    if schemas.is_empty() {
        return Err(format!("no <filter>.schema.json in {}", dir.display()));
    }
    Ok(schemas)
}

/// `current` (the chart's values schema) with its generated parts replaced:
/// `$defs.config.<filter>` = the filter's schema, its internal references
/// (`#/...`) re-rooted under `#/$defs/config/<filter>`, and
/// `properties.filters.properties.<filter>` = a copy of the common filter
/// values (`$defs.filter`, written out rather than referenced so that an
/// error names only the bad field) plus a `pluginConfig` checked by that
/// schema, no other field allowed.
pub fn values_schema(current: &Value, filters: &BTreeMap<String, Value>) -> Value {
    let mut schema = current.clone();
    let mut configs = serde_json::Map::new();
    let mut entries = serde_json::Map::new();
    for (filter, filter_schema) in filters {
        let base = format!("#/$defs/config/{filter}");
        let mut embedded = filter_schema.clone();
        if let Some(object) = embedded.as_object_mut() {
            // The embedded copy is not a resource of its own: no `$id` (which
            // would re-base its references) and no second `$schema`.
            object.remove("$schema");
            object.remove("$id");
        }
        reroot_refs(&mut embedded, &base);
        configs.insert(filter.clone(), embedded);
        let mut entry = current["$defs"]["filter"].clone();
        entry["properties"]["pluginConfig"] = json!({ "$ref": base });
        entry["additionalProperties"] = json!(false);
        entries.insert(filter.clone(), entry);
    }
    schema["$defs"]["config"] = Value::Object(configs);
    schema["properties"]["filters"]["properties"] = Value::Object(entries);
    schema
}

fn reroot_refs(value: &mut Value, base: &str) {
    match value {
        Value::Object(object) => {
            for (key, item) in object.iter_mut() {
                match item {
                    Value::String(target) if key == "$ref" && target.starts_with('#') => {
                        *target = format!("{base}{}", &target[1..]);
                    }
                    _ => reroot_refs(item, base),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| reroot_refs(item, base)),
        _ => {}
    }
}

/// The committed values schema, and what it should be from `schemas/`.
pub fn values_schema_now_and_wanted() -> Result<(Value, Value), String> {
    let path = values_schema_path();
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let now: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let wanted = values_schema(&now, &filter_schemas(&filter_schemas_dir())?);
    Ok((now, wanted))
}

/// Rewrites the generated parts of `values.schema.json`; true if it changed.
pub fn write_values_schema() -> Result<bool, String> {
    let (now, wanted) = values_schema_now_and_wanted()?;
    if now == wanted {
        return Ok(false);
    }
    let mut text = serde_json::to_string_pretty(&wanted).map_err(|e| e.to_string())?;
    text.push('\n');
    let path = values_schema_path();
    fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(true)
}
