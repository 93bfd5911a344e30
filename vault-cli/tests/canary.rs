//! THREATS C1: a canary sweep over everything the real binary writes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

/// THREATS C1 (with C5, C7): plant `sk-CANARY-<random>` and drive success,
/// denials, upstream 500, an upstream that echoes the credential, a client
/// disconnect and CLI errors. Neither the provider key nor any virtual key
/// appears — raw, hex, base64 or percent-encoded — in the server's TRACE
/// log, any response, the audit file, `usage --output json` or CLI output;
/// no virtual key's SHA-256 appears in client-facing output.
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
