//! The ratelimit configuration (see DESIGN.md) read into a compiled [`Config`].

use std::time::Duration;

use mesh_shared::config::{ConfigError, LocalResponse};
use mesh_shared::hash::KeyHasher;
use mesh_shared::spec::{self, unique_names, Integer, LocalResponseSpec};
use mesh_shared::{Matcher, Source};

use crate::gcra::Gcra;
use crate::spec::{ConfigSpec, HeaderStyleSpec, MissingKeySpec, RuleSpec};
use crate::table::KeyTable;

pub const DEFAULT_MAX_KEYS: u64 = 100_000;
/// Upper bound for `max_keys`: 10M slots are 160 MB of shared data per rule.
pub const MAX_MAX_KEYS: u64 = 10_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub rules: Vec<Rule>,
    pub response: Response,
    pub headers: HeaderStyle,
    /// Also put the rate-limit headers on answers that were let through.
    pub headers_on_allowed: bool,
    /// Read the route's `mesh-filters` metadata (one property read per
    /// request) to select a rule or switch the filter off per route.
    pub route_metadata: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub matcher: Matcher,
    /// Parts of the key; empty means one bucket for the whole rule.
    pub key: Vec<Source>,
    pub limit: Limit,
    pub gcra: Gcra,
    pub on_missing_key: MissingKey,
    pub shadow: bool,
    pub table: KeyTable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub requests: u64,
    pub per: Duration,
    pub burst: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MissingKey {
    /// The rule does not apply; the next matching rule is tried.
    Skip,
    /// Answer with the rejection response.
    Deny,
    /// Use this value for the missing part (all such requests share buckets).
    Static(String),
}

/// The local answer (the shared shape).
pub type Response = LocalResponse;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStyle {
    /// IETF draft: `RateLimit-Policy` and `RateLimit`.
    Draft,
    /// `x-ratelimit-limit`, `x-ratelimit-remaining`, `x-ratelimit-reset`.
    XRateLimit,
    None,
}

impl Config {
    /// Parses the plugin configuration. `scope` names this filter instance in
    /// shared-data keys (the Envoy plugin name), so two instances with the
    /// same `vm_id` and different names never share buckets.
    pub fn parse(bytes: &[u8], scope: &str) -> Result<Config, ConfigError> {
        Config::compile(spec::parse(bytes)?, scope)
    }

    pub fn compile(spec: ConfigSpec, scope: &str) -> Result<Config, ConfigError> {
        let max_keys = spec.max_keys.map_or(DEFAULT_MAX_KEYS, Integer::get);
        let rules: Vec<Rule> = spec
            .rules
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(index, rule)| compile_rule(rule, index, scope, max_keys))
            .collect::<Result<_, _>>()?;
        unique_names("rules", "rule", rules.iter().map(|r| r.name.as_str()))?;
        Ok(Config {
            rules,
            response: LocalResponseSpec::compile(spec.response, 429, "rate limited\n"),
            headers: match spec.headers {
                None | Some(HeaderStyleSpec::Draft) => HeaderStyle::Draft,
                Some(HeaderStyleSpec::XRateLimit) => HeaderStyle::XRateLimit,
                Some(HeaderStyleSpec::None) => HeaderStyle::None,
            },
            headers_on_allowed: spec.headers_on_allowed.unwrap_or(false),
            route_metadata: spec.route_metadata.unwrap_or(false),
        })
    }
}

fn compile_rule(
    spec: RuleSpec,
    index: usize,
    scope: &str,
    default_max_keys: u64,
) -> Result<Rule, ConfigError> {
    let name = spec.name.0;
    let key: Vec<Source> = spec
        .key
        .unwrap_or_default()
        .into_iter()
        .map(Source::from)
        .collect();
    let per = spec.limit.per.get();
    let per_path = || format!("rules[{index}].limit.per");
    if per.is_zero() {
        return Err(ConfigError::at(per_path(), "must be longer than 0s"));
    }
    if per > Duration::from_secs(366 * 86_400) {
        return Err(ConfigError::at(per_path(), "must be at most a year"));
    }
    let requests = spec.limit.requests.get();
    let limit = Limit {
        requests,
        per,
        burst: spec.limit.burst.map_or(requests, Integer::get),
    };
    let on_missing_key = match spec.on_missing_key {
        None | Some(MissingKeySpec::Skip) => MissingKey::Skip,
        Some(MissingKeySpec::Deny) => MissingKey::Deny,
        Some(MissingKeySpec::Static(v)) => MissingKey::Static(v),
    };
    let gcra = Gcra::new(limit.requests, limit.per, limit.burst);
    // A rule without a key has exactly one bucket.
    let max_keys = if key.is_empty() {
        1
    } else {
        spec.max_keys.map_or(default_max_keys, Integer::get)
    };
    // Buckets are keyed by everything that gives their numbers meaning, so a
    // changed limit starts from fresh buckets instead of misreading old ones.
    let prefix = format!(
        "mesh.rl.{scope}.{index}.{:016x}.",
        identity(&name, &key, &gcra, max_keys)
    );
    Ok(Rule {
        name,
        matcher: Matcher::compile(spec.matcher),
        key,
        limit,
        gcra,
        on_missing_key,
        shadow: spec.shadow.unwrap_or(false),
        table: KeyTable::new(prefix, max_keys),
    })
}

/// A hash of everything that gives a rule's buckets their meaning.
fn identity(name: &str, key: &[Source], gcra: &Gcra, max_keys: u64) -> u64 {
    let mut h = KeyHasher::new();
    h.part(name.as_bytes());
    for part in key {
        let (kind, value) = match part {
            Source::Header(n) => ("header", n.as_str()),
            Source::Cookie(n) => ("cookie", n.as_str()),
            Source::Static(v) => ("static", v.as_str()),
            Source::Attribute(a) => ("attribute", a.name()),
        };
        h.part(kind.as_bytes());
        h.part(value.as_bytes());
    }
    h.part(&gcra.emission().to_le_bytes());
    h.part(&gcra.tolerance().to_le_bytes());
    h.part(&max_keys.to_le_bytes());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Config::parse(json.as_bytes(), "t").unwrap_err().to_string()
    }

    #[test]
    fn the_design_example_parses() {
        let c = Config::parse(
            br#"{
              "rules": [{
                "name": "per-api-key",
                "match": { "path_prefix": "/api" },
                "key": [ { "header": "x-api-key" } ],
                "limit": { "requests": 100, "per": "1m", "burst": 20 },
                "on_missing_key": "skip",
                "shadow": false
              }],
              "response": { "status": 429, "body": "rate limited\n" },
              "headers": "draft",
              "max_keys": 100000
            }"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.rules.len(), 1);
        assert_eq!(
            c.rules[0].limit,
            Limit {
                requests: 100,
                per: Duration::from_secs(60),
                burst: 20
            }
        );
        assert_eq!(c.rules[0].table.max_keys(), 100_000);
        assert_eq!(c.response.status, 429);
    }

    #[test]
    fn defaults() {
        let c = Config::parse(
            br#"{"rules": [{"name": "a", "limit": {"requests": 5, "per": "1s"}}]}"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.rules[0].limit.burst, 5);
        assert_eq!(c.rules[0].on_missing_key, MissingKey::Skip);
        assert_eq!(
            c.rules[0].table.max_keys(),
            1,
            "an unkeyed rule has one bucket"
        );
        assert_eq!(c.headers, HeaderStyle::Draft);
        assert_eq!(
            c.response,
            Response {
                status: 429,
                body: "rate limited\n".into()
            }
        );
        assert!(Config::parse(b"", "t").unwrap().rules.is_empty());
    }

    #[test]
    fn bad_configs_name_the_field() {
        let rule = |limit: &str| format!(r#"{{"rules": [{{"name": "a", "limit": {limit}}}]}}"#);
        assert_eq!(
            err(&rule(r#"{"requests": 5, "per": "fast"}"#)),
            r#"rules[0].limit.per: expected a duration like "1s", got "fast""#
        );
        assert_eq!(
            err(&rule(r#"{"requests": -5, "per": "1s"}"#)),
            "rules[0].limit.requests: expected an integer from 1 to 1000000000, got -5"
        );
        assert_eq!(
            err(&rule(r#"{"requests": "5", "per": "1s"}"#)),
            "rules[0].limit.requests: invalid type: string \"5\", expected an integer from 1 to 1000000000"
        );
        assert_eq!(
            err(&rule(r#"{"requests": 5.5, "per": "1s"}"#)),
            "rules[0].limit.requests: expected an integer from 1 to 1000000000, got a decimal number"
        );
        assert_eq!(
            err(&rule(r#"{"requests": 5, "per": "0s"}"#)),
            "rules[0].limit.per: must be longer than 0s"
        );
        assert_eq!(
            err(&rule(r#"{"requests": 5, "per": "1s", "brust": 3}"#)),
            "rules[0].limit.brust: unknown field `brust`, expected one of `requests`, `per`, `burst`"
        );
        assert!(err(r#"{"rules": [], "shadwo": true}"#).starts_with("shadwo: unknown field"));
        assert_eq!(
            err(r#"{"rules": [{"limit": {"requests": 1, "per": "1s"}}]}"#),
            "rules[0]: missing field `name`"
        );
        assert_eq!(
            err(
                r#"{"rules": [{"name": "a", "limit": {"requests": 1, "per": "1s"}}, {"name": "a", "limit": {"requests": 1, "per": "1s"}}]}"#
            ),
            "rules[1].name: duplicate rule name \"a\""
        );
        assert_eq!(
            err(r#"{"headers": "ietf"}"#),
            "headers: unknown variant `ietf`, expected one of `draft`, `x-ratelimit`, `none`"
        );
        assert_eq!(
            err(r#"{"response": {"status": 99}}"#),
            "response.status: expected an integer from 200 to 599, got 99"
        );
        assert_eq!(
            err(r#"{"rules": [{"name": "a", "limit": {"requests": 1, "per": "1s"}, "on_missing_key": "drop"}]}"#),
            "rules[0].on_missing_key: unknown variant `drop`, expected one of `skip`, `deny`, `static`"
        );
        assert!(
            err(r#"{"rules": [{"name": "a b", "limit": {"requests": 1, "per": "1s"}}]}"#)
                .starts_with("rules[0].name:")
        );
        assert!(err("[1]").starts_with("configuration: expected a JSON object"));
        assert!(err("{").starts_with("configuration: invalid JSON"));
    }

    #[test]
    fn istio_doubles_and_other_forms() {
        let c = Config::parse(
            br#"{"max_keys": 50.0, "rules": [{"name": "a", "key": ["client_ip", {"header": "X-Key"}],
                 "limit": {"requests": 100.0, "per": "1s", "burst": 2e1},
                 "on_missing_key": {"static": "anon"}}]}"#,
            "t",
        )
        .unwrap();
        let r = &c.rules[0];
        assert_eq!(r.limit.requests, 100);
        assert_eq!(r.limit.burst, 20);
        assert_eq!(r.table.max_keys(), 50);
        assert_eq!(r.on_missing_key, MissingKey::Static("anon".into()));
        assert_eq!(
            r.key,
            vec![
                Source::Attribute(mesh_shared::Attribute::ClientIp),
                Source::Header("x-key".into())
            ]
        );
    }

    #[test]
    fn changing_a_limit_changes_the_bucket_keys() {
        let parse = |n: u32| {
            let json = format!(
                r#"{{"rules": [{{"name": "a", "limit": {{"requests": {n}, "per": "1s"}}}}]}}"#
            );
            Config::parse(json.as_bytes(), "t").unwrap().rules[0]
                .table
                .clone()
        };
        assert_ne!(parse(5), parse(6));
        assert_eq!(parse(5), parse(5));
    }
}
