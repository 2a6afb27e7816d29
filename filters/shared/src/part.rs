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
use crate::outcome::FailureWhen;
use crate::request::{Attribute, HeaderNames, Request};

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

/// How a module's requests read their headers: one host call each, or one
/// call for the whole map (`proxy_get_header_map_pairs`) on the first header
/// asked for. Chosen at configure time from the distinct request headers the
/// configuration may read ([`Policy::request_headers`],
/// [`HeaderNames::cheaper_in_one_call`]). Only the cost depends on it, never
/// a value read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HeaderPlan {
    all_at_once: bool,
}

impl HeaderPlan {
    /// The plan for a configuration that may read these headers per request.
    pub fn for_headers(names: &HeaderNames) -> HeaderPlan {
        HeaderPlan {
            all_at_once: names.cheaper_in_one_call(),
        }
    }

    /// The plan for `policy`'s configuration alone.
    pub fn of<P: Policy>(policy: &P) -> HeaderPlan {
        let mut names = HeaderNames::default();
        policy.request_headers(&mut names);
        HeaderPlan::for_headers(&names)
    }
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
    /// How many times a part of this module re-routed the request.
    reroutes: u32,
    /// `reroutes` when the route was last read again for the end of the
    /// request ([`Exchange::refresh_route`]): later parts share that read.
    refreshed_at: Option<u32>,
    /// The cluster of the target lb-hints chose (the suite's hand-off to the breaker).
    target_cluster: Option<String>,
}

impl Exchange {
    /// `others_may_reroute`: true unless every filter that may re-route this
    /// request runs in this module. `plan`: the configuration's.
    pub fn new(others_may_reroute: bool, plan: HeaderPlan) -> Exchange {
        Exchange {
            request: HostRequest::reading(plan.all_at_once),
            metadata: Vec::new(),
            now: None,
            response_code: None,
            others_may_reroute,
            reroutes: 0,
            refreshed_at: None,
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

    /// `response.code_details`, read only when classifying the status needs
    /// it: `None` (not read) for a status `failure_when` does not count as a
    /// failure, which is then taken as the upstream's; else the details, if any.
    pub fn response_details(&mut self, failure_when: &FailureWhen) -> Option<Option<Vec<u8>>> {
        match self.response_code() {
            Some(code) if !failure_when.is_failure_status(code) => None,
            _ => Some(host::property(&["response", "code_details"])),
        }
    }

    /// Sets (or with `None` removes) a request header; later reads see it.
    pub fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        self.request.set_header(name, value);
    }

    /// A part changed the routing header and cleared Envoy's route cache.
    /// The route, cluster and route metadata read so far stay: until the
    /// request phase ends they are what Envoy answers anyway (in Envoy 1.40
    /// no host call makes it resolve the new route before a filter after
    /// this module asks for it, the router at the latest; docs/suite.md).
    pub fn rerouted(&mut self, target_cluster: Option<&str>) {
        self.reroutes += 1;
        self.target_cluster = target_cluster.map(str::to_string);
    }

    /// Changes whenever a part of this module re-routes the request.
    pub fn route_version(&self) -> u32 {
        self.reroutes
    }

    /// Whether the route read at `version` may not be the one that served
    /// the request (then read it again, after [`Exchange::refresh_route`]).
    pub fn route_changed_since(&self, version: u32) -> bool {
        self.others_may_reroute || self.reroutes != version
    }

    /// Makes the next route read give the route that served the request:
    /// forgets the route and cluster read so far when a filter outside this
    /// module may have re-routed it, or a part of it did. (A route read in
    /// the request phase after a re-route is not the final one: Envoy picks
    /// the new route only when the router asks for it, so it is read again.)
    pub fn refresh_route(&mut self) {
        let due = self.others_may_reroute || self.reroutes > 0;
        if due && self.refreshed_at != Some(self.reroutes) {
            self.refreshed_at = Some(self.reroutes);
            self.request.refresh_route();
            self.metadata.clear();
        }
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
    /// Adds the request headers the configuration may read per request.
    fn request_headers(&self, names: &mut HeaderNames);
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
    plan: HeaderPlan,
}

impl<P: Policy> Alone<P> {
    pub fn root(context_id: u32, configure: fn(u32) -> Option<P>) -> Box<dyn RootContext> {
        Box::new(Alone {
            context_id,
            configure,
            policy: None,
            plan: HeaderPlan::default(),
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
        self.plan = HeaderPlan::of(&policy);
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
        let mut ex = Exchange::new(true, self.plan);
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
