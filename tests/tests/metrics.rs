//! The metrics filter in a real Envoy (2 workers) in front of real upstreams,
//! scraped by a real Prometheus; the alert rules under promtool; the Grafana
//! dashboard against the scrape.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use mesh_testkit::http::{self, Client};
use mesh_testkit::{
    both_forms, concurrent_gets, debian, repo_root, Bootstrap, Envoy, Form, Upstream, WasmFilter,
};
use serde_json::Value;

/// The duration buckets of the test config; the bootstrap gets the same ones.
const BUCKETS: &str = "[1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]";

/// Adds `histogram_bucket_settings` for the duration histogram, as
/// envoy/metrics.yaml does (a Wasm module cannot choose buckets).
fn with_duration_buckets(yaml: &str) -> String {
    let settings = format!(
        r#""stats_config": {{"histogram_bucket_settings": [{{"match": {{"suffix": "mesh_request_duration_ms"}}, "buckets": {BUCKETS}}}], "#
    );
    let out = yaml.replacen(r#""stats_config": {"#, &settings, 1);
    assert_ne!(out, yaml, "the bootstrap has no stats_config to extend");
    out
}

/// Every sample of `name` in Prometheus text: sorted labels and value.
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|pair| {
                    let (k, v) = pair.split_once("=\"")?;
                    Some((k.to_string(), v.trim_end_matches('"').to_string()))
                })
                .collect();
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

fn value_of(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples(text, name)
        .into_iter()
        .find(|(l, _)| *l == want)
        .map(|(_, v)| v)
}

/// Names of every sample in Prometheus text.
fn sample_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Polls `check` until it returns `Some`, or panics with `what` and the last state.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(state) if Instant::now() > deadline => {
                panic!("timed out waiting for {what}; last state:\n{state}")
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The labels of one series of the test config, status class included.
fn series(
    route: &str,
    method: &str,
    cluster: &str,
    tenant: &str,
    code: u16,
) -> Vec<(String, String)> {
    let class = format!("{}xx", code / 100);
    [
        ("route", route.to_string()),
        ("method", method.to_string()),
        ("cluster", cluster.to_string()),
        ("tenant", tenant.to_string()),
        ("response_code", code.to_string()),
        ("response_code_class", class),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn refs(labels: &[(String, String)]) -> Vec<(&str, &str)> {
    labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The metric names (`mesh_...`) an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("mesh_"))
        .map(str::to_string)
        .collect()
}

/// Every PromQL string of a Grafana dashboard: `expr` of each target and the
/// query of each templating variable.
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(fields) => {
            for (k, v) in fields {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| dashboard_queries(i, out)),
        _ => {}
    }
}

/// The `expr:` of every rule in monitoring/alerts.yml (block scalars included).
fn alert_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("monitoring/alerts.yml")).unwrap();
    let mut exprs = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest != "|" {
            exprs.push(rest.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut block = Vec::new();
        while let Some(next) = lines.peek() {
            if next.trim().is_empty() || next.len() - next.trim_start().len() <= indent {
                break;
            }
            block.push(next.trim().to_string());
            lines.next();
        }
        exprs.push(block.join(" "));
    }
    assert!(exprs.len() >= 7, "{exprs:?}");
    exprs
}

fn grafana_queries() -> Vec<String> {
    let text = std::fs::read(repo_root().join("monitoring/grafana-dashboard.json")).unwrap();
    let doc: Value = serde_json::from_slice(&text).expect("the dashboard is valid JSON");
    assert!(matches!(&doc["panels"], Value::Array(p) if !p.is_empty()));
    let mut queries = Vec::new();
    dashboard_queries(&doc, &mut queries);
    assert!(queries.len() >= 15, "{queries:?}");
    queries
}

/// Label pairs and value of each sample of a query result.
type QueryResult = Vec<(Vec<(String, String)>, f64)>;

/// A real Prometheus scraping one Envoy's `/stats/prometheus` every second.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(envoy_admin_port: u16) -> Prometheus {
        let bin = debian::ensure("prometheus", "prometheus").unwrap();
        // One directory per Envoy: tests of both forms run at once.
        let dir = std::env::temp_dir().join(format!(
            "mesh-prometheus-{}-{envoy_admin_port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n\
                 - job_name: envoy\n  metrics_path: /stats/prometheus\n  \
                 static_configs: [{{targets: ['127.0.0.1:{envoy_admin_port}']}}]\n"
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let prometheus = Prometheus { child, port, dir };
        wait_for(
            "prometheus to be ready",
            Duration::from_secs(60),
            || match http::get(port, "/-/ready", &[]) {
                Ok(r) if r.status == 200 => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        prometheus
    }

    /// Runs an instant query; `Err` carries Prometheus's error.
    fn query(&self, promql: &str) -> Result<QueryResult, String> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let r = http::get(self.port, &path, &[]).map_err(|e| e.to_string())?;
        let doc: Value =
            serde_json::from_slice(&r.body).map_err(|e| format!("{e}: {}", r.body_text()))?;
        if doc["status"] != "success" {
            return Err(r.body_text());
        }
        let Some(items) = doc["data"]["result"].as_array() else {
            return Err(format!("not a vector: {}", r.body_text()));
        };
        Ok(items
            .iter()
            .filter_map(|item| {
                let labels = item["metric"]
                    .as_object()?
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect();
                let value = item["value"].get(1)?.as_str()?.parse().ok()?;
                Some((labels, value))
            })
            .collect())
    }

    /// Waits until `promql` returns exactly one sample equal to `expected`.
    fn wait_for_value(&self, promql: &str, expected: f64) {
        wait_for(
            &format!("prometheus: {promql} == {expected}"),
            Duration::from_secs(60),
            || match self.query(promql) {
                Ok(result) if result.len() == 1 && result[0].1 == expected => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "---- prometheus log (last lines, newest first) ----\n{}",
                tail.join("\n")
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

both_forms!(red_metrics_agree_with_the_traffic_in_envoy_and_prometheus);
/// A known mix of requests through metrics + ratelimit; the scrape must show
/// exact counts per label set, histograms that agree, in-flight back at 0; a
/// real Prometheus must see the same; the dashboard and alert rules must name
/// only series this run produced (all four filters run in this Envoy), and
/// each of their queries must run.
fn red_metrics_agree_with_the_traffic_in_envoy_and_prometheus(form: Form) {
    const CONFIG: &str = r#"{"labels": {"status_code": true, "custom": [
        {"name": "tenant", "header": "x-tenant", "allowed": ["gold", "silver"]}]},
        "duration_buckets_ms": [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]}"#;
    // A global rule too, for the series of its calls to the rate limit
    // service (defined at configure time); no request matches it, so the
    // cluster `rls` is never called.
    const RATELIMIT: &str = r#"{"rules": [{"name": "other-limit", "match": {"route": "other"},
        "limit": {"requests": 2, "per": "1h"}},
        {"name": "global-limit", "match": {"route": "payments"}, "key": [{"header": "x-user"}],
        "global": {"service": "rls", "domain": "mesh"}}]}"#;
    // The other two filters run for their series (defined at configure time);
    // no request of this test matches their rules.
    const CIRCUIT_BREAKER: &str = r#"{"rules": [{"name": "payments", "match": {"route": "payments"},
        "window": {"kind": "count", "size": 20}, "minimum_calls": 10, "failure_rate_percent": 50,
        "open_for": "10s", "half_open_calls": 3}]}"#;
    const LB_HINTS: &str = r#"{"rules": [{"name": "reviews-canary", "match": {"route": "payments"},
        "header": "x-mesh-target", "targets": [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}],
        "algorithm": "weighted_round_robin",
        "steps": [{"after": "1h", "weights": {"v2": 50}}], "analysis": {"canary": "v2"}}]}"#;
    let backend = Upstream::start("backend");
    let backend2 = Upstream::start("backend2");
    let envoy = Envoy::start(&with_duration_buckets(
        &Bootstrap::in_form(form)
            .stat_tags(&["tenant"])
            // First, so it also counts the ratelimit filter's local 429.
            .wasm(WasmFilter::new("metrics", CONFIG))
            .wasm(WasmFilter::new("ratelimit", RATELIMIT))
            .wasm(WasmFilter::new("circuit-breaker", CIRCUIT_BREAKER))
            .wasm(WasmFilter::new("lb-hints", LB_HINTS))
            .route("api", "/api", "backend")
            .route("payments", "/payments", "backend")
            .route("slow", "/slow", "backend")
            .route("other", "/", "backend2")
            .cluster("backend", backend.port())
            .cluster("backend2", backend2.port())
            .grpc_cluster("rls", backend2.port())
            .yaml(),
    ));
    let port = envoy.port();

    // One request held open by the upstream shows up in the in-flight gauge.
    let held = thread::spawn(move || {
        Client::new(port).get(
            "/slow/held",
            &[("x-tenant", "gold"), ("x-upstream-delay-ms", "8000")],
        )
    });
    let held_gauge = [
        ("route", "slow"),
        ("method", "GET"),
        ("cluster", "backend"),
        ("tenant", "gold"),
    ];
    wait_for(
        "the held request in flight",
        Duration::from_secs(7),
        || match envoy.metric("mesh_requests_in_flight", &held_gauge) {
            Some(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    let statuses = |rs: Vec<std::io::Result<http::Response>>| -> Vec<u16> {
        rs.into_iter().map(|r| r.unwrap().status).collect()
    };
    let gold = concurrent_gets(port, "/api/items", &[("x-tenant", "gold")], 4, 30);
    assert_eq!(statuses(gold), vec![200; 30]);
    let posts: Vec<_> = (0..2)
        .map(|_| {
            thread::spawn(move || {
                let mut c = Client::new(port);
                (0..5)
                    .map(|_| {
                        let h: [(&str, &[u8]); 2] =
                            [("x-tenant", b"silver"), ("x-upstream-status", b"201")];
                        c.request("POST", "/api/items", &h, &[b'x'; 1000])
                            .unwrap()
                            .status
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    for p in posts {
        assert_eq!(p.join().unwrap(), vec![201; 5]);
    }
    let bronze = concurrent_gets(
        port,
        "/api/items",
        &[("x-tenant", "bronze"), ("x-upstream-status", "503")],
        2,
        6,
    );
    assert_eq!(statuses(bronze), vec![503; 6]);
    let slow = concurrent_gets(port, "/slow/x", &[("x-upstream-delay-ms", "300")], 4, 4);
    assert_eq!(statuses(slow), vec![200; 4]);
    let mut c = Client::new(port);
    let deletes: Vec<u16> = (0..3)
        .map(|_| {
            c.request("DELETE", "/things/1", &[("x-upstream-status", b"404")], b"")
                .unwrap()
                .status
        })
        .collect();
    assert_eq!(deletes, [404, 404, 429], "the ratelimit rule admits 2");
    let resets = concurrent_gets(port, "/api/items", &[("x-upstream-reset", "1")], 2, 2);
    assert_eq!(
        statuses(resets),
        vec![503; 2],
        "Envoy answers an upstream reset with 503"
    );
    assert_eq!(held.join().unwrap().unwrap().status, 200);

    let expected: Vec<(Vec<(String, String)>, f64)> = vec![
        (series("api", "GET", "backend", "gold", 200), 30.0),
        (series("api", "POST", "backend", "silver", 201), 10.0),
        (series("api", "GET", "backend", "other", 503), 6.0),
        (series("slow", "GET", "backend", "unknown", 200), 4.0),
        (series("slow", "GET", "backend", "gold", 200), 1.0),
        (series("other", "DELETE", "backend2", "unknown", 404), 2.0),
        (series("other", "DELETE", "backend2", "unknown", 429), 1.0),
        (series("api", "GET", "backend", "unknown", 503), 2.0),
    ];
    let as_map = |labels: &[(String, String)]| -> BTreeMap<String, String> {
        labels.iter().cloned().collect()
    };
    let mut want: Vec<(BTreeMap<String, String>, f64)> =
        expected.iter().map(|(l, n)| (as_map(l), *n)).collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));

    // Counters are exact at once; histograms reach the admin page at Envoy's
    // next stats flush (every 5 s by default).
    let text = wait_for(
        "every series in the scrape",
        Duration::from_secs(60),
        || {
            let text = envoy.prometheus();
            let mut got = samples(&text, "mesh_requests_total");
            got.sort_by(|a, b| a.0.cmp(&b.0));
            let histograms_done = expected.iter().all(|(labels, n)| {
                [
                    "mesh_request_duration_ms_count",
                    "mesh_request_bytes_count",
                    "mesh_response_bytes_count",
                ]
                .iter()
                .all(|h| value_of(&text, h, &refs(labels)) == Some(*n))
            });
            if got == want && histograms_done {
                Ok(text)
            } else {
                Err(format!(
                    "want {want:?}\ngot {got:?}\nhistograms flushed: {histograms_done}"
                ))
            }
        },
    );

    // Histogram sums: Envoy keeps histograms in log-linear bins of two
    // significant digits and reports the sum from them, so sums are within a
    // few percent of the exact value.
    let sum =
        |name: &str, labels: &[(String, String)]| value_of(&text, name, &refs(labels)).unwrap();
    let near = |got: f64, exact: f64| (got - exact).abs() <= exact * 0.06;
    let posts = series("api", "POST", "backend", "silver", 201);
    let gold = series("api", "GET", "backend", "gold", 200);
    let request_bytes = sum("mesh_request_bytes_sum", &posts);
    assert!(
        near(request_bytes, 10.0 * 1000.0),
        "request bytes sum {request_bytes}"
    );
    assert_eq!(
        sum("mesh_request_bytes_sum", &gold),
        0.0,
        "GETs have no body"
    );
    let response_bytes = sum("mesh_response_bytes_sum", &gold);
    assert!(
        near(response_bytes, 30.0 * "backend\n".len() as f64),
        "response bytes sum {response_bytes}"
    );

    // Durations: the configured buckets, and the slow requests in the right ones.
    let slow = as_map(&series("slow", "GET", "backend", "unknown", 200));
    let buckets: Vec<(String, f64)> = samples(&text, "mesh_request_duration_ms_bucket")
        .into_iter()
        .filter(|(l, _)| {
            l.iter()
                .filter(|(k, _)| *k != "le")
                .all(|(k, v)| slow.get(k) == Some(v))
        })
        .map(|(mut l, v)| (l.remove("le").unwrap(), v))
        .collect();
    let bounds: Vec<&str> = buckets.iter().map(|(le, _)| le.as_str()).collect();
    assert_eq!(
        bounds,
        ["1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "+Inf"]
    );
    let bucket = |le: &str| buckets.iter().find(|(b, _)| b == le).unwrap().1;
    assert_eq!(bucket("250"), 0.0, "each slow request took at least 300 ms");
    assert_eq!(bucket("+Inf"), 4.0);
    let slow_sum = sum(
        "mesh_request_duration_ms_sum",
        &series("slow", "GET", "backend", "unknown", 200),
    );
    assert!(slow_sum >= 4.0 * 300.0 * 0.94, "duration sum {slow_sum}");
    let held_labels = series("slow", "GET", "backend", "gold", 200);
    assert_eq!(
        value_of(
            &text,
            "mesh_request_duration_ms_bucket",
            &[refs(&held_labels), vec![("le", "5000")]].concat()
        ),
        Some(0.0),
        "the held request took at least 8 s"
    );

    // In flight: back at 0 for every label set; nothing folded.
    let in_flight = samples(&text, "mesh_requests_in_flight");
    assert_eq!(
        in_flight.len(),
        7,
        "one gauge per request-side label set: {in_flight:?}"
    );
    assert!(in_flight.iter().all(|(_, v)| *v == 0.0), "{in_flight:?}");
    assert_eq!(
        value_of(&text, "mesh_series_overflow_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        value_of(
            &text,
            "mesh_ratelimit_requests_total",
            &[("rule", "other-limit"), ("decision", "limited")]
        ),
        Some(1.0)
    );

    // A real Prometheus scraping this Envoy sees the same values.
    let prometheus = Prometheus::start(envoy.admin_port());
    for (labels, n) in &expected {
        let matchers: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        prometheus.wait_for_value(
            &format!("mesh_requests_total{{{}}}", matchers.join(",")),
            *n,
        );
    }
    prometheus.wait_for_value(
        r#"sum(mesh_requests_total{response_code_class="5xx"})"#,
        8.0,
    );
    prometheus.wait_for_value(r#"sum(mesh_request_duration_ms_count{route="slow"})"#, 5.0);
    prometheus.wait_for_value(r#"sum(mesh_request_bytes_count{method="POST"})"#, 10.0);
    prometheus.wait_for_value("sum(mesh_requests_in_flight)", 0.0);
    prometheus.wait_for_value(
        r#"mesh_ratelimit_requests_total{rule="other-limit",decision="allowed"}"#,
        2.0,
    );
    let p50 = prometheus
        .query(r#"histogram_quantile(0.5, sum by (le) (mesh_request_duration_ms_bucket{route="slow",tenant="unknown"}))"#)
        .unwrap();
    assert!(p50.len() == 1 && p50[0].1 >= 250.0, "{p50:?}");

    // The dashboard and the alert rules name only series of this scrape, and
    // every query runs in Prometheus.
    let scraped = sample_names(&text);
    for (source, queries) in [
        ("grafana-dashboard.json", grafana_queries()),
        ("alerts.yml", alert_exprs()),
    ] {
        for query in &queries {
            let names = metric_names(query);
            assert!(!names.is_empty(), "{source}: no mesh_ series in {query}");
            for name in names {
                assert!(
                    scraped.contains(&name),
                    "{source}: {name} is not in Envoy's /stats/prometheus (query: {query})"
                );
            }
            let runnable = query
                .replace("$__rate_interval", "1m")
                .replace("$route", ".*");
            let runnable = match runnable.strip_prefix("label_values(") {
                // Grafana's label_values(metric, label): a plain selector here.
                Some(rest) => rest.split(',').next().unwrap().to_string(),
                None => runnable,
            };
            if let Err(e) = prometheus.query(&runnable) {
                panic!("{source}: Prometheus refuses {runnable}: {e}");
            }
        }
    }
}

both_forms!(ten_thousand_label_values_stay_within_max_series);
/// 10 000 distinct values of a custom label without an allow-list leave at
/// most max_series label sets plus the overflow series; every request is
/// counted once, and the folded ones are counted.
fn ten_thousand_label_values_stay_within_max_series(form: Form) {
    const MAX_SERIES: usize = 50;
    const REQUESTS: usize = 10_000;
    let backend = Upstream::start("backend");
    let envoy = Envoy::start(
        &Bootstrap::in_form(form)
            .stat_tags(&["client"])
            .wasm(WasmFilter::new(
                "metrics",
                &format!(
                    r#"{{"max_series": {MAX_SERIES}, "labels": {{"custom": [{{"name": "client", "header": "x-client"}}]}}}}"#
                ),
            ))
            .route("api", "/", "backend")
            .cluster("backend", backend.port())
            .yaml(),
    );
    let port = envoy.port();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            thread::spawn(move || {
                let mut c = Client::new(port);
                (t..REQUESTS)
                    .step_by(8)
                    .map(|i| {
                        c.get("/", &[("x-client", &format!("client-{i}"))])
                            .unwrap()
                            .status
                    })
                    .filter(|s| *s == 200)
                    .count()
            })
        })
        .collect();
    let ok: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(ok, REQUESTS);

    let text = envoy.prometheus();
    let requests = samples(&text, "mesh_requests_total");
    let total: f64 = requests.iter().map(|(_, v)| v).sum();
    assert_eq!(total, REQUESTS as f64, "every request counted exactly once");
    let is_overflow = |l: &BTreeMap<String, String>| l.values().all(|v| v == "overflow");
    let (overflow, admitted): (Vec<_>, Vec<_>) = requests.iter().partition(|(l, _)| is_overflow(l));
    let gauges = samples(&text, "mesh_requests_in_flight");
    let admitted_gauges = gauges.iter().filter(|(l, _)| !is_overflow(l)).count();
    assert!(
        admitted.len() + admitted_gauges <= MAX_SERIES,
        "{} request series + {admitted_gauges} in-flight series exceed max_series",
        admitted.len()
    );
    assert!(
        !admitted.is_empty() && admitted_gauges >= 1,
        "some label sets are admitted"
    );
    assert_eq!(overflow.len(), 1, "one overflow series");
    assert!(gauges.len() <= MAX_SERIES + 1);
    let folded = overflow[0].1;
    assert!(folded >= (REQUESTS - MAX_SERIES) as f64, "folded {folded}");
    assert_eq!(
        value_of(&text, "mesh_series_overflow_total", &[]),
        Some(folded)
    );
    assert!(gauges.iter().all(|(_, v)| *v == 0.0), "{gauges:?}");
}

both_forms!(a_bad_configuration_is_refused_with_the_field_path);
fn a_bad_configuration_is_refused_with_the_field_path(form: Form) {
    let backend = Upstream::start("backend");
    let refused = Envoy::start_with(
        &Bootstrap::in_form(form)
            .wasm(WasmFilter::new(
                "metrics",
                r#"{"labels": {"custom": [{"name": "route", "header": "x-route"}]}}"#,
            ))
            .route("api", "/", "backend")
            .cluster("backend", backend.port())
            .yaml(),
        2,
    );
    let failure = match refused {
        Ok(_) => panic!("Envoy started with a refused configuration"),
        Err(f) => f,
    };
    assert!(
        failure.log.contains(
            &form.error_line(r#"metrics: labels.custom[0].name: "route" is a built-in label"#)
        ),
        "{}",
        failure.log
    );
}

/// `promtool check rules`, `promtool check config` and `promtool test rules`
/// (each alert fires on bad data and stays quiet on good data) pass.
#[test]
fn promtool_checks_and_tests_the_alert_rules() {
    let promtool = debian::ensure("prometheus", "promtool").unwrap();
    let dir = repo_root().join("monitoring");
    let run = |args: &[&str]| {
        let out = Command::new(&promtool)
            .current_dir(&dir)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    };
    assert!(Path::new(&dir.join("alerts.test.yml")).is_file());
    run(&["check", "rules", "alerts.yml"]);
    run(&["check", "config", "prometheus.yml"]);
    run(&["test", "rules", "alerts.test.yml"]);
}

/// Istio gets the same labels: every stats tag of the suite is in both
/// `extraStatTags` lists of istio/metrics-stats.yaml (mesh-wide and per pod).
#[test]
fn istio_extra_stat_tags_cover_every_label() {
    let text = std::fs::read_to_string(repo_root().join("istio/metrics-stats.yaml")).unwrap();
    let mut lines = text.lines().filter(|l| !l.trim_start().starts_with('#'));
    lines
        .find(|l| l.trim() == "extraStatTags:")
        .expect("the meshConfig list");
    let mesh_wide: Vec<&str> = lines
        .map_while(|l| l.trim().strip_prefix("- "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let per_pod: Vec<&str> = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("extraStatTags: ["))
        .and_then(|l| l.strip_suffix(']'))
        .expect("the annotation list")
        .split(',')
        .map(str::trim)
        .collect();
    for tag in mesh_testkit::config::STAT_TAGS.iter().chain(&["tenant"]) {
        assert!(
            mesh_wide.contains(tag),
            "meshConfig lacks {tag}: {mesh_wide:?}"
        );
        assert!(per_pod.contains(tag), "annotation lacks {tag}: {per_pod:?}");
    }
}

both_forms!(a_local_reply_of_an_earlier_filter_is_counted_once);
/// Behind a filter that answers locally, the metrics filter never sees the
/// request phase: the request is still counted once, with its labels read in
/// the log phase, and no in-flight gauge is left up. (The suite runs metrics
/// first whatever the order here: there it counts ratelimit's local answer.)
fn a_local_reply_of_an_earlier_filter_is_counted_once(form: Form) {
    let backend = Upstream::start("backend");
    let envoy = Envoy::start(
        &Bootstrap::in_form(form)
            .wasm(WasmFilter::new(
                "ratelimit",
                r#"{"rules": [{"name": "one", "limit": {"requests": 1, "per": "1h"}}]}"#,
            ))
            .wasm(WasmFilter::new(
                "metrics",
                r#"{"labels": {"status_code": true}}"#,
            ))
            .route("api", "/", "backend")
            .cluster("backend", backend.port())
            .yaml(),
    );
    let mut c = Client::new(envoy.port());
    assert_eq!(c.get("/", &[]).unwrap().status, 200);
    assert_eq!(c.get("/", &[]).unwrap().status, 429);
    let text = envoy.prometheus();
    let labels = |code: &str, class: &str| -> BTreeMap<String, String> {
        [
            ("route", "api"),
            ("method", "GET"),
            ("cluster", "backend"),
            ("response_code", code),
            ("response_code_class", class),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    // In the log phase Envoy still gives the request headers and the route:
    // the 429 gets the same request labels as the 200.
    let mut requests = samples(&text, "mesh_requests_total");
    requests.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        requests,
        [(labels("200", "2xx"), 1.0), (labels("429", "4xx"), 1.0)]
    );
    let gauges = samples(&text, "mesh_requests_in_flight");
    assert!(gauges.iter().all(|(_, v)| *v == 0.0), "{gauges:?}");
}

both_forms!(a_client_that_hangs_up_leaves_nothing_in_flight);
/// A client that hangs up before the answer: the request leaves the
/// in-flight gauge and is counted with the status `none`.
fn a_client_that_hangs_up_leaves_nothing_in_flight(form: Form) {
    use std::io::Write;
    let backend = Upstream::start("backend");
    let envoy = Envoy::start(
        &Bootstrap::in_form(form)
            .wasm(WasmFilter::new(
                "metrics",
                r#"{"labels": {"status_code": true}}"#,
            ))
            .route("api", "/", "backend")
            .cluster("backend", backend.port())
            .yaml(),
    );
    let gauge = [("route", "api"), ("method", "GET"), ("cluster", "backend")];
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", envoy.port())).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nx-upstream-delay-ms: 10000\r\n\r\n")
        .unwrap();
    wait_for(
        "the request in flight",
        Duration::from_secs(30),
        || match envoy.metric("mesh_requests_in_flight", &gauge) {
            Some(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    drop(conn);
    // A stat the filter defines at the end of the stream can reach the admin
    // output a moment after the gauge's decrement: wait for both.
    let text = wait_for(
        "the gauge back at 0 and the request counted",
        Duration::from_secs(30),
        || {
            let text = envoy.prometheus();
            match value_of(&text, "mesh_requests_in_flight", &gauge) {
                Some(0.0) if !samples(&text, "mesh_requests_total").is_empty() => Ok(text),
                other => Err(format!("in flight {other:?}")),
            }
        },
    );
    let requests = samples(&text, "mesh_requests_total");
    let labels: BTreeMap<String, String> = gauge
        .iter()
        .chain(&[("response_code", "none"), ("response_code_class", "none")])
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(requests, [(labels, 1.0)]);
}
