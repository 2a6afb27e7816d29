//! mesh-filters suite: the four policies in one module, one VM and one pass
//! over each request, in the order metrics -> ratelimit -> lb-hints ->
//! circuit-breaker (`docs/suite.md`).
//!
//! The configuration holds each filter's own configuration, unchanged, under
//! its name; a missing part is off. This crate only reads that document
//! ([`Config`], plain Rust) and runs the filters' parts (`filter.rs`, wasm32
//! only); the policies are the filters' own crates.

use mesh_shared::request::HeaderNames;
use mesh_shared::{spec, ConfigError};
use serde::Deserialize;

#[cfg(target_arch = "wasm32")]
mod filter;

/// The configuration as written: each part's spec is the filter's own.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(title = "suite configuration"))]
#[serde(deny_unknown_fields)]
pub struct ConfigSpec {
    /// metrics' configuration; absent: no metrics.
    pub metrics: Option<metrics::spec::ConfigSpec>,
    /// ratelimit's configuration; absent: no rate limiting.
    pub ratelimit: Option<ratelimit::spec::ConfigSpec>,
    /// lb-hints' configuration; absent: no target choice.
    pub lb_hints: Option<lb_hints::spec::ConfigSpec>,
    /// circuit-breaker's configuration; absent: no breakers.
    pub circuit_breaker: Option<circuit_breaker::spec::ConfigSpec>,
}

/// The JSON Schema of the suite's configuration.
#[cfg(feature = "schema")]
pub fn schema() -> schemars::Schema {
    mesh_shared::spec::schema_for::<ConfigSpec>()
}

/// The compiled parts; `None` is off.
#[derive(Debug, Clone)]
pub struct Config {
    pub metrics: Option<metrics::Config>,
    pub ratelimit: Option<ratelimit::Config>,
    pub lb_hints: Option<lb_hints::Config>,
    pub circuit_breaker: Option<circuit_breaker::Config>,
}

impl Config {
    /// Parses the plugin configuration; `scope` (the plugin name) names this
    /// instance in every part's shared-data keys, as in the filters' own.
    pub fn parse(bytes: &[u8], scope: &str) -> Result<Config, ConfigError> {
        Config::compile(spec::parse(bytes)?, scope)
    }

    /// Adds the request headers the parts may read per request (a header
    /// two parts read counts once: the suite reads it once).
    pub fn request_headers(&self, names: &mut HeaderNames) {
        if let Some(c) = &self.metrics {
            c.labels.request_headers(names);
        }
        if let Some(c) = &self.ratelimit {
            c.request_headers(names);
        }
        if let Some(c) = &self.lb_hints {
            c.request_headers(names);
        }
        if let Some(c) = &self.circuit_breaker {
            c.request_headers(names);
        }
    }

    pub fn compile(spec: ConfigSpec, scope: &str) -> Result<Config, ConfigError> {
        Ok(Config {
            metrics: spec
                .metrics
                .map(metrics::Config::compile)
                .transpose()
                .map_err(|e| within("metrics", e))?,
            ratelimit: spec
                .ratelimit
                .map(|s| ratelimit::Config::compile(s, scope))
                .transpose()
                .map_err(|e| within("ratelimit", e))?,
            lb_hints: spec
                .lb_hints
                .map(|s| lb_hints::Config::compile(s, scope))
                .transpose()
                .map_err(|e| within("lb_hints", e))?,
            circuit_breaker: spec
                .circuit_breaker
                .map(|s| circuit_breaker::Config::compile(s, scope))
                .transpose()
                .map_err(|e| within("circuit_breaker", e))?,
        })
    }
}

/// Puts a part's error under the part's name (`ratelimit.rules[0]...`).
/// Not inlined: one copy for the four parts (the suite's size budget).
#[inline(never)]
fn within(part: &str, e: ConfigError) -> ConfigError {
    let dot = if e.path.is_empty() || e.path.starts_with('[') {
        ""
    } else {
        "."
    };
    ConfigError::at(format!("{part}{dot}{}", e.path), e.message)
}

#[cfg(test)]
mod tests;
