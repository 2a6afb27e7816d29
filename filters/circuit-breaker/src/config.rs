//! The circuit-breaker configuration (see DESIGN.md) read into a compiled [`Config`].

use mesh_shared::config::{ConfigError, LocalResponse};
use mesh_shared::hash::KeyHasher;
use mesh_shared::request::HeaderNames;
use mesh_shared::spec::{self, unique_names, Duration, Integer, LocalResponseSpec};
use mesh_shared::{Attribute, Matcher, Source};

use crate::spec::{
    ConfigSpec, HalfOpenPolicySpec, RuleSpec, ScopeSpec, WindowKind, WindowSize, WindowSpec,
};

use crate::table::BreakerTable;

pub const DEFAULT_MAX_BREAKERS: u64 = 1000;
/// Each breaker is one shared-data entry (up to ~1.2 KB): 100k is ~120 MB per rule.
pub const MAX_MAX_BREAKERS: u64 = 100_000;
/// Largest count window: one byte per call is copied on every CAS.
pub const MAX_COUNT_WINDOW: u64 = 1000;
/// Time windows are kept in at most this many buckets (one per second when shorter).
pub const MAX_TIME_BUCKETS: u64 = 60;

const NANOS_PER_SEC: u64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub rules: Vec<Rule>,
    /// Read the route's `mesh-filters` metadata (one property read per
    /// request) to select a rule or switch the filter off per route.
    pub route_metadata: bool,
    pub response: Response,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub matcher: Matcher,
    pub scope: Scope,
    pub policy: Policy,
    pub table: BreakerTable,
}

/// What one breaker of a rule stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One breaker per Envoy route name (`xds.route_name`).
    Route,
    /// One breaker per upstream cluster (`xds.cluster_name`); its state is
    /// published for lb-hints (`mesh_shared::circuit`).
    Cluster,
    /// One breaker per value of a request header.
    Header(String),
}

impl Scope {
    /// Where the breaker's key comes from.
    pub fn source(&self) -> Source {
        match self {
            Scope::Route => Source::Attribute(Attribute::Route),
            Scope::Cluster => Source::Attribute(Attribute::Cluster),
            Scope::Header(name) => Source::Header(name.clone()),
        }
    }
}

/// The numbers of the state machine, shared by every breaker of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub window: Window,
    /// Calls the window must hold before the rates are judged.
    pub minimum_calls: u64,
    pub failure_rate_percent: u64,
    pub failure_when: FailureWhen,
    pub slow_call: Option<SlowCall>,
    /// Open after this many failures in a row (0: off).
    pub consecutive_failures: u64,
    pub open_for_nanos: u64,
    pub half_open_calls: u64,
    pub half_open_policy: HalfOpenPolicy,
    /// A half-open breaker whose probes have not all answered after this long
    /// opens again (Resilience4j's `maxWaitDurationInHalfOpenState`).
    pub max_wait_in_half_open_nanos: u64,
}

/// How the half-open probes are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfOpenPolicy {
    /// Resilience4j's: once all probes have answered, open again if their
    /// failure rate or slow-call rate reaches the rule's threshold, else close.
    Rate,
    /// The first failing (or slow) probe opens the breaker again at once;
    /// closing needs every probe to succeed.
    AnyFailure,
}

/// The default half-open wait: `open_for`, at least a minute.
pub const MIN_DEFAULT_HALF_OPEN_WAIT_NANOS: u64 = 60 * NANOS_PER_SEC;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last `size` calls.
    Count { size: u64 },
    /// The calls of the last `buckets * bucket_nanos` nanoseconds.
    Time { buckets: u64, bucket_nanos: u64 },
}

pub use mesh_shared::outcome::FailureWhen;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowCall {
    pub duration_nanos: u64,
    pub rate_percent: u64,
}

/// The local answer (the shared shape).
pub type Response = LocalResponse;

impl Config {
    /// Adds the request headers the rules may read per request.
    pub fn request_headers(&self, names: &mut HeaderNames) {
        for rule in &self.rules {
            rule.matcher.add_headers(names);
            if let Scope::Header(name) = &rule.scope {
                names.add(name);
            }
        }
    }

    /// Parses the plugin configuration. `scope` names this filter instance in
    /// shared-data keys (the Envoy plugin name).
    pub fn parse(bytes: &[u8], scope: &str) -> Result<Config, ConfigError> {
        Config::compile(spec::parse(bytes)?, scope)
    }

    pub fn compile(spec: ConfigSpec, scope: &str) -> Result<Config, ConfigError> {
        let max_breakers = spec.max_breakers.map_or(DEFAULT_MAX_BREAKERS, Integer::get);
        let rules: Vec<Rule> = spec
            .rules
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(index, rule)| compile_rule(rule, index, scope, max_breakers))
            .collect::<Result<_, _>>()?;
        unique_names("rules", "rule", rules.iter().map(|r| r.name.as_str()))?;
        Ok(Config {
            rules,
            route_metadata: spec.route_metadata.unwrap_or(false),
            response: LocalResponseSpec::compile(spec.response, 503, "circuit open\n"),
        })
    }
}

/// A duration above zero and at most `max`, in nanoseconds.
fn bounded_duration(
    d: Duration,
    path: impl Fn() -> String,
    max: std::time::Duration,
    too_long: &str,
) -> Result<u64, ConfigError> {
    if d.get().is_zero() {
        return Err(ConfigError::at(path(), "must be longer than 0s"));
    }
    if d.get() > max {
        return Err(ConfigError::at(path(), too_long));
    }
    Ok(d.nanos())
}

const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

fn compile_window(spec: WindowSpec, index: usize) -> Result<Window, ConfigError> {
    let path = || format!("rules[{index}].window.size");
    match (spec.kind, spec.size) {
        (WindowKind::Count, WindowSize::Calls(size)) => Ok(Window::Count { size }),
        (WindowKind::Time, WindowSize::Duration(d)) => {
            let total = bounded_duration(d, path, HOUR, "must be at most 1h")?;
            let buckets = total.div_ceil(NANOS_PER_SEC).clamp(1, MAX_TIME_BUCKETS);
            Ok(Window::Time {
                buckets,
                bucket_nanos: (total / buckets).max(1),
            })
        }
        (WindowKind::Count, WindowSize::Duration(_)) => Err(ConfigError::at(
            path(),
            format!("a count window's size is a number of calls from 1 to {MAX_COUNT_WINDOW}"),
        )),
        (WindowKind::Time, WindowSize::Calls(_)) => Err(ConfigError::at(
            path(),
            "a time window's size is a duration like \"10s\"",
        )),
    }
}

fn compile_rule(
    spec: RuleSpec,
    index: usize,
    scope_name: &str,
    default_max_breakers: u64,
) -> Result<Rule, ConfigError> {
    let name = spec.name.0;
    let scope = match spec.scope {
        None | Some(ScopeSpec::Route) => Scope::Route,
        Some(ScopeSpec::Cluster) => Scope::Cluster,
        Some(ScopeSpec::Header(h)) => Scope::Header(h.0),
    };
    let window = match spec.window {
        None => Window::Count { size: 100 },
        Some(w) => compile_window(w, index)?,
    };
    let minimum_calls = spec.minimum_calls.map_or(100, Integer::get);
    let failure_rate_percent = spec.failure_rate_percent.map_or(50, Integer::get);
    let failure_when = match spec.failure_when {
        None => FailureWhen::default(),
        Some(f) => FailureWhen {
            statuses: f.statuses.map_or_else(
                || vec![(500, 599)],
                |s| s.iter().map(|r| (r.0, r.1)).collect(),
            ),
            reset: f.reset.unwrap_or(true),
        },
    };
    let slow_call = match spec.slow_call {
        None => None,
        Some(s) => Some(SlowCall {
            duration_nanos: bounded_duration(
                s.duration,
                || format!("rules[{index}].slow_call.duration"),
                HOUR,
                "must be at most 1h",
            )?,
            rate_percent: s.rate_percent.map_or(100, Integer::get),
        }),
    };
    let consecutive_failures = spec.consecutive_failures.map_or(0, Integer::get);
    let open_for_nanos = match spec.open_for {
        Some(d) => bounded_duration(
            d,
            || format!("rules[{index}].open_for"),
            std::time::Duration::from_secs(86_400),
            "must be at most 1 day",
        )?,
        None => 60 * NANOS_PER_SEC,
    };
    let half_open_calls = spec.half_open_calls.map_or(10, Integer::get);
    let half_open_policy = match spec.half_open_policy {
        None | Some(HalfOpenPolicySpec::Rate) => HalfOpenPolicy::Rate,
        Some(HalfOpenPolicySpec::AnyFailure) => HalfOpenPolicy::AnyFailure,
    };
    let max_wait_in_half_open_nanos = match spec.max_wait_in_half_open {
        Some(d) => bounded_duration(
            d,
            || format!("rules[{index}].max_wait_in_half_open"),
            std::time::Duration::from_secs(86_400),
            "must be at most 1 day",
        )?,
        None => open_for_nanos.max(MIN_DEFAULT_HALF_OPEN_WAIT_NANOS),
    };
    let max_breakers = spec.max_breakers.map_or(default_max_breakers, Integer::get);
    let matcher = Matcher::compile(spec.matcher);

    let policy = Policy {
        window,
        minimum_calls,
        failure_rate_percent,
        failure_when,
        slow_call,
        consecutive_failures,
        open_for_nanos,
        half_open_calls,
        half_open_policy,
        max_wait_in_half_open_nanos,
    };
    // Breaker entries are keyed by everything that gives their bytes meaning,
    // so a changed configuration starts from fresh breakers instead of
    // misreading old ones. (Hashed field by field: Debug formatting would
    // cost the module kilobytes.)
    let mut identity = KeyHasher::new();
    identity.part(name.as_bytes());
    match &scope {
        Scope::Route => identity.part(b"route"),
        Scope::Cluster => identity.part(b"cluster"),
        Scope::Header(h) => identity.part(h.as_bytes()),
    }
    let (kind, a, b) = match window {
        Window::Count { size } => (0, size, 0),
        Window::Time {
            buckets,
            bucket_nanos,
        } => (1, buckets, bucket_nanos),
    };
    let slow = policy
        .slow_call
        .map_or((0, 0), |s| (s.duration_nanos, s.rate_percent));
    let mut numbers = vec![
        kind,
        a,
        b,
        minimum_calls,
        failure_rate_percent,
        u64::from(policy.failure_when.reset),
        slow.0,
        slow.1,
        consecutive_failures,
        open_for_nanos,
        half_open_calls,
        max_breakers,
        match policy.half_open_policy {
            HalfOpenPolicy::Rate => 0,
            HalfOpenPolicy::AnyFailure => 1,
        },
        policy.max_wait_in_half_open_nanos,
    ];
    for (lo, hi) in &policy.failure_when.statuses {
        numbers.extend([u64::from(*lo), u64::from(*hi)]);
    }
    for n in numbers {
        identity.part(&n.to_le_bytes());
    }
    let prefix = format!("mesh.cb.{scope_name}.{index}.{:016x}.", identity.finish());
    let table = BreakerTable::new(prefix, max_breakers, window);
    Ok(Rule {
        name,
        matcher,
        scope,
        policy,
        table,
    })
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
                "name": "payments",
                "match": { "route": "payments" },
                "scope": "route",
                "window": { "kind": "count", "size": 20 },
                "minimum_calls": 10,
                "failure_rate_percent": 50,
                "failure_when": { "statuses": ["5xx"], "reset": true },
                "slow_call": { "duration": "500ms", "rate_percent": 100 },
                "consecutive_failures": 0,
                "open_for": "10s",
                "half_open_calls": 3
              }],
              "response": { "status": 503, "body": "circuit open\n" }
            }"#,
            "t",
        )
        .unwrap();
        let p = &c.rules[0].policy;
        assert_eq!(p.window, Window::Count { size: 20 });
        assert_eq!(p.minimum_calls, 10);
        assert_eq!(p.failure_when.statuses, vec![(500, 599)]);
        assert_eq!(
            p.slow_call,
            Some(SlowCall {
                duration_nanos: 500_000_000,
                rate_percent: 100
            })
        );
        assert_eq!(p.open_for_nanos, 10 * NANOS_PER_SEC);
        assert_eq!(p.half_open_calls, 3);
        assert_eq!(p.half_open_policy, HalfOpenPolicy::Rate);
        assert_eq!(p.max_wait_in_half_open_nanos, 60 * NANOS_PER_SEC);
        assert_eq!(c.rules[0].scope, Scope::Route);
        assert_eq!(c.response.status, 503);
    }

    #[test]
    fn defaults_and_other_forms() {
        let c = Config::parse(
            br#"{"rules": [{"name": "a", "scope": {"header": "X-Tenant"},
                 "window": {"kind": "time", "size": "10s"},
                 "failure_when": {"statuses": ["5xx", 429, "404"], "reset": false}},
                {"name": "b", "scope": "cluster", "window": {"kind": "time", "size": "5m"}}]}"#,
            "t",
        )
        .unwrap();
        let a = &c.rules[0];
        assert_eq!(a.scope, Scope::Header("x-tenant".into()));
        assert_eq!(
            a.policy.window,
            Window::Time {
                buckets: 10,
                bucket_nanos: NANOS_PER_SEC
            }
        );
        assert!(a.policy.failure_when.is_failure_status(503));
        assert!(a.policy.failure_when.is_failure_status(429));
        assert!(a.policy.failure_when.is_failure_status(404));
        assert!(!a.policy.failure_when.is_failure_status(400));
        assert!(!a.policy.failure_when.reset);
        assert_eq!(a.policy.minimum_calls, 100);
        assert_eq!(a.policy.half_open_calls, 10);
        assert_eq!(a.policy.open_for_nanos, 60 * NANOS_PER_SEC);
        assert_eq!(a.policy.slow_call, None);
        assert_eq!(
            c.rules[1].policy.window,
            Window::Time {
                buckets: 60,
                bucket_nanos: 5 * NANOS_PER_SEC
            }
        );
        assert_eq!(c.response.body, "circuit open\n");
        assert!(Config::parse(b"", "t").unwrap().rules.is_empty());
        let half_open = Config::parse(
            br#"{"rules": [{"name": "a", "open_for": "90s", "half_open_policy": "any_failure"},
                {"name": "b", "half_open_policy": "rate", "max_wait_in_half_open": "5s"}]}"#,
            "t",
        )
        .unwrap();
        let (a, b) = (&half_open.rules[0].policy, &half_open.rules[1].policy);
        assert_eq!(a.half_open_policy, HalfOpenPolicy::AnyFailure);
        assert_eq!(
            a.max_wait_in_half_open_nanos,
            90 * NANOS_PER_SEC,
            "open_for when longer than a minute"
        );
        assert_eq!(b.half_open_policy, HalfOpenPolicy::Rate);
        assert_eq!(b.max_wait_in_half_open_nanos, 5 * NANOS_PER_SEC);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let rule = |fields: &str| format!(r#"{{"rules": [{{"name": "a", {fields}}}]}}"#);
        assert_eq!(
            err(&rule(r#""open_for": "soon""#)),
            r#"rules[0].open_for: expected a duration like "1s", got "soon""#
        );
        assert_eq!(
            err(&rule(r#""open_for": "0s""#)),
            "rules[0].open_for: must be longer than 0s"
        );
        assert_eq!(
            err(&rule(r#""failure_rate_percent": 150"#)),
            "rules[0].failure_rate_percent: expected an integer from 1 to 100, got 150"
        );
        assert_eq!(
            err(&rule(r#""failure_rate_percent": 50.5"#)),
            "rules[0].failure_rate_percent: expected an integer from 1 to 100, got a decimal number"
        );
        assert_eq!(
            err(&rule(r#""window": {"kind": "sliding", "size": 5}"#)),
            "rules[0].window.kind: unknown variant `sliding`, expected `count` or `time`"
        );
        assert_eq!(
            err(&rule(r#""window": {"kind": "count", "size": 5000}"#)),
            "rules[0].window.size: expected an integer from 1 to 1000, got 5000"
        );
        assert_eq!(
            err(&rule(r#""failure_when": {"statuses": ["6xx"]}"#)),
            r#"rules[0].failure_when.statuses[0]: expected a status class like "5xx" or a status from 100 to 599, got "6xx""#
        );
        assert_eq!(
            err(&rule(r#""scope": "tenant""#)),
            "rules[0].scope: unknown variant `tenant`, expected one of `route`, `cluster`, `header`"
        );
        assert_eq!(
            err(&rule(r#""half_open_policy": "all""#)),
            "rules[0].half_open_policy: unknown variant `all`, expected `rate` or `any_failure`"
        );
        assert_eq!(
            err(&rule(r#""max_wait_in_half_open": "0s""#)),
            "rules[0].max_wait_in_half_open: must be longer than 0s"
        );
        assert_eq!(
            err(&rule(r#""max_wait_in_half_open": "2d""#)),
            "rules[0].max_wait_in_half_open: must be at most 1 day"
        );
        assert_eq!(
            err(&rule(r#""slow_call": {"rate_percent": 50}"#)),
            "rules[0].slow_call: missing field `duration`"
        );
        assert!(err(&rule(r#""half_open_call": 3"#)).starts_with(
            "rules[0].half_open_call: unknown field `half_open_call`, expected one of"
        ));
        assert_eq!(
            err(&rule(r#""window": {"kind": "time", "size": 5}"#)),
            "rules[0].window.size: a time window's size is a duration like \"10s\""
        );
        assert_eq!(
            err(&rule(r#""window": {"kind": "count", "size": "5s"}"#)),
            "rules[0].window.size: a count window's size is a number of calls from 1 to 1000"
        );
        assert_eq!(
            err(r#"{"rules": [{"name": "a"}, {"name": "a"}]}"#),
            "rules[1].name: duplicate rule name \"a\""
        );
        assert_eq!(
            err(r#"{"response": {"status": 99}}"#),
            "response.status: expected an integer from 200 to 599, got 99"
        );
        assert!(err("[1]").starts_with("configuration: expected a JSON object"));
    }

    #[test]
    fn changing_the_policy_changes_the_breaker_keys() {
        let parse = |n: u32| {
            let json = format!(r#"{{"rules": [{{"name": "a", "half_open_calls": {n}}}]}}"#);
            Config::parse(json.as_bytes(), "t").unwrap().rules[0]
                .table
                .clone()
        };
        assert_ne!(parse(5), parse(6));
        assert_eq!(parse(5), parse(5));
    }
}
