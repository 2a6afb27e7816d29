//! Compiling a rule's `analysis` (read by serde as [`AnalysisSpec`]) into an
//! [`Analysis`]: the checks that need the rest of the rule (the canary is one
//! of the targets, there are steps to gate) and the duration bounds.

use std::time::Duration;

use mesh_shared::config::ConfigError;
use mesh_shared::hash::KeyHasher;
use mesh_shared::outcome::FailureWhen;

use crate::canary::Analysis;
use crate::config::{Step, Target};
use crate::spec::AnalysisSpec;

const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
const MAX_SLOW_CALL: Duration = Duration::from_secs(3600);

fn bounded(
    d: mesh_shared::spec::Duration,
    path: String,
    max: Duration,
    too_long: &str,
) -> Result<u64, ConfigError> {
    if d.get().is_zero() {
        return Err(ConfigError::at(path, "must be longer than 0s"));
    }
    if d.get() > max {
        return Err(ConfigError::at(path, too_long));
    }
    Ok(d.nanos())
}

/// `analysis` of a rule with these targets and (compiled) step schedule;
/// `at` turns a field of the rule into its JSON path.
pub fn compile(
    spec: AnalysisSpec,
    at: &dyn Fn(&str) -> String,
    targets: &[Target],
    schedule: &[Step],
) -> Result<Analysis, ConfigError> {
    if schedule.len() < 2 {
        return Err(ConfigError::at(
            at("analysis"),
            "needs \"steps\" that change the weights after 0s",
        ));
    }
    let canary_name = spec.canary.0;
    let Some(canary) = targets.iter().position(|t| t.name == canary_name) else {
        return Err(ConfigError::at(
            at("analysis.canary"),
            format!("\"{canary_name}\" is not one of the targets"),
        ));
    };
    if targets.len() < 2 {
        return Err(ConfigError::at(
            at("analysis.canary"),
            "a rollback needs another target to send the calls to",
        ));
    }
    let interval_nanos = match spec.interval {
        Some(d) => bounded(
            d,
            at("analysis.interval"),
            MAX_INTERVAL,
            "must be at most 24h",
        )?,
        None => 60_000_000_000,
    };
    let slow_call_nanos = match spec.slow_call {
        Some(d) => Some(bounded(
            d,
            at("analysis.slow_call"),
            MAX_SLOW_CALL,
            "must be at most 1h",
        )?),
        None => None,
    };
    if spec.max_slow_rate_percent.is_some() && slow_call_nanos.is_none() {
        return Err(ConfigError::at(
            at("analysis.max_slow_rate_percent"),
            "needs \"slow_call\" (the duration from which a call is slow)",
        ));
    }
    Ok(Analysis {
        canary,
        interval_nanos,
        min_calls: spec.min_calls.map_or(20, |n| n.get()),
        max_failure_rate_percent: spec.max_failure_rate_percent.map_or(5, |n| n.get()),
        max_slow_rate_percent: spec.max_slow_rate_percent.map_or(100, |n| n.get()),
        slow_call_nanos,
        failure_limit: spec.failure_limit.map_or(0, |n| n.get()),
        failure_when: FailureWhen::default(),
    })
}

/// Hashes everything that gives the analysis state its meaning (see the
/// rule's key prefix): a changed analysis starts over.
pub fn identity(a: &Analysis, h: &mut KeyHasher) {
    h.part(b"analysis");
    for n in [
        a.canary as u64,
        a.interval_nanos,
        a.min_calls,
        a.max_failure_rate_percent,
        a.max_slow_rate_percent,
        a.slow_call_nanos.unwrap_or(0),
        a.failure_limit,
    ] {
        h.part(&n.to_le_bytes());
    }
    for (lo, hi) in &a.failure_when.statuses {
        h.part(&lo.to_le_bytes());
        h.part(&hi.to_le_bytes());
    }
    h.part(&[u8::from(a.failure_when.reset)]);
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn error(analysis: &str, steps: bool) -> String {
        let steps = if steps {
            r#", "steps": [{"after": "1m", "weights": {"v2": 50}}]"#
        } else {
            ""
        };
        let text = format!(
            r#"{{"rules": [{{"name": "a", "targets": [{{"name": "v1"}}, {{"name": "v2"}}]{steps}, "analysis": {analysis}}}]}}"#
        );
        Config::parse(text.as_bytes(), "lb")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn bad_analysis_fields_are_named() {
        assert_eq!(
            error(r#"{"canary": "v2"}"#, false),
            "rules[0].analysis: needs \"steps\" that change the weights after 0s"
        );
        assert_eq!(
            error(r#"{"canary": "v3"}"#, true),
            "rules[0].analysis.canary: \"v3\" is not one of the targets"
        );
        assert_eq!(
            error(r#"{}"#, true),
            "rules[0].analysis: missing field `canary`"
        );
        assert_eq!(
            error(r#"{"canary": "v2", "interval": "0s"}"#, true),
            "rules[0].analysis.interval: must be longer than 0s"
        );
        assert_eq!(
            error(r#"{"canary": "v2", "max_failure_rate_percent": 101}"#, true),
            "rules[0].analysis.max_failure_rate_percent: expected an integer from 0 to 100, got 101"
        );
        assert_eq!(
            error(r#"{"canary": "v2", "max_slow_rate_percent": 10}"#, true),
            "rules[0].analysis.max_slow_rate_percent: needs \"slow_call\" (the duration from which a call is slow)"
        );
        assert_eq!(
            error(
                r#"{"canary": "v2", "slow_call": "500ms", "max_slow_rate_percent": -1}"#,
                true
            ),
            "rules[0].analysis.max_slow_rate_percent: expected an integer from 0 to 100, got -1"
        );
        assert_eq!(
            error(r#"{"canary": "v2", "min_calls": 0}"#, true),
            "rules[0].analysis.min_calls: expected an integer from 1 to 1000000000, got 0"
        );
        assert!(error(r#"{"canary": "v2", "failure_limt": 1}"#, true)
            .starts_with("rules[0].analysis.failure_limt: unknown field `failure_limt`"),);
        assert_eq!(
            error(r#"{"canary": "v2", "interval": "25h"}"#, true),
            "rules[0].analysis.interval: must be at most 24h"
        );
    }
}
