//! What Istio's own code made of the manifests in `istio/`, once per run:
//! the Go tests' output folder (extension configs, routes) and the runs of
//! `istio-fetch`, plus readers for what the Envoy tests need of it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mesh_testkit::registry::Registry;
use mesh_testkit::repo_root;
use mesh_testkit::tools::{go_binary, go_command};
use serde_json::Value;

/// What the Go tests left: the folder and their output (Istio's log lines),
/// and the runs of `istio-fetch` against the registry.
pub(crate) struct Generated {
    pub(crate) dir: PathBuf,
    pub(crate) go_log: String,
    pub(crate) fetched: Fetched,
}

/// `istio-fetch` runs: of the docker-format ratelimit image by digest (into
/// `module`), and of an image that does not exist under FAIL_OPEN.
pub(crate) struct Fetched {
    pub(crate) module: PathBuf,
    pub(crate) by_digest: std::process::Output,
    pub(crate) missing: std::process::Output,
}

pub(crate) static GENERATED: OnceLock<Result<Generated, String>> = OnceLock::new();

pub(crate) fn generated() -> &'static Generated {
    GENERATED
        .get_or_init(run_istio)
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd:?} failed ({}):\n{text}", out.status))
    }
}

pub(crate) fn run_istio() -> Result<Generated, String> {
    let dir = repo_root().join("target/istio-generated");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let module = repo_root().join("tests/istio");

    // gofmt sits next to the go binary in every Go distribution.
    let gofmt = go_binary()?.with_file_name("gofmt");
    let unformatted = output(Command::new(gofmt).current_dir(&module).args(["-l", "."]))?;
    if !unformatted.trim().is_empty() {
        return Err(format!("gofmt -l tests/istio:\n{unformatted}"));
    }
    let started = std::time::Instant::now();
    output(go_command()?.current_dir(&module).args(["vet", "./..."]))?;
    eprintln!("go vet (build included): {:.0?}", started.elapsed());

    let registry = Registry::start();
    let prefix = format!("127.0.0.1:{}/mesh-filters", registry.port());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The manifests' tag, 0.1.0, on the local registry.
    let pushed = output(
        Command::new(cargo)
            .current_dir(repo_root())
            .args(["xtask", "push", &prefix])
            .args(["--plain-http", "--no-build", "--tag", "0.1.0"])
            .args(["--format", "artifact,image,docker"]),
    )?;
    let pushed_file = dir.join("pushed.txt");
    fs::write(&pushed_file, &pushed).map_err(|e| e.to_string())?;

    let started = std::time::Instant::now();
    let go_log = output(
        go_command()?
            .current_dir(&module)
            .args(["test", "-count=1", "-timeout=20m", "-v", "./..."])
            .env("MESH_REGISTRY", &prefix)
            .env("MESH_PUSHED", &pushed_file)
            .env("MESH_ISTIO_OUT", &dir)
            .env("MESH_REPO", repo_root()),
    )?;
    eprintln!("go test: {:.0?}", started.elapsed());

    let fetch = mesh_testkit::istio::fetcher()?;
    let docker_ratelimit = pushed
        .lines()
        .find_map(|l| l.strip_prefix("pushed docker ratelimit "))
        .ok_or_else(|| format!("no docker push of ratelimit in:\n{pushed}"))?;
    let fetched_module = dir.join("fetched-ratelimit.wasm");
    let run = |args: &[&str]| {
        Command::new(&fetch)
            .args(args)
            .output()
            .map_err(|e| format!("{}: {e}", fetch.display()))
    };
    let fetched = Fetched {
        by_digest: run(&[
            "-o",
            fetched_module.to_str().unwrap(),
            &format!("oci://{docker_ratelimit}"),
        ])?,
        missing: run(&[
            &format!("oci://{prefix}/ratelimit:no-such-tag"),
            "FAIL_OPEN",
        ])?,
        module: fetched_module,
    };
    drop(registry);
    Ok(Generated {
        dir,
        go_log,
        fetched,
    })
}

pub(crate) fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Envoy cluster name Istio gives a subset of the `reviews` service.
pub(crate) fn reviews_cluster(subset: &str) -> String {
    format!("outbound|9080|{subset}|reviews.shop.svc.cluster.local")
}

/// The routes Istio generated for `reviews` on the outbound port 9080.
pub(crate) fn reviews_routes(form_dir: &Path) -> Vec<Value> {
    let config = read_json(&form_dir.join("route-config.json"));
    let host = config["virtual_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| {
            h["domains"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d == "reviews.shop.svc.cluster.local")
        })
        .unwrap_or_else(|| panic!("no virtual host for reviews in {config}"));
    host["routes"].as_array().unwrap().clone()
}

/// The extension configs Istio generated (after the agent's rewrite), in the
/// listener's order, with the filter each one runs.
pub(crate) fn extensions(dir: &Path) -> Vec<(String, Value)> {
    let configs = read_json(&dir.join("ecds.json"));
    let filters = read_json(&dir.join("filters.json"));
    filters
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .zip(configs.as_array().unwrap().iter().cloned())
        .collect()
}

/// The stats settings Istio's bootstrap makes of `istio/metrics-stats.yaml`
/// (see tests/tests/istio.rs, which checks them against the manifests).
pub(crate) fn istio_stats_config() -> Value {
    let text = fs::read_to_string(repo_root().join("istio/metrics-stats.yaml")).unwrap();
    let operator: Value = serde_yaml::from_str(text.split("\n---").next().unwrap()).unwrap();
    let config = &operator["spec"]["meshConfig"]["defaultConfig"];
    let tags: Vec<Value> = config["extraStatTags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let t = t.as_str().unwrap();
            serde_json::json!({"tag_name": t, "regex": format!("({t}=\\.=(.*?);\\.;)")})
        })
        .collect();
    let mut patterns = vec![serde_json::json!({"prefix": "reporter="})];
    for p in config["proxyStatsMatcher"]["inclusionPrefixes"]
        .as_array()
        .into_iter()
        .flatten()
    {
        patterns.push(serde_json::json!({ "prefix": p }));
    }
    patterns.push(serde_json::json!({"prefix": "component"}));
    patterns.push(serde_json::json!({"prefix": "istio"}));
    serde_json::json!({
        "use_all_default_tags": false,
        "stats_tags": tags,
        "stats_matcher": {"inclusion_list": {"patterns": patterns}},
    })
}
