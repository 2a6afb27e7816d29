//! The circuit-breaker configuration (see DESIGN.md) read into a compiled [`Config`].

use std::time::Duration;

use mesh_shared::config::{parse_document, rules, safe_name, ConfigError, LocalResponse, Node};
use mesh_shared::hash::KeyHasher;
use mesh_shared::json::Value;
use mesh_shared::{Attribute, Matcher, Source};

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last `size` calls.
    Count { size: u64 },
    /// The calls of the last `buckets * bucket_nanos` nanoseconds.
    Time { buckets: u64, bucket_nanos: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureWhen {
    /// Inclusive status ranges that count as failures (`5xx` is 500..=599).
    pub statuses: Vec<(u32, u32)>,
    /// A reset or timeout with no upstream status counts as a failure (else it is ignored).
    pub reset: bool,
}

impl FailureWhen {
    pub fn is_failure_status(&self, status: u32) -> bool {
        self.statuses
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowCall {
    pub duration_nanos: u64,
    pub rate_percent: u64,
}

/// The local answer (the shared shape).
pub type Response = LocalResponse;

impl Config {
    /// Parses the plugin configuration. `scope` names this filter instance in
    /// shared-data keys (the Envoy plugin name).
    pub fn parse(bytes: &[u8], scope: &str) -> Result<Config, ConfigError> {
        let doc = parse_document(bytes)?;
        let root = Node::root(&doc);
        let mut f = root.object()?;
        let max_breakers = match f.optional("max_breakers") {
            Some(n) => n.positive(MAX_MAX_BREAKERS)?,
            None => DEFAULT_MAX_BREAKERS,
        };
        let response = LocalResponse::parse(f.optional("response"), 503, "circuit open\n")?;
        let route_metadata = f.flag("route_metadata", false)?;
        let rules = rules(
            f.optional("rules"),
            |item, index| parse_rule(item, index, scope, max_breakers),
            |r: &Rule| r.name.as_str(),
        )?;
        f.finish()?;
        Ok(Config {
            rules,
            route_metadata,
            response,
        })
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A duration above zero and at most `max`.
fn bounded_duration(node: &Node<'_>, max: Duration, too_long: &str) -> Result<u64, ConfigError> {
    let d = node.duration()?;
    if d.is_zero() {
        return Err(node.error("must be longer than 0s"));
    }
    if d > max {
        return Err(node.error(too_long));
    }
    Ok(nanos(d))
}

fn parse_rule(
    node: &Node<'_>,
    index: usize,
    scope_name: &str,
    default_max_breakers: u64,
) -> Result<Rule, ConfigError> {
    let mut f = node.object()?;
    let name = safe_name(&f.required("name")?)?;
    let matcher = Matcher::parse(f.optional("match").as_ref())?;
    let scope = match f.optional("scope") {
        None => Scope::Route,
        Some(n) => parse_scope(&n)?,
    };
    let window = match f.optional("window") {
        None => Window::Count { size: 100 },
        Some(n) => parse_window(&n)?,
    };
    let minimum_calls = match f.optional("minimum_calls") {
        Some(n) => n.positive(1_000_000)?,
        None => 100,
    };
    let failure_rate_percent = match f.optional("failure_rate_percent") {
        Some(n) => n.positive(100)?,
        None => 50,
    };
    let failure_when = match f.optional("failure_when") {
        None => FailureWhen {
            statuses: vec![(500, 599)],
            reset: true,
        },
        Some(n) => parse_failure_when(&n)?,
    };
    let slow_call = match f.optional("slow_call") {
        None => None,
        Some(n) => Some(parse_slow_call(&n)?),
    };
    let consecutive_failures = match f.optional("consecutive_failures") {
        // int_in bounds it to 0..=1_000_000.
        Some(n) => n.int_in(0, 1_000_000)? as u64,
        None => 0,
    };
    let open_for_nanos = match f.optional("open_for") {
        Some(n) => bounded_duration(&n, Duration::from_secs(86_400), "must be at most 1 day")?,
        None => 60 * NANOS_PER_SEC,
    };
    let half_open_calls = match f.optional("half_open_calls") {
        Some(n) => n.positive(1000)?,
        None => 10,
    };
    let max_breakers = match f.optional("max_breakers") {
        Some(n) => n.positive(MAX_MAX_BREAKERS)?,
        None => default_max_breakers,
    };
    f.finish()?;

    let policy = Policy {
        window,
        minimum_calls,
        failure_rate_percent,
        failure_when,
        slow_call,
        consecutive_failures,
        open_for_nanos,
        half_open_calls,
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

fn parse_scope(node: &Node<'_>) -> Result<Scope, ConfigError> {
    const EXPECTED: &str = "expected \"route\", \"cluster\" or {\"header\": name}";
    match node.value() {
        Value::String(s) if s == "route" => Ok(Scope::Route),
        Value::String(s) if s == "cluster" => Ok(Scope::Cluster),
        Value::String(s) => Err(node.error(format!("{EXPECTED}, got \"{s}\""))),
        Value::Object(_) => {
            let mut o = node.object()?;
            let header = o.required("header")?.header_name()?;
            o.finish()?;
            Ok(Scope::Header(header))
        }
        _ => Err(node.error(EXPECTED)),
    }
}

fn parse_window(node: &Node<'_>) -> Result<Window, ConfigError> {
    let mut f = node.object()?;
    let kind_node = f.required("kind")?;
    let size = f.required("size")?;
    let window = match kind_node.str()? {
        "count" => Window::Count {
            size: size.positive(MAX_COUNT_WINDOW)?,
        },
        "time" => {
            let total = bounded_duration(&size, Duration::from_secs(3600), "must be at most 1h")?;
            let buckets = total.div_ceil(NANOS_PER_SEC).clamp(1, MAX_TIME_BUCKETS);
            Window::Time {
                buckets,
                bucket_nanos: (total / buckets).max(1),
            }
        }
        other => {
            return Err(kind_node.error(format!("expected \"count\" or \"time\", got \"{other}\"")))
        }
    };
    f.finish()?;
    Ok(window)
}

fn parse_failure_when(node: &Node<'_>) -> Result<FailureWhen, ConfigError> {
    let mut f = node.object()?;
    let statuses = match f.optional("statuses") {
        None => vec![(500, 599)],
        Some(n) => {
            let mut ranges = Vec::new();
            for item in n.list()? {
                ranges.push(parse_status(&item)?);
            }
            ranges
        }
    };
    let reset = f.flag("reset", true)?;
    f.finish()?;
    Ok(FailureWhen { statuses, reset })
}

/// `"5xx"` (a class), `"503"` or `503`.
fn parse_status(node: &Node<'_>) -> Result<(u32, u32), ConfigError> {
    const EXPECTED: &str = "expected a status class like \"5xx\" or a status from 100 to 599";
    match node.value() {
        Value::Number(n) => match n.int {
            Some(code @ 100..=599) => Ok((code as u32, code as u32)),
            _ => Err(node.error(EXPECTED)),
        },
        Value::String(s) => {
            if let [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] = s.as_bytes() {
                let class = u32::from(c - b'0') * 100;
                return Ok((class, class + 99));
            }
            match s.parse::<u32>() {
                Ok(code @ 100..=599) => Ok((code, code)),
                _ => Err(node.error(format!("{EXPECTED}, got \"{s}\""))),
            }
        }
        _ => Err(node.error(EXPECTED)),
    }
}

fn parse_slow_call(node: &Node<'_>) -> Result<SlowCall, ConfigError> {
    let mut f = node.object()?;
    let duration_nanos = bounded_duration(
        &f.required("duration")?,
        Duration::from_secs(3600),
        "must be at most 1h",
    )?;
    let rate_percent = match f.optional("rate_percent") {
        Some(n) => n.positive(100)?,
        None => 100,
    };
    f.finish()?;
    Ok(SlowCall {
        duration_nanos,
        rate_percent,
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
            err(&rule(r#""window": {"kind": "sliding", "size": 5}"#)),
            r#"rules[0].window.kind: expected "count" or "time", got "sliding""#
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
            r#"rules[0].scope: expected "route", "cluster" or {"header": name}, got "tenant""#
        );
        assert_eq!(
            err(&rule(r#""slow_call": {"rate_percent": 50}"#)),
            "rules[0].slow_call.duration: is required"
        );
        assert!(err(&rule(r#""half_open_call": 3"#))
            .starts_with("rules[0].half_open_call: unknown field (expected one of:"));
        assert_eq!(
            err(r#"{"rules": [{"name": "a"}, {"name": "a"}]}"#),
            "rules[1].name: duplicate rule name \"a\""
        );
        assert_eq!(
            err(r#"{"response": {"status": 99}}"#),
            "response.status: expected an integer from 200 to 599, got 99"
        );
        assert!(err("[1]").starts_with("configuration: expected an object"));
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
