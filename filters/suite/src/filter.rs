//! The suite module: the four filters' parts (`mesh_shared::part`) in one
//! VM, one pass over each request in the order metrics -> ratelimit ->
//! lb-hints -> circuit-breaker, sharing one `Exchange` per request.

use std::any::Any;
use std::cell::{RefCell, RefMut};
use std::rc::Rc;

use circuit_breaker::part::{Breaker, BreakerStream};
use lb_hints::part::{LbHints, LbHintsStream};
use mesh_shared::host;
use mesh_shared::part::{
    action, register_paused, unregister_paused, Exchange, Flow, HeaderPlan, Part, PausedStream,
    Policy, Wake,
};
use metrics::part::{Metrics, MetricsStream};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use ratelimit::part::{Ratelimit, RatelimitStream};

use crate::Config;
use mesh_shared::request::HeaderNames;

const MODULE: &str = "suite";

proxy_wasm::main! {{
    host::init_logging(MODULE);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root { context_id, parts: None, plan: HeaderPlan::default() })
    });
}}

/// The configured parts; `None` is off.
struct Parts {
    metrics: Option<Rc<Metrics>>,
    ratelimit: Option<Rc<Ratelimit>>,
    lb_hints: Option<Rc<LbHints>>,
    breaker: Option<Rc<Breaker>>,
}

struct Root {
    context_id: u32,
    parts: Option<Parts>,
    plan: HeaderPlan,
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        if let Some(ratelimit) = self.parts.as_ref().and_then(|p| p.ratelimit.as_ref()) {
            ratelimit.on_root_grpc_response(token_id, status_code, response_size);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some((config, scope)) = host::load_config(MODULE, |bytes, scope| {
            Ok((Config::parse(bytes, scope)?, scope.to_string()))
        }) else {
            return false;
        };
        // One plan for all parts: a header two parts read is read once.
        let mut names = HeaderNames::default();
        config.request_headers(&mut names);
        self.plan = HeaderPlan::for_headers(&names);
        let parts = Parts {
            metrics: config.metrics.map(|c| Rc::new(Metrics::new(c, &scope))),
            ratelimit: config
                .ratelimit
                .map(|c| Rc::new(Ratelimit::new(c, self.context_id))),
            lb_hints: config
                .lb_hints
                .map(|c| Rc::new(LbHints::new(c, self.context_id))),
            breaker: config.circuit_breaker.map(|c| Rc::new(Breaker::new(c))),
        };
        if let Some(period) = parts.breaker.as_ref().and_then(|b| b.tick_period()) {
            self.set_tick_period(period);
        }
        self.parts = Some(parts);
        true
    }

    fn on_tick(&mut self) {
        if let Some(breaker) = self.parts.as_ref().and_then(|p| p.breaker.as_ref()) {
            breaker.tick();
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Some(ratelimit) = self.parts.as_ref().and_then(|p| p.ratelimit.as_ref()) {
            ratelimit.on_queue_ready(queue_id);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let parts = self.parts.as_ref()?;
        // Only the suite's lb-hints re-routes (docs/suite.md).
        let mut ex = Exchange::new(context_id, false, self.plan);
        Some(Box::new(Shared(Rc::new(RefCell::new(Stream {
            metrics: parts.metrics.as_ref().map(|p| p.stream(&mut ex)),
            ratelimit: parts.ratelimit.as_ref().map(|p| p.stream(&mut ex)),
            lb_hints: parts.lb_hints.as_ref().map(|p| p.stream(&mut ex)),
            breaker: parts.breaker.as_ref().map(|p| p.stream(&mut ex)),
            ex,
            resume_at: 0,
        })))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// A stream as the SDK holds it. Shared (`Rc`) so that the root context can
/// wake it while it is paused (`mesh_shared::part::deliver`); Envoy runs what
/// a callback asks of a stream after the callback returns, so a stream is
/// never entered while it is being woken.
struct Shared(Rc<RefCell<Stream>>);

impl Shared {
    fn stream(&self) -> RefMut<'_, Stream> {
        self.0.borrow_mut()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let id = self.stream().ex.context_id();
        unregister_paused(id);
    }
}

/// One request through the parts that are on.
struct Stream {
    ex: Exchange,
    metrics: Option<MetricsStream>,
    ratelimit: Option<RatelimitStream>,
    lb_hints: Option<LbHintsStream>,
    breaker: Option<BreakerStream>,
    /// The first part whose request phase has not run yet (after a pause).
    resume_at: usize,
}

fn on(part: &mut Option<impl Part>) -> Option<&mut dyn Part> {
    part.as_mut().map(|p| p as &mut dyn Part)
}

impl Stream {
    /// The request, the parts in pass order.
    fn parts(&mut self) -> (&mut Exchange, [Option<&mut dyn Part>; 4]) {
        (
            &mut self.ex,
            [
                on(&mut self.metrics),
                on(&mut self.ratelimit),
                on(&mut self.lb_hints),
                on(&mut self.breaker),
            ],
        )
    }

    /// Runs the request phase of the parts from `resume_at` on, until one
    /// answers locally or pauses.
    fn request_phase(&mut self) -> Flow {
        let from = self.resume_at;
        let (ex, parts) = self.parts();
        let mut stopped = (usize::MAX, Flow::Continue);
        for (i, part) in parts.into_iter().enumerate().skip(from) {
            let Some(part) = part else { continue };
            match part.on_request_headers(ex) {
                Flow::Continue => {}
                Flow::Answered => {
                    stopped = (usize::MAX, Flow::Answered);
                    break;
                }
                Flow::Paused => {
                    stopped = (i + 1, Flow::Paused);
                    break;
                }
            }
        }
        self.resume_at = stopped.0;
        stopped.1
    }
}

// The union of the stream callbacks the parts handle; the build drops the
// exports of the others (mesh_shared::callbacks).
mesh_shared::stream_callbacks!(
    "request_headers",
    "request_body",
    "response_headers",
    "response_body",
    "log",
    "done"
);

impl Stream {
    /// An answer let the request go on: the remaining parts run now.
    fn go_on(&mut self, answer: Option<Flow>) {
        if answer == Some(Flow::Continue) && self.request_phase() == Flow::Continue {
            host::resume_request();
        }
    }
}

impl Wake for Stream {
    fn wake(&mut self, delivery: &dyn Any) {
        self.ex.next_callback();
        let Some(ratelimit) = self.ratelimit.as_mut() else {
            return;
        };
        let answer = ratelimit.on_delivery(&mut self.ex, delivery);
        self.go_on(answer);
    }
}

impl Context for Shared {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let mut s = self.stream();
        s.ex.next_callback();
        let Stream { ex, ratelimit, .. } = &mut *s;
        let Some(ratelimit) = ratelimit.as_mut() else {
            return;
        };
        let answer = ratelimit.on_grpc_call_response(ex, token_id, status_code, response_size);
        s.go_on(answer);
    }

    fn on_done(&mut self) -> bool {
        let mut s = self.stream();
        s.ex.next_callback();
        let (ex, parts) = s.parts();
        for part in parts.into_iter().flatten() {
            part.on_done(ex);
        }
        true
    }
}

impl HttpContext for Shared {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let (flow, id) = {
            let mut s = self.stream();
            (s.request_phase(), s.ex.context_id())
        };
        if flow == Flow::Paused {
            let weak: PausedStream = Rc::downgrade(&self.0) as PausedStream;
            register_paused(id, weak);
        }
        action(flow)
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if let Some(m) = self.stream().metrics.as_mut() {
            m.on_request_body(body_size);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let mut s = self.stream();
        s.ex.next_callback();
        // Response order, as Envoy runs a chain's encoders: last part first.
        let (ex, parts) = s.parts();
        for part in parts.into_iter().rev().flatten() {
            part.on_response_headers(ex);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if let Some(m) = self.stream().metrics.as_mut() {
            m.on_response_body(body_size);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let mut s = self.stream();
        s.ex.next_callback();
        let (ex, parts) = s.parts();
        for part in parts.into_iter().flatten() {
            part.on_log(ex);
        }
    }
}
