//! The ratelimit configuration (see DESIGN.md) read into a compiled [`Config`].

use std::time::Duration;

use mesh_shared::config::{ConfigError, LocalResponse};
use mesh_shared::hash::KeyHasher;
use mesh_shared::request::HeaderNames;
use mesh_shared::spec::{self, unique_names, Integer, LocalResponseSpec};
use mesh_shared::{Matcher, Source};

use crate::gcra::Gcra;
use crate::global::{FailureMode, Global, DEFAULT_TIMEOUT, MAX_TIMEOUT};
use crate::rls;
use crate::spec::{
    ConfigSpec, FailureModeSpec, GlobalSpec, HeaderStyleSpec, LimitSpec, MissingKeySpec, RuleSpec,
};
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
    /// The limit enforced in this Envoy (with `global`: the pre-check).
    pub local: Option<LocalLimit>,
    /// The limit shared by every Envoy through an RLS service.
    pub global: Option<Global>,
    pub on_missing_key: MissingKey,
    pub shadow: bool,
}

/// A rule's `limit`, compiled: the GCRA and its buckets in shared data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalLimit {
    pub limit: Limit,
    pub gcra: Gcra,
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
    /// Adds the request headers the rules may read per request.
    pub fn request_headers(&self, names: &mut HeaderNames) {
        for rule in &self.rules {
            rule.matcher.add_headers(names);
            rule.key.iter().for_each(|s| names.add_source(s));
        }
    }

    /// Shared-data slots the tables of every rule take (local buckets and
    /// remembered global answers): what `create_tables` writes.
    pub fn table_slots(&self) -> u64 {
        self.rules
            .iter()
            .flat_map(|r| {
                let local = r.local.as_ref().map(|l| l.table.max_keys());
                let global = r.global.as_ref().map(|g| g.remembered.max_keys());
                local.into_iter().chain(global)
            })
            .sum()
    }

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
    let limit = spec.limit.map(|l| compile_limit(l, index)).transpose()?;
    if limit.is_none() && spec.global.is_none() {
        return Err(ConfigError::at(
            format!("rules[{index}]"),
            "needs a \"limit\", a \"global\" block, or both",
        ));
    }
    let on_missing_key = match spec.on_missing_key {
        None | Some(MissingKeySpec::Skip) => MissingKey::Skip,
        Some(MissingKeySpec::Deny) => MissingKey::Deny,
        Some(MissingKeySpec::Static(v)) => MissingKey::Static(v),
    };
    // A rule without a key has exactly one bucket.
    let max_keys = if key.is_empty() {
        1
    } else {
        spec.max_keys.map_or(default_max_keys, Integer::get)
    };
    let local = limit.map(|limit| {
        let gcra = Gcra::new(limit.requests, limit.per, limit.burst);
        // Buckets are keyed by everything that gives their numbers meaning, so a
        // changed limit starts from fresh buckets instead of misreading old ones.
        let prefix = format!(
            "mesh.rl.{scope}.{index}.{:016x}.",
            identity(&name, &key, &gcra, max_keys)
        );
        LocalLimit {
            limit,
            gcra,
            table: KeyTable::new(prefix, max_keys),
        }
    });
    let global = match spec.global {
        Some(g) => {
            let mut h = KeyHasher::new();
            h.part(name.as_bytes());
            h.part(g.service.0.as_bytes());
            h.part(g.domain.0.as_bytes());
            h.part(&max_keys.to_le_bytes());
            let prefix = format!("mesh.rl.{scope}.{index}.{:016x}.over.", h.finish());
            Some(compile_global(
                g,
                index,
                KeyTable::remembered(prefix, max_keys),
            )?)
        }
        None => None,
    };
    Ok(Rule {
        name,
        matcher: Matcher::compile(spec.matcher),
        key,
        local,
        global,
        on_missing_key,
        shadow: spec.shadow.unwrap_or(false),
    })
}

fn compile_limit(spec: LimitSpec, index: usize) -> Result<Limit, ConfigError> {
    let per = spec.per.get();
    let per_path = || format!("rules[{index}].limit.per");
    if per.is_zero() {
        return Err(ConfigError::at(per_path(), "must be longer than 0s"));
    }
    if per > Duration::from_secs(366 * 86_400) {
        return Err(ConfigError::at(per_path(), "must be at most a year"));
    }
    let requests = spec.requests.get();
    Ok(Limit {
        requests,
        per,
        burst: spec.burst.map_or(requests, Integer::get),
    })
}

/// A rule's `global` block, with `remembered` (the over-limit answers' table).
fn compile_global(
    spec: GlobalSpec,
    index: usize,
    remembered: KeyTable,
) -> Result<Global, ConfigError> {
    let timeout = spec.timeout.map_or(DEFAULT_TIMEOUT, |t| t.get());
    if timeout < Duration::from_millis(1) || timeout > MAX_TIMEOUT {
        return Err(ConfigError::at(
            format!("rules[{index}].global.timeout"),
            "must be from 1ms to 10s",
        ));
    }
    let service = spec.service.0;
    let grpc_service = rls::grpc_service(&service);
    // proxy-wasm's gRPC call takes the serialized GrpcService as a string
    // (the Rust SDK's &str): it must be UTF-8, which holds for names up to
    // 125 bytes (longer ones need a length byte >= 0x80).
    if std::str::from_utf8(&grpc_service).is_err() {
        return Err(ConfigError::at(
            format!("rules[{index}].global.service"),
            "use a cluster name of at most 125 bytes (proxy-wasm's gRPC call cannot pass longer ones)",
        ));
    }
    Ok(Global {
        grpc_service,
        service,
        domain: spec.domain.0,
        timeout,
        failure_mode: match spec.failure_mode {
            None | Some(FailureModeSpec::Allow) => FailureMode::Allow,
            Some(FailureModeSpec::Deny) => FailureMode::Deny,
        },
        failure_response: LocalResponseSpec::compile(
            spec.failure_response,
            503,
            "rate limit service unavailable\n",
        ),
        max_batch: spec.max_batch.map_or(1, |n| n.get() as usize),
        remembered,
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
            c.rules[0].local.as_ref().unwrap().limit,
            Limit {
                requests: 100,
                per: Duration::from_secs(60),
                burst: 20
            }
        );
        assert_eq!(c.rules[0].local.as_ref().unwrap().table.max_keys(), 100_000);
        assert_eq!(c.response.status, 429);
    }

    #[test]
    fn defaults() {
        let c = Config::parse(
            br#"{"rules": [{"name": "a", "limit": {"requests": 5, "per": "1s"}}]}"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.rules[0].local.as_ref().unwrap().limit.burst, 5);
        assert_eq!(c.rules[0].on_missing_key, MissingKey::Skip);
        assert_eq!(
            c.rules[0].local.as_ref().unwrap().table.max_keys(),
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
        let local = r.local.as_ref().unwrap();
        assert_eq!(local.limit.requests, 100);
        assert_eq!(local.limit.burst, 20);
        assert_eq!(local.table.max_keys(), 50);
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
    fn the_global_block_and_its_defaults() {
        let c = Config::parse(
            br#"{"rules": [{"name": "per-user", "key": [{"header": "x-user"}],
                 "limit": {"requests": 50, "per": "1s"},
                 "global": {"service": "rls", "domain": "mesh"}}]}"#,
            "t",
        )
        .unwrap();
        let g = c.rules[0].global.as_ref().unwrap();
        assert_eq!((g.service.as_str(), g.domain.as_str()), ("rls", "mesh"));
        assert_eq!(g.timeout, Duration::from_millis(20));
        assert_eq!(g.failure_mode, FailureMode::Allow);
        assert_eq!(
            g.failure_response,
            LocalResponse {
                status: 503,
                body: "rate limit service unavailable\n".into()
            }
        );
        assert_eq!(g.grpc_service, rls::grpc_service("rls"));
        assert_eq!(g.remembered.max_keys(), 100_000);
        assert!(
            c.rules[0].local.is_some(),
            "limit with global: the local pre-check"
        );
        let only_global = Config::parse(
            br#"{"rules": [{"name": "g", "global": {"service": "rls", "domain": "mesh", "timeout": "250ms", "failure_mode": "deny"}}]}"#,
            "t",
        )
        .unwrap();
        let rule = &only_global.rules[0];
        assert!(rule.local.is_none());
        let g = rule.global.as_ref().unwrap();
        assert_eq!(
            (g.timeout, g.failure_mode),
            (Duration::from_millis(250), FailureMode::Deny)
        );
    }

    #[test]
    fn bad_global_blocks_name_the_field() {
        let rule = |global: &str| format!(r#"{{"rules": [{{"name": "a", "global": {global}}}]}}"#);
        assert_eq!(
            err(&rule(r#"{"domain": "mesh"}"#)),
            "rules[0].global: missing field `service`"
        );
        assert_eq!(
            err(&rule(r#"{"service": "rls"}"#)),
            "rules[0].global: missing field `domain`"
        );
        assert_eq!(
            err(&rule(r#"{"service": "", "domain": "mesh"}"#)),
            "rules[0].global.service: must not be empty"
        );
        // Istio's cluster names fit; one of 126 bytes cannot go through the call.
        let parses = |name: &str| {
            Config::parse(
                rule(&format!(r#"{{"service": "{name}", "domain": "d"}}"#)).as_bytes(),
                "t",
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            parses("outbound|8081||ratelimit.ratelimit.svc.cluster.local"),
            Ok(())
        );
        assert_eq!(parses(&"c".repeat(125)), Ok(()));
        assert_eq!(
            parses(&"c".repeat(126)),
            Err("rules[0].global.service: use a cluster name of at most 125 bytes (proxy-wasm's gRPC call cannot pass longer ones)".to_string())
        );
        assert!(err(&rule(r#"{"service": "rls", "domain": "a b"}"#))
            .starts_with("rules[0].global.domain: \"a b\": use 1 to 64"));
        for t in ["0s", "11s", "500us"] {
            assert_eq!(
                err(&rule(&format!(
                    r#"{{"service": "rls", "domain": "d", "timeout": "{t}"}}"#
                ))),
                "rules[0].global.timeout: must be from 1ms to 10s",
                "{t}"
            );
        }
        assert_eq!(
            err(&rule(
                r#"{"service": "rls", "domain": "d", "failure_mode": "alow"}"#
            )),
            "rules[0].global.failure_mode: unknown variant `alow`, expected `allow` or `deny`"
        );
        assert!(err(&rule(
            r#"{"service": "rls", "domain": "d", "failure_response": {"status": 99}}"#
        ))
        .starts_with("rules[0].global.failure_response.status:"));
        assert!(err(&rule(
            r#"{"service": "rls", "domain": "d", "servcie": "x"}"#
        ))
        .starts_with("rules[0].global.servcie: unknown field"));
        for n in ["0", "1001", "2.5", "\"8\""] {
            assert!(
                err(&rule(&format!(
                    r#"{{"service": "rls", "domain": "d", "max_batch": {n}}}"#
                )))
                .starts_with("rules[0].global.max_batch:"),
                "max_batch {n}"
            );
        }
        assert_eq!(
            err(r#"{"rules": [{"name": "a"}]}"#),
            r#"rules[0]: needs a "limit", a "global" block, or both"#
        );
    }

    #[test]
    fn changing_a_limit_changes_the_bucket_keys() {
        let parse = |n: u32| {
            let json = format!(
                r#"{{"rules": [{{"name": "a", "limit": {{"requests": {n}, "per": "1s"}}}}]}}"#
            );
            Config::parse(json.as_bytes(), "t").unwrap().rules[0]
                .local
                .clone()
                .unwrap()
                .table
        };
        assert_ne!(parse(5), parse(6));
        assert_eq!(parse(5), parse(5));
    }
}
