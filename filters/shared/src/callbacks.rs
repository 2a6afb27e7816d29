//! Which stream callbacks a module handles, written into the module itself.
//!
//! The SDK exports every `proxy_on_*` function, and Envoy enters the VM for
//! every exported stream callback on every request, handled or not (the
//! no-op filter's +20 700 instructions per request: BENCHMARKS.md). Envoy
//! skips a callback the module does not export (proxy-wasm-cpp-host returns
//! `Continue` when the export is missing), so `cargo xtask build` drops the
//! exports of the stream callbacks a module does not name with
//! [`stream_callbacks!`](crate::stream_callbacks). The list stands next to the
//! adapter's `impl HttpContext`, in a custom section that the build reads and
//! then removes; a module without the list keeps every export.

/// The custom section holding the comma-separated list.
pub const SECTION: &str = "mesh.stream_callbacks";

/// The stream callbacks the build may drop, named as after `proxy_on_`.
/// `delete` is never dropped: the SDK frees its per-stream context there.
pub const DROPPABLE: &[&str] = &[
    "request_headers",
    "request_body",
    "request_trailers",
    "response_headers",
    "response_body",
    "response_trailers",
    "log",
    "done",
];

// Both functions run only in const evaluation (the macro's static), where an
// index out of bounds is a compile error, not a panic in the VM; `get` is not
// usable in const fns.

/// Bytes of the comma-separated list of `names`.
#[allow(clippy::indexing_slicing)]
pub const fn encoded_len(names: &[&str]) -> usize {
    let mut len = 0;
    let mut i = 0;
    while i < names.len() {
        len += names[i].len() + (i > 0) as usize;
        i += 1;
    }
    len
}

/// The comma-separated list of `names` as bytes (`N` = [`encoded_len`]).
#[allow(clippy::indexing_slicing)]
pub const fn encode<const N: usize>(names: &[&str]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut at = 0;
    let mut i = 0;
    while i < names.len() {
        if i > 0 && at < N {
            out[at] = b',';
            at += 1;
        }
        let bytes = names[i].as_bytes();
        let mut j = 0;
        while j < bytes.len() && at < N {
            out[at] = bytes[j];
            at += 1;
            j += 1;
        }
        i += 1;
    }
    out
}

/// Names the stream callbacks this module handles (see the module docs):
/// `mesh_shared::stream_callbacks!("request_headers", "log");`
#[macro_export]
macro_rules! stream_callbacks {
    ($($name:literal),* $(,)?) => {
        #[cfg(target_arch = "wasm32")]
        #[link_section = "mesh.stream_callbacks"]
        #[used]
        static MESH_STREAM_CALLBACKS: [u8; $crate::callbacks::encoded_len(&[$($name),*])] =
            $crate::callbacks::encode(&[$($name),*]);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_comma_separated() {
        const NAMES: &[&str] = &["request_headers", "log"];
        let bytes: [u8; encoded_len(NAMES)] = encode(NAMES);
        assert_eq!(&bytes, b"request_headers,log");
        let none: [u8; encoded_len(&[])] = encode(&[]);
        assert!(none.is_empty());
    }
}
