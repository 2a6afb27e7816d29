//! A bench-only proxy-wasm HTTP filter that prices host calls.
//!
//! Each request names one kind of host call and a count in the request
//! header `x-hostcall: <call>:<n>` (e.g. `request_header:10`); the filter
//! makes that call `n` times, through the same `mesh_shared::host` wrappers
//! our filters use. `cargo xtask bench` counts Envoy's instructions per
//! request for `none:0` and for each call at `n = 10`: the difference over
//! 10 is what one such call costs, the unit every filter's cost is made of
//! (BENCHMARKS.md, "Where the time goes").
//!
//! Every request, `none:0` included, reads the `x-hostcall` header and gets
//! the same callbacks, so those costs cancel out of the difference.

/// The kinds of host call, by the name used in `x-hostcall`.
pub const CALLS: &[&str] = &[
    "request_header",
    "request_header_missing",
    "request_headers_all",
    "route_name",
    "shared_get",
    "shared_set",
    "set_request_header",
    "clear_route_cache",
    "counter_increment",
    "histogram_record",
    "current_time",
    "log_level",
    "response_code",
    "add_response_header",
];

/// Size of the value `shared_get` / `shared_set` move: one ratelimit shard
/// (16 slots of 16 bytes).
pub const SHARED_VALUE_BYTES: usize = 256;

/// `<call>:<n>` as (call, n); `None` if malformed or the call is unknown.
pub fn parse(header: &[u8]) -> Option<(&'static str, u32)> {
    let text = std::str::from_utf8(header).ok()?;
    let (call, n) = text.split_once(':')?;
    let n = n.trim().parse().ok()?;
    match call.trim() {
        "none" => Some(("none", 0)),
        call => CALLS.iter().find(|c| **c == call).map(|c| (*c, n)),
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_known_calls_and_refuses_the_rest() {
        assert_eq!(parse(b"route_name:10"), Some(("route_name", 10)));
        assert_eq!(parse(b"none:0"), Some(("none", 0)));
        assert_eq!(parse(b"route_name"), None);
        assert_eq!(parse(b"rm_rf:1"), None);
        assert_eq!(parse(b"shared_get:x"), None);
        assert_eq!(parse(b"\xff:1"), None);
    }
}

#[cfg(target_arch = "wasm32")]
mod filter {
    use mesh_shared::clock::Clock;
    use mesh_shared::host::{self, HostClock, HostStore, Metric};
    use mesh_shared::store::SharedStore;
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, MapType};

    use crate::{parse, SHARED_VALUE_BYTES};

    const SHARED_KEY: &str = "hostcall-cost";

    proxy_wasm::main! {{
        host::init_logging("hostcall-cost");
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
            Box::new(Root { counter: Metric::counter("hostcall_cost_counter"), histogram: Metric::histogram("hostcall_cost_histogram") })
        });
    }}

    struct Root {
        counter: Metric,
        histogram: Metric,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            HostStore
                .set(SHARED_KEY, &[7; SHARED_VALUE_BYTES], None)
                .is_ok()
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Http {
                counter: self.counter,
                histogram: self.histogram,
                call: ("none", 0),
            }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Http {
        counter: Metric,
        histogram: Metric,
        call: (&'static str, u32),
    }

    impl Context for Http {}

    /// Keeps a result alive so the call is not optimized away.
    fn keep<T>(value: T) {
        std::hint::black_box(value);
    }

    impl HttpContext for Http {
        fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
            self.call = host::request_header("x-hostcall")
                .and_then(|h| parse(&h))
                .unwrap_or(("none", 0));
            let (call, n) = self.call;
            let value = [1u8; SHARED_VALUE_BYTES];
            for i in 0..n {
                match call {
                    "request_header" => keep(host::request_header("x-api-key")),
                    "request_header_missing" => keep(host::request_header("x-absent")),
                    "request_headers_all" => keep(host::request_headers()),
                    "route_name" => keep(host::property(&["xds", "route_name"])),
                    "shared_get" => keep(HostStore.get(SHARED_KEY)),
                    "shared_set" => keep(HostStore.set(SHARED_KEY, &value, None)),
                    "set_request_header" => keep(hostcalls::set_map_value(
                        MapType::HttpRequestHeaders,
                        "x-hostcall-out",
                        Some(if i % 2 == 0 { "v1" } else { "v2" }),
                    )),
                    "clear_route_cache" => host::clear_route_cache(),
                    "counter_increment" => self.counter.add(1),
                    "histogram_record" => self.histogram.record(u64::from(i)),
                    "current_time" => keep(HostClock.now_nanos()),
                    "log_level" => keep(host::host_log_level()),
                    _ => {}
                }
            }
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
            let (call, n) = self.call;
            for i in 0..n {
                match call {
                    "response_code" => keep(host::response_code()),
                    "add_response_header" => keep(hostcalls::add_map_value(
                        MapType::HttpResponseHeaders,
                        "x-hostcall-out",
                        if i % 2 == 0 { "v1" } else { "v2" },
                    )),
                    _ => {}
                }
            }
            Action::Continue
        }
    }
}
