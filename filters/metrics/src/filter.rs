//! The proxy-wasm adapter: the root context compiles the configuration once
//! and owns this worker's series cache; the http context reads the request's
//! labels in the request phase and records everything when the stream ends.

use std::cell::RefCell;
use std::rc::Rc;

use mesh_shared::clock::Clock;
use mesh_shared::host::{self, HostClock, HostRequest, HostStore, Metric};
use mesh_shared::stats::stat_name;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::{Budget, Config, Define, Names, Registry};

const FILTER: &str = "metrics";

proxy_wasm::main! {{
    host::init_logging(FILTER);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { state: None }) });
}}

#[derive(Clone, Copy)]
struct SeriesIds {
    requests: Metric,
    duration: Metric,
    request_bytes: Metric,
    response_bytes: Metric,
}

struct HostMetrics {
    names: Names,
}

fn tag_refs<'a>(tags: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
    tags.iter().map(|(n, v)| (*n, v.as_str())).collect()
}

impl Define for HostMetrics {
    type Gauge = Metric;
    type Series = SeriesIds;

    fn gauge(&mut self, tags: &[(&str, String)]) -> Metric {
        Metric::gauge(&stat_name(&self.names.requests_in_flight, &tag_refs(tags)))
    }

    fn series(&mut self, tags: &[(&str, String)]) -> SeriesIds {
        let tags = tag_refs(tags);
        SeriesIds {
            requests: Metric::counter(&stat_name(&self.names.requests_total, &tags)),
            duration: Metric::histogram(&stat_name(&self.names.request_duration_ms, &tags)),
            request_bytes: Metric::histogram(&stat_name(&self.names.request_bytes, &tags)),
            response_bytes: Metric::histogram(&stat_name(&self.names.response_bytes, &tags)),
        }
    }
}

struct State {
    registry: Registry<HostMetrics>,
    host: HostMetrics,
    series_overflow: Metric,
}

struct Root {
    state: Option<Rc<RefCell<State>>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some((config, scope)) = host::load_config(FILTER, |bytes, scope| {
            Ok((Config::parse(bytes)?, scope.to_string()))
        }) else {
            return false;
        };
        let names = Names::new(&config.prefix);
        // A module cannot choose histogram buckets, the bootstrap does: say
        // what it needs (integers only: no float formatting in the module).
        let buckets: Vec<String> = config
            .duration_buckets_ms
            .iter()
            .map(u64::to_string)
            .collect();
        log::info!(
            "{FILTER}: configured; {} has the configured buckets only with \
                 stats_config.histogram_bucket_settings \
                 [{{match: {{suffix: \"{}\"}}, buckets: [{}]}}]",
            names.request_duration_ms,
            names.request_duration_ms,
            buckets.join(", ")
        );
        let series_overflow = Metric::counter(&names.series_overflow_total);
        let budget = Budget::new(&scope, &config);
        budget.create(&HostStore);
        self.state = Some(Rc::new(RefCell::new(State {
            registry: Registry::new(config.labels, budget),
            host: HostMetrics { names },
            series_overflow,
        })));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let state = Rc::clone(self.state.as_ref()?);
        Some(Box::new(Http {
            state,
            started_nanos: HostClock.now_nanos(),
            key: None,
            request: HostRequest::new(),
            in_flight: None,
            request_bytes: 0,
            response_bytes: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    state: Rc<RefCell<State>>,
    /// When Envoy created the stream's filter chain.
    started_nanos: u64,
    /// Request-side label values, read once in the request phase.
    key: Option<String>,
    /// What the request phase read (kept so the end of the stream re-reads
    /// only the route and cluster).
    request: HostRequest,
    /// The gauge we incremented, to decrement when the stream ends.
    in_flight: Option<Metric>,
    request_bytes: u64,
    response_bytes: u64,
}

// The stream callbacks `impl HttpContext for Http` handles; the build drops
// the exports of the others (mesh_shared::callbacks).
mesh_shared::stream_callbacks!(
    "request_headers",
    "request_body",
    "response_body",
    "log",
    "done"
);

impl Context for Http {
    fn on_done(&mut self) -> bool {
        true
    }
}

impl Http {
    fn request_key(&mut self) -> String {
        let state = self.state.borrow();
        state.registry.labels().request_key(&mut self.request)
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let key = self.request_key();
        let mut guard = self.state.borrow_mut();
        let state = &mut *guard;
        let gauge = state.registry.gauge(&key, &HostStore, &mut state.host);
        gauge.ids.add(1);
        drop(guard);
        self.in_flight = Some(gauge.ids);
        self.key = Some(key);
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.request_bytes += body_size as u64;
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.response_bytes += body_size as u64;
        Action::Continue
    }

    /// The stream is over (answered, reset or aborted): record it once.
    fn on_log(&mut self) {
        // No request phase (an earlier filter answered): the request-side
        // labels are read now; what Envoy no longer has reads as "unknown".
        // A later filter (lb-hints) may have re-routed the request: count it
        // under the route and cluster that served it. The in-flight gauge
        // keeps the request-phase labels it was raised under.
        let route_labels_on = {
            let state = self.state.borrow();
            let labels = state.registry.labels();
            labels.route || labels.cluster
        };
        let key = match self.key.take() {
            Some(k) if !route_labels_on => k,
            _ => {
                self.request.refresh_route();
                self.request_key()
            }
        };
        let status = host::response_code();
        let elapsed_ms = HostClock.now_nanos().saturating_sub(self.started_nanos) / 1_000_000;
        let mut guard = self.state.borrow_mut();
        let state = &mut *guard;
        let status = state.registry.labels().status_key(status);
        let found = state
            .registry
            .series(&key, status, &HostStore, &mut state.host);
        if found.folded {
            state.series_overflow.add(1);
        }
        let ids = found.ids;
        ids.requests.add(1);
        ids.duration.record(elapsed_ms);
        ids.request_bytes.record(self.request_bytes);
        ids.response_bytes.record(self.response_bytes);
        drop(guard);
        // Last, so a scrape that sees the request gone also sees it counted.
        if let Some(gauge) = self.in_flight.take() {
            gauge.add(-1);
        }
    }
}
