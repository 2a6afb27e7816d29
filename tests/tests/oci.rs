//! `cargo xtask push` against a real registry (Debian's `docker-registry`,
//! the CNCF distribution registry, on loopback), checked with an independent
//! client (`skopeo`) pulling each image back by digest: media types and layer
//! counts as Istio's Wasm puller requires them, and the module bytes equal to
//! `dist/<filter>.wasm`.

mod support;

use std::fs;
use std::process::Command;

use mesh_testkit::registry::Registry;
use mesh_testkit::{repo_root, wasm_path};
use serde_json::Value;
use support::skopeo::{plugin_wasm_from, pull, run};

use mesh_testkit::MODULES as FILTERS;
const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

#[test]
fn push_all_filters_in_three_formats_and_pull_them_back_by_digest() {
    let modules: Vec<(&str, Vec<u8>)> = FILTERS
        .iter()
        .map(|f| (*f, fs::read(wasm_path(f)).unwrap()))
        .collect();
    let registry = Registry::start();
    let work = registry.dir().join("pulled");
    fs::create_dir_all(&work).unwrap();
    let prefix = format!("127.0.0.1:{}/mesh-filters", registry.port());

    // Exactly the README's command, with the local registry's address.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = run(Command::new(cargo)
        .current_dir(repo_root())
        .args(["xtask", "push"])
        .arg(&prefix)
        .args(["--plain-http", "--no-build", "--tag", "test"])
        .args(["--format", "artifact,image,docker"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pushed: Vec<(&str, &str, &str)> = stdout
        .lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("pushed ")?.split(' ');
            Some((words.next()?, words.next()?, words.next()?))
        })
        .collect();
    assert_eq!(
        pushed.len(),
        3 * FILTERS.len(),
        "one line per filter and format:\n{stdout}"
    );

    for (filter, module) in &modules {
        for format in ["artifact", "image", "docker"] {
            let (_, _, image) = pushed
                .iter()
                .find(|(fo, fi, _)| *fo == format && fi == filter)
                .unwrap_or_else(|| panic!("no {format} push of {filter}:\n{stdout}"));
            assert!(
                image.starts_with(&format!("{prefix}/{filter}@sha256:")),
                "{image}"
            );
            let pulled = pull(&work, image);
            let what = format!("{format} image of {filter} ({image})");
            match format {
                "artifact" => {
                    // Istio: exactly two entries in `layers`, one the raw module.
                    assert_eq!(pulled.media_type(), OCI_MANIFEST, "{what}");
                    assert_eq!(
                        pulled.manifest["config"]["mediaType"], WASM_CONFIG,
                        "{what}"
                    );
                    let types: Vec<&str> = pulled
                        .layers()
                        .iter()
                        .map(|l| l["mediaType"].as_str().unwrap())
                        .collect();
                    assert_eq!(types, [WASM_CONFIG, WASM_LAYER], "{what}");
                    let config: Value =
                        serde_json::from_slice(&pulled.blob(&pulled.manifest["config"])).unwrap();
                    assert_eq!(config["type"], "envoy_proxy", "{what}");
                    assert!(
                        pulled.blob(&pulled.layers()[1]) == *module,
                        "{what}: the module layer differs from dist/{filter}.wasm"
                    );
                }
                _ => {
                    let (manifest_type, layer_type) = if format == "image" {
                        (OCI_MANIFEST, OCI_LAYER_TAR_GZIP)
                    } else {
                        (DOCKER_MANIFEST, DOCKER_LAYER_TAR_GZIP)
                    };
                    assert_eq!(pulled.media_type(), manifest_type, "{what}");
                    assert_eq!(pulled.layers().len(), 1, "{what}");
                    let layer = pulled.layers().last().unwrap();
                    assert_eq!(layer["mediaType"], layer_type, "{what}");
                    assert!(
                        plugin_wasm_from(&pulled.blob(layer), &work) == *module,
                        "{what}: plugin.wasm differs from dist/{filter}.wasm"
                    );
                }
            }
        }
    }
}
