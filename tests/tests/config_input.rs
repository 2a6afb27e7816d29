//! Configuration input in a real Envoy: hostile configurations (a huge
//! string, 10 000-deep nesting) are refused with one clear line and Envoy
//! exits cleanly; the filters log through the `log` crate at Envoy's level.

use std::time::{Duration, Instant};

use mesh_testkit::{free_port, http, Bootstrap, Envoy, StartFailure, Upstream, WasmFilter};

/// Envoy with one `filter` configured with `config`; it must refuse to start.
fn refused(filter: &str, config: &str) -> StartFailure {
    let upstream = Upstream::start("backend");
    Envoy::start_with(
        &Bootstrap::new()
            .wasm(WasmFilter::new(filter, config))
            .route("default", "/", "backend")
            .cluster("backend", upstream.port())
            .yaml(),
        2,
    )
    .err()
    .unwrap_or_else(|| panic!("{filter}: Envoy started with a hostile configuration"))
}

/// The refusal is one error line ending in `expected`, and Envoy exited by
/// itself with an error status (not killed by a signal, no crash, no panic).
fn assert_refused_cleanly(failure: &StartFailure, filter: &str, expected: &str) {
    let marker = format!("{filter}: ");
    let lines: Vec<&str> = failure
        .log
        .lines()
        .filter(|l| l.contains(&marker) && l.contains("[error]"))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{}", failure.log);
    assert!(
        lines[0].ends_with(expected),
        "{}\nexpected the line to end with: {expected}",
        lines[0]
    );
    assert!(lines[0].len() < 1000, "the line echoes the hostile input");
    let status = failure.status.expect("Envoy exited");
    assert!(
        status.code().is_some_and(|c| c != 0),
        "Envoy did not exit with an error status: {status:?}"
    );
    // Envoy's own "[critical] Plugin ... failed to load" lines are expected;
    // a crash would show a signal handler's dump or a Wasm panic.
    for crash in ["panic", "Caught ", "Backtrace", "stack trace"] {
        assert!(!failure.log.contains(crash), "{crash} in:\n{}", failure.log);
    }
}

#[test]
fn a_megabyte_string_is_refused_without_reading_it() {
    let config = format!(
        r#"{{"rules": [{{"name": "{}", "limit": {{"requests": 1, "per": "1s"}}}}]}}"#,
        "a".repeat(1 << 20)
    );
    let failure = refused("ratelimit", &config);
    let expected = format!(
        "ratelimit: configuration: {} bytes; at most 262144 bytes are read",
        config.len()
    );
    assert_refused_cleanly(&failure, "ratelimit", &expected);
}

#[test]
fn a_long_string_within_the_size_limit_is_refused_with_its_path() {
    let config = format!(
        r#"{{"rules": [{{"name": "{}", "targets": [{{"name": "v1"}}]}}]}}"#,
        "n".repeat(200_000)
    );
    let failure = refused("lb-hints", &config);
    assert_refused_cleanly(&failure, "lb-hints", "...");
    assert!(failure.log.contains("lb-hints: rules[0].name: \"nnnn"));
}

#[test]
fn ten_thousand_deep_nesting_is_refused() {
    let deep = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let failure = refused(
        "circuit-breaker",
        &format!(r#"{{"rules": {}}}"#, deep(10_000)),
    );
    assert_refused_cleanly(
        &failure,
        "circuit-breaker",
        // (A rule is an object, so the first refused level is the rule.)
        "circuit-breaker: rules[0]: invalid type: sequence, expected struct RuleSpec",
    );
    // Not an object at all: refused before any reading.
    let failure = refused("metrics", &deep(10_000));
    assert_refused_cleanly(
        &failure,
        "metrics",
        "metrics: configuration: expected a JSON object (the configuration must be a JSON \
         object; in Envoy YAML pass it as a google.protobuf.StringValue, not a Struct)",
    );
}

/// The `log` crate's macros reach Envoy's log through the SDK's logger, at
/// the level Envoy runs the `wasm` component with (the testkit runs it at debug).
#[test]
fn logs_reach_envoy_at_their_level() {
    let closed_port = free_port();
    let envoy = Envoy::start(
        &Bootstrap::new()
            .wasm(WasmFilter::new(
                "circuit-breaker",
                r#"{"rules": [{"name": "all", "scope": "cluster"}]}"#,
            ))
            .route("dead", "/", "dead")
            .cluster("dead", closed_port)
            .yaml(),
    );
    let r = http::get(envoy.port(), "/", &[]).unwrap();
    assert_eq!(r.status, 503, "no upstream listens on {closed_port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = |log: &str, level: &str, text: &str| {
        log.lines().any(|l| l.contains(level) && l.contains(text))
    };
    loop {
        let log = envoy.log();
        let info = line(&log, "[info]", "circuit-breaker: configured 1 rule(s)");
        let debug = line(
            &log,
            "[debug]",
            "circuit-breaker: no upstream status, response.code_details \"upstream_reset_before_response_started",
        );
        if info && debug {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "info {info}, debug {debug}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
