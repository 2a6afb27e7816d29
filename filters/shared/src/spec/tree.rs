//! The configuration is read in two steps: serde_json parses the text into a
//! [`Json`] tree, then the spec types deserialize from the tree, which tracks
//! the JSON path and gives each error the path of the field it came from.
//!
//! Written here rather than taken from `serde_path_to_error` because of module
//! size (BENCHMARKS.md "Sizes"): that crate wraps serde_json's deserializer, so
//! every spec type's visitor was compiled twice (about 31 KiB after wasm-opt).
//! Here every visitor is compiled once, against this one deserializer, and the
//! error type is our own, so serde's float printing (core's float formatting,
//! which serde_json's type errors reach) stays out of the modules.

use std::cell::Cell;
use std::fmt;

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, DeserializeSeed, Deserializer, Expected, Unexpected, Visitor};
use serde::forward_to_deserialize_any;

/// Deeper levels are skipped (serde_json skips them without recursion) and
/// refused if a spec type ever reaches them; no filter's spec is this deep,
/// and serde_json's own recursion limit (128) is never met.
const MAX_DEPTH: u32 = 64;

/// A parsed JSON value; objects keep their keys in order, duplicates included
/// (the spec types refuse a field given twice).
pub(crate) enum Json {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
    TooDeep,
}

/// Parses a value with serde_json (any error is a syntax error: every JSON value is a tree).
pub(crate) fn read(
    json: &mut serde_json::Deserializer<serde_json::de::SliceRead<'_>>,
) -> Result<Json, serde_json::Error> {
    Reader { depth: 0 }.deserialize(json)
}

struct Reader {
    depth: u32,
}

impl<'de> DeserializeSeed<'de> for Reader {
    type Value = Json;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        if self.depth > MAX_DEPTH {
            d.deserialize_ignored_any(de::IgnoredAny)?;
            return Ok(Json::TooDeep);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Reader {
    type Value = Json;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json, E> {
        Ok(Json::U64(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Json, E> {
        Ok(Json::I64(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
        Ok(Json::F64(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json, E> {
        Ok(Json::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Json, E> {
        Ok(Json::Str(v))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Reader {
            depth: self.depth + 1,
        })? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(Reader {
                depth: self.depth + 1,
            })?;
            entries.push((key, value));
        }
        Ok(Json::Object(entries))
    }
}

/// A data error with the JSON path of where it happened (`.rules[0].name`).
#[derive(Debug)]
pub(crate) struct Error {
    pub path: String,
    pub message: String,
}

impl Error {
    /// An error at the value being read now: the path is taken when the
    /// error is made, so no reader has to look at the results it passes on
    /// (which would cost a copy of every value, in the code of every type).
    #[cold]
    #[inline(never)]
    fn new(message: String) -> Error {
        let path = PATH.with(|p| {
            let path = p.take();
            let copy = path.clone();
            p.set(path);
            copy
        });
        Error { path, message }
    }
}

thread_local! {
    /// The JSON path of the value being read (`.rules[0].name`).
    static PATH: Cell<String> = const { Cell::new(String::new()) };
}

/// The path extended for one nested value while it is read; the old path is
/// back when this is dropped.
struct Within {
    len: usize,
}

impl Within {
    #[inline(never)]
    fn field(key: &str) -> Within {
        Within::extend(|path| {
            path.push('.');
            path.push_str(key);
        })
    }

    #[inline(never)]
    fn item(index: usize) -> Within {
        Within::extend(|path| {
            path.push('[');
            path.push_str(&index.to_string());
            path.push(']');
        })
    }

    fn extend(add: impl FnOnce(&mut String)) -> Within {
        PATH.with(|p| {
            let mut path = p.take();
            let len = path.len();
            add(&mut path);
            p.set(path);
            Within { len }
        })
    }
}

impl Drop for Within {
    #[inline(never)]
    fn drop(&mut self) {
        PATH.with(|p| {
            let mut path = p.take();
            path.truncate(self.len);
            p.set(path);
        });
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(message: T) -> Error {
        Error::new(message.to_string())
    }
    fn invalid_type(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Error {
        Error::custom(format_args!(
            "invalid type: {}, expected {expected}",
            Shown(unexpected)
        ))
    }
    fn invalid_value(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Error {
        Error::custom(format_args!(
            "invalid value: {}, expected {expected}",
            Shown(unexpected)
        ))
    }
}

/// serde's wording of an unexpected value, except that a decimal number is not
/// printed (printing an f64 would pull float formatting into every module).
struct Shown<'a>(Unexpected<'a>);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Unexpected::Bool(b) => write!(f, "boolean `{b}`"),
            Unexpected::Unsigned(n) => write!(f, "integer `{n}`"),
            Unexpected::Signed(n) => write!(f, "integer `{n}`"),
            // Integral values (Istio's `100.0`) are exact below 2^53.
            Unexpected::Float(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
                write!(f, "floating point `{}.0`", n as i64)
            }
            Unexpected::Float(_) => f.write_str("a decimal number"),
            // Quoted, not escaped: str's Debug would bring Unicode tables along.
            Unexpected::Str(s) => write!(f, "string \"{s}\""),
            Unexpected::Unit => f.write_str("null"),
            Unexpected::Seq => f.write_str("sequence"),
            Unexpected::Map => f.write_str("map"),
            Unexpected::Char(c) => write!(f, "character `{c}`"),
            Unexpected::Bytes(_) => f.write_str("byte array"),
            Unexpected::Option => f.write_str("Option value"),
            Unexpected::NewtypeStruct => f.write_str("newtype struct"),
            Unexpected::Enum => f.write_str("enum"),
            Unexpected::UnitVariant => f.write_str("unit variant"),
            Unexpected::NewtypeVariant => f.write_str("newtype variant"),
            Unexpected::TupleVariant => f.write_str("tuple variant"),
            Unexpected::StructVariant => f.write_str("struct variant"),
            Unexpected::Other(other) => f.write_str(other),
        }
    }
}

impl Json {
    fn unexpected(&self) -> Unexpected<'_> {
        match self {
            Json::Null => Unexpected::Unit,
            Json::Bool(b) => Unexpected::Bool(*b),
            Json::U64(n) => Unexpected::Unsigned(*n),
            Json::I64(n) => Unexpected::Signed(*n),
            Json::F64(n) => Unexpected::Float(*n),
            Json::Str(s) => Unexpected::Str(s),
            Json::Array(_) => Unexpected::Seq,
            Json::Object(_) => Unexpected::Map,
            Json::TooDeep => Unexpected::Other("a value nested too deeply"),
        }
    }

    /// The error `deserialize_any` gives a visitor that takes no value of
    /// this JSON type (through the visitor's default `visit_*` methods).
    #[cold]
    #[inline(never)]
    fn mismatch(&self, expected: &dyn Expected) -> Error {
        match self {
            Json::TooDeep => too_deep(),
            other => de::Error::invalid_type(other.unexpected(), expected),
        }
    }
}

#[cold]
#[inline(never)]
fn too_deep() -> Error {
    de::Error::custom(format_args!("nested more than {MAX_DEPTH} levels deep"))
}

impl<'de> Deserializer<'de> for &'de Json {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Json::Null => visitor.visit_unit(),
            Json::Bool(b) => visitor.visit_bool(*b),
            Json::U64(n) => visitor.visit_u64(*n),
            Json::I64(n) => visitor.visit_i64(*n),
            Json::F64(n) => visitor.visit_f64(*n),
            Json::Str(s) => visitor.visit_borrowed_str(s),
            Json::Array(items) => visit_array(items, visitor),
            Json::Object(entries) => visit_object(entries, visitor),
            Json::TooDeep => Err(too_deep()),
        }
    }

    // The types below read one JSON type only: what `deserialize_any` would
    // do, without compiling every `visit_*` of every such visitor.

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Json::Bool(b) => visitor.visit_bool(*b),
            other => Err(other.mismatch(&visitor)),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Json::Str(s) => visitor.visit_borrowed_str(s),
            other => Err(other.mismatch(&visitor)),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Json::Null => visitor.visit_unit(),
            other => Err(other.mismatch(&visitor)),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Json::Array(items) => visit_array(items, visitor),
            other => Err(other.mismatch(&visitor)),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Json::Object(entries) => visit_object(entries, visitor),
            other => Err(other.mismatch(&visitor)),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Json::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    /// `"name"` for a unit variant, `{"name": value}` for the others.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self {
            Json::Str(s) => visitor.visit_enum(BorrowedStrDeserializer::new(s)),
            Json::Object(entries) => match entries.as_slice() {
                [entry] => visitor.visit_enum(Variant(entry)),
                _ => Err(de::Error::invalid_value(
                    Unexpected::Map,
                    &"a map with exactly one key",
                )),
            },
            other => Err(de::Error::invalid_type(other.unexpected(), &visitor)),
        }
    }

    /// A struct is an object only (serde would also read one from the list
    /// of its fields): the error names the place, and the modules do not carry
    /// a second reader per struct.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self {
            Json::Object(entries) => visit_object(entries, visitor),
            other => Err(de::Error::invalid_type(other.unexpected(), &visitor)),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char
        bytes byte_buf unit_struct tuple tuple_struct identifier
    }
}

fn visit_array<'de, V: Visitor<'de>>(items: &'de [Json], visitor: V) -> Result<V::Value, Error> {
    let mut seq = Items {
        items: items.iter(),
        index: 0,
    };
    let value = visitor.visit_seq(&mut seq)?;
    all_read(seq.items.len(), "fewer elements in array")?;
    Ok(value)
}

fn visit_object<'de, V: Visitor<'de>>(
    entries: &'de [(String, Json)],
    visitor: V,
) -> Result<V::Value, Error> {
    let mut map = Entries {
        entries: entries.iter(),
        value: None,
    };
    let value = visitor.visit_map(&mut map)?;
    all_read(map.entries.len(), "fewer elements in map")?;
    Ok(value)
}

/// A visitor that stops early leaves `left` items unread: refused.
fn all_read(left: usize, expected: &'static str) -> Result<(), Error> {
    match left {
        0 => Ok(()),
        _ => Err(de::Error::custom(format_args!(
            "{left} more than expected, {expected}"
        ))),
    }
}

struct Items<'de> {
    items: std::slice::Iter<'de, Json>,
    index: usize,
}

impl<'de> de::SeqAccess<'de> for Items<'de> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let _within = Within::item(self.index);
        self.index += 1;
        seed.deserialize(item).map(Some)
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Entries<'de> {
    entries: std::slice::Iter<'de, (String, Json)>,
    value: Option<&'de (String, Json)>,
}

impl<'de> de::MapAccess<'de> for Entries<'de> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(entry) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some(entry);
        let _within = Within::field(&entry.0);
        seed.deserialize(BorrowedStrDeserializer::<Error>::new(&entry.0))
            .map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        match self.value.take() {
            Some((key, value)) => {
                let _within = Within::field(key);
                seed.deserialize(value)
            }
            None => Err(de::Error::custom(
                "a map value was asked for before its key",
            )),
        }
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// The one entry of `{"variant": value}`.
struct Variant<'de>(&'de (String, Json));

impl<'de> de::EnumAccess<'de> for Variant<'de> {
    type Error = Error;
    type Variant = Self;
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Error> {
        let name = seed.deserialize(BorrowedStrDeserializer::<Error>::new(&self.0 .0))?;
        Ok((name, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'de> {
    type Error = Error;
    fn unit_variant(self) -> Result<(), Error> {
        let (key, value) = self.0;
        let _within = Within::field(key);
        de::Deserialize::deserialize(value)
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        let (key, value) = self.0;
        let _within = Within::field(key);
        seed.deserialize(value)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        let (key, value) = self.0;
        let _within = Within::field(key);
        value.deserialize_seq(visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let (key, value) = self.0;
        let _within = Within::field(key);
        value.deserialize_map(visitor)
    }
}
