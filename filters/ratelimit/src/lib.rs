//! mesh-filters ratelimit: GCRA limits keyed by request attributes, exact
//! across Envoy worker threads, with bounded memory.
//!
//! The policy core ([`RateLimiter::check`]) is plain Rust: it sees the request
//! through [`mesh_shared::Request`], the shared store through
//! [`mesh_shared::SharedStore`] and time as a number, so it is tested natively.
//! `filter.rs` is the thin proxy-wasm adapter (wasm32 only).

pub mod batch;
pub mod config;
pub mod gcra;
pub mod global;
pub mod rls;
pub mod spec;
pub mod table;

#[cfg(target_arch = "wasm32")]
pub mod part;
// The module's entry points; off when the suite links this crate for its part.
#[cfg(all(target_arch = "wasm32", feature = "module"))]
mod filter;

use mesh_shared::config::LocalResponse;
use mesh_shared::hash::KeyHasher;
use mesh_shared::route_metadata::RouteChoice;
use mesh_shared::{Request, SharedStore};

pub use config::{Config, HeaderStyle, LocalLimit, MissingKey, Rule};
pub use gcra::{Decision, Gcra};
pub use global::{AlwaysLookUp, FailureMode, Global, RememberedUntil, ServiceStatus};

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
    /// The RLS service said OK (`status`: what it told about the limit).
    GlobalAllowed {
        rule: usize,
        status: Option<ServiceStatus>,
    },
    /// Over the global limit: the service said so, or said so earlier for this
    /// key and the answer is still in force (`remembered`: no call was made).
    GlobalLimited {
        rule: usize,
        status: ServiceStatus,
        remembered: bool,
    },
    /// Over the global limit in shadow mode: let it through.
    GlobalShadowLimited { rule: usize, status: ServiceStatus },
    /// The call failed and the rule's `failure_mode` is `allow`.
    GlobalFailedOpen { rule: usize },
    /// The call failed and the rule's `failure_mode` is `deny`.
    GlobalFailureDenied { rule: usize },
}

impl Verdict {
    pub fn rule(&self) -> Option<usize> {
        match *self {
            Verdict::NoRule => None,
            Verdict::Allowed { rule, .. }
            | Verdict::Limited { rule, .. }
            | Verdict::ShadowLimited { rule, .. }
            | Verdict::DeniedMissingKey { rule }
            | Verdict::FailedOpen { rule }
            | Verdict::GlobalAllowed { rule, .. }
            | Verdict::GlobalLimited { rule, .. }
            | Verdict::GlobalShadowLimited { rule, .. }
            | Verdict::GlobalFailedOpen { rule }
            | Verdict::GlobalFailureDenied { rule } => Some(rule),
        }
    }

    /// Whether the request must be answered locally (see [`RateLimiter::response`]).
    pub fn rejects(&self) -> bool {
        matches!(
            self,
            Verdict::Limited { .. }
                | Verdict::DeniedMissingKey { .. }
                | Verdict::GlobalLimited { .. }
                | Verdict::GlobalFailureDenied { .. }
        )
    }

    /// The label used in stats.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::NoRule => "none",
            Verdict::Allowed { .. } | Verdict::GlobalAllowed { .. } => "allowed",
            Verdict::Limited { .. } => "limited",
            Verdict::ShadowLimited { .. } | Verdict::GlobalShadowLimited { .. } => "shadow_limited",
            Verdict::DeniedMissingKey { .. } => "denied_missing_key",
            Verdict::FailedOpen { .. } | Verdict::GlobalFailedOpen { .. } => "failed_open",
            Verdict::GlobalLimited { .. } => "global_limited",
            Verdict::GlobalFailureDenied { .. } => "failure_denied",
        }
    }
}

/// The outcome of [`RateLimiter::check`].
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// Decided here.
    Done(Verdict),
    /// The rule's RLS service must be asked; hand its answer to
    /// [`RateLimiter::conclude`].
    Ask(GlobalCall),
}

/// A call to make: the rule, the key, and the request's descriptor.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalCall {
    pub rule: usize,
    pub fp: u64,
    pub descriptor: rls::RateLimitDescriptor,
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome<'a> {
    /// The service answered with these `RateLimitResponse` bytes.
    Answered(&'a [u8]),
    /// No usable answer: unreachable, timed out, a gRPC error status.
    Failed,
}

/// The compiled configuration and the decision procedure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimiter {
    pub config: Config,
}

enum KeyOutcome {
    /// The key's fingerprint and, for a global rule, its parts' values.
    Key(u64, Vec<Vec<u8>>),
    Skip,
    Deny,
}

impl RateLimiter {
    pub fn new(config: Config) -> Self {
        RateLimiter { config }
    }

    /// Creates every rule's shared-data tables (configure time).
    pub fn create_tables(&self, store: &dyn SharedStore) {
        for rule in &self.config.rules {
            if let Some(local) = &rule.local {
                local.table.create(store);
            }
            if let Some(global) = &rule.global {
                global.remembered.create(store);
            }
        }
    }

    /// Decides for one request: the first rule whose match holds (and whose key
    /// is present, unless it says otherwise) applies. A global rule first
    /// applies its local pre-check and what is remembered, then asks.
    pub fn check(&self, req: &mut dyn Request, store: &dyn SharedStore, now: u64) -> Check {
        self.check_with(req, store, &global::AlwaysLookUp, now)
    }

    /// [`RateLimiter::check`], reading the remembered answers of a global
    /// rule only while `hint` says some may be in force.
    pub fn check_with(
        &self,
        req: &mut dyn Request,
        store: &dyn SharedStore,
        hint: &dyn RememberedUntil,
        now: u64,
    ) -> Check {
        let route = RouteChoice::of(req, "ratelimit", self.config.route_metadata);
        for (index, rule) in self.config.rules.iter().enumerate() {
            if !route.allows(&rule.name) {
                continue;
            }
            if !rule.matcher.matches(req) {
                continue;
            }
            let (fp, values) = match key_of(rule, req) {
                KeyOutcome::Key(fp, values) => (fp, values),
                KeyOutcome::Skip => continue,
                KeyOutcome::Deny => return Check::Done(Verdict::DeniedMissingKey { rule: index }),
            };
            if let Some(local) = &rule.local {
                let local_verdict = local_check(index, rule, local, store, fp, now);
                if rule.global.is_none() || !matches!(local_verdict, Verdict::Allowed { .. }) {
                    return Check::Done(local_verdict);
                }
            }
            let Some(global) = &rule.global else {
                return Check::Done(Verdict::NoRule);
            };
            if global::may_be_remembered(hint, index, now) {
                if let Some(status) = global::remembered(global, store, fp, now) {
                    return Check::Done(over_global(index, rule, status, true));
                }
            }
            return Check::Ask(GlobalCall {
                rule: index,
                fp,
                descriptor: global::descriptor(&rule.name, &rule.key, &values),
            });
        }
        Check::Done(Verdict::NoRule)
    }

    /// The verdict once the service answered (or failed); an `OVER_LIMIT`
    /// is remembered for the key until its `duration_until_reset`.
    pub fn conclude(
        &self,
        call: &GlobalCall,
        outcome: CallOutcome<'_>,
        store: &dyn SharedStore,
        now: u64,
    ) -> Verdict {
        self.conclude_with(call, outcome, store, &global::AlwaysLookUp, now)
    }

    /// [`RateLimiter::conclude`], raising `hint` to cover what it remembers
    /// (the counterpart of [`RateLimiter::check_with`]).
    pub fn conclude_with(
        &self,
        call: &GlobalCall,
        outcome: CallOutcome<'_>,
        store: &dyn SharedStore,
        hint: &dyn RememberedUntil,
        now: u64,
    ) -> Verdict {
        let answer = match outcome {
            CallOutcome::Answered(bytes) => global::read_answer(bytes),
            CallOutcome::Failed => global::Answer::Invalid,
        };
        self.decide(call, answer, store, hint, now)
    }

    /// The verdict for one request from its own answer (of a batched call:
    /// `global::read_answers`).
    pub fn decide(
        &self,
        call: &GlobalCall,
        answer: global::Answer,
        store: &dyn SharedStore,
        hint: &dyn RememberedUntil,
        now: u64,
    ) -> Verdict {
        let index = call.rule;
        let Some((rule, global)) = self
            .config
            .rules
            .get(index)
            .and_then(|r| Some((r, r.global.as_ref()?)))
        else {
            return Verdict::NoRule;
        };
        match answer {
            global::Answer::Ok(status) => Verdict::GlobalAllowed {
                rule: index,
                status,
            },
            global::Answer::OverLimit(status) => {
                global::remember(global, store, hint, (index, call.fp), &status, now);
                over_global(index, rule, status, false)
            }
            global::Answer::Invalid => match global.failure_mode {
                FailureMode::Allow => Verdict::GlobalFailedOpen { rule: index },
                FailureMode::Deny => Verdict::GlobalFailureDenied { rule: index },
            },
        }
    }

    /// The local answer for a verdict that [`Verdict::rejects`].
    pub fn response(&self, verdict: &Verdict) -> &LocalResponse {
        if let Verdict::GlobalFailureDenied { rule } = *verdict {
            if let Some(global) = self.config.rules.get(rule).and_then(|r| r.global.as_ref()) {
                return &global.failure_response;
            }
        }
        &self.config.response
    }

    /// Headers for the answer: on a rejection always (per the style), on an
    /// allowed answer only if `headers_on_allowed`. A global verdict takes its
    /// numbers from the service's `DescriptorStatus`.
    pub fn headers(&self, verdict: &Verdict) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let (rule, rejected, numbers) = match *verdict {
            Verdict::Limited { rule, decision, .. } => {
                (rule, true, local_numbers(self, rule, decision))
            }
            Verdict::Allowed { rule, decision, .. }
            | Verdict::ShadowLimited { rule, decision, .. }
                if self.config.headers_on_allowed =>
            {
                (rule, false, local_numbers(self, rule, decision))
            }
            Verdict::GlobalLimited { rule, status, .. } => (rule, true, service_numbers(status)),
            Verdict::GlobalAllowed {
                rule,
                status: Some(status),
            }
            | Verdict::GlobalShadowLimited { rule, status }
                if self.config.headers_on_allowed =>
            {
                (rule, false, service_numbers(status))
            }
            _ => return out,
        };
        let Some(rule) = self.config.rules.get(rule) else {
            return out;
        };
        let Some(n) = numbers else {
            return out;
        };
        if rejected {
            out.push(("retry-after", secs_ceil(n.retry_after).max(1).to_string()));
        }
        let reset = secs_ceil(n.reset_after);
        match self.config.headers {
            HeaderStyle::Draft => {
                if n.limit > 0 {
                    out.push((
                        "ratelimit-policy",
                        format!("\"{}\";q={};w={}", rule.name, n.limit, n.window_secs.max(1)),
                    ));
                }
                out.push((
                    "ratelimit",
                    format!("\"{}\";r={};t={}", rule.name, n.remaining, reset),
                ));
            }
            HeaderStyle::XRateLimit => {
                if n.limit > 0 {
                    out.push(("x-ratelimit-limit", n.limit.to_string()));
                }
                out.push(("x-ratelimit-remaining", n.remaining.to_string()));
                out.push(("x-ratelimit-reset", reset.to_string()));
            }
            HeaderStyle::None => {}
        }
        out
    }
}

/// The numbers the rate-limit headers show.
struct HeaderNumbers {
    /// Requests per window (0: unknown, no policy header).
    limit: u64,
    window_secs: u64,
    remaining: u64,
    /// Nanoseconds until the limit is full again / the window resets.
    reset_after: u64,
    /// Nanoseconds until a retry can succeed.
    retry_after: u64,
}

fn local_numbers(limiter: &RateLimiter, rule: usize, d: Decision) -> Option<HeaderNumbers> {
    let local = limiter.config.rules.get(rule)?.local.as_ref()?;
    Some(HeaderNumbers {
        limit: local.limit.requests,
        window_secs: secs_ceil(u64::try_from(local.limit.per.as_nanos()).unwrap_or(u64::MAX)),
        remaining: d.remaining,
        reset_after: d.reset_after,
        retry_after: d.retry_after,
    })
}

fn service_numbers(s: ServiceStatus) -> Option<HeaderNumbers> {
    Some(HeaderNumbers {
        limit: u64::from(s.limit),
        window_secs: s.window_secs,
        remaining: u64::from(s.remaining),
        reset_after: s.reset_after,
        retry_after: s.reset_after,
    })
}

fn over_global(rule: usize, r: &Rule, status: ServiceStatus, remembered: bool) -> Verdict {
    if r.shadow {
        Verdict::GlobalShadowLimited { rule, status }
    } else {
        Verdict::GlobalLimited {
            rule,
            status,
            remembered,
        }
    }
}

fn local_check(
    index: usize,
    rule: &Rule,
    local: &LocalLimit,
    store: &dyn SharedStore,
    fp: u64,
    now: u64,
) -> Verdict {
    let Ok(adm) = local.table.admit(store, &local.gcra, fp, now) else {
        return Verdict::FailedOpen { rule: index };
    };
    let (decision, overflowed) = (adm.decision, adm.overflowed);
    if decision.allowed {
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
    }
}

fn key_of(rule: &Rule, req: &mut dyn Request) -> KeyOutcome {
    let mut hasher = KeyHasher::new();
    hasher.part(rule.name.as_bytes());
    let keep_values = rule.global.is_some();
    let mut values = Vec::new();
    for part in &rule.key {
        let value = match part.read(req) {
            Some(value) => value,
            None => match &rule.on_missing_key {
                MissingKey::Skip => return KeyOutcome::Skip,
                MissingKey::Deny => return KeyOutcome::Deny,
                MissingKey::Static(fallback) => fallback.as_bytes(),
            },
        };
        hasher.part(value);
        if keep_values {
            values.push(value.to_vec());
        }
    }
    KeyOutcome::Key(hasher.finish(), values)
}

fn secs_ceil(nanos: u64) -> u64 {
    nanos.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests;
