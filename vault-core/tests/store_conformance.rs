//! One `KeyStore` conformance suite (`vault_core::conformance`), run
//! unchanged against every backend of the workspace exactly as a store
//! written elsewhere runs it (docs/conformance.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use tempfile::TempDir;
use vault_core::conformance;
use vault_core::store::{LeasedStore, MemoryStore, SqliteStore};

/// A fresh SQLite store in a temporary directory, kept as long as the store.
fn sqlite_in_temp_dir() -> (SqliteStore, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(&dir.path().join("data")).unwrap();
    (store, dir)
}

mod memory {
    use super::*;
    vault_core::store_conformance_tests!(MemoryStore::new);
}

mod sqlite {
    vault_core::store_conformance_tests!(super::sqlite_in_temp_dir);
}

mod leased_memory {
    use super::*;
    vault_core::store_conformance_tests!(|| LeasedStore::new(MemoryStore::new()));
}

mod leased_sqlite {
    use super::*;
    vault_core::store_conformance_tests!(|| {
        let (store, dir) = sqlite_in_temp_dir();
        (LeasedStore::new(store), dir)
    });
}

/// Dashboard sessions (docs/dashboard.md#sessions), in memory and in the
/// data directory's database.
mod sessions {
    use vault_core::store::MemorySessions;

    use super::*;

    #[tokio::test]
    async fn memory() {
        conformance::session_store_keeps_purges_and_counts(Arc::new(MemorySessions::default()))
            .await;
    }

    #[tokio::test]
    async fn sqlite() {
        let (store, _dir) = sqlite_in_temp_dir();
        conformance::session_store_keeps_purges_and_counts(Arc::new(store)).await;
    }
}

/// What only the SQLite store promises: persistence, sharing one file
/// between handles (as between processes), and refusing bad rows.
mod sqlite_only {
    use std::path::Path;

    use rusqlite::Connection;
    use vault_core::clock::UnixMillis;
    use vault_core::conformance::{child_of, key, line, provider_key_at, usage_of};
    use vault_core::key::KeyPrefix;
    use vault_core::money::Micros;
    use vault_core::record::{KeyStatus, Settlement, UsageFilter};
    use vault_core::store::{KeyStore, StoreError};

    use super::*;

    const NOW: UnixMillis = UnixMillis(10_000);
    const LATER: UnixMillis = UnixMillis(70_000);

    fn raw(path: &Path) -> Connection {
        let c = Connection::open(path).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        c
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lifecycle_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let parent = key();
        let child = child_of(&parent);
        let pk = provider_key_at("default", 5);
        let (held, first_id);
        {
            let s = SqliteStore::open(&path).unwrap();
            s.insert_key(&parent, None).await.unwrap();
            let pl = line(&parent, 5_000_000, 0);
            s.insert_key(&child, Some((&pl, Micros(2_000_000))))
                .await
                .unwrap();
            s.insert_provider_key(&pk).await.unwrap();
            s.rotate_key(
                &parent.id,
                &conformance::fresh_hash(),
                &KeyPrefix::new("vpx_live_Rot1"),
                Some(LATER),
            )
            .await
            .unwrap();
            s.revoke_key(&child.id, NOW).await.unwrap();
            s.append_usage(&[usage_of(&parent, 7)]).await.unwrap();
            s.set_meta("m", "v").await.unwrap();
            let settled = s
                .reserve(&pl, Micros(100), Micros(1), NOW, LATER)
                .await
                .unwrap();
            first_id = settled.id;
            s.settle(&[Settlement {
                reservation: settled,
                actual: Micros(60),
            }])
            .await
            .unwrap();
            held = s
                .reserve(&pl, Micros(300), Micros(1), NOW, LATER)
                .await
                .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let p = s.find_by_hash(&parent.hash).await.unwrap().unwrap();
        assert_eq!(
            (p.id.clone(), p.request_count, p.spend),
            (parent.id.clone(), 1, Micros(60))
        );
        assert_eq!(p.previous_hash, Some(parent.hash));
        let c = s.get_key(&child.id).await.unwrap().unwrap();
        assert_eq!((c.status, c.revoked_at), (KeyStatus::Revoked, Some(NOW)));
        assert_eq!(s.get_provider_key(&pk.id).await.unwrap(), Some(pk));
        assert_eq!(s.get_meta("m").await.unwrap().as_deref(), Some("v"));
        assert_eq!(
            s.list_usage(&UsageFilter::default()).await.unwrap().len(),
            1
        );
        let pl = line(&parent, 5_000_000, 0);
        let usage = s.budget_usage(&pl, NOW).await.unwrap();
        assert_eq!((usage.settled, usage.reserved), (Micros(60), Micros(300)));
        // Reservation ids keep growing across restarts, even after deletions.
        let next = s
            .reserve(&pl, Micros(1), Micros(1), NOW, LATER)
            .await
            .unwrap();
        assert!(next.id > held.id && held.id > first_id);
        s.settle(&[Settlement {
            reservation: held,
            actual: Micros(300),
        }])
        .await
        .unwrap();
        assert_eq!(s.budget_usage(&pl, NOW).await.unwrap().settled, Micros(360));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrency_two_handles_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let a: conformance::Store = Arc::new(SqliteStore::open(&path).unwrap());
        let b: conformance::Store = Arc::new(SqliteStore::open(&path).unwrap());
        let owner = key();
        a.insert_key(&owner, None).await.unwrap();
        let l = line(&owner, 500_000, 0);

        let mut tasks = Vec::new();
        for (n, store) in [a.clone(), b.clone(), a.clone(), b.clone()]
            .into_iter()
            .enumerate()
        {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                let mut keys = Vec::new();
                let mut granted = 0u32;
                for i in 0..40 {
                    let k = conformance::key_at("shared", (n * 1000 + i) as i64);
                    store.insert_key(&k, None).await.unwrap();
                    keys.push(k);
                    match store
                        .reserve(&l, Micros(10_000), Micros(10_000), NOW, LATER)
                        .await
                    {
                        Ok(_) => granted += 1,
                        Err(StoreError::BudgetExceeded { .. }) => {}
                        Err(e) => panic!("unexpected: {e}"),
                    }
                }
                (keys, granted)
            }));
        }
        let mut all_keys = Vec::new();
        let mut granted = 0;
        for t in tasks {
            let (keys, g) = t.await.unwrap();
            all_keys.extend(keys);
            granted += g;
        }
        assert_eq!(granted, 50, "two handles never over-reserve one line");
        for store in [&a, &b] {
            assert_eq!(store.list_keys(Some("shared")).await.unwrap().len(), 160);
            assert_eq!(
                store.budget_usage(&l, NOW).await.unwrap().reserved,
                Micros(500_000)
            );
        }
        for k in &all_keys {
            assert_eq!(b.find_by_hash(&k.hash).await.unwrap().unwrap().id, k.id);
        }
        let check: String = raw(&path)
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lifecycle_second_handle_sees_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let a = SqliteStore::open(&path).unwrap();
        let b = SqliteStore::open(&path).unwrap();
        let k = key();
        a.insert_key(&k, None).await.unwrap();
        // B has read it (its reader connection is warm) before the revocation.
        let seen = b.find_by_hash(&k.hash).await.unwrap().unwrap();
        assert_eq!(seen.status, KeyStatus::Active);
        a.revoke_key(&k.id, NOW).await.unwrap();
        let seen = b.find_by_hash(&k.hash).await.unwrap().unwrap();
        assert_eq!(seen.status, KeyStatus::Revoked);
        assert_eq!(seen.revoked_at, Some(NOW));
    }

    #[tokio::test]
    async fn corruption_bad_rows_are_corrupt_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let s = SqliteStore::open(&path).unwrap();
        let k = key();
        s.insert_key(&k, None).await.unwrap();
        let pk = provider_key_at("default", 1);
        s.insert_provider_key(&pk).await.unwrap();
        s.append_usage(&[usage_of(&k, 5)]).await.unwrap();
        let k = s.get_key(&k.id).await.unwrap().unwrap();
        let db = raw(&path);

        let corruptions = [
            "UPDATE keys SET policy = '{not json'",
            "UPDATE keys SET policy = '{\"no_such_field\": 1}'",
            "UPDATE keys SET scopes = '[\"root:everything\"]'",
            "UPDATE keys SET hash = 'zz'",
            "UPDATE keys SET spend = -5",
            "UPDATE keys SET env = 'prod'",
            "UPDATE keys SET status = 'sleeping'",
            "UPDATE keys SET created_at = 'yesterday'",
            "UPDATE keys SET provider_keys = '[\"sk-not-an-id\"]'",
        ];
        for sql in corruptions {
            let good: (String, String, String, i64, String, String, String, String) = db
                .query_row(
                    "SELECT policy, scopes, hash, spend, env, status, created_at, provider_keys FROM keys",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get::<_, i64>(6)?.to_string(), r.get(7)?)),
                )
                .unwrap();
            db.execute(sql, []).unwrap();
            assert!(
                matches!(s.get_key(&k.id).await, Err(StoreError::Corrupt(_))),
                "{sql}"
            );
            assert!(
                matches!(s.list_keys(None).await, Err(StoreError::Corrupt(_))),
                "{sql}"
            );
            let by_hash = s.find_by_hash(&k.hash).await;
            assert!(
                matches!(by_hash, Err(StoreError::Corrupt(_)) | Ok(None)),
                "{sql}"
            );
            db.execute(
                "UPDATE keys SET policy = ?1, scopes = ?2, hash = ?3, spend = ?4, env = ?5,
                     status = ?6, created_at = CAST(?7 AS INTEGER), provider_keys = ?8",
                rusqlite::params![
                    good.0, good.1, good.2, good.3, good.4, good.5, good.6, good.7
                ],
            )
            .unwrap();
            assert_eq!(
                s.get_key(&k.id).await.unwrap(),
                Some(k.clone()),
                "restored after {sql}"
            );
        }

        db.execute("UPDATE provider_keys SET provider = 'skynet'", [])
            .unwrap();
        assert!(matches!(
            s.get_provider_key(&pk.id).await,
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            s.list_provider_keys(None).await,
            Err(StoreError::Corrupt(_))
        ));
        db.execute("UPDATE usage SET tokens_in = -1", []).unwrap();
        assert!(matches!(
            s.list_usage(&UsageFilter::default()).await,
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn lifecycle_refuses_a_database_from_a_newer_build() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        drop(SqliteStore::open(&path).unwrap());
        let current: i64 = raw(&path)
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        raw(&path).pragma_update(None, "user_version", 999).unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            matches!(&err, StoreError::Backend(m) if m.contains("newer")),
            "{err}"
        );
        // The current version opens again, and opening is idempotent.
        raw(&path)
            .pragma_update(None, "user_version", current)
            .unwrap();
        drop(SqliteStore::open(&path).unwrap());
        drop(SqliteStore::open(&path).unwrap());
        let mode: String = raw(&path)
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[cfg(unix)]
    #[test]
    fn leak_open_in_dir_creates_a_private_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested").join(".vaultgate");
        let s = SqliteStore::open_in_dir(&data).unwrap();
        assert_eq!(s.path(), data.join(vault_core::store::DB_FILE_NAME));
        let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(data.join("vaultgate.db").exists());
    }
}
