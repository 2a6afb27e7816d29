//! The cases: one configuration file of `envoy/bench/` each, one Envoy
//! running it (killed on drop), and the requests every case is probed and
//! counted with (the headers of the wrk script, `envoy/bench/keys.lua`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{first_line, Options, PATH, STUB_BYTES};

/// One configuration file of envoy/bench/.
pub(crate) struct Case {
    pub(crate) name: String,
    pub(crate) file: PathBuf,
    /// Its first comment line: what it measures.
    pub(crate) description: String,
    pub(crate) listener_port: u16,
    pub(crate) admin_port: u16,
    /// The `.wasm` files it loads (relative to the repository root).
    pub(crate) modules: Vec<PathBuf>,
}

impl Case {
    /// `envoy/bench/<name>.yaml`; with a `port_offset` or a `modules`
    /// directory, a copy in target/bench/cases/ with every bench port
    /// (18000-19999) moved by the offset and the modules loaded from that
    /// directory instead of dist/, so two bench runs can share a machine and
    /// a run can measure modules built from another commit.
    pub(crate) fn load(root: &Path, name: &str, port_offset: u16) -> Result<Case, String> {
        Case::load_from(root, name, port_offset, None)
    }

    /// [`Case::load`] with `opts`' port offset and modules directory.
    pub(crate) fn load_for(root: &Path, name: &str, opts: &Options) -> Result<Case, String> {
        Case::load_from(root, name, opts.port_offset, opts.modules.as_deref())
    }

    fn load_from(
        root: &Path,
        name: &str,
        port_offset: u16,
        modules: Option<&str>,
    ) -> Result<Case, String> {
        let source = root.join("envoy/bench").join(format!("{name}.yaml"));
        let text = fs::read_to_string(&source).map_err(|e| format!("{}: {e}", source.display()))?;
        let (file, text) = match (port_offset, modules) {
            (0, None) => (source, text),
            (offset, modules) => {
                let mut text = offset_ports(&text, offset);
                if let Some(dir) = modules {
                    text = text.replace("filename: dist/", &format!("filename: {dir}/"));
                }
                let dir = root.join("target/bench/cases");
                let copy = dir.join(format!("{name}.yaml"));
                fs::create_dir_all(copy.parent().unwrap_or(&dir))
                    .and_then(|()| fs::write(&copy, &text))
                    .map_err(|e| format!("{}: {e}", copy.display()))?;
                (copy, text)
            }
        };
        let description = text
            .lines()
            .next()
            .and_then(|l| l.split_once(": "))
            .map(|(_, d)| d.trim_end_matches('.').to_string())
            .unwrap_or_default();
        let port_after = |section: &str| -> Option<u16> {
            let rest = &text[text.find(section)?..];
            let at = rest.find("port_value:")? + "port_value:".len();
            rest[at..]
                .trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        let missing = |what: &str| format!("{}: no {what} port_value", file.display());
        Ok(Case {
            name: name.to_string(),
            description,
            listener_port: port_after("\n  listeners:").ok_or_else(|| missing("listener"))?,
            admin_port: port_after("\nadmin:").ok_or_else(|| missing("admin"))?,
            modules: text
                .lines()
                .filter_map(|l| l.split_once("filename:"))
                .map(|(_, f)| PathBuf::from(f.trim().trim_end_matches(['}', ' '])))
                .collect(),
            file,
        })
    }

    /// Why the case cannot run, if a module is missing or a placeholder.
    pub(crate) fn unavailable(&self, root: &Path) -> Option<String> {
        self.modules
            .iter()
            .find_map(|m| match fs::metadata(root.join(m)).map(|md| md.len()) {
                Err(_) => Some(format!("{} is missing", m.display())),
                Ok(n) if n < STUB_BYTES => Some(format!("{} is a {n}-byte stub", m.display())),
                Ok(_) => None,
            })
    }

    /// The case's ports are fixed: when something already listens on one (another
    /// bench run, on a shared machine), this Envoy could not bind it, and the probe
    /// would be answered by the other process.
    pub(crate) fn ports_free(&self) -> Result<(), String> {
        for port in [self.listener_port, self.admin_port] {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Err(format!(
                    "port {port} of envoy/bench/{}.yaml is in use (another bench running?)",
                    self.name
                ));
            }
        }
        Ok(())
    }

    /// One request with the headers the wrk script sends; Ok if answered 200.
    pub(crate) fn probe(&self) -> Result<(), String> {
        send_requests(self.listener_port, 1, 1, None)
    }
}

/// `text` with every `port_value: N` for N in 18000-19999 moved by `offset`.
fn offset_ports(text: &str, offset: u16) -> String {
    const KEY: &str = "port_value:";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(KEY) {
        let (head, tail) = rest.split_at(at + KEY.len());
        out.push_str(head);
        let spaces = tail.len() - tail.trim_start().len();
        let digits = tail[spaces..]
            .chars()
            .take_while(char::is_ascii_digit)
            .count();
        let number = &tail[spaces..spaces + digits];
        out.push_str(&tail[..spaces]);
        match number.parse::<u16>() {
            Ok(port) if (18000..20000).contains(&port) => {
                out.push_str(&port.saturating_add(offset).to_string())
            }
            _ => out.push_str(number),
        }
        rest = &tail[spaces + digits..];
    }
    out.push_str(rest);
    out
}

/// An Envoy running one case, killed on drop.
pub(crate) struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    /// `envoy -c <case> --concurrency 1`, its log in target/bench/logs/<case>.log.
    pub(crate) fn start(envoy: &Path, root: &Path, case: &Case) -> Result<Running, String> {
        Self::start_with(envoy, root, case, 1)
    }

    /// The same with `concurrency` workers (log `<case>-c<concurrency>.log` unless 1).
    pub(crate) fn start_with(
        envoy: &Path,
        root: &Path,
        case: &Case,
        concurrency: u32,
    ) -> Result<Running, String> {
        case.ports_free()?;
        let log_name = match concurrency {
            1 => format!("{}.log", case.name),
            n => format!("{}-c{n}.log", case.name),
        };
        let log = root.join("target/bench/logs").join(log_name);
        let _ = fs::create_dir_all(log.parent().unwrap_or(root));
        let out = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(envoy)
            .current_dir(root)
            .arg("-c")
            .arg(&case.file)
            .args(["--concurrency", &concurrency.to_string()])
            .arg("--disable-hot-restart")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{}: {e}", envoy.display()))?;
        Ok(Running { child, log })
    }

    /// Waits until the case answers its probe with 200; returns the time
    /// since `since`. On failure, the reason (Envoy's own error line if any).
    pub(crate) fn wait_answering(
        &mut self,
        case: &Case,
        since: Instant,
    ) -> Result<Duration, String> {
        let limit = Duration::from_secs(60).saturating_sub(since.elapsed());
        wait_answering(&mut self.child, limit, Duration::from_millis(2), || {
            case.probe()
        })
        .map(|()| since.elapsed())
        .map_err(|e| format!("{e}: {}", self.error_line()))
    }

    /// The most telling line of Envoy's log: the first error or critical one.
    pub(crate) fn error_line(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .find(|l| l.contains("][error]") || l.contains("][critical]"))
            .map(|l| l.rsplit("] ").next().unwrap_or(l).trim().to_string())
            .unwrap_or_else(|| "no error in Envoy's log".into())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time of all Envoy's threads so far, in nanoseconds.
    pub(crate) fn cpu_ns(&self) -> u64 {
        let Ok(tasks) = fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return 0;
        };
        tasks
            .filter_map(|t| fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    pub(crate) fn rss_kib(&self) -> u64 {
        mesh_testkit::envoy::rss_kib(self.pid())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `probe` every `poll` until it succeeds, for at most `limit`.
/// Fails at once if Envoy exits, or answers but not 200 (probe errors
/// starting "answered": the filter is not working, waiting will not help).
pub(crate) fn wait_answering(
    envoy: &mut Child,
    limit: Duration,
    poll: Duration,
    probe: impl Fn() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = envoy.try_wait() {
            return Err(format!("Envoy exited ({status})"));
        }
        match probe() {
            Ok(()) => return Ok(()),
            Err(e) if e.starts_with("answered") => return Err(e),
            Err(e) => last = e,
        }
        std::thread::sleep(poll);
    }
    Err(format!(
        "not answering after {} s ({last})",
        limit.as_secs()
    ))
}

/// Sends `n` GETs over one keep-alive connection with the headers the wrk
/// script sends (keys cycling through `keys`), plus `extra`; every answer must be 200.
pub(crate) fn send_requests(
    port: u16,
    n: u64,
    keys: u32,
    extra: Option<(&str, &str)>,
) -> Result<(), String> {
    const TENANTS: [&str; 3] = ["gold", "silver", "bronze"];
    let mut client = mesh_testkit::http::Client::new(port);
    for i in 0..n {
        let k = i % u64::from(keys.max(1)) + 1;
        let (api_key, user) = (format!("key-{k}"), format!("user-{k}"));
        let mut headers = vec![
            ("x-api-key", api_key.as_str()),
            ("x-user-id", user.as_str()),
            ("x-tenant", TENANTS[(k % 3) as usize]),
        ];
        headers.extend(extra);
        match client.get(PATH, &headers) {
            Ok(r) if r.status == 200 => {}
            Ok(r) => {
                return Err(format!(
                    "answered {} to GET {PATH}: {}",
                    r.status,
                    first_line(&r.body_text())
                ))
            }
            Err(e) => return Err(format!("GET {PATH}: {e}")),
        }
    }
    Ok(())
}

/// Time from spawning Envoy to its first 200 answer, three times (ms).
pub(crate) fn measure_startup(envoy: &Path, root: &Path, case: &Case) -> Result<Vec<f64>, String> {
    if let Some(why) = case.unavailable(root) {
        return Err(why);
    }
    (0..3)
        .map(|_| {
            let since = Instant::now();
            let mut running = Running::start(envoy, root, case)?;
            let took = running.wait_answering(case, since)?;
            drop(running);
            Ok(took.as_secs_f64() * 1000.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn moves_only_the_bench_ports() {
        let text = "admin: { port_value: 19001 }\nlisten: { port_value:18001 }\nother: { port_value: 8080 }\n";
        assert_eq!(
            super::offset_ports(text, 500),
            "admin: { port_value: 19501 }\nlisten: { port_value:18501 }\nother: { port_value: 8080 }\n"
        );
    }
}
