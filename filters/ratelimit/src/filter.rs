//! The proxy-wasm adapter: the root context compiles the configuration once,
//! the http context asks the core and acts on its verdict.

use std::rc::Rc;

use mesh_shared::clock::Clock;
use mesh_shared::host::{self, HostClock, HostRequest, HostStore, Metric};
use mesh_shared::stats::stat_name;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::{Config, RateLimiter, Verdict};

const FILTER: &str = "ratelimit";

proxy_wasm::main! {{
    host::init_logging(FILTER);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { state: None }) });
}}

/// Stat ids of one rule, defined once at configure time.
struct RuleStats {
    allowed: Metric,
    limited: Metric,
    shadow_limited: Metric,
    denied_missing_key: Metric,
    failed_open: Metric,
    overflow: Metric,
}

impl RuleStats {
    fn define(rule: &str) -> RuleStats {
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
        }
    }

    fn count(&self, verdict: &Verdict) {
        let metric = match verdict {
            Verdict::NoRule => return,
            Verdict::Allowed { .. } => self.allowed,
            Verdict::Limited { .. } => self.limited,
            Verdict::ShadowLimited { .. } => self.shadow_limited,
            Verdict::DeniedMissingKey { .. } => self.denied_missing_key,
            Verdict::FailedOpen { .. } => self.failed_open,
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

struct State {
    limiter: RateLimiter,
    stats: Vec<RuleStats>,
}

struct Root {
    state: Option<Rc<State>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = host::load_config(FILTER, Config::parse) else {
            return false;
        };
        let limiter = RateLimiter::new(config);
        limiter.create_tables(&HostStore);
        let stats = limiter
            .config
            .rules
            .iter()
            .map(|r| RuleStats::define(&r.name))
            .collect();
        log::info!(
            "{FILTER}: configured {} rule(s)",
            limiter.config.rules.len()
        );
        self.state = Some(Rc::new(State { limiter, stats }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let state = Rc::clone(self.state.as_ref()?);
        Some(Box::new(Http {
            state,
            verdict: Verdict::NoRule,
            replied: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    state: Rc<State>,
    verdict: Verdict,
    /// We answered locally; Envoy still runs our response callbacks for it.
    replied: bool,
}

// The stream callbacks `impl HttpContext for Http` handles; the build drops
// the exports of the others (mesh_shared::callbacks).
mesh_shared::stream_callbacks!("request_headers", "response_headers");

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let state = &self.state;
        let verdict =
            state
                .limiter
                .check(&mut HostRequest::new(), &HostStore, HostClock.now_nanos());
        if let Some(stats) = verdict.rule().and_then(|r| state.stats.get(r)) {
            stats.count(&verdict);
        }
        if verdict.rejects() {
            let headers = state.limiter.headers(&verdict);
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let response = &state.limiter.config.response;
            host::send_local_reply(response.status, &headers, response.body.as_bytes());
            self.replied = true;
            return Action::Pause;
        }
        self.verdict = verdict;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if !self.replied {
            for (name, value) in self.state.limiter.headers(&self.verdict) {
                self.add_http_response_header(name, &value);
            }
        }
        Action::Continue
    }
}
