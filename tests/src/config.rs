//! Envoy bootstrap configurations for tests, written as JSON (which Envoy reads
//! as YAML): one listener on a free port, the given HTTP filters before the
//! router, routes, and static clusters pointing at test upstreams.

use std::path::PathBuf;

/// The `stats_tags` every config gets, so the filters' stats come out of
/// `/stats/prometheus` with labels. `envoy/*.yaml` carry the same list (a test
/// checks that). One line per filter; add your filter's tags to its line.
pub const STAT_TAGS: &[&str] = &[
    // ratelimit
    "rule",
    "decision",
    // circuit-breaker (and "rule")
    "outcome",
    // lb-hints (and "rule")
    "target",
    // metrics
    "route",
    "method",
    "response_code",
    "response_code_class",
    "cluster",
];

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The built `.wasm` of a filter (`dist/<filter>.wasm`).
pub fn wasm_path(filter: &str) -> PathBuf {
    let path = crate::dist_dir().join(format!("{filter}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: build the filters first with `cargo xtask build` (the test command does it)",
        path.display()
    );
    path
}

/// One Envoy Wasm HTTP filter running one of our modules.
#[derive(Debug, Clone)]
pub struct WasmFilter {
    pub module: String,
    pub config: String,
    /// Plugin name (also the scope of its shared-data keys).
    pub name: String,
    pub root_id: String,
    pub vm_id: String,
    pub failure_policy: String,
}

impl WasmFilter {
    /// `module` is the filter (`ratelimit`); `config` its JSON configuration.
    pub fn new(module: &str, config: &str) -> WasmFilter {
        WasmFilter {
            module: module.to_string(),
            config: config.to_string(),
            name: module.to_string(),
            root_id: module.to_string(),
            vm_id: format!("mesh-{module}"),
            failure_policy: "FAIL_CLOSED".to_string(),
        }
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    pub fn vm_id(mut self, vm_id: &str) -> Self {
        self.vm_id = vm_id.to_string();
        self
    }

    pub fn failure_policy(mut self, policy: &str) -> Self {
        self.failure_policy = policy.to_string();
        self
    }

    /// The `http_filters` entry.
    pub fn json(&self) -> String {
        format!(
            r#"{{"name": {name}, "typed_config": {{
  "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
  "config": {{
    "name": {name}, "root_id": {root_id}, "failure_policy": "{policy}",
    "configuration": {{"@type": "type.googleapis.com/google.protobuf.StringValue", "value": {config}}},
    "vm_config": {{"vm_id": {vm_id}, "runtime": "envoy.wasm.runtime.v8",
                  "code": {{"local": {{"filename": {file}}}}}}}
  }}}}}}"#,
            name = json_string(&self.name),
            root_id = json_string(&self.root_id),
            policy = self.failure_policy,
            config = json_string(&self.config),
            vm_id = json_string(&self.vm_id),
            file = json_string(&wasm_path(&self.module).to_string_lossy()),
        )
    }
}

/// A bootstrap with one listener named `main`.
#[derive(Debug, Clone, Default)]
pub struct Bootstrap {
    extra_tags: Vec<String>,
    filters: Vec<String>,
    routes: Vec<String>,
    clusters: Vec<String>,
}

impl Bootstrap {
    pub fn new() -> Self {
        Self::default()
    }

    /// More `stats_tags` (e.g. a metrics filter's custom label names).
    pub fn stat_tags(mut self, tags: &[&str]) -> Self {
        self.extra_tags.extend(tags.iter().map(|t| t.to_string()));
        self
    }

    pub fn wasm(mut self, filter: WasmFilter) -> Self {
        self.filters.push(filter.json());
        self
    }

    /// All four filters, each with its configuration, in the order the demo
    /// chains them: metrics first (it counts the others' local replies),
    /// circuit-breaker last (next to the upstream it guards).
    pub fn all_four(
        self,
        metrics: &str,
        ratelimit: &str,
        lb_hints: &str,
        circuit_breaker: &str,
    ) -> Self {
        self.wasm(WasmFilter::new("metrics", metrics))
            .wasm(WasmFilter::new("ratelimit", ratelimit))
            .wasm(WasmFilter::new("lb-hints", lb_hints))
            .wasm(WasmFilter::new("circuit-breaker", circuit_breaker))
    }

    /// Any other `http_filters` entry, as JSON.
    pub fn filter_json(mut self, json: &str) -> Self {
        self.filters.push(json.to_string());
        self
    }

    /// A route named `name` for a path prefix to a cluster.
    pub fn route(self, name: &str, prefix: &str, cluster: &str) -> Self {
        self.route_with(name, prefix, cluster, "")
    }

    /// A route with extra fields for its `route` action (e.g. `"timeout": "0.5s"`)
    /// or, after a `}, `, for the route itself (callers pass valid JSON fragments).
    pub fn route_with(
        mut self,
        name: &str,
        prefix: &str,
        cluster: &str,
        extra_action: &str,
    ) -> Self {
        let extra = if extra_action.is_empty() {
            String::new()
        } else {
            format!(", {extra_action}")
        };
        self.routes.push(format!(
            r#"{{"name": {}, "match": {{"prefix": {}}}, "route": {{"cluster": {}{extra}}}}}"#,
            json_string(name),
            json_string(prefix),
            json_string(cluster)
        ));
        self
    }

    /// A route named `name` for requests under `prefix` whose `header` is
    /// exactly `value` (how Envoy routes on the header lb-hints writes).
    pub fn header_route(
        self,
        name: &str,
        prefix: &str,
        header: &str,
        value: &str,
        cluster: &str,
    ) -> Self {
        self.route_json(&format!(
            r#"{{"name": {}, "match": {{"prefix": {}, "headers": [{{"name": {}, "string_match": {{"exact": {}}}}}]}},
  "route": {{"cluster": {}}}}}"#,
            json_string(name),
            json_string(prefix),
            json_string(header),
            json_string(value),
            json_string(cluster)
        ))
    }

    /// `/reviews` to cluster v1 or v2 by the `x-mesh-target` header lb-hints
    /// writes (routes `reviews-v1`, `reviews-v2`).
    pub fn reviews_routes(self) -> Self {
        self.header_route("reviews-v1", "/reviews", "x-mesh-target", "v1", "v1")
            .header_route("reviews-v2", "/reviews", "x-mesh-target", "v2", "v2")
    }

    /// A complete route object as JSON.
    pub fn route_json(mut self, json: &str) -> Self {
        self.routes.push(json.to_string());
        self
    }

    /// A static cluster with one endpoint on loopback.
    pub fn cluster(mut self, name: &str, port: u16) -> Self {
        self.clusters.push(format!(
            r#"{{"name": {n}, "connect_timeout": "1s", "type": "STATIC",
  "load_assignment": {{"cluster_name": {n}, "endpoints": [{{"lb_endpoints": [
    {{"endpoint": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {port}}}}}}}}}]}}]}}}}"#,
            n = json_string(name)
        ));
        self
    }

    /// A static HTTP/2 cluster (for a gRPC service such as an RLS server).
    pub fn grpc_cluster(mut self, name: &str, port: u16) -> Self {
        self.clusters.push(format!(
            r#"{{"name": {n}, "connect_timeout": "1s", "type": "STATIC",
  "typed_extension_protocol_options": {{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {{
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {{"http2_protocol_options": {{}}}}}}}},
  "load_assignment": {{"cluster_name": {n}, "endpoints": [{{"lb_endpoints": [
    {{"endpoint": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {port}}}}}}}}}]}}]}}}}"#,
            n = json_string(name)
        ));
        self
    }

    pub fn yaml(&self) -> String {
        let tags: Vec<String> = STAT_TAGS
            .iter()
            .copied()
            .chain(self.extra_tags.iter().map(String::as_str))
            .map(|t| {
                format!(
                    r#"{{"tag_name": "{t}", "regex": {}}}"#,
                    json_string(&mesh_shared::stats::tag_regex(t))
                )
            })
            .collect();
        let mut filters = self.filters.clone();
        filters.push(
            r#"{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}"#
                .to_string(),
        );
        format!(
            r#"{{
"admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 0}}}}}},
"stats_config": {{"stats_tags": [{tags}]}},
"static_resources": {{
  "listeners": [{{
    "name": "main",
    "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 0}}}},
    "filter_chains": [{{"filters": [{{
      "name": "envoy.filters.network.http_connection_manager",
      "typed_config": {{
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "route_config": {{"name": "local", "virtual_hosts": [{{"name": "all", "domains": ["*"], "routes": [{routes}]}}]}},
        "http_filters": [{filters}]
      }}
    }}]}}]
  }}],
  "clusters": [{clusters}]
}}
}}"#,
            tags = tags.join(",\n  "),
            routes = self.routes.join(",\n  "),
            filters = filters.join(",\n  "),
            clusters = self.clusters.join(",\n  "),
        )
    }
}
