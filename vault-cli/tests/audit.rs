//! The audit trail of the real binary: `vaultgate audit verify` finds tampering
//! (docs/threat-model.md, L1); admin mutations fail closed when the audit log
//! cannot be written, while proxying goes on (docs/threat-model.md, L2).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use support::*;

/// Drives one of each admin mutation plus a denied request through the API.
async fn mutate(addr: SocketAddr, admin: &str) {
    let (id1, _, _) = create_key(addr, admin, &json!({"name": "one"})).await;
    let (id2, _, _) = create_key(addr, admin, &json!({"name": "two"})).await;
    let r = post(
        addr,
        &format!("/v1/keys/{id1}/rotate"),
        admin,
        &json!({"grace": "60s"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        delete(addr, &format!("/v1/keys/{id2}"), admin).await.status,
        200
    );
    let pk = add_provider_key(addr, admin, "openai", "sk-proj-audit000000000000").await;
    assert_eq!(
        delete(addr, &format!("/v1/provider-keys/{pk}"), admin)
            .await
            .status,
        200
    );
    let r = get(addr, "/v1/keys", "vpx_live_AAAAAAAAAAAAAAAAAAAAAAAA").await;
    assert_eq!(r.status, 401);
}

fn verify(dir: &Path) -> CliOutput {
    cli(dir, &["audit", "verify"])
}

/// Asserts `audit verify` fails naming line `line`.
fn assert_broken_at(dir: &Path, what: &str, line: usize) {
    let out = verify(dir);
    assert_ne!(out.code, 0, "{what}: verify passed: {out:?}");
    assert!(
        out.stderr.contains(&format!("line {line}")),
        "{what}: should name line {line}: {}",
        out.stderr
    );
}

/// docs/threat-model.md, L1: edit a field, delete, swap or insert a line, or
/// truncate one mid-way → `audit verify` exits non-zero naming the first bad
/// entry.
#[tokio::test]
async fn corruption_audit_verify_names_the_first_tampered_entry() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    mutate(server.addr, server.admin()).await;
    let status = server.terminate(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");

    let out = verify(dir.path());
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("ok: "), "{out:?}");

    let path = dir.path().join("audit.jsonl");
    let original = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert!(lines.len() >= 8, "every mutation is audited: {original}");
    let kinds = original.to_string();
    for kind in [
        "key.created",
        "key.rotated",
        "key.revoked",
        "provider_key.added",
        "provider_key.removed",
    ] {
        assert!(kinds.contains(kind), "{kind} missing: {original}");
    }
    let join = |ls: &[String]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
    let owned: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();

    // Edit a field of entry 3 (keeping the JSON valid).
    let mut edited = owned.clone();
    edited[2] = edited[2].replacen("\"project\":\"default\"", "\"project\":\"evil\"", 1);
    assert_ne!(edited[2], owned[2], "entry 3 has a project field");
    std::fs::write(&path, join(&edited)).unwrap();
    assert_broken_at(dir.path(), "edited", 3);

    // Delete entry 3.
    let mut removed = owned.clone();
    removed.remove(2);
    std::fs::write(&path, join(&removed)).unwrap();
    assert_broken_at(dir.path(), "deleted", 3);

    // Swap entries 2 and 3.
    let mut swapped = owned.clone();
    swapped.swap(1, 2);
    std::fs::write(&path, join(&swapped)).unwrap();
    assert_broken_at(dir.path(), "swapped", 2);

    // Insert a forged copy of entry 2 after it.
    let mut inserted = owned.clone();
    inserted.insert(2, owned[1].clone());
    std::fs::write(&path, join(&inserted)).unwrap();
    assert_broken_at(dir.path(), "inserted", 3);

    // Truncate mid-line: the last entry cut in half.
    let cut = original.len() - lines.last().unwrap().len() / 2 - 1;
    std::fs::write(&path, &original[..cut]).unwrap();
    assert_broken_at(dir.path(), "truncated", lines.len());

    // The untouched file verifies again; a deleted one does not.
    std::fs::write(&path, &original).unwrap();
    assert_eq!(verify(dir.path()).code, 0);
    std::fs::remove_file(&path).unwrap();
    assert_ne!(
        verify(dir.path()).code,
        0,
        "a missing log is not an empty one"
    );
}

/// One audit chain (docs/api.md#audit) with the README's CI flow: the CLI
/// mutates the data directory while the server runs; the chain both processes
/// append to stays intact.
#[tokio::test]
async fn lifecycle_cli_and_server_append_one_intact_chain() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let (addr, admin) = (server.addr, server.admin().to_owned());
    create_key(addr, &admin, &json!({"name": "by-server"})).await;
    let out = cli(
        dir.path(),
        &["keys", "create", "--name", "by-cli", "--output", "json"],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let id = out.json()["id"].as_str().unwrap().to_owned();
    create_key(addr, &admin, &json!({"name": "by-server-again"})).await;
    let out = cli(dir.path(), &["keys", "revoke", &id]);
    assert_eq!(out.code, 0, "{out:?}");
    mutate(addr, &admin).await;
    let status = server.terminate(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let out = verify(dir.path());
    assert_eq!(out.code, 0, "{out:?}");
}

/// docs/threat-model.md, L2: the audit file becomes unwritable while the server
/// runs → key create, rotate, revoke and provider-key add/remove fail with 5xx
/// and are not applied; proxied requests keep working and denials stay denials.
///
/// Running as root, `chmod 000` stops nothing, and the server holds the log
/// open, so removing or chmod-ing the path does not make its writes fail.
/// What works for any user: move the log away and put a directory in its
/// place. The server must notice that the path no longer names the file it
/// is appending to (its entries would go to a file nobody reads) and refuse.
#[tokio::test]
async fn corruption_unwritable_audit_log_fails_admin_mutations_closed() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let (addr, admin, test) = (
        server.addr,
        server.admin().to_owned(),
        server.test().to_owned(),
    );
    let (victim_id, victim, _) = create_key(
        addr,
        &admin,
        &json!({"name": "victim", "permissions": ["usage:read"]}),
    )
    .await;
    let pk = add_provider_key(addr, &admin, "openai", "sk-proj-l2000000000000000").await;
    let keys_before = get(addr, "/v1/keys", &admin).await.json()["data"]
        .as_array()
        .unwrap()
        .len();

    let path = dir.path().join("audit.jsonl");
    std::fs::rename(&path, dir.path().join("audit.jsonl.moved")).unwrap();
    std::fs::create_dir(&path).unwrap();

    let refused = |what: &str, r: &Resp| {
        assert!(r.status >= 500, "{what}: {} {}", r.status, r.text());
        assert_eq!(r.error_code(), "audit_unavailable", "{what}");
    };
    refused(
        "create",
        &post(addr, "/v1/keys", &admin, &json!({"name": "new"})).await,
    );
    refused(
        "rotate",
        &post(
            addr,
            &format!("/v1/keys/{victim_id}/rotate"),
            &admin,
            &json!({"grace": "60s"}),
        )
        .await,
    );
    refused(
        "revoke",
        &delete(addr, &format!("/v1/keys/{victim_id}"), &admin).await,
    );
    refused(
        "add provider key",
        &post(
            addr,
            "/v1/provider-keys",
            &admin,
            &json!({"provider": "openai", "api_key": "sk-proj-l2111111111111111"}),
        )
        .await,
    );
    refused(
        "remove provider key",
        &delete(addr, &format!("/v1/provider-keys/{pk}"), &admin).await,
    );

    // Nothing was applied.
    let keys_after = get(addr, "/v1/keys", &admin).await.json()["data"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(keys_after, keys_before, "no key was created");
    let r = get(addr, "/v1/usage", &victim).await;
    assert_eq!(
        r.status,
        200,
        "the victim was neither revoked nor rotated: {}",
        r.text()
    );
    let pks = get(addr, "/v1/provider-keys", &admin).await.text();
    assert!(pks.contains(&pk), "the provider key was not removed: {pks}");
    assert_eq!(
        pks.matches("pk_").count(),
        1,
        "no provider key was added: {pks}"
    );

    // Proxying goes on; denials stay denials.
    let r = chat(addr, &test, "gpt-4o-mini").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = chat(addr, "vpx_test_AAAAAAAAAAAAAAAAAAAAAAAA", "gpt-4o-mini").await;
    assert_eq!(r.status, 401, "{}", r.text());
    let r = send(addr, Req::new("GET", "/metrics")).await;
    assert!(
        r.text().contains("audit"),
        "a metric records audit failures: {}",
        r.text()
    );
    let failures: u64 = r
        .text()
        .lines()
        .find(|l| l.starts_with("vaultgate_audit_failures_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(failures >= 5, "{}", r.text());
    let log = server.stderr.text();
    assert!(log.contains("audit"), "an error line records it: {log}");
    assert_absent("the log", &log, &encodings(&admin));
}
