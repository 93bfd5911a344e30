//! The management API against the real binary: hostile bodies (A8), other
//! projects' objects (A9), authentication on every route (A10), rotation
//! with grace (K2) and sub-agent keys.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

async fn key_ids(addr: SocketAddr, admin: &str) -> Vec<String> {
    let r = get(addr, "/v1/keys", admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

async fn provider_key_ids(addr: SocketAddr, admin: &str) -> Vec<String> {
    let r = get(addr, "/v1/provider-keys", admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Sends `body` raw to `path`; expects a 4xx JSON error (docs/api.md#errors)
/// whose message contains `names` (case-insensitively).
async fn expect_refused(addr: SocketAddr, admin: &str, path: &str, body: &[u8], names: &str) {
    let r = send(
        addr,
        Req::new("POST", path)
            .bearer(admin)
            .header("content-type", "application/json")
            .raw(body.to_vec()),
    )
    .await;
    let shown = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
    assert!(
        (400..500).contains(&r.status),
        "POST {path} {shown}: {} {}",
        r.status,
        r.text()
    );
    r.error_code();
    let detail = r.json()["detail"].as_str().unwrap().to_ascii_lowercase();
    assert!(
        detail.contains(&names.to_ascii_lowercase()),
        "POST {path} {shown}: the error should name {names:?}: {detail}"
    );
}

/// docs/threat-model.md, A8: invalid JSON, wrong types, oversized bodies and
/// unknown or forbidden fields on every route that takes a body → 4xx naming
/// the field, nothing created, and the server still healthy.
#[tokio::test]
async fn smuggling_mass_assignment_and_hostile_bodies_are_refused() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let (addr, admin) = (server.addr, server.admin());
    let (victim_id, victim_key, _) = create_key(
        addr,
        admin,
        &json!({"name": "victim", "permissions": ["usage:read"]}),
    )
    .await;
    let keys_before = key_ids(addr, admin).await;
    let pks_before = provider_key_ids(addr, admin).await;
    let big = format!(r#"{{"name": "{}"}}"#, "a".repeat(70 * 1024));
    let rotate = format!("/v1/keys/{victim_id}/rotate");

    // POST /v1/keys
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "not valid json"),
        (b"[]".to_vec(), "invalid"),
        (br#"{"name": 5}"#.to_vec(), "name"),
        (br#"{"permissions": "chat:write"}"#.to_vec(), "permissions"),
        (br#"{"budget": {"limit_usd": "lots"}}"#.to_vec(), "budget"),
        (br#"{"ttl": 3600}"#.to_vec(), "ttl"),
        (br#"{"name": "x", "spend": 0}"#.to_vec(), "spend"),
        (br#"{"name": "x", "status": "active"}"#.to_vec(), "status"),
        (br#"{"name": "x", "id": "key_mine"}"#.to_vec(), "id"),
        (
            br#"{"name": "x", "created_at": "2020-01-01T00:00:00Z"}"#.to_vec(),
            "created_at",
        ),
        (
            br#"{"name": "x", "key": "vpx_live_AAAAAAAAAAAAAAAAAAAAAAAA"}"#.to_vec(),
            "key",
        ),
        (
            br#"{"name": "x", "permissions": ["root:all"]}"#.to_vec(),
            "permissions",
        ),
        (big.clone().into_bytes(), "bytes"),
    ];
    for (body, names) in &cases {
        expect_refused(addr, admin, "/v1/keys", body, names).await;
    }
    // Another tenant's project: 403 `project_mismatch` (docs/api.md#errors).
    let r = post(
        addr,
        "/v1/keys",
        admin,
        &json!({"name": "x", "project": "tenant-b"}),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error_code(), "project_mismatch");
    assert_eq!(
        r.json()["detail"],
        "API key does not have permission to access this project"
    );

    // POST /v1/keys/{id}/rotate
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "not valid json"),
        (br#"{"grace": 60}"#.to_vec(), "grace"),
        (br#"{"grace": "soon"}"#.to_vec(), "grace"),
        (
            br#"{"grace": "60s", "status": "active"}"#.to_vec(),
            "status",
        ),
        (
            br#"{"grace": "60s", "key": "vpx_live_AAAAAAAAAAAAAAAAAAAAAAAA"}"#.to_vec(),
            "key",
        ),
        (big.clone().into_bytes(), "bytes"),
    ];
    for (body, names) in &cases {
        expect_refused(addr, admin, &rotate, body, names).await;
    }
    // The victim was never rotated: its original key still works.
    let r = get(addr, "/v1/usage", &victim_key).await;
    assert_eq!(r.status, 200, "no rotation happened: {}", r.text());

    // POST /v1/provider-keys
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "not valid json"),
        (br#"{"provider": "openai"}"#.to_vec(), "api_key"),
        (br#"{"provider": 7, "api_key": "sk-proj-0000000000000000"}"#.to_vec(), "provider"),
        (br#"{"provider": "openai", "api_key": ["sk"]}"#.to_vec(), "api_key"),
        (br#"{"provider": "skynet", "api_key": "sk-proj-0000000000000000"}"#.to_vec(), "provider"),
        (br#"{"provider": "openai", "api_key": "sk-proj-0000000000000000", "id": "pk_mine"}"#.to_vec(), "id"),
        (br#"{"provider": "openai", "api_key": "sk-proj-0000000000000000", "created_at": 1}"#.to_vec(), "created_at"),
        (br#"{"provider": "openai", "api_key": "sk-proj-0000000000000000", "base_url": "http://169.254.169.254"}"#.to_vec(), "base_url"),
        (br#"{"provider": "openai", "api_key": "has spaces in it"}"#.to_vec(), "api_key"),
        (big.clone().into_bytes(), "bytes"),
    ];
    for (body, names) in &cases {
        expect_refused(addr, admin, "/v1/provider-keys", body, names).await;
    }
    let r = post(
        addr,
        "/v1/provider-keys",
        admin,
        &json!({"provider": "openai", "api_key": "sk-proj-0000000000000000", "project": "tenant-b"}),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error_code(), "project_mismatch");

    // Unknown query parameters on the read routes.
    for path in ["/v1/usage?spend=1", "/v1/audit?tenant=b"] {
        let r = get(addr, path, admin).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        r.error_code();
    }
    // `project` is known, and another project's is refused, not ignored.
    let r = get(addr, "/v1/audit?project=tenant-b", admin).await;
    assert_eq!(r.error_code(), "project_mismatch", "{}", r.text());

    assert_eq!(
        key_ids(addr, admin).await,
        keys_before,
        "no key was created"
    );
    assert_eq!(
        provider_key_ids(addr, admin).await,
        pks_before,
        "no provider key was added"
    );
    let r = send(addr, Req::new("GET", "/healthz")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// docs/threat-model.md, A8: a child wider than its parent, or scopes the
/// caller lacks, are refused naming the field and create nothing. Also: a
/// budgeted parent mints a child authenticated as itself
/// (docs/api.md#post-v1keys).
#[tokio::test]
async fn boundary_sub_agent_keys_are_subsets_of_their_parent() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let (addr, admin) = (server.addr, server.admin());
    let (parent_id, parent_key, _) = create_key(
        addr,
        admin,
        &json!({"name": "parent", "env": "test", "permissions": ["chat:write"],
                "models": ["gpt-4o-mini"], "budget": {"limit_usd": 1.0}, "ttl": "1h"}),
    )
    .await;
    let before = key_ids(addr, admin).await;

    // The parent mints a child as itself.
    let r = post(
        addr,
        "/v1/keys",
        &parent_key,
        &json!({"name": "child", "parent": parent_id, "permissions": ["chat:write"],
                "models": ["gpt-4o-mini"], "budget": {"limit_usd": 0.4}, "ttl": "30m"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let child = r.json();
    assert_eq!(child["parent"], parent_id.as_str());
    let child_key = child["key"].as_str().unwrap().to_owned();
    assert!(
        child_key.starts_with("vpx_test_"),
        "a child has its parent's env"
    );
    let r = chat(addr, &child_key, "gpt-4o-mini").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let after_child = key_ids(addr, admin).await;
    assert_eq!(after_child.len(), before.len() + 1);

    // Wider children: each refused naming the field; nothing created.
    let wider = [
        (
            json!({"budget": {"limit_usd": 50.0}, "models": ["gpt-4o-mini"]}),
            "budget",
        ),
        (
            json!({"budget": {"limit_usd": 0.1}, "models": ["gpt-4o"]}),
            "models",
        ),
        (
            json!({"budget": {"limit_usd": 0.1}, "models": ["*"]}),
            "models",
        ),
        (
            json!({"budget": {"limit_usd": 0.1}, "models": ["gpt-4o-mini"], "ttl": "7d"}),
            "ttl",
        ),
        (
            json!({"budget": {"limit_usd": 0.1}, "models": ["gpt-4o-mini"], "permissions": ["chat:write", "keys:manage"]}),
            "permissions",
        ),
        (
            json!({"budget": {"limit_usd": 0.1}, "models": ["gpt-4o-mini"], "permissions": ["*"]}),
            "permissions",
        ),
    ];
    for (extra, field) in wider {
        let mut body = extra.clone();
        body["name"] = json!("wide");
        body["parent"] = json!(parent_id);
        if body.get("permissions").is_none() {
            body["permissions"] = json!(["chat:write"]);
        }
        let r = post(addr, "/v1/keys", &parent_key, &body).await;
        assert!(
            r.status == 403 || r.status == 402,
            "{body}: {} {}",
            r.status,
            r.text()
        );
        r.error_code();
        let detail = r.json()["detail"].as_str().unwrap().to_owned();
        assert!(
            detail.contains(field),
            "{body}: should name {field}: {detail}"
        );
    }
    // A key cannot mint a sibling (no parent) without keys:manage.
    let r = post(addr, "/v1/keys", &parent_key, &json!({"name": "sibling"})).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        key_ids(addr, admin).await,
        after_child,
        "nothing else was created"
    );
}

/// docs/threat-model.md, A9: a project-A admin sees "exists in project B" and
/// "does not exist" as the same 404, for GET, DELETE and rotate; B's key
/// survives.
#[tokio::test]
async fn boundary_other_projects_keys_are_403_project_mismatch() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let addr = server.addr;
    let a_admin = cli(
        dir.path(),
        &[
            "keys",
            "create",
            "--project",
            "a",
            "--scopes",
            "keys:manage",
            "--output",
            "json",
        ],
    );
    assert_eq!(a_admin.code, 0, "{a_admin:?}");
    let a_admin = a_admin.json()["key"].as_str().unwrap().to_owned();
    let b = cli(
        dir.path(),
        &[
            "keys",
            "create",
            "--project",
            "b",
            "--scopes",
            "usage:read",
            "--output",
            "json",
        ],
    );
    assert_eq!(b.code, 0, "{b:?}");
    let b = b.json();
    let (b_id, b_key) = (
        b["id"].as_str().unwrap().to_owned(),
        b["key"].as_str().unwrap().to_owned(),
    );
    // Same shape and length as a real id, but nobody's.
    let missing = format!("key_{}", "Z".repeat(b_id.len() - 4));

    for (method, suffix) in [
        ("GET", ""),
        ("GET", "/limits"),
        ("DELETE", ""),
        ("POST", "/rotate"),
    ] {
        for (id, status, code) in [
            (&b_id, 403, "project_mismatch"),
            (&missing, 404, "not_found"),
        ] {
            let path = format!("/v1/keys/{id}{suffix}");
            let mut req = Req::new(method, &path).bearer(&a_admin);
            if method == "POST" {
                req = req.json(&json!({"grace": "60s"}));
            }
            let r = send(addr, req).await;
            assert_eq!(r.status, status, "{method} {path}: {}", r.text());
            assert_eq!(r.json()["error"]["code"], code, "{method} {path}");
            if status == 403 {
                assert_eq!(
                    r.json()["detail"],
                    "API key does not have permission to access this project"
                );
            }
        }
    }
    // A's list shows none of B's keys.
    let r = get(addr, "/v1/keys", &a_admin).await;
    assert_eq!(r.status, 200);
    assert!(!r.text().contains(&b_id), "{}", r.text());
    // So does a page of it (docs/api.md#get-v1keys), with its total; a bad
    // parameter is the caller's 400.
    let r = get(addr, "/v1/keys?limit=10&status=active", &a_admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["total"], 1, "{}", r.text());
    assert_eq!(r.json()["limit"], 10);
    assert!(!r.text().contains(&b_id), "{}", r.text());
    for bad in ["limit=0", "status=gone", "colour=red", "offset=-1"] {
        let r = get(addr, &format!("/v1/keys?{bad}"), &a_admin).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "invalid_request", "{bad}");
    }
    // B's key is untouched: neither revoked nor rotated.
    let r = get(addr, "/v1/usage", &b_key).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Naming another project, or `*`, is the same 403 on every listing
    // (docs/api.md#projects); naming its own narrows nothing away.
    for (path, key) in [
        ("/v1/keys?project=b", &a_admin),
        ("/v1/keys?project=*", &a_admin),
        ("/v1/usage?project=a", &b_key),
    ] {
        let r = get(addr, path, key).await;
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "project_mismatch", "{path}");
    }
    let r = get(addr, "/v1/projects", &a_admin).await;
    assert_eq!(r.json()["data"], json!(["a"]), "{}", r.text());
    let r = post(
        addr,
        "/v1/keys",
        &a_admin,
        &json!({"name": "org", "project": "*", "permissions": ["keys:manage"]}),
    )
    .await;
    assert_eq!(
        r.json()["error"]["code"],
        "project_mismatch",
        "{}",
        r.text()
    );

    // An organisation-wide key (made by the operator) sees both and names either.
    let org = cli(
        dir.path(),
        &[
            "keys",
            "create",
            "--project",
            "*",
            "--scopes",
            "*",
            "--output",
            "json",
        ],
    );
    assert_eq!(org.code, 0, "{org:?}");
    let org = org.json()["key"].as_str().unwrap().to_owned();
    let r = get(addr, "/v1/projects", &org).await;
    assert_eq!(
        r.json()["data"],
        json!(["a", "b", "default"]),
        "{}",
        r.text()
    );
    let r = get(addr, "/v1/keys?project=b", &org).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["total"], 1);
    assert_eq!(r.json()["data"][0]["id"], b_id);
    let r = get(addr, "/v1/audit?project=b", &org).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let entries = r.json()["data"].as_array().unwrap().clone();
    assert!(
        !entries.is_empty() && entries.iter().all(|e| e["project"] == "b"),
        "{entries:?}"
    );
}

/// docs/threat-model.md, A10: every route, alias, method and trailing-slash
/// variant, and unknown paths, answer 401 without a key — except `/healthz`,
/// `/readyz` and `/metrics`.
#[tokio::test]
async fn boundary_every_route_requires_a_key() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let addr = server.addr;
    let paths = [
        "/v1/keys",
        "/v1/keys/",
        "/v1/keys/key_abcdefgh",
        "/v1/keys/key_abcdefgh/",
        "/v1/keys/key_abcdefgh/rotate",
        "/v1/keys/key_abcdefgh/rotate/",
        "/v1/keys/key_abcdefgh/limits",
        "/v1/provider-keys",
        "/v1/provider-keys/",
        "/v1/provider-keys/pk_abcdefgh",
        "/v1/usage",
        "/v1/usage/",
        "/v1/audit",
        "/v1/audit/",
        "/v1/whatever",
        "/v1",
        "/admin",
        "/healthz/",
        "/readyz/",
        "/metrics/",
        "/openai/v1/chat/completions",
        "/anthropic/v1/messages",
        "/v1/keys?key=",
        "//v1/keys",
        "/v1//keys",
        "/V1/KEYS",
    ];
    let methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
    for path in paths {
        for method in methods {
            let mut req = Req::new(method, path);
            if method != "GET" && method != "HEAD" {
                req = req.json(&json!({}));
            }
            let r = send(addr, req).await;
            assert_eq!(r.status, 401, "{method} {path}: {} {}", r.status, r.text());
            if method != "HEAD" {
                let code = r.error_code();
                assert!(
                    code == "missing_api_key" || code == "invalid_api_key",
                    "{method} {path}: {code}"
                );
            }
        }
    }
    // `/` is the dashboard's: a redirect to `/ui/`.
    let r = send(addr, Req::new("GET", "/")).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/ui/")));
    for path in ["/healthz", "/readyz", "/metrics"] {
        for method in ["GET", "HEAD"] {
            let r = send(addr, Req::new(method, path)).await;
            assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        }
    }
    // On SQLite, readiness is the store's alone.
    let r = send(addr, Req::new("GET", "/readyz")).await;
    assert_eq!(
        r.json(),
        json!({"status": "ready", "checks": {"store": "ok"}})
    );
}

/// docs/threat-model.md, K2: a rotated key's old secret works during the grace
/// period and is refused after it; revoking during grace revokes both secrets.
#[tokio::test]
async fn lifecycle_rotation_grace_and_revocation_during_grace() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let (addr, admin) = (server.addr, server.admin());

    let (id, old, _) = create_key(
        addr,
        admin,
        &json!({"name": "rot", "permissions": ["usage:read"]}),
    )
    .await;
    assert_eq!(get(addr, "/v1/usage", &old).await.status, 200);
    let r = post(
        addr,
        &format!("/v1/keys/{id}/rotate"),
        admin,
        &json!({"grace": "2s"}),
    )
    .await;
    let rotated_at = Instant::now();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let new = v["key"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(v["id"], id.as_str(), "same id after rotation");
    assert!(v["rotation_grace_until"].is_string(), "{v}");
    assert_eq!(get(addr, "/v1/usage", &new).await.status, 200);
    let r = get(addr, "/v1/usage", &old).await;
    assert_eq!(r.status, 200, "the old key works in grace: {}", r.text());

    let took = poll_until(Duration::from_secs(5), || {
        let old = &old;
        async move { get(addr, "/v1/usage", old).await.status == 401 }
    })
    .await
    .expect("the old key is refused after its grace period");
    let since_rotation = rotated_at.elapsed();
    assert!(
        since_rotation >= Duration::from_millis(1900) && took <= Duration::from_millis(3500),
        "grace ended {since_rotation:?} after rotation; expected about 2 s"
    );
    assert_eq!(
        get(addr, "/v1/usage", &new).await.status,
        200,
        "the new key stays"
    );

    // Revoking during grace revokes both.
    let (id2, old2, _) = create_key(
        addr,
        admin,
        &json!({"name": "rot2", "permissions": ["usage:read"]}),
    )
    .await;
    let r = post(
        addr,
        &format!("/v1/keys/{id2}/rotate"),
        admin,
        &json!({"grace": "60s"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let new2 = r.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(get(addr, "/v1/usage", &old2).await.status, 200);
    assert_eq!(get(addr, "/v1/usage", &new2).await.status, 200);
    let r = delete(addr, &format!("/v1/keys/{id2}"), admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for k in [&old2, &new2] {
        let r = get(addr, "/v1/usage", k).await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(r.error_code(), "key_revoked");
    }
}

/// docs/api.md#get-v1keysidlimits: a sub-agent key's windows and its
/// parent's, as the proxy counted them; reading them counts nothing.
#[tokio::test]
async fn lifecycle_key_limits_show_each_window_and_reading_counts_nothing() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let (addr, admin) = (server.addr, server.admin());
    let (parent_id, parent_key, _) = create_key(
        addr,
        admin,
        &json!({"name": "parent", "env": "test", "permissions": ["chat:write", "keys:manage"],
                "rate_limit": {"requests_per_minute": 10, "requests_per_day": 100},
                "max_parallel": 4, "budget": {"limit_usd": 1.0}}),
    )
    .await;
    let r = post(
        addr,
        "/v1/keys",
        &parent_key,
        &json!({"name": "child", "parent": parent_id, "permissions": ["chat:write"],
                "rate_limit": {"requests_per_minute": 5, "requests_per_day": 100},
                "max_parallel": 4, "budget": {"limit_usd": 0.4}}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let (child_id, child_key) = (
        r.json()["id"].as_str().unwrap().to_owned(),
        r.json()["key"].as_str().unwrap().to_owned(),
    );
    // Keep the calls within one UTC minute.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if secs % 60 > 45 {
        tokio::time::sleep(Duration::from_secs(61 - secs % 60)).await;
    }
    for _ in 0..3 {
        let r = chat(addr, &child_key, "gpt-4o-mini").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let path = format!("/v1/keys/{child_id}/limits");
    let r = get(addr, &path, admin).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let l = r.json();
    assert_eq!(l["object"], "key_limits");
    assert_eq!(l["key_id"], child_id.as_str());
    let windows = l["windows"].as_array().unwrap();
    let shown: Vec<_> = windows
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap(),
                w["key_id"] == parent_id.as_str(),
                w["inherited"].as_bool().unwrap(),
                w["limit"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("requests_per_minute", false, false, 5),
            ("requests_per_day", false, false, 100),
            ("max_parallel", false, false, 4),
            ("requests_per_minute", true, true, 10),
            ("requests_per_day", true, true, 100),
            ("max_parallel", true, true, 4),
        ]
    );
    assert_eq!(
        (&windows[0]["used"], &windows[0]["remaining"]),
        (&json!(3), &json!(2))
    );
    assert_eq!(
        (&windows[3]["used"], &windows[3]["remaining"]),
        (&json!(3), &json!(7))
    );
    let reset = windows[0]["resets_at"].as_str().unwrap();
    assert!(reset.ends_with(":00.000Z"), "{reset}");
    assert!(
        reset > l["at"].as_str().unwrap(),
        "{reset} after {}",
        l["at"]
    );
    assert!(
        windows[1]["resets_at"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00.000Z")
    );
    assert_eq!(windows[2]["resets_at"], json!(null));
    let b = &l["budget"];
    assert_eq!(
        (&b["key_id"], &b["inherited"], &b["limit_usd"], &b["period"]),
        (
            &json!(child_id),
            &json!(false),
            &json!("0.400000"),
            &json!("total")
        )
    );
    assert_eq!(b["resets_at"], json!(null));
    let usd = |v: &serde_json::Value| v.as_str().unwrap().parse::<f64>().unwrap();
    let sum = usd(&b["settled_usd"]) + usd(&b["reserved_usd"]) + usd(&b["remaining_usd"]);
    assert!((sum - 0.4).abs() < 1e-9, "{b}");
    assert!(
        usd(&b["remaining_usd"]) < 0.4,
        "three calls cost something: {b}"
    );
    // The parent, asking about its own child, sees the same; reading twice
    // more counted nothing: the child's minute still has room for two.
    let r = get(addr, &path, &parent_key).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["windows"][0]["used"], 3);
    for _ in 0..2 {
        let r = chat(addr, &child_key, "gpt-4o-mini").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = chat(addr, &child_key, "gpt-4o-mini").await;
    assert_eq!(r.status, 429, "{}", r.text());
    let l = get(addr, &path, admin).await.json();
    assert_eq!(
        (&l["windows"][0]["used"], &l["windows"][0]["remaining"]),
        (&json!(5), &json!(0))
    );
    // A key without limits has none to show.
    let (free_id, _, _) = create_key(addr, admin, &json!({"name": "free", "env": "live"})).await;
    let l = get(addr, &format!("/v1/keys/{free_id}/limits"), admin)
        .await
        .json();
    assert_eq!(l["windows"], json!([]));
}
