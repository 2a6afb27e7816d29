//! The integration-test harness of mesh-filters: a real Envoy running the
//! built `.wasm` filters, in front of real upstreams, driven with real HTTP.
//!
//! ```no_run
//! use mesh_testkit::{Bootstrap, Envoy, Upstream, WasmFilter, http};
//! let upstream = Upstream::start("v1");
//! let envoy = Envoy::start(&Bootstrap::new()
//!     .wasm(WasmFilter::new("ratelimit", r#"{"rules": []}"#))
//!     .route("default", "/", "v1")
//!     .cluster("v1", upstream.port())
//!     .yaml());
//! let answer = http::get(envoy.port(), "/", &[]).unwrap();
//! assert_eq!(answer.status, 200);
//! ```
//! Every process a test starts is stopped when its handle drops, also when
//! the test fails; Envoy's log is printed then.

pub mod config;
pub mod debian;
pub mod demo;
pub mod docker;
pub mod envoy;
pub mod func_e;
pub mod global;
pub mod helm;
pub mod http;
pub mod istio;
pub mod registry;
pub mod rls;
pub mod schemas;
pub mod split;
pub mod tools;
pub mod upstream;

use std::path::PathBuf;

pub use config::{json_string, wasm_path, Bootstrap, Form, WasmFilter, MODULES};
pub use envoy::{envoy_binary, Envoy, StartFailure};
pub use split::Split;
pub use upstream::{Behaviour, Upstream};

/// Runs one test body in both forms: `both_forms!(name);` in place of
/// `#[test]` above `fn name(form: Form)` makes the tests `name::chain` and
/// `name::suite`, which call it with `Form::Chain` and `Form::Suite`.
#[macro_export]
macro_rules! both_forms {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn chain() {
                super::$name($crate::Form::Chain)
            }

            #[test]
            fn suite() {
                super::$name($crate::Form::Suite)
            }
        }
    )+};
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Where the build puts the size-optimised `.wasm` files.
pub fn dist_dir() -> PathBuf {
    std::env::var_os("MESH_DIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("dist"))
}

/// A free TCP port on loopback (bound, read, released: another process may
/// take it in between, which the callers' start-up checks would show).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Sends `total` GETs from `connections` threads, each on its own keep-alive
/// connection; returns every response (or the I/O error) in no particular order.
pub fn concurrent_gets(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    connections: usize,
    total: usize,
) -> Vec<std::io::Result<http::Response>> {
    let path = path.to_string();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    at_once(port, connections, total, move |client, _| {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        client.get(&path, &h)
    })
}

/// Makes requests `0..total` from `connections` threads that start together,
/// each on its own keep-alive connection (request `i` on connection
/// `i % connections`); returns what `send` returned for each, in no
/// particular order.
pub fn at_once<T: Send + 'static>(
    port: u16,
    connections: usize,
    total: usize,
    send: impl Fn(&mut http::Client, usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let send = std::sync::Arc::new(send);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(connections));
    let handles: Vec<_> = (0..connections)
        .map(|c| {
            let (send, barrier) = (send.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut client = http::Client::new(port);
                barrier.wait();
                (c..total)
                    .step_by(connections)
                    .map(|i| send(&mut client, i))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}
