//! `cargo xtask push` against a real registry (Debian's `docker-registry`,
//! the CNCF distribution registry, on loopback), checked with an independent
//! client (`skopeo`) pulling each image back by digest: media types and layer
//! counts as Istio's Wasm puller requires them, and the module bytes equal to
//! `dist/<filter>.wasm`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mesh_testkit::registry::Registry;
use mesh_testkit::{debian, repo_root, wasm_path};
use serde_json::Value;

const FILTERS: &[&str] = &["ratelimit", "circuit-breaker", "lb-hints", "metrics"];
const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// skopeo with a permissive policy file (it refuses to work without one).
fn skopeo(dir: &Path) -> Command {
    let bin = debian::ensure("skopeo", "skopeo").unwrap();
    let policy = dir.join("policy.json");
    fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("--policy").arg(policy);
    cmd
}

/// One image as pulled back: its manifest and a blob reader.
struct Pulled {
    manifest: Value,
    dir: PathBuf,
}

impl Pulled {
    fn blob(&self, descriptor: &Value) -> Vec<u8> {
        let digest = descriptor["digest"].as_str().unwrap();
        let hex = digest.strip_prefix("sha256:").unwrap();
        fs::read(self.dir.join(hex)).unwrap()
    }

    fn layers(&self) -> &Vec<Value> {
        self.manifest["layers"].as_array().unwrap()
    }

    fn media_type(&self) -> &str {
        self.manifest["mediaType"].as_str().unwrap_or_default()
    }
}

/// Pulls `image@digest` with skopeo into a `dir:` layout (skopeo checks the
/// manifest and every blob against their digests).
fn pull(work: &Path, image_by_digest: &str) -> Pulled {
    let dir = work.join(image_by_digest.replace(['/', ':', '@'], "_"));
    run(skopeo(work)
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{image_by_digest}"))
        .arg(format!("dir:{}", dir.display())));
    let raw = run(skopeo(work)
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{image_by_digest}")))
    .stdout;
    let manifest: Value = serde_json::from_slice(&raw).unwrap();
    Pulled { manifest, dir }
}

/// `plugin.wasm` from a tar.gz layer, extracted with the system's tar.
fn plugin_wasm_from(layer: &[u8], work: &Path) -> Vec<u8> {
    let file = work.join("layer.tar.gz");
    fs::write(&file, layer).unwrap();
    run(Command::new("tar")
        .args(["-xzOf"])
        .arg(&file)
        .arg("plugin.wasm"))
    .stdout
}

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
        12,
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
