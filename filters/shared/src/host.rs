//! The shared traits implemented over the proxy-wasm ABI (wasm32 only).
//!
//! The reads on the hot path (headers, properties, shared data) call the ABI
//! directly instead of the SDK's wrappers: the SDK panics on any status it does
//! not expect (e.g. `BadArgument` for a request header read in the response
//! phase), and a panic kills the VM for every request on that worker. Here an
//! unexpected status is simply "no value".

use std::ptr::{null, null_mut};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MetricType, Status};

use crate::clock::Clock;
use crate::outcome::Outcome;
use crate::request::{host_without_port, ip_without_port, path_without_query, Attribute, Request};
use crate::stats::stat_name;
use crate::store::{Conflict, SharedStore};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_get_header_map_value(
        map_type: i32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> Status;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> Status;
    fn proxy_get_header_map_pairs(
        map_type: i32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

/// Takes ownership of a buffer the host allocated through the module's allocator.
fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: the host allocated `size` bytes with proxy_on_memory_allocate,
    // i.e. with this module's global allocator, and hands them over to us.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// A property such as `["xds", "route_name"]`; `None` if missing or unreadable.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let mut serialized = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
    for part in path {
        serialized.extend_from_slice(part.as_bytes());
        serialized.push(0);
    }
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: pointers are valid for the call; the result is owned as above.
    match unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) }
    {
        Status::Ok => Some(owned(data, size)),
        _ => None,
    }
}

const REQUEST_HEADERS: i32 = 0;
const RESPONSE_HEADERS: i32 = 2;

fn header_value(map: i32, name: &str) -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: as in `property`.
    match unsafe {
        proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size)
    } {
        Status::Ok => Some(owned(data, size)),
        _ => None,
    }
}

/// A request header; only valid in the request phase (`None` otherwise).
pub fn request_header(name: &str) -> Option<Vec<u8>> {
    header_value(REQUEST_HEADERS, name)
}

/// All request headers in one call, serialized as the ABI returns them
/// (see [`pair_value`]); only valid in the request phase.
pub fn request_headers() -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: as in `property`.
    match unsafe { proxy_get_header_map_pairs(REQUEST_HEADERS, &mut data, &mut size) } {
        Status::Ok => Some(owned(data, size)),
        _ => None,
    }
}

/// A response header; only valid in the response phase.
pub fn response_header(name: &str) -> Option<Vec<u8>> {
    header_value(RESPONSE_HEADERS, name)
}

/// The upstream's status code (`response.code`), in the response phase.
pub fn response_code() -> Option<u32> {
    let bytes = property(&["response", "code"])?;
    let raw: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    u32::try_from(i64::from_le_bytes(raw)).ok()
}

/// Envoy shared data of this plugin's `vm_id`.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let mut data = null_mut();
        let mut size = 0;
        let mut cas = 0;
        // SAFETY: as in `property`.
        let status = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        };
        match status {
            Status::Ok => Some((owned(data, size), cas)),
            _ => None,
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Conflict> {
        let ptr = if value.is_empty() {
            null()
        } else {
            value.as_ptr()
        };
        // SAFETY: pointers are valid for the duration of the call.
        match unsafe {
            proxy_set_shared_data(key.as_ptr(), key.len(), ptr, value.len(), cas.unwrap_or(0))
        } {
            Status::Ok => Ok(()),
            _ => Err(Conflict),
        }
    }
}

/// Envoy's clock (`proxy_get_current_time_nanoseconds`).
pub struct HostClock;

impl Clock for HostClock {
    fn now_nanos(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| u64::try_from(d.as_nanos()).ok())
            .unwrap_or(0)
    }
}

/// The current request, read lazily and cached: each header or attribute is
/// fetched from Envoy at most once, and only if a rule asks for it. Headers
/// come one call each, or all in one call on the first one asked for
/// (`all_at_once`, chosen at configure time: `part::HeaderPlan`).
#[derive(Default)]
pub struct HostRequest {
    attributes: [Option<Option<Vec<u8>>>; 6],
    headers: Vec<(String, Option<Vec<u8>>)>,
    route_metadata: Option<Option<Vec<u8>>>,
    all_at_once: bool,
    /// The whole request header map, once read (`all_at_once`).
    all: Option<Vec<u8>>,
}

impl HostRequest {
    pub fn new() -> Self {
        Self::default()
    }

    /// A request whose headers are read all in one call (`true`) or one call each.
    pub fn reading(all_at_once: bool) -> Self {
        HostRequest {
            all_at_once,
            ..Self::default()
        }
    }

    /// Sets (or with `None` removes) a request header; later reads see the
    /// new value. Errors are ignored (the SDK's wrapper would panic).
    pub fn set_header(&mut self, name: &str, value: Option<&str>) {
        let _ =
            hostcalls::set_map_value(proxy_wasm::types::MapType::HttpRequestHeaders, name, value);
        let value = value.map(|v| v.as_bytes().to_vec());
        match self.headers.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.headers.push((name.to_string(), value)),
        }
    }

    /// Forgets the route and cluster read so far: a filter after us may have
    /// re-routed the request, and Envoy reports the final route from the
    /// response phase on.
    pub fn refresh_route(&mut self) {
        for attr in [Attribute::Route, Attribute::Cluster] {
            if let Some(slot) = self.attributes.get_mut(attr.index()) {
                *slot = None;
            }
        }
    }

    /// A header from Envoy (or from the whole map, once read).
    fn lookup(&mut self, name: &str) -> Option<Vec<u8>> {
        if self.all_at_once {
            let map = self
                .all
                .get_or_insert_with(|| request_headers().unwrap_or_default());
            crate::request::pair_value(map, name).map(<[u8]>::to_vec)
        } else {
            request_header(name)
        }
    }

    fn fetch(&mut self, attr: Attribute) -> Option<Vec<u8>> {
        let header = attr.header_name().unwrap_or_default();
        match attr {
            Attribute::Path => self.header(header).map(|p| path_without_query(p).to_vec()),
            Attribute::Method => self.header(header).map(<[u8]>::to_vec),
            Attribute::Host => self
                .header(header)
                .map(|a| host_without_port(a).to_ascii_lowercase()),
            Attribute::Route => property(&["xds", "route_name"]).filter(|r| !r.is_empty()),
            Attribute::Cluster => property(&["xds", "cluster_name"]).filter(|c| !c.is_empty()),
            Attribute::ClientIp => {
                property(&["source", "address"]).map(|a| ip_without_port(&a).to_vec())
            }
        }
    }
}

impl Request for HostRequest {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        let i = match self.headers.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                let value = self.lookup(name);
                self.headers.push((name.to_string(), value));
                self.headers.len() - 1
            }
        };
        self.headers.get(i).and_then(|(_, v)| v.as_deref())
    }

    fn attribute(&mut self, attr: Attribute) -> Option<&[u8]> {
        let i = attr.index();
        if self.attributes.get(i)?.is_none() {
            let value = self.fetch(attr);
            *self.attributes.get_mut(i)? = Some(value);
        }
        self.attributes.get(i)?.as_ref()?.as_deref()
    }

    fn route_metadata(&mut self, filter: &str) -> Option<&[u8]> {
        self.route_metadata
            .get_or_insert_with(|| property(&crate::route_metadata::property_path(filter)))
            .as_deref()
    }
}

/// Reads and compiles the plugin configuration with `parse(bytes, scope)`,
/// where `scope` is the Envoy plugin name (it names the filter instance in
/// shared-data keys). A refused configuration is one error line
/// `<filter>: <json.path>: <why>` and `None` (on_configure then returns false).
pub fn load_config<T>(
    filter: &str,
    parse: impl FnOnce(&[u8], &str) -> Result<T, crate::ConfigError>,
) -> Option<T> {
    let scope = property(&["plugin_name"])
        .and_then(|n| String::from_utf8(n).ok())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| filter.to_string());
    refresh_log_level();
    match parse(&plugin_configuration(), &scope) {
        Ok(config) => Some(config),
        Err(e) => {
            log::error!("{filter}: {e}");
            None
        }
    }
}

/// The plugin configuration bytes handed to `on_configure`.
pub fn plugin_configuration() -> Vec<u8> {
    hostcalls::get_buffer(
        proxy_wasm::types::BufferType::PluginConfiguration,
        0,
        usize::MAX,
    )
    .ok()
    .flatten()
    .unwrap_or_default()
}

#[link(wasm_import_module = "env")]
extern "C" {
    // The SDK declares this with `*mut LogLevel`; a u32 cannot hold an
    // invalid enum value whatever the host writes.
    #[allow(clashing_extern_declarations)]
    fn proxy_get_log_level(return_level: *mut u32) -> Status;
}

/// Envoy's log level for this module, asked of the host (one host call).
pub fn host_log_level() -> Option<LogLevel> {
    let mut current = 0u32;
    // SAFETY: the pointer is valid for the call.
    match unsafe { proxy_get_log_level(&mut current) } {
        Status::Ok => Some(match current {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            _ => LogLevel::Critical,
        }),
        _ => None,
    }
}

/// Sets up logging through the `log` crate's macros with the SDK's logger,
/// and the panic hook; call first in `proxy_wasm::main!`. Until the first
/// `on_configure` reads Envoy's level, `info` and above are printed.
pub fn init_logging(filter: &'static str) {
    proxy_wasm::set_log_level(LogLevel::Info);
    // After set_log_level: its first call installs the SDK's own panic hook.
    install_panic_hook(filter);
}

/// Caches Envoy's log level in `log`'s max level (read at each configure), so
/// `log::log_enabled!` on the request path costs no host call.
pub fn refresh_log_level() {
    if let Some(level) = host_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

/// Logs any panic at critical level (with the filter's name) before the VM aborts,
/// so the reason is in Envoy's log next to the failure policy's effect.
fn install_panic_hook(filter: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("{filter}: panic: {info}"));
    }));
}

/// The `<name>{rule, outcome}` counters of upstream calls by outcome
/// (`success`, `slow`, `failure`; an ignored call is not counted), as
/// circuit-breaker and lb-hints' canary analysis publish them.
#[derive(Debug, Clone, Copy)]
pub struct OutcomeCounters {
    success: Metric,
    slow: Metric,
    failure: Metric,
}

impl OutcomeCounters {
    pub fn define(name: &str, rule: &str) -> OutcomeCounters {
        let counter = |outcome: &str| {
            Metric::counter(&stat_name(name, &[("rule", rule), ("outcome", outcome)]))
        };
        OutcomeCounters {
            success: counter("success"),
            slow: counter("slow"),
            failure: counter("failure"),
        }
    }

    pub fn count(self, outcome: Outcome) {
        let metric = match outcome {
            Outcome::Success => self.success,
            Outcome::Slow => self.slow,
            Outcome::Failure { .. } => self.failure,
            Outcome::Ignored => return,
        };
        metric.add(1);
    }
}

/// A metric defined once (at configure time) and updated by id afterwards.
#[derive(Debug, Clone, Copy)]
pub struct Metric(Option<u32>);

impl Metric {
    pub fn counter(name: &str) -> Metric {
        Metric(hostcalls::define_metric(MetricType::Counter, name).ok())
    }

    pub fn gauge(name: &str) -> Metric {
        Metric(hostcalls::define_metric(MetricType::Gauge, name).ok())
    }

    pub fn histogram(name: &str) -> Metric {
        Metric(hostcalls::define_metric(MetricType::Histogram, name).ok())
    }

    pub fn add(self, delta: i64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::increment_metric(id, delta);
        }
    }

    /// Sets a gauge or records a histogram sample.
    pub fn record(self, value: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// Answers the request locally; Envoy then runs this filter's response callbacks too.
pub fn send_local_reply(status: u32, headers: &[(&str, &str)], body: &[u8]) {
    let _ = hostcalls::send_http_response(status, headers.to_vec(), Some(body));
}

/// Makes Envoy pick the route again after a routing header changed (Envoy 1.33+
/// no longer does this by itself for newer ABIs). Unsupported hosts: ignored.
pub fn clear_route_cache() {
    let _ = hostcalls::call_foreign_function("clear_route_cache", None);
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_buffer_bytes(
        buffer_type: i32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> Status;
    fn proxy_continue_stream(stream_type: i32) -> Status;
    fn proxy_get_status(
        return_code: *mut u32,
        return_message_data: *mut *mut u8,
        return_message_size: *mut usize,
    ) -> Status;
}

const GRPC_RECEIVE_BUFFER: i32 = 5;
const HTTP_REQUEST_STREAM: i32 = 0;

/// Starts a unary gRPC call; its answer comes to the calling context's
/// `on_grpc_call_response`. `service` is a serialized
/// `envoy.config.core.v3.GrpcService`. This goes through the SDK (it must
/// register the token to route the answer back); the SDK panics on statuses
/// other than Ok, ParseFailure and InternalFailure, which Envoy gives for a
/// serialized `GrpcService` (a missing cluster is InternalFailure).
pub fn grpc_call(
    service: &[u8],
    service_name: &str,
    method: &str,
    message: &[u8],
    timeout: std::time::Duration,
) -> Result<u32, Status> {
    // The SDK takes the "upstream" as &str and passes its bytes through
    // unchanged. The message is valid UTF-8 for an ASCII cluster name shorter
    // than 128 bytes (all its length bytes are then below 0x80).
    let upstream = std::str::from_utf8(service).map_err(|_| Status::ParseFailure)?;
    hostcalls::dispatch_grpc_call(
        upstream,
        service_name,
        method,
        Vec::new(),
        Some(message),
        timeout,
    )
}

/// The body of a gRPC answer, in `on_grpc_call_response`.
pub fn grpc_response_body(size: usize) -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut len = 0;
    // SAFETY: as in `property`.
    match unsafe { proxy_get_buffer_bytes(GRPC_RECEIVE_BUFFER, 0, size, &mut data, &mut len) } {
        Status::Ok => Some(owned(data, len)),
        _ => None,
    }
}

/// The status message of a failed gRPC call, in `on_grpc_call_response`.
pub fn grpc_status_message() -> String {
    let mut code = 0;
    let mut data = null_mut();
    let mut len = 0;
    // SAFETY: as in `property`.
    match unsafe { proxy_get_status(&mut code, &mut data, &mut len) } {
        Status::Ok => String::from_utf8_lossy(&owned(data, len)).into_owned(),
        _ => String::new(),
    }
}

/// Lets a paused request go on (after an asynchronous decision).
pub fn resume_request() {
    // SAFETY: no pointers.
    let _ = unsafe { proxy_continue_stream(HTTP_REQUEST_STREAM) };
}
