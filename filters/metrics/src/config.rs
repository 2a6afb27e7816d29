//! The metrics configuration (see DESIGN.md) read into a compiled [`Config`].

use mesh_shared::config::ConfigError;
use mesh_shared::spec::{self, Integer};

use crate::spec::{ConfigSpec, LabelsSpec};

pub const DEFAULT_PREFIX: &str = "mesh";
pub const DEFAULT_MAX_SERIES: u64 = 10_000;
/// Each label set costs Envoy a few hundred bytes per histogram per worker.
pub const MAX_MAX_SERIES: u64 = 1_000_000;
pub const DEFAULT_DURATION_BUCKETS_MS: [u64; 11] =
    [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];
/// Header values used as label values are cut to this many bytes.
pub const MAX_LABEL_VALUE_LEN: usize = 64;

/// Label names the filter itself writes; custom labels must not reuse them.
pub const BUILTIN_LABELS: [&str; 5] = [
    "route",
    "method",
    "response_code",
    "response_code_class",
    "cluster",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Metric name prefix: `<prefix>_requests_total` and so on.
    pub prefix: String,
    pub labels: Labels,
    /// The buckets the bootstrap's `histogram_bucket_settings` must give
    /// `<prefix>_request_duration_ms` (a Wasm module cannot set buckets).
    /// Whole milliseconds: the filter records durations in whole milliseconds.
    pub duration_buckets_ms: Vec<u64>,
    pub max_series: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    pub route: bool,
    pub method: bool,
    pub status_code: bool,
    pub status_class: bool,
    pub cluster: bool,
    pub custom: Vec<CustomLabel>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomLabel {
    pub name: String,
    pub header: String,
    /// Values kept as they are; any other value becomes `other`. `None`: every
    /// value is kept (still bounded by `max_series`).
    pub allowed: Option<Vec<String>>,
    pub other: String,
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        Config::compile(spec::parse(bytes)?)
    }

    pub fn compile(spec: ConfigSpec) -> Result<Config, ConfigError> {
        let duration_buckets_ms = match spec.duration_buckets_ms {
            Some(list) => {
                let buckets: Vec<u64> = list.0.into_iter().map(Integer::get).collect();
                if let Some(i) = (1..buckets.len()).find(|&i| buckets.get(i - 1) >= buckets.get(i))
                {
                    return Err(ConfigError::at(
                        format!("duration_buckets_ms[{i}]"),
                        "bucket bounds must increase",
                    ));
                }
                buckets
            }
            None => DEFAULT_DURATION_BUCKETS_MS.to_vec(),
        };
        Ok(Config {
            prefix: spec
                .prefix
                .map_or_else(|| DEFAULT_PREFIX.to_string(), |p| p.0),
            labels: compile_labels(spec.labels.unwrap_or_default())?,
            duration_buckets_ms,
            max_series: spec.max_series.map_or(DEFAULT_MAX_SERIES, Integer::get),
        })
    }
}

impl Default for Labels {
    fn default() -> Self {
        Labels {
            route: true,
            method: true,
            status_code: false,
            status_class: true,
            cluster: true,
            custom: Vec::new(),
        }
    }
}

fn compile_labels(spec: LabelsSpec) -> Result<Labels, ConfigError> {
    let defaults = Labels::default();
    let custom: Vec<CustomLabel> = spec
        .custom
        .unwrap_or_default()
        .into_iter()
        .map(|c| CustomLabel {
            name: c.name.0,
            header: c.header.0,
            allowed: c.allowed.map(|a| a.into_iter().map(|v| v.0).collect()),
            other: c.other.map_or_else(|| "other".to_string(), |o| o.0),
        })
        .collect();
    for (i, label) in custom.iter().enumerate() {
        if custom.iter().take(i).any(|c| c.name == label.name) {
            return Err(ConfigError::at(
                format!("labels.custom[{i}].name"),
                format!("duplicate label name \"{}\"", label.name),
            ));
        }
    }
    Ok(Labels {
        route: spec.route.unwrap_or(defaults.route),
        method: spec.method.unwrap_or(defaults.method),
        status_code: spec.status_code.unwrap_or(defaults.status_code),
        status_class: spec.status_class.unwrap_or(defaults.status_class),
        cluster: spec.cluster.unwrap_or(defaults.cluster),
        custom,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Config::parse(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn the_design_example_parses() {
        let c = Config::parse(
            br#"{
              "prefix": "mesh",
              "labels": { "route": true, "method": true, "status_class": true, "cluster": true,
                          "custom": [ { "name": "tenant", "header": "x-tenant",
                                        "allowed": ["gold", "silver"], "other": "other" } ] },
              "duration_buckets_ms": [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000],
              "max_series": 10000
            }"#,
        )
        .unwrap();
        assert_eq!(c.prefix, "mesh");
        assert_eq!(c.max_series, 10_000);
        assert_eq!(c.duration_buckets_ms, DEFAULT_DURATION_BUCKETS_MS.to_vec());
        assert_eq!(
            c.labels.custom,
            vec![CustomLabel {
                name: "tenant".into(),
                header: "x-tenant".into(),
                allowed: Some(vec!["gold".into(), "silver".into()]),
                other: "other".into(),
            }]
        );
        assert!(!c.labels.status_code, "status_code is off unless asked for");
    }

    #[test]
    fn empty_config_means_defaults() {
        let c = Config::parse(b"").unwrap();
        assert_eq!(c.prefix, "mesh");
        assert_eq!(c.labels, Labels::default());
        assert_eq!(c.max_series, DEFAULT_MAX_SERIES);
    }

    #[test]
    fn bad_configs_name_the_field() {
        assert_eq!(
            err(r#"{"prefix": "9mesh"}"#),
            "prefix: \"9mesh\" is not a Prometheus metric name (letters, digits, '_', not starting with a digit)"
        );
        assert_eq!(
            err(r#"{"max_series": 0}"#),
            "max_series: expected an integer from 1 to 1000000, got 0"
        );
        assert!(err(r#"{"labels": {"rout": true}}"#).starts_with("labels.rout: unknown field"));
        assert_eq!(
            err(r#"{"labels": {"method": "yes"}}"#),
            "labels.method: invalid type: string \"yes\", expected a boolean"
        );
        assert_eq!(
            err(r#"{"labels": {"custom": [{"name": "tenant"}]}}"#),
            "labels.custom[0]: missing field `header`"
        );
        assert_eq!(
            err(r#"{"labels": {"custom": [{"name": "route", "header": "x"}]}}"#),
            "labels.custom[0].name: \"route\" is a built-in label"
        );
        assert!(
            err(r#"{"labels": {"custom": [{"name": "te-nant", "header": "x"}]}}"#)
                .starts_with("labels.custom[0].name: \"te-nant\" is not a Prometheus label name")
        );
        assert_eq!(
            err(
                r#"{"labels": {"custom": [{"name": "t", "header": "x"}, {"name": "t", "header": "y"}]}}"#
            ),
            "labels.custom[1].name: duplicate label name \"t\""
        );
        assert!(err(
            r#"{"labels": {"custom": [{"name": "t", "header": "x", "allowed": ["a;b"]}]}}"#
        )
        .starts_with("labels.custom[0].allowed[0]: \"a;b\": use 1 to 64"));
        assert_eq!(
            err(r#"{"duration_buckets_ms": [1, 5, 5]}"#),
            "duration_buckets_ms[2]: bucket bounds must increase"
        );
        assert_eq!(
            err(r#"{"duration_buckets_ms": [0.5, 1]}"#),
            "duration_buckets_ms[0]: expected an integer from 1 to 86400000, got a decimal number"
        );
        assert_eq!(
            err(r#"{"duration_buckets_ms": []}"#),
            "duration_buckets_ms: must not be an empty list"
        );
        assert!(err(r#"{"max_sereis": 3}"#).starts_with("max_sereis: unknown field"));
    }
}
