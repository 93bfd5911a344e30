//! The README's five-minute walkthrough and its "Managing keys" curl
//! commands, against the real binary on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// README "Five minutes, offline": a test key's chat completion, the same
/// streamed, and `/v1/usage` showing both with a cost.
#[tokio::test]
async fn lifecycle_readme_five_minute_walkthrough() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let (addr, admin, test) = (server.addr, server.admin(), server.test());

    let r = send(
        addr,
        Req::new("POST", "/openai/v1/chat/completions")
            .bearer(test)
            .raw(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":20}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");
    for h in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert!(r.header(h).is_some(), "missing {h}: {}", r.head);
    }

    let r = send(
        addr,
        Req::new("POST", "/openai/v1/chat/completions")
            .bearer(test)
            .raw(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream"),
        "{}",
        r.head
    );
    let text = r.text();
    assert!(text.contains("data: "), "{text}");
    assert!(text.contains("[DONE]"), "{text}");

    // Usage reaches the store within a second (docs/api.md#usage: batches about
    // every 10 ms).
    let deadline = Instant::now() + Duration::from_secs(2);
    let last = loop {
        let r = get(addr, "/v1/usage", admin).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        if v["data"].as_array().is_some_and(|d| d.len() >= 2) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "usage did not show both calls: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let rows = last["data"].as_array().unwrap();
    for row in rows {
        assert_eq!(row["status"], 200, "{row}");
        assert_eq!(row["model"], "gpt-4o-mini", "{row}");
        assert!(row["tokens_out"].as_u64().unwrap() > 0, "{row}");
        let cost: f64 = row["cost_usd"].as_str().unwrap().parse().unwrap();
        assert!(cost > 0.0, "a call costs something: {row}");
    }
    let total: f64 = last["totals"]["cost_usd"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(total > 0.0, "{last}");
}

/// README.md#managing-keys: the curl commands work as written (only the host
/// changed); the revoked key's next request is 401 (docs/threat-model.md, A5).
#[tokio::test]
async fn lifecycle_spec_appendix_seed_commands() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let (addr, admin) = (server.addr, server.admin());

    // curl -X POST $HOST/v1/keys -H "Authorization: Bearer …" -H "Content-Type: application/json" -d '…'
    let r = send(
        addr,
        Req::new("POST", "/v1/keys")
            .header("Authorization", &format!("Bearer {admin}"))
            .header("Content-Type", "application/json")
            .raw(r#"{"name": "Production Backend", "permissions": ["chat:write", "usage:read"]}"#),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let id = created["id"].as_str().unwrap().to_owned();
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(id.starts_with("key_"), "{created}");
    assert!(
        key.starts_with("vpx_live_") && key.len() == 9 + 24,
        "{created}"
    );
    assert_eq!(created["name"], "Production Backend");
    assert_eq!(created["permissions"], json!(["chat:write", "usage:read"]));

    // curl $HOST/v1/keys -H "Authorization: Bearer …"
    let r = get(addr, "/v1/keys", admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = r.json();
    let mine = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap_or_else(|| panic!("the new key is listed: {listed}"));
    assert_eq!(mine["status"], "active");
    assert!(!r.text().contains(&key), "a list never shows the key");
    assert!(key.starts_with(mine["prefix"].as_str().unwrap()));

    // The new key works before it is revoked.
    let r = get(addr, "/v1/usage", &key).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // curl -X DELETE $HOST/v1/keys/key_id_here -H "Authorization: Bearer …"
    let r = delete(addr, &format!("/v1/keys/{id}"), admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(addr, "/v1/usage", &key).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.error_code(), "key_revoked");
    let r = chat(addr, &key, "gpt-4o-mini").await;
    assert_eq!(r.status, 401, "{}", r.text());

    // curl -X POST $HOST/v1/provider-keys … -d '{"provider": "openai", …}'
    let r = send(
        addr,
        Req::new("POST", "/v1/provider-keys")
            .header("Authorization", &format!("Bearer {admin}"))
            .header("Content-Type", "application/json")
            .raw(r#"{"provider": "openai", "api_key": "sk-proj-xxxxxxxxxxxxxxxx", "name": "OpenAI Production"}"#),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let pk = r.json();
    let pk_id = pk["id"].as_str().unwrap().to_owned();
    assert!(pk_id.starts_with("pk_"), "{pk}");
    assert_eq!(pk["hint"], "sk-...xxxx");
    assert!(!r.text().contains("sk-proj-xxxxxxxxxxxxxxxx"));

    // curl $HOST/v1/provider-keys -H "Authorization: Bearer …"
    let r = get(addr, "/v1/provider-keys", admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains(&pk_id), "{}", r.text());
    assert!(!r.text().contains("sk-proj-xxxxxxxxxxxxxxxx"));

    // curl -X DELETE $HOST/v1/provider-keys/pk_id_here -H "Authorization: Bearer …"
    let r = delete(addr, &format!("/v1/provider-keys/{pk_id}"), admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(addr, "/v1/provider-keys", admin).await;
    assert!(!r.text().contains(&pk_id), "removed: {}", r.text());

    // A missing key: the default message of `Denial::MissingApiKey`.
    let r = send(addr, Req::new("GET", "/v1/keys")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["detail"], "Invalid or missing API key");
}

/// docs/threat-model.md, I5: the limiter is wired into the real binary — a live
/// key with a $0 budget is refused 402 on its first call, and the upstream sees
/// nothing.
#[tokio::test]
async fn boundary_zero_budget_is_refused_before_the_upstream() {
    let upstream = MockUpstream::start();
    let dir = tempdir();
    write_config(dir.path(), &["openai"], &upstream.url(), "");
    let server = Server::start(dir.path());
    let (addr, admin) = (server.addr, server.admin());
    add_provider_key(addr, admin, "openai", "sk-proj-zerobudget0000000000").await;
    let (_, key, _) = create_key(
        addr,
        admin,
        &json!({"name": "zero", "permissions": ["chat:write"], "budget": {"limit_usd": 0}}),
    )
    .await;

    let r = chat(addr, &key, "gpt-4o-mini").await;
    assert_eq!(r.status, 402, "{}", r.text());
    assert_eq!(r.error_code(), "budget_exceeded");
    assert!(r.header("x-ratelimit-limit").is_some(), "{}", r.head);
    assert_eq!(
        r.header("x-budget-remaining-usd"),
        Some("0.000000"),
        "{}",
        r.head
    );
    assert_eq!(upstream.count(), 0, "the upstream saw nothing");

    // A budgeted key that can afford it does reach the (mock) upstream, so
    // the zero above is the budget, not a broken route.
    let (_, rich, _) = create_key(
        addr,
        admin,
        &json!({"name": "rich", "permissions": ["chat:write"], "budget": {"limit_usd": 5}}),
    )
    .await;
    let r = chat(addr, &rich, "gpt-4o-mini").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(upstream.count(), 1);
    let seen = &upstream.seen()[0];
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer sk-proj-zerobudget0000000000")
    );
}

/// README "A budgeted key for one CI job": `keys create --policy … --output
/// env` on the data directory while the server runs; the server accepts the new
/// key, and `keys revoke` shuts it out within 1 s (docs/api.md#authentication,
/// docs/threat-model.md, A5).
#[tokio::test]
async fn lifecycle_ci_one_liner_with_cross_process_revocation() {
    let upstream = MockUpstream::start();
    let dir = tempdir();
    write_config(dir.path(), &["openai", "anthropic"], &upstream.url(), "");
    let server = Server::start(dir.path());
    let addr = server.addr;
    add_provider_key(addr, server.admin(), "openai", "sk-proj-ci0000000000000000").await;
    std::fs::write(
        dir.path().join("agent.policy.yaml"),
        r#"name: nightly-eval
ttl: 1h
scopes: [chat:write]
providers: [openai, anthropic]
endpoints: [POST /v1/chat/completions, POST /v1/messages]
models: [gpt-4o-mini, "claude-3-5-haiku-*"]
budget: { limit_usd: 5.00, period: total }
rate_limit: { requests_per_minute: 60, requests_per_day: 500, tokens_per_minute: 200000 }
max_request_chars: 3000
"#,
    )
    .unwrap();

    let out = cli(
        dir.path(),
        &[
            "keys",
            "create",
            "--policy",
            "agent.policy.yaml",
            "--output",
            "env",
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let mut key = None;
    let mut id = None;
    for line in out.stdout.lines() {
        if let Some(v) = line.strip_prefix("export VAULTGATE_KEY=") {
            key = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("export VAULTGATE_KEY_ID=") {
            id = Some(v.to_owned());
        }
    }
    let (key, id) = (key.expect("VAULTGATE_KEY"), id.expect("VAULTGATE_KEY_ID"));
    assert!(key.starts_with("vpx_live_"), "{}", out.stdout);

    // The running server sees the key the CLI just wrote.
    let r = chat(addr, &key, "gpt-4o-mini").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-budget-remaining-usd").is_some(), "{}", r.head);
    let r = chat(addr, &key, "gpt-4o").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error_code(), "model_not_allowed");
    // The key is hot in the server's cache now; revoke it from another process.
    let r = chat(addr, &key, "gpt-4o-mini").await;
    assert_eq!(r.status, 200, "{}", r.text());

    let out = cli(dir.path(), &["keys", "revoke", &id]);
    assert_eq!(out.code, 0, "{out:?}");
    let revoked_at = Instant::now();
    let took = loop {
        let r = chat(addr, &key, "gpt-4o-mini").await;
        if r.status == 401 {
            break revoked_at.elapsed();
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(3),
            "still {} three seconds after revocation",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        took <= Duration::from_millis(1000),
        "refused after {took:?}; docs/api.md#authentication allows 1 s"
    );
}
