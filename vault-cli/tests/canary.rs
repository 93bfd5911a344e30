//! docs/threat-model.md, C1: a canary sweep over everything the real binary
//! writes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

/// docs/threat-model.md, C1 (with C5, C7): plant `sk-CANARY-<random>` and drive
/// success, denials, upstream 500, an upstream that echoes the credential, a
/// client disconnect and CLI errors. Neither the provider key nor any virtual
/// key appears — raw, hex, base64 or percent-encoded — in the server's TRACE
/// log, any response, the audit file, `usage --output json` or CLI output; no
/// virtual key's SHA-256 appears in client-facing output.
#[tokio::test]
async fn leak_canary_sweep_across_logs_responses_audit_and_cli() {
    let upstream = MockUpstream::start();
    let dir = tempdir();
    write_config(dir.path(), &["openai", "anthropic"], &upstream.url(), "");
    let server = Server::start_with(
        dir.path(),
        ServerOptions {
            env: vec![("VAULTGATE_LOG".to_owned(), "trace".to_owned())],
        },
    );
    let (addr, admin) = (server.addr, server.admin().to_owned());
    let canary = format!("sk-CANARY-{}", random_alnum(32));

    // Client-visible output, in order. Create responses (where a key is
    // shown once, by design) are kept apart.
    let mut seen: Vec<String> = Vec::new();
    let mut created: Vec<(String, String)> = Vec::new(); // (key, its create response)

    let r = post(
        addr,
        "/v1/provider-keys",
        &admin,
        &json!({"provider": "openai", "api_key": canary, "name": "canary"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    seen.push(r.everything());
    let mut new_key = async |body: serde_json::Value| {
        let r = post(addr, "/v1/keys", &admin, &body).await;
        assert_eq!(r.status, 201, "{}", r.text());
        let key = r.json()["key"].as_str().unwrap().to_owned();
        created.push((key.clone(), r.everything()));
        (r.json()["id"].as_str().unwrap().to_owned(), key)
    };
    let (_, v) = new_key(json!({
        "name": "canary-agent", "permissions": ["chat:write", "usage:read"],
        "providers": ["openai"], "endpoints": ["POST /v1/chat/completions"],
        "models": ["gpt-4o-mini"], "budget": {"limit_usd": 10}, "max_request_chars": 2000
    }))
    .await;
    let (_, slow) =
        new_key(json!({"name": "slow", "rate_limit": {"requests_per_minute": 1}})).await;
    let (_, broke) = new_key(json!({"name": "broke", "budget": {"limit_usd": 0}})).await;
    let (gone_id, gone) = new_key(json!({"name": "gone"})).await;

    let chat_body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20});
    let mut flip = v.clone();
    let last = flip.pop().unwrap();
    flip.push(if last == 'A' { 'B' } else { 'A' });
    let mut expect = |r: Resp, status: u16| {
        assert_eq!(r.status, status, "{}", r.everything());
        seen.push(r.everything());
    };

    // Success, by header and by ?key=.
    expect(chat(addr, &v, "gpt-4o-mini").await, 200);
    let path = format!("/openai/v1/chat/completions?key={v}&trace=1");
    expect(
        send(addr, Req::new("POST", &path).json(&chat_body)).await,
        200,
    );
    // Denials: each code the key can run into.
    expect(chat(addr, &v, "gpt-4o").await, 403);
    expect(
        post(
            addr,
            "/openai/v1/embeddings",
            &v,
            &json!({"model": "gpt-4o-mini", "input": "x"}),
        )
        .await,
        403,
    );
    expect(
        post(
            addr,
            "/anthropic/v1/messages",
            &v,
            &json!({"model": "claude-3-5-haiku-latest", "max_tokens": 5, "messages": []}),
        )
        .await,
        403,
    );
    let long = json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    expect(
        post(addr, "/openai/v1/chat/completions", &v, &long).await,
        413,
    );
    expect(
        send(
            addr,
            Req::new("POST", "/openai/v1/chat/completions")
                .bearer(&v)
                .raw("{not json"),
        )
        .await,
        400,
    );
    expect(
        post(addr, "/skynet/v1/chat/completions", &v, &chat_body).await,
        400,
    );
    expect(chat(addr, &flip, "gpt-4o-mini").await, 401);
    let path = format!("/openai/v1/chat/completions?key={flip}");
    expect(
        send(addr, Req::new("POST", &path).json(&chat_body)).await,
        401,
    );
    expect(
        send(
            addr,
            Req::new("POST", "/openai/v1/chat/completions")
                .bearer(&v)
                .header("x-api-key", &flip)
                .json(&chat_body),
        )
        .await,
        401,
    );
    expect(
        send(
            addr,
            Req::new("POST", "/openai/v1/chat/completions")
                .header("authorization", &format!("bearer {v}"))
                .json(&chat_body),
        )
        .await,
        401,
    );
    expect(chat(addr, &slow, "gpt-4o-mini").await, 200);
    expect(chat(addr, &slow, "gpt-4o-mini").await, 429);
    expect(chat(addr, &broke, "gpt-4o-mini").await, 402);
    expect(
        delete(addr, &format!("/v1/keys/{gone_id}"), &admin).await,
        200,
    );
    expect(chat(addr, &gone, "gpt-4o-mini").await, 401);
    expect(get(addr, "/v1/keys", &v).await, 403);
    expect(get(addr, "/v1/usage", &v).await, 200);
    expect(get(addr, "/v1/provider-keys", &admin).await, 200);
    expect(get(addr, "/v1/keys", &admin).await, 200);
    expect(get(addr, "/metrics", "").await, 200);

    // Upstream failures: a 500, and an upstream that echoes the credential
    // in its headers and body (C5).
    upstream.set(Behaviour::ServerError);
    expect(chat(addr, &v, "gpt-4o-mini").await, 500);
    upstream.set(Behaviour::EchoCredential);
    let r = chat(addr, &v, "gpt-4o-mini").await;
    for h in [
        "authorization",
        "x-api-key",
        "x-goog-api-key",
        "set-cookie",
        "location",
    ] {
        assert!(r.header(h).is_none(), "{h} passed through: {}", r.head);
    }
    expect(r, 401);
    // A client that hangs up mid-stream.
    upstream.set(Behaviour::SlowStream);
    let head = send_and_hang_up(
        addr,
        Req::new("POST", "/openai/v1/chat/completions")
            .bearer(&v)
            .json(&json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]})),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    seen.push(head);
    upstream.set(Behaviour::Ok);
    // The upstream only ever saw the injected credential, never a virtual key.
    let upstream_saw = format!("{:?}", upstream.seen());
    assert!(upstream_saw.contains(&canary));
    for (key, _) in &created {
        assert_absent("what the upstream received", &upstream_saw, &encodings(key));
    }

    // CLI errors and reports, on the data directory and against the server.
    let url = server.url();
    let mut cli_out: Vec<String> = Vec::new();
    let mut run = |args: &[&str], stdin: Option<&str>, env: &[(&str, &str)], ok: bool| {
        let out = cli_with(dir.path(), args, stdin, env);
        assert_eq!(out.code == 0, ok, "{args:?}: {out:?}");
        cli_out.push(format!("{}\n{}", out.stdout, out.stderr));
    };
    run(
        &[
            "provider-keys",
            "add",
            "--provider",
            "openai",
            "--api-key",
            &canary,
        ],
        None,
        &[],
        false,
    );
    run(
        &["provider-keys", "add", "--provider", "openai", &canary],
        None,
        &[],
        false,
    );
    run(
        &["provider-keys", "add", "--provider", "nope"],
        Some(&canary),
        &[],
        false,
    );
    run(
        &[
            "provider-keys",
            "add",
            "--provider",
            "openai",
            "--from-env",
            "NOT_SET",
        ],
        None,
        &[],
        false,
    );
    run(
        &["--url", &url, "keys", "list"],
        None,
        &[("VAULTGATE_ADMIN_KEY", &v)],
        false,
    );
    run(
        &["--url", &url, "keys", "list"],
        None,
        &[("VAULTGATE_ADMIN_KEY", &flip)],
        false,
    );
    run(
        &["--url", &url, "provider-keys", "list", "--output", "json"],
        None,
        &[("VAULTGATE_ADMIN_KEY", &admin)],
        true,
    );
    run(&["keys", "show", "key_doesnotexist"], None, &[], false);
    run(&["keys", "list", "--output", "json"], None, &[], true);
    run(&["provider-keys", "list"], None, &[], true);
    run(&["audit", "tail", "--output", "json"], None, &[], true);

    // Stop the server gracefully so every usage row and log line is out.
    let stderr = server.stderr.clone();
    let status = server.terminate(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "graceful exit: {status:?}"
    );
    let usage = cli(dir.path(), &["usage", "--output", "json"]);
    assert_eq!(usage.code, 0, "{usage:?}");
    assert!(
        usage.json()["data"].as_array().unwrap().len() >= 10,
        "{}",
        usage.stdout
    );
    cli_out.push(format!("{}\n{}", usage.stdout, usage.stderr));
    let log = stderr.text();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the log ran at TRACE"
    );
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("request.denied") || audit.contains("denied"),
        "{audit}"
    );

    let client_facing = format!("{}\n{}", seen.join("\n"), cli_out.join("\n"));
    let everything = format!("{client_facing}\n{log}\n{audit}");
    assert_absent("the sweep (provider key)", &everything, &encodings(&canary));
    for (i, (key, own_create_response)) in created.iter().enumerate() {
        assert_absent("the sweep (virtual key)", &everything, &encodings(key));
        assert_absent(
            "client-facing output (key hash)",
            &client_facing,
            &sha256_hex(key),
        );
        // No other create response shows this key either.
        for (j, (_, other)) in created.iter().enumerate() {
            if i != j {
                assert_absent("another create response", other, &encodings(key));
            }
        }
        assert_absent(
            "a create response (provider key)",
            own_create_response,
            &encodings(&canary),
        );
        assert_absent(
            "a create response (key hash)",
            own_create_response,
            &sha256_hex(key),
        );
    }
    assert_absent("the server log (key hash)", &log, &sha256_hex(&v));
}

/// What the hostile upstream of [`leak_canary_sweep_covers_timeouts_cut_streams_and_malformed_sse`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hostile {
    /// Reads the request and never answers.
    Hang,
    /// A JSON 200 announcing 400 bytes, then closes after 30.
    CutJson,
    /// An SSE 200: two events, then closes mid-event without the last chunk.
    CutSse,
    /// An SSE 200: one event, then silence (the idle timeout ends it).
    SilentSse,
    /// An SSE 200 full of malformed events, properly terminated.
    MalformedSse,
}

/// Malformed SSE: bad JSON, comments, odd line endings, a NUL, a 70 kB
/// line, hostile usage values, and `[DONE]`.
fn malformed_sse_events() -> Vec<String> {
    vec![
        "data: {not json\n\n".to_owned(),
        ":only a comment\n\n".to_owned(),
        "data:{\"usage\":{\"prompt_tokens\":\"many\"}}\r\n\r\n".to_owned(),
        "event: \u{0}weird\ndata: [1,2\n\n".to_owned(),
        format!("data: {}\n\n", "x".repeat(70_000)),
        "\r\r\r".to_owned(),
        "data: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}],\"usage\":{\"prompt_tokens\":-5,\"completion_tokens\":1e400}}\n\n".to_owned(),
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":{\"a\":1}}}\n\n".to_owned(),
        "data: [DONE]\n\n".to_owned(),
    ]
}

/// An upstream on loopback that misbehaves as told; records the headers of
/// every request it reads.
struct HostileUpstream {
    addr: std::net::SocketAddr,
    mode: std::sync::Arc<std::sync::Mutex<Hostile>>,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl HostileUpstream {
    fn start() -> HostileUpstream {
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Hostile::Hang));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (m, h) = (mode.clone(), heads.clone());
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
                    let (m, h) = (m.clone(), h.clone());
                    tokio::spawn(async move {
                        let _ = hostile_answer(stream, m, h).await;
                    });
                }
            });
        });
        HostileUpstream { addr, mode, heads }
    }

    fn set(&self, mode: Hostile) {
        *self.mode.lock().unwrap() = mode;
    }
}

async fn hostile_answer(
    mut stream: tokio::net::TcpStream,
    mode: std::sync::Arc<std::sync::Mutex<Hostile>>,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // One request per connection: read its head and Content-Length body.
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
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
    let len: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + 4 + len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    heads.lock().unwrap().push(head);
    let sse_head =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len()).into_bytes();
    let event = |text: &str| {
        format!(
            "data: {}\n\n",
            json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
                   "choices": [{"index": 0, "delta": {"content": text}}]})
        )
    };
    let m = *mode.lock().unwrap();
    match m {
        Hostile::Hang => std::future::pending::<()>().await,
        Hostile::CutJson => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n{\"id\":\"chatcmpl-cut\",\"choices\":[")
                .await?;
        }
        Hostile::CutSse => {
            stream.write_all(sse_head).await?;
            stream.write_all(&chunk(&event("one"))).await?;
            stream.write_all(&chunk(&event("two"))).await?;
            // Half an event, inside a chunk that never completes.
            stream.write_all(b"40\r\ndata: {\"choi").await?;
        }
        Hostile::SilentSse => {
            stream.write_all(sse_head).await?;
            stream.write_all(&chunk(&event("then silence"))).await?;
            std::future::pending::<()>().await;
        }
        Hostile::MalformedSse => {
            stream.write_all(sse_head).await?;
            for e in malformed_sse_events() {
                stream.write_all(&chunk(&e)).await?;
            }
            stream.write_all(b"0\r\n\r\n").await?;
        }
    }
    stream.flush().await?;
    // Closing here cuts whatever was announced but not sent.
    Ok(())
}

/// Sends a request on a fresh connection and returns every byte the client
/// received, however the connection ended (a cut body may end in a reset).
async fn raw_exchange(
    addr: std::net::SocketAddr,
    path: &str,
    key: &str,
    body: &serde_json::Value,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no end of response within 20 s");
    String::from_utf8_lossy(&out).into_owned()
}

/// docs/threat-model.md, C1, the remaining sources: an upstream that hangs
/// until the response timeout, JSON and SSE bodies cut mid-way, an SSE stream
/// that goes silent past the idle timeout, and malformed SSE, through the
/// OpenAI and Anthropic routes (two usage formats). Neither the provider key
/// nor the virtual keys appear in any encoding in the server's TRACE log, the
/// responses, the audit file or `usage --output json`, and no virtual key's
/// SHA-256 in client-facing output.
#[tokio::test]
async fn leak_canary_sweep_covers_timeouts_cut_streams_and_malformed_sse() {
    let upstream = HostileUpstream::start();
    let dir = tempdir();
    write_config(
        dir.path(),
        &["openai", "anthropic"],
        &format!("http://{}", upstream.addr),
        "[upstream]\nresponse_timeout = \"1s\"\nidle_timeout = \"1s\"\n",
    );
    let server = Server::start_with(
        dir.path(),
        ServerOptions {
            env: vec![("VAULTGATE_LOG".to_owned(), "trace".to_owned())],
        },
    );
    let (addr, admin) = (server.addr, server.admin().to_owned());
    let canary = format!("sk-CANARY-{}", random_alnum(32));
    let anthropic_canary = format!("sk-ant-CANARY-{}", random_alnum(32));
    let mut seen: Vec<String> = Vec::new();
    for (provider, secret) in [("openai", &canary), ("anthropic", &anthropic_canary)] {
        let r = post(
            addr,
            "/v1/provider-keys",
            &admin,
            &json!({"provider": provider, "api_key": secret, "name": "canary"}),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
        seen.push(r.everything());
    }
    let (_, v, _) = create_key(
        addr,
        &admin,
        &json!({"name": "hostile", "permissions": ["chat:write"], "budget": {"limit_usd": 10}}),
    )
    .await;

    let openai = |stream: bool| {
        (
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "stream": stream, "max_tokens": 20,
                   "messages": [{"role": "user", "content": "hi"}]}),
        )
    };
    let anthropic = |stream: bool| {
        (
            "/anthropic/v1/messages",
            json!({"model": "claude-3-5-haiku-latest", "stream": stream, "max_tokens": 20,
                   "messages": [{"role": "user", "content": "hi"}]}),
        )
    };
    let cases = [
        (Hostile::Hang, openai(false), "504"),
        (Hostile::Hang, anthropic(true), "504"),
        (Hostile::CutJson, openai(false), "200"),
        (Hostile::CutSse, openai(true), "200"),
        (Hostile::CutSse, anthropic(true), "200"),
        (Hostile::SilentSse, openai(true), "200"),
        (Hostile::MalformedSse, openai(true), "200"),
        (Hostile::MalformedSse, anthropic(true), "200"),
    ];
    for (mode, (path, body), status) in &cases {
        upstream.set(*mode);
        let started = std::time::Instant::now();
        let got = raw_exchange(addr, path, &v, body).await;
        let status_line = got.lines().next().unwrap_or_default();
        assert!(
            status_line.starts_with(&format!("HTTP/1.1 {status}")),
            "{mode:?} {path}: {got:.300}"
        );
        match mode {
            Hostile::Hang => {
                assert!(got.contains("upstream_timeout"), "{got:.500}");
                assert!(started.elapsed() >= Duration::from_secs(1));
            }
            Hostile::CutSse | Hostile::SilentSse => {
                assert!(got.contains("event: error"), "{mode:?}: {got:.2000}");
            }
            Hostile::MalformedSse => assert!(got.contains("data: {not json"), "{got:.500}"),
            Hostile::CutJson => assert!(!got.contains("\"usage\""), "{got:.500}"),
        }
        seen.push(got);
    }
    // The upstream saw the injected provider keys and never a virtual key.
    let heads = upstream.heads.lock().unwrap().join("\n");
    assert_eq!(upstream.heads.lock().unwrap().len(), cases.len());
    assert!(heads.contains(&canary) && heads.contains(&anthropic_canary));
    assert_absent("what the upstream received", &heads, &encodings(&v));

    let stderr = server.stderr.clone();
    let status = server.terminate(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "graceful exit: {status:?}"
    );
    let usage = cli(dir.path(), &["usage", "--output", "json"]);
    assert_eq!(usage.code, 0, "{usage:?}");
    let rows = usage.json()["data"].as_array().unwrap().len();
    assert_eq!(rows, cases.len(), "{}", usage.stdout);
    let log = stderr.text();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the log ran at TRACE"
    );
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();

    let client_facing = format!("{}\n{}\n{}", seen.join("\n"), usage.stdout, usage.stderr);
    let everything = format!("{client_facing}\n{log}\n{audit}");
    for secret in [&canary, &anthropic_canary, &v] {
        assert_absent("the sweep", &everything, &encodings(secret));
    }
    assert_absent(
        "client-facing output (key hash)",
        &client_facing,
        &sha256_hex(&v),
    );
    assert_absent("the server log (key hash)", &log, &sha256_hex(&v));
}
