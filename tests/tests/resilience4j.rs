//! Resilience4j as the oracle of the circuit-breaker core: random traces
//! (seeded) are replayed through Resilience4j's own `CircuitBreaker` (the
//! Maven project in `tests/resilience4j/`, one JVM for all traces) and
//! through our core (`CircuitBreaker::check` / `complete` on an in-memory
//! shared store); every admission decision and every state after an event
//! must agree.
//!
//! `MESH_ORACLE_TRACES=N` replays N traces (default 10 000);
//! `MESH_ORACLE_SEED=S` replays only the trace with seed S and prints it,
//! with both answers. A divergence names its seed and event, and the command
//! that replays it.

#[path = "resilience4j/trace.rs"]
mod trace;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use circuit_breaker::{CircuitBreaker, Config, Response, Verdict};
use mesh_shared::circuit::CircuitState;
use mesh_shared::request::FakeRequest;
use mesh_shared::store::MemoryStore;
use mesh_shared::Attribute;
use mesh_testkit::repo_root;
use trace::{Event, Kind, Trace, TraceConfig};

const DEFAULT_TRACES: u64 = 10_000;
const NS_PER_MS: u64 = 1_000_000;

/// One Maven build at a time in this process (they share the output folder).
static MAVEN: Mutex<()> = Mutex::new(());

/// Runs the Resilience4j replayer on a trace file; its answers, or its exit
/// status and output.
fn resilience4j(traces: &Path) -> Result<String, String> {
    let answers = traces.with_extension("answers");
    let _guard = MAVEN.lock().unwrap_or_else(|e| e.into_inner());
    let mvn = mesh_testkit::debian::ensure("maven", "mvn")?;
    let root = repo_root();
    let started = Instant::now();
    let out = Command::new(mvn)
        .arg("-q")
        .arg("-B")
        // Downloads are cached only in the repository's ignored .tools/.
        .arg(format!(
            "-Dmaven.repo.local={}",
            root.join(".tools/maven/repository").display()
        ))
        .arg("-f")
        .arg(root.join("tests/resilience4j/pom.xml"))
        .args(["compile", "exec:java"])
        .arg(format!(
            "-Dexec.args={} {}",
            traces.display(),
            answers.display()
        ))
        .output()
        .map_err(|e| format!("mvn: {e}"))?;
    eprintln!("resilience4j replay: {:.1?}", started.elapsed());
    if out.status.success() {
        let text = std::fs::read_to_string(&answers).map_err(|e| format!("{e}"));
        let _ = std::fs::remove_file(&answers);
        text
    } else {
        Err(format!(
            "mvn exited with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Our core configured as the trace says.
fn our_breaker(c: &TraceConfig) -> CircuitBreaker {
    let window = if c.count {
        format!(r#"{{"kind": "count", "size": {}}}"#, c.size)
    } else {
        format!(r#"{{"kind": "time", "size": "{}s"}}"#, c.size)
    };
    let slow = if c.slow_ms > 0 {
        format!(
            r#""slow_call": {{"duration": "{}ms", "rate_percent": {}}},"#,
            c.slow_ms, c.slow_rate
        )
    } else {
        String::new()
    };
    let json = format!(
        r#"{{"rules": [{{"name": "oracle", "window": {window}, "minimum_calls": {},
            "failure_rate_percent": {}, {slow} "open_for": "{}ms", "half_open_calls": {},
            "max_wait_in_half_open": "{}ms", "max_breakers": 1}}]}}"#,
        c.minimum, c.failure_rate, c.open_for_ms, c.half_open_calls, c.max_wait_ms
    );
    let config = Config::parse(json.as_bytes(), "oracle")
        .unwrap_or_else(|e| panic!("trace config refused: {e}\n{json}"));
    assert_eq!(
        config.rules[0].policy.max_wait_in_half_open_nanos,
        c.max_wait_ms * NS_PER_MS
    );
    CircuitBreaker::new(config)
}

fn letter(s: CircuitState) -> char {
    match s {
        CircuitState::Closed => 'C',
        CircuitState::Open => 'O',
        CircuitState::HalfOpen => 'H',
    }
}

/// Our core's answer to each event of `trace`, in the replayer's line format.
fn our_replay(trace: &Trace) -> Vec<String> {
    let cb = our_breaker(&trace.config);
    let store = MemoryStore::new();
    let start = trace.events.first().map_or(0, Event::at);
    cb.create_tables(&store, start);
    let rule = &cb.config.rules[0];
    let mut calls = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(trace.events.len());
    for e in &trace.events {
        match *e {
            Event::Arrive { at, id } => {
                let mut req = FakeRequest::new().with(Attribute::Route, "r");
                let v = cb.check(&mut req, &store, at);
                if let Some(change) = v.change() {
                    cb.apply(&store, change);
                }
                let admitted = match v {
                    Verdict::Pass { call, .. } => {
                        calls.insert(id, call);
                        '1'
                    }
                    Verdict::Reject { .. } => '0',
                    other => panic!("seed {}: unexpected verdict {other:?}", trace.seed),
                };
                let state = letter(rule.table.summary(&store).worst());
                out.push(format!("a {admitted} {state}"));
            }
            Event::Finish {
                at,
                id,
                kind,
                duration,
            } => {
                if let Some(call) = calls.remove(&id) {
                    let response = match kind {
                        Kind::Success | Kind::Failure => Response {
                            code: Some(if kind == Kind::Success { 200 } else { 503 }),
                            details: Some(b"via_upstream"),
                            duration_nanos: Some(duration),
                        },
                        // The client went away: not the upstream's doing.
                        Kind::Ignored => Response {
                            code: None,
                            details: Some(b"downstream_remote_disconnect"),
                            duration_nanos: None,
                        },
                    };
                    let (_, changes) = cb.complete(&store, &call, None, response, at);
                    for change in &changes {
                        cb.apply(&store, change);
                    }
                }
                out.push(format!("f {}", letter(rule.table.summary(&store).worst())));
            }
        }
    }
    out
}

/// Splits the replayer's output into each trace's answer lines, by seed.
fn answers(output: &str) -> Result<Vec<(u64, Vec<String>)>, String> {
    let mut all = Vec::new();
    let mut lines = output.lines();
    while let Some(line) = lines.next() {
        let seed = line
            .strip_prefix("trace ")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("unexpected replayer output: {line:?}"))?;
        let mut got = Vec::new();
        loop {
            match lines.next() {
                Some("end") => break,
                Some(l) => got.push(l.to_string()),
                None => return Err(format!("replayer output of trace {seed} has no end")),
            }
        }
        all.push((seed, got));
    }
    Ok(all)
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}")),
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = repo_root().join("target/resilience4j-oracle");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}.txt", std::process::id()))
}

#[test]
fn the_core_decides_every_trace_as_resilience4j_does() {
    let one = env_u64("MESH_ORACLE_SEED");
    let seeds: Vec<u64> = match one {
        Some(seed) => vec![seed],
        None => {
            // A fresh base each run, so runs cover new traces; printed, and
            // each failure names its own trace's seed.
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                & 0xffff_ffff_ffff;
            let n = env_u64("MESH_ORACLE_TRACES").unwrap_or(DEFAULT_TRACES);
            eprintln!(
                "resilience4j oracle: {n} traces, seeds {base}..{}",
                base + n
            );
            (base..base + n).collect()
        }
    };
    let started = Instant::now();
    let traces: Vec<Trace> = seeds.iter().map(|s| Trace::generate(*s)).collect();
    let mut text = String::new();
    for t in &traces {
        t.write(&mut text);
    }
    // Our side reads the same text the oracle reads.
    let parsed = Trace::parse_all(&text).expect("generated traces parse");
    assert_eq!(parsed, traces);
    let events: usize = traces.iter().map(|t| t.events.len()).sum();
    let file = scratch("traces");
    std::fs::write(&file, &text).unwrap();
    eprintln!(
        "resilience4j oracle: {} traces, {events} events generated in {:.1?}",
        traces.len(),
        started.elapsed()
    );
    let output = resilience4j(&file).unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(&file);
    let theirs = answers(&output).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(theirs.len(), traces.len(), "one answer per trace");
    let started = Instant::now();
    let mut states = [0usize; 3];
    for (trace, (seed, expected)) in traces.iter().zip(&theirs) {
        assert_eq!(trace.seed, *seed);
        let ours = our_replay(trace);
        for line in &ours {
            states[match line.chars().last() {
                Some('C') => 0,
                Some('O') => 1,
                _ => 2,
            }] += 1;
        }
        if one.is_some() {
            let mut t = String::new();
            trace.write(&mut t);
            eprintln!("{t}");
            for (i, e) in trace.events.iter().enumerate() {
                eprintln!(
                    "{i:4} {e:?}: resilience4j {:?}, ours {:?}",
                    expected.get(i),
                    ours.get(i)
                );
            }
        }
        assert_eq!(ours.len(), expected.len(), "seed {seed}: answer count");
        if let Some(i) = (0..ours.len()).find(|i| ours[*i] != expected[*i]) {
            panic!(
                "seed {seed}: first divergence at event {i} ({:?}): Resilience4j says {:?}, ours {:?}\n\
                 config: {:?}\n\
                 replay it: MESH_ORACLE_SEED={seed} cargo test -p mesh-testkit --test resilience4j -- --nocapture",
                trace.events[i], expected[i], ours[i], trace.config
            );
        }
    }
    eprintln!(
        "resilience4j oracle: our core replayed them in {:.1?}; events ending closed/open/half-open: {states:?}",
        started.elapsed()
    );
    // The traces must reach every state, or they prove little.
    if one.is_none() {
        assert!(states.iter().all(|n| *n > traces.len()), "{states:?}");
    }
}

#[test]
fn malformed_traces_are_refused_with_their_line() {
    let good = "trace 1\nconfig count 5 5 50 0 100 1000 2 60000\na 10 1\nf 20 1 s 10\nend\n";
    assert_eq!(Trace::parse_all(good).unwrap().len(), 1);
    let cases = [
        ("trace x\n", "trace line 1: expected \"trace SEED\""),
        (
            "trace 1\nconfig sliding 5 5 50 0 100 1000 2 60000\nend\n",
            "trace line 2: window must be count or time, got \"sliding\"",
        ),
        (
            "trace 1\nconfig count 5 5 50 0 100 1000 2 60000\na 10 1\nf 20 1 x 10\nend\n",
            "trace line 4: kind must be s, f or i, got \"x\"",
        ),
        (
            "trace 1\nconfig count 5 5 50 0 100 1000 2 60000\na 10 1\na 9 2\nend\n",
            "trace line 4: time went backwards",
        ),
        (
            "trace 1\nconfig count 5 5 50 0 100 1000 2 60000\na 10 1\n",
            "trace line 3: trace without end",
        ),
    ];
    for (text, error) in cases {
        assert_eq!(Trace::parse_all(text).unwrap_err(), error, "{text:?}");
    }
    // The Resilience4j side refuses them too, with the line.
    let file = scratch("malformed");
    std::fs::write(&file, cases[2].0).unwrap();
    let err = resilience4j(&file).unwrap_err();
    let _ = std::fs::remove_file(&file);
    assert!(
        err.contains("resilience4j replay: line 4: kind must be s, f or i, got x"),
        "{err}"
    );
}
