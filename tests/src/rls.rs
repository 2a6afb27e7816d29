//! A real rate limit service for the global-mode tests: Redis (Debian's
//! `redis-server`) and envoyproxy/ratelimit (built from the Go module proxy
//! at [`RATELIMIT_VERSION`]), both on loopback, both stopped on drop.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{debian, http, tools};

/// envoyproxy/ratelimit's main package and the pinned version (a commit of
/// 2026-01-22 on main, as the Go module proxy names it).
pub const RATELIMIT_PACKAGE: &str = "github.com/envoyproxy/ratelimit/src/service_cmd";
pub const RATELIMIT_VERSION: &str = "v1.4.1-0.20260122083618-3fb702589d36";

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn scratch(kind: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mesh-{kind}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn wait_until(what: &str, child: &mut Child, log: &Path, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}):\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} not ready after 60 s:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Redis server on a loopback port, without persistence.
pub struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    pub fn start() -> Redis {
        let mut redis = Redis {
            child: None,
            port: crate::free_port(),
            dir: scratch("redis"),
        };
        redis.restart();
        redis
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts it again on the same port (after [`Redis::stop`]); data is gone.
    pub fn restart(&mut self) {
        self.stop();
        let bin = debian::ensure("redis-server", "redis-server").unwrap();
        let log = self.dir.join("redis.log");
        let out = fs::File::create(&log).unwrap();
        let mut child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let port = self.port;
        wait_until("redis-server", &mut child, &log, || {
            command(port, &["PING"]).is_ok_and(|r| r.starts_with("+PONG"))
        });
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Calls of one Redis command so far (`INFO commandstats`), e.g. `incrby`.
    pub fn calls(&self, command_name: &str) -> u64 {
        let info = command(self.port, &["INFO", "commandstats"]).unwrap_or_default();
        let prefix = format!("cmdstat_{command_name}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- redis log ----\n{}",
                fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One Redis command over RESP; the raw reply (a bulk reply's payload).
fn command(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    conn.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(rest) = text.strip_prefix('$') {
            if let Some((len, body)) = rest.split_once("\r\n") {
                let len: usize = len.parse().unwrap_or(0);
                if body.len() >= len {
                    return Ok(body[..len].to_string());
                }
            }
        } else if text.ends_with("\r\n") {
            return Ok(text.into_owned());
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// envoyproxy/ratelimit serving one configuration file over gRPC on loopback.
pub struct RateLimitService {
    child: Option<Child>,
    bin: PathBuf,
    redis_port: u16,
    grpc_port: u16,
    http_port: u16,
    debug_port: u16,
    dir: PathBuf,
    stopped: bool,
}

impl RateLimitService {
    /// Starts the service with `config` (its YAML: `domain`, `descriptors`)
    /// against the Redis on `redis_port`.
    pub fn start(redis_port: u16, config: &str) -> RateLimitService {
        RateLimitService::start_on(redis_port, config, crate::free_port())
    }

    /// As [`RateLimitService::start`], serving gRPC on `grpc_port` (the port
    /// a fixed Envoy configuration names, as the benchmark's).
    pub fn start_on(redis_port: u16, config: &str, grpc_port: u16) -> RateLimitService {
        let bin = tools::go_install(RATELIMIT_PACKAGE, RATELIMIT_VERSION, "service_cmd").unwrap();
        let dir = scratch("rls");
        fs::create_dir_all(dir.join("runtime/ratelimit/config")).unwrap();
        fs::write(dir.join("runtime/ratelimit/config/mesh.yaml"), config).unwrap();
        let mut service = RateLimitService {
            child: None,
            bin,
            redis_port,
            grpc_port,
            http_port: crate::free_port(),
            debug_port: crate::free_port(),
            dir,
            stopped: false,
        };
        service.restart();
        service
    }

    /// The gRPC port (the Envoy cluster's endpoint).
    pub fn grpc_port(&self) -> u16 {
        self.grpc_port
    }

    /// Starts it again on the same ports (after [`RateLimitService::stop`]).
    pub fn restart(&mut self) {
        self.stop();
        let log = self.dir.join("ratelimit.log");
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut child = Command::new(&self.bin)
            .env_clear()
            .env("USE_STATSD", "false")
            .env("REDIS_SOCKET_TYPE", "tcp")
            .env("REDIS_URL", format!("127.0.0.1:{}", self.redis_port))
            .env("RUNTIME_ROOT", self.dir.join("runtime"))
            .env("RUNTIME_SUBDIRECTORY", "ratelimit")
            .env("RUNTIME_WATCH_ROOT", "false")
            .env("HOST", "127.0.0.1")
            .env("PORT", self.http_port.to_string())
            .env("GRPC_HOST", "127.0.0.1")
            .env("GRPC_PORT", self.grpc_port.to_string())
            .env("DEBUG_HOST", "127.0.0.1")
            .env("DEBUG_PORT", self.debug_port.to_string())
            .env("LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let port = self.http_port;
        wait_until("envoyproxy/ratelimit", &mut child, &log, || {
            http::get(port, "/healthcheck", &[]).is_ok_and(|r| r.status == 200)
        });
        self.child = Some(child);
        self.stopped = false;
    }

    /// Kills the process (its ports then refuse connections).
    pub fn stop(&mut self) {
        self.resume();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: connections stay open, nothing answers.
    pub fn pause(&mut self) {
        self.signal("-STOP");
        self.stopped = true;
    }

    /// SIGCONT after [`RateLimitService::pause`].
    pub fn resume(&mut self) {
        if self.stopped {
            self.signal("-CONT");
            self.stopped = false;
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status();
        }
    }

    /// The service's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("ratelimit.log")).unwrap_or_default()
    }
}

impl Drop for RateLimitService {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- ratelimit service log ----\n{}", self.log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
