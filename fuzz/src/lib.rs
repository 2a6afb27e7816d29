//! What the fuzz targets share: arbitrary requests for the policy cores
//! (header values and Envoy attributes as raw bytes, any length, any byte),
//! and the sequence of events a core sees over time.

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use mesh_shared::request::FakeRequest;
use mesh_shared::Attribute;

/// Header names the fuzz configurations read, so arbitrary values reach the
/// code that uses them; any other name is possible too.
pub const HEADERS: &[&str] = &[
    "x-api-key",
    "x-tenant",
    "x-user-id",
    "x-mesh-target",
    "x-mesh-force-target",
    "cookie",
];

#[derive(Arbitrary, Debug, Clone)]
pub enum HeaderName {
    Known(u8),
    Other(String),
}

/// One request as a core sees it.
#[derive(Arbitrary, Debug, Clone)]
pub struct Req {
    pub headers: Vec<(HeaderName, Vec<u8>)>,
    /// Index into `Attribute::ALL` (modulo), value.
    pub attributes: Vec<(u8, Vec<u8>)>,
    /// Encoded route metadata (`mesh-filters.<filter>`), as Envoy would hand it over.
    pub route_metadata: Option<Vec<u8>>,
}

impl Req {
    /// The request for `filter` (whose route metadata this is).
    pub fn build(&self, filter: &str) -> FakeRequest {
        let mut req = FakeRequest::new();
        for (name, value) in &self.headers {
            let name = match name {
                HeaderName::Known(i) => HEADERS[usize::from(*i) % HEADERS.len()].to_string(),
                HeaderName::Other(n) => n.to_ascii_lowercase(),
            };
            req = req.with_header(&name, value);
        }
        for (attr, value) in &self.attributes {
            let attr = Attribute::ALL[usize::from(*attr) % Attribute::ALL.len()];
            req = req.with(attr, value);
        }
        if let Some(meta) = &self.route_metadata {
            req.route_metadata.push((filter.to_string(), meta.clone()));
        }
        req
    }
}

/// How a call ended, as the response phase sees it.
#[derive(Arbitrary, Debug, Clone)]
pub struct Ending {
    pub code: Option<u32>,
    /// Index into [`DETAILS`] (modulo), or arbitrary bytes.
    pub details: Result<u8, Vec<u8>>,
    pub duration_ms: Option<u32>,
}

/// `response.code_details` values Envoy 1.40 was seen to produce.
pub const DETAILS: &[&[u8]] = &[
    b"via_upstream",
    b"upstream_reset_before_response_started{connection_termination}",
    b"response_timeout",
    b"no_healthy_upstream",
    b"downstream_remote_disconnect",
    b"direct_response",
];

impl Ending {
    pub fn details(&self) -> &[u8] {
        match &self.details {
            Ok(i) => DETAILS[usize::from(*i) % DETAILS.len()],
            Err(bytes) => bytes,
        }
    }
}

/// One step of traffic: time moves on by `advance_ms`, then `req` arrives.
#[derive(Arbitrary, Debug, Clone)]
pub struct Event {
    pub advance_ms: u32,
    pub req: Req,
    pub random: u64,
    pub ending: Ending,
    /// Finish the call now (else it stays in flight until the end of the run).
    pub finish_now: bool,
}

/// A realistic clock start (2023), so arithmetic on `now` sees real magnitudes.
pub const T0: u64 = 1_700_000_000_000_000_000;
pub const MS: u64 = 1_000_000;

/// One configuration from `configs` (modulo), for targets that fuzz traffic
/// against fixed configurations covering each filter's features.
pub fn pick<'a>(configs: &[&'a str], i: u8) -> &'a str {
    configs[usize::from(i) % configs.len()]
}

/// A metrics host that writes every stat name it is asked to define (as the
/// adapter does), so label values from requests reach `stat_name`.
pub mod metrics_host {
    use mesh_shared::stats::stat_name;

    #[derive(Default)]
    pub struct FakeHost {
        pub defined: Vec<String>,
    }

    impl FakeHost {
        fn define(&mut self, name: &str, tags: &[(&str, String)]) -> usize {
            let tags: Vec<(&str, &str)> = tags.iter().map(|(n, v)| (*n, v.as_str())).collect();
            self.defined.push(stat_name(name, &tags));
            self.defined.len() - 1
        }
    }

    impl metrics::Define for FakeHost {
        type Gauge = usize;
        type Series = usize;
        fn gauge(&mut self, tags: &[(&str, String)]) -> usize {
            self.define("mesh_requests_in_flight", tags)
        }
        fn series(&mut self, tags: &[(&str, String)]) -> usize {
            self.define("mesh_requests_total", tags)
        }
    }
}

/// Object keys the configurations know, so arbitrary values reach every field.
pub const KEYS: &[&str] = &[
    "rules", "name", "match", "route", "path_prefix", "path_exact", "host", "methods", "headers",
    "present", "key", "header", "cookie", "static", "client_ip", "limit", "requests", "per",
    "burst", "on_missing_key", "shadow", "max_keys", "response", "status", "body",
    "headers_on_allowed", "route_metadata", "scope", "window", "kind", "size", "minimum_calls",
    "failure_rate_percent", "failure_when", "statuses", "reset", "slow_call", "duration",
    "rate_percent", "consecutive_failures", "open_for", "half_open_calls", "max_breakers",
    "targets", "weight", "cluster", "algorithm", "sticky", "override", "steps", "after",
    "weights", "avoid_open_circuits", "no_target", "prefix", "labels", "method",
    "status_code", "status_class", "custom", "allowed", "other", "duration_buckets_ms",
    "max_series", "half_open_policy", "max_wait_in_half_open", "global", "service", "domain",
    "timeout", "failure_mode", "failure_response", "analysis", "canary", "interval", "min_calls",
    "max_failure_rate_percent", "max_slow_rate_percent", "failure_limit",
];

/// String values the configurations know (keywords, durations, names).
pub const WORDS: &[&str] = &[
    "1s", "250ms", "1m30s", "0s", "1.5s", "route", "cluster", "client_ip", "path", "skip",
    "deny", "draft", "x-ratelimit", "none", "count", "time", "5xx", "503", "sticky",
    "round_robin", "weighted_round_robin", "random", "weighted_random", "least_requests",
    "reject", "pass", "v1", "v2", "/api", "*.example.com", "GET", "x-api-key", "mesh",
];

/// An arbitrary JSON value whose keys and strings are often the ones a
/// configuration uses (`Known` indexes `KEYS` / `WORDS`).
#[derive(Arbitrary, Debug, Clone)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Word(u8),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(Key, Json)>),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Key {
    Known(u8),
    Other(String),
}

impl Json {
    pub fn to_value(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(i) => Value::from(*i),
            Json::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Json::Word(i) => Value::from(WORDS[usize::from(*i) % WORDS.len()]),
            Json::Str(s) => Value::from(s.as_str()),
            Json::Array(items) => Value::Array(items.iter().map(Json::to_value).collect()),
            Json::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| {
                        let key = match k {
                            Key::Known(i) => KEYS[usize::from(*i) % KEYS.len()].to_string(),
                            Key::Other(s) => s.clone(),
                        };
                        (key, v.to_value())
                    })
                    .collect(),
            ),
        }
    }
}
