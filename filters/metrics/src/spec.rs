//! The metrics configuration as written (see DESIGN.md): the JSON shape, read
//! by serde; [`crate::config`] compiles it. A new field is one line here plus
//! its use in the compile step.

use serde::Deserialize;

use mesh_shared::spec::{checked, Checked, HeaderName, Integer, NonEmptyList};

use crate::config::{BUILTIN_LABELS, MAX_LABEL_VALUE_LEN, MAX_MAX_SERIES};

/// The JSON Schema of [`ConfigSpec`] (committed as `schemas/<filter>.schema.json`).
#[cfg(feature = "schema")]
pub fn schema() -> schemars::Schema {
    mesh_shared::spec::schema_for::<ConfigSpec>()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(title = "metrics configuration"))]
#[serde(deny_unknown_fields)]
pub struct ConfigSpec {
    /// Metric name prefix (default `mesh`): `<prefix>_requests_total`...
    pub prefix: Option<MetricName>,
    pub labels: Option<LabelsSpec>,
    /// Increasing whole milliseconds (the bootstrap's histogram buckets must match).
    pub duration_buckets_ms: Option<NonEmptyList<Integer<1, 86_400_000>>>,
    /// Label sets before new ones fold into the overflow series (default 10000).
    pub max_series: Option<Integer<1, MAX_MAX_SERIES>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LabelsSpec {
    /// Default true.
    pub route: Option<bool>,
    /// Default true.
    pub method: Option<bool>,
    /// `response_code` (default false).
    pub status_code: Option<bool>,
    /// `response_code_class` (default true).
    pub status_class: Option<bool>,
    /// Default true.
    pub cluster: Option<bool>,
    pub custom: Option<Vec<CustomLabelSpec>>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CustomLabelSpec {
    pub name: LabelName,
    /// The request header whose value is the label value.
    pub header: HeaderName,
    /// Values kept as they are; any other becomes `other`. Absent: every value is kept.
    pub allowed: Option<Vec<LabelValue>>,
    /// Default `other`.
    pub other: Option<LabelValue>,
}

fn is_metric_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

macro_rules! checked_string {
    ($t:ident) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                checked(d)
            }
        }
    };
}

/// A Prometheus metric name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricName(pub String);

impl Checked for MetricName {
    const EXPECTING: &'static str = "a Prometheus metric name";
    fn check(p: &str) -> Result<Self, String> {
        if is_metric_name(p) {
            Ok(MetricName(p.to_string()))
        } else {
            Err(format!(
                "\"{p}\" is not a Prometheus metric name (letters, digits, '_', not starting \
                 with a digit)"
            ))
        }
    }
}
checked_string!(MetricName);

/// A Prometheus label name that is not one the filter writes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelName(pub String);

impl Checked for LabelName {
    const EXPECTING: &'static str = "a Prometheus label name";
    fn check(name: &str) -> Result<Self, String> {
        if !is_metric_name(name) || name.starts_with("__") {
            return Err(format!(
                "\"{name}\" is not a Prometheus label name (letters, digits, '_', not starting \
                 with a digit or \"__\")"
            ));
        }
        if BUILTIN_LABELS.contains(&name) {
            return Err(format!("\"{name}\" is a built-in label"));
        }
        Ok(LabelName(name.to_string()))
    }
}
checked_string!(LabelName);

/// A label value written in the configuration: it must survive the stat name
/// encoding unchanged, so the user's queries match what Envoy shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelValue(pub String);

impl Checked for LabelValue {
    const EXPECTING: &'static str = "a label value";
    fn check(v: &str) -> Result<Self, String> {
        let ok = !v.is_empty()
            && v.len() <= MAX_LABEL_VALUE_LEN
            && v.bytes()
                .all(|b| b.is_ascii_graphic() && b != b';' && b != b'=');
        if ok {
            Ok(LabelValue(v.to_string()))
        } else {
            Err(format!(
                "\"{v}\": use 1 to {MAX_LABEL_VALUE_LEN} printable ASCII characters without \
                 spaces, ';' or '='"
            ))
        }
    }
}
checked_string!(LabelValue);

#[cfg(feature = "schema")]
mod schema {
    use std::borrow::Cow;

    use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

    use super::{LabelName, LabelValue, MetricName, BUILTIN_LABELS, MAX_LABEL_VALUE_LEN};

    impl JsonSchema for MetricName {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "MetricName".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({ "type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$" })
        }
    }

    impl JsonSchema for LabelName {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "LabelName".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            // Not starting with `__`, without a look-ahead: Helm checks
            // values.schema.json with Go's regexp (RE2), which has none.
            json_schema!({
                "type": "string",
                "pattern": "^([A-Za-z][A-Za-z0-9_]*|_([A-Za-z0-9][A-Za-z0-9_]*)?)$",
                "not": { "enum": BUILTIN_LABELS }
            })
        }
    }

    impl JsonSchema for LabelValue {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "LabelValue".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_LABEL_VALUE_LEN,
                "pattern": "^[!-:<>-~]+$"
            })
        }
    }
}
