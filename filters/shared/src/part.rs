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

use std::any::Any;
use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::Duration;

use proxy_wasm::hostcalls;
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
    /// The stream's context id.
    context_id: u32,
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
    pub fn new(context_id: u32, others_may_reroute: bool, plan: HeaderPlan) -> Exchange {
        Exchange {
            context_id,
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

    /// The stream's context id (what [`deliver`] takes).
    pub fn context_id(&self) -> u32 {
        self.context_id
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
    /// An answer the root context hands over ([`deliver`]): `None` if it is
    /// not this part's, else what the part did.
    fn on_delivery(&mut self, _ex: &mut Exchange, _delivery: &dyn Any) -> Option<Flow> {
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
    /// A message arrived in a shared queue the policy registered.
    fn on_queue_ready(&self, _queue: u32) {}
    /// The answer to a gRPC call the policy made from the root context:
    /// false if the call is not the policy's.
    fn on_root_grpc_response(&self, _token: u32, _status: u32, _size: usize) -> bool {
        false
    }
}

/// A paused stream that the root context can hand an answer to.
pub trait Wake {
    fn wake(&mut self, delivery: &dyn Any);
}

/// A paused stream as the root context may reach it. Weak: the SDK owns it.
pub type PausedStream = Weak<RefCell<dyn Wake>>;

thread_local! {
    /// The worker's paused streams by context id. Weak: the SDK owns them.
    /// A list, not a map: it holds the streams paused at once on one worker
    /// (tens), and a hash map's code costs the module kilobytes.
    static PAUSED: RefCell<Vec<(u32, PausedStream)>> = const { RefCell::new(Vec::new()) };
}

/// Lets the root context reach a paused stream (a module's stream wrapper,
/// when a part pauses it).
pub fn register_paused(context_id: u32, stream: PausedStream) {
    PAUSED.with(|p| p.borrow_mut().push((context_id, stream)));
}

/// The stream is no longer paused, or goes away.
pub fn unregister_paused(context_id: u32) {
    take_paused(context_id);
}

fn take_paused(context_id: u32) -> Option<PausedStream> {
    PAUSED.with(|p| {
        let mut p = p.borrow_mut();
        let at = p.iter().position(|(id, _)| *id == context_id)?;
        Some(p.swap_remove(at).1)
    })
}

/// Hands `delivery` to the paused stream `context_id` from the root context
/// `root_id`: its host calls then act on that stream (proxy-wasm's effective
/// context), and the root's own calls go on afterwards. False if the stream
/// went away.
pub fn deliver(context_id: u32, root_id: u32, delivery: &dyn Any) -> bool {
    let Some(stream) = take_paused(context_id).and_then(|w| w.upgrade()) else {
        return false;
    };
    if hostcalls::set_effective_context(context_id).is_err() {
        return false;
    }
    let woken = match stream.try_borrow_mut() {
        Ok(mut s) => {
            s.wake(delivery);
            true
        }
        Err(_) => false,
    };
    let _ = hostcalls::set_effective_context(root_id);
    woken
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

impl<P: Policy> Context for Alone<P> {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        if let Some(policy) = &self.policy {
            policy.on_root_grpc_response(token_id, status_code, response_size);
        }
    }
}

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

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Some(policy) = &self.policy {
            policy.on_queue_ready(queue_id);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let policy = self.policy.as_ref()?;
        let mut ex = Exchange::new(context_id, true, self.plan);
        let part = policy.stream(&mut ex);
        Some(Box::new(AloneStream(Rc::new(RefCell::new(AloneState {
            ex,
            part,
        })))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// A stream of a filter's own module. Shared (`Rc`) so that the root context
/// can wake it while it is paused ([`deliver`]); Envoy runs what a callback
/// asks of a stream (resume, local reply) after the callback returns, so a
/// stream is never entered while it is being woken.
struct AloneStream<S: Part + 'static>(Rc<RefCell<AloneState<S>>>);

struct AloneState<S: Part> {
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

impl<S: Part + 'static> AloneStream<S> {
    fn state(&self) -> std::cell::RefMut<'_, AloneState<S>> {
        self.0.borrow_mut()
    }
}

impl<S: Part + 'static> Wake for AloneState<S> {
    fn wake(&mut self, delivery: &dyn Any) {
        self.ex.next_callback();
        if self.part.on_delivery(&mut self.ex, delivery) == Some(Flow::Continue) {
            host::resume_request();
        }
    }
}

impl<S: Part + 'static> Drop for AloneStream<S> {
    fn drop(&mut self) {
        let id = self.state().ex.context_id;
        unregister_paused(id);
    }
}

impl<S: Part + 'static> Context for AloneStream<S> {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let mut s = self.state();
        s.ex.next_callback();
        let AloneState { ex, part } = &mut *s;
        let flow = part.on_grpc_call_response(ex, token_id, status_code, response_size);
        if flow == Some(Flow::Continue) {
            host::resume_request();
        }
    }

    fn on_done(&mut self) -> bool {
        let mut s = self.state();
        s.ex.next_callback();
        let AloneState { ex, part } = &mut *s;
        part.on_done(ex);
        true
    }
}

impl<S: Part + 'static> HttpContext for AloneStream<S> {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let flow = {
            let mut s = self.state();
            let AloneState { ex, part } = &mut *s;
            part.on_request_headers(ex)
        };
        if flow == Flow::Paused {
            let id = self.state().ex.context_id;
            let weak: PausedStream = Rc::downgrade(&self.0) as PausedStream;
            register_paused(id, weak);
        }
        action(flow)
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.state().part.on_request_body(body_size);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let mut s = self.state();
        s.ex.next_callback();
        let AloneState { ex, part } = &mut *s;
        part.on_response_headers(ex);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.state().part.on_response_body(body_size);
        Action::Continue
    }

    fn on_log(&mut self) {
        let mut s = self.state();
        s.ex.next_callback();
        let AloneState { ex, part } = &mut *s;
        part.on_log(ex);
    }
}
