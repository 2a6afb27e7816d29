//! The lb-hints configuration (see DESIGN.md) read into a compiled [`Config`].

use mesh_shared::config::{ConfigError, LocalResponse};
use mesh_shared::hash::KeyHasher;
use mesh_shared::request::HeaderNames;
use mesh_shared::spec::{self, unique_names, LocalResponseSpec};
use mesh_shared::{Matcher, Source};

pub use crate::canary::Analysis;
use crate::spec::{AlgorithmSpec, ConfigSpec, NoTargetSpec, RuleSpec};

/// Targets per rule: a target index fits a byte in the precomputed sequences.
pub const MAX_TARGETS: usize = 64;
/// Largest weight of one target.
pub const MAX_WEIGHT: u64 = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub rules: Vec<Rule>,
    /// Read the route's `mesh-filters` metadata (one property read per
    /// request) to select a rule or switch the filter off per route.
    pub route_metadata: bool,
    /// The local answer when a rule has no target with a weight above zero.
    pub response: Response,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub matcher: Matcher,
    /// The routing header the choice is written into (lower-case).
    pub header: String,
    pub targets: Vec<Target>,
    pub algorithm: Algorithm,
    /// Where the stickiness key comes from; requests with one are hashed.
    pub sticky: Option<Source>,
    /// A request header that may name a target to force (any configured target).
    pub override_header: Option<String>,
    /// Weight schedule: `steps[i]` applies from `after_nanos` on; the first
    /// entry is the `targets` weights at offset 0.
    pub schedule: Vec<Step>,
    pub avoid_open_circuits: bool,
    pub no_target: NoTarget,
    /// Canary analysis gating the steps (see `canary.rs`).
    pub analysis: Option<Analysis>,
    /// Prefix of this rule's shared-data keys.
    pub key_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    /// The cluster whose breaker status counts for this target.
    pub cluster: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Offset from the rule's start (configuration time), nanoseconds.
    pub after_nanos: u64,
    /// Weight of every target (same order as `targets`).
    pub weights: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    WeightedRoundRobin,
    Random,
    WeightedRandom,
    LeastRequests,
    Sticky,
}

impl Algorithm {
    /// Whether the algorithm claims a position from the shared sequence counter.
    pub fn uses_sequence(self) -> bool {
        matches!(self, Algorithm::RoundRobin | Algorithm::WeightedRoundRobin)
    }
}

/// What happens when no target has a weight above zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoTarget {
    /// Answer locally with the configured `response`.
    Reject,
    /// Remove the routing header and let the route table decide.
    Pass,
}

/// The local answer (the shared shape).
pub type Response = LocalResponse;

impl Config {
    /// Whether a pick depends on the time: a rule with `steps` or `analysis`,
    /// or one that skips open circuits (their status expires). Else the
    /// clock is not read (one host call less per request).
    pub fn reads_clock(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.schedule.len() > 1 || r.analysis.is_some() || r.avoid_open_circuits)
    }

    /// Adds the request headers the rules may read per request.
    pub fn request_headers(&self, names: &mut HeaderNames) {
        for rule in &self.rules {
            rule.matcher.add_headers(names);
            if let Some(sticky) = &rule.sticky {
                names.add_source(sticky);
            }
            if let Some(header) = &rule.override_header {
                names.add(header);
            }
        }
    }

    /// Parses the plugin configuration. `scope` names this filter instance in
    /// shared-data keys (the Envoy plugin name).
    pub fn parse(bytes: &[u8], scope: &str) -> Result<Config, ConfigError> {
        Config::compile(spec::parse(bytes)?, scope)
    }

    pub fn compile(spec: ConfigSpec, scope: &str) -> Result<Config, ConfigError> {
        let rules: Vec<Rule> = spec
            .rules
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(index, rule)| compile_rule(rule, index, scope))
            .collect::<Result<_, _>>()?;
        unique_names("rules", "rule", rules.iter().map(|r| r.name.as_str()))?;
        Ok(Config {
            rules,
            route_metadata: spec.route_metadata.unwrap_or(false),
            response: LocalResponseSpec::compile(spec.response, 503, "no target available\n"),
        })
    }
}

fn compile_rule(spec: RuleSpec, index: usize, scope: &str) -> Result<Rule, ConfigError> {
    let at = |rest: &str| format!("rules[{index}].{rest}");
    let name = spec.name.0;
    if spec.targets.is_empty() {
        return Err(ConfigError::at(at("targets"), "must not be an empty list"));
    }
    if spec.targets.len() > MAX_TARGETS {
        return Err(ConfigError::at(
            at("targets"),
            format!("at most {MAX_TARGETS} targets"),
        ));
    }
    let mut targets: Vec<Target> = Vec::new();
    let mut weights = Vec::new();
    for (i, t) in spec.targets.into_iter().enumerate() {
        let target_name = t.name.0;
        if targets.iter().any(|x| x.name == target_name) {
            return Err(ConfigError::at(
                at(&format!("targets[{i}].name")),
                format!("duplicate target \"{target_name}\""),
            ));
        }
        // Integer<0, MAX_WEIGHT> always fits a u32.
        weights.push(t.weight.map_or(1, |w| w.get() as u32));
        targets.push(Target {
            cluster: t.cluster.map_or_else(|| target_name.clone(), |c| c.0),
            name: target_name,
        });
    }
    let algorithm = match spec.algorithm {
        Some(AlgorithmSpec::RoundRobin) => Algorithm::RoundRobin,
        None | Some(AlgorithmSpec::WeightedRoundRobin) => Algorithm::WeightedRoundRobin,
        Some(AlgorithmSpec::Random) => Algorithm::Random,
        Some(AlgorithmSpec::WeightedRandom) => Algorithm::WeightedRandom,
        Some(AlgorithmSpec::LeastRequests) => Algorithm::LeastRequests,
        Some(AlgorithmSpec::Sticky) => Algorithm::Sticky,
    };
    let sticky = spec.sticky.map(Source::from);
    if matches!(sticky, Some(Source::Static(_))) {
        return Err(ConfigError::at(
            at("sticky"),
            "a static value cannot tell users apart",
        ));
    }
    if algorithm == Algorithm::Sticky && sticky.is_none() {
        return Err(ConfigError::at(
            at("algorithm"),
            "\"sticky\" needs the rule's \"sticky\" field (e.g. {\"header\": \"x-user-id\"})",
        ));
    }
    let mut schedule = vec![Step {
        after_nanos: 0,
        weights,
    }];
    for (i, step) in spec.steps.unwrap_or_default().into_iter().enumerate() {
        let after_nanos = step.after.nanos();
        let previous = schedule.last().cloned().unwrap_or(Step {
            after_nanos: 0,
            weights: Vec::new(),
        });
        if after_nanos < previous.after_nanos {
            return Err(ConfigError::at(
                at(&format!("steps[{i}].after")),
                "steps must be in order of \"after\"",
            ));
        }
        // Targets a step does not name keep their previous weight.
        let mut weights = previous.weights;
        for (target_name, w) in step.weights {
            let Some(t) = targets.iter().position(|t| t.name == target_name) else {
                return Err(ConfigError::at(
                    at(&format!("steps[{i}].weights.{target_name}")),
                    format!("\"{target_name}\" is not one of the targets"),
                ));
            };
            if let Some(slot) = weights.get_mut(t) {
                *slot = w.get() as u32;
            }
        }
        if after_nanos == 0 {
            // A step at 0s replaces the initial weights.
            schedule.retain(|st| st.after_nanos != 0);
        }
        schedule.push(Step {
            after_nanos,
            weights,
        });
    }
    let analysis = match spec.analysis {
        Some(a) => Some(crate::analysis_config::compile(
            a, &at, &targets, &schedule,
        )?),
        None => None,
    };

    // Shared counters are keyed by what gives them meaning, so a changed rule
    // starts fresh (and restarts its step schedule) instead of misreading old ones.
    let mut identity = KeyHasher::new();
    identity.part(name.as_bytes());
    identity.part(&[algorithm as u8]);
    for t in &targets {
        identity.part(t.name.as_bytes());
        identity.part(t.cluster.as_bytes());
    }
    for s in &schedule {
        identity.part(&s.after_nanos.to_le_bytes());
        for w in &s.weights {
            identity.part(&w.to_le_bytes());
        }
    }
    if let Some(a) = &analysis {
        crate::analysis_config::identity(a, &mut identity);
    }
    let key_prefix = format!("mesh.lb.{scope}.{index}.{:016x}.", identity.finish());
    Ok(Rule {
        name,
        matcher: Matcher::compile(spec.matcher),
        header: spec
            .header
            .map_or_else(|| "x-mesh-target".to_string(), |h| h.0),
        targets,
        algorithm,
        sticky,
        override_header: spec.override_header.map(|o| o.header.0),
        schedule,
        avoid_open_circuits: spec.avoid_open_circuits.unwrap_or(false),
        no_target: match spec.no_target {
            None | Some(NoTargetSpec::Reject) => NoTarget::Reject,
            Some(NoTargetSpec::Pass) => NoTarget::Pass,
        },
        analysis,
        key_prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text.as_bytes(), "lb")
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_design_example_parses() {
        let c = parse(
            r#"{"rules": [{
                "name": "reviews-canary",
                "match": { "route": "reviews" },
                "header": "x-mesh-target",
                "targets": [ { "name": "v1", "weight": 90 }, { "name": "v2", "weight": 10, "cluster": "reviews-v2" } ],
                "algorithm": "weighted_round_robin",
                "sticky": { "header": "x-user-id" },
                "override": { "header": "x-mesh-force-target" },
                "steps": [ { "after": "0s", "weights": { "v2": 10 } },
                           { "after": "10m", "weights": { "v2": 50 } } ],
                "avoid_open_circuits": true
            }]}"#,
        )
        .unwrap();
        let r = &c.rules[0];
        assert_eq!(r.header, "x-mesh-target");
        assert_eq!(r.targets[1].cluster, "reviews-v2");
        assert_eq!(r.targets[0].cluster, "v1");
        assert_eq!(
            r.schedule,
            vec![
                Step {
                    after_nanos: 0,
                    weights: vec![90, 10]
                },
                Step {
                    after_nanos: 600_000_000_000,
                    weights: vec![90, 50]
                },
            ]
        );
        assert_eq!(r.override_header.as_deref(), Some("x-mesh-force-target"));
        assert!(r.avoid_open_circuits);
        assert_eq!(c.response.status, 503);
    }

    #[test]
    fn bad_fields_are_named() {
        let base = |rule: &str| format!(r#"{{"rules": [{rule}]}}"#);
        assert_eq!(
            error(&base(
                r#"{"name": "a", "targets": [{"name": "v1", "weight": 1}, {"name": "v2", "weight": -1}]}"#
            )),
            "rules[0].targets[1].weight: expected an integer from 0 to 10000, got -1"
        );
        assert_eq!(
            error(&base(r#"{"name": "a", "targets": []}"#)),
            "rules[0].targets: must not be an empty list"
        );
        assert_eq!(
            error(&base(
                r#"{"name": "a", "targets": [{"name": "v1"}], "algorithm": "fastest"}"#
            )),
            "rules[0].algorithm: unknown variant `fastest`, expected one of `round_robin`, \
             `weighted_round_robin`, `random`, `weighted_random`, `least_requests`, `sticky`"
        );
        assert_eq!(
            parse(&base(
                r#"{"name": "a", "targets": [{"name": "v1"}], "algorithm": "sticky"}"#
            ))
            .unwrap_err()
            .path,
            "rules[0].algorithm"
        );
        assert_eq!(
            parse(&base(
                r#"{"name": "a", "targets": [{"name": "v1"}], "steps": [{"after": "1m", "weights": {"v3": 1}}]}"#
            ))
            .unwrap_err()
            .path,
            "rules[0].steps[0].weights.v3"
        );
        assert_eq!(
            parse(&base(
                r#"{"name": "a", "targets": [{"name": "v1"}], "steps": [{"after": "2m", "weights": {}}, {"after": "1m", "weights": {}}]}"#
            ))
            .unwrap_err()
            .path,
            "rules[0].steps[1].after"
        );
        assert_eq!(
            parse(&base(
                r#"{"name": "a", "targets": [{"name": "v1"}, {"name": "v1"}]}"#
            ))
            .unwrap_err()
            .path,
            "rules[0].targets[1].name"
        );
        assert_eq!(
            parse(&base(
                r#"{"name": "a", "targets": [{"name": "v1", "wieght": 3}]}"#
            ))
            .unwrap_err()
            .path,
            "rules[0].targets[0].wieght"
        );
        assert_eq!(
            parse(&base(
                r#"{"name": "a", "targets": [{"name": "v1"}], "sticky": {"static": "x"}}"#
            ))
            .unwrap_err()
            .path,
            "rules[0].sticky"
        );
        assert_eq!(
            parse(&base(
                r#"{"name": "a", "targets": [{"name": "v1"}], "no_target": "drop"}"#
            ))
            .unwrap_err()
            .path,
            "rules[0].no_target"
        );
        assert_eq!(
            parse(&base(r#"{"name": "a", "targets": [{"name": "v 1"}]}"#))
                .unwrap_err()
                .path,
            "rules[0].targets[0].name"
        );
    }

    #[test]
    fn a_changed_rule_gets_fresh_keys() {
        let a = parse(r#"{"rules": [{"name": "a", "targets": [{"name": "v1", "weight": 9}]}]}"#)
            .unwrap();
        let b = parse(r#"{"rules": [{"name": "a", "targets": [{"name": "v1", "weight": 8}]}]}"#)
            .unwrap();
        assert_ne!(a.rules[0].key_prefix, b.rules[0].key_prefix);
        assert!(a.rules[0].key_prefix.starts_with("mesh.lb.lb.0."));
    }
}
