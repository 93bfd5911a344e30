#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Hostile requests over real HTTP, many as raw bytes: path tricks, host
//! tricks, smuggling, hop-by-hop abuse, tunnels, oversized and hostile bodies,
//! model allowlist bypasses (docs/threat-model.md, E1–E3, E5, F1, F2, F4,
//! G1–G3).

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vault_core::policy::{EndpointRule, ModelGlob, Policy};
use vault_core::provider::Provider;
use vault_tower::RequestLimits;

const CHAT: &str = "/openai/v1/chat/completions";

fn chat_body() -> String {
    json!({"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

/// A chat request as raw bytes, authenticated with `key`.
fn authed(method: &str, target: &str, key: &str, extra: &[(&str, &str)], body: &str) -> Vec<u8> {
    let auth = format!("Bearer {key}");
    let mut headers = vec![
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    raw_request(method, target, &headers, body)
}

// docs/threat-model.md, E1, E2
#[tokio::test]
async fn smuggling_path_tricks_are_400_and_never_forwarded() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, _) = gw
        .key_with(Policy {
            endpoints: Some(vec![
                EndpointRule::parse("POST /v1/chat/completions").unwrap(),
            ]),
            ..open_policy()
        })
        .await;
    let paths = [
        "/openai/v1/chat/completions/../../v1/files",
        "/openai/v1/./chat/completions",
        "/openai//v1/chat/completions",
        "//openai/v1/chat/completions",
        "/openai/v1/chat/completions/",
        "/openai/v1/chat%2Fcompletions",
        "/openai/v1/chat%2fcompletions",
        "/openai/v1/%2e%2e/v1/files",
        "/openai/%2e%2e/anthropic/v1/messages",
        "/openai/v1/chat%252fcompletions",
        "/openai/v1/chat/completions%00",
        "/openai/v1/chat/%c0%af",
        "/openai/v1/chat%5ccompletions",
        "/openai/../anthropic/v1/messages",
        "/openai%2F..%2Fanthropic/v1/messages",
        "/OpenAI/v1/chat/completions",
        "/unknown/v1/chat/completions",
        "/openai",
    ];
    for path in paths {
        let resp = raw(gw.addr, &authed("POST", path, &key, &[], &chat_body())).await;
        assert_eq!(raw_status(&resp), 400, "{path}: {resp}");
        assert!(resp.contains("invalid_request"), "{path}: {resp}");
        assert!(
            resp.to_ascii_lowercase().contains("x-ratelimit-limit"),
            "{path}"
        );
    }
    // Bytes hyper itself refuses in a request target are a 400 too.
    for path in [
        "/openai/v1\\chat\\completions",
        "/openai/v1/chat/completions\u{ff0f}x",
    ] {
        let resp = raw(gw.addr, &authed("POST", path, &key, &[], &chat_body())).await;
        assert_eq!(raw_status(&resp), 400, "{path}: {resp}");
    }
    // A path that only looks like the allowed one is outside the allowlist.
    for path in [
        "/openai/v1/chat/completions;x=1",
        "/openai/V1/Chat/Completions",
    ] {
        let resp = raw(gw.addr, &authed("POST", path, &key, &[], &chat_body())).await;
        assert_eq!(raw_status(&resp), 403, "{path}: {resp}");
        assert!(resp.contains("endpoint_not_allowed"), "{path}: {resp}");
    }
    assert_eq!(up.count(), 0, "a hostile path reached the upstream");

    // An allowed path is forwarded byte for byte, never decoded or re-encoded.
    let open_key = gw.key().await;
    for (path, upstream) in [
        (
            "/google/v1beta/models/gemini-2.0-flash:generateContent?alt=json&x=%2F",
            "/v1beta/models/gemini-2.0-flash:generateContent?alt=json&x=%2F",
        ),
        (
            "/openai/v1/files/file-abc%2D1?purpose=a%20b",
            "/v1/files/file-abc%2D1?purpose=a%20b",
        ),
        ("/anthropic/v1/messages?beta=true", "/v1/messages?beta=true"),
    ] {
        up.clear();
        let body = if path.starts_with("/google") {
            json!({"contents": []}).to_string()
        } else {
            chat_body()
        };
        let resp = raw(gw.addr, &authed("POST", path, &open_key, &[], &body)).await;
        assert_eq!(raw_status(&resp), 200, "{path}: {resp}");
        let got = up.only();
        assert_eq!(got.target, upstream);
        assert_eq!(got.body, body, "the body is forwarded unchanged");
    }
}

// docs/threat-model.md, E3, E4
#[tokio::test]
async fn smuggling_client_cannot_choose_the_upstream_host() {
    let up = MockUpstream::start().await;
    let evil = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;
    let evil_host = evil.addr.to_string();
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                      "api_base": evil.url, "base_url": evil.url, "baseURL": evil.url})
    .to_string();

    // Absolute-form target naming another host, with a matching Host header.
    let absolute = format!("http://{evil_host}{CHAT}");
    let mut req = format!(
        "POST {absolute} HTTP/1.1\r\nHost: {evil_host}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         X-Forwarded-Host: {evil_host}\r\nX-Forwarded-Proto: http\r\nForwarded: host={evil_host}\r\nConnection: close\r\n"
    );
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let resp = raw(gw.addr, req.as_bytes()).await;
    assert_eq!(raw_status(&resp), 200, "{resp}");

    // Origin-form with hostile Host headers.
    let resp = raw(
        gw.addr,
        &authed(
            "POST",
            CHAT,
            &key,
            &[
                ("X-Forwarded-Host", &evil_host),
                ("X-Forwarded-For", "10.0.0.1"),
                ("Forwarded", "host=evil.example"),
            ],
            &body,
        ),
    )
    .await;
    assert_eq!(raw_status(&resp), 200, "{resp}");

    assert_eq!(evil.count(), 0, "the client steered the upstream");
    let got = up.requests();
    assert_eq!(got.len(), 2);
    for r in got {
        assert_eq!(r.target, "/v1/chat/completions");
        assert_eq!(r.header("host"), Some(up.addr.to_string().as_str()));
        for h in [
            "x-forwarded-host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "forwarded",
        ] {
            assert!(r.headers.get(h).is_none(), "{h} was forwarded");
        }
        // Body fields pass through untouched but are never honoured.
        assert_eq!(r.body, body);
    }
}

// docs/threat-model.md, F1
#[tokio::test]
async fn smuggling_ambiguous_framing_is_refused_by_hyper() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;
    let body = chat_body();
    let head = |framing: &str| {
        format!(
            "POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n{framing}\r\n"
        )
    };
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let cases = [
        (
            "duplicate differing CL",
            format!(
                "{}{body}",
                head(&format!(
                    "Content-Length: {}\r\nContent-Length: {}\r\n",
                    body.len(),
                    body.len() + 1
                ))
            ),
        ),
        (
            "CL list",
            format!(
                "{}{body}",
                head(&format!("Content-Length: {}, 5\r\n", body.len()))
            ),
        ),
        (
            "CL not a number",
            format!("{}{body}", head("Content-Length: +12\r\n")),
        ),
        (
            "TE xchunked",
            format!("{}{chunked}", head("Transfer-Encoding: xchunked\r\n")),
        ),
        (
            "TE chunked, gzip",
            format!("{}{chunked}", head("Transfer-Encoding: chunked, gzip\r\n")),
        ),
        (
            "TE on HTTP/1.0",
            format!(
                "{}{chunked}",
                head("Transfer-Encoding: chunked\r\n").replacen("HTTP/1.1", "HTTP/1.0", 1)
            ),
        ),
    ];
    for (name, req) in cases {
        let resp = raw(gw.addr, req.as_bytes()).await;
        let status = raw_status(&resp);
        assert!(matches!(status, 400 | 501), "{name}: {resp}");
    }
    assert_eq!(up.count(), 0, "an ambiguously framed request was forwarded");

    // CL and TE together, the classic CL.TE desync: hyper reads the body as
    // chunked (RFC 9112 §6.3), drops the Content-Length and closes the
    // connection after answering, so the bytes after the chunked body are
    // never read as a second request. (hyper removes the Content-Length
    // before the layer sees the request, so the layer cannot refuse it.)
    let smuggled = raw_request("POST", CHAT, &[("Content-Type", "application/json")], &body);
    let smuggled = String::from_utf8(smuggled).unwrap();
    let mut req = head(&format!(
        "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
        5
    ));
    req.push_str(&chunked);
    req.push_str(&smuggled);
    let resp = raw(gw.addr, req.as_bytes()).await;
    let status = raw_status(&resp);
    if status != 400 {
        assert_eq!(status, 200, "{resp}");
        assert_eq!(
            resp.matches("HTTP/1.1 ").count(),
            1,
            "a smuggled request was answered: {resp}"
        );
        assert!(
            resp.to_ascii_lowercase().contains("connection: close"),
            "{resp}"
        );
        let got = up.only();
        assert_eq!(
            got.body, body,
            "the upstream body is the chunked body actually sent"
        );
        assert!(got.headers.get("transfer-encoding").is_none());
        assert_eq!(
            got.header("content-length"),
            Some(body.len().to_string().as_str())
        );
        up.clear();
    }

    // A second request pipelined behind the first is its own request: it
    // does not ride on the first one's key, and its bytes never become part
    // of the first one's upstream body.
    let mut pipelined = authed("POST", CHAT, &key, &[], &body);
    // `authed` adds Connection: close; keep the connection open instead.
    pipelined = replace_once(pipelined, "Connection: close\r\n", "");
    pipelined.extend_from_slice(&raw_request(
        "POST",
        CHAT,
        &[("Content-Type", "application/json")],
        &body,
    ));
    let resp = raw(gw.addr, &pipelined).await;
    let statuses: Vec<u16> = resp
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| resp[i + 9..i + 12].parse().unwrap())
        .collect();
    assert_eq!(statuses, [200, 401], "{resp}");
    assert_eq!(up.only().body, body);
}

// docs/threat-model.md, F2
#[tokio::test]
async fn smuggling_connection_named_headers_cannot_strip_the_injected_credential() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;
    let cases = [
        (
            Provider::OpenAi,
            CHAT,
            "authorization",
            "close, authorization",
        ),
        (
            Provider::Anthropic,
            "/anthropic/v1/messages",
            "x-api-key",
            "close, x-api-key, anthropic-version",
        ),
        (
            Provider::Google,
            "/google/v1beta/models/gemini-2.0-flash:generateContent",
            "x-goog-api-key",
            "x-goog-api-key, close",
        ),
    ];
    for (provider, path, header, connection) in cases {
        up.clear();
        let body = if provider == Provider::Google {
            json!({"contents": []}).to_string()
        } else {
            chat_body()
        };
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {key}\r\nConnection: {connection}\r\nTE: trailers\r\n\
             Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let resp = raw(gw.addr, req.as_bytes()).await;
        assert_eq!(raw_status(&resp), 200, "{provider}: {resp}");
        let got = up.only();
        let canary = gw.canary(provider);
        let injected = got
            .header(header)
            .unwrap_or_else(|| panic!("{provider}: {header} was stripped"));
        assert!(injected.ends_with(&canary), "{provider}: {injected}");
        if provider == Provider::Anthropic {
            assert_eq!(got.header("anthropic-version"), Some("2023-06-01"));
        }
        for h in ["te", "keep-alive", "proxy-connection"] {
            assert!(
                got.headers.get(h).is_none(),
                "{provider}: {h} was forwarded"
            );
        }
        assert!(
            got.header("connection").is_none_or(|c| !c.contains(header)),
            "{provider}"
        );
    }

    // Protocol switches are refused, never tunnelled.
    up.clear();
    for (upgrade, connection) in [("h2c", "Upgrade, HTTP2-Settings"), ("websocket", "Upgrade")] {
        let req = authed(
            "POST",
            CHAT,
            &key,
            &[
                ("Upgrade", upgrade),
                ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
                ("Sec-WebSocket-Key", "x3JJHMbDL1EzLkh9GBhXDw=="),
            ],
            &chat_body(),
        );
        let req = replace_once(
            req,
            "Connection: close",
            &format!("Connection: close, {connection}"),
        );
        let resp = raw(gw.addr, &req).await;
        assert_eq!(raw_status(&resp), 405, "{upgrade}: {resp}");
        assert!(!resp.contains("101 Switching"), "{resp}");
    }
    assert_eq!(up.count(), 0);
}

/// Replaces the first occurrence of `from` in raw request bytes.
fn replace_once(req: Vec<u8>, from: &str, to: &str) -> Vec<u8> {
    String::from_utf8(req)
        .unwrap()
        .replacen(from, to, 1)
        .into_bytes()
}

// docs/threat-model.md, F4
#[tokio::test]
async fn smuggling_connect_and_trace_are_405() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;
    let connect = format!(
        "CONNECT {}:443 HTTP/1.1\r\nHost: {}:443\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n",
        up.addr.ip(),
        up.addr.ip()
    );
    let resp = raw(gw.addr, connect.as_bytes()).await;
    assert_eq!(raw_status(&resp), 405, "CONNECT: {resp}");
    assert!(resp.contains("method_not_allowed"), "{resp}");
    let resp = raw(gw.addr, &authed("TRACE", CHAT, &key, &[], "")).await;
    assert_eq!(raw_status(&resp), 405, "TRACE: {resp}");
    assert!(resp.contains("x-ratelimit-limit"), "{resp}");
    assert_eq!(up.count(), 0);
}

// docs/threat-model.md, G1
#[tokio::test]
async fn boundary_oversized_bodies_are_413() {
    let up = MockUpstream::start().await;
    let mut opts = GatewayOptions::all_at(&up.url);
    opts.limits = RequestLimits {
        max_body_bytes: 64 << 10,
        body_timeout: Duration::from_secs(5),
    };
    let gw = Gateway::with(opts).await;
    gw.add_provider_key(Provider::OpenAi).await;
    let key = gw.key().await;

    // A declared length over the limit is refused before any body is sent.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        100 << 20
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = within("a 413 before the body", stream.read(&mut buf))
        .await
        .unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert_eq!(raw_status(&resp), 413, "{resp}");
    assert!(resp.contains("request_too_large"), "{resp}");
    drop(stream);

    // A chunked body crossing the limit mid-stream.
    let mut req = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    let piece = "a".repeat(16 << 10);
    for _ in 0..8 {
        req.extend_from_slice(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(gw.addr, &req).await;
    assert_eq!(raw_status(&resp), 413, "{resp}");

    // Just under the limit is read (and refused only as non-JSON).
    let resp = raw(
        gw.addr,
        &authed("POST", CHAT, &key, &[], &"a".repeat((64 << 10) - 1)),
    )
    .await;
    assert_eq!(raw_status(&resp), 400, "{resp}");
    assert_eq!(up.count(), 0);
}

// docs/threat-model.md, G2, G3, E5
#[tokio::test]
async fn smuggling_hostile_json_and_model_tricks_are_refused() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let (key, _) = gw
        .key_with(Policy {
            models: Some(vec![ModelGlob::parse("gpt-4o-mini").unwrap()]),
            ..open_policy()
        })
        .await;
    let deep = format!(
        "{{\"model\":\"gpt-4o-mini\",\"x\":{}}}",
        "[".repeat(100_000)
    );
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("100,000 nested [", deep, 400, "invalid_request"),
        (
            "max_tokens as a string",
            r#"{"model":"gpt-4o-mini","max_tokens":"100"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            "negative max_tokens",
            r#"{"model":"gpt-4o-mini","max_tokens":-1}"#.into(),
            400,
            "invalid_request",
        ),
        (
            "max_tokens 1e400",
            r#"{"model":"gpt-4o-mini","max_tokens":1e400}"#.into(),
            400,
            "invalid_request",
        ),
        (
            "duplicate model",
            r#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            "not an object",
            r#"["gpt-4o-mini"]"#.into(),
            400,
            "invalid_request",
        ),
        (
            "missing model",
            r#"{"messages":[]}"#.into(),
            400,
            "invalid_request",
        ),
        (
            "other model",
            r#"{"model":"gpt-4o"}"#.into(),
            403,
            "model_not_allowed",
        ),
        (
            "upper case",
            r#"{"model":"GPT-4O-MINI"}"#.into(),
            403,
            "model_not_allowed",
        ),
        (
            "leading space",
            r#"{"model":" gpt-4o-mini"}"#.into(),
            403,
            "model_not_allowed",
        ),
        (
            "model as a number",
            r#"{"model":4}"#.into(),
            400,
            "invalid_request",
        ),
    ];
    for (name, body, status, code) in &cases {
        let resp = raw(gw.addr, &authed("POST", CHAT, &key, &[], body)).await;
        assert_eq!(raw_status(&resp), *status, "{name}: {resp}");
        assert!(resp.contains(code), "{name}: {resp}");
    }
    // Invalid UTF-8 in the body.
    let mut req = authed(
        "POST",
        CHAT,
        &key,
        &[],
        "{\"model\":\"gpt-4o-mini\",\"x\":\"..\"}",
    );
    let n = req.len();
    req[n - 3] = 0xff;
    req[n - 4] = 0xfe;
    let resp = raw(gw.addr, &req).await;
    assert_eq!(raw_status(&resp), 400, "invalid UTF-8: {resp}");
    // Compressed bodies are never inspected as JSON (docs/threat-model.md, G3).
    let resp = raw(
        gw.addr,
        &authed(
            "POST",
            CHAT,
            &key,
            &[("Content-Encoding", "gzip")],
            "\u{1f}\u{8b}compressed",
        ),
    )
    .await;
    assert!(matches!(raw_status(&resp), 400 | 415), "gzip: {resp}");
    // A Google path model that conflicts with the body.
    let resp = raw(
        gw.addr,
        &authed(
            "POST",
            "/google/v1beta/models/gemini-2.0-flash:generateContent",
            &key,
            &[],
            r#"{"model":"gemini-2.5-pro","contents":[]}"#,
        ),
    )
    .await;
    assert_eq!(raw_status(&resp), 400, "path/body model conflict: {resp}");
    assert_eq!(up.count(), 0, "a hostile body reached the upstream");

    // The model is compared as the provider decodes it: an escaped `-` is
    // still gpt-4o-mini, and the bytes go upstream as sent.
    let escaped = r#"{"model":"gpt-4o\u002dmini","max_tokens":5}"#;
    let resp = raw(gw.addr, &authed("POST", CHAT, &key, &[], escaped)).await;
    assert_eq!(raw_status(&resp), 200, "{resp}");
    assert_eq!(up.only().body, escaped);
}
