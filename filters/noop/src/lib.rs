//! A proxy-wasm HTTP filter that does nothing: every request and response
//! passes untouched. `cargo xtask bench` runs it to measure what any Rust
//! Wasm filter costs before it does any work (VM entry and exit for each
//! callback Envoy makes into an http context), the floor our filters are
//! compared against.

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::ContextType;

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}

    struct Root;

    impl Context for Root {}

    impl RootContext for Root {
        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Noop))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    /// Every callback keeps the SDK's default: continue.
    struct Noop;

    impl Context for Noop {}

    impl HttpContext for Noop {}
}
