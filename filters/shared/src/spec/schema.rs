//! JSON Schema (2020-12) of the shared scalar types, written by hand because
//! their checks live in code: the schema says the same in JSON Schema terms.

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

use serde_json::Value;

use super::{Duration, HeaderName, Integer, Name, NonEmpty, OneOrMany};

/// Removes the `null` schemars offers for every `Option` field:
/// `"type": [T, "null"]` becomes `"type": T`, `"anyOf": [S, {"type": "null"}]` becomes S.
pub(crate) fn drop_null(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if let [only] = types.as_slice() {
                    let only = only.clone();
                    map.insert("type".into(), only);
                }
            }
            if let Some(Value::Array(alternatives)) = map.get("anyOf") {
                let null = serde_json::json!({ "type": "null" });
                let kept: Vec<Value> = alternatives
                    .iter()
                    .filter(|a| **a != null)
                    .cloned()
                    .collect();
                if let [Value::Object(only)] = kept.as_slice() {
                    let only = only.clone();
                    map.remove("anyOf");
                    for (k, val) in only {
                        map.entry(k).or_insert(val);
                    }
                }
            }
            map.values_mut().for_each(drop_null);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null),
        _ => {}
    }
}

/// What `crate::duration::parse_duration` accepts: one or more number+unit parts.
pub const DURATION_PATTERN: &str =
    r"^(([0-9]+(\.[0-9]{0,18})?|\.[0-9]{1,18})(ns|us|µs|ms|s|m|h|d))+$";
/// What `HeaderName` accepts (an optional leading ':', then token characters).
pub const HEADER_NAME_PATTERN: &str = r"^:?[A-Za-z0-9!#$%&'*+.^_`|~-]*$";

impl<const MIN: u64, const MAX: u64> JsonSchema for Integer<MIN, MAX> {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        format!("Integer_{MIN}_{MAX}").into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // In JSON Schema 2020-12 "integer" also matches 100.0, as the filters do.
        json_schema!({ "type": "integer", "minimum": MIN, "maximum": MAX })
    }
}

macro_rules! string_schema {
    ($t:ty, $name:literal, { $($schema:tt)* }) => {
        impl JsonSchema for $t {
            fn inline_schema() -> bool {
                true
            }
            fn schema_name() -> Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", $($schema)* })
            }
        }
    };
}

string_schema!(Duration, "Duration", { "pattern": DURATION_PATTERN, "examples": ["250ms", "1s", "1m30s"] });
string_schema!(Name, "Name", { "pattern": "^[A-Za-z0-9_.:-]{1,64}$" });
string_schema!(HeaderName, "HeaderName", { "minLength": 1, "pattern": HEADER_NAME_PATTERN });
string_schema!(NonEmpty, "NonEmpty", { "minLength": 1 });

impl JsonSchema for OneOrMany {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "OneOrMany".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "oneOf": [
                { "type": "string", "minLength": 1 },
                { "type": "array", "minItems": 1, "items": { "type": "string", "minLength": 1 } }
            ]
        })
    }
}

impl<T: JsonSchema> JsonSchema for super::NonEmptyList<T> {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        format!("NonEmptyList_{}", T::schema_name()).into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "array", "minItems": 1, "items": generator.subschema_for::<T>() })
    }
}

string_schema!(crate::matcher::PathSpec, "Path", { "pattern": "^/" });
string_schema!(crate::matcher::HostSpec, "Host", {
    "minLength": 1,
    "pattern": r"^(\*\.[^*]+|[^*]+)$"
});
string_schema!(crate::matcher::MethodSpec, "Method", { "pattern": "^[A-Za-z]+$" });

impl JsonSchema for crate::matcher::HeaderMatchSpec {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "HeaderMatch".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "oneOf": [
                { "type": "string", "description": "The exact value." },
                {
                    "type": "object",
                    "properties": { "present": { "type": "boolean" } },
                    "required": ["present"],
                    "additionalProperties": false
                }
            ]
        })
    }
}
