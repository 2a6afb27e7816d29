//! A test-only proxy-wasm HTTP filter that panics on demand: a request with
//! `x-panic: 1` makes it panic in `on_http_request_headers`, which kills the
//! worker's Wasm VM. `tests/tests/reliability.rs` uses it to watch what each
//! `failure_policy` does with a dead VM. Every other request passes, with
//! `x-panic-probe: passed` added to the response so a test can tell whether
//! the filter ran (FAIL_OPEN skips a dead filter: the header is then missing).
//! Not a product filter: not in `FILTERS`, never packaged.

/// The request header that triggers the panic, and the value that does.
pub const TRIGGER_HEADER: &str = "x-panic";
pub const TRIGGER_VALUE: &[u8] = b"1";

/// Whether a request with this `x-panic` value must panic.
pub fn triggers(value: Option<&[u8]>) -> bool {
    value == Some(TRIGGER_VALUE)
}

#[cfg(target_arch = "wasm32")]
mod filter {
    use mesh_shared::host;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType};

    const FILTER: &str = "panic-probe";

    proxy_wasm::main! {{
        host::init_logging(FILTER);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}

    struct Root;

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            log::info!("{FILTER}: configured");
            true
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Probe))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Probe;

    impl Context for Probe {}

    impl HttpContext for Probe {
        fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
            let value = host::request_header(crate::TRIGGER_HEADER);
            #[allow(clippy::panic)] // the whole point of this test module
            if crate::triggers(value.as_deref()) {
                panic!("{FILTER}: x-panic: 1 asked for a panic");
            }
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
            self.add_http_response_header("x-panic-probe", "passed");
            Action::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_trigger_value_panics() {
        assert!(triggers(Some(b"1")));
        assert!(!triggers(Some(b"0")));
        assert!(!triggers(Some(b"1 ")));
        assert!(!triggers(None));
    }
}
