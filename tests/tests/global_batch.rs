//! ratelimit's global mode with `max_batch`: while a call of a rule is in
//! flight on a worker, the requests that need one wait and go together in
//! the next `ShouldRateLimit` call, one descriptor each. Real Envoys (2
//! workers each), envoyproxy/ratelimit and Redis, all on loopback.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use mesh_testkit::envoy::assert_config_refused_in;
use mesh_testkit::global::{
    away_from_window_end, both_recovered, calls, check_failure_answers, decision,
    failure_decisions, service_config, world, TimedAnswer, World, CALL_OUTCOMES, FAILURE_RULES,
};
use mesh_testkit::http;
use mesh_testkit::{at_once, both_forms, concurrent_gets, Envoy, Form};

/// One rule `per-user` keyed on `x-user`, batching up to `max_batch`.
fn batching_rule(max_batch: u32, timeout: &str, failure_mode: &str) -> String {
    format!(
        r#"{{"rules": [{{"name": "per-user", "key": [{{"header": "x-user"}}],
            "global": {{"service": "rls", "domain": "mesh", "timeout": "{timeout}",
                        "failure_mode": "{failure_mode}", "max_batch": {max_batch}}}}}]}}"#
    )
}

/// Calls of `rule` with any outcome.
fn all_calls(envoy: &Envoy, rule: &str) -> f64 {
    CALL_OUTCOMES.iter().map(|o| calls(envoy, rule, o)).sum()
}

/// An Envoy counter or gauge without labels of its own other than `labels`.
fn envoy_stat(envoy: &Envoy, name: &str, labels: &[(&str, &str)]) -> f64 {
    envoy
        .metric(name, labels)
        .unwrap_or_else(|| panic!("no {name}{labels:?}:\n{}", envoy.prometheus_lines(name)))
}

/// One answer of [`requests_at_once`]: status, body, how long it took.
struct Answer {
    status: u16,
    body: String,
    took: Duration,
}

/// Sends `total` GETs of `path` from `connections` threads at once, each on
/// its own keep-alive connection; request `i` carries `x-user: user(i)`.
fn requests_at_once(
    port: u16,
    path: &str,
    connections: usize,
    total: usize,
    user: fn(usize) -> String,
) -> Vec<Answer> {
    let path = path.to_string();
    at_once(port, connections, total, move |client, i| {
        let started = Instant::now();
        let r = client.get(&path, &[("x-user", &user(i))]).unwrap();
        Answer {
            status: r.status,
            body: r.body_text(),
            took: started.elapsed(),
        }
    })
}

both_forms!(one_limit_over_three_batching_envoys_is_exact);
fn one_limit_over_three_batching_envoys_is_exact(form: Form) {
    const N: usize = 40;
    let w = world(
        form,
        &service_config(&[("per-user", "x-user", N as u32, "hour")]),
        &batching_rule(50, "2s", "allow"),
        3,
    );
    away_from_window_end(3600, Duration::from_secs(30));
    // 4N requests for one key, 16 connections into each Envoy at once: a
    // batch then holds the same descriptor many times.
    let threads: Vec<_> = w
        .envoys
        .iter()
        .map(|e| {
            let port = e.port();
            std::thread::spawn(move || {
                concurrent_gets(port, "/", &[("x-user", "alice")], 16, 4 * N / 3)
            })
        })
        .collect();
    let responses: Vec<http::Response> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .map(|r| r.unwrap())
        .collect();
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&http::Response> = responses.iter().filter(|r| r.status == 429).collect();
    let calls_per_envoy: Vec<f64> = w.envoys.iter().map(|e| all_calls(e, "per-user")).collect();
    eprintln!(
        "{} requests: {ok} answered 200, {} 429; calls per Envoy {calls_per_envoy:?}",
        responses.len(),
        limited.len()
    );
    assert_eq!(ok, N, "exactly N answered 200 over all three Envoys");
    assert_eq!(ok + limited.len(), responses.len());
    assert_eq!(w.upstream.requests(), N as u64);
    for r in &limited {
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"per-user\";q=40;w=3600")
        );
        let rl = r.header("ratelimit").unwrap();
        assert!(rl.starts_with("\"per-user\";r=0;t="), "{rl}");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=3600).contains(&retry), "retry-after {retry}");
        assert_eq!(r.body_text(), "rate limited\n");
    }
    let sum = |d: &str| -> f64 { w.envoys.iter().map(|e| decision(e, "per-user", d)).sum() };
    assert_eq!(sum("allowed"), N as f64);
    assert_eq!(sum("global_limited"), limited.len() as f64);
    assert_eq!(sum("failed_open"), 0.0, "no call failed");
    for (e, made) in w.envoys.iter().zip(&calls_per_envoy) {
        assert!(*made > 0.0, "every Envoy asked the service");
        assert_eq!(
            calls(e, "per-user", "ok") + calls(e, "per-user", "over_limit"),
            *made,
            "every call answered"
        );
    }
}

/// A sample of `mesh_ratelimit_global_batch_size` (`_count`, `_sum`, `_bucket`).
fn batch_size(envoy: &Envoy, suffix: &str, labels: &[(&str, &str)]) -> Option<f64> {
    envoy.metric(&format!("mesh_ratelimit_global_batch_size{suffix}"), labels)
}

both_forms!(batched_calls_are_fewer_than_requests_and_count_each_request_once);
fn batched_calls_are_fewer_than_requests_and_count_each_request_once(form: Form) {
    const REQUESTS: usize = 400;
    const MAX_BATCH: u32 = 10;
    // failure_mode deny: a request not decided by the service would be a 503.
    let w = world(
        form,
        &service_config(&[("per-user", "x-user", 5, "hour")]),
        &batching_rule(MAX_BATCH, "2s", "deny"),
        1,
    );
    let e = &w.envoys[0];
    let incrby_before = w.redis.calls("incrby");
    // 400 keys, one request each, 32 connections at once.
    let answers = requests_at_once(e.port(), "/", 32, REQUESTS, |i| format!("user-{i}"));
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(answers.len(), REQUESTS);
    assert_eq!(w.upstream.requests(), REQUESTS as u64);
    assert_eq!(decision(e, "per-user", "allowed"), REQUESTS as f64);

    let made = all_calls(e, "per-user");
    let rpcs = envoy_stat(
        e,
        "envoy_cluster_upstream_rq_total",
        &[("envoy_cluster_name", "rls")],
    );
    let incrbys = w.redis.calls("incrby") - incrby_before;
    eprintln!("{REQUESTS} requests: {made} calls, {rpcs} RPCs on cluster rls, {incrbys} INCRBYs");
    assert_eq!(calls(e, "per-user", "ok"), made, "every call answered OK");
    assert_eq!(rpcs, made, "one RPC per call counted");
    assert!(
        made < REQUESTS as f64,
        "batched: {made} calls for {REQUESTS} requests"
    );
    assert!(
        made >= (REQUESTS as f64 / f64::from(MAX_BATCH)),
        "at most {MAX_BATCH} descriptors a call: {made} calls"
    );
    assert_eq!(
        incrbys, REQUESTS as u64,
        "the service counted each request once"
    );

    // The histogram reaches the admin page at Envoy's next stats flush.
    let rule = [("rule", "per-user")];
    let deadline = Instant::now() + Duration::from_secs(30);
    while batch_size(e, "_count", &rule) != Some(made) {
        assert!(
            Instant::now() < deadline,
            "batch sizes of {made} calls: {}",
            e.prometheus_lines("batch_size")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let bucket = |le: &str| batch_size(e, "_bucket", &[("rule", "per-user"), ("le", le)]);
    let single = bucket("1").unwrap();
    let up_to_max = bucket(&MAX_BATCH.to_string()).unwrap();
    let sum = batch_size(e, "_sum", &rule).unwrap();
    eprintln!(
        "batch sizes: {single} calls of 1 descriptor, {up_to_max} of at most {MAX_BATCH}, sum {sum}:\n{}",
        e.prometheus_lines("batch_size")
    );
    assert!(single < made, "some calls carried more than one descriptor");
    assert_eq!(up_to_max, made, "no call carried more than {MAX_BATCH}");
    // Envoy's histogram sums come from bins of two significant digits.
    assert!(
        (sum - REQUESTS as f64).abs() <= REQUESTS as f64 * 0.06,
        "descriptors over all calls: {sum}"
    );
}

/// [`FAILURE_RULES`] with `max_batch: 50` on both rules.
fn batching_failure_rules() -> String {
    let rules = FAILURE_RULES.replace(r#""failure_mode""#, r#""max_batch": 50, "failure_mode""#);
    assert_eq!(rules.matches("max_batch").count(), 2);
    rules
}

/// 64 requests on `/allow` and 64 on `/deny`, 16 connections each, all at
/// once, while the service is unusable: `allow` lets every one through,
/// `deny` answers every one with the failure response, each within the
/// timeout plus a margin. Returns the slowest answer.
fn failure_burst(w: &World, case: &str) -> Duration {
    let e = &w.envoys[0];
    let before = failure_decisions(e);
    let port = e.port();
    let allow = std::thread::spawn(move || {
        requests_at_once(port, "/allow", 16, 64, |i| format!("a{}", i % 8))
    });
    let deny = requests_at_once(port, "/deny", 16, 64, |i| format!("d{}", i % 8));
    let allow = allow.join().unwrap();
    let slowest = allow.iter().chain(&deny).map(|a| a.took).max().unwrap();
    eprintln!(
        "{case}: slowest answer {slowest:?}; {} expired while waiting; calls of rule closed by outcome {:?}",
        e.metric("mesh_ratelimit_global_expired_total", &[("rule", "closed")])
            .unwrap_or(0.0),
        CALL_OUTCOMES
            .iter()
            .map(|o| (*o, calls(e, "closed", o)))
            .collect::<Vec<_>>()
    );
    let timed = |answers: Vec<Answer>| -> Vec<TimedAnswer> {
        answers
            .into_iter()
            .map(|a| (a.status, a.body, a.took))
            .collect()
    };
    check_failure_answers(e, case, before, &timed(allow), &timed(deny))
}

both_forms!(batched_requests_follow_the_failure_mode_within_the_timeout);
fn batched_requests_follow_the_failure_mode_within_the_timeout(form: Form) {
    let mut w = world(
        form,
        &service_config(&[
            ("open", "x-user", 1000, "hour"),
            ("closed", "x-user", 1000, "hour"),
        ]),
        &batching_failure_rules(),
        1,
    );
    both_recovered(&w, "at start");

    w.rls.stop();
    failure_burst(&w, "service stopped");
    assert!(calls(&w.envoys[0], "closed", "unavailable") >= 1.0);
    w.rls.restart();
    both_recovered(&w, "service restarted");

    w.rls.pause();
    let slow = failure_burst(&w, "service not answering (SIGSTOP)");
    assert!(calls(&w.envoys[0], "closed", "timeout") >= 1.0);
    assert!(
        slow >= Duration::from_millis(100),
        "a timeout takes the timeout: {slow:?}"
    );
    w.rls.resume();
    both_recovered(&w, "service resumed");
    // Batches again, every request decided by the service.
    let e = &w.envoys[0];
    let answers = requests_at_once(e.port(), "/deny", 16, 64, |i| format!("after-{i}"));
    assert!(answers.iter().all(|a| a.status == 200));
    let log = e.log();
    assert!(!log.contains("panic"), "no panic in the VM:\n{log}");
}

/// `http.ingress.downstream_rq_active`: requests Envoy holds now.
fn active_requests(envoy: &Envoy) -> f64 {
    envoy_stat(
        envoy,
        "envoy_http_downstream_rq_active",
        &[("envoy_http_conn_manager_prefix", "ingress")],
    )
}

/// Connections closed by their client while a request was active.
fn gone_while_active(envoy: &Envoy) -> f64 {
    envoy_stat(
        envoy,
        "envoy_http_downstream_cx_destroy_remote_active_rq",
        &[("envoy_http_conn_manager_prefix", "ingress")],
    )
}

/// Open connections of each of the Envoy's two workers.
fn connections_per_worker(envoy: &Envoy) -> [f64; 2] {
    let text = envoy.prometheus();
    let open = |worker: &str| -> f64 {
        let label = format!("envoy_worker_id=\"{worker}\"");
        text.lines()
            .filter(|l| {
                l.starts_with("envoy_listener_worker_downstream_cx_active{") && l.contains(&label)
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    [open("0"), open("1")]
}

/// Waits until `done` holds of the Envoy (10 s at most).
fn wait_for(envoy: &Envoy, what: &str, done: impl Fn(&Envoy) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(envoy) {
        assert!(
            Instant::now() < deadline,
            "{what}; requests active: {}, connections per worker: {:?}",
            active_requests(envoy),
            connections_per_worker(envoy)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one request on a new connection (closed after the answer) and
/// waits until Envoy holds it.
fn held_request(envoy: &Envoy, user: &str) -> TcpStream {
    let before = active_requests(envoy);
    let mut s = TcpStream::connect(("127.0.0.1", envoy.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nhost: x\r\nx-user: {user}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    wait_for(envoy, "a request held", |e| active_requests(e) > before);
    s
}

/// With the service frozen, requests held until each worker has one: on
/// each worker the first one's call is in flight, any later one waits.
fn leaders(envoy: &Envoy, name: &str) -> Vec<TcpStream> {
    wait_for(envoy, "no connection open", |e| {
        connections_per_worker(e) == [0.0, 0.0]
    });
    let mut held = Vec::new();
    while connections_per_worker(envoy).contains(&0.0) {
        assert!(
            held.len() < 32,
            "the kernel gave one worker 32 connections in a row"
        );
        held.push(held_request(envoy, &format!("{name}-{}", held.len())));
    }
    held
}

/// Reads each answer; all must be 200 (from the service: `failure_mode` is deny).
fn all_answered(clients: Vec<TcpStream>, case: &str) {
    for mut s in clients {
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 "), "{case}: {answer}");
    }
}

both_forms!(a_client_that_goes_away_while_waiting_in_a_batch_leaks_nothing);
fn a_client_that_goes_away_while_waiting_in_a_batch_leaks_nothing(form: Form) {
    const FOLLOWERS: usize = 20;
    // failure_mode deny: a 200 is an answer from the service.
    let mut w = world(
        form,
        &service_config(&[("per-user", "x-user", 1000, "hour")]),
        &batching_rule(50, "5s", "deny"),
        1,
    );
    let e = &w.envoys[0];
    let warm = http::get(e.port(), "/", &[("x-user", "warm")]).unwrap();
    assert_eq!(warm.status, 200);

    // 1. Waiting clients go away: they are not sent, the others are answered.
    let (incrby, upstream, gone) = (
        w.redis.calls("incrby"),
        w.upstream.requests(),
        gone_while_active(e),
    );
    w.rls.pause();
    let mut kept = leaders(e, "leader");
    let followers: Vec<TcpStream> = (0..FOLLOWERS)
        .map(|i| held_request(e, &format!("follower-{i}")))
        .collect();
    for (i, s) in followers.into_iter().enumerate() {
        if i % 2 == 0 {
            kept.push(s);
        }
    }
    let held = kept.len() as f64;
    wait_for(e, "the clients that went away released", |e| {
        active_requests(e) == held
    });
    w.rls.resume();
    let kept_count = kept.len() as u64;
    all_answered(kept, "waiting clients gone");
    wait_for(e, "no request active", |e| active_requests(e) == 0.0);
    let counted = w.redis.calls("incrby") - incrby;
    eprintln!(
        "{kept_count} clients kept, {} gone while waiting: {counted} counted by the service",
        FOLLOWERS / 2
    );
    assert_eq!(gone_while_active(e) - gone, (FOLLOWERS / 2) as f64);
    assert_eq!(
        counted, kept_count,
        "only the requests whose clients stayed were sent"
    );
    assert_eq!(w.upstream.requests() - upstream, kept_count);

    // 2. Clients whose own call is in flight go away: the waiting ones
    // still go out, and are answered.
    let (upstream, gone) = (w.upstream.requests(), gone_while_active(e));
    w.rls.pause();
    let gone_leaders = leaders(e, "gone-leader");
    let dropped = gone_leaders.len();
    let waiting: Vec<TcpStream> = (0..FOLLOWERS / 2)
        .map(|i| held_request(e, &format!("waiting-{i}")))
        .collect();
    drop(gone_leaders);
    wait_for(e, "the leaders released", |e| {
        active_requests(e) == (FOLLOWERS / 2) as f64
    });
    w.rls.resume();
    all_answered(waiting, "clients with a call in flight gone");
    wait_for(e, "no request active", |e| active_requests(e) == 0.0);
    assert_eq!(gone_while_active(e) - gone, dropped as f64);
    assert_eq!(w.upstream.requests() - upstream, (FOLLOWERS / 2) as u64);

    // Later requests, batched too, are still answered by the service.
    let answers = requests_at_once(e.port(), "/", 16, 64, |i| format!("later-{i}"));
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(active_requests(e), 0.0);
    let log = e.log();
    assert!(!log.contains("panic"), "no panic in the VM:\n{log}");
}

both_forms!(a_max_batch_out_of_range_is_refused_with_the_json_path);
fn a_max_batch_out_of_range_is_refused_with_the_json_path(form: Form) {
    for bad in [0, 1001] {
        assert_config_refused_in(
            form,
            "ratelimit",
            &batching_rule(bad, "20ms", "allow"),
            &format!("ratelimit: rules[0].global.max_batch: expected an integer from 1 to 1000, got {bad}"),
        );
    }
}
