//! The manifests in `istio/` as Istio itself turns them into Envoy config,
//! run in a real Envoy.
//!
//! Once per run: a real registry on loopback, `cargo xtask push` of all four
//! filters in the three formats, then the Go tests in `tests/istio/` (`go
//! vet`, `gofmt`, `go test`): Istio's in-memory istiod generates the frontend
//! sidecar's config from the manifests, Istio's sidecar-agent code fetches
//! the modules from the registry and rewrites the ECDS resources to local
//! files, and the Go tests write what came out into
//! `target/istio-generated/`. The tests here load exactly that (the
//! extension configs in the listener's order, the route configuration) into
//! Envoy and drive traffic through it.

use std::fs;
use std::path::Path;

use mesh_testkit::http::Client;
use mesh_testkit::rls::{RateLimitService, Redis};
use mesh_testkit::{json_string, repo_root, Behaviour, Bootstrap, Envoy, Upstream};
use serde_json::Value;

#[path = "istio_mesh/generated.rs"]
mod generated;
use generated::{
    extensions, generated, istio_stats_config, read_json, reviews_cluster, reviews_routes,
};

/// Envoy with Istio's extension configs for `filters` (in the listener's
/// order) from `dir` and Istio's routes, in front of two upstreams.
struct Mesh {
    envoy: Envoy,
    v1: Upstream,
    v2: Upstream,
}

fn start_mesh(dir: &Path, routes_dir: &Path, filters: &[&str]) -> Result<Mesh, String> {
    start_mesh_with(dir, routes_dir, filters, &[])
}

/// As [`start_mesh`], with more clusters (JSON) in the bootstrap.
fn start_mesh_with(
    dir: &Path,
    routes_dir: &Path,
    filters: &[&str],
    clusters: &[Value],
) -> Result<Mesh, String> {
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    let mut bootstrap = Bootstrap::new()
        .cluster(&reviews_cluster("v1"), v1.port())
        .cluster(&reviews_cluster("v2"), v2.port());
    for route in reviews_routes(routes_dir) {
        bootstrap = bootstrap.route_json(&route.to_string());
    }
    let mut used = 0;
    for (filter, ec) in extensions(dir) {
        if filters.contains(&filter.as_str()) {
            used += 1;
            bootstrap = bootstrap.filter_json(&format!(
                r#"{{"name": {}, "typed_config": {}}}"#,
                json_string(ec["name"].as_str().unwrap()),
                ec["typed_config"]
            ));
        }
    }
    assert_eq!(used, filters.len(), "{filters:?} in {}", dir.display());
    let mut config: Value = serde_json::from_str(&bootstrap.yaml()).unwrap();
    config["stats_config"] = istio_stats_config();
    for c in clusters {
        config["static_resources"]["clusters"]
            .as_array_mut()
            .unwrap()
            .push(c.clone());
    }
    let envoy =
        Envoy::start_with(&serde_json::to_string_pretty(&config).unwrap(), 2).map_err(|f| f.log)?;
    Ok(Mesh { envoy, v1, v2 })
}

fn mesh_with(form: &str, filters: &[&str]) -> Mesh {
    let dir = generated().dir.join(form);
    start_mesh(&dir, &dir, filters).unwrap_or_else(|log| panic!("envoy did not start:\n{log}"))
}

/// The `/stats/prometheus` lines of `metric` that carry `label="value"`.
fn series(envoy: &Envoy, metric: &str, label: &str, value: &str) -> Vec<String> {
    let wanted = format!("{label}=\"{value}\"");
    envoy
        .prometheus()
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(&wanted))
        .map(String::from)
        .collect()
}

fn sum(lines: &[String]) -> f64 {
    lines
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const REQUESTS: usize = 20;
const ALL: &[&str] = &["metrics", "ratelimit", "lb-hints", "circuit-breaker"];

/// Sends REQUESTS GETs for `reviews` (half with an x-user-id), with
/// `x-mesh-target: <subset>` when no lb-hints chooses one; all must be
/// answered 200 by an upstream.
fn drive(mesh: &Mesh, subset: Option<&str>) {
    let mut client = Client::new(mesh.envoy.port());
    for i in 0..REQUESTS {
        let user = format!("user-{}", i % 4);
        let mut headers = vec![("x-tenant", "gold")];
        if i % 2 == 0 {
            headers.push(("x-user-id", user.as_str()));
        }
        if let Some(subset) = subset {
            headers.push(("x-mesh-target", subset));
        }
        let answer = client.get("/reviews/1", &headers).unwrap();
        assert_eq!(
            answer.status,
            200,
            "request {i}: {} {}",
            answer.status,
            answer.body_text()
        );
    }
    assert_eq!(
        (mesh.v1.requests() + mesh.v2.requests()) as usize,
        REQUESTS,
        "every request reached an upstream"
    );
}

// ---------------------------------------------------------------------------
// Each filter alone, all four, both manifest forms.

#[test]
fn ratelimit_as_istio_configures_it() {
    let mesh = mesh_with("wasmplugins", &["ratelimit"]);
    drive(&mesh, Some("v1"));
    let allowed = |rule| {
        sum(
            &series(&mesh.envoy, "mesh_ratelimit_requests_total", "rule", rule)
                .into_iter()
                .filter(|l| l.contains("decision=\"allowed\""))
                .collect::<Vec<_>>(),
        )
    };
    // Users' requests count in the per-user rule, the others in the anonymous one.
    assert_eq!(allowed("reviews-per-user"), (REQUESTS / 2) as f64);
    assert_eq!(allowed("reviews-anonymous"), (REQUESTS / 2) as f64);
}

#[test]
fn circuit_breaker_as_istio_configures_it() {
    let mesh = mesh_with("wasmplugins", &["circuit-breaker"]);
    drive(&mesh, Some("v1"));
    let calls = series(&mesh.envoy, "mesh_circuit_calls_total", "rule", "reviews");
    assert_eq!(sum(&calls), REQUESTS as f64, "{calls:?}");
}

#[test]
fn lb_hints_as_istio_configures_it() {
    let mesh = mesh_with("wasmplugins", &["lb-hints"]);
    drive(&mesh, None);
    // Clients asking for v2 themselves: the filter overwrites the header.
    let mut client = Client::new(mesh.envoy.port());
    for _ in 0..REQUESTS {
        let answer = client
            .get("/reviews/1", &[("x-mesh-target", "v2")])
            .unwrap();
        assert_eq!(answer.status, 200);
    }
    let picks = |target| {
        sum(
            &series(&mesh.envoy, "mesh_lb_picks_total", "target", target)
                .into_iter()
                .filter(|l| l.contains("rule=\"reviews-canary\""))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(picks("v1") + picks("v2"), 2.0 * REQUESTS as f64);
    // 90/10 (sticky per user where x-user-id is sent): both subsets get
    // traffic, v2 far less than the REQUESTS that asked for it, and the
    // upstreams saw exactly what the filter picked.
    assert!(
        picks("v2") >= 1.0 && picks("v2") < REQUESTS as f64,
        "v2: {}",
        picks("v2")
    );
    assert_eq!(mesh.v1.requests() as f64, picks("v1"));
    assert_eq!(mesh.v2.requests() as f64, picks("v2"));
}

#[test]
fn metrics_as_istio_configures_it() {
    let mesh = mesh_with("wasmplugins", &["metrics"]);
    drive(&mesh, Some("v1"));
    // The route name Istio gives the VirtualService's `http[].name`.
    let requests = series(&mesh.envoy, "mesh_requests_total", "route", "reviews-v1");
    assert_eq!(sum(&requests), REQUESTS as f64, "{requests:?}");
    assert!(
        requests.iter().all(|l| l.contains("tenant=\"gold\"")),
        "custom label from x-tenant: {requests:?}"
    );
}

fn all_four_work(form: &str) {
    let mesh = mesh_with(form, ALL);
    drive(&mesh, None);
    for (metric, label, value) in [
        // Counted under the route that served the request, after lb-hints re-routed.
        ("mesh_requests_total", "route", "reviews-v1"),
        ("mesh_ratelimit_requests_total", "rule", "reviews-anonymous"),
        ("mesh_lb_picks_total", "rule", "reviews-canary"),
        ("mesh_circuit_calls_total", "rule", "reviews"),
    ] {
        assert!(
            !series(&mesh.envoy, metric, label, value).is_empty(),
            "{form}: no {metric}{{{label}=\"{value}\"}} in:\n{}",
            mesh.envoy.prometheus()
        );
    }
}

#[test]
fn all_four_wasm_plugins_together_in_istios_order() {
    all_four_work("wasmplugins");
}

#[test]
fn all_four_traffic_extensions_together_in_istios_order() {
    all_four_work("trafficextensions");
}

#[test]
fn an_open_breaker_moves_the_canary_traffic_to_the_other_subset() {
    let mesh = mesh_with("wasmplugins", ALL);
    mesh.v1.set_behaviour(Behaviour {
        status: 500,
        ..Behaviour::default()
    });
    // v1 fails: once its breaker has seen minimum_calls (10) failures it
    // opens, and lb-hints (avoid_open_circuits, reading circuit-breaker's
    // states: Istio sets no vm_id, so they share one VM space) sends
    // everything to v2. The breaker stays open for 10 s.
    let mut client = Client::new(mesh.envoy.port());
    let mut served_by_v2_in_a_row = 0;
    for _ in 0..200 {
        let before = mesh.v2.requests();
        let answer = client.get("/reviews/1", &[]).unwrap();
        let by_v2 = answer.status == 200 && mesh.v2.requests() == before + 1;
        served_by_v2_in_a_row = if by_v2 { served_by_v2_in_a_row + 1 } else { 0 };
        if served_by_v2_in_a_row == REQUESTS {
            break;
        }
    }
    assert_eq!(
        served_by_v2_in_a_row,
        REQUESTS,
        "v1 calls: {}, v2 calls: {}\n{}",
        mesh.v1.requests(),
        mesh.v2.requests(),
        mesh.envoy.prometheus()
    );
    let opened = series(&mesh.envoy, "mesh_circuit_opened_total", "rule", "reviews");
    assert!(sum(&opened) >= 1.0, "{opened:?}");
}

// ---------------------------------------------------------------------------
// Bad input.

/// Lines of Istio's log (the sidecar agent's, in a mesh: `kubectl logs
/// <pod> -c istio-proxy`) containing all of `words`.
fn istio_log_lines(words: &[&str]) -> Vec<String> {
    generated()
        .go_log
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .map(String::from)
        .collect()
}

fn fallback_answers(case: &str, filter: &str) -> (u16, String) {
    let generated = generated();
    let mesh = start_mesh(
        &generated.dir.join("bad").join(case),
        &generated.dir.join("wasmplugins"),
        &[filter],
    )
    .unwrap_or_else(|log| panic!("envoy did not start:\n{log}"));
    let answer = Client::new(mesh.envoy.port())
        .get("/reviews/1", &[("x-mesh-target", "v1")])
        .unwrap();
    (answer.status, answer.body_text())
}

/// The module cannot be had (`case`): the agent logs why and gives Envoy an
/// RBAC filter instead: deny-all under FAIL_CLOSE (ratelimit) and
/// FAIL_RELOAD (lb-hints), allow-all under FAIL_OPEN (metrics,
/// circuit-breaker).
fn a_module_that_cannot_be_had(case: &str, why: &str) {
    assert_eq!(
        fallback_answers(case, "ratelimit"),
        (403, "RBAC: access denied".to_string())
    );
    assert_eq!(fallback_answers(case, "lb-hints").0, 403);
    assert_eq!(fallback_answers(case, "metrics").0, 200);
    assert_eq!(fallback_answers(case, "circuit-breaker").0, 200);
    for (filter, rbac) in [
        ("ratelimit", "deny"),
        ("lb-hints", "deny"),
        ("metrics", "allow"),
        ("circuit-breaker", "allow"),
    ] {
        let lines = istio_log_lines(&[
            "error in converting the wasm config to local: cannot fetch Wasm module",
            &format!("/mesh-filters/{filter}"),
            why,
            &format!("applying {rbac} RBAC filter"),
        ]);
        assert!(
            !lines.is_empty(),
            "{case}: no agent log line for {filter} saying {why:?} and {rbac}:\n{}",
            generated().go_log
        );
    }
}

#[test]
fn an_image_that_does_not_exist_is_replaced_by_rbac() {
    a_module_that_cannot_be_had("missing-image", "could not fetch manifest");
}

#[test]
fn a_digest_that_does_not_match_is_replaced_by_rbac() {
    a_module_that_cannot_be_had("wrong-digest", "which does not match");
}

#[test]
fn a_refused_plugin_config_passes_istio_and_envoy_refuses_it() {
    let generated = generated();
    let log = match start_mesh(
        &generated.dir.join("bad/refused-config"),
        &generated.dir.join("wasmplugins"),
        &["ratelimit"],
    ) {
        Ok(_) => panic!("Envoy took the ratelimit config with an unknown field"),
        Err(log) => log,
    };
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("[error]") && l.contains("ratelimit: max_kyes: unknown field"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
}

// ---------------------------------------------------------------------------
// istio-fetch, the agent's fetcher as a command.

#[test]
fn istio_fetch_pulls_a_docker_image_by_digest_as_the_agent_does() {
    let fetched = &generated().fetched;
    let stdout = String::from_utf8_lossy(&fetched.by_digest.stdout);
    assert!(
        fetched.by_digest.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&fetched.by_digest.stderr)
    );
    assert!(
        fs::read(&fetched.module).unwrap()
            == fs::read(mesh_testkit::wasm_path("ratelimit")).unwrap(),
        "the module istio-fetch wrote differs from dist/ratelimit.wasm"
    );
    let config: Value = serde_json::from_str(&stdout).unwrap();
    let vm = &config["typed_config"]["config"]["vm_config"];
    assert!(vm["code"]["local"]["filename"].is_string(), "{config}");
}

#[test]
fn istio_fetch_shows_the_fallback_for_an_image_that_does_not_exist() {
    let missing = &generated().fetched.missing;
    let stdout = String::from_utf8_lossy(&missing.stdout);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stdout.contains("envoy.extensions.filters.http.rbac.v3.RBAC"),
        "{stdout}"
    );
    assert!(stdout.contains("wasm-default-allow"), "{stdout}");
    assert!(stderr.contains("applying allow RBAC filter"), "{stderr}");
}

// ---------------------------------------------------------------------------
// The global rule of istio/global-ratelimit/, through the cluster Istio names.

/// The service's configuration: the ConfigMap's `mesh.yaml` in
/// istio/global-ratelimit/ratelimit-service.yaml.
fn istio_rls_config() -> String {
    let text =
        fs::read_to_string(repo_root().join("istio/global-ratelimit/ratelimit-service.yaml"))
            .unwrap();
    text.split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<Value>(doc).ok())
        .find(|doc| doc["kind"] == "ConfigMap")
        .and_then(|doc| doc["data"]["mesh.yaml"].as_str().map(String::from))
        .expect("a ConfigMap with mesh.yaml")
}

#[test]
fn a_global_rule_calls_the_service_through_the_cluster_istio_generates() {
    for form in ["wasmplugin", "trafficextension"] {
        let dir = generated().dir.join(format!("global-{form}"));
        let redis = Redis::start();
        let rls = RateLimitService::start(redis.port(), &istio_rls_config());
        // Istio's cluster for the Service's grpc port, by the name and with
        // the HTTP/2 options Istio gave it; its endpoints (EDS in a mesh)
        // are the service on loopback, and no mesh TLS (no CA here).
        let istio = read_json(&dir.join("rls-cluster.json"));
        let name = istio["name"].as_str().unwrap();
        assert_eq!(
            name, "outbound|8081||ratelimit.ratelimit.svc.cluster.local",
            "{form}"
        );
        let cluster = serde_json::json!({
            "name": name,
            "type": "STATIC",
            "connect_timeout": istio["connect_timeout"],
            "typed_extension_protocol_options": istio["typed_extension_protocol_options"],
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                {"socket_address": {"address": "127.0.0.1", "port_value": rls.grpc_port()}}}}]}]},
        });
        let mesh = start_mesh_with(&dir, &dir, &["ratelimit"], &[cluster])
            .unwrap_or_else(|log| panic!("{form}: envoy did not start:\n{log}"));
        let before = redis.calls("incrby");
        let mut client = Client::new(mesh.envoy.port());
        for _ in 0..10 {
            let r = client
                .get(
                    "/reviews/1",
                    &[("x-user-id", "user-1"), ("x-mesh-target", "v1")],
                )
                .unwrap();
            assert_eq!(r.status, 200, "{form}: {}", r.body_text());
        }
        let calls = |outcome: &str| {
            sum(&series(
                &mesh.envoy,
                "mesh_ratelimit_global_calls_total",
                "outcome",
                outcome,
            ))
        };
        assert_eq!(calls("ok"), 10.0, "{form}: every request asked the service");
        for failed in ["timeout", "unavailable", "error", "invalid", "not_started"] {
            assert_eq!(calls(failed), 0.0, "{form}: {failed}");
        }
        assert_eq!(
            redis.calls("incrby") - before,
            10,
            "{form}: the service counted each in Redis"
        );
    }
}
