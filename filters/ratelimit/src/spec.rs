//! The ratelimit configuration as written (see DESIGN.md): the JSON shape,
//! read by serde; [`crate::config`] compiles it. A new field is one line here
//! plus its use in the compile step.

use serde::Deserialize;

use mesh_shared::matcher::MatchSpec;
use mesh_shared::request::SourceSpec;
use mesh_shared::spec::{Duration, Integer, LocalResponseSpec, Name, NonEmpty};

use crate::config::MAX_MAX_KEYS;
use crate::global::MAX_BATCH;

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
    /// The limit in this Envoy; with `global`, the local pre-check.
    pub limit: Option<LimitSpec>,
    /// Share the limit among every Envoy through an RLS v3 service.
    pub global: Option<GlobalSpec>,
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

/// A rule's `global` block (docs/ratelimit.md "Global rate limiting").
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct GlobalSpec {
    /// The Envoy cluster (HTTP/2) of the RLS server.
    pub service: NonEmpty,
    /// The RLS domain.
    pub domain: Name,
    /// How long a call may take, 1ms to 10s (default 20ms).
    pub timeout: Option<Duration>,
    /// When the call fails: `allow` (default) or `deny`.
    pub failure_mode: Option<FailureModeSpec>,
    /// The `deny` answer (default 503 `rate limit service unavailable`).
    pub failure_response: Option<LocalResponseSpec>,
    /// Descriptors per call, 1 to 1000 (default 1: every request its own
    /// call). Above 1, requests that need a call while one is in flight on
    /// the worker go together in the next call, one descriptor each.
    pub max_batch: Option<Integer<1, MAX_BATCH>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailureModeSpec {
    Allow,
    Deny,
}
