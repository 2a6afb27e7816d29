//! A real HTTP/1.1 upstream on loopback that answers as told and counts what it saw.
//!
//! What it does per request comes from its current [`Behaviour`] (set by the
//! test), overridden per request by headers the client sends through Envoy:
//! `x-upstream-status: 503`, `x-upstream-delay-ms: 200`, `x-upstream-reset: 1`
//! (close the connection without answering). [`Upstream::fail_share`] makes a
//! share of the other requests fail, evenly spread. Every answer carries
//! `x-served-by: <name>` and the body `<name>\n`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How the upstream answers requests that do not say otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behaviour {
    pub status: u16,
    pub delay: Duration,
    pub reset: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            status: 200,
            delay: Duration::ZERO,
            reset: false,
        }
    }
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

struct Shared {
    name: String,
    requests: AtomicU64,
    in_flight: AtomicU64,
    behaviour: Mutex<Behaviour>,
    /// Percent of requests answered 503 (0: none), and how many were counted for it.
    fail_percent: AtomicU64,
    fail_counted: AtomicU64,
    seen: Mutex<Vec<SeenRequest>>,
    stop: AtomicBool,
}

/// Keeps at most this many requests for inspection (the counter counts all).
const MAX_SEEN: usize = 200_000;

pub struct Upstream {
    port: u16,
    shared: Arc<Shared>,
    /// The accept loop, which owns the listening socket.
    accept: Option<thread::JoinHandle<()>>,
}

impl Upstream {
    /// Starts on a free loopback port.
    pub fn start(name: &str) -> Upstream {
        Self::start_on(name, 0).expect("bind a loopback port for the upstream")
    }

    /// Starts on a given port (0: any free one).
    pub fn start_on(name: &str, port: u16) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            behaviour: Mutex::new(Behaviour::default()),
            fail_percent: AtomicU64::new(0),
            fail_counted: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = Arc::clone(&accept_shared);
                thread::spawn(move || serve(conn, &s));
            }
        });
        Ok(Upstream {
            port,
            shared,
            accept: Some(accept),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Requests received so far (including those answered with a reset).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Requests being handled right now.
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.shared.behaviour.lock().unwrap() = behaviour;
    }

    /// From now on `percent` of the requests that name no status themselves
    /// are answered 503, spread evenly (of every 10 at 30%: exactly 3).
    pub fn fail_share(&self, percent: u64) {
        self.shared.fail_counted.store(0, Ordering::SeqCst);
        self.shared
            .fail_percent
            .store(percent.min(100), Ordering::SeqCst);
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.shared.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag, and wait until it has
        // closed the port: a test that binds the same fixed port next (the
        // demo's) must not find it still in use.
        if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            if let Some(accept) = self.accept.take() {
                let _ = accept.join();
            }
        }
    }
}

fn serve(conn: TcpStream, shared: &Shared) {
    let _ = conn.set_nodelay(true);
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut writer = write_half;
    let mut reader = BufReader::new(conn);
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(req) = read_request(&mut reader) else {
            return;
        };
        shared.requests.fetch_add(1, Ordering::SeqCst);
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let mut behaviour = shared.behaviour.lock().unwrap().clone();
        let text = |n: &str| {
            req.header(n)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_string)
        };
        let percent = shared.fail_percent.load(Ordering::SeqCst);
        if percent > 0 {
            let n = shared.fail_counted.fetch_add(1, Ordering::SeqCst);
            // The n-th request fails when it takes the failed count to the next integer.
            if (n + 1) * percent / 100 > n * percent / 100 {
                behaviour.status = 503;
            }
        }
        if let Some(s) = text("x-upstream-status").and_then(|s| s.parse().ok()) {
            behaviour.status = s;
        }
        if let Some(ms) = text("x-upstream-delay-ms").and_then(|s| s.parse().ok()) {
            behaviour.delay = Duration::from_millis(ms);
        }
        if text("x-upstream-reset").is_some_and(|v| v == "1") {
            behaviour.reset = true;
        }
        let close = text("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        {
            let mut seen = shared.seen.lock().unwrap();
            if seen.len() < MAX_SEEN {
                seen.push(req);
            }
        }
        if !behaviour.delay.is_zero() {
            thread::sleep(behaviour.delay);
        }
        if behaviour.reset {
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
        let body = format!("{}\n", shared.name);
        let head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain\r\nx-served-by: {}\r\ncontent-length: {}\r\n{}\r\n",
            behaviour.status,
            reason(behaviour.status),
            shared.name,
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        );
        // One write: head and body in separate small writes meet Nagle's
        // algorithm and delayed ACKs (~40 ms per request).
        let ok = writer.write_all(format!("{head}{body}").as_bytes());
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        if ok.is_err() || close {
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Reads one request (line, headers, body by content-length or chunked).
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<SeenRequest> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut raw = Vec::new();
        reader.read_until(b'\n', &mut raw).ok()?;
        if raw.is_empty() {
            return None;
        }
        while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            raw.pop();
        }
        if raw.is_empty() {
            break;
        }
        let colon = raw.iter().position(|b| *b == b':')?;
        let name = String::from_utf8_lossy(&raw[..colon])
            .trim()
            .to_ascii_lowercase();
        let mut value = &raw[colon + 1..];
        while value.first() == Some(&b' ') {
            value = &value[1..];
        }
        headers.push((name, value.to_vec()));
    }
    let req = SeenRequest {
        method,
        path,
        headers,
    };
    let length: usize = req
        .header("content-length")
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
        .unwrap_or(0);
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"))
    {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line).ok()?;
            let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
        }
    } else if length > 0 {
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
    }
    Some(req)
}
