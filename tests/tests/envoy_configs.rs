//! The Envoy configurations users run: every YAML in `envoy/` passes
//! `envoy --mode validate` with the built filters (which also runs each
//! plugin's configuration), and the demo runs live exactly as
//! `cargo xtask demo` runs it.

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

#[test]
fn the_demo_runs_and_shows_each_filter_working() {
    let running = demo::start(std::path::Path::new("envoy/demo.yaml")).unwrap();
    let mut lines = Vec::new();
    let report = demo::drive(&running, &mut |l| lines.push(l.to_string())).unwrap();
    assert_eq!(
        report.ratelimit_statuses,
        [200, 200, 200, 200, 200, 429, 429, 429],
        "{lines:#?}"
    );
    assert_eq!(report.ratelimit_other_key, 200);
    assert_eq!(
        report.ratelimit_stats,
        [("allowed".to_string(), 6.0), ("limited".to_string(), 3.0)]
    );
    assert_eq!(
        report.breaker_failures_before_open, 5,
        "minimum_calls 5 at 100% failures"
    );
    assert_eq!(
        report.breaker_local_answers,
        vec![(503, "open".to_string()); 5]
    );
    assert_eq!(report.breaker_upstream_calls_while_open, 0);
    assert_eq!(
        report.breaker_after_recovery, [200; 4],
        "2 probes, then closed"
    );
    assert_eq!(
        report.canary_split,
        (90, 10),
        "smooth WRR at 90/10 is exact"
    );
    let per_route: std::collections::HashMap<_, _> =
        report.metrics_requests.iter().cloned().collect();
    // 8 + 1 to /api; 100 + 1 forced to /reviews (v1 90, v2 10 + 1); /payments: 5 failures, 5 local
    // answers, 4 after recovery, plus any local answers while waiting for open_for.
    assert_eq!(per_route.get("api"), Some(&9.0), "{per_route:?}");
    // Counted under the route lb-hints routed to (the forced request went to v2).
    assert_eq!(per_route.get("reviews-v1"), Some(&90.0), "{per_route:?}");
    assert_eq!(per_route.get("reviews-v2"), Some(&11.0), "{per_route:?}");
    assert!(
        per_route.get("payments").is_some_and(|n| *n >= 14.0),
        "{per_route:?}"
    );
    assert_eq!(report.summary.len(), 4);
}

/// No Docker engine runs on our machines, so the compose file is checked as
/// far as a client can: docker-compose parses it, it mounts exactly the demo
/// config and filters the tests run, and its image is the Envoy version the
/// tests use.
#[test]
fn docker_compose_runs_the_tested_demo_config_and_envoy_version() {
    let compose = mesh_testkit::debian::ensure("docker-compose", "docker-compose").unwrap();
    let out = std::process::Command::new(compose)
        .args(["-f", "envoy/docker-compose.yaml", "config"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = repo_root().display().to_string();
    for expected in [
        format!("{root}/dist:/mesh/dist:ro"),
        format!("{root}/envoy/demo.yaml:/mesh/envoy/demo.yaml:ro"),
        "- /mesh/envoy/demo.yaml".to_string(),
        "network_mode: host".to_string(),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
    let version = std::process::Command::new(mesh_testkit::envoy_binary().unwrap())
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout);
    // "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    let release = version
        .split("version: ")
        .nth(1)
        .and_then(|v| v.split('/').nth(1))
        .unwrap_or_default();
    assert!(
        text.contains(&format!("image: envoyproxy/envoy:v{release}")),
        "the compose image should be the Envoy the tests run ({release}):\n{text}"
    );
}
