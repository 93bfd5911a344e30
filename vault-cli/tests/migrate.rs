//! `vaultgate migrate` (docs/replicas.md#moving-an-install-to-postgresql):
//! the schema verb, and `--from DIR --to URL` copying an SQLite install
//! built through the real server into PostgreSQL — every key
//! authenticates by its hash, every provider key decrypts with the same
//! master key, usage, budget lines and the audit chain match — refused
//! while a server holds the install, idempotent, and refusing a target
//! with different data. The URL's password never appears in any output.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use support::*;
use vault_core::crypto::{Aad, AesGcmEncryptor, Encryptor, load_or_create_master_key};
use vault_core::key::KeyHash;
use vault_core::record::UsageFilter;
use vault_core::store::{KeyStore, SqliteStore};
use vault_postgres::testing::TestPostgres;
use vault_postgres::{PostgresAudit, PostgresStore};

const PASSWORD: &str = "pw-Zq83nd0migrate";
const PROVIDER_SECRET: &str = "sk-proj-migrate0000000000000001";

/// The test server's URL for `db`, with a password in it (the server
/// trusts local connections, so it is ignored; it must never be printed).
fn url_with_password(pg: &TestPostgres, db_url: &str) -> String {
    let db = db_url.rsplit('/').next().unwrap();
    format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{db}",
        pg.port()
    )
}

fn migrate(dir: &Path, args: &[&str], url: &str) -> CliOutput {
    let mut all = vec!["migrate"];
    all.extend_from_slice(args);
    let out = cli_with(dir, &all, None, &[("VAULTGATE_DATABASE_URL", url)]);
    assert!(
        !out.stdout.contains(PASSWORD) && !out.stderr.contains(PASSWORD),
        "the password was printed: {out:?}"
    );
    out
}

/// An install with keys (a child with a carve-out), a sealed provider key,
/// settled usage and audit entries, made by a real server; returns the
/// virtual keys.
async fn build_install(dir: &Path, url: &str) -> Vec<String> {
    let server = Server::start(dir);
    let (addr, admin) = (server.addr, server.admin().to_owned());
    let (parent_id, parent_key, _) = create_key(
        addr,
        &admin,
        &json!({"name": "parent", "env": "test", "permissions": ["chat:write", "keys:manage"],
                "models": ["gpt-4o-mini"], "budget": {"limit_usd": 5.0}}),
    )
    .await;
    let r = post(
        addr,
        "/v1/keys",
        &parent_key,
        &json!({"name": "child", "parent": parent_id, "permissions": ["chat:write"],
                "models": ["gpt-4o-mini"], "budget": {"limit_usd": 1.0}}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let child_key = r.json()["key"].as_str().unwrap().to_owned();
    add_provider_key(addr, &admin, "openai", PROVIDER_SECRET).await;
    for key in [&parent_key, &child_key, &child_key] {
        let r = chat(addr, key, "gpt-4o-mini").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // A server holds the install: refused, nothing written.
    let out = migrate(dir, &["--from", dir.to_str().unwrap()], url);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("serve is running"), "{out:?}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out:?}");

    let keys = vec![admin, server.test().to_owned(), parent_key, child_key];
    assert!(server.terminate(Duration::from_secs(30)).is_some());
    keys
}

fn encryptor(dir: &Path) -> AesGcmEncryptor {
    let (master, _) = load_or_create_master_key(dir, None).unwrap();
    AesGcmEncryptor::new(master).unwrap()
}

/// What the two stores must agree on.
async fn compare(sqlite: &SqliteStore, pg: &PostgresStore, keys: &[String], dir: &Path) {
    for key in keys {
        let hash = KeyHash::of(key);
        let a = sqlite
            .find_by_hash(&hash)
            .await
            .unwrap()
            .expect("in sqlite");
        let b = pg
            .find_by_hash(&hash)
            .await
            .unwrap()
            .expect("authenticates on postgres");
        assert_eq!(a, b);
    }
    assert_eq!(
        sqlite.list_keys(None).await.unwrap(),
        pg.list_keys(None).await.unwrap()
    );
    let enc = encryptor(dir);
    let pks = pg.list_provider_keys(None).await.unwrap();
    assert_eq!(pks.len(), 1);
    for pk in &pks {
        let aad = Aad {
            record_id: pk.id.as_str(),
            project: &pk.project,
            provider: pk.provider,
        };
        assert_eq!(
            enc.open(&pk.sealed, &aad).unwrap().expose_secret(),
            PROVIDER_SECRET
        );
    }
    let all = UsageFilter {
        limit: Some(10_000),
        ..UsageFilter::default()
    };
    let (ua, ub) = (
        sqlite.list_usage(&all).await.unwrap(),
        pg.list_usage(&all).await.unwrap(),
    );
    assert_eq!(ua.len(), 3);
    assert_eq!(ua, ub);
    let cost = |u: &[vault_core::record::UsageRecord]| u.iter().map(|r| r.cost.0).sum::<u64>();
    assert!(cost(&ua) > 0);
    assert_eq!(cost(&ua), cost(&ub));
    for key in sqlite.list_keys(None).await.unwrap() {
        let Some(limit) = key.policy.budget.as_ref().map(|b| b.limit) else {
            continue;
        };
        let line = vault_core::record::BudgetLine {
            key: key.id.clone(),
            limit,
            period_start: vault_core::clock::UnixMillis(0),
        };
        let now = vault_core::clock::UnixMillis(i64::MAX / 2);
        assert_eq!(
            sqlite.budget_usage(&line, now).await.unwrap(),
            pg.budget_usage(&line, now).await.unwrap(),
            "budget line of {}",
            key.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_migrate_copies_an_sqlite_install_and_a_second_run_changes_nothing() {
    let Some(pg) = TestPostgres::shared() else {
        return;
    };
    let url = url_with_password(pg, &pg.empty_database());
    let dir = tempdir();
    let keys = build_install(dir.path(), &url).await;

    // The schema alone, then the copy.
    let out = migrate(dir.path(), &[], &url);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("applied migration(s) 1, 2"), "{out:?}");
    let from = dir.path().to_str().unwrap();
    let out = migrate(dir.path(), &["--from", from], &url);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("nothing to apply"), "{out:?}");
    assert!(
        out.stdout.contains(
            "copied 4 keys, 1 provider keys, 2 budget lines, 1 carve-outs, 3 usage records"
        ),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("audit chain: 5 entries copied"),
        "{out:?}"
    );
    assert!(out.stdout.contains("verified: 6 tables"), "{out:?}");

    let sqlite = SqliteStore::open_in_dir(dir.path()).unwrap();
    let store = PostgresStore::connect(&url, 2).await.unwrap();
    compare(&sqlite, &store, &keys, dir.path()).await;
    let file = vault_core::audit::verify(&dir.path().join("audit.jsonl")).unwrap();
    let copied = vault_core::audit::AuditTrail::verify(&PostgresAudit::new(&store))
        .await
        .unwrap();
    assert_eq!(file, copied, "same entries, same last hash");
    let verify = cli_with(
        dir.path(),
        &["audit", "verify"],
        None,
        &[("VAULTGATE_DATABASE_URL", &url)],
    );
    assert_eq!(verify.code, 0, "{verify:?}");
    assert!(
        verify
            .stdout
            .contains(&format!("ok: {} entries", file.entries))
    );

    // Again: nothing copied, nothing changed.
    let out = migrate(dir.path(), &["--from", from], &url);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("copied 0 keys (4 already there)"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("audit chain: 0 entries copied"),
        "{out:?}"
    );
    compare(&sqlite, &store, &keys, dir.path()).await;
    assert_eq!(
        vault_core::audit::AuditTrail::verify(&PostgresAudit::new(&store))
            .await
            .unwrap(),
        file
    );

    // A target holding other data under the same id is refused, unchanged.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute(
            "UPDATE keys SET name = 'someone else' WHERE name = 'child'",
            &[],
        )
        .await
        .unwrap();
    let out = migrate(dir.path(), &["--from", from], &url);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .contains("refusing to copy: the target holds different data for keys key_"),
        "{out:?}"
    );
}

#[test]
fn boundary_bad_input_is_one_line_exit_2() {
    let dir = tempdir();
    let out = cli(dir.path(), &["migrate"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("VAULTGATE_DATABASE_URL"), "{out:?}");
    let bad = format!("postgres://u:{PASSWORD}@[::1:5432/x");
    let out = migrate(dir.path(), &[], &bad);
    assert_eq!(out.code, 2, "{out:?}");
    let out = migrate(
        dir.path(),
        &["--from", dir.path().join("nope").to_str().unwrap()],
        &format!("postgres://u:{PASSWORD}@127.0.0.1:1/x"),
    );
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("not a vaultgate data directory"),
        "{out:?}"
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out:?}");
}
