//! The protocol between a filter's adapter logic (its "part") and the module
//! that runs it (wasm32 only): a filter's own module runs one part
//! ([`Alone`]), `filters/suite` runs four in one pass over each request.
//!
//! A part is two types: the configured policy ([`Policy`], one per
//! configuration, shared by the worker's streams) and its per-request state
//! ([`Part`], one per stream, made by [`Policy::stream`]). Each callback gets
//! the request's [`Exchange`]: the request inputs read lazily and at most once
//! per request (headers, attributes, route metadata, the response code), the
//! clock read once per callback, and what one part hands to the next in the
//! same module (lb-hints' re-route and chosen cluster).

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::clock::Clock;
use crate::host::{self, HostClock, HostRequest};
use crate::request::{Attribute, Request};

/// What a part did with the request headers (or an RLS answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on: the next part, then the upstream.
    Continue,
    /// The part answered locally: the later parts do not run for this request.
    Answered,
    /// The part waits for an asynchronous answer (a gRPC call); the request
    /// stays paused, the later parts run once the answer says `Continue`.
    Paused,
}

/// One request as the parts of a module see it.
pub struct Exchange {
    request: HostRequest,
    /// Route metadata by filter name, read once each.
    metadata: Vec<(&'static str, Option<Vec<u8>>)>,
    /// The clock of the current callback.
    now: Option<u64>,
    response_code: Option<Option<u32>>,
    /// Filters outside this module may re-route the request (a filter's own
    /// module in a chain); in the suite only lb-hints can, and says so.
    others_may_reroute: bool,
    rerouted: bool,
    /// The cluster of the target lb-hints chose (the suite's hand-off to the breaker).
    target_cluster: Option<String>,
}

impl Exchange {
    /// `others_may_reroute`: true unless every filter that may re-route this
    /// request runs in this module.
    pub fn new(others_may_reroute: bool) -> Exchange {
        Exchange {
            request: HostRequest::new(),
            metadata: Vec::new(),
            now: None,
            response_code: None,
            others_may_reroute,
            rerouted: false,
            target_cluster: None,
        }
    }

    /// The clock, read once per callback.
    pub fn now(&mut self) -> u64 {
        *self.now.get_or_insert_with(|| HostClock.now_nanos())
    }

    /// A new callback begins: the clock is read again when asked.
    pub fn next_callback(&mut self) {
        self.now = None;
    }

    /// The upstream's status (`response.code`), read once, in the response phase.
    pub fn response_code(&mut self) -> Option<u32> {
        *self.response_code.get_or_insert_with(host::response_code)
    }

    /// A part changed the routing header and cleared Envoy's route cache:
    /// the route, cluster and route metadata read so far are stale.
    pub fn rerouted(&mut self, target_cluster: Option<&str>) {
        self.request.refresh_route();
        self.metadata.clear();
        self.rerouted = true;
        self.target_cluster = target_cluster.map(str::to_string);
    }

    /// Whether the route read in the request phase may not be the one that
    /// served the request (then read it again from the response phase on).
    pub fn route_may_have_changed(&self) -> bool {
        self.others_may_reroute || self.rerouted
    }

    /// Forgets the route and cluster read so far (see [`HostRequest::refresh_route`]).
    pub fn refresh_route(&mut self) {
        self.request.refresh_route();
        self.metadata.clear();
    }

    /// The cluster of the target an earlier part of this module chose.
    pub fn target_cluster(&self) -> Option<&str> {
        self.target_cluster.as_deref()
    }

    /// The cluster that serves the request: the chosen target's, else
    /// `xds.cluster_name` (read at the time of the call, not cached).
    pub fn served_cluster(&self) -> Option<Vec<u8>> {
        match &self.target_cluster {
            Some(c) => Some(c.as_bytes().to_vec()),
            None => host::property(&["xds", "cluster_name"]),
        }
    }
}

impl Request for Exchange {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.request.header(name)
    }

    fn attribute(&mut self, attr: Attribute) -> Option<&[u8]> {
        self.request.attribute(attr)
    }

    fn route_metadata(&mut self, filter: &str) -> Option<&[u8]> {
        // Filter names are the parts' constants: one cache slot each.
        let name = *KNOWN_FILTERS.iter().find(|f| **f == filter)?;
        let i = match self.metadata.iter().position(|(f, _)| *f == name) {
            Some(i) => i,
            None => {
                let value = host::property(&crate::route_metadata::property_path(name));
                self.metadata.push((name, value));
                self.metadata.len() - 1
            }
        };
        self.metadata.get(i).and_then(|(_, v)| v.as_deref())
    }
}

/// The filter names under `mesh-filters` route metadata.
const KNOWN_FILTERS: &[&str] = &["metrics", "ratelimit", "lb-hints", "circuit-breaker"];

/// A part's per-request state and steps. Every step has a default that does
/// nothing, so a part names only the callbacks it handles.
pub trait Part {
    fn on_request_headers(&mut self, _ex: &mut Exchange) -> Flow {
        Flow::Continue
    }
    fn on_request_body(&mut self, _size: usize) {}
    fn on_response_headers(&mut self, _ex: &mut Exchange) {}
    fn on_response_body(&mut self, _size: usize) {}
    /// The stream is over (answered, reset or aborted).
    fn on_log(&mut self, _ex: &mut Exchange) {}
    /// The stream's context goes away (after or instead of `on_log`).
    fn on_done(&mut self, _ex: &mut Exchange) {}
    /// A gRPC answer: `None` if the call is not this part's, else what the
    /// part did (`Continue` means the paused request may go on).
    fn on_grpc_call_response(
        &mut self,
        _ex: &mut Exchange,
        _token: u32,
        _status: u32,
        _size: usize,
    ) -> Option<Flow> {
        None
    }
}

/// A configured part: one per configuration, shared by the worker's streams.
pub trait Policy: 'static {
    type Stream: Part + 'static;
    /// The per-request state of a new stream (its context is created).
    fn stream(self: &Rc<Self>, ex: &mut Exchange) -> Self::Stream;
    /// How often [`Policy::tick`] should run, if at all.
    fn tick_period(&self) -> Option<Duration> {
        None
    }
    fn tick(&self) {}
}

/// A filter's own module: one part alone in the VM.
/// `configure(root_context_id)` reads and compiles the plugin configuration.
pub struct Alone<P: Policy> {
    context_id: u32,
    configure: fn(u32) -> Option<P>,
    policy: Option<Rc<P>>,
}

impl<P: Policy> Alone<P> {
    pub fn root(context_id: u32, configure: fn(u32) -> Option<P>) -> Box<dyn RootContext> {
        Box::new(Alone {
            context_id,
            configure,
            policy: None,
        })
    }
}

impl<P: Policy> Context for Alone<P> {}

impl<P: Policy> RootContext for Alone<P> {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(policy) = (self.configure)(self.context_id) else {
            return false;
        };
        if let Some(period) = policy.tick_period() {
            self.set_tick_period(period);
        }
        self.policy = Some(Rc::new(policy));
        true
    }

    fn on_tick(&mut self) {
        if let Some(policy) = &self.policy {
            policy.tick();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let policy = self.policy.as_ref()?;
        let mut ex = Exchange::new(true);
        let part = policy.stream(&mut ex);
        Some(Box::new(AloneStream { ex, part }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct AloneStream<S: Part> {
    ex: Exchange,
    part: S,
}

/// The proxy-wasm action for a part's flow.
pub fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Answered | Flow::Paused => Action::Pause,
    }
}

impl<S: Part> Context for AloneStream<S> {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        self.ex.next_callback();
        let flow =
            self.part
                .on_grpc_call_response(&mut self.ex, token_id, status_code, response_size);
        if flow == Some(Flow::Continue) {
            host::resume_request();
        }
    }

    fn on_done(&mut self) -> bool {
        self.ex.next_callback();
        self.part.on_done(&mut self.ex);
        true
    }
}

impl<S: Part> HttpContext for AloneStream<S> {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        action(self.part.on_request_headers(&mut self.ex))
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.part.on_request_body(body_size);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        self.ex.next_callback();
        self.part.on_response_headers(&mut self.ex);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.part.on_response_body(body_size);
        Action::Continue
    }

    fn on_log(&mut self) {
        self.ex.next_callback();
        self.part.on_log(&mut self.ex);
    }
}
