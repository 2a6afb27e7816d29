//! Reading configuration with errors that name the JSON path of the bad field.
//!
//! Every filter reads its JSON through [`Node`]: each accessor either returns the
//! typed value or a [`ConfigError`] such as
//! `rules[2].limit.per: expected a duration like "1s", got "fast"`.
//! Objects are read through [`Fields`], which refuses fields nobody asked for,
//! so a typo in a field name never passes silently.

use std::fmt;
use std::time::Duration;

use crate::duration::parse_duration;
use crate::json::{self, Value};

/// A configuration problem at one place in the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// JSON path such as `rules[2].limit.per`; empty for the document itself.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "configuration: {}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Parses configuration bytes as handed to `on_configure`. Empty bytes (what
/// Istio sends for an empty `pluginConfig`) read as `{}`.
pub fn parse_document(bytes: &[u8]) -> Result<Value, ConfigError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Vec::new()));
    }
    json::parse(bytes).map_err(|e| ConfigError {
        path: String::new(),
        message: format!(
            "{e} (the configuration must be a JSON object; in Envoy YAML pass it as a \
             google.protobuf.StringValue, not a Struct)"
        ),
    })
}

/// A value in the document together with its JSON path.
#[derive(Debug, Clone)]
pub struct Node<'a> {
    value: &'a Value,
    path: String,
}

impl<'a> Node<'a> {
    pub fn root(value: &'a Value) -> Self {
        Node {
            value,
            path: String::new(),
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn value(&self) -> &'a Value {
        self.value
    }

    /// An error located at this node.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    fn expected(&self, what: &str) -> ConfigError {
        let got = match self.value {
            Value::String(s) => format!("\"{s}\""),
            // Formatting an f64 would pull ~15 KB of float printing into every
            // .wasm; an error message does not need the exact decimal.
            Value::Number(n) => match n.int {
                Some(i) => i.to_string(),
                None => "a decimal number".to_string(),
            },
            Value::Bool(b) => b.to_string(),
            other => other.kind().to_string(),
        };
        self.error(format!("expected {what}, got {got}"))
    }

    fn child(&self, value: &'a Value, segment: fmt::Arguments<'_>) -> Node<'a> {
        Node {
            value,
            path: format!("{}{}", self.path, segment),
        }
    }

    pub fn object(&self) -> Result<Fields<'a>, ConfigError> {
        match self.value {
            Value::Object(entries) => Ok(Fields {
                node: self.clone(),
                entries,
                known: Vec::new(),
            }),
            _ => Err(self.expected("an object")),
        }
    }

    pub fn list(&self) -> Result<Vec<Node<'a>>, ConfigError> {
        match self.value {
            Value::Array(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, v)| self.child(v, format_args!("[{i}]")))
                .collect()),
            _ => Err(self.expected("a list")),
        }
    }

    pub fn str(&self) -> Result<&'a str, ConfigError> {
        match self.value {
            Value::String(s) => Ok(s),
            _ => Err(self.expected("a string")),
        }
    }

    /// A string that is not empty.
    pub fn name(&self) -> Result<&'a str, ConfigError> {
        let s = self.str()?;
        if s.is_empty() {
            return Err(self.error("must not be empty"));
        }
        Ok(s)
    }

    pub fn bool(&self) -> Result<bool, ConfigError> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.expected("true or false")),
        }
    }

    /// An integer within `min..=max`.
    pub fn int_in(&self, min: i64, max: i64) -> Result<i64, ConfigError> {
        match self.value {
            Value::Number(n) => match n.int {
                Some(i) if (min..=max).contains(&i) => Ok(i),
                _ => Err(self.expected(&format!("an integer from {min} to {max}"))),
            },
            _ => Err(self.expected(&format!("an integer from {min} to {max}"))),
        }
    }

    /// A positive integer (at least 1) up to `max`.
    pub fn positive(&self, max: u64) -> Result<u64, ConfigError> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        // int_in only returns values within 1..=max, so the cast is lossless.
        self.int_in(1, max).map(|i| i as u64)
    }

    /// A number (integer or decimal) within `min..=max`.
    pub fn number_in(&self, min: f64, max: f64) -> Result<f64, ConfigError> {
        match self.value {
            Value::Number(n) if n.float >= min && n.float <= max => Ok(n.float),
            // Bounds are whole numbers in every use; see `expected` on f64 printing.
            _ => Err(self.expected(&format!("a number from {} to {}", min as i64, max as i64))),
        }
    }

    pub fn duration(&self) -> Result<Duration, ConfigError> {
        match self.value {
            Value::String(s) => parse_duration(s).map_err(|m| self.error(m)),
            _ => Err(self.expected("a duration like \"1s\"")),
        }
    }

    /// An HTTP status code a local reply may use.
    pub fn status(&self) -> Result<u32, ConfigError> {
        // int_in bounds the value to 200..=599.
        self.int_in(200, 599).map(|s| s as u32)
    }

    /// A header name: lower-cased; refuses what Envoy would never match.
    pub fn header_name(&self) -> Result<String, ConfigError> {
        let s = self.name()?;
        let ok = s.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b) || (i == 0 && b == b':')
        });
        if !ok {
            return Err(self.error(format!("\"{s}\" is not a valid header name")));
        }
        Ok(s.to_ascii_lowercase())
    }

    /// A string or a list of strings, as a list.
    pub fn one_or_many_str(&self) -> Result<Vec<String>, ConfigError> {
        match self.value {
            Value::String(_) => Ok(vec![self.name()?.to_string()]),
            Value::Array(_) => {
                let items = self.list()?;
                if items.is_empty() {
                    return Err(self.error("must not be an empty list"));
                }
                items.iter().map(|n| n.name().map(str::to_string)).collect()
            }
            _ => Err(self.expected("a string or a list of strings")),
        }
    }
}

/// A filter's own answer (ratelimit's 429, circuit-breaker's 503...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub body: String,
}

impl LocalResponse {
    /// Reads `{"status": ..., "body": ...}`; what is absent takes the default.
    pub fn parse(
        node: Option<Node<'_>>,
        status: u32,
        body: &str,
    ) -> Result<LocalResponse, ConfigError> {
        let mut response = LocalResponse {
            status,
            body: body.to_string(),
        };
        if let Some(node) = node {
            let mut f = node.object()?;
            if let Some(n) = f.optional("status") {
                response.status = n.status()?;
            }
            if let Some(n) = f.optional("body") {
                response.body = n.str()?.to_string();
            }
            f.finish()?;
        }
        Ok(response)
    }
}

/// A rule or target name: it appears in stats and headers, so a safe alphabet only.
pub fn safe_name(node: &Node<'_>) -> Result<String, ConfigError> {
    let name = node.name()?;
    let ok = name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !ok {
        return Err(node.error(format!(
            "\"{name}\": use up to 64 letters, digits, '-', '_', '.', ':'"
        )));
    }
    Ok(name.to_string())
}

/// Reads the `rules` list (absent: none) with `parse(rule, index)`, refusing
/// two rules of the same name (`name_of` gives a parsed rule's name).
pub fn rules<R>(
    node: Option<Node<'_>>,
    mut parse: impl FnMut(&Node<'_>, usize) -> Result<R, ConfigError>,
    name_of: impl Fn(&R) -> &str,
) -> Result<Vec<R>, ConfigError> {
    let mut rules: Vec<R> = Vec::new();
    let Some(node) = node else {
        return Ok(rules);
    };
    for (index, item) in node.list()?.iter().enumerate() {
        let rule = parse(item, index)?;
        if rules.iter().any(|r| name_of(r) == name_of(&rule)) {
            return Err(ConfigError {
                path: format!("{}.name", item.path()),
                message: format!("duplicate rule name \"{}\"", name_of(&rule)),
            });
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// The fields of one object; ask for each known field, then call [`Fields::finish`].
pub struct Fields<'a> {
    node: Node<'a>,
    entries: &'a [(String, Value)],
    known: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    pub fn node(&self) -> &Node<'a> {
        &self.node
    }

    fn field_path(&self, name: &str) -> String {
        if self.node.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.node.path)
        }
    }

    /// The field if present (a JSON `null` counts as absent).
    pub fn optional(&mut self, name: &'static str) -> Option<Node<'a>> {
        self.known.push(name);
        let value = self
            .entries
            .iter()
            .find(|(k, v)| k == name && *v != Value::Null)
            .map(|(_, v)| v)?;
        Some(Node {
            value,
            path: self.field_path(name),
        })
    }

    /// An optional `true`/`false` field.
    pub fn flag(&mut self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        self.optional(name).map_or(Ok(default), |n| n.bool())
    }

    pub fn required(&mut self, name: &'static str) -> Result<Node<'a>, ConfigError> {
        self.optional(name).ok_or_else(|| ConfigError {
            path: self.field_path(name),
            message: "is required".into(),
        })
    }

    /// Every field, for objects whose keys are data (header name -> value).
    pub fn entries(self) -> Vec<(&'a str, Node<'a>)> {
        self.entries
            .iter()
            .filter(|(_, v)| *v != Value::Null)
            .map(|(k, v)| {
                (
                    k.as_str(),
                    Node {
                        value: v,
                        path: self.field_path(k),
                    },
                )
            })
            .collect()
    }

    /// Refuses any field that was not asked for.
    pub fn finish(self) -> Result<(), ConfigError> {
        for (key, _) in self.entries {
            if !self.known.contains(&key.as_str()) {
                let mut known = self.known.clone();
                known.sort_unstable();
                known.dedup();
                return Err(ConfigError {
                    path: self.field_path(key),
                    message: format!("unknown field (expected one of: {})", known.join(", ")),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Value {
        parse_document(text.as_bytes()).unwrap()
    }

    #[test]
    fn paths_name_the_bad_field() {
        let v = doc(r#"{"rules": [{"limit": {"per": "1s"}}, {"limit": {"per": "fast"}}]}"#);
        let mut top = Node::root(&v).object().unwrap();
        let rules = top.required("rules").unwrap().list().unwrap();
        let mut rule = rules[1].object().unwrap();
        let mut limit = rule.required("limit").unwrap().object().unwrap();
        let err = limit.required("per").unwrap().duration().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"rules[1].limit.per: expected a duration like "1s", got "fast""#
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let v = doc(r#"{"rules": [], "max_kyes": 3}"#);
        let mut top = Node::root(&v).object().unwrap();
        let _ = top.optional("rules");
        let _ = top.optional("max_keys");
        let err = top.finish().unwrap_err();
        assert_eq!(err.path, "max_kyes");
        assert_eq!(
            err.message,
            "unknown field (expected one of: max_keys, rules)"
        );
    }

    #[test]
    fn type_errors_say_what_was_found() {
        let v = doc(r#"{"n": -3, "s": 4, "b": "yes"}"#);
        let mut top = Node::root(&v).object().unwrap();
        assert_eq!(
            top.required("n")
                .unwrap()
                .positive(100)
                .unwrap_err()
                .to_string(),
            "n: expected an integer from 1 to 100, got -3"
        );
        assert_eq!(
            top.required("s").unwrap().str().unwrap_err().to_string(),
            "s: expected a string, got 4"
        );
        assert_eq!(
            top.required("b").unwrap().bool().unwrap_err().to_string(),
            "b: expected true or false, got \"yes\""
        );
        assert_eq!(top.required("x").unwrap_err().to_string(), "x: is required");
    }

    #[test]
    fn empty_bytes_are_an_empty_object() {
        assert_eq!(parse_document(b"").unwrap(), Value::Object(vec![]));
        assert_eq!(parse_document(b" \n").unwrap(), Value::Object(vec![]));
    }

    #[test]
    fn protobuf_bytes_get_a_hint() {
        let err = parse_document(b"\x0a\x05rules").unwrap_err();
        assert!(err.to_string().contains("StringValue"), "{err}");
    }

    #[test]
    fn header_names_are_checked_and_lowercased() {
        let v = doc(r#"["X-Api-Key", "bad header", ":authority"]"#);
        let items = Node::root(&v).list().unwrap();
        assert_eq!(items[0].header_name().unwrap(), "x-api-key");
        assert!(items[1].header_name().is_err());
        assert_eq!(items[2].header_name().unwrap(), ":authority");
    }
}
