//! The readers of the spec types every filter uses, compiled here once.
//!
//! A generic function is compiled into each crate that uses it with new type
//! arguments; at `opt-level = "z"` rustc shares generics, so a crate links an
//! instance an upstream crate already compiled instead of compiling its own.
//! The filter crates are siblings, so without this each compiled its own
//! reader of `MatchSpec`, `LocalResponseSpec`, `SourceSpec`, `Option<bool>`...
//! and the suite, which links all four, carried up to four copies (their
//! string constants differ, so wasm-opt cannot merge them). Reading
//! [`Fields`] here makes these instances mesh-shared's own. Nothing calls
//! [`compile_shared_readers`]; the linker drops it.

use serde::Deserialize;

use super::{Duration, HeaderName, LocalResponseSpec, Name, NonEmpty};
use crate::matcher::MatchSpec;
use crate::request::SourceSpec;

/// Every field type two or more filters' specs have.
#[derive(Deserialize)]
#[allow(dead_code)] // read only to compile its field readers
struct Fields {
    name: Name,
    option_name: Option<Name>,
    flag: Option<bool>,
    text: String,
    duration: Duration,
    option_duration: Option<Duration>,
    header: HeaderName,
    option_header: Option<HeaderName>,
    non_empty: NonEmpty,
    option_non_empty: Option<NonEmpty>,
    matcher: Option<MatchSpec>,
    response: Option<LocalResponseSpec>,
    source: Option<SourceSpec>,
    sources: Option<Vec<SourceSpec>>,
}

/// See the module comment: compiled for its instances, never called.
#[doc(hidden)]
pub fn compile_shared_readers(bytes: &[u8]) -> bool {
    super::parse_fragment::<Fields>(bytes).is_ok()
}
