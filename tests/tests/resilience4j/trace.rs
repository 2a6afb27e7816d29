//! Circuit-breaker traces: one breaker's configuration and a timed sequence of
//! requests and call outcomes, in the text form that both our core and the
//! Resilience4j replayer (`tests/resilience4j/`) read.
//!
//! ```text
//! trace SEED
//! config count|time SIZE MINIMUM FAILURE_RATE SLOW_MS SLOW_RATE OPEN_FOR_MS HALF_OPEN_CALLS MAX_WAIT_MS
//! a T ID                 a request at T (ns since the epoch)
//! f T ID s|f|i DURATION  call ID finished at T: success, failure, ignored; DURATION in ns
//! end
//! ```
//!
//! `SLOW_MS` 0 means no slow-call rule. A trace is written before anyone
//! decides it, so it holds a finish for every request; a replayer skips the
//! finish of a request it rejected. The replayer's answer per event is one
//! line: `a 1 C` (admitted; state after: C, O or H), `a 0 O` (rejected), `f H`.

use std::fmt::Write as _;

use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64;

const NS_PER_MS: u64 = 1_000_000;
const NS_PER_SEC: u64 = 1_000_000_000;

/// One breaker's numbers, as both replayers take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceConfig {
    /// A count window (else a time window of `size` seconds).
    pub count: bool,
    pub size: u64,
    pub minimum: u64,
    pub failure_rate: u64,
    /// 0: no slow-call rule.
    pub slow_ms: u64,
    pub slow_rate: u64,
    pub open_for_ms: u64,
    pub half_open_calls: u64,
    pub max_wait_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Success,
    Failure,
    Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Arrive {
        at: u64,
        id: u64,
    },
    Finish {
        at: u64,
        id: u64,
        kind: Kind,
        duration: u64,
    },
}

impl Event {
    pub fn at(&self) -> u64 {
        match *self {
            Event::Arrive { at, .. } | Event::Finish { at, .. } => at,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub seed: u64,
    pub config: TraceConfig,
    pub events: Vec<Event>,
}

impl Trace {
    /// A random trace: the numbers of the breaker, then requests with gaps
    /// from nanoseconds to minutes, outcomes with per-trace failure and
    /// ignore odds, durations around the slow-call threshold (exactly on it,
    /// one nanosecond either side), and extra requests exactly at the instants
    /// an `open_for` or a half-open wait would end, and one nanosecond later.
    pub fn generate(seed: u64) -> Trace {
        let mut rng = Pcg64::seed_from_u64(seed);
        let count = rng.random_bool(0.5);
        let size = if count {
            rng.random_range(1..=20)
        } else {
            rng.random_range(1..=10)
        };
        let slow_ms = if rng.random_bool(0.4) {
            0
        } else {
            rng.random_range(1..=300)
        };
        let open_for_ms = rng.random_range(1..=3000);
        let config = TraceConfig {
            count,
            size,
            minimum: rng.random_range(1..=25),
            failure_rate: pick(&mut rng, &[1, 10, 25, 33, 50, 66, 75, 100]),
            slow_ms,
            slow_rate: pick(&mut rng, &[1, 25, 50, 67, 100]),
            open_for_ms,
            half_open_calls: rng.random_range(1..=5),
            max_wait_ms: if rng.random_bool(0.5) {
                rng.random_range(1..=5000)
            } else {
                open_for_ms.max(60_000)
            },
        };
        let fail_odds = rng.random_range(0.0..1.0);
        let ignore_odds = pick(&mut rng, &[0.0, 0.05, 0.2]);
        let arrivals = rng.random_range(10..=120);
        // Whole seconds plus a random part, so second boundaries fall anywhere.
        let mut now = 1_700_000_000 * NS_PER_SEC + rng.random_range(0..NS_PER_SEC);
        let mut events: Vec<(u64, usize, Event)> = Vec::new();
        let push = |events: &mut Vec<(u64, usize, Event)>, e: Event| {
            let n = events.len();
            events.push((e.at(), n, e));
        };
        let mut id = 0;
        let mut arrive = |events: &mut Vec<(u64, usize, Event)>, rng: &mut Pcg64, at: u64| {
            id += 1;
            let kind = if rng.random_bool(ignore_odds) {
                Kind::Ignored
            } else if rng.random_bool(fail_odds) {
                Kind::Failure
            } else {
                Kind::Success
            };
            let duration = if config.slow_ms > 0 && rng.random_bool(0.3) {
                (config.slow_ms * NS_PER_MS).saturating_add_signed(rng.random_range(-1..=1))
            } else if config.slow_ms > 0 {
                rng.random_range(0..=2 * config.slow_ms * NS_PER_MS)
            } else {
                rng.random_range(0..=50 * NS_PER_MS)
            };
            push(events, Event::Arrive { at, id });
            push(
                events,
                Event::Finish {
                    at: at + duration,
                    id,
                    kind,
                    duration,
                },
            );
            // The instants a breaker opened by this call (at its finish), or
            // half-opened by this request, would change state again.
            if rng.random_bool(0.08) {
                let opened = at + duration + config.open_for_ms * NS_PER_MS;
                let waited = at + config.max_wait_ms * NS_PER_MS;
                let reopened = waited + config.open_for_ms * NS_PER_MS;
                for t in [
                    opened,
                    opened + 1,
                    waited,
                    waited + 1,
                    reopened,
                    reopened + 1,
                ] {
                    id += 1;
                    push(events, Event::Arrive { at: t, id });
                    push(
                        events,
                        Event::Finish {
                            at: t + 1,
                            id,
                            kind,
                            duration: 1,
                        },
                    );
                }
            }
        };
        for _ in 0..arrivals {
            let gap = match rng.random_range(0..100) {
                0..=59 => rng.random_range(0..20 * NS_PER_MS),
                60..=89 => rng.random_range(0..2 * NS_PER_SEC),
                90..=94 => 0,
                _ => rng.random_range(5 * NS_PER_SEC..120 * NS_PER_SEC),
            };
            now += gap;
            arrive(&mut events, &mut rng, now);
        }
        events.sort_by_key(|(at, n, _)| (*at, *n));
        Trace {
            seed,
            config,
            events: events.into_iter().map(|(_, _, e)| e).collect(),
        }
    }

    pub fn write(&self, out: &mut String) {
        let c = &self.config;
        let _ = writeln!(out, "trace {}", self.seed);
        let _ = writeln!(
            out,
            "config {} {} {} {} {} {} {} {} {}",
            if c.count { "count" } else { "time" },
            c.size,
            c.minimum,
            c.failure_rate,
            c.slow_ms,
            c.slow_rate,
            c.open_for_ms,
            c.half_open_calls,
            c.max_wait_ms
        );
        for e in &self.events {
            let _ = match *e {
                Event::Arrive { at, id } => writeln!(out, "a {at} {id}"),
                Event::Finish {
                    at,
                    id,
                    kind,
                    duration,
                } => {
                    let k = match kind {
                        Kind::Success => 's',
                        Kind::Failure => 'f',
                        Kind::Ignored => 'i',
                    };
                    writeln!(out, "f {at} {id} {k} {duration}")
                }
            };
        }
        out.push_str("end\n");
    }

    /// Reads traces written by [`Trace::write`]; a malformed one is refused
    /// with its line number.
    pub fn parse_all(text: &str) -> Result<Vec<Trace>, String> {
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
        let mut traces = Vec::new();
        while let Some((n, line)) = lines.next() {
            if line.is_empty() {
                continue;
            }
            let err = |n: usize, m: &str| format!("trace line {n}: {m}");
            let seed = match line.split_once(' ') {
                Some(("trace", s)) => s.parse().map_err(|_| err(n, "expected \"trace SEED\""))?,
                _ => return Err(err(n, "expected \"trace SEED\"")),
            };
            let (n, line) = lines.next().ok_or_else(|| err(n, "trace without config"))?;
            let f: Vec<&str> = line.split(' ').collect();
            let nums = |from: usize| -> Result<Vec<u64>, String> {
                f.get(from..)
                    .unwrap_or_default()
                    .iter()
                    .map(|v| {
                        v.parse()
                            .map_err(|_| err(n, &format!("expected a number, got \"{v}\"")))
                    })
                    .collect()
            };
            if f.len() != 10 || f[0] != "config" {
                return Err(err(n, "expected \"config\" with 9 values"));
            }
            let count = match f[1] {
                "count" => true,
                "time" => false,
                w => {
                    return Err(err(
                        n,
                        &format!("window must be count or time, got \"{w}\""),
                    ))
                }
            };
            let v = nums(2)?;
            let config = TraceConfig {
                count,
                size: v[0],
                minimum: v[1],
                failure_rate: v[2],
                slow_ms: v[3],
                slow_rate: v[4],
                open_for_ms: v[5],
                half_open_calls: v[6],
                max_wait_ms: v[7],
            };
            let mut events = Vec::new();
            let mut last = 0;
            let mut last_line = n;
            loop {
                let (n, line) = lines
                    .next()
                    .ok_or_else(|| err(last_line, "trace without end"))?;
                last_line = n;
                if line == "end" {
                    break;
                }
                let f: Vec<&str> = line.split(' ').collect();
                let num = |i: usize| -> Result<u64, String> {
                    let v = f.get(i).ok_or_else(|| err(n, "missing field"))?;
                    v.parse()
                        .map_err(|_| err(n, &format!("expected a number, got \"{v}\"")))
                };
                let e = match (f[0], f.len()) {
                    ("a", 3) => Event::Arrive {
                        at: num(1)?,
                        id: num(2)?,
                    },
                    ("f", 5) => Event::Finish {
                        at: num(1)?,
                        id: num(2)?,
                        kind: match f[3] {
                            "s" => Kind::Success,
                            "f" => Kind::Failure,
                            "i" => Kind::Ignored,
                            k => return Err(err(n, &format!("kind must be s, f or i, got \"{k}\""))),
                        },
                        duration: num(4)?,
                    },
                    _ => return Err(err(n, &format!("expected \"a T ID\", \"f T ID KIND DURATION\" or \"end\", got \"{line}\""))),
                };
                if e.at() < last {
                    return Err(err(n, "time went backwards"));
                }
                last = e.at();
                events.push(e);
            }
            traces.push(Trace {
                seed,
                config,
                events,
            });
        }
        Ok(traces)
    }
}

fn pick<T: Copy>(rng: &mut Pcg64, from: &[T]) -> T {
    from[rng.random_range(0..from.len())]
}
