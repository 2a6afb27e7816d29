//! ratelimit's adapter logic as a part (`mesh_shared::part`): the policy
//! compiles the configuration once, the stream asks the core and acts on its
//! verdict. Run alone by this crate's module (`filter.rs`) and by the suite.

use std::any::Any;
use std::rc::Rc;

use mesh_shared::host::{self, HostStore, Metric};
use mesh_shared::part::{Exchange, Flow, Part, Policy};
use mesh_shared::request::HeaderNames;
use mesh_shared::stats::stat_name;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{MapType, MetricType};

use crate::batch::Admission;
use crate::global::{read_answer, request_bytes};
use crate::rls;
use crate::{
    CallOutcome, Check, Config, Global, GlobalCall, RateLimiter, RememberedUntil, Verdict,
};

mod calls;

use calls::{Batching, EndedCall, GlobalStats};

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

/// `mesh_ratelimit_requests_total{rule, decision}`.
fn requests_counter(rule: &str, decision: &str) -> Metric {
    Metric::counter(&stat_name(
        "mesh_ratelimit_requests_total",
        &[("rule", rule), ("decision", decision)],
    ))
}

impl RuleStats {
    fn define(rule: &crate::Rule) -> RuleStats {
        let global = rule
            .global
            .as_ref()
            .map(|g| GlobalStats::define(&rule.name, g.max_batch > 1));
        let rule = rule.name.as_str();
        let requests = |decision: &str| requests_counter(rule, decision);
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
    batching: Option<Batching>,
}

impl Ratelimit {
    /// Creates the shared tables and defines the stats (configure time, in
    /// the root context `root_id`).
    pub fn new(config: Config, root_id: u32) -> Ratelimit {
        let limiter = RateLimiter::new(config);
        limiter.create_tables(&HostStore);
        let stats = limiter.config.rules.iter().map(RuleStats::define).collect();
        let remembered_until = RememberedGauges::define(&limiter.config);
        let batching = Batching::define(&limiter.config, root_id);
        log::info!(
            "{FILTER}: configured {} rule(s)",
            limiter.config.rules.len()
        );
        Ratelimit {
            limiter,
            stats,
            remembered_until,
            batching,
        }
    }

    fn global(&self, rule: usize) -> Option<&Global> {
        self.limiter.config.rules.get(rule)?.global.as_ref()
    }

    fn global_stats(&self, rule: usize) -> Option<&GlobalStats> {
        self.stats.get(rule)?.global.as_ref()
    }

    fn rule_name(&self, rule: usize) -> &str {
        self.limiter
            .config
            .rules
            .get(rule)
            .map_or("", |r| r.name.as_str())
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
            waiting: None,
        }
    }

    fn on_queue_ready(&self, queue: u32) {
        self.send_signalled(queue);
    }

    fn on_root_grpc_response(&self, token: u32, status: u32, size: usize) -> bool {
        self.batch_answered(token, status, size)
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
    /// Its own call in flight.
    pending: Option<Pending>,
    /// It waits for a batched call of this rule (made by the root context).
    waiting: Option<(usize, u32)>,
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

    /// Starts the call, or waits for the next batched one; on failure to
    /// start, decides at once (failure mode).
    fn ask(&mut self, call: GlobalCall, ex: &Exchange, now: u64) -> Flow {
        let state = Rc::clone(&self.state);
        let Some(global) = state.global(call.rule) else {
            return Flow::Continue;
        };
        let rule = call.rule;
        let batching = state.batching.as_ref();
        let admission = match batching {
            Some(b) => b.admit(rule, ex.context_id(), call, now),
            None => Admission::CallNow(call),
        };
        let mut call = match admission {
            Admission::CallNow(call) => call,
            Admission::Waits => {
                self.waiting = Some((rule, ex.context_id()));
                return Flow::Paused;
            }
        };
        // The call keeps what deciding needs (rule, key); the descriptor goes.
        let request = request_bytes(&global.domain, vec![std::mem::take(&mut call.descriptor)]);
        match host::grpc_call(
            &global.grpc_service,
            rls::SERVICE,
            rls::METHOD,
            &request,
            global.timeout,
        ) {
            Ok(token) => {
                if let Some(size) = state.global_stats(rule).and_then(|g| g.batch_size) {
                    size.record(1);
                }
                self.pending = Some(Pending {
                    token,
                    call,
                    started: now,
                });
                Flow::Paused
            }
            Err(status) => {
                if let Some(g) = state.global_stats(rule) {
                    g.call_not_started(state.rule_name(rule), &global.service, status);
                }
                if let Some(b) = batching {
                    b.ended(rule);
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

impl Drop for RatelimitStream {
    /// A stream that goes away while it waits: its own call's answer can no
    /// longer reach it (so, for the batch, that call ended); a batch not yet
    /// sent no longer carries it.
    fn drop(&mut self) {
        let Some(batching) = &self.state.batching else {
            return;
        };
        if let Some(pending) = self.pending.take() {
            batching.ended(pending.call.rule);
        }
        if let Some((rule, stream)) = self.waiting.take() {
            batching.leave(rule, stream);
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
            Check::Ask(call) => self.ask(call, ex, now),
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
        let state = Rc::clone(&self.state);
        let rule = pending.call.rule;
        if let (Some(g), Some(global)) = (state.global_stats(rule), state.global(rule)) {
            let ended = EndedCall {
                rule: state.rule_name(rule),
                global,
                status: status_code,
                elapsed: now.saturating_sub(pending.started),
                timeout: global.timeout,
            };
            let answer = body.as_ref().map(|bytes| [read_answer(bytes)]);
            g.record_call(&ended, answer.as_ref().map(|a| a.as_slice()));
        }
        if let Some(b) = &state.batching {
            b.ended(rule);
        }
        let verdict = state.limiter.conclude_with(
            &pending.call,
            outcome,
            &HostStore,
            &state.remembered_until,
            now,
        );
        Some(self.act(verdict))
    }

    fn on_delivery(&mut self, _ex: &mut Exchange, delivery: &dyn Any) -> Option<Flow> {
        let verdict = delivery.downcast_ref::<Verdict>()?;
        self.waiting.take()?;
        Some(self.act(*verdict))
    }
}
