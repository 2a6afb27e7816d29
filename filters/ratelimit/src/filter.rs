//! ratelimit's own module: its part (`part.rs`) alone in the VM.

use mesh_shared::host;
use mesh_shared::part::Alone;

use crate::part::{Ratelimit, FILTER};
use crate::Config;

proxy_wasm::main! {{
    host::init_logging(FILTER);
    proxy_wasm::set_root_context(|id| Alone::root(id, |root_id| {
        host::load_config(FILTER, Config::parse).map(|c| Ratelimit::new(c, root_id))
    }));
}}

// The stream callbacks the part handles; the build drops the exports of the
// others (mesh_shared::callbacks). The gRPC callbacks are not stream
// callbacks and stay.
mesh_shared::stream_callbacks!("request_headers", "response_headers");
