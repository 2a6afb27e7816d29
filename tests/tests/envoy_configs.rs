//! The Envoy configurations users run: every YAML in `envoy/` passes
//! `envoy --mode validate` with the built filters (which also runs each
//! plugin's configuration), and the demo runs live exactly as
//! `cargo xtask demo` runs it (`tests/tests/docker.rs` and `func_e.rs` run
//! the same demo through `docker compose` and `func-e run`).

use std::path::{Path, PathBuf};

use mesh_testkit::config::STAT_TAGS;
use mesh_testkit::{demo, envoy, repo_root};

fn envoy_yamls() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![repo_root().join("envoy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml")
                && !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("docker-compose"))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Some bench configs load copies the bench itself writes under
/// `target/bench/<variant>/` (the modules as built, or wasm-opt'ed); until a
/// bench has run, validate them against the same module from `dist/`.
fn with_bench_modules_from_dist(relative: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join(relative)).unwrap();
    let mut rewritten = text.clone();
    for variant in ["as-built", "wasm-opt"] {
        let dir = format!("target/bench/{variant}/");
        if text.contains(&dir) && !repo_root().join(&dir).is_dir() {
            rewritten = rewritten.replace(&dir, "dist/");
        }
    }
    if rewritten == text {
        return relative.to_path_buf();
    }
    let copy = std::env::temp_dir().join(format!(
        "mesh-validate-{}-{}",
        std::process::id(),
        relative.file_name().unwrap().to_string_lossy()
    ));
    // Envoy runs from the repository root, so relative module paths still resolve.
    std::fs::write(&copy, rewritten).unwrap();
    copy
}

#[test]
fn every_envoy_yaml_validates_with_the_built_filters() {
    let files = envoy_yamls();
    assert!(
        files.iter().any(|f| f.ends_with("envoy/demo.yaml")),
        "{files:?}"
    );
    let mut failures = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(repo_root()).unwrap();
        let (ok, output) = envoy::validate(&with_bench_modules_from_dist(relative)).unwrap();
        if !ok {
            failures.push(format!("{}:\n{output}", relative.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} configs refused:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn stats_tags_in_envoy_yamls_use_the_filters_encoding() {
    for file in envoy_yamls() {
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines().filter(|l| l.contains("tag_name:")) {
            let tag = line
                .split("tag_name:")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .trim();
            let expected = format!("regex: \"({tag}=\\\\.=(.+?);\\\\.;)\"");
            assert!(
                line.contains(&expected),
                "{}: {line}\nexpected {expected}",
                file.display()
            );
        }
    }
    // The demo runs all four filters, so it needs every tag they use.
    let demo = std::fs::read_to_string(repo_root().join("envoy/demo.yaml")).unwrap();
    for tag in STAT_TAGS {
        assert!(
            demo.contains(&format!("tag_name: {tag},")),
            "envoy/demo.yaml lacks the stats tag {tag}"
        );
    }
}

/// The demo's ports are fixed: one demo at a time.
static DEMO_PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_demo(config: &str) {
    let _ports = DEMO_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let running = demo::start(std::path::Path::new(config)).unwrap();
    demo::drive_and_check(&running.target());
}

#[test]
fn the_demo_runs_and_shows_each_filter_working() {
    run_demo("envoy/demo.yaml");
}

/// `cargo xtask demo --suite`: the same traffic and summary on the suite module.
#[test]
fn the_demo_on_the_suite_module_shows_each_policy_working() {
    run_demo("envoy/suite.yaml");
}

/// The bench's native peer of our keyed ratelimit
/// (`envoy/bench/native-ratelimit-keyed.yaml`) really keeps one bucket per
/// `x-api-key`: the same file with its per-key bucket lowered to 3 requests a
/// minute answers a key's fourth request 429 while another key, and a request
/// without a key (the default bucket, which never limits), still pass.
#[test]
fn the_native_keyed_ratelimit_bench_case_limits_each_key_on_its_own() {
    let upstream = mesh_testkit::upstream::Upstream::start("bench-upstream");
    let file = repo_root().join("envoy/bench/native-ratelimit-keyed.yaml");
    let original = std::fs::read_to_string(&file).unwrap();
    let per_key = "token_bucket: { max_tokens: 1000, tokens_per_fill: 1000, fill_interval: 1s }";
    assert!(
        original.contains(per_key),
        "{}: no per-key bucket",
        file.display()
    );
    let config = original
        .replace(
            per_key,
            "token_bucket: { max_tokens: 3, tokens_per_fill: 3, fill_interval: 60s }",
        )
        .replace("port_value: 19013", "port_value: 0")
        .replace("port_value: 18013", "port_value: 0")
        .replace(
            "port_value: 18100",
            &format!("port_value: {}", upstream.port()),
        );
    let envoy = mesh_testkit::Envoy::start_with(&config, 1)
        .unwrap_or_else(|f| panic!("envoy refused the config ({:?}):\n{}", f.status, f.log));
    let status = |headers: &[(&str, &str)]| {
        mesh_testkit::http::get(envoy.port(), "/api/items", headers)
            .unwrap()
            .status
    };
    let a: Vec<u16> = (0..4).map(|_| status(&[("x-api-key", "key-a")])).collect();
    assert_eq!(a, [200, 200, 200, 429], "key-a's four requests");
    assert_eq!(
        status(&[("x-api-key", "key-b")]),
        200,
        "key-b has its own bucket"
    );
    let without_key: Vec<u16> = (0..5).map(|_| status(&[])).collect();
    assert_eq!(without_key, [200; 5], "no key: the default bucket");
}
