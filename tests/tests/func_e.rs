//! func-e, as README "Running Envoy yourself" and "Finding Envoy" use it:
//! built at its pinned release, with the tests' Envoy installed as func-e's
//! Envoy of that release (no download). `func-e run -c envoy/demo.yaml` serves
//! the demo, and the tests' Envoy lookup picks func-e's Envoy when func-e is
//! on PATH and no `$ENVOY_BIN` or `envoy` on PATH comes first.

use std::process::Command;
use std::time::Duration;

use mesh_testkit::func_e::FuncE;
use mesh_testkit::{demo, envoy, envoy_binary, repo_root};

fn func_e() -> FuncE {
    let bin = envoy::executable(&envoy_binary().unwrap()).unwrap();
    let release = envoy::release(&bin).unwrap();
    let func_e = FuncE::with_envoy(&bin, &release).unwrap();
    eprintln!(
        "tested with func-e {}, Envoy {release}",
        func_e.version().unwrap()
    );
    func_e
}

#[test]
fn func_e_run_serves_the_demo_with_the_installed_envoy() {
    let func_e = func_e();
    let (_v1, v2) = demo::start_upstreams().unwrap();
    // The README's command, as written, from the repository root.
    let mut running = func_e.spawn(&["run", "-c", "envoy/demo.yaml"]).unwrap();
    demo::wait_until_serving(Duration::from_secs(120), &mut || running.still_running()).unwrap();
    let log = running.log();
    // func-e found its installed Envoy (nothing downloaded) and runs it.
    let release = envoy::release(func_e.installed_envoy()).unwrap();
    assert!(
        log.contains(&format!("{release} is already downloaded")),
        "{log}"
    );
    assert!(
        log.contains(&format!("starting: {}", func_e.installed_envoy().display())),
        "{log}"
    );
    demo::drive_and_check(&demo::Target::fixed_ports(&v2));
}

/// `cargo xtask envoy` prints the Envoy the tests and the demo use (README
/// "Finding Envoy"): with func-e on PATH, no `$ENVOY_BIN` and no `envoy` on
/// PATH, it is func-e's installed Envoy, not the project's `.venv`.
#[test]
fn finding_envoy_picks_the_envoy_func_e_has_installed() {
    let func_e = func_e();
    let func_e_dir = func_e.bin().parent().unwrap().to_path_buf();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let without_envoy = std::env::split_paths(&path).filter(|d| !d.join("envoy").is_file());
    let path = std::env::join_paths(std::iter::once(func_e_dir).chain(without_envoy)).unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(repo_root())
        .args(["xtask", "envoy"])
        .env_remove("ENVOY_BIN")
        .env("PATH", path)
        .envs(func_e.env())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        func_e.installed_envoy().display().to_string()
    );
}

/// A refused plugin config under func-e: Envoy exits, func-e exits non-zero,
/// and the filter's error line is in func-e's output (its last line is about
/// the admin address it waited for, not the cause).
#[test]
fn func_e_run_with_a_refused_config_exits_with_the_filters_error_line() {
    let func_e = func_e();
    let scratch = std::env::temp_dir().join(format!("mesh-func-e-bad-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let demo_yaml = std::fs::read_to_string(repo_root().join("envoy/demo.yaml")).unwrap();
    // Ports 0: the test above may be running the real demo meanwhile.
    let refused = demo_yaml
        .replace(r#""per": "1m""#, r#""per": "fast""#)
        .replace("port_value: 10000", "port_value: 0")
        .replace("port_value: 9901", "port_value: 0");
    let config = scratch.join("demo.yaml");
    std::fs::write(&config, refused).unwrap();
    let out = func_e
        .command()
        .current_dir(repo_root())
        .args(["run", "-c"])
        .arg(&config)
        .arg("--use-dynamic-base-id")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{log}");
    let error = r#"ratelimit: rules[0].limit.per: expected a duration like "1s", got "fast""#;
    assert!(
        log.lines()
            .any(|l| l.contains("[error][wasm]") && l.ends_with(error)),
        "{log}"
    );
    assert!(log.contains("Plugin ratelimit failed to load"), "{log}");
}
