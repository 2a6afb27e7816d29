use super::*;

fn err(json: &str) -> String {
    Config::parse(json.as_bytes(), "suite")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| "accepted".to_string())
}

#[test]
fn a_missing_part_is_off() {
    let c = Config::parse(b"{}", "suite").unwrap();
    assert!(c.metrics.is_none() && c.ratelimit.is_none());
    assert!(c.lb_hints.is_none() && c.circuit_breaker.is_none());
    let c = Config::parse(br#"{"metrics": {}, "circuit_breaker": null}"#, "suite").unwrap();
    assert!(c.metrics.is_some());
    assert!(c.ratelimit.is_none() && c.lb_hints.is_none() && c.circuit_breaker.is_none());
    // Istio's empty pluginConfig.
    assert!(Config::parse(b"", "suite").unwrap().metrics.is_none());
}

#[test]
fn every_part_reads_its_filters_configuration() {
    let c = Config::parse(
        br#"{
          "metrics": {"labels": {"route": true}},
          "ratelimit": {"rules": [{"name": "api", "limit": {"requests": 5, "per": "1s"}}]},
          "lb_hints": {"rules": [{"name": "canary", "header": "x-version",
                                  "targets": [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}],
                                  "avoid_open_circuits": true}]},
          "circuit_breaker": {"rules": [{"name": "upstreams", "scope": "cluster",
                                         "window": {"kind": "count", "size": 10}}]}
        }"#,
        "suite",
    )
    .unwrap();
    assert!(c.metrics.unwrap().labels.route);
    assert_eq!(c.ratelimit.unwrap().rules[0].name, "api");
    let lb = c.lb_hints.unwrap();
    assert!(lb.rules[0].avoid_open_circuits);
    assert_eq!(lb.rules[0].targets[1].cluster, "v2");
    let cb = c.circuit_breaker.unwrap();
    assert_eq!(cb.rules[0].scope, circuit_breaker::Scope::Cluster);
}

#[test]
fn the_parts_share_the_scope_in_their_keys_as_the_filters_do() {
    let json =
        br#"{"ratelimit": {"rules": [{"name": "a", "limit": {"requests": 5, "per": "1s"}}]}}"#;
    let suite = Config::parse(json, "mesh.suite").unwrap();
    let alone = ratelimit::Config::parse(
        br#"{"rules": [{"name": "a", "limit": {"requests": 5, "per": "1s"}}]}"#,
        "mesh.suite",
    )
    .unwrap();
    assert_eq!(suite.ratelimit.unwrap(), alone);
}

#[test]
fn errors_name_the_part() {
    // A serde error inside a part.
    assert_eq!(
        err(
            r#"{"ratelimit": {"rules": [{"name": "a", "limit": {"requests": 5, "per": "soon"}}]}}"#
        ),
        err_of_filter(
            "ratelimit",
            r#"{"rules": [{"name": "a", "limit": {"requests": 5, "per": "soon"}}]}"#
        )
    );
    assert!(err(
        r#"{"ratelimit": {"rules": [{"name": "a", "limit": {"requests": 5, "per": "soon"}}]}}"#
    )
    .starts_with("ratelimit.rules[0].limit.per: "));
    // A check after reading (the compile step), inside a part.
    assert!(
        err(r#"{"ratelimit": {"rules": [{"name": "a", "limit": {"requests": 5, "per": "0s"}}]}}"#)
            .starts_with("ratelimit.rules[0].limit.per: must be longer than 0s"),
        "{}",
        err(r#"{"ratelimit": {"rules": [{"name": "a", "limit": {"requests": 5, "per": "0s"}}]}}"#)
    );
    assert!(
        err(r#"{"lb_hints": {"rules": [{"name": "r", "header": "x-v", "targets": []}]}}"#)
            .starts_with("lb_hints.rules[0].targets: ")
    );
    assert!(err(r#"{"metrics": {"duration_buckets_ms": [5, 5]}}"#)
        .starts_with("metrics.duration_buckets_ms[1]: bucket bounds must increase"));
    assert!(
        err(r#"{"circuit_breaker": {"rules": [{"name": "b", "scope": "tenant"}]}}"#)
            .starts_with("circuit_breaker.rules[0].scope: unknown variant `tenant`")
    );
    assert!(
        err(r#"{"metrics": {"prefx": "x"}}"#).starts_with("metrics.prefx: unknown field `prefx`")
    );
    assert!(err(r#"{"metrics": "on"}"#).starts_with("metrics: invalid type: string"));
}

fn err_of_filter(filter: &str, json: &str) -> String {
    let e = match filter {
        "ratelimit" => ratelimit::Config::parse(json.as_bytes(), "suite").err(),
        _ => unreachable!(),
    };
    format!("{filter}.{}", e.unwrap())
}

#[test]
fn an_unknown_part_is_refused() {
    let e = err(r#"{"metrics": {}, "rate_limit": {}}"#);
    assert!(e.starts_with("rate_limit: unknown field `rate_limit`, expected one of `metrics`, `ratelimit`, `lb_hints`, `circuit_breaker`"), "{e}");
    assert!(err(r#"["metrics"]"#).starts_with("configuration: expected a JSON object"));
}

/// The bench's configuration of each part (envoy/bench/suite.yaml).
const BENCH: &str = r#"{
  "metrics": {"labels": {"route": true, "method": true, "status_class": true,
              "custom": [{"name": "tenant", "header": "x-tenant", "allowed": ["gold"]}]}},
  "ratelimit": {"rules": [{"name": "per-api-key", "key": [{"header": "x-api-key"}],
                 "limit": {"requests": 1000, "per": "1s"}}]},
  "lb_hints": {"rules": [{"name": "api-canary", "match": {"route": "api"}, "header": "x-mesh-target",
                "targets": [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}],
                "algorithm": "sticky", "sticky": {"header": "x-user-id"}}]},
  "circuit_breaker": {"rules": [{"name": "api", "match": {"route": ["api", "api-v2"]}, "scope": "route",
                       "window": {"kind": "count", "size": 20}}]}
}"#;

fn headers_of(config: &Config) -> HeaderNames {
    let mut names = HeaderNames::default();
    config.request_headers(&mut names);
    names
}

#[test]
fn the_header_plan_counts_each_header_a_part_may_read_once() {
    let all = Config::parse(BENCH.as_bytes(), "suite").unwrap();
    // :method and x-tenant (metrics), x-api-key (ratelimit), x-user-id (lb-hints);
    // the routes, the routing header lb-hints writes and the breaker's route scope are no reads.
    let names = headers_of(&all);
    assert_eq!(names.len(), 4);
    assert!(names.cheaper_in_one_call());
    let alone = |part: &str| {
        let mut c = all.clone();
        if part != "metrics" {
            c.metrics = None;
        }
        if part != "ratelimit" {
            c.ratelimit = None;
        }
        if part != "lb_hints" {
            c.lb_hints = None;
        }
        if part != "circuit_breaker" {
            c.circuit_breaker = None;
        }
        headers_of(&c)
    };
    // One header: one call for it; two: one call for all.
    assert_eq!(alone("ratelimit").len(), 1);
    assert!(!alone("ratelimit").cheaper_in_one_call());
    assert_eq!(alone("lb_hints").len(), 1);
    assert_eq!(alone("metrics").len(), 2);
    assert!(alone("metrics").cheaper_in_one_call());
    assert!(alone("circuit_breaker").is_empty());
    assert!(!alone("circuit_breaker").cheaper_in_one_call());
}

#[test]
fn the_header_plan_sees_matchers_cookies_overrides_and_header_scopes() {
    let c = Config::parse(
        br#"{
          "ratelimit": {"rules": [{"name": "a", "match": {"path_prefix": "/api", "headers": {"x-plan": "free"}},
                         "key": ["client_ip", {"header": "x-plan"}], "limit": {"requests": 5, "per": "1s"}}]},
          "lb_hints": {"rules": [{"name": "b", "header": "x-version", "algorithm": "sticky",
                        "sticky": {"cookie": "session"}, "override": {"header": "x-force"},
                        "targets": [{"name": "v1", "weight": 1}]}]},
          "circuit_breaker": {"rules": [{"name": "c", "match": {"methods": ["GET"], "host": "a.example"},
                               "scope": {"header": "x-tenant"}, "window": {"kind": "count", "size": 10}}]}
        }"#,
        "suite",
    )
    .unwrap();
    // :path, x-plan (once), cookie, x-force, :method, :authority, x-tenant; client_ip is no header.
    assert_eq!(headers_of(&c).len(), 7);
}
