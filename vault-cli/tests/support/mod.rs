//! Helpers for the end-to-end tests: start the real `vaultgate` binary on
//! loopback in its own temporary directory, talk HTTP/1.1 to it over raw
//! tokio sockets, run CLI commands, and stand up a mock upstream provider
//! that records what it was sent.
//!
//! Every test gets a fresh temporary directory used both as `--data-dir`
//! and as the working directory (so a `vaultgate.toml` written there is
//! picked up), and a child process that is killed when dropped.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vaultgate");

/// Longest wait for a server to start (debug builds on a busy CI box).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Captured lines of one output stream, with a condition variable so a
/// test can wait for a line to appear.
#[derive(Default)]
pub struct Captured {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Captured {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.changed.notify_all();
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        let mut s = self.lines.lock().unwrap().join("\n");
        s.push('\n');
        s
    }

    /// Waits until some line satisfies `pred`, returning it.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self.changed.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }
}

fn capture(stream: impl Read + Send + 'static) -> Arc<Captured> {
    let captured = Arc::new(Captured::default());
    let sink = captured.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(l) => sink.push(l),
                Err(_) => break,
            }
        }
    });
    captured
}

/// A `Command` for the binary with a clean environment: no `VAULTGATE_*`
/// variable leaks in from the developer's shell.
pub fn command(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir)
        .arg("--data-dir")
        .arg(dir);
    c
}

/// A running `vaultgate serve`, killed on drop.
pub struct Server {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its stdout (the keys printed on first start).
    pub stdout: Arc<Captured>,
    /// Its stderr (status lines and logs).
    pub stderr: Arc<Captured>,
    /// The admin key printed on first start, if this start initialised.
    pub admin_key: Option<String>,
    /// The test key printed on first start, if this start initialised.
    pub test_key: Option<String>,
}

/// How to start a server.
#[derive(Default, Clone)]
pub struct ServerOptions {
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl Server {
    /// Starts a server on `dir` with defaults.
    pub fn start(dir: &Path) -> Server {
        Server::start_with(dir, ServerOptions::default())
    }

    /// Starts a server on `dir`; panics with its output if it does not come up.
    pub fn start_with(dir: &Path, options: ServerOptions) -> Server {
        match Server::try_start(dir, options) {
            Ok(s) => s,
            Err(output) => panic!("vaultgate serve did not start:\n{output}"),
        }
    }

    /// Starts a server; on failure returns its stderr (after it exited or
    /// timed out).
    pub fn try_start(dir: &Path, options: ServerOptions) -> Result<Server, String> {
        // On PostgreSQL, serve never creates keys (`vaultgate init` does).
        let fresh = !dir.join("vaultgate.db").exists()
            && !options
                .env
                .iter()
                .any(|(k, _)| k == "VAULTGATE_DATABASE_URL");
        let mut cmd = command(dir);
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn vaultgate");
        let stdout = capture(child.stdout.take().expect("stdout"));
        let stderr = capture(child.stderr.take().expect("stderr"));
        let deadline = Instant::now() + START_TIMEOUT;
        let listening = loop {
            if let Some(l) = stderr.wait_for(Duration::from_millis(50), |l| {
                l.contains("vaultgate: listening on http://")
            }) {
                break l;
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Let the reader threads drain what the process wrote.
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!("exited with {status}\n{}", stderr.text()));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out\n{}", stderr.text()));
            }
        };
        let addr: SocketAddr = listening
            .rsplit("http://")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .expect("a socket address after `listening on http://`");
        let (mut admin_key, mut test_key) = (None, None);
        if fresh {
            let line = |prefix: &'static str| {
                stdout
                    .wait_for(START_TIMEOUT, |l| l.starts_with(prefix))
                    .map(|l| l[prefix.len()..].trim().to_owned())
            };
            admin_key = line("admin key:");
            test_key = line("test key:");
            assert!(
                admin_key
                    .as_deref()
                    .is_some_and(|k| k.starts_with("vpx_live_")),
                "first start prints an admin key: {}",
                stdout.text()
            );
            assert!(
                test_key
                    .as_deref()
                    .is_some_and(|k| k.starts_with("vpx_test_")),
                "first start prints a test key: {}",
                stdout.text()
            );
        }
        Ok(Server {
            child,
            addr,
            stdout,
            stderr,
            admin_key,
            test_key,
        })
    }

    /// The admin key (first start only).
    pub fn admin(&self) -> &str {
        self.admin_key.as_deref().expect("admin key")
    }

    /// The test key (first start only).
    pub fn test(&self) -> &str {
        self.test_key.as_deref().expect("test key")
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (up to `timeout`) for the exit status.
    pub fn terminate(mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                // Let the reader threads drain the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A finished CLI run.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code (-1 for a signal).
    pub code: i32,
    /// Stdout.
    pub stdout: String,
    /// Stderr.
    pub stderr: String,
}

impl CliOutput {
    /// Stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// Runs `vaultgate ARGS` on `dir`, feeding `stdin`, with extra `env`.
pub fn cli_with(dir: &Path, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> CliOutput {
    let mut cmd = command(dir);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn vaultgate");
    {
        let mut input = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            let _ = input.write_all(s.as_bytes());
        }
    }
    let out = child.wait_with_output().expect("wait for vaultgate");
    CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `vaultgate ARGS` on `dir` with empty stdin.
pub fn cli(dir: &Path, args: &[&str]) -> CliOutput {
    cli_with(dir, args, None, &[])
}

/// Initialises `dir` with `vaultgate init` and returns (admin key, test key).
pub fn init(dir: &Path) -> (String, String) {
    let out = cli(dir, &["init", "--output", "json"]);
    assert_eq!(out.code, 0, "init: {out:?}");
    let v = out.json();
    (
        v["admin_key"].as_str().unwrap().to_owned(),
        v["test_key"].as_str().unwrap().to_owned(),
    )
}

/// Writes `vaultgate.toml` in `dir` pointing the named providers at `base`.
pub fn write_config(dir: &Path, providers: &[&str], base: &str, extra: &str) {
    let mut s = String::new();
    for p in providers {
        s.push_str(&format!("[providers.{p}]\nbase_url = \"{base}\"\n"));
    }
    s.push_str(extra);
    std::fs::write(dir.join("vaultgate.toml"), s).unwrap();
}

// ---------------------------------------------------------------- HTTP

/// One HTTP response, as the client saw it.
#[derive(Debug, Clone)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The head exactly as received (status line and headers).
    pub head: String,
    /// The decoded body.
    pub body: Vec<u8>,
}

impl Resp {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {} {}", self.status, self.text()))
    }

    /// Everything a client saw, for leak sweeps.
    pub fn everything(&self) -> String {
        format!("{}\r\n\r\n{}", self.head, self.text())
    }

    /// Asserts the error shape of docs/api.md#errors and returns the code.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(!detail.is_empty(), "detail: {}", self.text());
        assert_eq!(
            v["error"]["message"].as_str(),
            Some(detail),
            "{}",
            self.text()
        );
        assert!(v["error"]["type"].is_string(), "{}", self.text());
        v["error"]["code"].as_str().unwrap_or_default().to_owned()
    }
}

/// A request to send.
pub struct Req<'a> {
    /// Method.
    pub method: &'a str,
    /// Request target (path and query).
    pub path: &'a str,
    /// Extra headers.
    pub headers: Vec<(&'a str, String)>,
    /// Body (a Content-Length is added when present).
    pub body: Option<Vec<u8>>,
}

impl<'a> Req<'a> {
    /// A request with no headers and no body.
    pub fn new(method: &'a str, path: &'a str) -> Self {
        Req {
            method,
            path,
            headers: Vec::new(),
            body: None,
        }
    }

    /// Adds `Authorization: Bearer KEY`.
    pub fn bearer(mut self, key: &str) -> Self {
        self.headers
            .push(("authorization", format!("Bearer {key}")));
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &'a str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    /// A JSON body.
    pub fn json(mut self, v: &Value) -> Self {
        self.headers
            .push(("content-type", "application/json".to_owned()));
        self.body = Some(v.to_string().into_bytes());
        self
    }

    /// A raw body.
    pub fn raw(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    fn encode(&self, addr: SocketAddr) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n",
            self.method, self.path
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = &self.body {
            out.push_str(&format!("content-length: {}\r\n", b.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if let Some(b) = &self.body {
            bytes.extend_from_slice(b);
        }
        bytes
    }
}

/// Sends one request on a fresh connection and reads the whole response.
pub async fn send(addr: SocketAddr, req: Req<'_>) -> Resp {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(&req.encode(addr)).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("response within 30 s")
        .expect("read");
    parse_response(&raw, req.method == "HEAD")
}

/// Sends a request, reads the response head, and drops the connection
/// before the body: a client that disconnects.
pub async fn send_and_hang_up(addr: SocketAddr, req: Req<'_>) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(&req.encode(addr)).await.expect("write");
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
        .await
        .expect("some bytes within 30 s")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `GET path` with a bearer key.
pub async fn get(addr: SocketAddr, path: &str, key: &str) -> Resp {
    send(addr, Req::new("GET", path).bearer(key)).await
}

/// `POST path` with a bearer key and a JSON body.
pub async fn post(addr: SocketAddr, path: &str, key: &str, body: &Value) -> Resp {
    send(addr, Req::new("POST", path).bearer(key).json(body)).await
}

/// `DELETE path` with a bearer key.
pub async fn delete(addr: SocketAddr, path: &str, key: &str) -> Resp {
    send(addr, Req::new("DELETE", path).bearer(key)).await
}

/// A dashboard form posted to `path` from the page's own `origin`, with
/// the session `cookie` (`vg_session=…`) when given.
pub async fn ui_form(
    addr: SocketAddr,
    origin: &str,
    path: &str,
    cookie: Option<&str>,
    body: String,
) -> Resp {
    let mut req = Req::new("POST", path)
        .header("origin", origin)
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    send(addr, req.raw(body.into_bytes())).await
}

/// Signs in to the dashboard with `key`; the session cookie as a `Cookie`
/// header sends it (`vg_session=…`).
pub async fn ui_sign_in(addr: SocketAddr, origin: &str, key: &str) -> String {
    let r = ui_form(addr, origin, "/ui/sign-in", None, format!("api_key={key}")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    r.header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned()
}

/// The CSRF token in a dashboard page's forms.
pub fn csrf_of(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_default()
        .to_owned()
}

/// A small chat completion through the proxy.
pub async fn chat(addr: SocketAddr, key: &str, model: &str) -> Resp {
    post(
        addr,
        "/openai/v1/chat/completions",
        key,
        &json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}),
    )
    .await
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses a raw HTTP/1.1 response (Content-Length, chunked or close-delimited).
pub fn parse_response(raw: &[u8], head_only: bool) -> Resp {
    let end = find(raw, b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if head_only {
        Vec::new()
    } else if chunked {
        decode_chunked(rest)
    } else {
        rest.to_vec()
    };
    Resp {
        status,
        headers,
        head,
        body,
    }
}

fn decode_chunked(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(eol) = find(rest, b"\r\n") {
        let size_line = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        rest = &rest[eol + 2..];
        if size == 0 || rest.len() < size {
            body.extend_from_slice(&rest[..size.min(rest.len())]);
            break;
        }
        body.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
    body
}

// ---------------------------------------------------------------- admin helpers

/// Creates a key through the API; panics unless 201. Returns (id, key, view).
pub async fn create_key(addr: SocketAddr, admin: &str, body: &Value) -> (String, String, Value) {
    let r = post(addr, "/v1/keys", admin, body).await;
    assert_eq!(r.status, 201, "create key {body}: {}", r.text());
    let v = r.json();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
        v,
    )
}

/// Adds a provider key through the API; panics unless 201. Returns its id.
pub async fn add_provider_key(
    addr: SocketAddr,
    admin: &str,
    provider: &str,
    secret: &str,
) -> String {
    let r = post(
        addr,
        "/v1/provider-keys",
        admin,
        &json!({"provider": provider, "api_key": secret, "name": "e2e"}),
    )
    .await;
    assert_eq!(r.status, 201, "add provider key: {}", r.text());
    r.json()["id"].as_str().unwrap().to_owned()
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes; returns
/// how long it took, or `None`.
pub async fn poll_until<F, Fut>(timeout: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- mock upstream

/// What the mock upstream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// An OpenAI chat completion with usage.
    Ok,
    /// 500 with a plain error body.
    ServerError,
    /// 401 echoing the credential it received in headers and body.
    EchoCredential,
    /// An SSE stream of many chunks, slowly (for client disconnects).
    SlowStream,
}

/// A request the mock upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The request line.
    pub request_line: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Seen {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A provider-shaped HTTP server on loopback, on its own thread and runtime.
pub struct MockUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    behaviour: Arc<Mutex<Behaviour>>,
}

impl MockUpstream {
    /// Starts one answering [`Behaviour::Ok`].
    pub fn start() -> MockUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Mutex::new(Behaviour::Ok));
        let (s, b) = (seen.clone(), behaviour.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (s, b) = (s.clone(), b.clone());
                    tokio::spawn(async move {
                        let _ = serve_one(stream, s, b).await;
                    });
                }
            });
        });
        MockUpstream {
            addr,
            seen,
            behaviour,
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes what it answers.
    pub fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    /// What it has received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// How many requests it has received.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn serve_one(
    mut stream: TcpStream,
    seen: Arc<Mutex<Vec<Seen>>>,
    behaviour: Arc<Mutex<Behaviour>>,
) -> std::io::Result<()> {
    loop {
        // One request per iteration (the proxy's client keeps connections alive).
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < len {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            body.extend_from_slice(&chunk[..n]);
        }
        let credential = headers
            .iter()
            .find(|(k, _)| k == "authorization" || k == "x-api-key" || k == "x-goog-api-key")
            .map(|(_, v)| v.trim_start_matches("Bearer ").to_owned())
            .unwrap_or_default();
        seen.lock().unwrap().push(Seen {
            request_line,
            headers,
            body,
        });
        let b = *behaviour.lock().unwrap();
        match b {
            Behaviour::Ok => {
                let body = json!({
                    "id": "chatcmpl-e2e", "object": "chat.completion", "created": 1,
                    "model": "gpt-4o-mini",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
                })
                .to_string();
                write_response(
                    &mut stream,
                    200,
                    &[("content-type", "application/json")],
                    &body,
                )
                .await?;
            }
            Behaviour::ServerError => {
                write_response(
                    &mut stream,
                    500,
                    &[("content-type", "application/json")],
                    r#"{"error":{"message":"upstream exploded","type":"server_error"}}"#,
                )
                .await?;
            }
            Behaviour::EchoCredential => {
                let body = json!({"error": {"message": format!("Incorrect API key provided: {credential}"), "type": "invalid_request_error"}}).to_string();
                let bearer = format!("Bearer {credential}");
                let cookie = format!("session={credential}");
                let location = format!("https://example.invalid/?key={credential}");
                write_response(
                    &mut stream,
                    401,
                    &[
                        ("content-type", "application/json"),
                        ("authorization", &bearer),
                        ("x-goog-api-key", &credential),
                        ("x-api-key", &credential),
                        ("set-cookie", &cookie),
                        ("location", &location),
                    ],
                    &body,
                )
                .await?;
            }
            Behaviour::SlowStream => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await?;
                for i in 0..200 {
                    let ev = format!(
                        "data: {}\n\n",
                        json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
                               "choices": [{"index": 0, "delta": {"content": format!("w{i} ")}}]})
                    );
                    let chunk = format!("{:x}\r\n{ev}\r\n", ev.len());
                    if stream.write_all(chunk.as_bytes()).await.is_err() {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                stream.write_all(b"0\r\n\r\n").await?;
                return Ok(());
            }
        }
    }
}

async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    stream.write_all(out.as_bytes()).await
}

// ---------------------------------------------------------------- leak sweeps

/// Every form a secret could leak in: raw, hex, base64 (standard and URL-safe,
/// at each of the three alignments), and percent-encoded.
pub fn encodings(secret: &str) -> Vec<String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let bytes = secret.as_bytes();
    let mut forms = vec![
        secret.to_owned(),
        hex::encode(bytes),
        hex::encode_upper(bytes),
        bytes
            .iter()
            .map(|b| format!("%{b:02X}"))
            .collect::<String>(),
        bytes
            .iter()
            .map(|b| format!("%{b:02x}"))
            .collect::<String>(),
    ];
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for skip in 0..3 {
            // Encoding from byte `skip` on; drop the last (partial) symbols so
            // the form does not depend on what follows the secret.
            let enc = engine.encode(&bytes[skip..]);
            let stable = enc.len().saturating_sub(3);
            forms.push(enc[..stable].to_owned());
        }
    }
    forms
}

/// The hex SHA-256 of `s`, lower and upper case.
pub fn sha256_hex(s: &str) -> Vec<String> {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    vec![hex::encode(d.as_ref()), hex::encode_upper(d.as_ref())]
}

/// Panics naming `what` if `haystack` contains any of `forms`.
pub fn assert_absent(what: &str, haystack: &str, forms: &[String]) {
    for f in forms {
        assert!(
            !haystack.contains(f.as_str()),
            "{what} contains a secret in the form {f:?}"
        );
    }
}

/// A random alphanumeric string of `n` characters.
pub fn random_alnum(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

/// A fresh temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Path of a file in the data directory.
pub fn data(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
