//! Per-route configuration from Envoy YAML, the ways Envoy offers for a Wasm
//! filter (which has no per-route config of its own, envoy#26440):
//! rules matched on the route name inside the filter (see ratelimit.rs),
//! `FilterConfig {disabled: true}` on a route, and Envoy 1.40's
//! `envoy.filters.http.filter_chain` with a per-route chain holding the same
//! filter with another configuration.

use mesh_testkit::http::Client;
use mesh_testkit::{Bootstrap, Envoy, Upstream, WasmFilter};

fn statuses(c: &mut Client, path: &str, n: usize) -> Vec<u16> {
    (0..n).map(|_| c.get(path, &[]).unwrap().status).collect()
}

const ONE_PER_HOUR: &str = r#"{"rules": [{"name": "all", "limit": {"requests": 1, "per": "1h"}}]}"#;

#[test]
fn filter_config_disabled_switches_the_filter_off_on_one_route() {
    let upstream = Upstream::start("backend");
    let envoy = Envoy::start(
        &Bootstrap::new()
            .wasm(WasmFilter::new("ratelimit", ONE_PER_HOUR))
            .route_json(
                r#"{"name": "free", "match": {"prefix": "/free"}, "route": {"cluster": "backend"},
                    "typed_per_filter_config": {"ratelimit": {
                        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}}}"#,
            )
            .route("limited", "/", "backend")
            .cluster("backend", upstream.port())
            .yaml(),
    );
    let mut c = Client::new(envoy.port());
    assert_eq!(statuses(&mut c, "/free", 5), [200; 5]);
    assert_eq!(statuses(&mut c, "/x", 3), [200, 429, 429]);
    assert_eq!(
        envoy.metric(
            "mesh_ratelimit_requests_total",
            &[("rule", "all"), ("decision", "allowed")]
        ),
        Some(1.0),
        "the disabled route's requests never reached the filter"
    );
}

#[test]
fn filter_chain_gives_a_route_its_own_configuration() {
    let upstream = Upstream::start("backend");
    let default = WasmFilter::new("ratelimit", ONE_PER_HOUR).json();
    let gold = WasmFilter::new(
        "ratelimit",
        r#"{"rules": [{"name": "all", "limit": {"requests": 3, "per": "1h"}}]}"#,
    )
    .json();
    let envoy = Envoy::start(
        &Bootstrap::new()
            .filter_json(&format!(
                r#"{{"name": "envoy.filters.http.filter_chain", "typed_config": {{
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.filter_chain.v3.FilterChainConfig",
                    "default_filter_chain": {{"filters": [{default}]}}}}}}"#
            ))
            .route_json(&format!(
                r#"{{"name": "gold", "match": {{"prefix": "/gold"}}, "route": {{"cluster": "backend"}},
                    "typed_per_filter_config": {{"envoy.filters.http.filter_chain": {{
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.filter_chain.v3.FilterChainConfigPerRoute",
                        "filter_chain": {{"filters": [{gold}]}}}}}}}}"#
            ))
            .route("default", "/", "backend")
            .cluster("backend", upstream.port())
            .yaml(),
    );
    let mut c = Client::new(envoy.port());
    assert_eq!(
        statuses(&mut c, "/gold", 5),
        [200, 200, 200, 429, 429],
        "the per-route chain's limit"
    );
    assert_eq!(
        statuses(&mut c, "/x", 3),
        [200, 429, 429],
        "the default chain's limit"
    );
}

#[test]
fn route_metadata_selects_a_rule_or_switches_the_filter_off() {
    let upstream = Upstream::start("backend");
    let md = |value: &str| {
        format!(
            r#""metadata": {{"filter_metadata": {{"mesh-filters": {{"ratelimit": {value}}}}}}}"#
        )
    };
    let envoy = Envoy::start(
        &Bootstrap::new()
            .wasm(WasmFilter::new(
                "ratelimit",
                r#"{"route_metadata": true, "rules": [
                    {"name": "strict", "limit": {"requests": 1, "per": "1h"}},
                    {"name": "gold", "limit": {"requests": 3, "per": "1h"}}]}"#,
            ))
            .route_json(&format!(
                r#"{{"name": "gold", "match": {{"prefix": "/gold"}}, "route": {{"cluster": "backend"}}, {}}}"#,
                md(r#"{"rule": "gold"}"#)
            ))
            .route_json(&format!(
                r#"{{"name": "free", "match": {{"prefix": "/free"}}, "route": {{"cluster": "backend"}}, {}}}"#,
                md(r#"{"disabled": true}"#)
            ))
            .route("default", "/", "backend")
            .cluster("backend", upstream.port())
            .yaml(),
    );
    let mut c = Client::new(envoy.port());
    assert_eq!(
        statuses(&mut c, "/gold", 5),
        [200, 200, 200, 429, 429],
        "metadata selects rule gold"
    );
    assert_eq!(
        statuses(&mut c, "/free", 5),
        [200; 5],
        "metadata switches the filter off"
    );
    assert_eq!(
        statuses(&mut c, "/x", 3),
        [200, 429, 429],
        "no metadata: the first matching rule"
    );
}

#[test]
fn route_metadata_works_for_lb_hints_too() {
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    let md_route = |name: &str, value: &str| {
        format!(
            r#"{{"name": "{name}", "match": {{"prefix": "/{name}"}}, "direct_response": {{"status": 418}},
                "metadata": {{"filter_metadata": {{"mesh-filters": {{"lb-hints": {value}}}}}}}}}"#
        )
    };
    let envoy = Envoy::start(
        &Bootstrap::new()
            .wasm(WasmFilter::new(
                "lb-hints",
                r#"{"route_metadata": true, "rules": [
                    {"name": "to-v2", "targets": [{"name": "v2"}]},
                    {"name": "to-v1", "targets": [{"name": "v1"}]}]}"#,
            ))
            .header_route("to-v1", "/", "x-mesh-target", "v1", "v1")
            .header_route("to-v2", "/", "x-mesh-target", "v2", "v2")
            .route_json(&md_route("pick", r#"{"rule": "to-v1"}"#))
            .route_json(&md_route("off", r#"{"disabled": true}"#))
            .route_json(r#"{"name": "default", "match": {"prefix": "/"}, "direct_response": {"status": 418}}"#)
            .cluster("v1", v1.port())
            .cluster("v2", v2.port())
            .yaml(),
    );
    let mut c = Client::new(envoy.port());
    let served_by = |c: &mut Client, path: &str| {
        let r = c.get(path, &[]).unwrap();
        (r.status, r.header("x-served-by").unwrap_or("-").to_string())
    };
    assert_eq!(
        served_by(&mut c, "/pick"),
        (200, "v1".into()),
        "metadata selects rule to-v1"
    );
    assert_eq!(
        served_by(&mut c, "/off"),
        (418, "-".into()),
        "metadata switches lb-hints off: no header"
    );
    assert_eq!(
        served_by(&mut c, "/x"),
        (200, "v2".into()),
        "no metadata: the first rule"
    );
}
