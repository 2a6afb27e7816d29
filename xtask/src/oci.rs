//! `cargo xtask push`: pushes each built `dist/<filter>.wasm` to an OCI
//! registry as an image Istio's Wasm puller accepts, talking the OCI
//! distribution API itself (no Docker engine).
//!
//! Istio (`pkg/wasm/imagefetcher.go`) accepts three shapes:
//! - `artifact`: an OCI manifest with exactly two entries in `layers`, one of
//!   type `application/vnd.module.wasm.content.layer.v1+wasm` (the raw
//!   module). The manifest's `config` does not count as a layer: a manifest
//!   with the Wasm config as `config` and the module as its only layer is
//!   refused ("number of layers must be 2 but got 1"). So the runtime config
//!   (`application/vnd.module.wasm.config.v1+json`) is both the manifest's
//!   config and the first layer, as `wasme` (the variant's origin) lays it out.
//! - `image`: an OCI image manifest whose last layer is
//!   `application/vnd.oci.image.layer.v1.tar+gzip` holding `plugin.wasm`.
//! - `docker`: a Docker v2 schema 2 manifest whose last layer is
//!   `application/vnd.docker.image.rootfs.diff.tar.gzip` holding `plugin.wasm`
//!   (what `docker build` of `filters/<filter>/Dockerfile` + `docker push` gives).
//!   Istio checks the manifest type: a Docker layer type in an OCI manifest (or
//!   the reverse) is refused.

use std::collections::BTreeMap;
use std::io::Write;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::build::FILTERS;

pub const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

const USAGE: &str = "usage: cargo xtask push <registry>/<path> [--tag TAG] \
[--format artifact,image,docker] [--plain-http] [--no-build] [FILTER...]

Pushes <registry>/<path>/<filter>:<TAG> (format artifact), :<TAG>-image and
:<TAG>-docker. Defaults: --tag latest, --format artifact,image, all filters.
--plain-http talks HTTP to the registry (a local one); --no-build pushes
dist/*.wasm as they are. Credentials: MESH_OCI_USERNAME and MESH_OCI_PASSWORD,
else the Docker config ($DOCKER_CONFIG or ~/.docker/config.json, including
credential helpers), else anonymous. Prints one line per push:
  pushed <format> <filter> <registry>/<path>/<filter>@sha256:<digest>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Artifact,
    Image,
    Docker,
}

impl Format {
    fn parse(name: &str) -> Result<Format, String> {
        match name {
            "artifact" => Ok(Format::Artifact),
            "image" => Ok(Format::Image),
            "docker" => Ok(Format::Docker),
            other => Err(format!(
                "unknown format {other:?} (artifact, image or docker)\n{USAGE}"
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Format::Artifact => "artifact",
            Format::Image => "image",
            Format::Docker => "docker",
        }
    }

    /// The tag this format is pushed under, so all formats can coexist.
    fn tag(self, tag: &str) -> String {
        match self {
            Format::Artifact => tag.to_string(),
            Format::Image => format!("{tag}-image"),
            Format::Docker => format!("{tag}-docker"),
        }
    }
}

struct Options {
    repository_prefix: String,
    tag: String,
    formats: Vec<Format>,
    plain_http: bool,
    build: bool,
    filters: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        repository_prefix: String::new(),
        tag: "latest".to_string(),
        formats: vec![Format::Artifact, Format::Image],
        plain_http: false,
        build: true,
        filters: Vec::new(),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--tag" => options.tag = value()?,
            "--format" => {
                options.formats = value()?
                    .split(',')
                    .map(Format::parse)
                    .collect::<Result<_, _>>()?
            }
            "--plain-http" => options.plain_http = true,
            "--no-build" => options.build = false,
            "-h" | "--help" => return Err(USAGE.to_string()),
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag}\n{USAGE}")),
            _ if options.repository_prefix.is_empty() => {
                options.repository_prefix = arg.trim_end_matches('/').to_string()
            }
            filter if FILTERS.contains(&filter) => options.filters.push(filter.to_string()),
            other => {
                return Err(format!(
                    "unknown filter {other:?} (one of {})\n{USAGE}",
                    FILTERS.join(", ")
                ))
            }
        }
    }
    if options.repository_prefix.is_empty() {
        return Err(USAGE.to_string());
    }
    if options.filters.is_empty() {
        options.filters = FILTERS.iter().map(|f| f.to_string()).collect();
    }
    Ok(options)
}

/// Entry point of `cargo xtask push`.
pub fn run(args: &[String]) -> Result<(), String> {
    let options = parse_args(args)?;
    if options.build {
        crate::build::build_all()?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(push_all(&options))
}

async fn push_all(options: &Options) -> Result<(), String> {
    let registry = options
        .repository_prefix
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let protocol = if options.plain_http {
        ClientProtocol::HttpsExcept(vec![registry.clone()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        ..Default::default()
    });
    let auth = registry_auth(&registry)?;
    for filter in &options.filters {
        let path = mesh_testkit::dist_dir().join(format!("{filter}.wasm"));
        let module = std::fs::read(&path).map_err(|e| {
            format!(
                "{}: {e} (build the filters first: cargo xtask build)",
                path.display()
            )
        })?;
        for &format in &options.formats {
            let name = format!(
                "{}/{filter}:{}",
                options.repository_prefix,
                format.tag(&options.tag)
            );
            let reference: Reference = name
                .parse()
                .map_err(|e| format!("image reference {name:?}: {e}"))?;
            let digest = push_image(&client, &auth, &reference, filter, format, &module)
                .await
                .map_err(|e| format!("pushing {name} ({}): {e}", format.name()))?;
            println!(
                "pushed {} {filter} {}/{filter}@{digest}",
                format.name(),
                options.repository_prefix
            );
        }
    }
    Ok(())
}

/// `MESH_OCI_USERNAME`/`MESH_OCI_PASSWORD`, else the Docker config's entry for
/// the registry, else anonymous.
fn registry_auth(registry: &str) -> Result<RegistryAuth, String> {
    let user = std::env::var("MESH_OCI_USERNAME").unwrap_or_default();
    let password = std::env::var("MESH_OCI_PASSWORD").unwrap_or_default();
    if !user.is_empty() || !password.is_empty() {
        return Ok(RegistryAuth::Basic(user, password));
    }
    // Docker keys Docker Hub as its v1 URL.
    let server = match registry {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "https://index.docker.io/v1/",
        other => other,
    };
    match docker_credential::get_credential(server) {
        Ok(docker_credential::DockerCredential::UsernamePassword(user, password)) => {
            Ok(RegistryAuth::Basic(user, password))
        }
        Ok(docker_credential::DockerCredential::IdentityToken(_)) => Err(format!(
            "the Docker config holds an identity token for {registry}, which this command \
             cannot use: set MESH_OCI_USERNAME and MESH_OCI_PASSWORD instead"
        )),
        Err(_) => Ok(RegistryAuth::Anonymous),
    }
}

/// A blob with its descriptor.
struct Blob {
    media_type: &'static str,
    data: Vec<u8>,
    title: Option<String>,
}

impl Blob {
    fn new(media_type: &'static str, data: Vec<u8>) -> Blob {
        Blob {
            media_type,
            data,
            title: None,
        }
    }

    fn titled(mut self, title: &str) -> Blob {
        self.title = Some(title.to_string());
        self
    }

    fn digest(&self) -> String {
        sha256_digest(&self.data)
    }

    fn descriptor(&self) -> Value {
        let mut d = json!({
            "mediaType": self.media_type,
            "digest": self.digest(),
            "size": self.data.len(),
        });
        if let (Some(title), Some(object)) = (&self.title, d.as_object_mut()) {
            object.insert(
                "annotations".into(),
                json!({ "org.opencontainers.image.title": title }),
            );
        }
        d
    }
}

pub fn sha256_digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let mut out = String::from("sha256:");
    for byte in hash.iter() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// The manifest (media type, JSON) and the blobs it names, config first.
fn image_layout(
    filter: &str,
    format: Format,
    module: &[u8],
) -> Result<(&'static str, Value, Vec<Blob>), String> {
    match format {
        Format::Artifact => {
            // The runtime config of the Wasm artifact spec (solo-io/wasm spec.md).
            let runtime_config = json!({
                "type": "envoy_proxy",
                "abiVersions": ["proxy_abi_version_0_2_1"],
                "config": {},
            });
            let config = Blob::new(WASM_CONFIG, runtime_config.to_string().into_bytes());
            let layers = vec![
                Blob::new(WASM_CONFIG, config.data.clone()).titled("runtime-config.json"),
                Blob::new(WASM_LAYER, module.to_vec()).titled(&format!("{filter}.wasm")),
            ];
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
            });
            Ok((
                OCI_MANIFEST,
                manifest,
                std::iter::once(config).chain(layers).collect(),
            ))
        }
        Format::Image | Format::Docker => {
            let tar = plugin_tar(module)?;
            let diff_id = sha256_digest(&tar);
            let layer_data = gzip(&tar)?;
            // No OS or CPU runs this image: the platform names the module's target.
            let image_config = json!({
                "architecture": "wasm",
                "os": "unknown",
                "config": {},
                "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            });
            let (manifest_type, config_type, layer_type) = if format == Format::Image {
                (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_TAR_GZIP)
            } else {
                (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_TAR_GZIP)
            };
            let config = Blob::new(config_type, image_config.to_string().into_bytes());
            let layer = Blob::new(layer_type, layer_data);
            let mut manifest = json!({
                "schemaVersion": 2,
                "mediaType": manifest_type,
                "config": config.descriptor(),
                "layers": [layer.descriptor()],
            });
            if format == Format::Image {
                // Asked for by the compat spec (solo-io/wasm spec-compat.md) for OCI layers.
                if let Some(object) = manifest.as_object_mut() {
                    object.insert(
                        "annotations".into(),
                        json!({ "module.wasm.image/variant": "compat" }),
                    );
                }
            }
            Ok((manifest_type, manifest, vec![config, layer]))
        }
    }
}

/// Pushes one image; returns its manifest digest.
async fn push_image(
    client: &Client,
    auth: &RegistryAuth,
    reference: &Reference,
    filter: &str,
    format: Format,
    module: &[u8],
) -> Result<String, String> {
    let (manifest_type, manifest, blobs) = image_layout(filter, format, module)?;
    client
        .store_auth_if_needed(reference.resolve_registry(), auth)
        .await;
    let mut pushed = BTreeMap::new();
    for blob in &blobs {
        let digest = blob.digest();
        if pushed.insert(digest.clone(), ()).is_none() {
            client
                .push_blob(reference, blob.data.clone(), &digest)
                .await
                .map_err(|e| format!("blob {digest}: {e}"))?;
        }
    }
    let body = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
    let digest = sha256_digest(&body);
    let content_type = manifest_type
        .parse()
        .map_err(|e| format!("content type: {e}"))?;
    client
        .push_manifest_raw(reference, body, content_type)
        .await
        .map_err(|e| format!("manifest: {e}"))?;
    Ok(digest)
}

/// A tar archive holding the module as `plugin.wasm` (fixed mode, owner and
/// time, so the same module always gives the same layer digest).
fn plugin_tar(module: &[u8]) -> Result<Vec<u8>, String> {
    let mut header = tar::Header::new_gnu();
    header.set_size(module.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_data(&mut header, "plugin.wasm", module)
        .map_err(|e| format!("tar: {e}"))?;
    builder.into_inner().map_err(|e| format!("tar: {e}"))
}

fn gzip(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(data).map_err(|e| format!("gzip: {e}"))?;
    encoder.finish().map_err(|e| format!("gzip: {e}"))
}
