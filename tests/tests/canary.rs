//! lb-hints' canary analysis in a real Envoy (2 workers) in front of two real
//! upstreams, `v1` (stable) and `v2` (the canary). Routing is on the header
//! the filter writes, as in `lb_hints.rs`; every count of canary calls is
//! taken at the upstream itself.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mesh_testkit::http::{self, Client};
use mesh_testkit::{both_forms, Behaviour, Bootstrap, Envoy, Form, Split, Upstream, WasmFilter};

/// A rollout rule: v1 90 / v2 10, then `steps`, judged by `analysis`.
fn rollout(steps: &str, analysis: &str) -> String {
    format!(
        r#"{{"rules": [{{"name": "rollout", "algorithm": "weighted_round_robin",
            "override": {{"header": "x-force-target"}},
            "targets": [{{"name": "v1", "weight": 90}}, {{"name": "v2", "weight": 10}}],
            "steps": {steps},
            "analysis": {{"canary": "v2", {analysis}}}}}]}}"#
    )
}

fn start(form: Form, config: &str) -> Split {
    Split::start(
        Bootstrap::in_form(form),
        WasmFilter::new("lb-hints", config),
    )
}

fn gauge(envoy: &Envoy, name: &str) -> Option<f64> {
    envoy.metric(name, &[("rule", "rollout")])
}

/// Background traffic from `connections` clients until dropped; each client
/// opens a new connection every 10 requests, so both workers take some.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(port: u16, connections: usize, pause: Duration) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..connections)
            .map(|_| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let mut client = Client::new(port);
                        for _ in 0..10 {
                            let _ = client.get("/", &[]);
                            n += 1;
                            thread::sleep(pause);
                        }
                    }
                    let _ = n;
                })
            })
            .collect();
        Traffic { stop, threads }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Polls until `done` or `limit` passes; true if done.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// Connections each worker has accepted so far (`worker_0`, `worker_1`).
fn connections_per_worker(envoy: &Envoy) -> Vec<u64> {
    let text = http::get(
        envoy.admin_port(),
        "/stats?filter=^listener\\..*\\.worker_[0-9]+\\.downstream_cx_total$",
        &[],
    )
    .map(|r| r.body_text())
    .unwrap_or_default();
    let mut out: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(": ")?;
            let worker = name.split('.').find(|p| p.starts_with("worker_"))?;
            Some((worker.to_string(), value.trim().parse().ok()?))
        })
        .collect();
    out.sort();
    out.into_iter().map(|(_, n)| n).collect()
}

/// `n` requests, each on a fresh connection (so both workers take some);
/// returns how many of them each upstream served (v1, v2).
fn fresh_requests(s: &Split, n: usize) -> (u64, u64) {
    let (v1, v2) = (s.v1.requests(), s.v2.requests());
    for _ in 0..n {
        let r = http::get(s.envoy.port(), "/", &[]).expect("an answer");
        assert_ne!(r.status, 421, "unrouted: {}", r.body_text());
    }
    (s.v1.requests() - v1, s.v2.requests() - v2)
}

both_forms!(a_healthy_canary_walks_through_every_step_to_its_last_weights);
fn a_healthy_canary_walks_through_every_step_to_its_last_weights(form: Form) {
    let s = start(
        form,
        &rollout(
            r#"[{"after": "2s", "weights": {"v1": 50, "v2": 50}},
            {"after": "4s", "weights": {"v1": 0, "v2": 100}}]"#,
            r#""interval": "1s", "min_calls": 5"#,
        ),
    );
    let traffic = Traffic::start(s.envoy.port(), 3, Duration::from_millis(5));
    let mut steps_seen = Vec::new();
    let promoted = wait_until(Duration::from_secs(60), || {
        if let Some(step) = gauge(&s.envoy, "mesh_lb_canary_step") {
            if steps_seen.last() != Some(&step) {
                steps_seen.push(step);
            }
        }
        gauge(&s.envoy, "mesh_lb_canary_state") == Some(1.0)
    });
    drop(traffic);
    assert!(
        promoted,
        "not promoted; steps seen {steps_seen:?}; log:\n{}",
        s.envoy.log()
    );
    assert_eq!(gauge(&s.envoy, "mesh_lb_canary_step"), Some(2.0));
    assert_eq!(steps_seen.first(), Some(&0.0), "{steps_seen:?}");
    assert_eq!(
        fresh_requests(&s, 100),
        (0, 100),
        "the last weights: v2 takes all"
    );
    assert_eq!(
        gauge(&s.envoy, "mesh_lb_canary_rollbacks_total").unwrap_or(0.0),
        0.0
    );
    let calls = s.envoy.metric(
        "mesh_lb_canary_calls_total",
        &[("rule", "rollout"), ("outcome", "success")],
    );
    assert!(calls.is_some_and(|c| c >= 15.0), "{calls:?}");
}

/// The wasm filter delivered through Envoy's filesystem ECDS: rewriting the
/// file changes the filter's configuration in the running Envoy (same
/// process, same shared data), as a control plane's update would.
struct DynamicFilter {
    form: Form,
    path: PathBuf,
    version: u32,
}

impl DynamicFilter {
    fn new(form: Form, dir: &Path) -> DynamicFilter {
        DynamicFilter {
            form,
            path: dir.join("lb-hints-ecds.json"),
            version: 0,
        }
    }

    /// The `http_filters` entry that reads the filter from the file.
    fn entry(&self) -> String {
        // The name of the resource the file holds.
        let name = WasmFilter::new("lb-hints", "").in_form(self.form).name;
        format!(
            r#"{{"name": {name}, "config_discovery": {{"config_source": {{"path_config_source": {{"path": {path}}}, "resource_api_version": "V3"}},
                "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"]}}}}"#,
            name = mesh_testkit::json_string(&name),
            path = mesh_testkit::json_string(&self.path.to_string_lossy())
        )
    }

    /// Writes `config` as the filter's new configuration (atomically: Envoy
    /// watches for the file being moved into place).
    fn set(&mut self, config: &str) {
        self.version += 1;
        let filter = WasmFilter::new("lb-hints", config)
            .in_form(self.form)
            .json();
        // A TypedExtensionConfig is the http_filters entry with its type.
        let resource = filter.replacen(
            '{',
            r#"{"@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig", "#,
            1,
        );
        let tmp = self.path.with_extension("tmp");
        fs::write(
            &tmp,
            format!(
                r#"{{"version_info": "{}", "resources": [{resource}]}}"#,
                self.version
            ),
        )
        .unwrap();
        fs::rename(&tmp, &self.path).unwrap();
    }
}

const CONFIGURED: &str = "lb-hints: configured 1 rule(s)";

/// Applies `config` through `filter` and waits until every VM logged it.
fn reconfigure(s: &Split, filter: &mut DynamicFilter, config: &str) {
    let before = s.envoy.log().matches(CONFIGURED).count();
    filter.set(config);
    // The main thread's VM and both workers' configure.
    let done = wait_until(Duration::from_secs(20), || {
        s.envoy.log().matches(CONFIGURED).count() >= before + 3
    });
    assert!(
        done,
        "the new configuration was not applied; log:\n{}",
        s.envoy.log()
    );
}

both_forms!(a_canary_failing_30_percent_is_rolled_back_after_its_first_interval_on_both_workers);
fn a_canary_failing_30_percent_is_rolled_back_after_its_first_interval_on_both_workers(form: Form) {
    const INTERVAL: Duration = Duration::from_secs(2);
    let dir = std::env::temp_dir().join(format!("mesh-canary-{}-{form:?}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let steps = r#"[{"after": "1m", "weights": {"v1": 50, "v2": 50}}]"#;
    let analysis = r#""interval": "2s", "min_calls": 20, "max_failure_rate_percent": 5"#;
    let mut filter = DynamicFilter::new(form, &dir);
    filter.set(&rollout(steps, analysis));
    let (v1, v2) = (Upstream::start("v1"), Upstream::start("v2"));
    v2.fail_share(30);
    // Filesystem subscriptions need the node's id and cluster.
    let yaml = Bootstrap::in_form(form)
        .routed_by("x-mesh-target", v1.port(), v2.port())
        .filter_json(&filter.entry())
        .yaml()
        .replacen(
            r#""admin":"#,
            r#""node": {"id": "canary", "cluster": "canary"}, "admin":"#,
            1,
        );
    let envoy = Envoy::start(&yaml);
    let s = Split { envoy, v1, v2 };

    // The canary fails from its first call on; the clock starts at the first one.
    let traffic = Traffic::start(s.envoy.port(), 4, Duration::from_millis(2));
    assert!(wait_until(Duration::from_secs(10), || s.v2.requests() > 0));
    let first_canary_call = Instant::now();
    let rolled_back = wait_until(Duration::from_secs(30), || {
        gauge(&s.envoy, "mesh_lb_canary_state") == Some(2.0)
    });
    let seen_rolled_back = first_canary_call.elapsed();
    drop(traffic);
    assert!(rolled_back, "not rolled back; log:\n{}", s.envoy.log());
    let canary_calls = s.v2.requests();
    // The worker that judged logged the interval's counts: every canary call
    // but those still in flight at the rollback was in that first interval.
    let log = s.envoy.log();
    let line = log
        .lines()
        .find(|l| l.contains("canary rolled back"))
        .unwrap_or_else(|| panic!("no rollback line:\n{log}"));
    let judged: u64 = line
        .split(" of ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(judged >= 20, "{line}");
    // Before it at most one interval too short to judge (under min_calls),
    // after it the calls in flight on the 4 connections.
    assert!(
        canary_calls >= judged && canary_calls < judged + 20 + 4,
        "{canary_calls} canary calls, {judged} judged: {line}"
    );
    println!(
        "canary rollback: {canary_calls} canary calls ({judged} judged) and {:.2} s from the first \
         failing call to the state gauge reading 2 (interval {} s, gauge polled every 50 ms)",
        seen_rolled_back.as_secs_f64(),
        INTERVAL.as_secs()
    );

    // Nothing reaches the canary any more, on either worker.
    let before = connections_per_worker(&s.envoy);
    assert_eq!(fresh_requests(&s, 200), (200, 0));
    let after = connections_per_worker(&s.envoy);
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(
        before.iter().zip(&after).all(|(b, a)| a > b),
        "both workers took some of the 200: {before:?} -> {after:?}"
    );
    assert_eq!(gauge(&s.envoy, "mesh_lb_canary_state"), Some(2.0));
    assert_eq!(gauge(&s.envoy, "mesh_lb_canary_rollbacks_total"), Some(1.0));
    // Override still reaches it.
    let forced = http::get(s.envoy.port(), "/", &[("x-force-target", "v2")]).unwrap();
    assert_eq!(forced.header("x-served-by"), Some("v2"));

    // A new configuration with the same rule keeps the rollback...
    let same_rule =
        rollout(steps, analysis).replace(r#""rules""#, r#""route_metadata": false, "rules""#);
    reconfigure(&s, &mut filter, &same_rule);
    assert_eq!(fresh_requests(&s, 50), (50, 0));
    // ...and one with new steps starts over, the canary healthy now.
    s.v2.fail_share(0);
    reconfigure(
        &s,
        &mut filter,
        &rollout(
            r#"[{"after": "1s", "weights": {"v1": 50, "v2": 50}}]"#,
            r#""interval": "1s", "min_calls": 5"#,
        ),
    );
    let canary_before = s.v2.requests();
    let traffic = Traffic::start(s.envoy.port(), 3, Duration::from_millis(5));
    let promoted = wait_until(Duration::from_secs(30), || {
        gauge(&s.envoy, "mesh_lb_canary_state") == Some(1.0)
    });
    drop(traffic);
    assert!(
        promoted,
        "the changed rule did not start over; log:\n{}",
        s.envoy.log()
    );
    assert!(s.v2.requests() > canary_before + 5);
    let (to_v1, to_v2) = fresh_requests(&s, 100);
    assert_eq!(to_v1 + to_v2, 100);
    assert!(
        (40..=60).contains(&to_v2),
        "50/50 after the new step: {to_v2}"
    );
    let _ = fs::remove_dir_all(&dir);
}

both_forms!(an_interval_with_too_few_canary_calls_neither_advances_nor_fails);
fn an_interval_with_too_few_canary_calls_neither_advances_nor_fails(form: Form) {
    let s = start(
        form,
        &rollout(
            r#"[{"after": "1s", "weights": {"v1": 50, "v2": 50}}]"#,
            r#""interval": "1s", "min_calls": 1000"#,
        ),
    );
    s.v2.fail_share(100);
    let traffic = Traffic::start(s.envoy.port(), 2, Duration::from_millis(10));
    // Several intervals and the step's `after` pass.
    thread::sleep(Duration::from_secs(5));
    drop(traffic);
    assert!(s.v2.requests() >= 20, "{} canary calls", s.v2.requests());
    assert_eq!(gauge(&s.envoy, "mesh_lb_canary_state"), Some(0.0));
    assert_eq!(gauge(&s.envoy, "mesh_lb_canary_step"), Some(0.0));
    assert_eq!(
        gauge(&s.envoy, "mesh_lb_canary_rollbacks_total").unwrap_or(0.0),
        0.0
    );
    // Still the initial 90/10 (exact with weighted round robin).
    let responses = mesh_testkit::concurrent_gets(s.envoy.port(), "/", &[], 4, 100);
    let to_v2 = responses
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_ok_and(|r| r.header("x-served-by") == Some("v2"))
        })
        .count();
    assert_eq!(to_v2, 10);
}

both_forms!(slow_canary_calls_above_the_slow_threshold_roll_back_like_failures);
fn slow_canary_calls_above_the_slow_threshold_roll_back_like_failures(form: Form) {
    let s = start(
        form,
        &rollout(
            r#"[{"after": "1m", "weights": {"v1": 50, "v2": 50}}]"#,
            r#""interval": "1s", "min_calls": 5, "slow_call": "150ms", "max_slow_rate_percent": 20"#,
        ),
    );
    s.v2.set_behaviour(Behaviour {
        delay: Duration::from_millis(250),
        ..Behaviour::default()
    });
    let traffic = Traffic::start(s.envoy.port(), 6, Duration::from_millis(5));
    let rolled_back = wait_until(Duration::from_secs(30), || {
        gauge(&s.envoy, "mesh_lb_canary_state") == Some(2.0)
    });
    drop(traffic);
    assert!(rolled_back, "not rolled back; log:\n{}", s.envoy.log());
    let slow = s.envoy.metric(
        "mesh_lb_canary_calls_total",
        &[("rule", "rollout"), ("outcome", "slow")],
    );
    assert!(slow.is_some_and(|n| n >= 5.0), "{slow:?}");
    assert_eq!(fresh_requests(&s, 100), (100, 0));
}

both_forms!(a_bad_analysis_is_refused_with_the_json_path_and_envoy_does_not_start);
fn a_bad_analysis_is_refused_with_the_json_path_and_envoy_does_not_start(form: Form) {
    mesh_testkit::envoy::assert_config_refused_in(
        form,
        "lb-hints",
        &rollout(
            r#"[{"after": "1m", "weights": {"v2": 50}}]"#,
            r#""interval": "0s""#,
        ),
        "lb-hints: rules[0].analysis.interval: must be longer than 0s",
    );
    mesh_testkit::envoy::assert_config_refused_in(
        form,
        "lb-hints",
        &rollout(
            r#"[{"after": "1m", "weights": {"v2": 50}}]"#,
            r#""max_failure_rate_percent": 150"#,
        ),
        "lb-hints: rules[0].analysis.max_failure_rate_percent: expected an integer from 0 to 100, got 150",
    );
}
