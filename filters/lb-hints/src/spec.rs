//! The lb-hints configuration as written (see DESIGN.md): the JSON shape,
//! read by serde; [`crate::config`] compiles it. A new field is one line here
//! plus its use in the compile step.

use serde::Deserialize;

use mesh_shared::matcher::MatchSpec;
use mesh_shared::request::SourceSpec;
use mesh_shared::spec::{Duration, HeaderName, Integer, LocalResponseSpec, Name, NonEmpty, Pairs};

use crate::config::MAX_WEIGHT;

/// The JSON Schema of [`ConfigSpec`] (committed as `schemas/<filter>.schema.json`).
#[cfg(feature = "schema")]
pub fn schema() -> schemars::Schema {
    mesh_shared::spec::schema_for::<ConfigSpec>()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(title = "lb-hints configuration"))]
#[serde(deny_unknown_fields)]
pub struct ConfigSpec {
    /// Tried in order; the first whose `match` holds applies.
    pub rules: Option<Vec<RuleSpec>>,
    /// The answer when no target has a weight above zero (default 503).
    pub response: Option<LocalResponseSpec>,
    /// Read the route's `mesh-filters` metadata to select a rule or switch the filter off.
    pub route_metadata: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: Name,
    #[serde(rename = "match")]
    pub matcher: Option<MatchSpec>,
    /// The routing header the choice is written into (default `x-mesh-target`).
    pub header: Option<HeaderName>,
    /// 1 to 64 targets.
    pub targets: Vec<TargetSpec>,
    /// Default `weighted_round_robin`.
    pub algorithm: Option<AlgorithmSpec>,
    /// Where the stickiness key comes from (a header or cookie, not a static value).
    pub sticky: Option<SourceSpec>,
    /// A request header that may name the target to force.
    #[serde(rename = "override")]
    pub override_header: Option<OverrideSpec>,
    /// Weight changes over time, in order of `after`.
    pub steps: Option<Vec<StepSpec>>,
    /// Canary analysis: the steps advance only while the canary is healthy.
    pub analysis: Option<AnalysisSpec>,
    /// Skip a target whose cluster's breaker is open.
    pub avoid_open_circuits: Option<bool>,
    /// No target with a weight above zero: `reject` (default) or `pass`.
    pub no_target: Option<NoTargetSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub name: Name,
    /// Default 1.
    pub weight: Option<Integer<0, MAX_WEIGHT>>,
    /// The cluster whose breaker counts for this target (default: the name).
    pub cluster: Option<NonEmpty>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmSpec {
    RoundRobin,
    WeightedRoundRobin,
    Random,
    WeightedRandom,
    LeastRequests,
    Sticky,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct OverrideSpec {
    pub header: HeaderName,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Offset from the configuration time.
    pub after: Duration,
    /// Target name -> weight; targets not named keep their weight.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "std::collections::BTreeMap<String, Integer<0, MAX_WEIGHT>>")
    )]
    pub weights: Pairs<String, Integer<0, MAX_WEIGHT>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum NoTargetSpec {
    Reject,
    Pass,
}

/// Largest `min_calls` and `failure_limit`.
pub const MAX_COUNT: u64 = 1_000_000_000;

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AnalysisSpec {
    /// The target judged: one of `targets`.
    pub canary: Name,
    /// Length of one judged interval (default 1m, at most 24h).
    pub interval: Option<Duration>,
    /// Calls an interval needs to be judged (default 20); fewer: inconclusive.
    pub min_calls: Option<Integer<1, MAX_COUNT>>,
    /// The interval fails above this share of failed calls (default 5).
    pub max_failure_rate_percent: Option<Integer<0, 100>>,
    /// A call whose response headers take this long or longer is slow.
    pub slow_call: Option<Duration>,
    /// The interval fails above this share of slow calls (default 100: off; needs `slow_call`).
    pub max_slow_rate_percent: Option<Integer<0, 100>>,
    /// Failed intervals tolerated before the rollback (default 0).
    pub failure_limit: Option<Integer<0, MAX_COUNT>>,
}
