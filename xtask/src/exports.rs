//! Drops the exports of the stream callbacks a module does not handle.
//!
//! A module names the stream callbacks it handles with
//! `mesh_shared::stream_callbacks!`, which leaves the list in a custom section
//! (`mesh_shared::callbacks`). Here the built module is rewritten with the
//! other droppable `proxy_on_*` exports removed and that section gone; every
//! other section is copied byte for byte, and wasm-opt then removes the code
//! nothing reaches any more. Envoy skips a callback the module does not
//! export, so each dropped export is one VM entry less per request.

use mesh_shared::callbacks::{DROPPABLE, SECTION};
use wasm_encoder::{ExportKind, ExportSection, Module, RawSection};
use wasmparser::{ExternalKind, Parser, Payload};

/// The module without the unhandled stream callbacks, and the callbacks it
/// keeps (`None`: the module names none, so it is returned unchanged).
pub fn trim(module: &[u8]) -> Result<(Vec<u8>, Option<Vec<String>>), String> {
    let Some(handled) = handled(module)? else {
        return Ok((module.to_vec(), None));
    };
    if let Some(unknown) = handled.iter().find(|h| !DROPPABLE.contains(&h.as_str())) {
        return Err(format!(
            "stream_callbacks! names {unknown:?}; the stream callbacks are {}",
            DROPPABLE.join(", ")
        ));
    }
    let dropped = |name: &str| {
        name.strip_prefix("proxy_on_")
            .is_some_and(|cb| DROPPABLE.contains(&cb) && !handled.iter().any(|h| h == cb))
    };
    let mut out = Module::new();
    for payload in Parser::new(0).parse_all(module) {
        let payload = payload.map_err(|e| format!("reading the module: {e}"))?;
        match &payload {
            Payload::ExportSection(reader) => {
                let mut exports = ExportSection::new();
                for export in reader.clone() {
                    let export = export.map_err(|e| format!("reading an export: {e}"))?;
                    if !dropped(export.name) {
                        exports.export(export.name, export_kind(export.kind), export.index);
                    }
                }
                out.section(&exports);
            }
            Payload::CustomSection(custom) if custom.name() == SECTION => {}
            _ => {
                if let Some((id, range)) = payload.as_section() {
                    let data = usize::try_from(range.start)
                        .ok()
                        .zip(usize::try_from(range.end).ok())
                        .and_then(|(start, end)| module.get(start..end))
                        .ok_or("a section runs past the end of the module")?;
                    out.section(&RawSection { id, data });
                }
            }
        }
    }
    Ok((out.finish(), Some(handled)))
}

/// The names in the module's `mesh.stream_callbacks` section, if it has one.
fn handled(module: &[u8]) -> Result<Option<Vec<String>>, String> {
    for payload in Parser::new(0).parse_all(module) {
        if let Payload::CustomSection(custom) = payload.map_err(|e| e.to_string())? {
            if custom.name() == SECTION {
                let text = std::str::from_utf8(custom.data())
                    .map_err(|_| format!("the {SECTION} section is not UTF-8"))?;
                let names = text
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(String::from)
                    .collect();
                return Ok(Some(names));
            }
        }
    }
    Ok(None)
}

fn export_kind(kind: ExternalKind) -> ExportKind {
    match kind {
        ExternalKind::Func | ExternalKind::FuncExact => ExportKind::Func,
        ExternalKind::Table => ExportKind::Table,
        ExternalKind::Memory => ExportKind::Memory,
        ExternalKind::Global => ExportKind::Global,
        ExternalKind::Tag => ExportKind::Tag,
    }
}
