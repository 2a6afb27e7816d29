//! Pulling images back with an independent client, `skopeo` (Debian's,
//! installed when missing and run as root), to check what a push produced.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mesh_testkit::debian;
use serde_json::Value;

pub fn run(cmd: &mut Command) -> Output {
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
pub fn skopeo(dir: &Path) -> Command {
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
pub struct Pulled {
    pub manifest: Value,
    pub dir: PathBuf,
}

impl Pulled {
    pub fn blob(&self, descriptor: &Value) -> Vec<u8> {
        let digest = descriptor["digest"].as_str().unwrap();
        let hex = digest.strip_prefix("sha256:").unwrap();
        fs::read(self.dir.join(hex)).unwrap()
    }

    pub fn layers(&self) -> &Vec<Value> {
        self.manifest["layers"].as_array().unwrap()
    }

    pub fn media_type(&self) -> &str {
        self.manifest["mediaType"].as_str().unwrap_or_default()
    }
}

/// Pulls `image@digest` with skopeo into a `dir:` layout (skopeo checks the
/// manifest and every blob against their digests).
pub fn pull(work: &Path, image_by_digest: &str) -> Pulled {
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
pub fn plugin_wasm_from(layer: &[u8], work: &Path) -> Vec<u8> {
    let file = work.join("layer.tar.gz");
    fs::write(&file, layer).unwrap();
    run(Command::new("tar")
        .args(["-xzOf"])
        .arg(&file)
        .arg("plugin.wasm"))
    .stdout
}
