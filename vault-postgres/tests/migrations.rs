//! Schema migrations: a fresh database, re-runs, replicas migrating at
//! once, and `connect` refusing a schema older or newer than the build's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use vault_postgres::testing::TestPostgres;

#[test]
fn postgres_is_installed_or_skipped() {
    let _ = TestPostgres::shared();
}

#[cfg(postgres_installed)]
mod migrations {
    use vault_core::store::KeyStore;
    use vault_postgres::testing::TestPostgres;
    use vault_postgres::{PostgresError, PostgresStore, SCHEMA_VERSION};

    fn pg() -> &'static TestPostgres {
        TestPostgres::shared().expect("build.rs found PostgreSQL")
    }

    #[tokio::test]
    async fn lifecycle_fresh_database_migrates_then_reruns_are_no_ops() {
        let url = pg().empty_database();
        let applied = PostgresStore::migrate(&url).await.unwrap();
        assert_eq!(applied, vault_postgres::migration_versions());
        assert!(PostgresStore::migrate(&url).await.unwrap().is_empty());
        let store = PostgresStore::connect(&url, 2).await.unwrap();
        assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
        store.set_meta("m", "v").await.unwrap();
        // Re-running keeps the data.
        assert!(PostgresStore::migrate(&url).await.unwrap().is_empty());
        assert_eq!(store.get_meta("m").await.unwrap().as_deref(), Some("v"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrency_replicas_migrating_at_once_apply_each_migration_once() {
        let url = pg().empty_database();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let url = url.clone();
            tasks.push(tokio::spawn(
                async move { PostgresStore::migrate(&url).await },
            ));
        }
        let mut applied = Vec::new();
        for t in tasks {
            applied.extend(t.await.unwrap().unwrap());
        }
        applied.sort();
        assert_eq!(applied, vault_postgres::migration_versions());
        let store = PostgresStore::connect(&url, 2).await.unwrap();
        assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn lifecycle_connect_refuses_a_database_without_the_schema() {
        let url = pg().empty_database();
        let err = PostgresStore::connect(&url, 2).await.unwrap_err();
        assert!(
            matches!(err, PostgresError::SchemaOutdated { found: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("vaultgate migrate"), "{err}");
    }

    /// The version before this build's (migrations need not be consecutive).
    fn previous_version() -> i32 {
        let versions = vault_postgres::migration_versions();
        versions[versions.len() - 2]
    }

    #[tokio::test]
    async fn lifecycle_connect_refuses_an_older_schema() {
        let url = pg().fresh_database();
        let name = url.rsplit('/').next().unwrap().to_owned();
        // As if the binary were newer than the database: its last
        // migration not recorded.
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .execute(
                "DELETE FROM schema_version WHERE version = $1",
                &[&SCHEMA_VERSION],
            )
            .await
            .unwrap();
        let err = PostgresStore::connect(&url, 2).await.unwrap_err();
        assert!(
            matches!(err, PostgresError::SchemaOutdated { found, expected }
                if found == previous_version() && expected == SCHEMA_VERSION),
            "{err}"
        );
        assert!(err.to_string().contains("`vaultgate migrate`"), "{err}");
        assert!(!err.to_string().contains(&name), "{err}");
    }

    #[tokio::test]
    async fn lifecycle_newer_schema_is_refused_by_connect_and_migrate() {
        let url = pg().fresh_database();
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .execute("INSERT INTO schema_version (version) VALUES (999)", &[])
            .await
            .unwrap();
        let err = PostgresStore::connect(&url, 2).await.unwrap_err();
        assert!(
            matches!(err, PostgresError::SchemaTooNew { found: 999, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade vaultgate"), "{err}");
        let err = PostgresStore::migrate(&url).await.unwrap_err();
        assert!(
            matches!(err, PostgresError::SchemaTooNew { found: 999, .. }),
            "{err}"
        );
    }
}
