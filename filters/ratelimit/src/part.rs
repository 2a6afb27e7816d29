//! ratelimit's adapter logic as a part (`mesh_shared::part`): the policy
//! compiles the configuration once, the stream asks the core and acts on its
//! verdict. Run alone by this crate's module (`filter.rs`) and by the suite.

use std::cell::Cell;
use std::rc::Rc;

use mesh_shared::host::{self, HostStore, Metric};
use mesh_shared::part::{Exchange, Flow, Part, Policy};
use mesh_shared::request::HeaderNames;
use mesh_shared::stats::stat_name;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{MapType, MetricType};

use crate::global::{read_answer, unavailable_reason, Answer};
use crate::rls;
use crate::{CallOutcome, Check, Config, GlobalCall, RateLimiter, RememberedUntil, Verdict};

pub const FILTER: &str = "ratelimit";

/// Stat ids of one rule, defined once at configure time.
struct RuleStats {
    allowed: Metric,
    limited: Metric,
    shadow_limited: Metric,
    denied_missing_key: Metric,
    failed_open: Metric,
    overflow: Metric,
    global: Option<GlobalStats>,
}

/// Calls to the RLS service of a global rule, by outcome, and their latency.
struct GlobalStats {
    limited: Metric,
    failure_denied: Metric,
    ok: Metric,
    over_limit: Metric,
    timeout: Metric,
    unavailable: Metric,
    error: Metric,
    invalid: Metric,
    not_started: Metric,
    duration_ms: Metric,
    /// A call failure has been logged on this worker (logged once, not per request).
    logged_failure: Cell<bool>,
}

impl GlobalStats {
    fn define(rule: &str) -> GlobalStats {
        let decision = |d: &str| {
            Metric::counter(&stat_name(
                "mesh_ratelimit_requests_total",
                &[("rule", rule), ("decision", d)],
            ))
        };
        let calls = |outcome: &str| {
            Metric::counter(&stat_name(
                "mesh_ratelimit_global_calls_total",
                &[("rule", rule), ("outcome", outcome)],
            ))
        };
        GlobalStats {
            limited: decision("global_limited"),
            failure_denied: decision("failure_denied"),
            ok: calls("ok"),
            over_limit: calls("over_limit"),
            timeout: calls("timeout"),
            unavailable: calls("unavailable"),
            error: calls("error"),
            invalid: calls("invalid"),
            not_started: calls("not_started"),
            duration_ms: Metric::histogram(&stat_name(
                "mesh_ratelimit_global_call_duration_ms",
                &[("rule", rule)],
            )),
            logged_failure: Cell::new(false),
        }
    }

    /// Logs why calls fail, once per worker until a call succeeds again.
    fn log_failure(&self, rule: &str, why: &str) {
        if !self.logged_failure.replace(true) {
            log::warn!("{FILTER}: rule {rule}: rate limit service call failed: {why} (failure_mode applies; logged once until a call succeeds)");
        }
    }
}

impl RuleStats {
    fn define(rule: &crate::Rule) -> RuleStats {
        let global = rule
            .global
            .as_ref()
            .map(|_| GlobalStats::define(&rule.name));
        let rule = rule.name.as_str();
        let requests = |decision: &str| {
            Metric::counter(&stat_name(
                "mesh_ratelimit_requests_total",
                &[("rule", rule), ("decision", decision)],
            ))
        };
        RuleStats {
            allowed: requests("allowed"),
            limited: requests("limited"),
            shadow_limited: requests("shadow_limited"),
            denied_missing_key: requests("denied_missing_key"),
            failed_open: requests("failed_open"),
            overflow: Metric::counter(&stat_name(
                "mesh_ratelimit_overflow_total",
                &[("rule", rule)],
            )),
            global,
        }
    }

    fn count(&self, verdict: &Verdict) {
        let metric = match verdict {
            Verdict::NoRule => return,
            Verdict::Allowed { .. } => self.allowed,
            Verdict::Limited { .. } => self.limited,
            Verdict::ShadowLimited { .. } => self.shadow_limited,
            Verdict::DeniedMissingKey { .. } => self.denied_missing_key,
            Verdict::FailedOpen { .. } | Verdict::GlobalFailedOpen { .. } => self.failed_open,
            Verdict::GlobalAllowed { .. } => self.allowed,
            Verdict::GlobalShadowLimited { .. } => self.shadow_limited,
            Verdict::GlobalLimited { .. } | Verdict::GlobalFailureDenied { .. } => {
                let Some(g) = &self.global else { return };
                match verdict {
                    Verdict::GlobalLimited { .. } => g.limited,
                    _ => g.failure_denied,
                }
            }
        };
        metric.add(1);
        if let Verdict::Allowed {
            overflowed: true, ..
        }
        | Verdict::Limited {
            overflowed: true, ..
        }
        | Verdict::ShadowLimited {
            overflowed: true, ..
        } = verdict
        {
            self.overflow.add(1);
        }
    }
}

/// Per global rule (by index), the gauge `mesh_ratelimit_global_remembered_until_seconds`:
/// the time (unix seconds) until which an `OVER_LIMIT` answer may be
/// remembered for some key. One stat for every worker, read for an eighth of
/// a shared-data read of the table (a number written straight into the
/// module's memory, no hand-over through an allocation: BENCHMARKS.md).
struct RememberedGauges(Vec<Option<u32>>);

impl RememberedGauges {
    fn define(config: &Config) -> RememberedGauges {
        let gauge = |rule: &crate::Rule| {
            rule.global.as_ref()?;
            let name = stat_name(
                "mesh_ratelimit_global_remembered_until_seconds",
                &[("rule", &rule.name)],
            );
            let id = hostcalls::define_metric(MetricType::Gauge, &name).ok()?;
            moves(id, &rule.name).then_some(id)
        };
        RememberedGauges(config.rules.iter().map(gauge).collect())
    }
}

/// Whether the gauge keeps what is added: a stats matcher that rejects it
/// leaves Envoy's null gauge, always 0, and trusting that would never read
/// the table. The probe's +1 stays (one second ahead: never behind).
fn moves(id: u32, rule: &str) -> bool {
    let Ok(before) = hostcalls::get_metric(id) else {
        return false;
    };
    let added = hostcalls::increment_metric(id, 1).is_ok();
    let usable = added && hostcalls::get_metric(id).is_ok_and(|after| after > before);
    if !usable {
        log::info!("{FILTER}: rule {rule}: gauge mesh_ratelimit_global_remembered_until_seconds keeps no value (rejected by a stats matcher?): remembered answers are looked up on every request");
    }
    usable
}

impl RememberedUntil for RememberedGauges {
    fn get(&self, rule: usize) -> Option<u64> {
        hostcalls::get_metric(self.0.get(rule).copied().flatten()?).ok()
    }

    fn raise(&self, rule: usize, secs: u64) {
        let Some(id) = self.0.get(rule).copied().flatten() else {
            return;
        };
        if let Ok(current) = hostcalls::get_metric(id) {
            // Workers raising at once each add: it runs ahead, never behind.
            let delta = i64::try_from(secs.saturating_sub(current)).unwrap_or(i64::MAX);
            if delta > 0 {
                let _ = hostcalls::increment_metric(id, delta);
            }
        }
    }
}

/// The configured filter: the limiter and its stat ids.
pub struct Ratelimit {
    limiter: RateLimiter,
    stats: Vec<RuleStats>,
    remembered_until: RememberedGauges,
}

impl Ratelimit {
    /// Creates the shared tables and defines the stats (configure time).
    pub fn new(config: Config) -> Ratelimit {
        let limiter = RateLimiter::new(config);
        limiter.create_tables(&HostStore);
        let stats = limiter.config.rules.iter().map(RuleStats::define).collect();
        let remembered_until = RememberedGauges::define(&limiter.config);
        log::info!(
            "{FILTER}: configured {} rule(s)",
            limiter.config.rules.len()
        );
        Ratelimit {
            limiter,
            stats,
            remembered_until,
        }
    }
}

impl Policy for Ratelimit {
    type Stream = RatelimitStream;

    fn request_headers(&self, names: &mut HeaderNames) {
        self.limiter.config.request_headers(names);
    }

    fn stream(self: &Rc<Self>, _ex: &mut Exchange) -> RatelimitStream {
        RatelimitStream {
            state: Rc::clone(self),
            verdict: Verdict::NoRule,
            replied: false,
            pending: None,
        }
    }
}

/// A call to the RLS service in flight; the request waits, paused.
struct Pending {
    token: u32,
    call: GlobalCall,
    started: u64,
}

/// One request's ratelimit state.
pub struct RatelimitStream {
    state: Rc<Ratelimit>,
    verdict: Verdict,
    /// We answered locally; Envoy still runs our response callbacks for it.
    replied: bool,
    pending: Option<Pending>,
}

impl RatelimitStream {
    /// Counts the verdict and answers locally if it rejects.
    fn act(&mut self, verdict: Verdict) -> Flow {
        let state = Rc::clone(&self.state);
        if let Some(stats) = verdict.rule().and_then(|r| state.stats.get(r)) {
            stats.count(&verdict);
        }
        if verdict.rejects() {
            let headers = state.limiter.headers(&verdict);
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let response = state.limiter.response(&verdict);
            host::send_local_reply(response.status, &headers, response.body.as_bytes());
            self.replied = true;
            return Flow::Answered;
        }
        self.verdict = verdict;
        Flow::Continue
    }
    fn global_stats(&self, rule: usize) -> Option<&GlobalStats> {
        self.state.stats.get(rule)?.global.as_ref()
    }

    fn rule_name(&self, rule: usize) -> &str {
        self.state
            .limiter
            .config
            .rules
            .get(rule)
            .map_or("", |r| r.name.as_str())
    }

    fn service(&self, rule: usize) -> &str {
        self.state
            .limiter
            .config
            .rules
            .get(rule)
            .and_then(|r| r.global.as_ref())
            .map_or("", |g| g.service.as_str())
    }

    /// Starts the call; on failure to start, decides at once (failure mode).
    fn ask(&mut self, call: GlobalCall, now: u64) -> Flow {
        let state = Rc::clone(&self.state);
        let Some(global) = state
            .limiter
            .config
            .rules
            .get(call.rule)
            .and_then(|r| r.global.as_ref())
        else {
            return Flow::Continue;
        };
        match host::grpc_call(
            &global.grpc_service,
            rls::SERVICE,
            rls::METHOD,
            &call.request,
            global.timeout,
        ) {
            Ok(token) => {
                self.pending = Some(Pending {
                    token,
                    call,
                    started: now,
                });
                Flow::Paused
            }
            Err(status) => {
                if let Some(g) = self.global_stats(call.rule) {
                    g.not_started.add(1);
                    g.log_failure(
                        self.rule_name(call.rule),
                        &format!(
                            "Envoy would not start a gRPC call to cluster \"{}\" ({status:?}: no such cluster?)",
                            global.service
                        ),
                    );
                }
                let verdict = state.limiter.conclude_with(
                    &call,
                    CallOutcome::Failed,
                    &HostStore,
                    &state.remembered_until,
                    now,
                );
                self.act(verdict)
            }
        }
    }
}

impl Part for RatelimitStream {
    fn on_request_headers(&mut self, ex: &mut Exchange) -> Flow {
        let now = ex.now();
        let state = &self.state;
        let check = state
            .limiter
            .check_with(ex, &HostStore, &state.remembered_until, now);
        match check {
            Check::Done(verdict) => self.act(verdict),
            Check::Ask(call) => self.ask(call, now),
        }
    }

    fn on_response_headers(&mut self, _ex: &mut Exchange) {
        if !self.replied {
            for (name, value) in self.state.limiter.headers(&self.verdict) {
                let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, &value);
            }
        }
    }

    fn on_grpc_call_response(
        &mut self,
        ex: &mut Exchange,
        token_id: u32,
        status_code: u32,
        response_size: usize,
    ) -> Option<Flow> {
        let pending = self.pending.take_if(|p| p.token == token_id)?;
        let now = ex.now();
        let body = if status_code == 0 {
            host::grpc_response_body(response_size)
        } else {
            None
        };
        let outcome = match &body {
            Some(bytes) => CallOutcome::Answered(bytes),
            None => CallOutcome::Failed,
        };
        let elapsed = now.saturating_sub(pending.started);
        let timeout = self
            .state
            .limiter
            .config
            .rules
            .get(pending.call.rule)
            .and_then(|r| r.global.as_ref())
            .map_or(u64::MAX, |g| {
                u64::try_from(g.timeout.as_nanos()).unwrap_or(u64::MAX)
            });
        if let Some(g) = self.global_stats(pending.call.rule) {
            g.duration_ms.record(elapsed / 1_000_000);
            // Envoy ends a call past its timeout with UNAVAILABLE (its 504
            // mapped to gRPC), so the time taken tells a timeout apart.
            // Envoy's timers may fire a little before the clock we read says.
            let timed_out = elapsed.saturating_add((timeout / 20).max(1_000_000)) >= timeout;
            let (metric, why) = match (&body, status_code) {
                (Some(bytes), _) => match read_answer(bytes) {
                    Answer::Ok(_) => (g.ok, None),
                    Answer::OverLimit(_) => (g.over_limit, None),
                    Answer::Invalid => (
                        g.invalid,
                        Some("an answer that is no RateLimitResponse, or code UNKNOWN".to_string()),
                    ),
                },
                // gRPC DEADLINE_EXCEEDED, UNAVAILABLE.
                (None, 4) => (g.timeout, Some("timed out".to_string())),
                (None, _) if timed_out => (g.timeout, Some("timed out".to_string())),
                (None, 14) => (
                    g.unavailable,
                    Some(unavailable_reason(
                        &host::grpc_status_message(),
                        self.service(pending.call.rule),
                    )),
                ),
                (None, code) => (
                    g.error,
                    Some(format!(
                        "gRPC status {code}: {}",
                        host::grpc_status_message()
                    )),
                ),
            };
            metric.add(1);
            match why {
                Some(why) => g.log_failure(self.rule_name(pending.call.rule), &why),
                None => g.logged_failure.set(false),
            }
        }
        let state = &self.state;
        let verdict = state.limiter.conclude_with(
            &pending.call,
            outcome,
            &HostStore,
            &state.remembered_until,
            now,
        );
        Some(self.act(verdict))
    }
}
