//! The ratelimit filter in a real Envoy (2 workers) in front of a real upstream.

use mesh_testkit::envoy::assert_config_refused_in;
use mesh_testkit::http::{self, Client};
use mesh_testkit::{both_forms, concurrent_gets, Bootstrap, Envoy, Form, Upstream, WasmFilter};

/// Envoy with one ratelimit filter configured with `config`, routes `limited`
/// (/limited) and `open` (everything else), both to one upstream.
fn envoy_with(form: Form, config: &str) -> (Envoy, Upstream) {
    let upstream = Upstream::start("backend");
    let envoy = Envoy::start(
        &Bootstrap::in_form(form)
            .wasm(WasmFilter::new("ratelimit", config))
            .route("limited", "/limited", "backend")
            .route("open", "/", "backend")
            .cluster("backend", upstream.port())
            .yaml(),
    );
    (envoy, upstream)
}

fn statuses(responses: &[std::io::Result<http::Response>]) -> (usize, usize, usize) {
    let ok = responses
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status == 200))
        .count();
    let limited = responses
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status == 429))
        .count();
    (ok, limited, responses.len() - ok - limited)
}

both_forms!(exact_across_two_workers_under_32_connections);
fn exact_across_two_workers_under_32_connections(form: Form) {
    const N: usize = 300;
    let (envoy, upstream) = envoy_with(
        form,
        &format!(
            r#"{{"rules": [{{"name": "global", "limit": {{"requests": {N}, "per": "1h", "burst": {N}}}}}]}}"#
        ),
    );
    let responses = concurrent_gets(envoy.port(), "/", &[], 40, 4 * N);
    assert_eq!(
        statuses(&responses),
        (N, 3 * N, 0),
        "expected exactly N answers 200 and 3N answers 429"
    );
    assert_eq!(
        upstream.requests(),
        N as u64,
        "the upstream must see only admitted requests"
    );
    let count = |d: &str| {
        envoy.metric(
            "mesh_ratelimit_requests_total",
            &[("rule", "global"), ("decision", d)],
        )
    };
    assert_eq!(count("allowed"), Some(N as f64));
    assert_eq!(count("limited"), Some(3.0 * N as f64));
}

both_forms!(keys_are_independent_and_headers_are_right);
fn keys_are_independent_and_headers_are_right(form: Form) {
    let (envoy, _upstream) = envoy_with(
        form,
        r#"{"headers_on_allowed": true,
            "rules": [{"name": "per-key", "key": [{"header": "x-api-key"}], "limit": {"requests": 2, "per": "1m"}}]}"#,
    );
    let mut c = Client::new(envoy.port());
    for key in ["alice", "bob"] {
        let h = [("x-api-key", key)];
        let first = c.get("/", &h).unwrap();
        assert_eq!(first.status, 200);
        assert_eq!(
            first.header("ratelimit-policy"),
            Some("\"per-key\";q=2;w=60")
        );
        assert_eq!(first.header("ratelimit"), Some("\"per-key\";r=1;t=30"));
        assert_eq!(
            first.body_text(),
            "backend\n",
            "allowed answers come from the upstream"
        );
        assert_eq!(c.get("/", &h).unwrap().status, 200);
        let third = c.get("/", &h).unwrap();
        assert_eq!(third.status, 429, "{key}'s third request");
        assert_eq!(third.body_text(), "rate limited\n");
        assert_eq!(third.header("ratelimit"), Some("\"per-key\";r=0;t=60"));
        let retry: u64 = third.header("retry-after").unwrap().parse().unwrap();
        assert!((29..=30).contains(&retry), "retry-after {retry}");
    }
}

both_forms!(x_ratelimit_headers_and_custom_response);
fn x_ratelimit_headers_and_custom_response(form: Form) {
    let (envoy, _upstream) = envoy_with(
        form,
        r#"{"headers": "x-ratelimit", "response": {"status": 503, "body": "slow down\n"},
            "rules": [{"name": "one", "limit": {"requests": 1, "per": "1h"}}]}"#,
    );
    let mut c = Client::new(envoy.port());
    let ok = c.get("/", &[]).unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.header("x-ratelimit-limit"),
        None,
        "allowed answers carry headers only when asked"
    );
    let limited = c.get("/", &[]).unwrap();
    assert_eq!(
        (limited.status, limited.body_text().as_str()),
        (503, "slow down\n")
    );
    assert_eq!(limited.header("x-ratelimit-limit"), Some("1"));
    assert_eq!(limited.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(limited.header("x-ratelimit-reset"), Some("3600"));
    assert_eq!(limited.header("retry-after"), Some("3600"));
    assert_eq!(limited.header("ratelimit"), None);
}

both_forms!(a_rule_scoped_to_one_route_leaves_the_other_unlimited);
fn a_rule_scoped_to_one_route_leaves_the_other_unlimited(form: Form) {
    let (envoy, upstream) = envoy_with(
        form,
        r#"{"rules": [{"name": "only-limited", "match": {"route": "limited"}, "limit": {"requests": 2, "per": "1h"}}]}"#,
    );
    let open = concurrent_gets(envoy.port(), "/other", &[], 4, 100);
    assert_eq!(statuses(&open), (100, 0, 0));
    let limited = concurrent_gets(envoy.port(), "/limited", &[], 4, 10);
    assert_eq!(statuses(&limited), (2, 8, 0));
    assert_eq!(upstream.requests(), 102);
}

both_forms!(missing_key_follows_on_missing_key);
fn missing_key_follows_on_missing_key(form: Form) {
    let (envoy, _upstream) = envoy_with(
        form,
        r#"{"rules": [
            {"name": "deny", "match": {"path_prefix": "/limited"}, "key": [{"header": "x-api-key"}],
             "on_missing_key": "deny", "limit": {"requests": 100, "per": "1s"}},
            {"name": "skip", "match": {"path_prefix": "/skip"}, "key": [{"header": "x-api-key"}],
             "limit": {"requests": 1, "per": "1h"}},
            {"name": "anon", "key": [{"header": "x-api-key"}], "on_missing_key": {"static": "anonymous"},
             "limit": {"requests": 1, "per": "1h"}}
        ]}"#,
    );
    let mut c = Client::new(envoy.port());
    assert_eq!(
        c.get("/limited", &[]).unwrap().status,
        429,
        "deny: no key, no entry"
    );
    assert_eq!(
        c.get("/limited", &[("x-api-key", "k")]).unwrap().status,
        200
    );
    // skip: the rule does not apply, the next matching one does (anon).
    assert_eq!(c.get("/skip", &[]).unwrap().status, 200);
    assert_eq!(
        c.get("/skip", &[]).unwrap().status,
        429,
        "anonymous requests share one bucket"
    );
    assert_eq!(c.get("/x", &[]).unwrap().status, 429);
    assert_eq!(
        c.get("/x", &[("x-api-key", "someone")]).unwrap().status,
        200
    );
    assert_eq!(
        envoy.metric(
            "mesh_ratelimit_requests_total",
            &[("rule", "deny"), ("decision", "denied_missing_key")]
        ),
        Some(1.0)
    );
}

both_forms!(shadow_mode_lets_everything_through_and_counts);
fn shadow_mode_lets_everything_through_and_counts(form: Form) {
    let (envoy, upstream) = envoy_with(
        form,
        r#"{"rules": [{"name": "trial", "shadow": true, "limit": {"requests": 5, "per": "1h"}}]}"#,
    );
    let responses = concurrent_gets(envoy.port(), "/", &[], 8, 50);
    assert_eq!(statuses(&responses), (50, 0, 0));
    assert_eq!(upstream.requests(), 50);
    let count = |d: &str| {
        envoy.metric(
            "mesh_ratelimit_requests_total",
            &[("rule", "trial"), ("decision", d)],
        )
    };
    assert_eq!(count("allowed"), Some(5.0));
    assert_eq!(count("shadow_limited"), Some(45.0));
    assert_eq!(count("limited"), Some(0.0));
}

both_forms!(bad_config_is_refused_with_the_json_path_and_envoy_does_not_start);
fn bad_config_is_refused_with_the_json_path_and_envoy_does_not_start(form: Form) {
    let rule = |limit: &str| format!(r#"{{"rules": [{{"name": "a", "limit": {limit}}}]}}"#);
    let cases = [
        (rule(r#"{"requests": 5, "per": "fast"}"#), r#"ratelimit: rules[0].limit.per: expected a duration like "1s", got "fast""#),
        (rule(r#"{"requests": -5, "per": "1s"}"#), "ratelimit: rules[0].limit.requests: expected an integer from 1 to 1000000000, got -5"),
        (rule(r#"{"requests": "many", "per": "1s"}"#), "ratelimit: rules[0].limit.requests: invalid type: string \"many\", expected an integer from 1 to 1000000000"),
        (rule(r#"{"requests": 2.5, "per": "1s"}"#), "ratelimit: rules[0].limit.requests: expected an integer from 1 to 1000000000, got a decimal number"),
        (r#"{"rules": [], "max_kyes": 10}"#.to_string(), "ratelimit: max_kyes: unknown field `max_kyes`, expected one of `rules`, `response`, `headers`, `headers_on_allowed`, `route_metadata`, `max_keys`"),
    ];
    for (config, expected) in cases {
        assert_config_refused_in(form, "ratelimit", &config, expected);
    }
}

both_forms!(a_hundred_thousand_keys_leave_memory_flat);
fn a_hundred_thousand_keys_leave_memory_flat(form: Form) {
    let (envoy, _upstream) = envoy_with(
        form,
        r#"{"max_keys": 1000, "rules": [{"name": "per-client", "key": [{"header": "x-client"}], "limit": {"requests": 1, "per": "1h"}}]}"#,
    );
    let send = |from: usize, to: usize| {
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let port = envoy.port();
                std::thread::spawn(move || {
                    let mut c = Client::new(port);
                    for i in (from + t..to).step_by(8) {
                        let key = format!("client-{i}");
                        let r = c.get("/", &[("x-client", &key)]).unwrap();
                        assert!(r.status == 200 || r.status == 429);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    };
    send(0, 20_000);
    let warm = envoy.rss_kib();
    send(20_000, 100_000);
    let after = envoy.rss_kib();
    let overflow = envoy
        .metric("mesh_ratelimit_overflow_total", &[("rule", "per-client")])
        .unwrap();
    eprintln!("envoy RSS after 20k keys: {warm} KiB, after 100k keys: {after} KiB; overflowed: {overflow}");
    // One entry per key would be ~80k more shared-data entries (tens of MB with
    // Envoy's map overhead); the fixed table adds nothing.
    assert!(
        after < warm + 8 * 1024,
        "RSS grew from {warm} KiB to {after} KiB"
    );
    // The table holds 1000 keys; nearly all later keys found it full.
    assert!(overflow > 90_000.0, "{overflow}");
}
