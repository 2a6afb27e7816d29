//! The Istio manifests in `istio/`:
//! - every resource's `spec` is valid against its CRD's `openAPIV3Schema`
//!   (from istio/api, in `../shared/schemas/`), checked strictly as
//!   `kubectl apply` does (unknown fields refused), CEL rules included;
//! - the TrafficExtension forms say exactly what the WasmPlugins say, and the
//!   routes, subsets and headers the plugins name exist in the VirtualService /
//!   DestinationRule;
//!
//! What Istio itself makes of them, in a real Envoy: tests/tests/istio_mesh.rs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use mesh_testkit::repo_root;
use serde_json::Value;

// ---------------------------------------------------------------------------
// Reading the manifests and the CRD schemas.

/// One YAML document of a file in `istio/`.
#[derive(Debug, Clone)]
struct Manifest {
    file: PathBuf,
    doc: Value,
}

impl Manifest {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn spec(&self) -> &Value {
        &self.doc["spec"]
    }

    fn what(&self) -> String {
        format!("{} {} ({})", self.kind(), self.name(), self.file.display())
    }
}

fn istio_dir() -> PathBuf {
    repo_root().join("istio")
}

/// The mesh settings our stats need (owned by the metrics filter's docs).
const METRICS_STATS: &str = "metrics-stats.yaml";

/// Kinds in `istio/` without a CRD schema here (an IstioOperator and an
/// example Deployment in metrics-stats.yaml, the rate limit service's
/// Service and ConfigMap in global-ratelimit/); every other kind is validated.
const NOT_VALIDATED: &[&str] = &["IstioOperator", "Deployment", "Service", "ConfigMap"];

/// `meshConfig.defaultConfig` of the IstioOperator in metrics-stats.yaml.
fn mesh_default_config() -> Value {
    let docs = yaml_docs(&istio_dir().join(METRICS_STATS));
    let operator = docs
        .iter()
        .find(|d| d["kind"] == "IstioOperator")
        .expect("an IstioOperator in istio/metrics-stats.yaml");
    operator["spec"]["meshConfig"]["defaultConfig"].clone()
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap();
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.iter()
        .map(|doc| {
            serde_yaml::from_str::<Value>(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn manifests() -> Vec<Manifest> {
    let mut files = Vec::new();
    let mut dirs = vec![istio_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .flat_map(|file| {
            yaml_docs(&file).into_iter().map(move |doc| Manifest {
                file: file.clone(),
                doc,
            })
        })
        .collect()
}

fn plugins(kind: &str) -> BTreeMap<String, Manifest> {
    manifests()
        .into_iter()
        .filter(|m| m.kind() == kind)
        .map(|m| (m.name().to_string(), m))
        .collect()
}

/// The filter a plugin runs, from its image URL (`oci://…/<filter>:<tag>`).
fn filter_of(url: &str) -> String {
    let path = url.rsplit('/').next().unwrap_or_default();
    path.split([':', '@'])
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The `spec` schema of `kind` at `version`, from the CRD files.
fn spec_schema(group: &str, version: &str, kind: &str) -> Option<Value> {
    let dir = PathBuf::from(
        std::env::var("MESH_ISTIO_SCHEMAS")
            .unwrap_or_else(|_| repo_root().join("../shared/schemas").display().to_string()),
    );
    for entry in
        fs::read_dir(&dir).unwrap_or_else(|e| panic!("CRD schemas in {}: {e}", dir.display()))
    {
        let path = entry.unwrap().path();
        for crd in yaml_docs(&path) {
            if crd["spec"]["group"] != group || crd["spec"]["names"]["kind"] != kind {
                continue;
            }
            let versions = crd["spec"]["versions"].as_array()?;
            let v = versions.iter().find(|v| v["name"] == version)?;
            return Some(v["schema"]["openAPIV3Schema"]["properties"]["spec"].clone());
        }
    }
    None
}

// ---------------------------------------------------------------------------
// A validator for Kubernetes structural schemas (OpenAPI v3 subset + the
// x-kubernetes-* extensions + the CEL rules these CRDs use).

fn validate(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let err = |errors: &mut Vec<String>, msg: String| errors.push(format!("{path}: {msg}"));
    if value.is_null() {
        if schema["nullable"] != true {
            err(errors, "null is not allowed".into());
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == true {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            err(
                errors,
                format!("expected an integer or a string, got {value}"),
            );
        }
    } else if let Some(ty) = schema["type"].as_str() {
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !ok {
            err(errors, format!("expected {ty}, got {value}"));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            err(errors, format!("{value} is not one of {allowed:?}"));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|m| len < m) {
            err(errors, format!("shorter than {}", schema["minLength"]));
        }
        if schema["maxLength"].as_u64().is_some_and(|m| len > m) {
            err(errors, format!("longer than {}", schema["maxLength"]));
        }
        if let Some(pattern) = schema["pattern"].as_str() {
            let re = regex::Regex::new(pattern).unwrap();
            if !re.is_match(s) {
                err(errors, format!("{s:?} does not match {pattern}"));
            }
        }
    }
    if let Some(n) = value.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| n < m) {
            err(errors, format!("{n} is below {}", schema["minimum"]));
        }
        if schema["maximum"].as_f64().is_some_and(|m| n > m) {
            err(errors, format!("{n} is above {}", schema["maximum"]));
        }
        if schema["format"] == "int32" && (n < i32::MIN as f64 || n > i32::MAX as f64) {
            err(errors, format!("{n} is not an int32"));
        }
        if schema["format"] == "uint32" && (n < 0.0 || n > u32::MAX as f64) {
            err(errors, format!("{n} is not a uint32"));
        }
    }
    if let Some(items) = value.as_array() {
        if schema["maxItems"]
            .as_u64()
            .is_some_and(|m| items.len() as u64 > m)
        {
            err(errors, format!("more than {} items", schema["maxItems"]));
        }
        if schema["minItems"]
            .as_u64()
            .is_some_and(|m| (items.len() as u64) < m)
        {
            err(errors, format!("fewer than {} items", schema["minItems"]));
        }
        let keys: Option<Vec<&str>> = match schema["x-kubernetes-list-type"].as_str() {
            Some("map") => schema["x-kubernetes-list-map-keys"]
                .as_array()
                .map(|k| k.iter().filter_map(Value::as_str).collect()),
            _ => None,
        };
        let mut seen = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(keys) = &keys {
                let key: Vec<String> = keys.iter().map(|k| item[*k].to_string()).collect();
                if !seen.insert(key.clone()) {
                    err(errors, format!("[{i}]: duplicate list-map key {key:?}"));
                }
            }
            if schema["x-kubernetes-list-type"] == "set" && !seen.insert(vec![item.to_string()]) {
                err(errors, format!("[{i}]: duplicate item in a set"));
            }
            if schema.get("items").is_some() {
                validate(&schema["items"], item, &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(object) = value.as_object() {
        if let Some(required) = schema["required"].as_array() {
            for r in required.iter().filter_map(Value::as_str) {
                if !object.contains_key(r) {
                    errors.push(format!("{path}: missing required field {r:?}"));
                }
            }
        }
        if schema["maxProperties"]
            .as_u64()
            .is_some_and(|m| object.len() as u64 > m)
        {
            errors.push(format!(
                "{path}: more than {} fields",
                schema["maxProperties"]
            ));
        }
        let properties = schema["properties"].as_object();
        let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
        for (key, item) in object {
            let child = format!("{path}.{key}");
            if let Some(prop) = properties.and_then(|p| p.get(key)) {
                validate(prop, item, &child, errors);
            } else if let Some(additional) = schema.get("additionalProperties") {
                if additional.is_object() {
                    validate(additional, item, &child, errors);
                } else if additional == false {
                    errors.push(format!("{child}: unknown field"));
                }
            } else if properties.is_some() && !preserve {
                // Pruned silently by the API server, refused by `kubectl apply`
                // (strict field validation): a typo must not pass.
                errors.push(format!("{child}: unknown field"));
            }
        }
    }
    let passes = |s: &Value| {
        let mut e = Vec::new();
        validate(s, value, path, &mut e);
        e.is_empty()
    };
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            validate(s, value, path, errors);
        }
    }
    if let Some(any) = schema["anyOf"].as_array() {
        if !any.iter().any(passes) {
            errors.push(format!("{path}: matches none of anyOf {any:?}"));
        }
    }
    if let Some(one) = schema["oneOf"].as_array() {
        let n = one.iter().filter(|s| passes(s)).count();
        if n != 1 {
            errors.push(format!(
                "{path}: matches {n} of oneOf {one:?} (exactly 1 wanted)"
            ));
        }
    }
    if let Some(not) = schema.get("not") {
        if passes(not) {
            errors.push(format!("{path}: matches `not` {not}"));
        }
    }
    if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
        for rule in rules {
            let text = rule["rule"].as_str().unwrap_or_default();
            match cel_rule_holds(text, value) {
                Some(true) => {}
                Some(false) => errors.push(format!("{path}: {}", rule["message"])),
                None => errors.push(format!(
                    "{path}: CEL rule not understood by this test (teach cel_rule_holds): {text}"
                )),
            }
        }
    }
}

/// The CEL rules of these CRDs, by their text (whitespace-insensitive);
/// `None` for any other rule, so a new one cannot pass unchecked.
fn cel_rule_holds(rule: &str, v: &Value) -> Option<bool> {
    let rule: String = rule.split_whitespace().collect::<Vec<_>>().join(" ");
    let has = |f: &str| v.get(f).is_some_and(|x| !x.is_null());
    let keys = || v.as_object().into_iter().flat_map(|o| o.keys());
    let s = v.as_str().unwrap_or_default();
    Some(match rule.as_str() {
        "duration(self) >= duration('1ms')" => go_duration_ms(s).is_some_and(|ms| ms >= 1.0),
        "self.all(key, key.size() != 0)" => keys().all(|k| !k.is_empty()),
        "self.all(key, !key.contains(\"*\"))" => keys().all(|k| !k.contains('*')),
        "!self.contains(\"*\")" => !s.contains('*'),
        "self.size() == 0" => s.is_empty(),
        "(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1" => {
            ["selector", "targetRef", "targetRefs"].iter().filter(|f| has(f)).count() <= 1
        }
        "(has(self.selector) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1" => {
            ["selector", "targetRefs"].iter().filter(|f| has(f)).count() <= 1
        }
        "has(self.wasm) != has(self.lua)" => has("wasm") != has("lua"),
        "(has(self.valueFrom) ? self.valueFrom : \"\") != \"HOST\" || !has(self.value)" => {
            v["valueFrom"] != "HOST" || !has("value")
        }
        r if r.starts_with("isURL(self) ? (url(self).getScheme() in [") => {
            // Scheme one of "", http, https, oci, file (no "://": a bare host/path).
            match s.split_once("://") {
                Some((scheme, _)) => ["http", "https", "oci", "file"].contains(&scheme),
                None => true,
            }
        }
        _ => return None,
    })
}

/// A Go duration (`"1h2m3.5s"`, `"250ms"`) in milliseconds.
fn go_duration_ms(s: &str) -> Option<f64> {
    let re = regex::Regex::new(r"^(?:(\d+(?:\.\d+)?)(h|m|s|ms|us|µs|ns))+$").unwrap();
    if !re.is_match(s) {
        return None;
    }
    let part = regex::Regex::new(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)").unwrap();
    Some(
        part.captures_iter(s)
            .map(|c| {
                let n: f64 = c[1].parse().unwrap();
                n * match &c[2] {
                    "h" => 3_600_000.0,
                    "m" => 60_000.0,
                    "s" => 1000.0,
                    "ms" => 1.0,
                    "us" | "µs" => 0.001,
                    _ => 0.000_001,
                }
            })
            .sum(),
    )
}

fn spec_errors(m: &Manifest) -> Vec<String> {
    let api_version = m.doc["apiVersion"].as_str().unwrap_or_default();
    let Some((group, version)) = api_version.split_once('/') else {
        return vec![format!("apiVersion {api_version:?} has no group")];
    };
    let Some(schema) = spec_schema(group, version, m.kind()) else {
        return vec![format!("no CRD schema for {api_version} {}", m.kind())];
    };
    let mut errors = Vec::new();
    for field in ["name", "namespace"] {
        if !m.doc["metadata"][field].is_string() {
            errors.push(format!("metadata.{field} missing"));
        }
    }
    validate(&schema, m.spec(), "spec", &mut errors);
    errors
}

#[test]
fn every_manifest_is_valid_against_its_crd_schema() {
    let all = manifests();
    let kinds: BTreeSet<&str> = all.iter().map(Manifest::kind).collect();
    for kind in [
        "WasmPlugin",
        "TrafficExtension",
        "VirtualService",
        "DestinationRule",
    ] {
        assert!(kinds.contains(kind), "no {kind} in istio/: {kinds:?}");
    }
    let failures: Vec<String> = all
        .iter()
        .filter(|m| !NOT_VALIDATED.contains(&m.kind()))
        .flat_map(|m| {
            spec_errors(m)
                .into_iter()
                .map(move |e| format!("{}: {e}", m.what()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_validator_refuses_what_istio_refuses() {
    let plugin = plugins("WasmPlugin")
        .into_values()
        .next()
        .expect("a WasmPlugin in istio/");
    let broken = |edit: &dyn Fn(&mut Value)| {
        let mut m = plugin.clone();
        edit(&mut m.doc["spec"]);
        spec_errors(&m).join("\n")
    };
    assert!(broken(&|s| s["failStrategy"] = "FAIL_CLOSED".into()).contains("failStrategy"));
    assert!(broken(&|s| s["phse"] = "AUTHN".into()).contains("spec.phse: unknown field"));
    assert!(broken(&|s| s["url"] = "ftp://x/y".into()).contains("url must have schema"));
    assert!(
        broken(&|s| s["match"][0]["ports"] = serde_json::json!([{"number": 0}]))
            .contains("below 1")
    );
    assert!(
        broken(&|s| s["targetRefs"] = serde_json::json!([{"kind": "Gateway", "name": "g"}]))
            .contains("only one of targetRefs or selector")
    );
    assert!(broken(&|s| {
        s.as_object_mut().unwrap().remove("url");
    })
    .contains("missing required field \"url\""));
    // Anything goes inside pluginConfig (the filters refuse unknown fields themselves).
    assert_eq!(broken(&|s| s["pluginConfig"]["anything"] = 1.into()), "");
}

// ---------------------------------------------------------------------------
// Consistency between the manifests.

#[test]
fn traffic_extensions_say_what_the_wasm_plugins_say() {
    let wasm_plugins = plugins("WasmPlugin");
    let extensions = plugins("TrafficExtension");
    assert_eq!(
        wasm_plugins.keys().collect::<Vec<_>>(),
        extensions.keys().collect::<Vec<_>>(),
        "one TrafficExtension per WasmPlugin, same names"
    );
    for (name, wp) in &wasm_plugins {
        let te = &extensions[name];
        let (w, t) = (wp.spec(), te.spec());
        for field in ["selector", "phase", "priority", "match"] {
            assert_eq!(w[field], t[field], "{name}: spec.{field}");
        }
        for field in ["url", "imagePullPolicy", "failStrategy", "pluginConfig"] {
            assert_eq!(w[field], t["wasm"][field], "{name}: spec.wasm.{field}");
        }
        assert_eq!(wp.doc["metadata"], te.doc["metadata"], "{name}: metadata");
    }
}

/// The Envoy route names a VirtualService gives: `http[].name`, and
/// `<name>.<match name>` for a named match (Istio's route naming).
fn virtual_service_routes() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for vs in manifests().iter().filter(|m| m.kind() == "VirtualService") {
        for http in vs.spec()["http"].as_array().unwrap() {
            let name = http["name"].as_str().expect("every http route is named");
            names.insert(name.to_string());
            for m in http["match"].as_array().into_iter().flatten() {
                if let Some(match_name) = m["name"].as_str() {
                    names.insert(format!("{name}.{match_name}"));
                }
            }
        }
    }
    names
}

fn routes_named_by(config: &Value) -> Vec<String> {
    // The suite's parts (each a filter's configuration under its name).
    let mut names: Vec<String> = ["ratelimit", "lb_hints", "circuit_breaker"]
        .iter()
        .filter_map(|part| config.get(part))
        .flat_map(routes_named_by)
        .collect();
    for rule in config["rules"].as_array().into_iter().flatten() {
        match &rule["match"]["route"] {
            Value::String(s) => names.push(s.clone()),
            Value::Array(a) => names.extend(a.iter().filter_map(Value::as_str).map(String::from)),
            _ => {}
        }
    }
    names
}

#[test]
fn plugins_name_routes_subsets_and_headers_that_exist() {
    let routes = virtual_service_routes();
    for (name, wp) in plugins("WasmPlugin") {
        for route in routes_named_by(&wp.spec()["pluginConfig"]) {
            assert!(
                routes.contains(&route),
                "{name}: rule names route {route:?}, not a VirtualService route {routes:?}"
            );
        }
    }
    let lb = plugins("WasmPlugin")
        .into_values()
        .find(|m| filter_of(m.spec()["url"].as_str().unwrap()) == "lb-hints")
        .expect("an lb-hints WasmPlugin");
    let subsets: BTreeSet<String> = manifests()
        .iter()
        .filter(|m| m.kind() == "DestinationRule")
        .flat_map(|m| m.spec()["subsets"].as_array().unwrap().clone())
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    let vs_text = serde_json::to_string(
        &manifests()
            .iter()
            .filter(|m| m.kind() == "VirtualService")
            .map(|m| m.doc.clone())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    for rule in lb.spec()["pluginConfig"]["rules"].as_array().unwrap() {
        let header = rule["header"].as_str().unwrap();
        assert!(
            vs_text.contains(&format!("\"{header}\":{{\"exact\"")),
            "the VirtualService must route on {header}"
        );
        for target in rule["targets"].as_array().unwrap() {
            let t = target["name"].as_str().unwrap();
            assert!(
                subsets.contains(t),
                "target {t} is not a subset: {subsets:?}"
            );
        }
    }
}

#[test]
fn mesh_stats_settings_label_the_custom_labels_of_the_metrics_plugin() {
    let default_config = mesh_default_config();
    let extra: BTreeSet<&str> = default_config["extraStatTags"]
        .as_array()
        .expect("meshConfig.defaultConfig.extraStatTags")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let custom: Vec<String> = plugins("WasmPlugin")
        .values()
        .flat_map(|p| {
            p.spec()["pluginConfig"]["labels"]["custom"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !custom.is_empty(),
        "the metrics WasmPlugin shows a custom label"
    );
    for label in custom {
        assert!(
            extra.contains(label.as_str()),
            "{METRICS_STATS}: extraStatTags lacks {label}"
        );
    }
}
