//! A throwaway PostgreSQL server for tests (feature `testing`): this
//! crate's conformance and race tests, and end-to-end tests that run
//! several `vaultgate` replicas on one database.
//!
//! [`TestPostgres::start`] finds `initdb` and `postgres` (on `PATH` or in
//! `/usr/lib/postgresql/*/bin`), makes a temporary data directory, runs
//! `initdb` (as the `postgres` user when running as root, which `initdb`
//! refuses), starts `postgres` on a free loopback port with `fsync=off`,
//! waits until it accepts connections, and creates a template database
//! holding the current schema, so that [`TestPostgres::fresh_database`] is
//! one `CREATE DATABASE … TEMPLATE` away. Dropping it stops the server.
//!
//! When PostgreSQL is not installed, [`TestPostgres::start_or_skip`]
//! prints `SKIPPED: PostgreSQL not installed (apt-get install postgresql)`
//! to stderr and returns `None` — unless `CI=true`, where it panics: CI
//! must run these tests, never skip them.
//!
//! ```no_run
//! use vault_postgres::testing::TestPostgres;
//! let Some(pg) = TestPostgres::shared() else { return }; // skipped
//! let url = pg.fresh_database(); // migrated, empty, no other test sees it
//! # let _ = url;
//! ```

// Test support: a server that cannot start is a failed test.
#![allow(clippy::panic, clippy::expect_used)]

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{PostgresOptions, PostgresStore};

/// The line printed when PostgreSQL is missing and the tests pass anyway.
pub const SKIPPED: &str = "SKIPPED: PostgreSQL not installed (apt-get install postgresql)";

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The migrated template every fresh database is copied from.
const TEMPLATE: &str = "vg_template";

/// Runs the server in the background; on a `stop` line on its standard
/// input stops it (by PID) and answers `stopped`, on `start` starts it
/// again (same data, same port) and answers `started`; when its standard
/// input closes — [`TestPostgres`] dropped, or the test process dead
/// however it died (a static server is never dropped) — stops it and
/// removes the data directory. SIGINT is PostgreSQL's *fast* shutdown:
/// SIGTERM's *smart* shutdown would wait for the pools of stores still
/// alive to disconnect.
const SUPERVISOR: &str = r#"
bin=$0 dir=$1 port=$2 extra=$3
run() {
    "$bin" -D "$dir/data" -p "$port" -k "$dir" -h 127.0.0.1 \
        -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
        -c max_connections=400 -c shared_buffers=64MB -c log_min_messages=warning \
        $extra >>"$dir/postgres.log" 2>&1 &
    pid=$!
}
run
while read command; do
    case "$command" in
        stop) kill -INT "$pid"; wait "$pid"; pid=; echo stopped ;;
        start) run; echo started ;;
    esac
done
if [ -n "$pid" ]; then kill -INT "$pid"; wait "$pid"; fi
rm -rf "$dir"
"#;

/// A test CA (`ca.crt`) and a server certificate for 127.0.0.1 it signed
/// (`server.crt`, `server.key`) in directory `$0`. (webpki refuses a
/// self-signed CA certificate used as the server's own.)
const MAKE_CERTIFICATES: &str = r#"
set -e
cd "$0"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=vaultgate-test-ca -keyout ca.key -out ca.crt 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj /CN=127.0.0.1 -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
    -extfile server.ext -out server.crt 2>/dev/null
chmod 600 server.key ca.key
"#;

/// The directory holding `initdb` and `postgres`: the one on `PATH`, else
/// the newest `/usr/lib/postgresql/<version>/bin` (Debian's layout).
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Whether `CI=true`: missing PostgreSQL is then a failure, not a skip.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Runs `f` to completion on a runtime of its own, on a thread of its own,
/// so that it works inside another runtime (a test's) as well as outside.
fn block_on<F: Future + Send>(f: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime for the test server")
                .block_on(f)
        })
        .join()
        .expect("the test server's helper thread")
    })
}

/// A throwaway PostgreSQL server, stopped when dropped.
pub struct TestPostgres {
    port: u16,
    dir: TempDir,
    supervisor: Child,
    /// The supervisor's standard input and output: commands and answers.
    control: Mutex<Option<(ChildStdin, BufReader<ChildStdout>)>>,
    next_db: AtomicU32,
}

impl std::fmt::Debug for TestPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPostgres")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// `program args…`, as the `postgres` user when `as_postgres`.
fn command(as_postgres: bool, program: &Path) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl TestPostgres {
    /// The server shared by every test of this test binary, started on
    /// first use; `None` (after printing [`SKIPPED`]) when PostgreSQL is
    /// not installed. It stops when the test process exits.
    pub fn shared() -> Option<&'static TestPostgres> {
        static SHARED: OnceLock<Option<TestPostgres>> = OnceLock::new();
        SHARED.get_or_init(TestPostgres::start_or_skip).as_ref()
    }

    /// Starts a server; `None` (after printing [`SKIPPED`] to stderr) when
    /// PostgreSQL is not installed.
    ///
    /// # Panics
    /// When PostgreSQL is not installed and `CI=true`, or when it is
    /// installed but the server does not start.
    pub fn start_or_skip() -> Option<TestPostgres> {
        if find_bin_dir().is_none() {
            if in_ci() {
                panic!(
                    "PostgreSQL is not installed and CI=true: install it (apt-get install postgresql)"
                );
            }
            eprintln!("{SKIPPED}");
            return None;
        }
        match TestPostgres::start() {
            Ok(pg) => Some(pg),
            Err(e) => panic!("starting a test PostgreSQL: {e}"),
        }
    }

    /// Starts a server: `initdb`, `postgres` on a free port, the template
    /// database migrated.
    pub fn start() -> Result<TestPostgres, String> {
        Self::start_inner(false)
    }

    /// [`start`](Self::start) with TLS on: a certificate for `127.0.0.1`
    /// signed by a test CA, both made with the `openssl` command; the CA's
    /// PEM is at [`tls_ca`](Self::tls_ca) (trust it with
    /// [`PostgresOptions::ca_file`]). Plain connections are still accepted.
    pub fn start_with_tls() -> Result<TestPostgres, String> {
        Self::start_inner(true)
    }

    /// The test CA's certificate (PEM), when started with TLS.
    pub fn tls_ca(&self) -> Option<PathBuf> {
        let cert = self.dir.path().join("ca.crt");
        cert.is_file().then_some(cert)
    }

    /// The URL the harness itself uses: plain, whatever the server offers.
    fn plain_url(&self, db: &str) -> String {
        format!("{}?sslmode=disable", self.url(db))
    }

    fn start_inner(tls: bool) -> Result<TestPostgres, String> {
        let bin = find_bin_dir().ok_or_else(|| SKIPPED.to_owned())?;
        let dir = tempfile::Builder::new()
            .prefix("vaultgate-pg-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        // The directory is ours: as root it is owned by uid 0.
        let as_postgres = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dir.path())
                .map_err(|e| e.to_string())?
                .uid()
                == 0
        };
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !status.success() {
                return Err("chown of the data directory to the postgres user failed".into());
            }
        }
        let out = command(as_postgres, &bin.join("initdb"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .args(["--locale=C"])
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut settings = String::new();
        if tls {
            let out = command(as_postgres, Path::new("sh"))
                .arg("-c")
                .arg(MAKE_CERTIFICATES)
                .arg(dir.path())
                .output()
                .map_err(|e| format!("running openssl: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "making certificates with openssl failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            // Temporary paths have no spaces: the settings are split on them.
            settings = format!(
                "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            );
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        let mut supervisor = command(as_postgres, Path::new("sh"))
            .arg("-c")
            .arg(SUPERVISOR)
            .arg(bin.join("postgres"))
            .arg(dir.path())
            .arg(port.to_string())
            .arg(settings)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting postgres: {e}"))?;
        let control = match (supervisor.stdin.take(), supervisor.stdout.take()) {
            (Some(stdin), Some(stdout)) => Some((stdin, BufReader::new(stdout))),
            _ => None,
        };
        let pg = TestPostgres {
            port,
            dir,
            supervisor,
            control: Mutex::new(control),
            next_db: AtomicU32::new(0),
        };
        pg.wait_ready()?;
        pg.create_template()?;
        Ok(pg)
    }

    fn log(&self) -> String {
        let mut log = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("postgres.log")) {
            let _ = f.read_to_string(&mut log);
        }
        log
    }

    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = self.plain_url("postgres");
        loop {
            let connected = block_on(async {
                match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((client, conn)) => {
                        let driver = tokio::spawn(conn);
                        let ok = client.simple_query("SELECT 1").await.is_ok();
                        drop(client);
                        let _ = driver.await;
                        ok
                    }
                    Err(_) => false,
                }
            });
            if connected {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "postgres did not accept connections within {START_TIMEOUT:?}; its log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs one statement as the superuser on the `postgres` database.
    pub fn admin(&self, sql: &str) -> Result<(), String> {
        let url = self.plain_url("postgres");
        block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let driver = tokio::spawn(conn);
            let out = client.batch_execute(sql).await.map_err(|e| e.to_string());
            drop(client);
            let _ = driver.await;
            out
        })
    }

    fn create_template(&self) -> Result<(), String> {
        self.admin(&format!("CREATE DATABASE {TEMPLATE}"))?;
        let url = self.plain_url(TEMPLATE);
        block_on(PostgresStore::migrate(&url)).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Sends `command` to the supervisor and waits for its `answer`.
    fn control(&self, command: &str, answer: &str) -> Result<(), String> {
        let mut control = self.control.lock().map_err(|_| "control lock poisoned")?;
        let (stdin, stdout) = control.as_mut().ok_or("the supervisor is gone")?;
        writeln!(stdin, "{command}").map_err(|e| format!("{command}: {e}"))?;
        stdin.flush().map_err(|e| format!("{command}: {e}"))?;
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .map_err(|e| format!("{command}: {e}"))?;
        if line.trim() == answer {
            Ok(())
        } else {
            Err(format!("{command}: the supervisor answered {line:?}"))
        }
    }

    /// Stops the server (fast shutdown, by its PID): every connection is
    /// closed and new ones are refused until [`restart`](Self::restart).
    /// Databases and their rows are kept. Not for the [`shared`](Self::shared)
    /// server: other tests use it.
    pub fn stop(&self) -> Result<(), String> {
        self.control("stop", "stopped")
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port
    /// with the same data, and waits until it accepts connections.
    pub fn restart(&self) -> Result<(), String> {
        self.control("start", "started")?;
        self.wait_ready()
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` (superuser `postgres`, no password).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn new_name(&self) -> String {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        format!("vg_{}_{n}", std::process::id())
    }

    /// A new, empty database without any schema; its URL.
    pub fn empty_database(&self) -> String {
        let name = self.new_name();
        self.admin(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        self.url(&name)
    }

    /// A new database with the current schema and no rows, copied from the
    /// migrated template; its URL.
    pub fn fresh_database(&self) -> String {
        let name = self.new_name();
        self.admin(&format!("CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        self.url(&name)
    }

    /// A store on a [`fresh_database`](Self::fresh_database) with a pool of
    /// `pool_size` connections, opened as it is first used: callable from
    /// synchronous code, such as a conformance-suite factory.
    pub fn fresh_store(&self, pool_size: usize) -> PostgresStore {
        let url = self.fresh_database();
        PostgresStore::connect_lazy(&url, &PostgresOptions::with_pool_size(pool_size))
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // Closing its standard input makes the supervisor stop the server
        // (by its PID) and wait for it.
        if let Ok(mut control) = self.control.lock() {
            drop(control.take());
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match self.supervisor.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = self.supervisor.kill();
        let _ = self.supervisor.wait();
    }
}
