//! Each filter module exports only the stream callbacks its adapter handles
//! (Envoy skips a callback a module does not export: one VM entry less per
//! request for each). The build drops the others (`cargo xtask build`, from
//! the module's `mesh_shared::stream_callbacks!` list); this checks that the
//! list matches the adapter's code and that dist/ has exactly those exports.
//! A filter's adapter logic is its part (`src/part.rs`, `mesh_shared::part`),
//! its module (`src/filter.rs`) names the list; the suite's module handles the
//! union of its four parts' callbacks.

use std::collections::BTreeSet;

use mesh_shared::callbacks::DROPPABLE;
use mesh_testkit::{repo_root, wasm_path};

const FILTERS: &[&str] = &["ratelimit", "circuit-breaker", "lb-hints", "metrics"];

/// The `mesh_shared::part::Part` method behind each droppable callback.
fn part_method(callback: &str) -> String {
    format!("fn on_{callback}(")
}

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

fn source(module: &str, file: &str) -> String {
    std::fs::read_to_string(
        repo_root()
            .join("filters")
            .join(module)
            .join("src")
            .join(file),
    )
    .unwrap()
}

/// The callbacks a filter's part implements.
fn handled_by_part(filter: &str) -> BTreeSet<String> {
    let part = source(filter, "part.rs");
    DROPPABLE
        .iter()
        .filter(|cb| part.contains(&part_method(cb)))
        .map(|cb| cb.to_string())
        .collect()
}

fn assert_exports(module: &str, declared: &BTreeSet<String>) {
    let bytes = std::fs::read(wasm_path(module)).unwrap();
    let (stream, all) = exported_callbacks(&bytes);
    assert_eq!(&stream, declared, "{module}: exported stream callbacks");
    for needed in [
        "proxy_on_delete",
        "proxy_on_context_create",
        "proxy_on_configure",
        "proxy_on_vm_start",
        "malloc",
    ] {
        assert!(all.contains(needed), "{module} must still export {needed}");
    }
    assert!(
        all.iter().any(|n| n.starts_with("proxy_abi_version_")),
        "{module}: the ABI version export is gone"
    );
}

#[test]
fn each_filter_exports_exactly_the_stream_callbacks_its_adapter_handles() {
    for filter in FILTERS {
        let implemented = handled_by_part(filter);
        let declared = declared(&source(filter, "filter.rs"));
        assert_eq!(
            declared, implemented,
            "{filter}: stream_callbacks! in filter.rs must name exactly the callbacks part.rs implements"
        );
        assert_exports(filter, &declared);
    }
}

#[test]
fn the_suite_exports_the_union_of_its_parts_callbacks() {
    let union: BTreeSet<String> = FILTERS.iter().flat_map(|f| handled_by_part(f)).collect();
    let suite = source("suite", "filter.rs");
    let declared = declared(&suite);
    assert_eq!(
        declared, union,
        "suite: stream_callbacks! must name the parts' union"
    );
    for cb in &union {
        assert!(
            suite.contains(&trait_method(cb)),
            "suite: filter.rs does not pass {cb} on to its parts"
        );
    }
    assert_exports("suite", &declared);
}
