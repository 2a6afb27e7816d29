//! metrics' own module: its part (`part.rs`) alone in the VM.

use mesh_shared::host;
use mesh_shared::part::Alone;

use crate::part::{configure, FILTER};

proxy_wasm::main! {{
    host::init_logging(FILTER);
    proxy_wasm::set_root_context(|id| Alone::root(id, |_| configure()));
}}

// The stream callbacks the part handles; the build drops the exports of the
// others (mesh_shared::callbacks). No `done`: nothing to do there.
mesh_shared::stream_callbacks!("request_headers", "request_body", "response_body", "log");
