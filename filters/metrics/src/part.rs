//! metrics' adapter logic as a part (`mesh_shared::part`): the policy
//! compiles the configuration once and owns this worker's series cache; the
//! stream reads the request's labels in the request phase and records
//! everything when the stream ends. Run alone by this crate's module
//! (`filter.rs`) and by the suite.

use std::cell::RefCell;
use std::rc::Rc;

use mesh_shared::host::{self, HostStore, Metric};
use mesh_shared::part::{Exchange, Flow, Part, Policy};
use mesh_shared::request::HeaderNames;
use mesh_shared::stats::stat_name;

use crate::{Budget, Config, Define, Names, Registry};

pub const FILTER: &str = "metrics";

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
}

/// The configured filter: this worker's series cache.
pub struct Metrics {
    state: RefCell<State>,
    series_overflow: Metric,
    /// Whether a label (route, cluster) depends on the route.
    route_labels: bool,
    /// Whether a label shows the response's status (else it is not read).
    status_labels: bool,
}

impl Metrics {
    /// Creates the shared series budget and defines the overflow counter
    /// (configure time); `scope` names the plugin instance.
    pub fn new(config: Config, scope: &str) -> Metrics {
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
        let budget = Budget::new(scope, &config);
        budget.create(&HostStore);
        let route_labels = config.labels.route || config.labels.cluster;
        let status_labels = config.labels.status_code || config.labels.status_class;
        Metrics {
            state: RefCell::new(State {
                registry: Registry::new(config.labels, budget),
                host: HostMetrics { names },
            }),
            series_overflow,
            route_labels,
            status_labels,
        }
    }

    fn request_key(&self, ex: &mut Exchange) -> String {
        self.state.borrow().registry.labels().request_key(ex)
    }
}

impl Policy for Metrics {
    type Stream = MetricsStream;

    fn request_headers(&self, names: &mut HeaderNames) {
        self.state.borrow().registry.labels().request_headers(names);
    }

    fn stream(self: &Rc<Self>, ex: &mut Exchange) -> MetricsStream {
        MetricsStream {
            state: Rc::clone(self),
            started_nanos: ex.now(),
            key: None,
            key_route: 0,
            in_flight: None,
            request_bytes: 0,
            response_bytes: 0,
        }
    }
}

/// One request's metrics state.
pub struct MetricsStream {
    state: Rc<Metrics>,
    /// When Envoy created the stream's filter chain.
    started_nanos: u64,
    /// Request-side label values, read once in the request phase.
    key: Option<String>,
    /// The route version (`Exchange::route_version`) the key was read at.
    key_route: u32,
    /// The gauge we incremented, to decrement when the stream ends.
    in_flight: Option<Metric>,
    request_bytes: u64,
    response_bytes: u64,
}

impl Part for MetricsStream {
    fn on_request_headers(&mut self, ex: &mut Exchange) -> Flow {
        let key = self.state.request_key(ex);
        let mut guard = self.state.state.borrow_mut();
        let state = &mut *guard;
        let gauge = state.registry.gauge(&key, &HostStore, &mut state.host);
        gauge.ids.add(1);
        drop(guard);
        self.in_flight = Some(gauge.ids);
        self.key = Some(key);
        self.key_route = ex.route_version();
        Flow::Continue
    }

    fn on_request_body(&mut self, size: usize) {
        self.request_bytes += size as u64;
    }

    fn on_response_body(&mut self, size: usize) {
        self.response_bytes += size as u64;
    }

    /// The stream is over (answered, reset or aborted): record it once.
    fn on_log(&mut self, ex: &mut Exchange) {
        // No request phase (an earlier filter answered): the request-side
        // labels are read now; what Envoy no longer has reads as "unknown".
        // lb-hints may have re-routed the request: count it under the route
        // and cluster that served it. The in-flight gauge keeps the
        // request-phase labels it was raised under.
        let stale = self.state.route_labels && ex.route_changed_since(self.key_route);
        let key = match self.key.take() {
            Some(k) if !stale => k,
            _ => {
                ex.refresh_route();
                self.state.request_key(ex)
            }
        };
        let status = if self.state.status_labels {
            ex.response_code()
        } else {
            None
        };
        let elapsed_ms = ex.now().saturating_sub(self.started_nanos) / 1_000_000;
        let mut guard = self.state.state.borrow_mut();
        let state = &mut *guard;
        let status = state.registry.labels().status_key(status);
        let found = state
            .registry
            .series(&key, status, &HostStore, &mut state.host);
        if found.folded {
            self.state.series_overflow.add(1);
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

/// Reads the plugin configuration (metrics' own module).
pub fn configure() -> Option<Metrics> {
    let (config, scope) = host::load_config(FILTER, |bytes, scope| {
        Ok((Config::parse(bytes)?, scope.to_string()))
    })?;
    Some(Metrics::new(config, &scope))
}
