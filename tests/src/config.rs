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

/// The modules the project ships (each one `dist/<name>.wasm`, an OCI image
/// and a schema): the four filters and the suite.
pub const MODULES: [&str; 5] = [
    "ratelimit",
    "circuit-breaker",
    "lb-hints",
    "metrics",
    "suite",
];

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

/// How a test runs our four filters: as separate modules, each its own
/// filter (`Chain`), or as the one `suite` module holding them all (`Suite`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Chain,
    Suite,
}

/// The four filters in the suite's fixed order: (module, part name in the
/// suite's config).
pub const SUITE_PARTS: [(&str, &str); 4] = [
    ("metrics", "metrics"),
    ("ratelimit", "ratelimit"),
    ("lb-hints", "lb_hints"),
    ("circuit-breaker", "circuit_breaker"),
];

/// The suite's part name of one of the four modules.
pub fn suite_part(module: &str) -> Option<&'static str> {
    SUITE_PARTS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, part)| *part)
}

impl Form {
    /// The module whose log lines carry the errors of `module`'s config.
    pub fn logger(self, module: &str) -> &str {
        match self {
            Form::Suite if suite_part(module).is_some() => "suite",
            _ => module,
        }
    }

    /// A config error line as the chain logs it (`ratelimit: rules[0].x: ...`)
    /// in this form (`suite: ratelimit.rules[0].x: ...`).
    pub fn error_line(self, chain_line: &str) -> String {
        if self == Form::Suite {
            for (module, part) in SUITE_PARTS {
                if let Some(rest) = chain_line.strip_prefix(&format!("{module}: ")) {
                    return format!("suite: {part}.{rest}");
                }
            }
        }
        chain_line.to_string()
    }
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

    /// This filter in `form`: in the suite form one of the four becomes a
    /// suite filter holding only its part.
    pub fn in_form(self, form: Form) -> WasmFilter {
        if form == Form::Suite && suite_part(&self.module).is_some() {
            WasmFilter::suite(&[self])
        } else {
            self
        }
    }

    /// One suite filter for consecutive filters of the four modules: each
    /// one's config under its part name, in the suite's order. Panics on what
    /// the suite cannot express (a test that needs it stays chain-only).
    pub fn suite(filters: &[WasmFilter]) -> WasmFilter {
        let first = &filters[0];
        let default_vm_id = |f: &WasmFilter| f.vm_id == format!("mesh-{}", f.module);
        assert!(
            filters
                .iter()
                .all(|f| f.failure_policy == first.failure_policy)
                && (filters.iter().all(default_vm_id)
                    || filters.iter().all(|f| f.vm_id == first.vm_id)),
            "per-filter vm_id or failure_policy: this test needs the chain form"
        );
        let mut parts = Vec::new();
        for (module, part) in SUITE_PARTS {
            let mut of_module = filters.iter().filter(|f| f.module == module);
            let Some(f) = of_module.next() else { continue };
            assert!(
                of_module.next().is_none(),
                "the suite holds one {module}: this test needs the chain form"
            );
            assert!(
                f.name == f.module && f.root_id == f.module,
                "{module} has its own plugin name: this test needs the chain form"
            );
            let config = if f.config.trim().is_empty() {
                "{}"
            } else {
                f.config.trim()
            };
            parts.push(format!("{}: {config}", json_string(part)));
        }
        WasmFilter::new("suite", &format!("{{{}}}", parts.join(", ")))
            .failure_policy(&first.failure_policy)
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

/// An `http_filters` entry before the router.
#[derive(Debug, Clone)]
enum HttpFilter {
    Wasm(WasmFilter),
    Json(String),
}

/// A bootstrap with one listener named `main`.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    form: Form,
    extra_tags: Vec<String>,
    filters: Vec<HttpFilter>,
    routes: Vec<String>,
    clusters: Vec<String>,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Bootstrap::new()
    }
}

impl Bootstrap {
    /// A bootstrap in the chain form.
    pub fn new() -> Self {
        Bootstrap::in_form(Form::Chain)
    }

    /// A bootstrap in `form`: in the suite form the consecutive filters of
    /// the four modules become one suite filter (see `WasmFilter::suite`).
    pub fn in_form(form: Form) -> Self {
        Bootstrap {
            form,
            extra_tags: Vec::new(),
            filters: Vec::new(),
            routes: Vec::new(),
            clusters: Vec::new(),
        }
    }

    /// More `stats_tags` (e.g. a metrics filter's custom label names).
    pub fn stat_tags(mut self, tags: &[&str]) -> Self {
        self.extra_tags.extend(tags.iter().map(|t| t.to_string()));
        self
    }

    pub fn wasm(mut self, filter: WasmFilter) -> Self {
        self.filters.push(HttpFilter::Wasm(filter));
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
        self.filters.push(HttpFilter::Json(json.to_string()));
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

    /// Routes on `header`: `to-v1` to cluster v1 (`v1_port`), `to-v2` to v2,
    /// and the fallback `unrouted`, answered 421 by Envoy itself.
    pub fn routed_by(self, header: &str, v1_port: u16, v2_port: u16) -> Self {
        self.header_route("to-v1", "/", header, "v1", "v1")
            .header_route("to-v2", "/", header, "v2", "v2")
            .route_json(
                r#"{"name": "unrouted", "match": {"prefix": "/"}, "direct_response": {"status": 421, "body": {"inline_string": "unrouted\n"}}}"#,
            )
            .cluster("v1", v1_port)
            .cluster("v2", v2_port)
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

    /// The `http_filters` entries before the router, in this bootstrap's form.
    fn filters_json(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut run: Vec<WasmFilter> = Vec::new();
        let mut suites = 0;
        let mut end_run = |run: &mut Vec<WasmFilter>, out: &mut Vec<String>| {
            if !run.is_empty() {
                suites += 1;
                assert!(
                    suites == 1,
                    "a filter between two of the four: this test needs the chain form"
                );
                out.push(WasmFilter::suite(run).json());
                run.clear();
            }
        };
        for filter in &self.filters {
            match filter {
                HttpFilter::Wasm(f)
                    if self.form == Form::Suite && suite_part(&f.module).is_some() =>
                {
                    run.push(f.clone())
                }
                HttpFilter::Wasm(f) => {
                    end_run(&mut run, &mut out);
                    out.push(f.json());
                }
                HttpFilter::Json(json) => {
                    end_run(&mut run, &mut out);
                    out.push(json.clone());
                }
            }
        }
        end_run(&mut run, &mut out);
        out
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
        let mut filters = self.filters_json();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suite_form_holds_each_config_under_its_part_in_the_suites_order() {
        let chain = [
            WasmFilter::new("circuit-breaker", r#"{"rules": []}"#).vm_id("shared"),
            WasmFilter::new("metrics", "").vm_id("shared"),
            WasmFilter::new("lb-hints", r#" {"rules": [1]} "#).vm_id("shared"),
        ];
        let suite = WasmFilter::suite(&chain);
        assert_eq!(suite.module, "suite");
        assert_eq!(
            suite.config,
            r#"{"metrics": {}, "lb_hints": {"rules": [1]}, "circuit_breaker": {"rules": []}}"#
        );
    }

    #[test]
    fn what_the_suite_cannot_express_is_refused() {
        let twice = [
            WasmFilter::new("lb-hints", "{}"),
            WasmFilter::new("lb-hints", "{}"),
        ];
        assert!(std::panic::catch_unwind(|| WasmFilter::suite(&twice)).is_err());
        let policies = [
            WasmFilter::new("ratelimit", "{}"),
            WasmFilter::new("metrics", "{}").failure_policy("FAIL_OPEN"),
        ];
        assert!(std::panic::catch_unwind(|| WasmFilter::suite(&policies)).is_err());
        let between = Bootstrap::in_form(Form::Suite)
            .wasm(WasmFilter::new("lb-hints", "{}"))
            .filter_json("{}")
            .wasm(WasmFilter::new("circuit-breaker", "{}"));
        assert!(std::panic::catch_unwind(|| between.filters_json()).is_err());
    }

    #[test]
    fn config_errors_get_the_suites_prefix_and_the_part() {
        let line = "lb-hints: rules[0].weight: expected an integer";
        assert_eq!(Form::Chain.error_line(line), line);
        assert_eq!(
            Form::Suite.error_line(line),
            "suite: lb_hints.rules[0].weight: expected an integer"
        );
        assert_eq!(Form::Suite.logger("circuit-breaker"), "suite");
        assert_eq!(Form::Suite.logger("panic-probe"), "panic-probe");
    }
}
