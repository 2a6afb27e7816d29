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
    let mut lines = Vec::new();
    let report = demo::drive(&running, &mut |l| lines.push(l.to_string())).unwrap();
    demo::assert_each_filter_worked(&report, &lines);
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
