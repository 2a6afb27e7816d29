//! A real OCI registry (Debian's `docker-registry`, the CNCF distribution
//! registry) on a loopback port, for the tests that push and pull images.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{debian, http};

/// A registry process on a loopback port, stopped on drop.
pub struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Registry {
    /// The loopback port it listens on (plain HTTP).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its scratch folder (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts an empty registry (Debian's `docker-registry`, installed when
    /// missing and run as root) on a free loopback port.
    pub fn start() -> Registry {
        let bin = debian::ensure("docker-registry", "docker-registry").unwrap();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mesh-oci-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("store")).unwrap();
        let port = crate::free_port();
        let config = dir.join("registry.yml");
        // Not the packaged /etc config: that one wants htpasswd and listens on all addresses.
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("store").display()
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut registry = Registry { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !http::get(port, "/v2/", &[]).is_ok_and(|r| r.status == 200) {
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!("docker-registry exited ({status}):\n{}", registry.log());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry not answering on 127.0.0.1:{port}:\n{}",
                registry.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        registry
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- registry log ----\n{}", self.log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
