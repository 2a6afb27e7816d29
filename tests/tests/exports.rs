//! Each filter module exports only the stream callbacks its adapter handles
//! (Envoy skips a callback a module does not export: one VM entry less per
//! request for each). The build drops the others (`cargo xtask build`, from
//! the module's `mesh_shared::stream_callbacks!` list); this checks that the
//! list matches the adapter's code and that dist/ has exactly those exports.

use std::collections::BTreeSet;

use mesh_shared::callbacks::DROPPABLE;
use mesh_testkit::{repo_root, wasm_path};

const FILTERS: &[&str] = &["ratelimit", "circuit-breaker", "lb-hints", "metrics"];

/// The SDK trait method behind each droppable callback.
fn trait_method(callback: &str) -> String {
    match callback {
        "log" | "done" => format!("fn on_{callback}("),
        other => format!("fn on_http_{other}("),
    }
}

/// The names inside the adapter's `stream_callbacks!(...)`.
fn declared(source: &str) -> BTreeSet<String> {
    let start = source
        .find("stream_callbacks!(")
        .expect("the adapter names its stream callbacks")
        + "stream_callbacks!(".len();
    let end = start + source[start..].find(')').unwrap();
    source[start..end]
        .split(',')
        .map(|n| n.trim().trim_matches('"').to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

fn exported_callbacks(module: &[u8]) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut all = BTreeSet::new();
    for payload in wasmparser::Parser::new(0).parse_all(module) {
        if let wasmparser::Payload::ExportSection(reader) = payload.unwrap() {
            for export in reader {
                all.insert(export.unwrap().name.to_string());
            }
        }
    }
    let stream = all
        .iter()
        .filter_map(|n| n.strip_prefix("proxy_on_"))
        .filter(|n| DROPPABLE.contains(n))
        .map(String::from)
        .collect();
    (stream, all)
}

#[test]
fn each_filter_exports_exactly_the_stream_callbacks_its_adapter_handles() {
    for filter in FILTERS {
        let source = std::fs::read_to_string(
            repo_root()
                .join("filters")
                .join(filter)
                .join("src/filter.rs"),
        )
        .unwrap();
        let implemented: BTreeSet<String> = DROPPABLE
            .iter()
            .filter(|cb| source.contains(&trait_method(cb)))
            .map(|cb| cb.to_string())
            .collect();
        let declared = declared(&source);
        assert_eq!(
            declared, implemented,
            "{filter}: stream_callbacks! must name exactly the callbacks filter.rs implements"
        );
        let module = std::fs::read(wasm_path(filter)).unwrap();
        let (stream, all) = exported_callbacks(&module);
        assert_eq!(stream, declared, "{filter}: exported stream callbacks");
        for needed in [
            "proxy_on_delete",
            "proxy_on_context_create",
            "proxy_on_configure",
            "proxy_on_vm_start",
            "malloc",
        ] {
            assert!(all.contains(needed), "{filter} must still export {needed}");
        }
        assert!(
            all.iter().any(|n| n.starts_with("proxy_abi_version_")),
            "{filter}: the ABI version export is gone"
        );
    }
}
