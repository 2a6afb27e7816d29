//! Two upstreams, `v1` and `v2`, behind an Envoy that routes on the header
//! lb-hints writes: the setup of lb-hints', the canary's and the suite's tests.

use crate::{Bootstrap, Envoy, Upstream, WasmFilter};

/// The routing header of [`Split`] (see [`Bootstrap::routed_by`]).
pub const ROUTING_HEADER: &str = "x-mesh-target";

/// Envoy (stopped on drop, with the upstreams) in front of v1 and v2.
pub struct Split {
    pub envoy: Envoy,
    pub v1: Upstream,
    pub v2: Upstream,
}

impl Split {
    /// v1 and v2 started, `bootstrap` routed by [`ROUTING_HEADER`] to them
    /// (421 from Envoy otherwise), with `filter`.
    pub fn start(bootstrap: Bootstrap, filter: WasmFilter) -> Split {
        let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
        let envoy = Envoy::start(
            &bootstrap
                .routed_by(ROUTING_HEADER, v1.port(), v2.port())
                .wasm(filter)
                .yaml(),
        );
        Split { envoy, v1, v2 }
    }
}
