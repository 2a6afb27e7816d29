//! `cargo xtask demo`: build, start the demo Envoy and upstreams, drive
//! traffic that shows each filter, print a summary. Interactive runs then keep
//! everything up until Ctrl-C (Envoy, in our process group, stops with us);
//! `--once` or a non-terminal stdin exits right after the summary. `--suite`
//! runs the same demo on the suite module (`envoy/suite.yaml`).

use std::io::IsTerminal;
use std::path::Path;

pub fn run(args: &[String]) -> Result<(), String> {
    let once = args.iter().any(|a| a == "--once") || !std::io::stdin().is_terminal();
    let config = if args.iter().any(|a| a == "--suite") {
        "envoy/suite.yaml"
    } else {
        "envoy/demo.yaml"
    };
    crate::build::build_all()?;
    let envoy = mesh_testkit::envoy_binary()?;
    println!(
        "==> starting Envoy ({}) with {config} and upstreams v1 (:8081), v2 (:8082)",
        envoy.display()
    );
    let demo = mesh_testkit::demo::start(Path::new(config))?;
    println!(
        "==> Envoy is up: listener 127.0.0.1:{}, admin 127.0.0.1:{}\n",
        demo.envoy.port(),
        demo.envoy.admin_port()
    );
    let report = mesh_testkit::demo::drive(&demo, &mut |line| println!("{line}"))?;
    println!("\n==> summary");
    for line in &report.summary {
        println!("    {line}");
    }
    if once {
        println!("==> done; stopping Envoy and the upstreams");
        return Ok(());
    }
    println!(
        "\nEnvoy keeps running: try `curl -i localhost:{}/api/items -H 'x-api-key: you'`,\n\
         stats at http://127.0.0.1:{}/stats/prometheus. Ctrl-C stops everything.",
        demo.envoy.port(),
        demo.envoy.admin_port()
    );
    loop {
        std::thread::park();
    }
}

/// The demo's upstreams alone, for running Envoy yourself (docker compose, func-e).
pub fn upstreams() -> Result<(), String> {
    use mesh_testkit::demo::{UPSTREAM_V1, UPSTREAM_V2};
    let _v1 = mesh_testkit::Upstream::start_on("v1", UPSTREAM_V1)
        .map_err(|e| format!(":{UPSTREAM_V1}: {e}"))?;
    let _v2 = mesh_testkit::Upstream::start_on("v2", UPSTREAM_V2)
        .map_err(|e| format!(":{UPSTREAM_V2}: {e}"))?;
    println!("upstreams v1 on 127.0.0.1:{UPSTREAM_V1} and v2 on 127.0.0.1:{UPSTREAM_V2}; Ctrl-C stops them");
    loop {
        std::thread::park();
    }
}
