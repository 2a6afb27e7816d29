//! The README's Docker commands, run for real against a private Docker
//! Engine (`mesh_testkit::docker`): `docker compose -f envoy/docker-compose.yaml
//! up -d` serves the demo, a refused plugin config stops the container with
//! the error line in its logs, and `docker build` + `docker push` of each
//! `filters/<filter>/Dockerfile` give the `docker` image format, pulled back
//! byte for byte by skopeo and by Istio's own fetcher (`istio-fetch`). Both
//! tests share one daemon.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mesh_testkit::docker::Docker;
use mesh_testkit::registry::Registry;
use mesh_testkit::{demo, envoy, envoy_binary, repo_root, wasm_path};
use support::skopeo::{plugin_wasm_from, pull};

use mesh_testkit::MODULES as FILTERS;
const COMPOSE_FILE: &str = "envoy/docker-compose.yaml";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The stand-in `envoyproxy/envoy:v<release>` image, built from the Envoy the
/// tests run and tagged with its release: a compose file naming another
/// version would try to pull it and fail.
fn envoy_image(docker: &Docker) -> String {
    let bin = envoy::executable(&envoy_binary().unwrap()).unwrap();
    let image = format!("envoyproxy/envoy:v{}", envoy::release(&bin).unwrap());
    docker.build_envoy_image(&bin, &image).unwrap();
    image
}

/// A compose project brought up by a test; `down` on drop (after printing
/// its logs if the test failed).
struct Up<'a> {
    docker: &'a Docker,
    files: Vec<String>,
}

impl<'a> Up<'a> {
    /// `<compose> -f envoy/docker-compose.yaml [-f extra] up -d` from the repository root.
    fn start(docker: &'a Docker, extra: Option<&Path>) -> Up<'a> {
        let mut files = vec![COMPOSE_FILE.to_string()];
        files.extend(extra.map(|p| p.display().to_string()));
        let up = Up { docker, files };
        Docker::run(up.compose().args(["up", "-d"])).unwrap();
        up
    }

    fn compose(&self) -> Command {
        let mut cmd = self.docker.compose();
        cmd.current_dir(repo_root());
        for file in &self.files {
            cmd.args(["-f", file]);
        }
        cmd
    }

    /// `<compose> logs envoy`: what the user reads.
    fn logs(&self) -> String {
        let out = self
            .compose()
            .args(["logs", "--no-color", "envoy"])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// The envoy container's state: `running` or `exited <code>`.
    fn state(&self) -> String {
        let id = Docker::run(self.compose().args(["ps", "-q", "envoy"])).unwrap();
        let id = String::from_utf8_lossy(&id.stdout).trim().to_string();
        let out = Docker::run(self.docker.cli().args([
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            &id,
        ]))
        .unwrap();
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match state.strip_prefix("running") {
            Some(_) => "running".to_string(),
            None => state,
        }
    }
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} logs envoy ----\n{}",
                self.docker.compose_name(),
                self.logs()
            );
        }
        let _ = self.compose().args(["down"]).output();
    }
}

#[test]
fn docker_compose_up_serves_the_demo_and_a_refused_config_stops_the_container() {
    let docker = Docker::shared().unwrap();
    eprintln!("tested with {}", docker.versions().unwrap());
    let image = envoy_image(&docker);
    let compose_text = fs::read_to_string(repo_root().join(COMPOSE_FILE)).unwrap();
    assert!(
        compose_text.contains(&format!("image: {image}")),
        "{compose_text}"
    );

    let (_v1, v2) = demo::start_upstreams().unwrap();
    {
        // The README's command, as written (`up -d` to get the prompt back).
        let up = Up::start(&docker, None);
        demo::wait_until_serving(Duration::from_secs(120), &mut || match up.state() {
            s if s == "running" => Ok(()),
            s => Err(format!("the envoy container is {s}:\n{}", up.logs())),
        })
        .unwrap();
        demo::drive_and_check(&demo::Target::fixed_ports(&v2));
        assert!(
            up.logs().contains("ratelimit: configured"),
            "the filters' log lines are in `compose logs`:\n{}",
            up.logs()
        );
    }
    assert_eq!(
        docker.containers(),
        Vec::<String>::new(),
        "`down` removes the container"
    );

    // A user's edited demo.yaml whose ratelimit config is refused: `up -d`
    // still succeeds, the container exits 1, the error line is in its logs.
    let scratch = std::env::temp_dir().join(format!("mesh-compose-bad-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    let demo_yaml = fs::read_to_string(repo_root().join("envoy/demo.yaml")).unwrap();
    let refused = demo_yaml.replace(r#""per": "1m""#, r#""per": "fast""#);
    assert_ne!(refused, demo_yaml);
    fs::write(scratch.join("demo.yaml"), refused).unwrap();
    let override_file = scratch.join("refused.yaml");
    fs::write(
        &override_file,
        format!(
            "services:\n  envoy:\n    volumes:\n      - {}:/mesh/envoy/demo.yaml:ro\n",
            scratch.join("demo.yaml").display()
        ),
    )
    .unwrap();
    {
        let up = Up::start(&docker, Some(&override_file));
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while up.state() == "running" || up.state().starts_with("created") {
            assert!(
                std::time::Instant::now() < deadline,
                "still running:\n{}",
                up.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        assert_eq!(up.state(), "exited 1", "{}", up.logs());
        let logs = up.logs();
        let error = r#"ratelimit: rules[0].limit.per: expected a duration like "1s", got "fast""#;
        assert!(
            logs.lines()
                .any(|l| l.contains("[error][wasm]") && l.ends_with(error)),
            "{logs}"
        );
        assert!(logs.contains("Plugin ratelimit failed to load"), "{logs}");
    }
    let _ = fs::remove_dir_all(&scratch);
    assert_eq!(docker.containers(), Vec::<String>::new());
}

/// Gets the module back from a pushed image the way a client that only knows
/// the image reference would: here skopeo pulls it by digest (checking every
/// blob's digest) and `plugin.wasm` comes out of its only layer, which must be
/// Docker's `tar.gzip`: the `docker` format of README "OCI images".
fn fetch_module(image_by_digest: &str, work: &Path) -> Vec<u8> {
    let pulled = pull(work, image_by_digest);
    assert_eq!(pulled.media_type(), DOCKER_MANIFEST, "{image_by_digest}");
    assert_eq!(pulled.layers().len(), 1, "{image_by_digest}");
    let layer = &pulled.layers()[0];
    assert_eq!(
        layer["mediaType"], DOCKER_LAYER_TAR_GZIP,
        "{image_by_digest}"
    );
    plugin_wasm_from(&pulled.blob(layer), work)
}

/// "718.8kB", "1.119MB", "2.5GB" (the legacy builder's context size) in MB.
fn context_megabytes(size: &str) -> Option<f64> {
    let unit_at = size.find(|c: char| c.is_ascii_alphabetic())?;
    let value: f64 = size[..unit_at].parse().ok()?;
    let scale = match &size[unit_at..] {
        "B" => 1e-6,
        "kB" => 1e-3,
        "MB" => 1.0,
        "GB" => 1e3,
        _ => return None,
    };
    Some(value * scale)
}

#[test]
fn docker_build_and_push_of_each_dockerfile_give_the_docker_format() {
    let docker = Docker::shared().unwrap();
    let registry = Registry::start();
    let work = registry.dir().join("pulled");
    fs::create_dir_all(&work).unwrap();
    let prefix = format!("127.0.0.1:{}/mesh-filters", registry.port());
    for filter in FILTERS {
        // README "OCI images", with Docker, from the repository root.
        let image = format!("{prefix}/{filter}:test-docker");
        let built = Docker::run(docker.cli().current_dir(repo_root()).args([
            "build",
            "-f",
            &format!("filters/{filter}/Dockerfile"),
            "-t",
            &image,
            ".",
        ]))
        .unwrap();
        let output = String::from_utf8_lossy(&built.stdout);
        // .dockerignore keeps the context to dist/*.wasm (else: target/, .venv, ...).
        if let Some(context) = output
            .lines()
            .find(|l| l.starts_with("Sending build context"))
        {
            let size = context.split_whitespace().last().unwrap_or_default();
            let megabytes = context_megabytes(size).unwrap_or_else(|| panic!("{output}"));
            assert!(megabytes < 16.0, "the modules are ~250 kB each: {output}");
        }
        // A loopback registry is plain HTTP, which dockerd allows for 127.0.0.0/8 by default.
        let pushed = Docker::run(docker.cli().args(["push", &image])).unwrap();
        let pushed = String::from_utf8_lossy(&pushed.stdout);
        let digest = pushed
            .split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .unwrap_or_else(|| panic!("no digest in:\n{pushed}"));
        let by_digest = format!("{prefix}/{filter}@{digest}");
        let module = fs::read(wasm_path(filter)).unwrap();
        assert!(
            fetch_module(&by_digest, &work) == module,
            "{by_digest}: plugin.wasm differs from dist/{filter}.wasm"
        );
        // And as Istio's sidecar agent pulls it (its own fetcher, pkg/wasm).
        // A sidecar whose fetch failed NACKs and gets the config again, so
        // one more try is what Istio does too; the first error is kept in
        // the log (one CI run failed here, on a machine under load).
        let fetched = mesh_testkit::istio::fetch(&by_digest, &work)
            .or_else(|first| {
                eprintln!("{by_digest}: Istio's fetch failed once, again:\n{first}");
                mesh_testkit::istio::fetch(&by_digest, &work)
            })
            .unwrap();
        assert!(
            fetched == module,
            "{by_digest}: Istio's fetcher got a module that differs from dist/{filter}.wasm"
        );
    }
}
