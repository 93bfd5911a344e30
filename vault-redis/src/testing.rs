//! [`TestRedis`]: a throwaway `redis-server` for tests (feature `testing`).
//!
//! Each instance runs in its own temporary directory on a free loopback
//! port, persists nothing (`--save "" --appendonly no`), and is killed by
//! its PID when dropped. It can be stopped and started again on the same
//! port, to test what happens while Redis is down.
//!
//! When `redis-server` is not on `PATH`, [`TestRedis::start`] prints
//! `SKIPPED: redis-server not installed (apt-get install redis-server)` to
//! stderr and returns `Ok(None)`, so the test can return early and pass;
//! under `CI=true` it returns an error instead, so CI never skips silently.
//!
//! ```no_run
//! # async fn t() {
//! use vault_redis::testing::TestRedis;
//! let Some(redis) = TestRedis::start().unwrap() else { return };
//! let config = redis.config().unwrap();
//! # }
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::RedisConfig;

/// Why a test Redis could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// `redis-server` is not on `PATH` and `CI=true`.
    #[error(
        "redis-server not installed (apt-get install redis-server), and CI=true: refusing to skip"
    )]
    NotInstalled,
    /// Starting it failed.
    #[error("starting redis-server failed: {0}")]
    Start(String),
}

/// A `redis-server` child process for one test.
#[derive(Debug)]
pub struct TestRedis {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    password: Option<String>,
    child: Option<Child>,
}

/// `redis-server` on `path`; when it is not there, `Ok(None)` after a
/// loud `SKIPPED` line, or under CI an error.
fn locate(path: Option<std::ffi::OsString>, ci: bool) -> Result<Option<PathBuf>, HarnessError> {
    let found = path.and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("redis-server"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Ok(Some(p)),
        None if ci => Err(HarnessError::NotInstalled),
        None => {
            eprintln!("SKIPPED: redis-server not installed (apt-get install redis-server)");
            Ok(None)
        }
    }
}

fn free_port() -> Result<u16, HarnessError> {
    let l = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| HarnessError::Start(e.to_string()))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| HarnessError::Start(e.to_string()))
}

impl TestRedis {
    /// Starts a fresh Redis, or `Ok(None)` (after printing `SKIPPED: …`)
    /// when `redis-server` is not installed and `CI` is not `true`.
    pub fn start() -> Result<Option<TestRedis>, HarnessError> {
        TestRedis::start_with(None)
    }

    /// As [`TestRedis::start`], with `requirepass`.
    pub fn start_with_password(password: &str) -> Result<Option<TestRedis>, HarnessError> {
        TestRedis::start_with(Some(password.to_owned()))
    }

    fn start_with(password: Option<String>) -> Result<Option<TestRedis>, HarnessError> {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let Some(binary) = locate(std::env::var_os("PATH"), ci)? else {
            return Ok(None);
        };
        let mut last = String::new();
        // Another process may take the free port before Redis binds it.
        for _ in 0..5 {
            let mut redis = TestRedis {
                binary: binary.clone(),
                dir: tempfile::tempdir().map_err(|e| HarnessError::Start(e.to_string()))?,
                port: free_port()?,
                password: password.clone(),
                child: None,
            };
            match redis.spawn() {
                Ok(()) => return Ok(Some(redis)),
                Err(e) => last = e.to_string(),
            }
        }
        Err(HarnessError::Start(last))
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"));
        if let Some(p) = &self.password {
            cmd.arg("--requirepass").arg(p);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| HarnessError::Start(e.to_string()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(HarnessError::Start(format!(
                    "redis-server exited with {status}: {}",
                    self.log_tail()
                )));
            }
            if self.ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop();
        Err(HarnessError::Start(
            "redis-server did not answer PING within 10 s".to_owned(),
        ))
    }

    /// Whether the server answers `PING` now.
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut req = String::new();
        if let Some(p) = &self.password {
            req.push_str(&format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{p}\r\n", p.len()));
        }
        req.push_str("*1\r\n$4\r\nPING\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.windows(5).any(|w| w == b"+PONG") {
                return true;
            }
            if got.starts_with(b"-") {
                return false;
            }
        }
        false
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its temporary directory (its log is `redis.log` there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `redis://[:password@]127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// A configuration for it, with short timeouts for tests (200 ms per
    /// operation, 100 ms before retrying after a failure).
    pub fn config(&self) -> Result<RedisConfig, crate::Error> {
        Ok(RedisConfig::new(self.url())?
            .with_timeout(Duration::from_millis(200))
            .with_retry_interval(Duration::from_millis(100)))
    }

    /// Kills the server (SIGKILL, as a crash would) and waits for it.
    /// Its data is gone; [`TestRedis::restart`] starts it again.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server again on the same port (after [`TestRedis::stop`]).
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        let mut last = String::new();
        // The old socket may linger a moment.
        for _ in 0..50 {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(HarnessError::Start(last))
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_a_missing_redis_server_skips_except_under_ci() {
        let empty = tempfile::tempdir().unwrap();
        let path = Some(empty.path().as_os_str().to_owned());
        assert!(locate(path.clone(), false).unwrap().is_none());
        assert!(matches!(
            locate(path, true),
            Err(HarnessError::NotInstalled)
        ));
        assert!(locate(None, true).is_err());
    }

    #[test]
    fn lifecycle_stop_and_restart_on_the_same_port() {
        let Some(mut redis) = TestRedis::start().unwrap() else {
            return;
        };
        let port = redis.port();
        assert!(redis.ping());
        redis.stop();
        assert!(!redis.ping() && !redis.is_running());
        redis.restart().unwrap();
        assert_eq!(redis.port(), port);
        assert!(redis.ping());
    }
}
