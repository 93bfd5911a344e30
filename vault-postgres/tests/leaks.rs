//! Connection URLs and passwords never appear in `Debug`, `Display` or
//! errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use vault_postgres::testing::TestPostgres;
use vault_postgres::{PostgresError, PostgresStore};

const PASSWORD: &str = "hunter2-Sup3rS3cret";

fn assert_clean(what: &str, text: &str) {
    assert!(
        !text.contains(PASSWORD),
        "{what} shows the password: {text}"
    );
    assert!(
        !text.contains("hunter2"),
        "{what} shows the password: {text}"
    );
}

#[test]
fn postgres_is_installed_or_skipped() {
    let _ = TestPostgres::shared();
}

#[tokio::test]
async fn leak_unparsable_urls_are_not_repeated() {
    for url in [
        format!("postgres://app:{PASSWORD}@db:notaport/x"),
        format!("postgres://app:{PASSWORD}@db:5432/x?sslmode=sometimes"),
        format!("postgres://app:{PASSWORD}@db:5432/x?nosuchoption={PASSWORD}"),
        format!("host=db password='{PASSWORD}"),
        format!("host=db password={PASSWORD} port=x{PASSWORD}"),
    ] {
        let err = PostgresStore::connect(&url, 1).await.unwrap_err();
        assert!(matches!(err, PostgresError::Url(_)), "{url}: {err}");
        assert_clean("a URL error's Display", &err.to_string());
        assert_clean("a URL error's Debug", &format!("{err:?}"));
        let err = PostgresStore::migrate(&url).await.unwrap_err();
        assert_clean("a migration error", &format!("{err} {err:?}"));
    }
}

#[tokio::test]
async fn leak_connection_failures_do_not_show_the_password() {
    // Nothing listens on this port: the connection is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:{port}/vaultgate?connect_timeout=2");
    let err = PostgresStore::connect(&url, 1).await.unwrap_err();
    assert!(matches!(err, PostgresError::Backend(_)), "{err}");
    assert!(
        err.to_string().contains("127.0.0.1"),
        "names the host: {err}"
    );
    assert_clean("a connection error", &format!("{err} {err:?}"));
    let err = PostgresStore::migrate(&url).await.unwrap_err();
    assert_clean("a migration error", &format!("{err} {err:?}"));
    let store_err: vault_core::store::StoreError = err.into();
    assert_clean("a store error", &format!("{store_err} {store_err:?}"));
}

#[cfg(postgres_installed)]
#[tokio::test]
async fn leak_store_debug_display_and_errors_with_a_password_in_the_url() {
    use vault_core::store::KeyStore;

    let pg = TestPostgres::shared().expect("build.rs found PostgreSQL");
    // The server trusts every local login: the password is carried, unused.
    let url = pg
        .fresh_database()
        .replace("postgres@", &format!("postgres:{PASSWORD}@"));
    let store = PostgresStore::connect(&url, 2).await.unwrap();
    let debug = format!("{store:?}");
    let display = store.to_string();
    assert_clean("Debug", &debug);
    assert_clean("Display", &display);
    assert!(debug.contains("127.0.0.1"), "{debug}");
    assert!(
        display.starts_with("PostgreSQL at postgres@127.0.0.1:"),
        "{display}"
    );
    // A backend error (a query against a dropped table) names SQL, not the URL.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.batch_execute("DROP TABLE meta").await.unwrap();
    let err = store.get_meta("x").await.unwrap_err();
    assert_clean("a store error", &format!("{err} {err:?}"));
    // A wrong password against a server that checks it.
    let err = PostgresStore::connect(
        &format!(
            "postgres://nosuchuser:{PASSWORD}@127.0.0.1:{}/nodb",
            pg.port()
        ),
        1,
    )
    .await
    .unwrap_err();
    assert_clean("a login error", &format!("{err} {err:?}"));
}
