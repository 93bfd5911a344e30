//! `sslmode=require` over rustls: a server with a self-signed certificate
//! is reached when its CA is trusted, and refused when it is not.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use vault_postgres::testing::TestPostgres;

#[test]
fn postgres_is_installed_or_skipped() {
    let _ = TestPostgres::shared();
}

#[cfg(postgres_installed)]
mod tls {
    use vault_core::store::KeyStore;
    use vault_postgres::testing::TestPostgres;
    use vault_postgres::{PostgresOptions, PostgresStore};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sslmode_require_verifies_the_server_certificate() {
        let pg = TestPostgres::start_with_tls().unwrap();
        let plain = pg.fresh_database();
        let url = format!("{plain}?sslmode=require").replace("postgres@", "postgres:tls-Pa55word@");
        let ca = pg.tls_ca().unwrap();

        // Not trusted: the Mozilla roots do not know a self-signed server.
        let err = PostgresStore::connect(&url, 2).await.unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(!text.contains("tls-Pa55word"), "{text}");
        assert!(
            text.to_lowercase().contains("certificate"),
            "says why: {text}"
        );

        // Trusted: connects, and every connection of the pool is TLS.
        let options = PostgresOptions::with_pool_size(2).ca_file(&ca);
        PostgresStore::migrate_with(&url, &options).await.unwrap();
        let store = PostgresStore::connect_with(&url, &options).await.unwrap();
        store.set_meta("over", "tls").await.unwrap();
        assert_eq!(
            store.get_meta("over").await.unwrap().as_deref(),
            Some("tls")
        );
        let (client, conn) =
            tokio_postgres::connect(&format!("{plain}?sslmode=disable"), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl)
                 FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                 WHERE a.application_name = 'vaultgate'",
                &[],
            )
            .await
            .unwrap();
        let (all, tls): (i64, i64) = (row.get(0), row.get(1));
        assert!(all >= 1, "the store's connections are open");
        assert_eq!(all, tls, "every vaultgate connection uses TLS");

        // An unreadable CA file is a clear error.
        let missing = PostgresOptions::with_pool_size(1).ca_file("/nonexistent/ca.pem");
        let err = PostgresStore::connect_with(&url, &missing)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
