//! Shared pieces of the mesh-filters suite.
//!
//! The policy cores of every filter use only the plain-Rust modules here
//! (configuration reading, request matching, the shared store trait, the clock
//! trait, stat names). [`host`] implements those traits over the proxy-wasm
//! ABI and exists only in the `wasm32` build.

pub mod callbacks;
pub mod circuit;
pub mod clock;
pub mod config;
pub mod duration;
pub mod hash;
pub mod matcher;
pub mod outcome;
#[cfg(target_arch = "wasm32")]
pub mod part;
pub mod request;
pub mod route_metadata;
pub mod spec;
pub mod stats;
pub mod store;

#[cfg(target_arch = "wasm32")]
pub mod host;

pub use clock::Clock;
pub use config::{ConfigError, LocalResponse};
pub use matcher::Matcher;
pub use request::{Attribute, Request, Source};
pub use store::SharedStore;
