//! The committed JSON Schemas (`schemas/<filter>.schema.json`): up to date
//! with the config types, and every configuration the project ships (envoy/,
//! istio/, the README's examples) valid against its filter's schema and
//! accepted by the filter itself; the README's field tables name exactly the
//! schema's fields.

use std::path::{Path, PathBuf};

use mesh_testkit::repo_root;
use mesh_testkit::schemas::{committed_path, generated, FILTERS};
use serde::Deserialize;
use serde_json::Value;

fn schema(filter: &str) -> Value {
    serde_json::from_str(&generated(filter).unwrap()).unwrap()
}

fn validator(filter: &str) -> jsonschema::Validator {
    jsonschema::draft202012::new(&schema(filter)).unwrap()
}

/// The schema's verdict and the filter's own on one configuration.
fn verdicts(filter: &str, config: &Value) -> (Result<(), String>, Result<(), String>) {
    let by_schema = {
        let errors: Vec<String> = validator(filter)
            .iter_errors(config)
            .map(|e| format!("{}: {e}", e.instance_path))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    };
    let bytes = serde_json::to_vec(config).unwrap();
    let by_filter = match filter {
        "ratelimit" => ratelimit::Config::parse(&bytes, "t").map(|_| ()),
        "circuit-breaker" => circuit_breaker::Config::parse(&bytes, "t").map(|_| ()),
        "lb-hints" => lb_hints::Config::parse(&bytes, "t").map(|_| ()),
        "metrics" => metrics::Config::parse(&bytes).map(|_| ()),
        "suite" => suite::Config::parse(&bytes, "t").map(|_| ()),
        other => panic!("no filter {other}"),
    }
    .map_err(|e| e.to_string());
    (by_schema, by_filter)
}

#[test]
fn committed_schemas_are_up_to_date() {
    for filter in FILTERS {
        let path = committed_path(filter);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated(filter).unwrap(),
            "{} is stale or missing: run `cargo xtask schemas` and commit the result",
            path.display()
        );
        let doc: Value = serde_json::from_str(&committed).unwrap();
        assert_eq!(
            doc["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{filter}"
        );
        assert!(
            jsonschema::meta::is_valid(&doc),
            "{filter}: not a valid schema"
        );
    }
}

/// Where the schema and the filter must agree, including the edges the
/// schema has to spell out (Istio's doubles, unknown fields, patterns, enums).
#[test]
fn schema_and_filter_agree_on_edge_cases() {
    let cases: &[(&str, &str, bool)] = &[
        (
            "ratelimit",
            r#"{"rules": [{"name": "a", "limit": {"requests": 100.0, "per": "1m30s"}}]}"#,
            true,
        ),
        (
            "ratelimit",
            r#"{"rules": [{"name": "a", "limit": {"requests": 100.5, "per": "1s"}}]}"#,
            false,
        ),
        (
            "ratelimit",
            r#"{"rules": [{"name": "a", "limit": {"requests": 1, "per": "fast"}}]}"#,
            false,
        ),
        (
            "ratelimit",
            r#"{"rules": [{"name": "a", "limit": {"requests": 1, "per": "1s", "brust": 1}}]}"#,
            false,
        ),
        ("ratelimit", r#"{"headers": "ietf"}"#, false),
        (
            "ratelimit",
            r#"{"rules": [{"name": "a b", "limit": {"requests": 1, "per": "1s"}}]}"#,
            false,
        ),
        (
            "ratelimit",
            r#"{"rules": [{"name": "a", "key": ["client_ip", {"cookie": "c"}, {"static": ""}], "limit": {"requests": 1, "per": "1s"}, "on_missing_key": {"static": "x"}}]}"#,
            true,
        ),
        (
            "ratelimit",
            r#"{"rules": [{"name": "a", "key": [{"header": "bad name"}], "limit": {"requests": 1, "per": "1s"}}]}"#,
            false,
        ),
        (
            "ratelimit",
            r#"{"rules": [{"name": "a", "match": {"path_prefix": "v1"}, "limit": {"requests": 1, "per": "1s"}}]}"#,
            false,
        ),
        (
            "ratelimit",
            r#"{"rules": [{"name": "a", "match": {"methods": []}, "limit": {"requests": 1, "per": "1s"}}]}"#,
            false,
        ),
        (
            "ratelimit",
            r#"{"rules": [{"name": "a", "match": {"route": ["x"], "host": "*.example.com", "headers": {"x-a": "1", "x-b": {"present": false}}}, "limit": {"requests": 1, "per": "1s"}}]}"#,
            true,
        ),
        ("ratelimit", r#"{"response": {"status": 99}}"#, false),
        (
            "circuit-breaker",
            r#"{"rules": [{"name": "a", "window": {"kind": "time", "size": "10s"}, "failure_when": {"statuses": ["5xx", 429, "404"]}}]}"#,
            true,
        ),
        (
            "circuit-breaker",
            r#"{"rules": [{"name": "a", "window": {"kind": "time", "size": 10}}]}"#,
            false,
        ),
        (
            "circuit-breaker",
            r#"{"rules": [{"name": "a", "window": {"kind": "count", "size": 1001}}]}"#,
            false,
        ),
        (
            "circuit-breaker",
            r#"{"rules": [{"name": "a", "failure_when": {"statuses": ["6xx"]}}]}"#,
            false,
        ),
        (
            "circuit-breaker",
            r#"{"rules": [{"name": "a", "scope": {"header": "x-tenant"}}]}"#,
            true,
        ),
        (
            "circuit-breaker",
            r#"{"rules": [{"name": "a", "scope": "tenant"}]}"#,
            false,
        ),
        (
            "lb-hints",
            r#"{"rules": [{"name": "a", "targets": [{"name": "v1", "weight": 10000.0}], "algorithm": "least_requests"}]}"#,
            true,
        ),
        (
            "lb-hints",
            r#"{"rules": [{"name": "a", "targets": [{"name": "v1", "weight": -1}]}]}"#,
            false,
        ),
        (
            "lb-hints",
            r#"{"rules": [{"name": "a", "targets": [{"name": "v1"}], "no_target": "drop"}]}"#,
            false,
        ),
        ("metrics", r#"{"prefix": "9mesh"}"#, false),
        (
            "metrics",
            r#"{"labels": {"custom": [{"name": "route", "header": "x"}]}}"#,
            false,
        ),
        (
            "metrics",
            r#"{"labels": {"custom": [{"name": "__t", "header": "x"}]}}"#,
            false,
        ),
        (
            "metrics",
            r#"{"labels": {"custom": [{"name": "t", "header": "x", "allowed": ["a;b"]}]}}"#,
            false,
        ),
        (
            "metrics",
            r#"{"duration_buckets_ms": [1.0, 5], "max_series": 3}"#,
            true,
        ),
        ("metrics", r#"{"duration_buckets_ms": []}"#, false),
    ];
    for (filter, config, valid) in cases {
        let (by_schema, by_filter) = verdicts(filter, &serde_json::from_str(config).unwrap());
        assert_eq!(
            by_schema.is_ok(),
            *valid,
            "{filter} schema on {config}: {by_schema:?}"
        );
        assert_eq!(
            by_filter.is_ok(),
            *valid,
            "{filter} on {config}: {by_filter:?}"
        );
    }
}

/// Every `.yaml` file under `dir`, recursively.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect()
}

/// The filter a module path or image URL names (`dist/lb-hints.wasm`, `oci://r/x/lb-hints:0.1`).
fn filter_named_by(text: &str) -> Option<&'static str> {
    let last = text.rsplit('/').next()?;
    let stem = last.split([':', '.', '@']).next()?;
    FILTERS.into_iter().find(|f| *f == stem)
}

/// (filter, configuration) of every Wasm filter in an Envoy configuration.
fn envoy_wasm_configs(v: &Value, out: &mut Vec<(&'static str, Value)>) {
    match v {
        Value::Object(map) => {
            let filename = v["vm_config"]["code"]["local"]["filename"].as_str();
            let value = v["configuration"]["value"].as_str();
            if let (Some(filter), Some(value)) = (filename.and_then(filter_named_by), value) {
                let config = if value.trim().is_empty() {
                    serde_json::json!({})
                } else {
                    serde_json::from_str(value).unwrap_or_else(|e| panic!("{value}: {e}"))
                };
                out.push((filter, config));
            }
            map.values().for_each(|v| envoy_wasm_configs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| envoy_wasm_configs(v, out)),
        _ => {}
    }
}

fn assert_valid(what: &str, filter: &str, config: &Value) {
    let (by_schema, by_filter) = verdicts(filter, config);
    assert!(
        by_schema.is_ok(),
        "{what} ({filter}): the schema refuses it: {by_schema:?}"
    );
    assert!(
        by_filter.is_ok(),
        "{what} ({filter}): the filter refuses it: {by_filter:?}"
    );
}

#[test]
fn every_envoy_configuration_validates() {
    let mut count = 0;
    for path in yaml_files(&repo_root().join("envoy")) {
        for doc in yaml_documents(&path) {
            let mut found = Vec::new();
            envoy_wasm_configs(&doc, &mut found);
            for (filter, config) in found {
                assert_valid(&path.display().to_string(), filter, &config);
                count += 1;
            }
        }
    }
    assert!(
        count >= 8,
        "only {count} filter configurations found under envoy/"
    );
}

#[test]
fn every_istio_plugin_config_validates() {
    let mut count = 0;
    for path in yaml_files(&repo_root().join("istio")) {
        for doc in yaml_documents(&path) {
            let spec = match doc["kind"].as_str() {
                Some("WasmPlugin") => &doc["spec"],
                Some("TrafficExtension") => &doc["spec"]["wasm"],
                _ => continue,
            };
            let url = spec["url"].as_str().unwrap_or_default();
            let filter = filter_named_by(url)
                .unwrap_or_else(|| panic!("{}: no filter in url {url:?}", path.display()));
            let config = match &spec["pluginConfig"] {
                Value::Null => serde_json::json!({}),
                c => c.clone(),
            };
            assert_valid(&path.display().to_string(), filter, &config);
            count += 1;
        }
    }
    assert!(count >= 8, "only {count} plugins found under istio/");
}

/// The filter a README section (`## The lb-hints filter`) is about.
fn section_filter(heading: &str) -> Option<&'static str> {
    let name = heading.strip_prefix("## The ")?.strip_suffix(" filter")?;
    FILTERS.into_iter().find(|f| *f == name)
}

/// Each filter's reference text with its lines: the filter's section of the
/// README and, where the reference moved out of it, `docs/<filter>.md`.
fn readme_sections() -> Vec<(&'static str, Vec<String>)> {
    let text = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let mut sections: Vec<(&'static str, Vec<String>)> = Vec::new();
    let mut current: Option<&'static str> = None;
    for line in text.lines() {
        if line.starts_with("## ") {
            current = section_filter(line);
            if let Some(f) = current {
                sections.push((f, Vec::new()));
            }
        } else if current.is_some() {
            if let Some((_, lines)) = sections.last_mut() {
                lines.push(line.to_string());
            }
        }
    }
    for filter in FILTERS {
        let doc = repo_root().join("docs").join(format!("{filter}.md"));
        if let Ok(text) = std::fs::read_to_string(doc) {
            sections.push((filter, text.lines().map(String::from).collect()));
        }
    }
    sections
}

#[test]
fn every_readme_json_example_validates() {
    let mut count = 0;
    for (filter, lines) in readme_sections() {
        let mut block: Option<String> = None;
        for line in lines {
            match (&mut block, line.trim()) {
                (None, "```json") => block = Some(String::new()),
                (Some(text), "```") => {
                    let config: Value = serde_json::from_str(text)
                        .unwrap_or_else(|e| panic!("README {filter} example: {e}\n{text}"));
                    assert_valid("README example", filter, &config);
                    count += 1;
                    block = None;
                }
                (Some(text), _) => {
                    text.push_str(&line);
                    text.push('\n');
                }
                (None, _) => {}
            }
        }
    }
    assert!(count >= 4, "only {count} README examples");
}

/// The object schema `v` stands for (following `$ref`s and `null` alternatives).
fn object_schema<'a>(root: &'a Value, v: &'a Value) -> Option<&'a Value> {
    if let Some(r) = v["$ref"].as_str() {
        let name = r.strip_prefix("#/$defs/")?;
        return object_schema(root, &root["$defs"][name]);
    }
    if v["properties"].is_object() {
        return Some(v);
    }
    if v["items"].is_object() {
        return object_schema(root, &v["items"]);
    }
    v["anyOf"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|alt| object_schema(root, alt))
}

/// The properties of the object schema at `path` (`"rules.failure_when"`).
fn properties_at(root: &Value, path: &[&str]) -> Vec<String> {
    let mut at = Some(root);
    for name in path {
        at = at.and_then(|s| object_schema(root, s)).and_then(|s| {
            let p = &s["properties"][*name];
            (!p.is_null()).then_some(p)
        });
    }
    at.and_then(|s| object_schema(root, s))
        .and_then(|s| s["properties"].as_object())
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// The README's `| field | default | meaning |` tables name exactly the
/// fields of a rule plus the top-level ones (dotted names: a nested field).
#[test]
fn readme_field_tables_match_the_schemas() {
    let mut tables = 0;
    for (filter, lines) in readme_sections() {
        let Some(start) = lines.iter().position(|l| l.starts_with("| field |")) else {
            continue;
        };
        tables += 1;
        let root = schema(filter);
        let fields: Vec<String> = lines
            .iter()
            .skip(start + 2)
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| {
                let cell = l.split('|').nth(1)?.trim();
                Some(cell.trim_matches('`').to_string())
            })
            .collect();
        // A table of one block's fields (`global.service`, ...) covers that
        // block; the other tables cover a rule and the top level.
        let block = fields
            .first()
            .and_then(|f| f.split_once('.'))
            .map(|(b, _)| b.to_string())
            .filter(|b| fields.iter().all(|f| f.starts_with(&format!("{b}."))));
        let (top, rule) = match &block {
            Some(b) => (Vec::new(), properties_at(&root, &["rules", b])),
            None => (properties_at(&root, &[]), properties_at(&root, &["rules"])),
        };
        for field in &fields {
            let parts: Vec<&str> = field.split('.').collect();
            let (last, parents) = parts.split_last().unwrap();
            let in_rule =
                properties_at(&root, &[&["rules"], parents].concat()).contains(&last.to_string());
            let in_top = properties_at(&root, parents).contains(&last.to_string());
            assert!(
                in_rule || in_top,
                "README {filter} table: `{field}` is not in the schema"
            );
        }
        let named = |name: &str| {
            let name = match &block {
                Some(b) => format!("{b}.{name}"),
                None => name.to_string(),
            };
            fields
                .iter()
                .any(|f| *f == name || f.starts_with(&format!("{name}.")))
        };
        for name in rule.iter().chain(top.iter().filter(|n| *n != "rules")) {
            assert!(
                named(name),
                "README {filter} table: the schema's `{name}` is missing"
            );
        }
    }
    assert!(tables >= 2, "only {tables} field tables in the README");
}
