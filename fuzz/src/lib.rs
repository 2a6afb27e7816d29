//! What the fuzz targets share: arbitrary requests for the policy cores
//! (header values and Envoy attributes as raw bytes, any length, any byte),
//! and the sequence of events a core sees over time.

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use mesh_shared::request::FakeRequest;
use mesh_shared::Attribute;

/// Header names the fuzz configurations read, so arbitrary values reach the
/// code that uses them; any other name is possible too.
pub const HEADERS: &[&str] = &[
    "x-api-key",
    "x-tenant",
    "x-user-id",
    "x-mesh-target",
    "x-mesh-force-target",
    "cookie",
];

#[derive(Arbitrary, Debug, Clone)]
pub enum HeaderName {
    Known(u8),
    Other(String),
}

/// One request as a core sees it.
#[derive(Arbitrary, Debug, Clone)]
pub struct Req {
    pub headers: Vec<(HeaderName, Vec<u8>)>,
    /// Index into `Attribute::ALL` (modulo), value.
    pub attributes: Vec<(u8, Vec<u8>)>,
    /// Encoded route metadata (`mesh-filters.<filter>`), as Envoy would hand it over.
    pub route_metadata: Option<Vec<u8>>,
}

impl Req {
    /// The request for `filter` (whose route metadata this is).
    pub fn build(&self, filter: &str) -> FakeRequest {
        let mut req = FakeRequest::new();
        for (name, value) in &self.headers {
            let name = match name {
                HeaderName::Known(i) => HEADERS[usize::from(*i) % HEADERS.len()].to_string(),
                HeaderName::Other(n) => n.to_ascii_lowercase(),
            };
            req = req.with_header(&name, value);
        }
        for (attr, value) in &self.attributes {
            let attr = Attribute::ALL[usize::from(*attr) % Attribute::ALL.len()];
            req = req.with(attr, value);
        }
        if let Some(meta) = &self.route_metadata {
            req.route_metadata.push((filter.to_string(), meta.clone()));
        }
        req
    }
}

/// How a call ended, as the response phase sees it.
#[derive(Arbitrary, Debug, Clone)]
pub struct Ending {
    pub code: Option<u32>,
    /// Index into [`DETAILS`] (modulo), or arbitrary bytes.
    pub details: Result<u8, Vec<u8>>,
    pub duration_ms: Option<u32>,
}

/// `response.code_details` values Envoy 1.40 was seen to produce.
pub const DETAILS: &[&[u8]] = &[
    b"via_upstream",
    b"upstream_reset_before_response_started{connection_termination}",
    b"response_timeout",
    b"no_healthy_upstream",
    b"downstream_remote_disconnect",
    b"direct_response",
];

impl Ending {
    pub fn details(&self) -> &[u8] {
        match &self.details {
            Ok(i) => DETAILS[usize::from(*i) % DETAILS.len()],
            Err(bytes) => bytes,
        }
    }
}

/// One step of traffic: time moves on by `advance_ms`, then `req` arrives.
#[derive(Arbitrary, Debug, Clone)]
pub struct Event {
    pub advance_ms: u32,
    pub req: Req,
    pub random: u64,
    pub ending: Ending,
    /// Finish the call now (else it stays in flight until the end of the run).
    pub finish_now: bool,
}

/// A realistic clock start (2023), so arithmetic on `now` sees real magnitudes.
pub const T0: u64 = 1_700_000_000_000_000_000;
pub const MS: u64 = 1_000_000;

/// One configuration from `configs` (modulo), for targets that fuzz traffic
/// against fixed configurations covering each filter's features.
pub fn pick<'a>(configs: &[&'a str], i: u8) -> &'a str {
    configs[usize::from(i) % configs.len()]
}

/// A metrics host that writes every stat name it is asked to define (as the
/// adapter does), so label values from requests reach `stat_name`.
pub mod metrics_host {
    use mesh_shared::stats::stat_name;

    #[derive(Default)]
    pub struct FakeHost {
        pub defined: Vec<String>,
    }

    impl FakeHost {
        fn define(&mut self, name: &str, tags: &[(&str, String)]) -> usize {
            let tags: Vec<(&str, &str)> = tags.iter().map(|(n, v)| (*n, v.as_str())).collect();
            self.defined.push(stat_name(name, &tags));
            self.defined.len() - 1
        }
    }

    impl metrics::Define for FakeHost {
        type Gauge = usize;
        type Series = usize;
        fn gauge(&mut self, tags: &[(&str, String)]) -> usize {
            self.define("mesh_requests_in_flight", tags)
        }
        fn series(&mut self, tags: &[(&str, String)]) -> usize {
            self.define("mesh_requests_total", tags)
        }
    }
}
