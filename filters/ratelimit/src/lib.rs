//! mesh-filters ratelimit: GCRA limits keyed by request attributes, exact
//! across Envoy worker threads, with bounded memory.
//!
//! The policy core ([`RateLimiter::check`]) is plain Rust: it sees the request
//! through [`mesh_shared::Request`], the shared store through
//! [`mesh_shared::SharedStore`] and time as a number, so it is tested natively.
//! `filter.rs` is the thin proxy-wasm adapter (wasm32 only).

pub mod config;
pub mod gcra;
pub mod spec;
pub mod table;

#[cfg(target_arch = "wasm32")]
mod filter;

use mesh_shared::hash::KeyHasher;
use mesh_shared::route_metadata::RouteChoice;
use mesh_shared::{Request, SharedStore};

pub use config::{Config, HeaderStyle, MissingKey, Rule};
pub use gcra::{Decision, Gcra};

/// What the filter must do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No rule applies.
    NoRule,
    Allowed {
        rule: usize,
        decision: Decision,
        overflowed: bool,
    },
    Limited {
        rule: usize,
        decision: Decision,
        overflowed: bool,
    },
    /// Over the limit, but the rule is in shadow mode: let it through.
    ShadowLimited {
        rule: usize,
        decision: Decision,
        overflowed: bool,
    },
    /// The key was missing and the rule says `deny`.
    DeniedMissingKey { rule: usize },
    /// Shared data stayed contended past the retry budget: let it through.
    FailedOpen { rule: usize },
}

impl Verdict {
    pub fn rule(&self) -> Option<usize> {
        match *self {
            Verdict::NoRule => None,
            Verdict::Allowed { rule, .. }
            | Verdict::Limited { rule, .. }
            | Verdict::ShadowLimited { rule, .. }
            | Verdict::DeniedMissingKey { rule }
            | Verdict::FailedOpen { rule } => Some(rule),
        }
    }

    /// Whether the request must be answered locally with the rejection.
    pub fn rejects(&self) -> bool {
        matches!(
            self,
            Verdict::Limited { .. } | Verdict::DeniedMissingKey { .. }
        )
    }

    /// The label used in stats.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::NoRule => "none",
            Verdict::Allowed { .. } => "allowed",
            Verdict::Limited { .. } => "limited",
            Verdict::ShadowLimited { .. } => "shadow_limited",
            Verdict::DeniedMissingKey { .. } => "denied_missing_key",
            Verdict::FailedOpen { .. } => "failed_open",
        }
    }
}

/// The compiled configuration and the decision procedure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimiter {
    pub config: Config,
}

enum KeyOutcome {
    Key(u64),
    Skip,
    Deny,
}

impl RateLimiter {
    pub fn new(config: Config) -> Self {
        RateLimiter { config }
    }

    /// Creates every rule's shared-data table (configure time).
    pub fn create_tables(&self, store: &dyn SharedStore) {
        for rule in &self.config.rules {
            rule.table.create(store);
        }
    }

    /// Decides for one request: the first rule whose match holds (and whose key
    /// is present, unless it says otherwise) applies.
    pub fn check(&self, req: &mut dyn Request, store: &dyn SharedStore, now: u64) -> Verdict {
        let route = RouteChoice::of(req, "ratelimit", self.config.route_metadata);
        for (index, rule) in self.config.rules.iter().enumerate() {
            if !route.allows(&rule.name) {
                continue;
            }
            if !rule.matcher.matches(req) {
                continue;
            }
            let fp = match key_of(rule, req) {
                KeyOutcome::Key(fp) => fp,
                KeyOutcome::Skip => continue,
                KeyOutcome::Deny => return Verdict::DeniedMissingKey { rule: index },
            };
            let Ok(adm) = rule.table.admit(store, &rule.gcra, fp, now) else {
                return Verdict::FailedOpen { rule: index };
            };
            let (decision, overflowed) = (adm.decision, adm.overflowed);
            return if decision.allowed {
                Verdict::Allowed {
                    rule: index,
                    decision,
                    overflowed,
                }
            } else if rule.shadow {
                Verdict::ShadowLimited {
                    rule: index,
                    decision,
                    overflowed,
                }
            } else {
                Verdict::Limited {
                    rule: index,
                    decision,
                    overflowed,
                }
            };
        }
        Verdict::NoRule
    }

    /// Headers for the answer: on a rejection always (per the style), on an
    /// allowed answer only if `headers_on_allowed`.
    pub fn headers(&self, verdict: &Verdict) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let (rule, decision) = match *verdict {
            Verdict::Limited { rule, decision, .. } => {
                out.push((
                    "retry-after",
                    secs_ceil(decision.retry_after).max(1).to_string(),
                ));
                (rule, decision)
            }
            Verdict::Allowed { rule, decision, .. }
            | Verdict::ShadowLimited { rule, decision, .. }
                if self.config.headers_on_allowed =>
            {
                (rule, decision)
            }
            _ => return out,
        };
        let Some(rule) = self.config.rules.get(rule) else {
            return out;
        };
        let reset = secs_ceil(decision.reset_after);
        match self.config.headers {
            HeaderStyle::Draft => {
                let window =
                    secs_ceil(u64::try_from(rule.limit.per.as_nanos()).unwrap_or(u64::MAX)).max(1);
                out.push((
                    "ratelimit-policy",
                    format!("\"{}\";q={};w={}", rule.name, rule.limit.requests, window),
                ));
                out.push((
                    "ratelimit",
                    format!("\"{}\";r={};t={}", rule.name, decision.remaining, reset),
                ));
            }
            HeaderStyle::XRateLimit => {
                out.push(("x-ratelimit-limit", rule.limit.requests.to_string()));
                out.push(("x-ratelimit-remaining", decision.remaining.to_string()));
                out.push(("x-ratelimit-reset", reset.to_string()));
            }
            HeaderStyle::None => {}
        }
        out
    }
}

fn key_of(rule: &Rule, req: &mut dyn Request) -> KeyOutcome {
    let mut hasher = KeyHasher::new();
    hasher.part(rule.name.as_bytes());
    for part in &rule.key {
        match part.read(req) {
            Some(value) => hasher.part(value),
            None => match &rule.on_missing_key {
                MissingKey::Skip => return KeyOutcome::Skip,
                MissingKey::Deny => return KeyOutcome::Deny,
                MissingKey::Static(fallback) => hasher.part(fallback.as_bytes()),
            },
        }
    }
    KeyOutcome::Key(hasher.finish())
}

fn secs_ceil(nanos: u64) -> u64 {
    nanos.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_shared::request::FakeRequest;
    use mesh_shared::store::MemoryStore;
    use mesh_shared::Attribute;

    const NOW: u64 = 1_700_000_000 * 1_000_000_000;

    fn limiter(json: &str) -> (RateLimiter, MemoryStore) {
        let l = RateLimiter::new(Config::parse(json.as_bytes(), "t").unwrap());
        let s = MemoryStore::new();
        l.create_tables(&s);
        (l, s)
    }

    fn api_key(k: &str) -> FakeRequest {
        FakeRequest::new()
            .with(Attribute::Path, "/api/x")
            .with_header("x-api-key", k)
    }

    const KEYED: &str = r#"{"rules": [
        {"name": "per-key", "match": {"path_prefix": "/api"}, "key": [{"header": "x-api-key"}],
         "limit": {"requests": 2, "per": "1h"}},
        {"name": "per-ip", "key": ["client_ip"], "limit": {"requests": 1, "per": "1h"}}
    ]}"#;

    #[test]
    fn first_matching_rule_applies_and_keys_are_independent() {
        let (l, s) = limiter(KEYED);
        let labels = |k: &str| -> Vec<&str> {
            (0..3)
                .map(|_| l.check(&mut api_key(k), &s, NOW).label())
                .collect()
        };
        assert_eq!(labels("a"), ["allowed", "allowed", "limited"]);
        assert_eq!(labels("b"), ["allowed", "allowed", "limited"]);
    }

    #[test]
    fn missing_key_skips_to_the_next_rule() {
        let (l, s) = limiter(KEYED);
        let mut req = FakeRequest::new()
            .with(Attribute::Path, "/api/x")
            .with(Attribute::ClientIp, "10.0.0.1");
        assert_eq!(l.check(&mut req.clone(), &s, NOW).rule(), Some(1));
        assert!(l.check(&mut req, &s, NOW).rejects());
        // Neither key present: no rule applies.
        assert_eq!(l.check(&mut FakeRequest::new(), &s, NOW), Verdict::NoRule);
    }

    #[test]
    fn missing_key_deny_and_static() {
        let (l, s) = limiter(
            r#"{"rules": [{"name": "d", "match": {"path_prefix": "/d"}, "key": [{"header": "k"}], "on_missing_key": "deny", "limit": {"requests": 5, "per": "1s"}},
                          {"name": "s", "key": [{"header": "k"}], "on_missing_key": {"static": "anon"}, "limit": {"requests": 1, "per": "1h"}}]}"#,
        );
        let mut d = FakeRequest::new().with(Attribute::Path, "/d");
        assert_eq!(
            l.check(&mut d, &s, NOW),
            Verdict::DeniedMissingKey { rule: 0 }
        );
        let mut anon = FakeRequest::new().with(Attribute::Path, "/x");
        assert_eq!(l.check(&mut anon.clone(), &s, NOW).label(), "allowed");
        assert_eq!(
            l.check(&mut anon, &s, NOW).label(),
            "limited",
            "anonymous requests share one bucket"
        );
    }

    #[test]
    fn shadow_counts_but_never_rejects() {
        let (l, s) = limiter(
            r#"{"rules": [{"name": "sh", "shadow": true, "limit": {"requests": 1, "per": "1h"}}]}"#,
        );
        let v: Vec<Verdict> = (0..3)
            .map(|_| l.check(&mut FakeRequest::new(), &s, NOW))
            .collect();
        assert_eq!(v[0].label(), "allowed");
        assert_eq!(v[1].label(), "shadow_limited");
        assert!(!v[1].rejects() && !v[2].rejects());
    }

    #[test]
    fn a_rule_scoped_to_a_route_leaves_others_alone() {
        let (l, s) = limiter(
            r#"{"rules": [{"name": "r", "match": {"route": "limited"}, "limit": {"requests": 1, "per": "1h"}}]}"#,
        );
        let route = |r: &str| FakeRequest::new().with(Attribute::Route, r);
        for _ in 0..5 {
            assert_eq!(l.check(&mut route("open"), &s, NOW), Verdict::NoRule);
        }
        assert_eq!(l.check(&mut route("limited"), &s, NOW).label(), "allowed");
        assert_eq!(l.check(&mut route("limited"), &s, NOW).label(), "limited");
    }

    #[test]
    fn headers_in_each_style() {
        let (l, s) = limiter(
            r#"{"headers_on_allowed": true, "rules": [{"name": "h", "limit": {"requests": 10, "per": "1m", "burst": 2}}]}"#,
        );
        let ok = l.check(&mut FakeRequest::new(), &s, NOW);
        assert_eq!(
            l.headers(&ok),
            vec![
                ("ratelimit-policy", "\"h\";q=10;w=60".to_string()),
                ("ratelimit", "\"h\";r=1;t=6".to_string())
            ]
        );
        l.check(&mut FakeRequest::new(), &s, NOW);
        let limited = l.check(&mut FakeRequest::new(), &s, NOW);
        assert_eq!(
            l.headers(&limited),
            vec![
                ("retry-after", "6".to_string()),
                ("ratelimit-policy", "\"h\";q=10;w=60".to_string()),
                ("ratelimit", "\"h\";r=0;t=12".to_string())
            ]
        );

        let (x, s) = limiter(
            r#"{"headers": "x-ratelimit", "rules": [{"name": "h", "limit": {"requests": 1, "per": "1m"}}]}"#,
        );
        let ok = x.check(&mut FakeRequest::new(), &s, NOW);
        assert!(
            x.headers(&ok).is_empty(),
            "allowed answers carry headers only when asked"
        );
        let limited = x.check(&mut FakeRequest::new(), &s, NOW);
        assert_eq!(
            x.headers(&limited),
            vec![
                ("retry-after", "60".to_string()),
                ("x-ratelimit-limit", "1".to_string()),
                ("x-ratelimit-remaining", "0".to_string()),
                ("x-ratelimit-reset", "60".to_string())
            ]
        );
    }

    #[test]
    fn route_metadata_selects_a_rule_or_disables_the_filter() {
        let (l, s) = limiter(
            r#"{"route_metadata": true, "rules": [
                {"name": "strict", "limit": {"requests": 1, "per": "1h"}},
                {"name": "gold", "limit": {"requests": 3, "per": "1h"}}]}"#,
        );
        let with = |md: Vec<u8>| {
            let mut r = FakeRequest::new();
            r.route_metadata.push(("ratelimit".into(), md));
            r
        };
        let gold = mesh_shared::route_metadata::tests_encode(&[("rule", b"gold")]);
        let labels: Vec<&str> = (0..4)
            .map(|_| l.check(&mut with(gold.clone()), &s, NOW).label())
            .collect();
        assert_eq!(labels, ["allowed", "allowed", "allowed", "limited"]);
        let off = mesh_shared::route_metadata::tests_encode(&[("disabled", &[1])]);
        assert_eq!(l.check(&mut with(off), &s, NOW), Verdict::NoRule);
        // No metadata: the first matching rule, as usual.
        assert_eq!(l.check(&mut FakeRequest::new(), &s, NOW).rule(), Some(0));
        // Without route_metadata the filter never reads it.
        let (plain, s2) =
            limiter(r#"{"rules": [{"name": "strict", "limit": {"requests": 1, "per": "1h"}}]}"#);
        let mut req = with(mesh_shared::route_metadata::tests_encode(&[(
            "disabled",
            &[1],
        )]));
        assert_eq!(plain.check(&mut req, &s2, NOW).rule(), Some(0));
        assert_eq!(req.lookups, 0);
    }

    #[test]
    fn only_what_a_rule_needs_is_fetched() {
        let (l, s) = limiter(
            r#"{"rules": [{"name": "r", "match": {"route": "a"}, "key": [{"header": "x"}], "limit": {"requests": 1, "per": "1s"}}]}"#,
        );
        let mut req = FakeRequest::new()
            .with(Attribute::Route, "b")
            .with_header("x", "1");
        l.check(&mut req, &s, NOW);
        assert_eq!(
            req.lookups, 1,
            "the key must not be read when the match fails"
        );
    }
}
