//! The calls to the RLS service: their stats, and the batched calls that
//! the root context makes for the worker's waiting streams (`batch.rs`).

use std::cell::{Cell, RefCell};
use std::time::Duration;

use mesh_shared::clock::Clock;
use mesh_shared::host::{self, HostClock, HostStore, Metric};
use mesh_shared::part::deliver;
use mesh_shared::stats::stat_name;
use mesh_shared::store::{self, Step};
use proxy_wasm::hostcalls;

use super::{requests_counter, Ratelimit, FILTER};
use crate::batch::{Admission, Batcher, Next, Waiter};
use crate::global::{read_answers, request_bytes, unavailable_reason, Answer};
use crate::{rls, Config, Global, GlobalCall};

/// Calls to the RLS service of a global rule, by outcome, and their latency.
pub(super) struct GlobalStats {
    pub(super) limited: Metric,
    pub(super) failure_denied: Metric,
    pub(super) ok: Metric,
    pub(super) over_limit: Metric,
    pub(super) timeout: Metric,
    pub(super) unavailable: Metric,
    pub(super) error: Metric,
    pub(super) invalid: Metric,
    pub(super) not_started: Metric,
    pub(super) duration_ms: Metric,
    /// Descriptors per call (rules with `max_batch` > 1 only).
    pub(super) batch_size: Option<Metric>,
    /// Requests that waited out their timeout for a batched call (idem).
    pub(super) expired: Option<Metric>,
    /// A call failure has been logged on this worker (logged once, not per request).
    pub(super) logged_failure: Cell<bool>,
}

impl GlobalStats {
    pub(super) fn define(rule: &str, batches: bool) -> GlobalStats {
        let calls = |outcome: &str| {
            Metric::counter(&stat_name(
                "mesh_ratelimit_global_calls_total",
                &[("rule", rule), ("outcome", outcome)],
            ))
        };
        GlobalStats {
            limited: requests_counter(rule, "global_limited"),
            failure_denied: requests_counter(rule, "failure_denied"),
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
            batch_size: batches.then(|| {
                Metric::histogram(&stat_name(
                    "mesh_ratelimit_global_batch_size",
                    &[("rule", rule)],
                ))
            }),
            expired: batches.then(|| {
                Metric::counter(&stat_name(
                    "mesh_ratelimit_global_expired_total",
                    &[("rule", rule)],
                ))
            }),
            logged_failure: Cell::new(false),
        }
    }

    /// Logs why calls fail, once per worker until a call succeeds again.
    pub(super) fn log_failure(&self, rule: &str, why: &str) {
        if !self.logged_failure.replace(true) {
            log::warn!("{FILTER}: rule {rule}: rate limit service call failed: {why} (failure_mode applies; logged once until a call succeeds)");
        }
    }

    /// Counts a call that ended (`answers`: how its requests were answered,
    /// `Some` for a call that returned a body) and logs why it failed.
    pub(super) fn record_call(&self, ended: &EndedCall<'_>, answers: Option<&[Answer]>) {
        self.duration_ms.record(ended.elapsed / 1_000_000);
        // Envoy ends a call past its timeout with UNAVAILABLE (its 504
        // mapped to gRPC), so the time taken tells a timeout apart.
        // Envoy's timers may fire a little before the clock we read says.
        let timeout = u64::try_from(ended.timeout.as_nanos()).unwrap_or(u64::MAX);
        let timed_out = ended.elapsed.saturating_add((timeout / 20).max(1_000_000)) >= timeout;
        let (metric, why) = match (answers, ended.status) {
            (Some(answers), _) => {
                if answers.contains(&Answer::Invalid) {
                    (
                        self.invalid,
                        Some("an answer that is no RateLimitResponse, or code UNKNOWN".to_string()),
                    )
                } else if answers.iter().any(|a| matches!(a, Answer::OverLimit(_))) {
                    (self.over_limit, None)
                } else {
                    (self.ok, None)
                }
            }
            // gRPC DEADLINE_EXCEEDED, UNAVAILABLE.
            (None, 4) => (self.timeout, Some("timed out".to_string())),
            (None, _) if timed_out => (self.timeout, Some("timed out".to_string())),
            (None, 14) => (
                self.unavailable,
                Some(unavailable_reason(
                    &host::grpc_status_message(),
                    &ended.global.service,
                )),
            ),
            (None, code) => (
                self.error,
                Some(format!(
                    "gRPC status {code}: {}",
                    host::grpc_status_message()
                )),
            ),
        };
        metric.add(1);
        match why {
            Some(why) => self.log_failure(ended.rule, &why),
            None => self.logged_failure.set(false),
        }
    }

    /// A call Envoy would not start.
    pub(super) fn call_not_started(
        &self,
        rule: &str,
        service: &str,
        status: proxy_wasm::types::Status,
    ) {
        self.not_started.add(1);
        self.log_failure(
            rule,
            &format!(
                "Envoy would not start a gRPC call to cluster \"{service}\" ({status:?}: no such cluster?)"
            ),
        );
    }
}

/// A call that ended, for [`GlobalStats::record_call`].
pub(super) struct EndedCall<'a> {
    pub(super) rule: &'a str,
    pub(super) global: &'a Global,
    /// The gRPC status (0: OK).
    pub(super) status: u32,
    pub(super) elapsed: u64,
    /// The call's own timeout (a batched call gets what its requests have left).
    pub(super) timeout: Duration,
}

impl Ratelimit {
    /// Sends every request of `rule` that waits (root context only: the
    /// call's answer comes back to the root, whatever happens to the streams).
    pub(super) fn send_waiting(&self, batching: &Batching, rule: usize, now: u64) {
        let Some(global) = self.global(rule) else {
            return;
        };
        loop {
            let next = match batching.rules.borrow_mut().get_mut(rule) {
                Some(Some(batcher)) => batcher.next(now),
                _ => None,
            };
            let Some(next) = next else { return };
            let (mut waiters, budget) = match next {
                Next::Call(waiters, budget) => (waiters, budget),
                Next::Expired(waiters) => {
                    if let Some(g) = self.global_stats(rule) {
                        if let Some(expired) = g.expired {
                            expired.add(waiters.len() as i64);
                        }
                        g.log_failure(
                            self.rule_name(rule),
                            "requests waited out their timeout for a batched call",
                        );
                    }
                    self.fail_all(batching, &waiters, now);
                    continue;
                }
            };
            // The waiters keep what deciding needs (rule, key); the descriptors go.
            let descriptors = waiters
                .iter_mut()
                .map(|w| std::mem::take(&mut w.call.descriptor))
                .collect();
            let request = request_bytes(&global.domain, descriptors);
            // Whole milliseconds, rounded up: the waiters' timeout ends in this one.
            let timeout = Duration::from_millis(
                u64::try_from(budget.as_nanos().div_ceil(1_000_000)).unwrap_or(1),
            );
            match host::grpc_call(
                &global.grpc_service,
                rls::SERVICE,
                rls::METHOD,
                &request,
                timeout,
            ) {
                Ok(token) => {
                    if let Some(size) = self.global_stats(rule).and_then(|g| g.batch_size) {
                        size.record(waiters.len() as u64);
                    }
                    batching.calls.borrow_mut().push(RootCall {
                        token,
                        rule,
                        waiters,
                        started: now,
                        timeout,
                    });
                }
                Err(status) => {
                    if let Some(g) = self.global_stats(rule) {
                        g.call_not_started(self.rule_name(rule), &global.service, status);
                    }
                    batching.ended(rule);
                    self.fail_all(batching, &waiters, now);
                }
            }
        }
    }

    /// Decides each waiter from its own answer and wakes its stream.
    pub(super) fn answer_all(
        &self,
        batching: &Batching,
        waiters: &[Waiter],
        answers: &[Answer],
        now: u64,
    ) {
        for (waiter, answer) in waiters.iter().zip(answers) {
            let verdict = self.limiter.decide(
                &waiter.call,
                *answer,
                &HostStore,
                &self.remembered_until,
                now,
            );
            // A stream that went away is not counted: its client got no answer.
            deliver(waiter.stream, batching.root_id, &verdict);
        }
    }

    /// Decides each waiter as a failed call (the failure mode) and wakes it.
    fn fail_all(&self, batching: &Batching, waiters: &[Waiter], now: u64) {
        self.answer_all(
            batching,
            waiters,
            &vec![Answer::Invalid; waiters.len()],
            now,
        );
    }

    /// The root's turn after a stream's signal: sends what waits.
    pub(super) fn send_signalled(&self, queue: u32) {
        let Some(batching) = self.batching.as_ref().filter(|b| b.queue == queue) else {
            return;
        };
        let _ = hostcalls::dequeue_shared_queue(queue);
        batching.signalled.set(false);
        let now = HostClock.now_nanos();
        let rules = batching.rules.borrow().len();
        for rule in 0..rules {
            self.send_waiting(batching, rule, now);
        }
    }

    /// The answer to a batched call: decides and wakes each of its streams,
    /// then sends what waited meanwhile. False if the call is not ours.
    pub(super) fn batch_answered(&self, token: u32, status: u32, size: usize) -> bool {
        let Some(batching) = &self.batching else {
            return false;
        };
        let call = {
            let mut calls = batching.calls.borrow_mut();
            let Some(at) = calls.iter().position(|c| c.token == token) else {
                return false;
            };
            calls.swap_remove(at)
        };
        let now = HostClock.now_nanos();
        let n = call.waiters.len();
        let body = if status == 0 {
            host::grpc_response_body(size)
        } else {
            None
        };
        let answers = match &body {
            Some(bytes) => read_answers(bytes, n),
            None => vec![Answer::Invalid; n],
        };
        if let (Some(g), Some(global)) = (self.global_stats(call.rule), self.global(call.rule)) {
            let ended = EndedCall {
                rule: self.rule_name(call.rule),
                global,
                status,
                elapsed: now.saturating_sub(call.started),
                timeout: call.timeout,
            };
            g.record_call(&ended, body.as_ref().map(|_| answers.as_slice()));
        }
        self.answer_all(batching, &call.waiters, &answers, now);
        // No wake-up needed: what waits goes now.
        if let Some(Some(batcher)) = batching.rules.borrow_mut().get_mut(call.rule) {
            batcher.ended();
        }
        self.send_waiting(batching, call.rule, now);
        true
    }
}

/// The worker's batched calls, for rules with `max_batch` > 1 (batch.rs).
pub(super) struct Batching {
    pub(super) root_id: u32,
    /// The worker's own shared queue. A stream cannot make a call for
    /// others: the answer goes to the context that made the call, and would
    /// be lost with the stream. So a stream whose call ended while others
    /// wait puts a message here, and the root context sends them on its turn.
    pub(super) queue: u32,
    /// A message is in the queue and not yet taken.
    pub(super) signalled: Cell<bool>,
    /// By rule index; `None`: the rule does not batch.
    pub(super) rules: RefCell<Vec<Option<Batcher>>>,
    /// The root context's calls in flight (a list: a few at a time).
    pub(super) calls: RefCell<Vec<RootCall>>,
}

pub(super) struct RootCall {
    pub(super) token: u32,
    pub(super) rule: usize,
    pub(super) waiters: Vec<Waiter>,
    pub(super) started: u64,
    pub(super) timeout: Duration,
}

impl Batching {
    pub(super) fn define(config: &Config, root_id: u32) -> Option<Batching> {
        let rules: Vec<Option<Batcher>> = config
            .rules
            .iter()
            .map(|r| {
                let g = r.global.as_ref().filter(|g| g.max_batch > 1)?;
                Some(Batcher::new(g.max_batch, g.timeout))
            })
            .collect();
        if rules.iter().all(Option::is_none) {
            return None;
        }
        // Shared queues are per VM id, so each worker's needs its own name.
        let number = store::update(&HostStore, "mesh.ratelimit.batch.queues", 64, |bytes| {
            let n = bytes
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes)
                + 1;
            Step::Write(n.to_le_bytes().to_vec(), n)
        });
        let queue = number.ok().and_then(|(n, _)| {
            hostcalls::register_shared_queue(&format!("mesh.ratelimit.batch.{n}")).ok()
        });
        let Some(queue) = queue else {
            log::warn!("{FILTER}: no shared queue for batched calls: every request makes its own call (max_batch ignored)");
            return None;
        };
        Some(Batching {
            root_id,
            queue,
            signalled: Cell::new(false),
            rules: RefCell::new(rules),
            calls: RefCell::new(Vec::new()),
        })
    }

    /// A call of `rule` ended: if requests wait and no call will take them
    /// along, the root context must send them. (Here and below: nothing for
    /// a rule that does not batch.)
    pub(super) fn ended(&self, rule: usize) {
        let stranded = match self.rules.borrow_mut().get_mut(rule) {
            Some(Some(batcher)) => {
                batcher.ended();
                batcher.stranded()
            }
            _ => false,
        };
        if stranded && !self.signalled.get() {
            match hostcalls::enqueue_shared_queue(self.queue, Some(b"1")) {
                Ok(()) => self.signalled.set(true),
                // Not seen: the queue is this worker's own. The waiting
                // requests then go when the next call of the rule ends (the
                // next request to come calls at once: batch.rs).
                Err(status) => log::warn!(
                    "{FILTER}: could not wake the root context ({status:?}): batched requests wait for the next call"
                ),
            }
        }
    }

    /// A request of `rule` needs a call (batch.rs, `Batcher::admit`).
    pub(super) fn admit(&self, rule: usize, stream: u32, call: GlobalCall, now: u64) -> Admission {
        match self.rules.borrow_mut().get_mut(rule) {
            Some(Some(batcher)) => batcher.admit(stream, call, now),
            _ => Admission::CallNow(call),
        }
    }

    pub(super) fn leave(&self, rule: usize, stream: u32) {
        if let Some(Some(batcher)) = self.rules.borrow_mut().get_mut(rule) {
            batcher.leave(stream);
        }
    }
}
