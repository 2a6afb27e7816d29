//! The metrics configuration (see DESIGN.md) read into a compiled [`Config`].

use mesh_shared::config::{parse_document, ConfigError, Node};

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
        let doc = parse_document(bytes)?;
        let root = Node::root(&doc);
        let mut f = root.object()?;
        let prefix = match f.optional("prefix") {
            Some(n) => {
                let p = n.name()?;
                if !is_metric_name(p) {
                    return Err(n.error(format!(
                        "\"{p}\" is not a Prometheus metric name (letters, digits, '_', \
                         not starting with a digit)"
                    )));
                }
                p.to_string()
            }
            None => DEFAULT_PREFIX.to_string(),
        };
        let labels = match f.optional("labels") {
            Some(n) => parse_labels(&n)?,
            None => Labels::default(),
        };
        let duration_buckets_ms = match f.optional("duration_buckets_ms") {
            Some(n) => parse_buckets(&n)?,
            None => DEFAULT_DURATION_BUCKETS_MS.to_vec(),
        };
        let max_series = match f.optional("max_series") {
            Some(n) => n.positive(MAX_MAX_SERIES)?,
            None => DEFAULT_MAX_SERIES,
        };
        f.finish()?;
        Ok(Config {
            prefix,
            labels,
            duration_buckets_ms,
            max_series,
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

fn parse_labels(node: &Node<'_>) -> Result<Labels, ConfigError> {
    let mut f = node.object()?;
    let defaults = Labels::default();
    let mut flag = |name: &'static str, default: bool| match f.optional(name) {
        Some(n) => n.bool(),
        None => Ok(default),
    };
    let route = flag("route", defaults.route)?;
    let method = flag("method", defaults.method)?;
    let status_code = flag("status_code", defaults.status_code)?;
    let status_class = flag("status_class", defaults.status_class)?;
    let cluster = flag("cluster", defaults.cluster)?;
    let mut custom: Vec<CustomLabel> = Vec::new();
    if let Some(n) = f.optional("custom") {
        for item in n.list()? {
            let label = parse_custom(&item)?;
            if custom.iter().any(|c| c.name == label.name) {
                return Err(ConfigError {
                    path: format!("{}.name", item.path()),
                    message: format!("duplicate label name \"{}\"", label.name),
                });
            }
            custom.push(label);
        }
    }
    f.finish()?;
    Ok(Labels {
        route,
        method,
        status_code,
        status_class,
        cluster,
        custom,
    })
}

fn parse_custom(node: &Node<'_>) -> Result<CustomLabel, ConfigError> {
    let mut f = node.object()?;
    let name_node = f.required("name")?;
    let name = name_node.name()?;
    if !is_label_name(name) {
        return Err(name_node.error(format!(
            "\"{name}\" is not a Prometheus label name (letters, digits, '_', not starting \
             with a digit or \"__\")"
        )));
    }
    if BUILTIN_LABELS.contains(&name) {
        return Err(name_node.error(format!("\"{name}\" is a built-in label")));
    }
    let header = f.required("header")?.header_name()?;
    let allowed = match f.optional("allowed") {
        Some(n) => {
            let mut values = Vec::new();
            for item in n.list()? {
                values.push(label_value(&item)?);
            }
            Some(values)
        }
        None => None,
    };
    let other = match f.optional("other") {
        Some(n) => label_value(&n)?,
        None => "other".to_string(),
    };
    f.finish()?;
    Ok(CustomLabel {
        name: name.to_string(),
        header,
        allowed,
        other,
    })
}

/// A label value written in the configuration: it must survive the stat name
/// encoding unchanged, so the user's queries match what Envoy shows.
fn label_value(node: &Node<'_>) -> Result<String, ConfigError> {
    let v = node.name()?;
    let ok = v.len() <= MAX_LABEL_VALUE_LEN
        && v.bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b'=');
    if !ok {
        return Err(node.error(format!(
            "\"{v}\": use up to {MAX_LABEL_VALUE_LEN} printable ASCII characters without \
             spaces, ';' or '='"
        )));
    }
    Ok(v.to_string())
}

fn parse_buckets(node: &Node<'_>) -> Result<Vec<u64>, ConfigError> {
    let items = node.list()?;
    if items.is_empty() {
        return Err(node.error("must not be an empty list"));
    }
    let mut buckets: Vec<u64> = Vec::with_capacity(items.len());
    for item in &items {
        let b = item.positive(86_400_000)?;
        if buckets.last().is_some_and(|last| *last >= b) {
            return Err(item.error("bucket bounds must increase"));
        }
        buckets.push(b);
    }
    Ok(buckets)
}

fn is_metric_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_label_name(s: &str) -> bool {
    is_metric_name(s) && !s.starts_with("__")
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
            "labels.method: expected true or false, got \"yes\""
        );
        assert_eq!(
            err(r#"{"labels": {"custom": [{"name": "tenant"}]}}"#),
            "labels.custom[0].header: is required"
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
        .starts_with("labels.custom[0].allowed[0]: \"a;b\": use up to 64"));
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
