//! The circuit-breaker configuration as written (see DESIGN.md): the JSON
//! shape, read by serde; [`crate::config`] compiles it. A new field is one
//! line here plus its use in the compile step.

use std::fmt;

use serde::de::{self, Deserializer, IntoDeserializer, Visitor};
use serde::Deserialize;

use mesh_shared::matcher::MatchSpec;
use mesh_shared::spec::{Checked, Duration, HeaderName, Integer, LocalResponseSpec, Name};

use crate::config::{MAX_COUNT_WINDOW, MAX_MAX_BREAKERS};

/// The JSON Schema of [`ConfigSpec`] (committed as `schemas/<filter>.schema.json`).
#[cfg(feature = "schema")]
pub fn schema() -> schemars::Schema {
    mesh_shared::spec::schema_for::<ConfigSpec>()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(title = "circuit-breaker configuration"))]
#[serde(deny_unknown_fields)]
pub struct ConfigSpec {
    /// Tried in order; the first whose `match` holds applies.
    pub rules: Option<Vec<RuleSpec>>,
    /// The answer while open (default 503 `circuit open`).
    pub response: Option<LocalResponseSpec>,
    /// Read the route's `mesh-filters` metadata to select a rule or switch the filter off.
    pub route_metadata: Option<bool>,
    /// Breakers per rule (default 1000).
    pub max_breakers: Option<Integer<1, MAX_MAX_BREAKERS>>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: Name,
    #[serde(rename = "match")]
    pub matcher: Option<MatchSpec>,
    /// One breaker per `route` (default), per `cluster`, or per value of `{"header": name}`.
    pub scope: Option<ScopeSpec>,
    /// The sliding window (default: the last 100 calls).
    pub window: Option<WindowSpec>,
    /// Calls the window must hold before the rates are judged (default 100).
    pub minimum_calls: Option<Integer<1, 1_000_000>>,
    /// Open at this failure rate (default 50).
    pub failure_rate_percent: Option<Integer<1, 100>>,
    /// What counts as a failure (default: 5xx and resets).
    pub failure_when: Option<FailureWhenSpec>,
    /// Slow calls and the rate of them that opens the breaker.
    pub slow_call: Option<SlowCallSpec>,
    /// Open after this many failures in a row (default 0: off).
    pub consecutive_failures: Option<Integer<0, 1_000_000>>,
    /// How long the breaker stays open (default 60s, at most 1 day).
    pub open_for: Option<Duration>,
    /// Probes admitted half-open (default 10).
    pub half_open_calls: Option<Integer<1, 1000>>,
    /// Breakers of this rule (default: the top-level `max_breakers`).
    pub max_breakers: Option<Integer<1, MAX_MAX_BREAKERS>>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ScopeSpec {
    Route,
    Cluster,
    Header(HeaderName),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    pub kind: WindowKind,
    /// Calls for a `count` window, a duration for a `time` window.
    pub size: WindowSize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    Count,
    Time,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSize {
    Calls(u64),
    Duration(Duration),
}

impl<'de> Deserialize<'de> for WindowSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        type Calls = Integer<1, MAX_COUNT_WINDOW>;
        impl Visitor<'_> for V {
            type Value = WindowSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a number of calls from 1 to {MAX_COUNT_WINDOW} or a duration like \"10s\""
                )
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<WindowSize, E> {
                Calls::deserialize(v.into_deserializer()).map(|c| WindowSize::Calls(c.get()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<WindowSize, E> {
                Calls::deserialize(v.into_deserializer()).map(|c| WindowSize::Calls(c.get()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<WindowSize, E> {
                Calls::deserialize(v.into_deserializer()).map(|c| WindowSize::Calls(c.get()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WindowSize, E> {
                Duration::check(v)
                    .map(WindowSize::Duration)
                    .map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct FailureWhenSpec {
    /// Status classes (`"5xx"`) and statuses (`503`, `"503"`) that count as failures (default `["5xx"]`).
    pub statuses: Option<Vec<StatusSpec>>,
    /// A reset or local timeout with no upstream status counts as a failure (default true).
    pub reset: Option<bool>,
}

/// An inclusive status range: `"5xx"` is 500..=599, `503` or `"503"` just 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSpec(pub u32, pub u32);

const STATUS_EXPECTED: &str = "a status class like \"5xx\" or a status from 100 to 599";

impl<'de> Deserialize<'de> for StatusSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StatusSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(STATUS_EXPECTED)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StatusSpec, E> {
                match u32::try_from(v) {
                    Ok(code @ 100..=599) => Ok(StatusSpec(code, code)),
                    _ => Err(E::custom(format_args!(
                        "expected {STATUS_EXPECTED}, got {v}"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StatusSpec, E> {
                Err(E::custom(format_args!(
                    "expected {STATUS_EXPECTED}, got {v}"
                )))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<StatusSpec, E> {
                if v.fract() == 0.0 && (100.0..=599.0).contains(&v) {
                    // An integral value within 100..=599: the cast is exact.
                    self.visit_u64(v as u64)
                } else {
                    Err(E::custom(format_args!("expected {STATUS_EXPECTED}")))
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StatusSpec, E> {
                if let [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] = s.as_bytes() {
                    let class = u32::from(c - b'0') * 100;
                    return Ok(StatusSpec(class, class + 99));
                }
                match s.parse::<u32>() {
                    Ok(code @ 100..=599) => Ok(StatusSpec(code, code)),
                    _ => Err(E::custom(format_args!(
                        "expected {STATUS_EXPECTED}, got \"{s}\""
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SlowCallSpec {
    /// A call at least this long is slow (at most 1h).
    pub duration: Duration,
    /// Open at this slow-call rate (default 100).
    pub rate_percent: Option<Integer<1, 100>>,
}

#[cfg(feature = "schema")]
mod schema {
    use std::borrow::Cow;

    use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

    use super::{StatusSpec, WindowSpec, MAX_COUNT_WINDOW};
    use mesh_shared::spec::Duration;

    impl JsonSchema for WindowSpec {
        fn schema_name() -> Cow<'static, str> {
            "WindowSpec".into()
        }
        fn json_schema(generator: &mut SchemaGenerator) -> Schema {
            let duration = generator.subschema_for::<Duration>();
            json_schema!({
                "description": "`{\"kind\": \"count\", \"size\": calls}` or `{\"kind\": \"time\", \"size\": duration}`.",
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {
                            "kind": { "const": "count" },
                            "size": { "type": "integer", "minimum": 1, "maximum": MAX_COUNT_WINDOW }
                        },
                        "required": ["kind", "size"],
                        "additionalProperties": false
                    },
                    {
                        "type": "object",
                        "properties": { "kind": { "const": "time" }, "size": duration },
                        "required": ["kind", "size"],
                        "additionalProperties": false
                    }
                ]
            })
        }
    }

    impl JsonSchema for StatusSpec {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "Status".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({
                "oneOf": [
                    { "type": "integer", "minimum": 100, "maximum": 599 },
                    { "type": "string", "pattern": "^([1-5][xX][xX]|[1-5][0-9][0-9])$" }
                ]
            })
        }
    }
}
