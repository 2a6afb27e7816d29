//! The ratelimit configuration as written (see DESIGN.md): the JSON shape,
//! read by serde; [`crate::config`] compiles it. A new field is one line here
//! plus its use in the compile step.

use serde::Deserialize;

use mesh_shared::matcher::MatchSpec;
use mesh_shared::request::SourceSpec;
use mesh_shared::spec::{Duration, Integer, LocalResponseSpec, Name};

use crate::config::MAX_MAX_KEYS;

/// The JSON Schema of [`ConfigSpec`] (committed as `schemas/<filter>.schema.json`).
#[cfg(feature = "schema")]
pub fn schema() -> schemars::Schema {
    mesh_shared::spec::schema_for::<ConfigSpec>()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(title = "ratelimit configuration"))]
#[serde(deny_unknown_fields)]
pub struct ConfigSpec {
    /// Tried in order; the first whose `match` holds applies.
    pub rules: Option<Vec<RuleSpec>>,
    /// The rejection (default 429 `rate limited`).
    pub response: Option<LocalResponseSpec>,
    /// Rate-limit headers on rejections (default `draft`).
    pub headers: Option<HeaderStyleSpec>,
    /// Also put the rate-limit headers on answers that were let through.
    pub headers_on_allowed: Option<bool>,
    /// Read the route's `mesh-filters` metadata to select a rule or switch the filter off.
    pub route_metadata: Option<bool>,
    /// Live keys per rule (default 100000).
    pub max_keys: Option<Integer<1, MAX_MAX_KEYS>>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: Name,
    #[serde(rename = "match")]
    pub matcher: Option<MatchSpec>,
    /// Parts of the key; none: one bucket for the rule.
    pub key: Option<Vec<SourceSpec>>,
    pub limit: LimitSpec,
    /// When a key part is missing: `skip` the rule (default), `deny`, or `{"static": value}`.
    pub on_missing_key: Option<MissingKeySpec>,
    /// Count but never reject.
    pub shadow: Option<bool>,
    /// Live keys of this rule (default: the top-level `max_keys`).
    pub max_keys: Option<Integer<1, MAX_MAX_KEYS>>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    pub requests: Integer<1, 1_000_000_000>,
    pub per: Duration,
    /// Requests allowed at once (default: `requests`).
    pub burst: Option<Integer<1, 1_000_000_000>>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum MissingKeySpec {
    Skip,
    Deny,
    Static(String),
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum HeaderStyleSpec {
    #[serde(rename = "draft")]
    Draft,
    #[serde(rename = "x-ratelimit")]
    XRateLimit,
    #[serde(rename = "none")]
    None,
}
