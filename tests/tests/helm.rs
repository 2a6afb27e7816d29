//! The Helm chart `charts/mesh-filters/`, with a real Helm (pinned, built
//! from the Go module proxy on first use):
//! - `values.schema.json` embeds the current `schemas/<filter>.schema.json`;
//! - `helm lint --strict` passes with the defaults and each ci value file;
//! - the defaults render exactly the plugins of `istio/` (both kinds);
//! - every rendered resource's `spec` is valid against its CRD's
//!   `openAPIV3Schema` (../shared/schemas/, strict: unknown fields refused)
//!   and every `pluginConfig` against its filter's schema, both checked with
//!   the `jsonschema` crate; the renders are written to target/helm/rendered/;
//! - the value files' registry, tag, digest, selector, match, phase,
//!   priority and failStrategy end up where Istio reads them;
//! - bad values are refused by `helm template` (the same install action and
//!   schema check as `helm install`), naming the path of the bad value.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use mesh_testkit::helm::{self, NAMESPACE};
use mesh_testkit::repo_root;
use serde_json::{json, Value};

fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    text.split("\n---")
        .map(|doc| {
            serde_yaml::from_str::<Value>(doc).unwrap_or_else(|e| panic!("{what}: {e}\n{doc}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn render(args: &[&str]) -> Vec<Value> {
    let yaml = helm::render(args).unwrap();
    yaml_docs(&yaml, &format!("helm template {args:?}"))
}

fn ci_file(name: &str) -> String {
    helm::chart_dir()
        .join("ci")
        .join(name)
        .display()
        .to_string()
}

/// The resources of one render, by `<kind>/<name>`.
fn by_name(docs: &[Value]) -> BTreeMap<String, Value> {
    docs.iter()
        .map(|d| {
            let key = format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            );
            (key, d.clone())
        })
        .collect()
}

/// The filter a rendered resource runs (the chart labels it).
fn filter_of(doc: &Value) -> String {
    doc["metadata"]["labels"]["mesh-filters.io/filter"]
        .as_str()
        .unwrap_or_else(|| panic!("no filter label on {doc}"))
        .to_string()
}

/// The Wasm fields: in `spec` (WasmPlugin) or `spec.wasm` (TrafficExtension).
fn wasm_of(doc: &Value) -> &Value {
    if doc["kind"] == "TrafficExtension" {
        &doc["spec"]["wasm"]
    } else {
        &doc["spec"]
    }
}

// ---------------------------------------------------------------------------
// Schemas: the CRDs' (OpenAPI v3, as kubectl applies them) and the filters'.

/// The `spec` schema of `kind` (v1alpha1) from ../shared/schemas/.
fn crd_spec_schema(kind: &str) -> Value {
    let dir = std::env::var("MESH_ISTIO_SCHEMAS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("../shared/schemas"));
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        for crd in yaml_docs(&text, &path.display().to_string()) {
            if crd["spec"]["group"] != "extensions.istio.io" || crd["spec"]["names"]["kind"] != kind
            {
                continue;
            }
            let versions = crd["spec"]["versions"].as_array().unwrap();
            let v = versions.iter().find(|v| v["name"] == "v1alpha1").unwrap();
            return v["schema"]["openAPIV3Schema"]["properties"]["spec"].clone();
        }
    }
    panic!("no CRD for {kind} in {}", dir.display());
}

/// A Kubernetes structural schema as JSON Schema (draft 4, which OpenAPI
/// v3.0 schemas follow): `nullable` becomes a null type, int32 its range,
/// and an object with `properties` refuses other fields unless it preserves
/// unknown fields (strict field validation, as `kubectl apply` does). The
/// CEL rules (`x-kubernetes-validations`) are not evaluated here.
fn strict(schema: &Value) -> Value {
    let mut out = schema.clone();
    if let Some(object) = out.as_object_mut() {
        for key in ["properties"] {
            if let Some(Value::Object(props)) = object.get_mut(key) {
                for item in props.values_mut() {
                    *item = strict(item);
                }
            }
        }
        for key in ["items", "additionalProperties"] {
            if object.get(key).is_some_and(Value::is_object) {
                object.insert(key.into(), strict(&object[key]));
            }
        }
        for key in ["allOf", "anyOf", "oneOf"] {
            if let Some(Value::Array(list)) = object.get_mut(key) {
                for item in list.iter_mut() {
                    *item = strict(item);
                }
            }
        }
        if object.contains_key("properties")
            && !object.contains_key("additionalProperties")
            && object.get("x-kubernetes-preserve-unknown-fields") != Some(&json!(true))
        {
            object.insert("additionalProperties".into(), json!(false));
        }
        if object.get("format") == Some(&json!("int32")) {
            object.insert("minimum".into(), json!(i32::MIN));
            object.insert("maximum".into(), json!(i32::MAX));
        }
        if object.get("nullable") == Some(&json!(true)) {
            if let Some(ty) = object.get("type").cloned() {
                object.insert("type".into(), json!([ty, "null"]));
            }
        }
    }
    out
}

fn errors_of(validator: &jsonschema::Validator, value: &Value) -> Vec<String> {
    validator
        .iter_errors(value)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect()
}

/// Every resource of `docs` checked against its CRD and its filter schema.
fn check_valid(docs: &[Value], what: &str) {
    let filter_schemas = helm::filter_schemas(&helm::filter_schemas_dir()).unwrap();
    let mut crds = BTreeMap::new();
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap().to_string();
        let name = doc["metadata"]["name"].as_str().unwrap();
        assert_eq!(doc["apiVersion"], "extensions.istio.io/v1alpha1", "{what}");
        assert!(
            ["WasmPlugin", "TrafficExtension"].contains(&kind.as_str()),
            "{what}: {kind}"
        );
        assert_eq!(doc["metadata"]["namespace"], NAMESPACE, "{what}: {name}");
        let crd = crds
            .entry(kind.clone())
            .or_insert_with(|| jsonschema::draft4::new(&strict(&crd_spec_schema(&kind))).unwrap());
        let errors = errors_of(crd, &doc["spec"]);
        assert!(errors.is_empty(), "{what}: {kind} {name}: {errors:#?}");

        let filter = filter_of(doc);
        let schema = filter_schemas
            .get(&filter)
            .unwrap_or_else(|| panic!("no schema for {filter}"));
        let validator = jsonschema::validator_for(schema).unwrap();
        let config = &wasm_of(doc)["pluginConfig"];
        assert!(config.is_object(), "{what}: {name} has no pluginConfig");
        let errors = errors_of(&validator, config);
        assert!(
            errors.is_empty(),
            "{what}: {name}: pluginConfig: {errors:#?}"
        );
    }
}

// ---------------------------------------------------------------------------

#[test]
fn values_schema_embeds_the_current_filter_schemas() {
    let (now, wanted) = helm::values_schema_now_and_wanted().unwrap();
    assert!(
        now == wanted,
        "{} is stale: run `cargo xtask helm-schema`",
        helm::values_schema_path().display()
    );
    let filters = helm::filter_schemas(&helm::filter_schemas_dir()).unwrap();
    let entries = now["properties"]["filters"]["properties"]
        .as_object()
        .unwrap();
    assert_eq!(
        entries.keys().collect::<Vec<_>>(),
        filters.keys().collect::<Vec<_>>()
    );
    // Every filter the default values configure has a schema.
    let values: Value =
        serde_yaml::from_str(&fs::read_to_string(helm::chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    for filter in values["filters"].as_object().unwrap().keys() {
        assert!(filters.contains_key(filter), "no schema for {filter}");
    }
}

#[test]
fn helm_lint_passes_with_the_defaults_and_each_ci_value_file() {
    let files = helm::ci_value_files();
    assert!(files.len() >= 2, "{files:?}");
    let mut cases: Vec<Vec<String>> = vec![vec![]];
    cases.extend(
        files
            .iter()
            .map(|f| vec!["--values".into(), f.display().to_string()]),
    );
    for args in cases {
        let out = helm::helm_command()
            .unwrap()
            .args(["lint", "--strict", "--namespace", NAMESPACE])
            .arg(helm::chart_dir())
            .args(&args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helm lint {args:?}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{stdout}"
        );
    }
}

/// The manifests of `istio/<dir>/`, by `<kind>/<name>`; without
/// `suite.yaml`, the alternative to the four (the chart's `suite` entry is off
/// by default).
fn istio_manifests(dir: &str) -> BTreeMap<String, Value> {
    let dir = repo_root().join("istio").join(dir);
    let mut docs = Vec::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n == "suite.yaml") {
            continue;
        }
        docs.extend(yaml_docs(
            &fs::read_to_string(&path).unwrap(),
            &path.display().to_string(),
        ));
    }
    by_name(&docs)
}

#[test]
fn the_defaults_render_the_plugins_of_the_istio_folder() {
    for (args, dir) in [
        (vec![], "wasmplugins"),
        (vec!["--set", "kind=TrafficExtension"], "trafficextensions"),
    ] {
        let rendered = by_name(&render(&args));
        let expected = istio_manifests(dir);
        assert_eq!(
            rendered.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "istio/{dir}"
        );
        for (key, want) in &expected {
            let got = &rendered[key];
            assert_eq!(got["apiVersion"], want["apiVersion"], "{key}");
            assert_eq!(
                got["metadata"]["namespace"], want["metadata"]["namespace"],
                "{key}"
            );
            assert_eq!(got["spec"], want["spec"], "{key} (istio/{dir})");
        }
    }
}

#[test]
fn every_render_is_valid_against_the_crds_and_the_filter_schemas() {
    let rendered = repo_root().join("target/helm/rendered");
    let written = helm::render_value_files(&rendered).unwrap();
    assert_eq!(written.len(), 2 + helm::ci_value_files().len());
    for path in &written {
        let docs = yaml_docs(
            &fs::read_to_string(path).unwrap(),
            &path.display().to_string(),
        );
        assert!(!docs.is_empty(), "{}", path.display());
        check_valid(&docs, &path.display().to_string());
    }
}

/// The CRD check itself refuses what `kubectl apply` refuses.
#[test]
fn the_crd_check_refuses_unknown_fields_and_bad_enums() {
    let docs = render(&["--set", "kind=TrafficExtension"]);
    let validator = jsonschema::draft4::new(&strict(&crd_spec_schema("TrafficExtension"))).unwrap();
    assert!(errors_of(&validator, &docs[0]["spec"]).is_empty());
    for (path, value) in [
        ("/wasm/urls", json!("oci://x/y:1")),
        ("/wasm/failStrategy", json!("FAIL_SOMETIMES")),
        ("/phase", json!("UNSPECIFIED_PHASE")),
        ("/priority", json!(1_u64 << 40)),
        ("/selector/matchLabel", json!({"app": "x"})),
    ] {
        let mut spec = docs[0]["spec"].clone();
        let (parent, key) = path.rsplit_once('/').unwrap();
        spec.pointer_mut(parent).unwrap()[key] = value;
        assert!(
            !errors_of(&validator, &spec).is_empty(),
            "{path} accepted: {spec}"
        );
    }
}

#[test]
fn the_value_files_land_where_istio_reads_them() {
    let digest = "3f4e7c1b9a0d2e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f";
    let te = by_name(&render(&[
        "--values",
        &ci_file("trafficextension-values.yaml"),
    ]));
    assert_eq!(
        te.keys().collect::<Vec<_>>(),
        [
            "TrafficExtension/checkout-metrics",
            "TrafficExtension/checkout-ratelimit"
        ]
    );
    let ratelimit = &te["TrafficExtension/checkout-ratelimit"]["spec"];
    assert_eq!(
        ratelimit["wasm"]["url"],
        format!("oci://127.0.0.1:5000/mesh-filters/ratelimit@sha256:{digest}")
    );
    assert_eq!(ratelimit["wasm"]["sha256"], digest);
    assert_eq!(ratelimit["wasm"]["imagePullPolicy"], "Always");
    assert_eq!(ratelimit["wasm"]["imagePullSecret"], "registry-credentials");
    assert_eq!(ratelimit["wasm"]["failStrategy"], "FAIL_CLOSE");
    assert_eq!(ratelimit["wasm"]["pluginConfig"]["max_keys"], 5000);
    assert_eq!(
        ratelimit["wasm"]["pluginConfig"]["rules"][0]["name"],
        "per-tenant"
    );
    assert_eq!(
        ratelimit["selector"],
        json!({"matchLabels": {"app": "checkout", "version": "v3"}})
    );
    assert_eq!(
        ratelimit["match"],
        json!([{"mode": "SERVER", "ports": [{"number": 8080}]}])
    );
    assert_eq!(ratelimit["phase"], "AUTHZ");
    assert!(ratelimit.get("url").is_none(), "{ratelimit}");
    let metrics = &te["TrafficExtension/checkout-metrics"]["spec"];
    assert_eq!(
        metrics["wasm"]["url"],
        "oci://127.0.0.1:5000/mesh-filters/metrics:0.2.0"
    );
    assert!(metrics["wasm"].get("sha256").is_none(), "{metrics}");
    assert_eq!(metrics["priority"], 500);
    // The given pluginConfig is merged into the default one: keys it does
    // not name stay, null drops them, lists are replaced.
    let config = &metrics["wasm"]["pluginConfig"];
    assert_eq!(config["prefix"], "checkout");
    assert_eq!(config["labels"]["cluster"], false);
    assert!(config["labels"].get("custom").is_none(), "{config}");
    assert!(config.get("duration_buckets_ms").is_none(), "{config}");
    assert_eq!(ratelimit["wasm"]["pluginConfig"]["headers"], "draft");
    assert_eq!(
        ratelimit["wasm"]["pluginConfig"]["rules"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let pinned = by_name(&render(&["--values", &ci_file("pinned-values.yaml")]));
    assert_eq!(
        pinned.keys().collect::<Vec<_>>(),
        [
            "WasmPlugin/shop-filters-lb-hints",
            "WasmPlugin/shop-filters-metrics",
            "WasmPlugin/shop-filters-ratelimit"
        ]
    );
    for doc in pinned.values() {
        let spec = &doc["spec"];
        let sha = spec["sha256"].as_str().unwrap();
        assert_eq!(
            spec["url"],
            format!(
                "oci://registry.example.com/mesh-filters/{}@sha256:{sha}",
                filter_of(doc)
            )
        );
    }
    let lb = &pinned["WasmPlugin/shop-filters-lb-hints"]["spec"];
    assert_eq!(lb["selector"], json!({"matchLabels": {"app": "gateway"}}));
    assert_eq!(lb["match"], json!([{"mode": "CLIENT_AND_SERVER"}]));
    assert_eq!(lb["failStrategy"], "FAIL_RELOAD");
    let rl = &pinned["WasmPlugin/shop-filters-ratelimit"]["spec"];
    assert_eq!(rl["failStrategy"], "FAIL_OPEN");
    assert_eq!(rl["selector"], json!({"matchLabels": {"app": "frontend"}}));
}

/// A values file in a fresh temporary folder (removed on drop).
struct TempValues(PathBuf);

impl TempValues {
    fn new(name: &str, yaml: &str) -> TempValues {
        let dir = repo_root()
            .join("target/helm/bad-values")
            .join(format!("{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("values.yaml");
        fs::write(&path, yaml).unwrap();
        TempValues(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempValues {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn bad_values_are_refused_with_their_path() {
    let cases = [
        (
            "wrong-type",
            "filters:\n  ratelimit:\n    pluginConfig:\n      rules:\n      - name: r\n        limit: { requests: lots, per: 1m }\n",
            "/filters/ratelimit/pluginConfig/rules/0/limit/requests",
        ),
        (
            "unknown-field",
            "filters:\n  metrics:\n    pluginConfig:\n      max_serie: 10\n",
            "/filters/metrics/pluginConfig",
        ),
        (
            "bad-fail-strategy",
            "filters:\n  lb-hints:\n    failStrategy: FAIL_SOMETIMES\n",
            "/filters/lb-hints/failStrategy",
        ),
        (
            "bad-digest",
            "filters:\n  ratelimit:\n    image: { digest: sha256:1234 }\n",
            "/filters/ratelimit/image/digest",
        ),
        (
            "unknown-filter",
            "filters:\n  ratelimiter: { enabled: true }\n",
            "/filters",
        ),
        ("bad-kind", "kind: EnvoyFilter\n", "/kind"),
    ];
    for (name, yaml, path) in cases {
        let values = TempValues::new(name, yaml);
        let file = values.path().display().to_string();
        let out = helm::template(&["--values", &file]).unwrap();
        assert!(
            !out.ok,
            "{name}: helm template accepted it:\n{}",
            out.stdout
        );
        assert!(
            out.stderr
                .contains("values don't meet the specifications of the schema")
                && out.stderr.contains(&format!("'{path}'")),
            "{name}: the error does not name {path}:\n{}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "{name}: rendered anyway");
    }
}
