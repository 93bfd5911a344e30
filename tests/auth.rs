#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Authentication, credential handling and leak tests over real HTTP
//! (docs/threat-model.md, A1–A5, A7, C3–C5, and the limit headers of
//! docs/api.md#headers).

mod support;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::json;
use support::*;
use vault_core::key::KeyEnv;
use vault_core::manage::CreateKeyRequest;
use vault_core::policy::{ModelGlob, Policy};
use vault_core::provider::Provider;

const CHAT: &str = "/openai/v1/chat/completions";

fn chat_body() -> String {
    json!({"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

/// A body in the shape of the provider `path` addresses (Google names the
/// model in the path, so its body must not name another).
fn body_for(path: &str) -> String {
    if path.starts_with("/google/") {
        json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).to_string()
    } else {
        chat_body()
    }
}

/// Sends a chat request to `path` with exactly these extra headers.
async fn call(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut b = gw
        .req("POST", path)
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(
        gw.addr,
        b.body(Full::new(Bytes::from(body_for(path)))).unwrap(),
    )
    .await
}

// docs/threat-model.md, A1
#[tokio::test]
async fn boundary_missing_or_empty_credential_is_401_missing_api_key() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let cases: [&[(&str, &str)]; 5] = [
        &[],
        &[("authorization", "")],
        &[("authorization", "Bearer")],
        &[("authorization", "Bearer    ")],
        &[("x-api-key", "")],
    ];
    for headers in cases {
        let r = call(&gw, CHAT, headers).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{headers:?}: {}",
            r.text()
        );
        assert_eq!(r.code(), "missing_api_key", "{headers:?}");
        assert_eq!(r.json()["detail"], "Invalid or missing API key");
        r.assert_limit_headers();
    }
    // The same through raw bytes: `Authorization:` with nothing after it.
    let resp = raw(
        gw.addr,
        &raw_request(
            "POST",
            CHAT,
            &[("Authorization", ""), ("Content-Type", "application/json")],
            &chat_body(),
        ),
    )
    .await;
    assert_eq!(raw_status(&resp), 401, "{resp}");
    assert!(resp.contains("missing_api_key"), "{resp}");
    assert_eq!(up.count(), 0);
}

// docs/threat-model.md, A2
#[tokio::test]
async fn boundary_malformed_keys_are_401_never_500() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;
    let mut bad_char = key.clone();
    bad_char.replace_range(key.len() - 1.., "!");
    let cases = [
        format!("Bearer sk-{}", &key[9..]),
        "Bearer vpx_live_short".to_owned(),
        format!("Bearer {key}x"),
        format!("Bearer {bad_char}"),
        format!("bearer {key}"),
        format!("Bearer Bearer {key}"),
        format!("xBearer {key}"),
        format!("Bearer\t{key}"),
        format!("Bearer {key}\tx"),
        format!("Basic {key}"),
        format!("Bearer  {key}"),
    ];
    for auth in &cases {
        let r = call(&gw, CHAT, &[("authorization", auth)]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}: {}", r.text());
        assert_eq!(r.code(), "invalid_api_key", "{auth:?}");
        r.assert_limit_headers();
    }
    // The same malformed values in the other header places.
    for name in ["x-api-key", "x-goog-api-key", "api-key"] {
        let r = call(&gw, CHAT, &[(name, &bad_char)]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{name}");
        assert_eq!(r.code(), "invalid_api_key", "{name}");
    }

    // Bytes no client library sends: non-UTF-8, NUL and other control bytes.
    let mut non_utf8 = raw_request(
        "POST",
        CHAT,
        &[("Content-Type", "application/json")],
        &chat_body(),
    );
    let at = non_utf8.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
    let mut header = b"Authorization: Bearer vpx_live_".to_vec();
    header.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
    header.extend_from_slice(&key.as_bytes()[13..]);
    header.extend_from_slice(b"\r\n");
    non_utf8.splice(at..at, header);
    let resp = raw(gw.addr, &non_utf8).await;
    assert_eq!(raw_status(&resp), 401, "{resp}");
    assert!(resp.contains("invalid_api_key"), "{resp}");

    for control in ["\0", "\x01", "\x7f", "\r"] {
        let value = format!("Bearer {}{control}{}", &key[..12], &key[12..]);
        let resp = raw(
            gw.addr,
            &raw_request("POST", CHAT, &[("Authorization", &value)], &chat_body()),
        )
        .await;
        let status = raw_status(&resp);
        assert!(
            matches!(status, 400 | 401),
            "control byte {control:?}: {resp}"
        );
    }

    // A 64 KiB credential: refused as too large or as invalid, never 500.
    let huge = format!("Bearer vpx_live_{}", "A".repeat(64 * 1024));
    let resp = raw(
        gw.addr,
        &raw_request("POST", CHAT, &[("Authorization", &huge)], &chat_body()),
    )
    .await;
    let status = raw_status(&resp);
    assert!(
        matches!(status, 401 | 431),
        "64 KiB header: {}",
        &resp[..resp.len().min(300)]
    );

    assert_eq!(
        up.count(),
        0,
        "no malformed credential may reach the upstream"
    );
}

// docs/threat-model.md, A3
#[tokio::test]
async fn smuggling_ambiguous_credentials_are_refused() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let k1 = gw.key().await;
    let k2 = gw.key().await;
    let bearer = format!("Bearer {k1}");

    // Both valid and active: neither may be picked.
    for (path, headers) in [
        (
            CHAT.to_owned(),
            vec![
                ("authorization", bearer.as_str()),
                ("x-api-key", k2.as_str()),
            ],
        ),
        (
            CHAT.to_owned(),
            vec![("x-api-key", k1.as_str()), ("x-goog-api-key", k2.as_str())],
        ),
        (
            CHAT.to_owned(),
            vec![("api-key", k1.as_str()), ("x-api-key", k2.as_str())],
        ),
        (
            format!("{CHAT}?key={k2}"),
            vec![("authorization", bearer.as_str())],
        ),
        (format!("{CHAT}?key={k1}&key={k2}"), vec![]),
        (
            CHAT.to_owned(),
            vec![("x-api-key", k1.as_str()), ("x-api-key", k2.as_str())],
        ),
        (
            CHAT.to_owned(),
            vec![
                ("authorization", bearer.as_str()),
                ("authorization", "Bearer other"),
            ],
        ),
    ] {
        let r = call(&gw, &path, &headers).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{path} {headers:?}: {}",
            r.text()
        );
        assert_eq!(r.code(), "invalid_api_key");
        r.assert_limit_headers();
    }
    assert_eq!(up.count(), 0);

    // The same key in two places is one credential.
    let r = call(
        &gw,
        &format!("{CHAT}?key={k1}"),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.count(), 1);
}

// docs/threat-model.md, A4
#[tokio::test]
async fn boundary_cached_key_does_not_admit_a_same_prefix_key() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;
    // Authenticate once, so the record is cached.
    assert_eq!(gw.chat(&key, "gpt-4o-mini").await.status, StatusCode::OK);

    let flip = |i: usize| {
        let mut k = key.clone().into_bytes();
        k[i] = if k[i] == b'a' { b'b' } else { b'a' };
        String::from_utf8(k).unwrap()
    };
    // Same prefix (first 4 characters after the environment), other secret;
    // and the key with one character changed in the middle and at the end.
    let same_prefix = format!("{}{}", &key[..13], "Z".repeat(key.len() - 13));
    for other in [same_prefix, flip(20), flip(key.len() - 1)] {
        assert_ne!(other, key);
        let r = gw.chat(&other, "gpt-4o-mini").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{other}");
        assert_eq!(r.code(), "invalid_api_key");
    }
    assert_eq!(up.count(), 1, "only the genuine key's call went upstream");
}

// docs/threat-model.md, A5
#[tokio::test]
async fn lifecycle_revocation_through_the_admin_api_is_immediate() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let admin = gw.admin_key().await;
    let (key, id) = gw.key_with(open_policy()).await;
    // Hot and cached.
    assert_eq!(gw.chat(&key, "gpt-4o-mini").await.status, StatusCode::OK);

    let revoke = |id: String| {
        gw.req("DELETE", &format!("/v1/keys/{id}"))
            .header("authorization", format!("Bearer {admin}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let r = send(gw.addr, revoke(id.to_string())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = gw.chat(&key, "gpt-4o-mini").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "key_revoked");
    r.assert_limit_headers();

    // Revoking a parent disables its sub-agent key at once.
    let parent = gw
        .create(
            CreateKeyRequest {
                name: Some("parent".into()),
                permissions: Some(vec!["chat:write".into(), "keys:manage".into()]),
                env: Some(KeyEnv::Live),
                ..CreateKeyRequest::default()
            }
            .with_policy(open_policy()),
        )
        .await;
    let child = gw
        .create(
            CreateKeyRequest {
                name: Some("child".into()),
                permissions: Some(vec!["chat:write".into()]),
                env: Some(KeyEnv::Live),
                parent: Some(parent.record.id.clone()),
                ..CreateKeyRequest::default()
            }
            .with_policy(open_policy()),
        )
        .await;
    let child_key = child.key.expose_secret().to_owned();
    assert_eq!(
        gw.chat(&child_key, "gpt-4o-mini").await.status,
        StatusCode::OK
    );
    let r = send(gw.addr, revoke(parent.record.id.to_string())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = gw.chat(&child_key, "gpt-4o-mini").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "key_revoked");
    assert_eq!(
        up.count(),
        2,
        "only the two calls before revocation went upstream"
    );
}

/// The five places a virtual key may arrive in, as (path suffix, header).
fn placements(key: &str) -> Vec<(String, Option<(&'static str, String)>)> {
    vec![
        (
            String::new(),
            Some(("authorization", format!("Bearer {key}"))),
        ),
        (String::new(), Some(("x-api-key", key.to_owned()))),
        (String::new(), Some(("x-goog-api-key", key.to_owned()))),
        (String::new(), Some(("api-key", key.to_owned()))),
        (format!("key={key}"), None),
    ]
}

// docs/threat-model.md, C3
#[tokio::test]
async fn leak_client_credentials_never_go_upstream() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;
    let routes = [
        (Provider::OpenAi, "/openai/v1/chat/completions", ""),
        (Provider::Anthropic, "/anthropic/v1/messages", ""),
        (
            Provider::Google,
            "/google/v1beta/models/gemini-2.0-flash:generateContent",
            "alt=json",
        ),
    ];
    for (provider, path, query) in routes {
        for (extra_query, header) in placements(&key) {
            up.clear();
            let q = [query, extra_query.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("&");
            let target = if q.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{q}")
            };
            let mut headers = vec![
                ("proxy-authorization", "Basic dXNlcjpwYXNz".to_owned()),
                ("cookie", "session=caller-secret-cookie".to_owned()),
            ];
            headers.extend(header.clone());
            let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = call(&gw, &target, &hs).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{provider} {target} {header:?}: {}",
                r.text()
            );

            let got = up.only();
            let canary = gw.canary(provider);
            // Nothing of the caller's reaches the upstream.
            let mut everything = got.target.clone();
            for (k, v) in &got.headers {
                everything.push_str(&format!("\n{k}: {}", v.to_str().unwrap()));
            }
            assert!(
                !everything.contains(&key),
                "the virtual key went upstream: {everything}"
            );
            assert!(!everything.contains("caller-secret-cookie"), "{everything}");
            assert!(!everything.contains("dXNlcjpwYXNz"), "{everything}");
            assert!(got.headers.get("proxy-authorization").is_none());
            assert!(got.headers.get("cookie").is_none());
            assert!(got.headers.get("api-key").is_none());
            assert!(!got.target.contains("key="), "{}", got.target);
            assert_eq!(got.query(), (!query.is_empty()).then_some(query));
            assert_eq!(got.header("host"), Some(up.addr.to_string().as_str()));
            // The provider key, in the provider's own header, and only there.
            match provider {
                Provider::OpenAi => {
                    assert_eq!(
                        got.header("authorization"),
                        Some(format!("Bearer {canary}").as_str())
                    );
                    assert!(got.headers.get("x-api-key").is_none());
                    assert!(got.headers.get("x-goog-api-key").is_none());
                }
                Provider::Anthropic => {
                    assert_eq!(got.header("x-api-key"), Some(canary.as_str()));
                    assert_eq!(got.header("anthropic-version"), Some("2023-06-01"));
                    assert!(got.headers.get("authorization").is_none());
                    assert!(got.headers.get("x-goog-api-key").is_none());
                }
                _ => {
                    assert_eq!(got.header("x-goog-api-key"), Some(canary.as_str()));
                    assert!(got.headers.get("authorization").is_none());
                    assert!(got.headers.get("x-api-key").is_none());
                }
            }
            assert_eq!(
                everything.matches(canary.as_str()).count(),
                1,
                "{everything}"
            );
        }
    }

    // A client's own anthropic-version is kept.
    up.clear();
    let r = call(
        &gw,
        "/anthropic/v1/messages",
        &[("x-api-key", &key), ("anthropic-version", "2024-01-01")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.only().header("anthropic-version"), Some("2024-01-01"));
}

// docs/threat-model.md, C4
#[tokio::test]
async fn smuggling_key_param_removal_is_surgical() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;
    let r = call(&gw, &format!("{CHAT}?a=1&key={key}&b=%26&monkey=2"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.only().target, "/v1/chat/completions?a=1&b=%26&monkey=2");

    // Only the exact, lowercase `key` parameter is a credential.
    up.clear();
    let r = call(
        &gw,
        &format!("{CHAT}?KEY=upper&x=1"),
        &[("authorization", &format!("Bearer {key}"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.only().target, "/v1/chat/completions?KEY=upper&x=1");

    // Google: the client's `key=` is removed, not replaced.
    up.clear();
    let r = call(
        &gw,
        &format!("/google/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key={key}"),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        up.only().target,
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    );
}

// docs/threat-model.md, C5
#[tokio::test]
async fn leak_upstream_echo_of_the_provider_key_never_reaches_the_client() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;
    let echo = |got: &Recorded, status: StatusCode| {
        let sent = got
            .header("authorization")
            .map(|a| a.trim_start_matches("Bearer ").to_owned())
            .or_else(|| got.header("x-api-key").map(str::to_owned))
            .or_else(|| got.header("x-goog-api-key").map(str::to_owned))
            .unwrap();
        Reply::Full {
            status,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("x-goog-api-key".into(), sent.clone()),
                ("authorization".into(), format!("Bearer {sent}")),
                ("x-api-key".into(), sent.clone()),
                ("set-cookie".into(), format!("k={sent}; Path=/")),
                ("location".into(), format!("https://elsewhere.example/?key={sent}")),
                ("x-debug-echo".into(), format!("used {sent}")),
                ("x-request-id".into(), "req_123".into()),
            ],
            body: Bytes::from(
                json!({"error": {"message": format!("Incorrect API key provided: {sent}. Key {sent} is invalid."),
                                 "type": "invalid_request_error", "code": "invalid_api_key"}})
                .to_string(),
            ),
        }
    };
    up.on(move |got| echo(got, StatusCode::UNAUTHORIZED));
    for (provider, path) in [
        (Provider::OpenAi, CHAT),
        (Provider::Anthropic, "/anthropic/v1/messages"),
        (
            Provider::Google,
            "/google/v1beta/models/gemini-2.0-flash:generateContent",
        ),
    ] {
        let r = call(&gw, path, &[("x-api-key", &key)]).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "the upstream's status passes through"
        );
        let all = seen(&r);
        assert_no_secret(&all, &gw.canaries());
        for h in [
            "x-goog-api-key",
            "authorization",
            "x-api-key",
            "set-cookie",
            "location",
            "x-debug-echo",
        ] {
            assert!(
                r.headers.get(h).is_none(),
                "{provider}: {h} reached the client"
            );
        }
        assert_eq!(
            r.header("x-request-id"),
            Some("req_123"),
            "unrelated headers pass"
        );
        let body = r.json();
        let msg = body["error"]["message"].as_str().unwrap();
        assert_eq!(
            msg,
            "Incorrect API key provided: [REDACTED]. Key [REDACTED] is invalid."
        );
        r.assert_limit_headers();
    }

    // An error sent as an event stream, the key split across two chunks.
    up.on(|got| {
        let sent = got
            .header("authorization")
            .unwrap()
            .trim_start_matches("Bearer ")
            .to_owned();
        let (a, b) = sent.split_at(sent.len() / 2);
        Reply::Chunks {
            status: StatusCode::BAD_REQUEST,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            chunks: vec![
                Bytes::from(format!("event: error\ndata: {{\"message\":\"bad key {a}")),
                Bytes::from(format!("{b}\"}}\n\n")),
            ],
        }
    });
    let r = call(&gw, CHAT, &[("x-api-key", &key)]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_no_secret(&seen(&r), &gw.canaries());
    assert_eq!(
        r.text(),
        "event: error\ndata: {\"message\":\"bad key [REDACTED]\"}\n\n"
    );

    // A successful answer echoing the key in headers is cleaned the same way.
    up.on(move |got| echo(got, StatusCode::OK));
    let r = call(&gw, CHAT, &[("x-api-key", &key)]).await;
    assert_eq!(r.status, StatusCode::OK);
    let mut headers_only = r.status.to_string();
    for (k, v) in &r.headers {
        headers_only.push_str(&format!("\n{k}: {}", v.to_str().unwrap()));
    }
    assert_no_secret(&headers_only, &gw.canaries());
}

// docs/api.md#headers: X-RateLimit-* on every proxied response,
// X-Budget-Remaining-USD for budgeted keys (docs/threat-model.md, F3: numeric
// values only).
#[tokio::test]
async fn boundary_every_response_carries_limit_headers() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&up.url).await;
    let key = gw.key().await;

    let ok = gw.chat(&key, "gpt-4o-mini").await;
    assert_eq!(ok.status, StatusCode::OK);
    ok.assert_limit_headers();
    assert_eq!(ok.header("x-ratelimit-limit"), Some("100000"));
    assert_eq!(ok.header("x-ratelimit-remaining"), Some("99999"));

    let unauth = gw
        .chat("vpx_live_000000000000000000000000", "gpt-4o-mini")
        .await;
    assert_eq!(unauth.status, StatusCode::UNAUTHORIZED);
    unauth.assert_limit_headers();

    let (narrow, _) = gw
        .key_with(Policy {
            models: Some(vec![ModelGlob::parse("gpt-4o-mini").unwrap()]),
            ..open_policy()
        })
        .await;
    let denied = gw.chat(&narrow, "gpt-4o").await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.code(), "model_not_allowed");
    denied.assert_limit_headers();

    up.on(|_| Reply::status_json(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "boom"})));
    let failed = gw.chat(&key, "gpt-4o-mini").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    failed.assert_limit_headers();
    up.on(|_| Reply::json(openai_completion("gpt-4o-mini", 10, 5)));

    // Budgeted keys: allowed, denied for lack of budget, denied by the
    // allowlist; every answer says what the budget has left.
    let (budgeted, _) = gw
        .key_with(Policy {
            models: Some(vec![ModelGlob::parse("gpt-4o*").unwrap()]),
            ..budget_policy(1.0)
        })
        .await;
    let ok = gw.chat(&budgeted, "gpt-4o-mini").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    ok.assert_limit_headers();
    let left: f64 = ok
        .header("x-budget-remaining-usd")
        .unwrap()
        .parse()
        .unwrap();
    assert!(left > 0.99 && left < 1.0, "{left}");
    let (broke, _) = gw.key_with(budget_policy(0.0)).await;
    let none_left = gw.chat(&broke, "gpt-4o-mini").await;
    assert_eq!(
        none_left.status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        none_left.text()
    );
    assert_eq!(none_left.code(), "budget_exceeded");
    none_left.assert_limit_headers();
    assert_eq!(none_left.header("x-budget-remaining-usd"), Some("0.000000"));
    let off_list = gw.chat(&budgeted, "o1").await;
    assert_eq!(off_list.status, StatusCode::FORBIDDEN);
    off_list.assert_limit_headers();
    assert!(
        off_list.header("x-budget-remaining-usd").is_some(),
        "a denial of a budgeted key carries its budget"
    );
}

// docs/threat-model.md, A7
#[tokio::test]
async fn leak_test_keys_are_answered_offline() {
    let up = MockUpstream::start().await;
    let refused = refused_url().await;
    let mut opts = GatewayOptions::all_at(&up.url);
    for (p, url) in &mut opts.upstreams {
        if *p == Provider::OpenAi {
            url.clone_from(&refused);
        }
    }
    let gw = Gateway::with(opts).await;
    for p in [Provider::OpenAi, Provider::Anthropic] {
        gw.add_provider_key(p).await;
    }
    let (key, id) = gw.test_key().await;
    assert!(key.starts_with("vpx_test_"));

    let r = gw.chat(&key, "gpt-4o-mini").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let body = r.json();
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    r.assert_limit_headers();
    let r = gw
        .post(
            "/anthropic/v1/messages",
            &key,
            &json!({"model": "claude-3-5-haiku-20241022", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["usage"]["output_tokens"], 8);

    assert_eq!(up.count(), 0, "a test key dialled the upstream");
    let usage = gw.usage_of(&id).await;
    assert_eq!(usage.len(), 2);
    assert!(
        usage
            .iter()
            .all(|u| u.status == 200 && u.tokens_out > 0 && u.cost.0 > 0),
        "{usage:?}"
    );
}
