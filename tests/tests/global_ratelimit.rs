//! ratelimit's global mode in real Envoys (2 workers each) sharing one
//! envoyproxy/ratelimit service on one Redis, all on loopback.

use std::time::Duration;

use mesh_testkit::envoy::assert_config_refused_in;
use mesh_testkit::global::{
    away_from_window_end, bootstrap, both_recovered, calls, check_failure_answers, decision,
    failure_decisions, service_config, timed, world, World, FAILURE_RULES,
};
use mesh_testkit::http::{self, Client};
use mesh_testkit::rls::{RateLimitService, Redis};
use mesh_testkit::{both_forms, concurrent_gets, Bootstrap, Envoy, Form, Upstream, WasmFilter};

/// Connections each of an Envoy's two workers accepted so far.
fn connections_per_worker(envoy: &Envoy) -> [f64; 2] {
    let text = envoy.prometheus();
    let accepted = |worker: &str| -> f64 {
        let label = format!("envoy_worker_id=\"{worker}\"");
        text.lines()
            .filter(|l| {
                l.starts_with("envoy_listener_worker_downstream_cx_total{") && l.contains(&label)
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    [accepted("0"), accepted("1")]
}

both_forms!(one_limit_shared_by_three_envoys_is_exact);
fn one_limit_shared_by_three_envoys_is_exact(form: Form) {
    const N: usize = 30;
    let w = world(
        form,
        &service_config(&[("per-user", "x-user", N as u32, "hour")]),
        r#"{"rules": [{"name": "per-user", "key": [{"header": "x-user"}],
            "global": {"service": "rls", "domain": "mesh", "timeout": "2s"}}]}"#,
        3,
    );
    away_from_window_end(3600, Duration::from_secs(30));
    // 4N requests for one user, spread over the three Envoys at once (4
    // connections each, so both workers of each take some).
    let threads: Vec<_> = w
        .envoys
        .iter()
        .map(|e| {
            let port = e.port();
            std::thread::spawn(move || {
                concurrent_gets(port, "/", &[("x-user", "alice")], 4, 4 * N / 3 + 1)
            })
        })
        .collect();
    let responses: Vec<http::Response> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .map(|r| r.unwrap())
        .collect();
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&http::Response> = responses.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok, N, "exactly N answered 200 over all three Envoys");
    assert_eq!(ok + limited.len(), responses.len());
    assert_eq!(w.upstream.requests(), N as u64);
    for r in &limited {
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"per-user\";q=30;w=3600")
        );
        let rl = r.header("ratelimit").unwrap();
        assert!(rl.starts_with("\"per-user\";r=0;t="), "{rl}");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=3600).contains(&retry), "retry-after {retry}");
        assert_eq!(r.body_text(), "rate limited\n");
    }
    let allowed: f64 = w
        .envoys
        .iter()
        .map(|e| decision(e, "per-user", "allowed"))
        .sum();
    let rejected: f64 = w
        .envoys
        .iter()
        .map(|e| decision(e, "per-user", "global_limited"))
        .sum();
    assert_eq!(allowed, N as f64);
    assert_eq!(rejected, limited.len() as f64);
    for e in &w.envoys {
        let asked = calls(e, "per-user", "ok") + calls(e, "per-user", "over_limit");
        assert!(asked > 0.0, "every Envoy asked the service");
    }
}

both_forms!(the_local_pre_check_rejects_without_a_call);
fn the_local_pre_check_rejects_without_a_call(form: Form) {
    let mut w = world(
        form,
        &service_config(&[("per-user", "x-user", 100, "hour")]),
        r#"{"rules": [{"name": "per-user", "key": [{"header": "x-user"}],
            "limit": {"requests": 5, "per": "1h"},
            "global": {"service": "rls", "domain": "mesh", "timeout": "2s"}}]}"#,
        1,
    );
    away_from_window_end(3600, Duration::from_secs(30));
    let before = w.redis.calls("incrby");
    let responses = concurrent_gets(w.envoys[0].port(), "/", &[("x-user", "bob")], 4, 20);
    let ok = responses
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status == 200))
        .count();
    assert_eq!(ok, 5, "the local limit (5) is below the global one (100)");
    let e = &w.envoys[0];
    assert_eq!(
        calls(e, "per-user", "ok"),
        5.0,
        "one call per request under the local limit"
    );
    assert_eq!(
        decision(e, "per-user", "limited"),
        15.0,
        "the rest rejected locally"
    );
    assert_eq!(
        w.redis.calls("incrby") - before,
        5,
        "the service counted in Redis only the 5 requests that were asked"
    );
    w.envoys.clear();
}

both_forms!(an_over_limit_answer_is_remembered_until_the_window_resets);
fn an_over_limit_answer_is_remembered_until_the_window_resets(form: Form) {
    let rules = r#"{"rules": [
            {"name": "per-second", "match": {"path_prefix": "/second"}, "key": [{"header": "x-user"}],
             "global": {"service": "rls", "domain": "mesh", "timeout": "2s"}},
            {"name": "per-user", "key": [{"header": "x-user"}],
             "global": {"service": "rls", "domain": "mesh", "timeout": "2s"}}]}"#;
    let limits = [
        ("per-user", "x-user", 3, "minute"),
        ("per-second", "x-user", 2, "second"),
    ];
    let mut w = world(form, &service_config(&limits), rules, 2);
    // The third Envoy's stats matcher rejects the gauge that tells workers
    // whether anything is remembered: remembering must hold all the same.
    let yaml = bootstrap(form, rules, &w.upstream, w.rls.grpc_port()).replace(
        r#""stats_config": {"stats_tags": ["#,
        r#""stats_config": {"stats_matcher": {"exclusion_list": {"patterns": [{"safe_regex": {"regex": ".*remembered_until.*"}}]}}, "stats_tags": ["#,
    );
    w.envoys.push(Envoy::start(&yaml));
    assert!(
        w.envoys[2].log().contains("keeps no value"),
        "{}",
        w.envoys[2].log()
    );
    away_from_window_end(60, Duration::from_secs(20));
    let user = [("x-user", "carol")];
    let mut first = Client::new(w.envoys[0].port());
    let statuses: Vec<u16> = (0..4)
        .map(|_| first.get("/", &user).unwrap().status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429]);
    let redis_before = w.redis.calls("incrby");
    for (i, e) in w.envoys.iter().enumerate() {
        let asked = || calls(e, "per-user", "ok") + calls(e, "per-user", "over_limit");
        let before = asked();
        let connections_before = connections_per_worker(e);
        // A new connection each: the kernel spreads them over both workers,
        // so what one worker remembered must hold for the other.
        for _ in 0..100 {
            let mut c = Client::new(e.port());
            assert_eq!(c.get("/", &user).unwrap().status, 429);
        }
        let made = asked() - before;
        let connections_after = connections_per_worker(e);
        let per_worker = [
            connections_after[0] - connections_before[0],
            connections_after[1] - connections_before[1],
        ];
        eprintln!("envoy {i}: {made} call(s) for 100 requests over the limit, connections per worker {per_worker:?}");
        assert!(
            per_worker.iter().all(|n| *n > 0.0),
            "both workers served some"
        );
        assert!(made <= 1.0, "envoy {i} made {made} calls");
    }
    let redis_calls = w.redis.calls("incrby") - redis_before;
    assert!(redis_calls <= 2, "{redis_calls} INCRBYs for 300 requests");
    // Another user is not affected.
    assert_eq!(first.get("/", &[("x-user", "dave")]).unwrap().status, 200);

    // A window of one second: remembered while it lasts, asked again after.
    away_from_window_end(1, Duration::from_millis(500));
    let mut c = Client::new(w.envoys[1].port());
    let statuses: Vec<u16> = (0..3)
        .map(|_| c.get("/second", &user).unwrap().status)
        .collect();
    assert_eq!(statuses, [200, 200, 429]);
    let e = &w.envoys[1];
    let asked = || calls(e, "per-second", "ok") + calls(e, "per-second", "over_limit");
    let before = asked();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(c.get("/second", &user).unwrap().status, 200, "a new window");
    assert_eq!(
        asked() - before,
        1.0,
        "after the reset the service is asked again"
    );
}

/// With the service unusable: `allow` lets requests through, `deny` answers
/// 503, each within the timeout plus a margin; returns the slowest answer.
fn both_failure_modes(w: &World, case: &str) -> Duration {
    let e = &w.envoys[0];
    let before = failure_decisions(e);
    let (allow, deny): (Vec<_>, Vec<_>) = (0..5)
        .map(|_| (timed(e.port(), "/allow"), timed(e.port(), "/deny")))
        .unzip();
    let times: Vec<Duration> = allow.iter().zip(&deny).map(|(a, d)| a.2.max(d.2)).collect();
    eprintln!("{case}: answers took {times:?}");
    check_failure_answers(e, case, before, &allow, &deny)
}

both_forms!(failures_follow_the_failure_mode_and_the_filter_recovers);
fn failures_follow_the_failure_mode_and_the_filter_recovers(form: Form) {
    let mut w = world(
        form,
        &service_config(&[
            ("open", "x-user", 1000, "hour"),
            ("closed", "x-user", 1000, "hour"),
        ]),
        FAILURE_RULES,
        1,
    );
    both_recovered(&w, "at start");
    let e = &w.envoys[0];
    let calls_ok = calls(e, "closed", "ok");
    assert!(calls_ok >= 1.0);

    w.rls.stop();
    let stopped = both_failure_modes(&w, "service stopped");
    assert!(calls(&w.envoys[0], "closed", "unavailable") >= 5.0);
    w.rls.restart();
    both_recovered(&w, "service restarted");

    w.rls.pause();
    let slow = both_failure_modes(&w, "service not answering (SIGSTOP)");
    let outcomes: Vec<(&str, f64)> = [
        "ok",
        "timeout",
        "unavailable",
        "error",
        "invalid",
        "not_started",
    ]
    .into_iter()
    .map(|o| (o, calls(&w.envoys[0], "closed", o)))
    .collect();
    eprintln!("calls of rule closed by outcome: {outcomes:?}");
    assert!(calls(&w.envoys[0], "closed", "timeout") >= 5.0);
    assert!(
        slow >= Duration::from_millis(100),
        "a timeout takes the timeout: {slow:?}"
    );
    // A client that goes away while its call is in flight: nothing breaks.
    for _ in 0..20 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", w.envoys[0].port())).unwrap();
        use std::io::Write;
        s.write_all(b"GET /allow HTTP/1.1\r\nhost: x\r\nx-user: gone\r\n\r\n")
            .unwrap();
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    w.rls.resume();
    both_recovered(&w, "service resumed");

    w.redis.stop();
    let failed = |e: &Envoy| -> Vec<f64> {
        ["error", "unavailable", "timeout", "invalid"]
            .iter()
            .map(|o| calls(e, "closed", o))
            .collect()
    };
    let before = failed(&w.envoys[0]);
    let redis_down = both_failure_modes(&w, "redis stopped");
    let after = failed(&w.envoys[0]);
    let delta: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    // envoyproxy/ratelimit answers an error status when Redis is gone (seen
    // as "error"; while it reconnects, as another failure).
    eprintln!("redis stopped: error, unavailable, timeout, invalid calls: {delta:?}");
    assert_eq!(delta.iter().sum::<f64>(), 5.0);
    w.redis.restart();
    both_recovered(&w, "redis restarted");

    eprintln!("slowest answers: service stopped {stopped:?}, not answering {slow:?}, redis stopped {redis_down:?}");
    let log = w.envoys[0].log();
    assert!(!log.contains("panic"), "no panic in the VM:\n{log}");
    let warnings = log.matches("rate limit service call failed").count();
    // Logged once per outage and worker (a success re-arms it), not per request.
    assert!((1..=12).contains(&warnings), "{warnings} failure lines");
}

both_forms!(a_cluster_that_does_not_exist_applies_the_failure_mode);
fn a_cluster_that_does_not_exist_applies_the_failure_mode(form: Form) {
    let upstream = Upstream::start("backend");
    let config = FAILURE_RULES.replace("\"rls\"", "\"no-such-cluster\"");
    let e = Envoy::start(
        &Bootstrap::in_form(form)
            .wasm(WasmFilter::new("ratelimit", &config))
            .route("open", "/", "backend")
            .cluster("backend", upstream.port())
            .yaml(),
    );
    for _ in 0..10 {
        assert_eq!(timed(e.port(), "/allow").0, 200);
        assert_eq!(timed(e.port(), "/deny").0, 503);
    }
    let log = e.log();
    assert!(!log.contains("panic"), "{log}");
    failure_log_lines(&log);
}

/// The log lines of failed service calls, checked to come once per rule and
/// worker (two rules, two workers), not per request.
fn failure_log_lines(log: &str) -> Vec<&str> {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("rate limit service call failed"))
        .collect();
    eprintln!("{}", lines.join("\n"));
    assert!(
        (1..=4).contains(&lines.len()),
        "once per rule and worker, not per request: {lines:#?}"
    );
    lines
}

both_forms!(other_keys_and_rules_are_unaffected_and_shadow_never_rejects);
fn other_keys_and_rules_are_unaffected_and_shadow_never_rejects(form: Form) {
    let w = world(
        form,
        &service_config(&[
            ("per-user", "x-user", 2, "hour"),
            ("trial", "x-user", 2, "hour"),
        ]),
        r#"{"rules": [
            {"name": "trial", "match": {"path_prefix": "/trial"}, "key": [{"header": "x-user"}], "shadow": true,
             "global": {"service": "rls", "domain": "mesh", "timeout": "2s"}},
            {"name": "local-only", "match": {"path_prefix": "/local"}, "limit": {"requests": 1000, "per": "1h"}},
            {"name": "per-user", "key": [{"header": "x-user"}],
             "global": {"service": "rls", "domain": "mesh", "timeout": "2s"}}]}"#,
        1,
    );
    away_from_window_end(3600, Duration::from_secs(30));
    let mut c = Client::new(w.envoys[0].port());
    let get =
        |c: &mut Client, path: &str, user: &str| c.get(path, &[("x-user", user)]).unwrap().status;
    let frank: Vec<u16> = (0..4).map(|_| get(&mut c, "/", "frank")).collect();
    assert_eq!(frank, [200, 200, 429, 429]);
    assert_eq!(get(&mut c, "/", "grace"), 200, "another key");
    assert_eq!(get(&mut c, "/local", "frank"), 200, "another rule");
    let trial: Vec<u16> = (0..10).map(|_| get(&mut c, "/trial", "frank")).collect();
    assert_eq!(trial, [200; 10], "shadow never rejects");
    let e = &w.envoys[0];
    assert_eq!(decision(e, "trial", "allowed"), 2.0);
    assert_eq!(decision(e, "trial", "shadow_limited"), 8.0);
    assert_eq!(decision(e, "trial", "global_limited"), 0.0);
}

both_forms!(bad_global_blocks_are_refused_with_the_json_path);
fn bad_global_blocks_are_refused_with_the_json_path(form: Form) {
    let rule = |global: &str| {
        format!(r#"{{"rules": [{{"name": "a", "key": [{{"header": "x"}}], "global": {global}}}]}}"#)
    };
    let cases = [
        (
            rule(r#"{"domain": "mesh"}"#),
            "ratelimit: rules[0].global: missing field `service`",
        ),
        (
            rule(r#"{"service": "rls", "domain": "my domain"}"#),
            r#"ratelimit: rules[0].global.domain: "my domain": use 1 to 64 letters, digits, '-', '_', '.', ':'"#,
        ),
        (
            rule(r#"{"service": "rls", "domain": "mesh", "timeout": "0s"}"#),
            "ratelimit: rules[0].global.timeout: must be from 1ms to 10s",
        ),
        (
            rule(r#"{"service": "rls", "domain": "mesh", "timeout": "1m"}"#),
            "ratelimit: rules[0].global.timeout: must be from 1ms to 10s",
        ),
        (
            rule(r#"{"service": "rls", "domain": "mesh", "failure_mode": "alow"}"#),
            "ratelimit: rules[0].global.failure_mode: unknown variant `alow`, expected `allow` or `deny`",
        ),
    ];
    for (config, expected) in cases {
        assert_config_refused_in(form, "ratelimit", &config, expected);
    }
}

both_forms!(the_shipped_example_and_its_service_configuration_match);
fn the_shipped_example_and_its_service_configuration_match(form: Form) {
    let root = mesh_testkit::repo_root();
    let yaml: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("envoy/ratelimit-global.yaml")).unwrap(),
    )
    .unwrap();
    let filter = &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"][0]["typed_config"]["config"]["configuration"]["value"];
    let filter = filter.as_str().unwrap();
    let service = std::fs::read_to_string(root.join("envoy/ratelimit-global.rls.yml")).unwrap();
    let redis = Redis::start();
    let rls = RateLimitService::start(redis.port(), &service);
    let upstream = Upstream::start("backend");
    let e = Envoy::start(
        &Bootstrap::in_form(form)
            .wasm(WasmFilter::new("ratelimit", filter))
            .route("api", "/api", "backend")
            .route("other", "/", "backend")
            .cluster("backend", upstream.port())
            .grpc_cluster("rls", rls.grpc_port())
            .yaml(),
    );
    away_from_window_end(60, Duration::from_secs(15));
    let mut c = Client::new(e.port());
    let statuses: Vec<u16> = (0..40)
        .map(|_| c.get("/api/items", &[("x-user", "alice")]).unwrap().status)
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    // 30 a minute at the service; the example's 20 ms timeout may let a slow
    // call through on a loaded machine (counted as failed_open), which the
    // service may or may not have counted by the time it answered late.
    let failed_open = decision(&e, "per-user", "failed_open") as usize;
    assert!(
        (30..=30 + failed_open).contains(&ok),
        "{ok} answered 200, {failed_open} failed open: {statuses:?}"
    );
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429));
    assert_eq!(
        c.get("/other", &[("x-user", "alice")]).unwrap().status,
        200,
        "route other: no rule"
    );
}

#[test]
fn a_cluster_without_http2_applies_the_failure_mode_and_the_log_says_why_once() {
    let redis = Redis::start();
    let rls = RateLimitService::start(
        redis.port(),
        &service_config(&[
            ("open", "x-user", 1000, "hour"),
            ("closed", "x-user", 1000, "hour"),
        ]),
    );
    let upstream = Upstream::start("backend");
    let start = |http2: bool| {
        let b = Bootstrap::new()
            .wasm(WasmFilter::new("ratelimit", FAILURE_RULES))
            .route("open", "/", "backend")
            .cluster("backend", upstream.port());
        let b = if http2 {
            b.grpc_cluster("rls", rls.grpc_port())
        } else {
            b.cluster("rls", rls.grpc_port())
        };
        Envoy::start(&b.yaml())
    };
    let (good, http1) = (start(true), start(false));
    for _ in 0..10 {
        assert_eq!(timed(http1.port(), "/allow").0, 200, "failure_mode allow");
        let (status, body, _) = timed(http1.port(), "/deny");
        assert_eq!(
            (status, body.as_str()),
            (503, "rate limit service unavailable\n"),
            "failure_mode deny"
        );
    }
    assert_eq!(calls(&http1, "open", "unavailable"), 10.0);
    assert_eq!(calls(&http1, "closed", "unavailable"), 10.0);
    assert_eq!(decision(&http1, "open", "failed_open"), 10.0);
    assert_eq!(decision(&http1, "closed", "failure_denied"), 10.0);
    assert_eq!(redis.calls("incrby"), 0, "no call reached the service");
    let log = http1.log();
    for line in failure_log_lines(&log) {
        assert!(
            line.contains("reset reason: protocol error")
                && line.contains("(does cluster \"rls\" speak HTTP/2? gRPC needs http2_protocol_options, or an Istio port named grpc)"),
            "{line}"
        );
    }
    // The same service through an HTTP/2 cluster answers.
    assert_eq!(timed(good.port(), "/deny").0, 200);
    assert_eq!(calls(&good, "closed", "ok"), 1.0);
}
