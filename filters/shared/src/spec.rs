//! Configuration read with serde: the "spec" types are the JSON shape (derived
//! `Deserialize`, unknown fields refused), each filter compiles its spec into the
//! `Config` its core uses. [`parse`] turns any problem into a [`ConfigError`]
//! whose path is the JSON path of the bad field (tracked by [`tree`], which
//! the spec types deserialize from).
//!
//! The scalar types here check what a JSON type alone cannot (ranges, names,
//! durations) while deserializing, so their errors carry the field's path too.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;

use crate::config::{ConfigError, LocalResponse};

/// Reads configuration bytes as handed to `on_configure` into the spec type
/// `S`. Empty bytes (what Istio sends for an empty `pluginConfig`) read as `{}`;
/// anything else must be a JSON object.
/// serde_json's recursion limit (128) stays on: a hostile nesting is refused.
pub fn parse<S: DeserializeOwned>(bytes: &[u8]) -> Result<S, ConfigError> {
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::at(
            "",
            format!(
                "{} bytes; at most {MAX_CONFIG_BYTES} bytes are read",
                bytes.len()
            ),
        ));
    }
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => parse_fragment(b"{}"),
        Some(b'{') => parse_fragment(bytes),
        Some(_) => Err(ConfigError::at("", format!("expected a JSON object{HINT}"))),
    }
}

/// Real configurations are a few KiB; a larger one is refused before parsing.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

/// Error messages quote the bad value; a hostile one is cut to this many bytes.
const MAX_MESSAGE_BYTES: usize = 300;

const HINT: &str = " (the configuration must be a JSON object; in Envoy YAML pass it as a \
                    google.protobuf.StringValue, not a Struct)";

/// Reads any JSON value into `S` (a part of a configuration, in tests).
pub fn parse_fragment<S: DeserializeOwned>(bytes: &[u8]) -> Result<S, ConfigError> {
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let tree = tree::read(&mut json).map_err(|e| syntax(&e))?;
    json.end().map_err(|e| syntax(&e))?;
    S::deserialize(&tree).map_err(error_of)
}

fn error_of(e: tree::Error) -> ConfigError {
    let tree::Error { path, mut message } = e;
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    ConfigError {
        path: path.strip_prefix('.').map(str::to_string).unwrap_or(path),
        message,
    }
}

fn syntax(e: &serde_json::Error) -> ConfigError {
    ConfigError {
        path: String::new(),
        message: format!("invalid JSON: {e}{HINT}"),
    }
}

/// An integer from `MIN` to `MAX`. Istio hands numbers over as doubles, so an
/// integral double (`100.0`) is accepted; `100.5` is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Integer<const MIN: u64, const MAX: u64>(pub u64);

impl<const MIN: u64, const MAX: u64> Integer<MIN, MAX> {
    pub fn get(self) -> u64 {
        self.0
    }
}

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Integer<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Bounded { min: MIN, max: MAX })
            .map(Integer)
    }
}

/// The visitor of every [`Integer`]: one type whatever the range, so its code
/// is in the module once, not once per range.
struct Bounded {
    min: u64,
    max: u64,
}

impl Bounded {
    fn out_of_range<E: de::Error>(&self, got: impl fmt::Display) -> E {
        E::custom(format_args!(
            "expected an integer from {} to {}, got {got}",
            self.min, self.max
        ))
    }
}

impl Visitor<'_> for Bounded {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an integer from {} to {}", self.min, self.max)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        if (self.min..=self.max).contains(&v) {
            Ok(v)
        } else {
            Err(self.out_of_range(v))
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(self.out_of_range(v)),
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        // Bounds are far below 2^53, so the casts below are exact.
        if v.fract() == 0.0 && v >= self.min as f64 && v <= self.max as f64 {
            Ok(v as u64)
        } else if v.fract() == 0.0 && v.is_finite() {
            Err(self.out_of_range(format_args!("{}", v as i64)))
        } else {
            // Printing an f64 would pull float formatting into every module.
            Err(self.out_of_range("a decimal number"))
        }
    }
}

/// A string the filter checks while reading it (a name, a header name, a duration).
pub trait Checked: Sized {
    /// What the value must look like, for type errors (`a duration like "1s"`).
    const EXPECTING: &'static str;
    fn check(text: &str) -> Result<Self, String>;
}

/// Deserializes a [`Checked`] string.
pub fn checked<'de, T: Checked, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    let text = d.deserialize_str(Text(T::EXPECTING))?;
    T::check(&text).map_err(de::Error::custom)
}

/// The visitor of every [`Checked`] string (one type, so its code is there once).
struct Text(&'static str);

impl Visitor<'_> for Text {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
}

macro_rules! checked_string {
    ($t:ty) => {
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::spec::checked(d)
            }
        }
    };
}
pub(crate) use checked_string;

/// A duration string: `"250ms"`, `"1s"`, `"1m30s"`, `"1.5s"` (see [`crate::duration`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub fn get(self) -> std::time::Duration {
        self.0
    }
    pub fn nanos(self) -> u64 {
        u64::try_from(self.0.as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Checked for Duration {
    const EXPECTING: &'static str = "a duration like \"1s\"";
    fn check(text: &str) -> Result<Self, String> {
        crate::duration::parse_duration(text).map(Duration)
    }
}
checked_string!(Duration);

/// A rule or target name: it appears in stats and headers, so a safe alphabet only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(pub String);

impl Checked for Name {
    const EXPECTING: &'static str = "a name (up to 64 letters, digits, '-', '_', '.', ':')";
    fn check(text: &str) -> Result<Self, String> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if ok {
            Ok(Name(text.to_string()))
        } else {
            Err(format!(
                "\"{text}\": use 1 to 64 letters, digits, '-', '_', '.', ':'"
            ))
        }
    }
}
checked_string!(Name);

/// A header name, lower-cased; refuses what Envoy would never match.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeaderName(pub String);

impl Checked for HeaderName {
    const EXPECTING: &'static str = "a header name";
    fn check(text: &str) -> Result<Self, String> {
        let ok = !text.is_empty()
            && text.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_alphanumeric()
                    || b"!#$%&'*+-.^_`|~".contains(&b)
                    || (i == 0 && b == b':')
            });
        if ok {
            Ok(HeaderName(text.to_ascii_lowercase()))
        } else {
            Err(format!("\"{text}\" is not a valid header name"))
        }
    }
}
checked_string!(HeaderName);

/// A string that is not empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonEmpty(pub String);

impl Checked for NonEmpty {
    const EXPECTING: &'static str = "a string";
    fn check(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            Err("must not be empty".into())
        } else {
            Ok(NonEmpty(text.to_string()))
        }
    }
}
checked_string!(NonEmpty);

/// A non-empty string or a non-empty list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                NonEmpty::check(v)
                    .map(|s| OneOrMany(vec![s.0]))
                    .map_err(E::custom)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(NonEmpty(s)) = seq.next_element()? {
                    items.push(s);
                }
                if items.is_empty() {
                    return Err(de::Error::custom("must not be an empty list"));
                }
                Ok(OneOrMany(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// A list with at least one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonEmptyList<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for NonEmptyList<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items = Vec::<T>::deserialize(d)?;
        if items.is_empty() {
            return Err(de::Error::custom("must not be an empty list"));
        }
        Ok(NonEmptyList(items))
    }
}

/// A JSON object read as its entries, in the order written; a key given twice
/// keeps its last value, as a map would. (A `BTreeMap` brings its tree code
/// into the module, 4 to 5 KiB per key and value types, for a few entries.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pairs<K, V>(pub Vec<(K, V)>);

impl<K, V> Default for Pairs<K, V> {
    fn default() -> Self {
        Pairs(Vec::new())
    }
}

impl<K, V> IntoIterator for Pairs<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'de, K: Deserialize<'de> + PartialEq, V: Deserialize<'de>> Deserialize<'de> for Pairs<K, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries<K, V>(std::marker::PhantomData<(K, V)>);
        impl<'de, K: Deserialize<'de> + PartialEq, V: Deserialize<'de>> Visitor<'de> for Entries<K, V> {
            type Value = Pairs<K, V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs: Vec<(K, V)> = Vec::new();
                while let Some((key, value)) = map.next_entry()? {
                    match pairs.iter_mut().find(|(k, _)| *k == key) {
                        Some(pair) => pair.1 = value,
                        None => pairs.push((key, value)),
                    }
                }
                Ok(Pairs(pairs))
            }
        }
        d.deserialize_map(Entries(std::marker::PhantomData))
    }
}

/// A filter's own answer as written: `{"status": 429, "body": "..."}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LocalResponseSpec {
    /// HTTP status of the local answer.
    pub status: Option<Integer<200, 599>>,
    /// Body of the local answer.
    pub body: Option<String>,
}

impl LocalResponseSpec {
    /// The answer, with the filter's defaults for what is absent.
    pub fn compile(spec: Option<LocalResponseSpec>, status: u32, body: &str) -> LocalResponse {
        let spec = spec.unwrap_or_default();
        LocalResponse {
            // Integer<200, 599> always fits a u32.
            status: spec.status.map_or(status, |s| s.get() as u32),
            body: spec.body.unwrap_or_else(|| body.to_string()),
        }
    }
}

/// Refuses a name given twice in a list: `what` is "rule", "target"...;
/// the error points at `<list_path>[i].name`.
pub fn unique_names<'a>(
    list_path: &str,
    what: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<(), ConfigError> {
    let mut seen: Vec<&str> = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        if seen.contains(&name) {
            return Err(ConfigError {
                path: format!("{list_path}[{i}].name"),
                message: format!("duplicate {what} name \"{name}\""),
            });
        }
        seen.push(name);
    }
    Ok(())
}

mod tree;

mod instances;
#[doc(hidden)]
pub use instances::compile_shared_readers;

#[cfg(feature = "schema")]
mod schema;
#[cfg(feature = "schema")]
pub use schema::{DURATION_PATTERN, HEADER_NAME_PATTERN};

/// The JSON Schema (2020-12) of a filter's configuration spec type `T`.
/// Optional fields are simply not required: the filters read a `null` as
/// absent, but the schema does not offer it.
#[cfg(feature = "schema")]
pub fn schema_for<T: schemars::JsonSchema>() -> schemars::Schema {
    let schema = schemars::generate::SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>();
    let mut value = schema.to_value();
    schema::drop_null(&mut value);
    schemars::Schema::try_from(value).unwrap_or_default()
}

#[cfg(test)]
mod tests;
