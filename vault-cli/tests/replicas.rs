//! Several `vaultgate serve` processes on one PostgreSQL and one Redis
//! (docs/replicas.md): each test starts a fresh database on the shared
//! `TestPostgres`, its own `TestRedis`, an upstream that counts what
//! reaches it, and three replicas — own data directories, one master key,
//! loopback only — and checks that a promise made on one node holds across
//! all three.
//!
//! Without PostgreSQL or redis-server installed the tests print `SKIPPED`
//! and pass, except under `CI=true`, where they fail.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use vault_postgres::testing::TestPostgres;
use vault_redis::testing::TestRedis;

/// Three replicas per test and two cores: the tests take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What one call may cost: 5 output tokens at $2,000 per million, input
/// free. The upstream always answers 5 output tokens, so a call settles at
/// exactly what it reserved and never gives budget back.
const CALL_MICROS: u64 = 10_000;

// ---------------------------------------------------------------- upstream

/// An OpenAI-shaped upstream: a completion, or an event stream when the
/// body asks for one, always with usage 12 in / 5 out, after a short pause
/// so that calls overlap. Counts every request it answers.
struct Upstream {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let counter = counter.clone();
                    tokio::spawn(async move {
                        let _ = answer(stream, counter).await;
                    });
                }
            });
        });
        Upstream { addr, calls }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// Answers every request on one (kept-alive) connection.
async fn answer(mut stream: tokio::net::TcpStream, calls: Arc<AtomicUsize>) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    loop {
        let (head_end, len) = loop {
            let text = String::from_utf8_lossy(&buf);
            if let Some(head_end) = text.find("\r\n\r\n") {
                let len: usize = text[..head_end]
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= head_end + 4 + len {
                    break (head_end, len);
                }
            }
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let body: Value =
            serde_json::from_slice(&buf[head_end + 4..head_end + 4 + len]).unwrap_or(Value::Null);
        buf.drain(..head_end + 4 + len);
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let usage = json!({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17});
        if body["stream"] == json!(true) {
            let mut events = String::new();
            for chunk in [
                json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
                       "choices": [{"index": 0, "delta": {"content": "hello"}}]}),
                json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
                       "choices": [], "usage": usage}),
            ] {
                events.push_str(&format!("data: {chunk}\n\n"));
            }
            events.push_str("data: [DONE]\n\n");
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
                events.len()
            );
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(events.as_bytes()).await?;
        } else {
            let body = json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "hello"}}],
                "usage": usage,
            })
            .to_string();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
        }
    }
}

// ---------------------------------------------------------------- cluster

/// One database, one Redis, one upstream and three replicas.
struct Cluster {
    redis: TestRedis,
    upstream: Upstream,
    /// `[0]` holds the configuration; `[1..]` are the replicas' data dirs.
    dirs: Vec<tempfile::TempDir>,
    /// The environment every replica and CLI run gets.
    env: Vec<(String, String)>,
    replicas: Vec<Server>,
    admin: String,
}

/// A random master key, standard base64 of 32 bytes.
fn master_key() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// PostgreSQL and Redis, or `None` after a `SKIPPED` line (a failure
/// under `CI=true`, inside the harnesses).
fn engines() -> Option<(&'static TestPostgres, TestRedis)> {
    engines_with(None)
}

/// [`engines`], Redis with `requirepass` when `password` is given.
fn engines_with(password: Option<&str>) -> Option<(&'static TestPostgres, TestRedis)> {
    let pg = TestPostgres::shared()?;
    let redis = match password {
        Some(p) => TestRedis::start_with_password(p),
        None => TestRedis::start(),
    };
    Some((pg, redis.expect("start redis-server")?))
}

/// Secrets a cluster's URLs carry, and how much it logs.
#[derive(Default)]
struct Secrets<'a> {
    /// Put in the PostgreSQL URL (the test server trusts every login, so
    /// it is carried and never checked).
    database_password: Option<&'a str>,
    /// Redis's `requirepass`, in its URL.
    redis_password: Option<&'a str>,
    /// `VAULTGATE_LOG` (default `warn`).
    log: Option<&'a str>,
}

impl Cluster {
    /// Starts everything; `extra` is appended to the shared vaultgate.toml.
    fn start(extra: &str) -> Option<Cluster> {
        Cluster::start_with(extra, &Secrets::default())
    }

    /// [`Cluster::start`] with passwords in the URLs.
    fn start_with(extra: &str, secrets: &Secrets<'_>) -> Option<Cluster> {
        let (pg, redis) = engines_with(secrets.redis_password)?;
        Some(Cluster::start_on(pg, redis, extra, secrets))
    }

    /// [`Cluster::start_with`] on a given PostgreSQL server and Redis.
    fn start_on(
        pg: &TestPostgres,
        redis: TestRedis,
        extra: &str,
        secrets: &Secrets<'_>,
    ) -> Cluster {
        let mut database = pg.fresh_database();
        if let Some(p) = secrets.database_password {
            database = database.replacen("postgres@", &format!("postgres:{p}@"), 1);
        }
        let upstream = Upstream::start();
        let dirs: Vec<_> = (0..4).map(|_| tempdir()).collect();
        let config = dirs[0].path().join("vaultgate.toml");
        std::fs::write(
            &config,
            format!(
                "[providers.openai]\nbase_url = \"http://{}\"\n\n\
                 [prices.\"openai/vg-test-model\"]\ninput = 0.0\noutput = 2000.0\nmax_output_tokens = 5\n\n{extra}",
                upstream.addr
            ),
        )
        .unwrap();
        let env = vec![
            ("VAULTGATE_CONFIG".to_owned(), config.display().to_string()),
            ("VAULTGATE_DATABASE_URL".to_owned(), database),
            ("VAULTGATE_REDIS_URL".to_owned(), redis.url()),
            ("VAULTGATE_MASTER_KEY".to_owned(), master_key()),
            (
                "VAULTGATE_LOG".to_owned(),
                secrets.log.unwrap_or("warn").to_owned(),
            ),
        ];
        let mut cluster = Cluster {
            redis,
            upstream,
            dirs,
            env,
            replicas: Vec::new(),
            admin: String::new(),
        };
        let init = cluster.cli(&["init", "--output", "json"]);
        assert_eq!(init.code, 0, "init: {init:?}");
        cluster.admin = init.json()["admin_key"].as_str().unwrap().to_owned();
        for i in 1..4 {
            let server = Server::start_with(
                cluster.dirs[i].path(),
                ServerOptions {
                    env: cluster.env.clone(),
                },
            );
            cluster.replicas.push(server);
        }
        cluster
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.replicas[i % self.replicas.len()].addr
    }

    /// `vaultgate ARGS` in direct mode on the shared store.
    fn cli(&self, args: &[&str]) -> CliOutput {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        cli_with(self.dirs[1].path(), args, None, &env)
    }

    /// Stops every replica gracefully (their leases go back to the store).
    fn stop_replicas(&mut self) {
        for server in self.replicas.drain(..) {
            assert!(
                server.terminate(Duration::from_secs(30)).is_some(),
                "a replica did not stop"
            );
        }
    }

    /// The upstream's provider key, added through replica 0.
    async fn add_provider_key(&self) {
        add_provider_key(self.addr(0), &self.admin, "openai", "sk-upstream-test").await;
    }

    /// A key made by the admin on replica 0: its id, secret and record.
    async fn create_key(&self, body: &Value) -> (String, String, Value) {
        create_key(self.addr(0), &self.admin, body).await
    }

    /// A key's settled spend as the store holds it, in micro-dollars.
    fn settled_spend(&self, id: &str) -> u64 {
        let out = self.cli(&["keys", "show", id, "--output", "json"]);
        assert_eq!(out.code, 0, "{out:?}");
        micros(out.json()["spend_usd"].as_str().unwrap())
    }
}

fn micros(usd: &str) -> u64 {
    let (whole, frac) = usd.split_once('.').unwrap_or((usd, "0"));
    let frac = format!("{frac:0<6}");
    whole.parse::<u64>().unwrap() * 1_000_000 + frac[..6].parse::<u64>().unwrap()
}

/// A $0.01 chat call: 5 output tokens at most.
fn chat_body(stream: bool) -> Value {
    json!({"model": "vg-test-model", "max_tokens": 5, "stream": stream,
           "messages": [{"role": "user", "content": "hi"}]})
}

/// `n` calls at once, spread round-robin over the replicas.
async fn race(cluster: &Cluster, key: &str, n: usize, stream: bool) -> Vec<Resp> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (addr, key) = (cluster.addr(i), key.to_owned());
            tokio::spawn(async move {
                post(
                    addr,
                    "/openai/v1/chat/completions",
                    &key,
                    &chat_body(stream),
                )
                .await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn count(resps: &[Resp], status: u16) -> usize {
    resps.iter().filter(|r| r.status == status).count()
}

// ---------------------------------------------------------------- promise 1

async fn cap_holds_exactly(stream: bool) {
    let _turn = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start("") else {
        return;
    };
    cluster.add_provider_key().await;
    let (id, key, _) = create_key(
        cluster.addr(1),
        &cluster.admin,
        &json!({"name": "capped", "budget": {"limit_usd": 0.5, "period": "total"}}),
    )
    .await;

    let resps = race(&cluster, &key, 200, stream).await;
    let (ok, refused) = (count(&resps, 200), count(&resps, 402));
    eprintln!(
        "stream={stream}: {ok} admitted, {refused} refused, {} reached the provider",
        cluster.upstream.calls()
    );
    for r in resps.iter().filter(|r| r.status == 402) {
        assert_eq!(r.error_code(), "budget_exceeded", "{}", r.text());
    }
    if stream {
        for r in resps.iter().filter(|r| r.status == 200) {
            assert!(r.text().contains("[DONE]"), "{}", r.text());
        }
    }
    let reached = cluster.upstream.calls();
    let budget_left: Vec<&str> = resps
        .iter()
        .filter_map(|r| r.header("x-budget-remaining-usd"))
        .collect();
    cluster.stop_replicas();
    let spend = cluster.settled_spend(&id);
    eprintln!("settled {spend} µ$; remaining headers {budget_left:?}");
    assert_eq!(ok + refused, 200, "every call is admitted or refused 402");
    assert_eq!(reached, 50, "exactly $0.50 / $0.01 calls");
    assert_eq!(ok, 50);
    assert!(spend <= 500_000, "settled {spend} µ$ over the cap");
    assert_eq!(spend, 50 * CALL_MICROS, "every admitted call settled once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_200_calls_on_three_replicas_reach_the_provider_exactly_50_times() {
    cap_holds_exactly(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_200_streams_on_three_replicas_reach_the_provider_exactly_50_times() {
    cap_holds_exactly(true).await;
}

// ---------------------------------------------------------------- promise 2

/// Waits, if needed, until a minute window has at least 40 s left, so that
/// a burst does not straddle two windows.
async fn away_from_a_minute_boundary() {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 60_000;
    if ms > 20_000 {
        tokio::time::sleep(Duration::from_millis((60_000 - ms + 200) as u64)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_60_per_minute_admits_exactly_60_across_three_replicas() {
    let _turn = SERIAL.lock().await;
    let Some(cluster) = Cluster::start("") else {
        return;
    };
    cluster.add_provider_key().await;
    let (_, key, _) = create_key(
        cluster.addr(2),
        &cluster.admin,
        &json!({"name": "limited", "rate_limit": {"requests_per_minute": 60}}),
    )
    .await;
    away_from_a_minute_boundary().await;

    let resps = race(&cluster, &key, 200, false).await;
    assert_eq!(count(&resps, 200), 60, "exactly 60 admitted in the window");
    assert_eq!(count(&resps, 429), 140);
    assert_eq!(cluster.upstream.calls(), 60);
    for r in resps.iter().filter(|r| r.status == 429) {
        assert_eq!(r.error_code(), "rate_limited", "{}", r.text());
    }
    // Every admitted call saw a different count, whatever its replica.
    let mut remaining: Vec<u64> = resps
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.header("x-ratelimit-remaining").unwrap().parse().unwrap())
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..60).collect::<Vec<u64>>());

    // Afterwards every replica tells the same story.
    let mut seen = Vec::new();
    for i in 0..3 {
        let r = post(
            cluster.addr(i),
            "/openai/v1/chat/completions",
            &key,
            &chat_body(false),
        )
        .await;
        assert_eq!(r.status, 429, "{}", r.text());
        seen.push((
            r.header("x-ratelimit-limit").map(str::to_owned),
            r.header("x-ratelimit-remaining").map(str::to_owned),
            r.header("x-ratelimit-reset").map(str::to_owned),
        ));
    }
    assert_eq!(seen[0].0.as_deref(), Some("60"));
    assert_eq!(seen[0].1.as_deref(), Some("0"));
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
}

// ---------------------------------------------------------------- promise 3

/// A call with a test key (answered by each replica's own mock provider).
async fn mock_call(addr: SocketAddr, key: &str) -> Resp {
    post(
        addr,
        "/openai/v1/chat/completions",
        key,
        &json!({"model": "gpt-4o-mini", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
}

/// A rate limit no test reaches: test keys get the `free` plan (10 a
/// minute) otherwise, and polling for a revocation makes many calls.
static UNLIMITED: std::sync::LazyLock<Value> =
    std::sync::LazyLock::new(|| json!({"requests_per_minute": 1_000_000}));

/// Polls every (replica, key) until each refuses; how long that took.
async fn until_refused(targets: &[(SocketAddr, String)], limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut pending: Vec<(SocketAddr, String)> = targets.to_vec();
    while !pending.is_empty() {
        if start.elapsed() > limit {
            return None;
        }
        let checks: Vec<_> = pending
            .iter()
            .cloned()
            .map(|(addr, key)| tokio::spawn(async move { mock_call(addr, &key).await }))
            .collect();
        let mut still = Vec::new();
        for (t, target) in checks.into_iter().zip(pending.iter()) {
            let r = t.await.unwrap();
            match r.status {
                401 => assert_eq!(r.error_code(), "key_revoked", "{}", r.text()),
                200 => still.push(target.clone()),
                other => panic!("unexpected {other}: {}", r.text()),
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Some(start.elapsed())
}

async fn metric(addr: SocketAddr, name: &str) -> u64 {
    let r = send(addr, Req::new("GET", "/metrics")).await;
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_a_revocation_on_one_replica_is_refused_by_the_others_within_1s() {
    const ROUNDS: usize = 100;
    let _turn = SERIAL.lock().await;
    let Some(cluster) = Cluster::start("") else {
        return;
    };
    let admin = cluster.admin.clone();
    let mut took = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let revoker = cluster.addr(round);
        let others = [cluster.addr(round + 1), cluster.addr(round + 2)];
        let (parent_id, parent, _) = create_key(
            revoker,
            &admin,
            &json!({"name": format!("p{round}"), "env": "test", "permissions": ["chat:write", "keys:manage"], "rate_limit": UNLIMITED.clone()}),
        )
        .await;
        let (_, child, _) = create_key(
            others[0],
            &parent,
            &json!({"name": format!("c{round}"), "env": "test", "parent": parent_id, "permissions": ["chat:write"], "rate_limit": UNLIMITED.clone()}),
        )
        .await;
        let mut targets = Vec::new();
        for addr in others {
            for key in [&parent, &child] {
                // Cached on the other replicas before the revocation.
                let r = mock_call(addr, key).await;
                assert_eq!(r.status, 200, "{}", r.text());
                targets.push((addr, key.clone()));
            }
        }
        let r = delete(revoker, &format!("/v1/keys/{parent_id}"), &admin).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let elapsed = until_refused(&targets, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("round {round}: still accepted after 5 s"));
        took.push(elapsed);
    }
    took.sort_unstable();
    let (median, max) = (took[ROUNDS / 2], took[ROUNDS - 1]);
    eprintln!(
        "revocation seen by both other replicas (key and child): median {median:?}, max {max:?} over {ROUNDS} rounds"
    );
    assert!(max < Duration::from_secs(1), "max {max:?}");
    // The key cache alone would take up to 0.9 s; the broadcast is what
    // makes it fast.
    assert!(median < Duration::from_millis(300), "median {median:?}");
    for i in 0..3 {
        let received = metric(cluster.addr(i), "vaultgate_revocations_received_total").await;
        assert!(received >= 2 * ROUNDS as u64 / 3, "replica {i}: {received}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_a_revocation_from_the_cli_reaches_every_replica() {
    let _turn = SERIAL.lock().await;
    let Some(cluster) = Cluster::start("") else {
        return;
    };
    let (id, key, _) = cluster
        .create_key(&json!({"name": "cli", "env": "test", "permissions": ["chat:write"]}))
        .await;
    let mut targets = Vec::new();
    let mut before = Vec::new();
    for i in 0..3 {
        let r = mock_call(cluster.addr(i), &key).await;
        assert_eq!(r.status, 200, "{}", r.text());
        targets.push((cluster.addr(i), key.clone()));
        before.push(metric(cluster.addr(i), "vaultgate_revocations_received_total").await);
    }
    // Direct mode: the operator's Manager on the shared database.
    let out = cluster.cli(&["keys", "revoke", &id]);
    assert_eq!(out.code, 0, "{out:?}");
    let took = until_refused(&targets, Duration::from_secs(5))
        .await
        .expect("refused everywhere");
    eprintln!("a CLI revocation was refused by all three replicas after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    for (i, b) in before.iter().enumerate() {
        let after = metric(cluster.addr(i), "vaultgate_revocations_received_total").await;
        assert_eq!(after, b + 1, "replica {i} heard the broadcast");
    }
}

// ---------------------------------------------------------------- the hot path

/// Sends one inline command to Redis and returns its reply's text (a
/// status line, or a bulk string's contents).
fn redis_command(redis: &TestRedis, command: &str) -> String {
    use std::io::{BufRead, Read, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", redis.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (&stream)
        .write_all(format!("{command}\r\n").as_bytes())
        .unwrap();
    let mut reader = std::io::BufReader::new(&stream);
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    match first.strip_prefix('$') {
        Some(len) => {
            let mut body = vec![0u8; len.trim().parse::<usize>().unwrap()];
            reader.read_exact(&mut body).unwrap();
            String::from_utf8(body).unwrap()
        }
        None => first,
    }
}

/// Calls of each Redis command since the last `CONFIG RESETSTAT`.
fn redis_command_counts(redis: &TestRedis) -> Vec<(String, u64)> {
    redis_command(redis, "INFO commandstats")
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boundary_a_limited_call_costs_one_redis_round_trip() {
    const CALLS: usize = 30;
    let _turn = SERIAL.lock().await;
    let Some(cluster) = Cluster::start("") else {
        return;
    };
    cluster.add_provider_key().await;
    let (_, key, _) = cluster
        .create_key(&json!({"name": "limited", "rate_limit": {"requests_per_minute": 100000}}))
        .await;
    for i in 0..3 {
        // Loads the script on each replica's connection.
        assert_eq!(one_call(cluster.addr(i), &key).await, 200);
    }
    assert!(redis_command(&cluster.redis, "CONFIG RESETSTAT").starts_with("+OK"));
    for i in 0..CALLS {
        assert_eq!(one_call(cluster.addr(i), &key).await, 200);
    }
    let counts = redis_command_counts(&cluster.redis);
    eprintln!("Redis commands for {CALLS} calls: {counts:?}");
    // Redis counts the commands a script runs too (GET, INCR, PEXPIRE per
    // window). What replicas send themselves: one EVALSHA per call, and
    // none of the commands they send outside the script.
    let count = |name: &str| {
        counts
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, c)| *c)
    };
    assert_eq!(count("evalsha"), CALLS as u64, "{counts:?}");
    for sent_outside_the_script in [
        "eval",
        "script|load",
        "mget",
        "incrby",
        "zrem",
        "zadd",
        "publish",
    ] {
        assert_eq!(count(sent_outside_the_script), 0, "{counts:?}");
    }
    assert_eq!(
        count("pexpire"),
        count("incr"),
        "the script's own: {counts:?}"
    );
}

// ---------------------------------------------------------------- start-up refusals

/// The environment of one replica on `database` and `redis`, with `master`.
fn replica_env(database: &str, redis: Option<&TestRedis>, master: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("VAULTGATE_DATABASE_URL".to_owned(), database.to_owned()),
        ("VAULTGATE_MASTER_KEY".to_owned(), master.to_owned()),
        ("VAULTGATE_LOG".to_owned(), "warn".to_owned()),
    ];
    if let Some(r) = redis {
        env.push(("VAULTGATE_REDIS_URL".to_owned(), r.url()));
    }
    env
}

/// Why `serve` did not start: its exit and stderr.
fn failed_start(env: Vec<(String, String)>) -> String {
    let dir = tempdir();
    match Server::try_start(dir.path(), ServerOptions { env }) {
        Ok(_) => panic!("serve started"),
        Err(output) => output,
    }
}

/// [`failed_start`], whose stderr must be one line.
fn refused_start(env: Vec<(String, String)>) -> String {
    let output = failed_start(env);
    eprintln!("refused: {output}");
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "an exit line and one error line: {output}");
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_a_replica_with_another_master_key_refuses_to_start() {
    let _turn = SERIAL.lock().await;
    let Some((pg, redis)) = engines() else {
        return;
    };
    let database = pg.fresh_database();
    let first = master_key();
    let env = replica_env(&database, Some(&redis), &first);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let dir = tempdir();
    let init = cli_with(dir.path(), &["init", "--output", "json"], None, &pairs);
    assert_eq!(init.code, 0, "{init:?}");

    let output = refused_start(replica_env(&database, Some(&redis), &master_key()));
    assert!(output.contains("exited with exit status: 1"), "{output}");
    assert!(
        output.contains("the master key does not match")
            && output.contains("every replica needs the same VAULTGATE_MASTER_KEY"),
        "{output}"
    );
    // The same key starts.
    let server = Server::start_with(
        tempdir().path(),
        ServerOptions {
            env: replica_env(&database, Some(&redis), &first),
        },
    );
    drop(server);
    // No master key at all: refused before one is made up.
    let mut env = replica_env(&database, Some(&redis), &first);
    env.retain(|(k, _)| k != "VAULTGATE_MASTER_KEY");
    let output = refused_start(env);
    assert!(output.contains("exited with exit status: 2"), "{output}");
    assert!(output.contains("set VAULTGATE_MASTER_KEY"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_an_unmigrated_database_says_to_run_vaultgate_migrate() {
    let _turn = SERIAL.lock().await;
    let Some((pg, redis)) = engines() else {
        return;
    };
    let output = refused_start(replica_env(
        &pg.empty_database(),
        Some(&redis),
        &master_key(),
    ));
    assert!(output.contains("run `vaultgate migrate`"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boundary_postgresql_without_redis_is_refused_naming_redis_url() {
    let _turn = SERIAL.lock().await;
    let Some((pg, _redis)) = engines() else {
        return;
    };
    let output = refused_start(replica_env(&pg.fresh_database(), None, &master_key()));
    assert!(output.contains("exited with exit status: 2"), "{output}");
    assert!(output.contains("[redis] url"), "{output}");
}

// ---------------------------------------------------------------- promise 7

async fn readyz(addr: SocketAddr) -> Resp {
    send(addr, Req::new("GET", "/readyz")).await
}

/// Calls `key` round-robin on every replica until `stop` is set, counting
/// the statuses seen; any status but 200 and 503 `rate_limiter_unavailable`
/// fails the test.
fn load(
    cluster: &Cluster,
    key: &str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(usize, usize)> {
    let addrs: Vec<SocketAddr> = (0..3).map(|i| cluster.addr(i)).collect();
    let key = key.to_owned();
    tokio::spawn(async move {
        let (mut ok, mut unavailable) = (0, 0);
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            let r = post(
                addrs[i % 3],
                "/openai/v1/chat/completions",
                &key,
                &chat_body(false),
            )
            .await;
            match r.status {
                200 => ok += 1,
                503 => {
                    assert_eq!(r.error_code(), "rate_limiter_unavailable", "{}", r.text());
                    assert_eq!(r.header("retry-after"), Some("1"));
                    unavailable += 1;
                }
                other => panic!("{other} under load: {}", r.text()),
            }
            i += 1;
        }
        (ok, unavailable)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_redis_stopped_under_load_fails_closed_and_recovers() {
    let _turn = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start("") else {
        return;
    };
    cluster.add_provider_key().await;
    let (_, limited, _) = cluster
        .create_key(&json!({"name": "limited", "rate_limit": {"requests_per_minute": 100000}}))
        .await;
    let (_, unlimited, _) = cluster.create_key(&json!({"name": "free"})).await;
    for i in 0..3 {
        let r = readyz(cluster.addr(i)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json(),
            json!({"status": "ready", "checks": {"store": "ok", "redis": "ok"}})
        );
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader = load(&cluster, &limited, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    cluster.redis.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        let r = post(
            cluster.addr(i),
            "/openai/v1/chat/completions",
            &limited,
            &chat_body(false),
        )
        .await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.error_code(), "rate_limiter_unavailable");
        // A key without limits does not need Redis.
        let r = post(
            cluster.addr(i),
            "/openai/v1/chat/completions",
            &unlimited,
            &chat_body(false),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = readyz(cluster.addr(i)).await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(
            r.json(),
            json!({"status": "unavailable", "checks": {"store": "ok", "redis": "unavailable"}})
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    cluster.redis.restart().expect("restart redis-server");
    let back = poll_until(Duration::from_secs(15), || {
        let addrs: Vec<SocketAddr> = (0..3).map(|i| cluster.addr(i)).collect();
        let key = limited.clone();
        async move {
            for addr in addrs {
                let r = post(addr, "/openai/v1/chat/completions", &key, &chat_body(false)).await;
                if r.status != 200 || readyz(addr).await.status != 200 {
                    return false;
                }
            }
            true
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let (ok, unavailable) = loader.await.unwrap();
    eprintln!(
        "under load: {ok} served, {unavailable} refused 503; every replica back after {back:?}"
    );
    assert!(back.is_some(), "the replicas recover on their own");
    assert!(ok > 0 && unavailable > 0, "{ok} / {unavailable}");
    for i in 0..3 {
        let refused = metric(cluster.addr(i), "vaultgate_rate_limiter_unavailable_total").await;
        assert!(refused > 0, "replica {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_redis_stopped_with_on_error_local_limits_per_replica() {
    let _turn = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start("[redis]\non_error = \"local\"\n") else {
        return;
    };
    cluster.add_provider_key().await;
    let (_, key, _) = cluster
        .create_key(&json!({"name": "limited", "rate_limit": {"requests_per_minute": 5}}))
        .await;
    away_from_a_minute_boundary().await;
    cluster.redis.stop();
    // Each replica now limits on its own, counted from zero.
    for i in 0..3 {
        let mut statuses = Vec::new();
        for _ in 0..8 {
            let r = post(
                cluster.addr(i),
                "/openai/v1/chat/completions",
                &key,
                &chat_body(false),
            )
            .await;
            statuses.push(r.status);
        }
        assert_eq!(
            statuses,
            [200, 200, 200, 200, 200, 429, 429, 429],
            "replica {i}"
        );
        let fallbacks = metric(cluster.addr(i), "vaultgate_rate_limiter_fallbacks_total").await;
        assert!(fallbacks >= 5, "replica {i}: {fallbacks}");
        let warned = cluster.replicas[i]
            .stderr
            .wait_for(Duration::from_secs(5), |l| {
                l.contains("limiting calls per replica") && l.contains("on_error")
            });
        assert!(warned.is_some(), "{}", cluster.replicas[i].stderr.text());
    }
    cluster.redis.restart().expect("restart redis-server");
    // Back on Redis: one count for all replicas again (a fresh Redis starts
    // the window at zero).
    let back = poll_until(Duration::from_secs(15), || {
        let addr = cluster.addr(0);
        let key = key.clone();
        async move {
            readyz(addr).await.status == 200 && {
                let r = post(addr, "/openai/v1/chat/completions", &key, &chat_body(false)).await;
                r.status == 200
            }
        }
    })
    .await;
    assert!(back.is_some(), "recovers on its own");
}

// ---------------------------------------------------------------- promise 4

/// One $0.01 call with `key` on `addr`; its status.
async fn one_call(addr: SocketAddr, key: &str) -> u16 {
    post(addr, "/openai/v1/chat/completions", key, &chat_body(false))
        .await
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_sub_agent_carve_outs_are_conserved_across_replicas() {
    let _turn = SERIAL.lock().await;
    let Some(cluster) = Cluster::start("") else {
        return;
    };
    let (r0, r1, r2) = (cluster.addr(0), cluster.addr(1), cluster.addr(2));
    cluster.add_provider_key().await;
    let (parent_id, parent, _) = create_key(
        r0,
        &cluster.admin,
        &json!({"name": "agent", "budget": {"limit_usd": 0.10, "period": "total"}}),
    )
    .await;
    let child = |name: &str, usd: f64| json!({"name": name, "parent": parent_id, "budget": {"limit_usd": usd, "period": "total"}});
    // Minted by the parent itself, each on another replica.
    let (_, c1, _) = create_key(r1, &parent, &child("c1", 0.04)).await;
    let (_, c2, _) = create_key(r2, &parent, &child("c2", 0.04)).await;
    let too_much = post(r0, "/v1/keys", &parent, &child("c3", 0.04)).await;
    assert_eq!(too_much.status, 402, "{}", too_much.text());
    assert_eq!(too_much.error_code(), "budget_exceeded");
    let (c3_id, _, _) = create_key(r0, &parent, &child("c3", 0.02)).await;
    // All of the parent's budget is carved out: refused on every replica.
    for addr in [r0, r1, r2] {
        assert_eq!(one_call(addr, &parent).await, 402);
    }

    // Each child spends its carve-out exactly, on replicas it was not
    // minted on.
    for (key, replicas) in [(&c1, [r2, r0]), (&c2, [r0, r1])] {
        let mut ok = 0;
        for i in 0..6 {
            match one_call(replicas[i % 2], key).await {
                200 => ok += 1,
                402 => {}
                other => panic!("{other}"),
            }
        }
        assert_eq!(ok, 4, "$0.04 of $0.01 calls");
    }
    assert_eq!(cluster.upstream.calls(), 8);

    // Revoking the unspent child gives its $0.02 back to the parent, which
    // every replica then sees.
    let r = delete(r1, &format!("/v1/keys/{c3_id}"), &cluster.admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let statuses = [
        one_call(r2, &parent).await,
        one_call(r0, &parent).await,
        one_call(r1, &parent).await,
    ];
    assert_eq!(statuses, [200, 200, 402]);
    assert_eq!(cluster.upstream.calls(), 10, "$0.10 in all, never more");
}

// ---------------------------------------------------------------- leaks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leak_database_and_redis_passwords_never_appear_in_output() {
    let _turn = SERIAL.lock().await;
    let db_password = format!("dbCanary{}", random_alnum(20));
    let redis_password = format!("rdCanary{}", random_alnum(20));
    let secrets = Secrets {
        database_password: Some(&db_password),
        redis_password: Some(&redis_password),
        log: Some("debug"),
    };
    let Some(mut cluster) = Cluster::start_with("", &secrets) else {
        return;
    };
    let mut seen = String::new();
    let (r0, r1) = (cluster.addr(0), cluster.addr(1));
    cluster.add_provider_key().await;
    let (id, key, _) = create_key(
        r1,
        &cluster.admin,
        &json!({"name": "limited", "rate_limit": {"requests_per_minute": 1000}}),
    )
    .await;
    let first = post(r0, "/openai/v1/chat/completions", &key, &chat_body(false)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    seen.push_str(&first.everything());
    // Redis fails and comes back: errors are logged (at debug too).
    cluster.redis.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        let addr = cluster.addr(i);
        seen.push_str(
            &post(addr, "/openai/v1/chat/completions", &key, &chat_body(false))
                .await
                .everything(),
        );
        seen.push_str(&readyz(addr).await.everything());
    }
    // A revocation while Redis is down cannot be broadcast: logged.
    seen.push_str(
        &delete(r1, &format!("/v1/keys/{id}"), &cluster.admin)
            .await
            .everything(),
    );
    let out = cluster.cli(&["keys", "list"]);
    seen.push_str(&format!("{out:?}"));
    cluster.redis.restart().expect("restart redis-server");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..3 {
        seen.push_str(&readyz(cluster.addr(i)).await.everything());
        seen.push_str(
            &send(cluster.addr(i), Req::new("GET", "/metrics"))
                .await
                .everything(),
        );
    }
    // Refused starts: a database that does not answer, a bad Redis URL.
    let mut env = cluster.env.clone();
    for (k, v) in &mut env {
        if k == "VAULTGATE_DATABASE_URL" {
            *v = format!("postgres://vaultgate:{db_password}@127.0.0.1:1/vaultgate");
        }
    }
    seen.push_str(&failed_start(env.clone()));
    for (k, v) in &mut env {
        if k == "VAULTGATE_REDIS_URL" {
            *v = format!("http://:{redis_password}@127.0.0.1:1");
        }
    }
    seen.push_str(&failed_start(env));

    let replicas: Vec<String> = cluster
        .replicas
        .iter()
        .map(|r| format!("{}{}", r.stdout.text(), r.stderr.text()))
        .collect();
    assert!(
        replicas
            .iter()
            .any(|t| t.contains("DEBUG") || t.contains("debug")),
        "debug logs were on"
    );
    for (name, secret) in [
        ("database password", &db_password),
        ("redis password", &redis_password),
    ] {
        let forms = encodings(secret);
        assert_absent(name, &seen, &forms);
        for (i, text) in replicas.iter().enumerate() {
            assert_absent(&format!("replica {i}'s output ({name})"), text, &forms);
        }
    }
}

// ---------------------------------------------------------------- audit

/// Promise 8: three replicas append to one chain at once — management
/// changes and denied calls — and `vaultgate audit verify` passes; an
/// edited row is then found and named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_three_replicas_write_one_audit_chain_that_verifies() {
    let _turn = SERIAL.lock().await;
    let Some(cluster) = Cluster::start("") else {
        return;
    };
    let (_, tiny, _) = cluster
        .create_key(&json!({"name": "tiny", "budget": {"limit_usd": 0.001, "period": "total"}}))
        .await;
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let (addr, admin, tiny) = (cluster.addr(i), cluster.admin.clone(), tiny.clone());
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let (id, _, _) =
                        create_key(addr, &admin, &json!({"name": format!("k{i}")})).await;
                    let r = delete(addr, &format!("/v1/keys/{id}"), &admin).await;
                    assert_eq!(r.status, 200, "{}", r.text());
                } else {
                    // Refused for its budget: a `request_denied` entry.
                    assert_eq!(one_call(addr, &tiny).await, 402);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Denials are written by each replica's usage worker in batches.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let ok = cluster.cli(&["audit", "verify"]);
    assert_eq!(ok.code, 0, "{ok:?}");
    let entries: u64 = ok
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{ok:?}"));
    // init's key, tiny, 30 creations and 30 revocations, 30 denials.
    assert!(entries >= 92, "{entries} entries: {ok:?}");

    let url = &cluster
        .env
        .iter()
        .find(|(k, _)| k == "VAULTGATE_DATABASE_URL")
        .unwrap()
        .1;
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let edited = client
        .execute(
            "UPDATE audit_entries SET entry = replace(entry, '\"k4\"', '\"k5\"') \
             WHERE entry LIKE '%\"k4\"%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(edited, 1, "the entry creating k4");
    let bad = cluster.cli(&["audit", "verify"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("entry"), "names the entry: {bad:?}");
}

// ---------------------------------------------------------------- failures

/// Calls `key` on `addr` until `stop` is set, counting 200s; a refusal for
/// the budget (402) is counted apart, anything else but `allowed` fails.
fn calls_on(
    addr: SocketAddr,
    key: &str,
    allowed: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(usize, usize)> {
    let key = key.to_owned();
    tokio::spawn(async move {
        let (mut ok, mut other) = (0, 0);
        while !stop.load(Ordering::SeqCst) {
            let r = post(addr, "/openai/v1/chat/completions", &key, &chat_body(false)).await;
            match r.status {
                200 => ok += 1,
                402 => other += 1,
                503 if r.error_code() == allowed => {
                    assert_eq!(r.header("retry-after"), Some("1"));
                    other += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                s => panic!("{s} from {addr}: {}", r.text()),
            }
        }
        (ok, other)
    })
}

/// Spends what `key` can still spend on the replicas at `addrs`, two
/// callers on each at once, each calling until refused for the budget
/// twice in a row; returns the 200s.
async fn spend_the_rest(addrs: &[SocketAddr], key: &str) -> usize {
    let callers: Vec<_> = addrs
        .iter()
        .chain(addrs)
        .map(|&addr| {
            let key = key.to_owned();
            tokio::spawn(async move {
                let (mut ok, mut refused_in_a_row) = (0, 0);
                while refused_in_a_row < 2 {
                    match one_call(addr, &key).await {
                        200 => {
                            ok += 1;
                            refused_in_a_row = 0;
                        }
                        402 => refused_in_a_row += 1,
                        other => panic!("{other}"),
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for c in callers {
        ok += c.await.unwrap();
    }
    ok
}

/// Promise 5: `kill -9` of one replica mid-load. The others keep serving;
/// within seconds they close its lease — charged at least what its calls
/// spent and hold, its calls in flight at their reservations — and the
/// rest of the lease, held by the dead replica unused, is spendable again
/// long before the lease's own expiry; the cap is spent exactly, never
/// passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_a_replica_killed_mid_load_frees_its_unused_lease_within_seconds() {
    let _turn = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start("") else {
        return;
    };
    cluster.add_provider_key().await;
    const CALLS: u64 = 100;
    let (id, key, _) = cluster
        .create_key(&json!({"name": "agent", "budget": {"limit_usd": 1.0, "period": "total"}}))
        .await;
    let (live, victim) = ([cluster.addr(0), cluster.addr(1)], cluster.addr(2));

    // The victim takes the first lease (a quarter of the budget) with one
    // call, then dies with two more in flight while the others serve.
    assert_eq!(one_call(victim, &key).await, 200);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let serving: Vec<_> = (0..4)
        .map(|i| calls_on(live[i % 2], &key, "", stop.clone()))
        .collect();
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let key = key.clone();
            // The connection is cut mid-call: its task ends in a panic.
            tokio::spawn(async move { one_call(victim, &key).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    cluster.replicas.remove(2).kill9();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let mut after_kill = 0;
    for t in serving {
        after_kill += t.await.expect("the live replicas kept serving").0;
    }
    for t in in_flight {
        let _ = t.await;
    }
    assert!(after_kill > 0);

    // Everything the live replicas can spend while the dead lease holds;
    // then, once it is closed (stale after 5 s, checked every second), the
    // part of it the dead replica never used.
    spend_the_rest(&live, &key).await;
    let before_close = killed.elapsed();
    let mut freed = 0;
    let mut freed_at = None;
    while killed.elapsed() < Duration::from_secs(12) {
        let n = spend_the_rest(&live, &key).await;
        if n > 0 && freed_at.is_none() {
            freed_at = Some(killed.elapsed());
        }
        freed += n;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.stop_replicas();
    let spent = cluster.settled_spend(&id);
    let cap = CALLS * CALL_MICROS;
    eprintln!(
        "{after_kill} calls served in the 200 ms after the kill; the rest spent {before_close:?} \
         after it; {freed} more freed at {freed_at:?}; {} reached the provider, {spent} of {cap} µ$ settled",
        cluster.upstream.calls()
    );
    assert!(
        before_close < Duration::from_secs(5),
        "too slow to tell the closing apart"
    );
    assert!(
        freed >= 5,
        "the dead replica's unused lease was not freed within 12 s ({freed} calls)"
    );
    assert!(spent <= cap, "spent {spent} of {cap}");
    assert!(spent >= cap - CALL_MICROS, "{spent} of {cap} settled");
    assert!(cluster.upstream.calls() as u64 <= CALLS);
}

/// Promise 6: PostgreSQL stopped under load. Calls fail closed with 503
/// `store_unavailable` (never a 500, no replica dies), every call answered
/// 200 is charged, and the replicas recover on their own when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_postgres_stopped_under_load_fails_closed_and_recovers() {
    let _turn = SERIAL.lock().await;
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let Some(redis) = TestRedis::start().expect("start redis-server") else {
        return;
    };
    let mut cluster = Cluster::start_on(&pg, redis, "", &Secrets::default());
    cluster.add_provider_key().await;
    let (id, key, _) = cluster
        .create_key(&json!({"name": "agent", "budget": {"limit_usd": 100.0, "period": "total"}}))
        .await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..6)
        .map(|i| calls_on(cluster.addr(i), &key, "store_unavailable", stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.stop().unwrap();
    let refused = poll_until(Duration::from_secs(5), || async {
        let r = post(
            cluster.addr(0),
            "/openai/v1/chat/completions",
            &key,
            &chat_body(false),
        )
        .await;
        r.status == 503 && r.error_code() == "store_unavailable"
    })
    .await;
    assert!(
        refused.is_some(),
        "no 503 store_unavailable while PostgreSQL was down"
    );
    // The management API fails closed the same way.
    let listed = get(cluster.addr(1), "/v1/keys", &cluster.admin).await;
    assert_eq!(
        (
            listed.status,
            listed.error_code(),
            listed.header("retry-after")
        ),
        (503, "store_unavailable".to_owned(), Some("1")),
        "{}",
        listed.text()
    );
    for i in 0..3 {
        let ready = readyz(cluster.addr(i)).await;
        assert_eq!(ready.status, 503, "{}", ready.text());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.restart().unwrap();
    // Back on every replica without a restart.
    for i in 0..3 {
        let back = poll_until(Duration::from_secs(10), || async {
            one_call(cluster.addr(i), &key).await == 200
        })
        .await;
        assert!(back.is_some(), "replica {i} did not recover");
    }
    stop.store(true, Ordering::SeqCst);
    let mut ok = 0;
    for t in load {
        ok += t.await.expect("only 200 and 503 store_unavailable").0;
    }
    // The recovery probes' three calls, and every call answered 200 during
    // the load, are charged once the replicas have written what waited.
    cluster.stop_replicas();
    let spent = cluster.settled_spend(&id);
    let answered = ok as u64 + 3;
    assert!(
        spent >= answered * CALL_MICROS,
        "{answered} calls answered 200 but only {spent} charged"
    );
    assert_eq!(cluster.upstream.calls() as u64, spent / CALL_MICROS);
}

/// A dashboard form post to replica `i`, from its own origin.
async fn ui_post(
    cluster: &Cluster,
    i: usize,
    path: &str,
    cookie: Option<&str>,
    body: String,
) -> Resp {
    let server = &cluster.replicas[i % cluster.replicas.len()];
    ui_form(server.addr, &server.url(), path, cookie, body).await
}

/// docs/dashboard.md#sessions: a session opened on one replica is the same
/// session on the others (same CSRF token, same project choice), **Sign
/// out** on one ends it on all, and failed sign-ins count across replicas:
/// ten in a minute in all, then 429 on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_a_dashboard_session_is_shared_by_every_replica() {
    let _turn = SERIAL.lock().await;
    let Some(cluster) = Cluster::start("") else {
        return;
    };
    let org = cluster.cli(&[
        "keys",
        "create",
        "--project",
        "*",
        "--scopes",
        "*",
        "--output",
        "json",
    ]);
    assert_eq!(org.code, 0, "{org:?}");
    let org = org.json()["key"].as_str().unwrap().to_owned();
    cluster.cli(&[
        "keys",
        "create",
        "--name",
        "team-a-agent",
        "--project",
        "team-a",
        "--test",
    ]);

    let cookie = ui_sign_in(cluster.addr(0), &cluster.replicas[0].url(), &org).await;
    let page = |i: usize| {
        let cookie = cookie.clone();
        let addr = cluster.addr(i);
        async move { send(addr, Req::new("GET", "/ui/keys").header("cookie", &cookie)).await }
    };
    let first = page(1).await;
    assert_eq!(first.status, 200, "another replica knows the session");
    let csrf = csrf_of(&first.text());
    assert_eq!(csrf.len(), 64);
    assert_eq!(
        csrf_of(&page(2).await.text()),
        csrf,
        "one session, one token"
    );

    // The project chosen on one replica is the one the others show.
    let r = ui_post(
        &cluster,
        1,
        "/ui/project",
        Some(&cookie),
        format!("csrf={csrf}&project=team-a&back=%2Fui%2Fkeys"),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let shown = page(2).await.text();
    assert!(
        shown.contains("<option value=\"team-a\" selected>team-a</option>"),
        "{shown}"
    );
    assert!(shown.contains("team-a-agent"));

    // Signed out on replica 2: gone on 0 and 1 at once.
    let r = ui_post(
        &cluster,
        2,
        "/ui/sign-out",
        Some(&cookie),
        format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.text());
    for i in 0..3 {
        let r = page(i).await;
        assert_eq!(
            r.status, 303,
            "replica {i} still knows a signed-out session"
        );
    }

    // Failed sign-ins from one address, spread over the replicas, inside
    // one one-minute window (the burst takes well under 5 s).
    let into_window = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 60_000;
    if into_window > 55_000 {
        tokio::time::sleep(Duration::from_millis((60_000 - into_window + 200) as u64)).await;
    }
    let mut statuses = Vec::new();
    for attempt in 0..12 {
        let r = ui_post(
            &cluster,
            attempt,
            "/ui/sign-in",
            None,
            "api_key=vpx_live_AAAAAAAAAAAAAAAAAAAAAAAA".to_owned(),
        )
        .await;
        statuses.push(r.status);
    }
    assert_eq!(statuses[..10], [401; 10], "{statuses:?}");
    assert_eq!(statuses[10..], [429, 429], "{statuses:?}");
}
