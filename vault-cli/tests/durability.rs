//! docs/threat-model.md, J1 (durability), against the real binary: what was
//! acknowledged survives `kill -9`; a graceful stop flushes usage.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// Checks every acknowledged object against a freshly restarted server.
async fn check_acknowledged(
    addr: SocketAddr,
    admin: &str,
    live: &[(String, String)],
    revoked: &[(String, String)],
    provider_keys: &[String],
) {
    let r = get(addr, "/v1/keys", admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = r.text();
    for (id, key) in live {
        assert!(listed.contains(id.as_str()), "acknowledged key {id} lost");
        let r = get(addr, "/v1/usage", key).await;
        assert_eq!(
            r.status,
            200,
            "acknowledged key {id} does not work: {}",
            r.text()
        );
    }
    for (id, key) in revoked {
        let r = get(addr, "/v1/usage", key).await;
        assert_eq!(
            r.status,
            401,
            "acknowledged revocation of {id} lost: {}",
            r.text()
        );
    }
    let r = get(addr, "/v1/provider-keys", admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = r.text();
    for pk in provider_keys {
        assert!(
            listed.contains(pk.as_str()),
            "acknowledged provider key {pk} lost"
        );
    }
}

/// docs/threat-model.md, J1: create a key, add a provider key or revoke a key,
/// then SIGKILL the server the moment the 2xx arrives; after a restart every
/// acknowledged object exists and every acknowledged revocation holds.
#[tokio::test]
async fn corruption_acknowledged_writes_survive_kill_9() {
    let dir = tempdir();
    let (admin, _) = init(dir.path());
    let started = Instant::now();
    let mut live: Vec<(String, String)> = Vec::new();
    let mut revoked: Vec<(String, String)> = Vec::new();
    let mut provider_keys: Vec<String> = Vec::new();
    let mut i = 0usize;
    // At least 30 rounds; more while well inside the time budget.
    while i < 30 || (i < 100 && started.elapsed() < Duration::from_secs(25)) {
        let server = Server::start(dir.path());
        let addr = server.addr;
        check_acknowledged(addr, &admin, &live, &revoked, &provider_keys).await;
        match i % 3 {
            0 => {
                let r = post(
                    addr,
                    "/v1/keys",
                    &admin,
                    &json!({"name": format!("k{i}"), "permissions": ["usage:read"]}),
                )
                .await;
                server.kill9();
                assert_eq!(r.status, 201, "{}", r.text());
                let v = r.json();
                live.push((
                    v["id"].as_str().unwrap().to_owned(),
                    v["key"].as_str().unwrap().to_owned(),
                ));
            }
            1 => {
                let r = post(
                    addr,
                    "/v1/provider-keys",
                    &admin,
                    &json!({"provider": "openai", "api_key": format!("sk-proj-durable{i:04}xxxxxxxx"), "name": "d"}),
                )
                .await;
                server.kill9();
                assert_eq!(r.status, 201, "{}", r.text());
                provider_keys.push(r.json()["id"].as_str().unwrap().to_owned());
            }
            _ => {
                let victim = live.pop().expect("round 0 of each three creates a key");
                // Make the victim hot in the cache, then revoke and kill.
                assert_eq!(get(addr, "/v1/usage", &victim.1).await.status, 200);
                let r = delete(addr, &format!("/v1/keys/{}", victim.0), &admin).await;
                server.kill9();
                assert_eq!(r.status, 200, "{}", r.text());
                revoked.push(victim);
            }
        }
        i += 1;
    }
    let server = Server::start(dir.path());
    check_acknowledged(server.addr, &admin, &live, &revoked, &provider_keys).await;
    assert!(
        !live.is_empty() && !revoked.is_empty() && !provider_keys.is_empty(),
        "every kind of write was exercised"
    );
    // A revoked key is refused on the proxy path too.
    let r = chat(server.addr, &revoked[0].1, "gpt-4o-mini").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

/// SIGTERM after some proxied calls → the process exits 0 and the usage rows
/// are in the store.
#[tokio::test]
async fn lifecycle_graceful_shutdown_flushes_usage() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let addr = server.addr;
    // A budgeted test key: its spend is tracked as well as its usage rows.
    let (_, test, _) = create_key(
        addr,
        server.admin(),
        &json!({"name": "metered", "env": "test", "budget": {"limit_usd": 5}}),
    )
    .await;
    for _ in 0..3 {
        let r = chat(addr, &test, "gpt-4o-mini").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = send(
        addr,
        Req::new("POST", "/openai/v1/chat/completions")
            .bearer(&test)
            .raw("{not json"),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    // Stop at once: the rows may still be queued in the usage worker.
    let status = server.terminate(Duration::from_secs(15));
    let status = status.expect("the server exits within 15 s of SIGTERM");
    assert!(status.success(), "exit status {status:?}");

    let out = cli(dir.path(), &["usage", "--output", "json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let v = out.json();
    let rows = v["data"].as_array().unwrap();
    let ok = rows.iter().filter(|r| r["status"] == 200).count();
    assert_eq!(ok, 3, "three calls metered: {v}");
    assert!(
        rows.iter().any(|r| r["status"] != 200),
        "the refused call is recorded: {v}"
    );
    let cost: f64 = v["totals"]["cost_usd"].as_str().unwrap().parse().unwrap();
    assert!(cost > 0.0, "{v}");
    // The settled spend reached the store too, and matches the records.
    let keys = cli(dir.path(), &["keys", "list", "--output", "json"]).json();
    let spend: f64 = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "metered")
        .unwrap()["spend_usd"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((spend - cost).abs() < 1e-6, "spend {spend} vs usage {cost}");
}
